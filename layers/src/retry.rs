//! Retrying failed messages: [`MessageRetryLayer`].
//!
//! This is tower's [`Retry`] middleware with a policy for messages,
//! [`MessageRetryPolicy`]:
//!
//! - a message is tried again when the inner service answers
//!   [`Outcome::Failed`] with a [retryable](tower_mqtt_core::HandlerError::is_retryable) error,
//!   or fails with an error of its own (such as tower's timeout error; see
//!   [`timeout`](crate::timeout)). Other outcomes, and permanent failures
//!   ([`HandlerError::permanent`](tower_mqtt_core::HandlerError::permanent), decode errors), are final;
//! - at most `max_attempts` times in all, the first included;
//! - after an exponential backoff with jitter (tower's
//!   [`ExponentialBackoff`](tower::retry::backoff::ExponentialBackoff); by default from 100 ms, doubling, up to 5 s, plus up
//!   to 50 % random jitter), each message with its own random sequence so that
//!   messages failing together do not retry in lockstep;
//! - while a retry budget allows ([`RetryBudget`]; by default retries may add
//!   20 % to the messages handled over 10 s, plus 10 retries a second, the
//!   rule of tower's `TpsBudget` without its clock read per message), so a
//!   broken dependency does not turn every message into `max_attempts` of them.
//!   The budget is shared by every service made from one layer.
//!
//! Each retry is logged at `WARN` with the error and the attempt number.
//!
//! The attempts, the backoff and the budget are one core, shared with the
//! publish retry of the outbound stack
//! ([`PublishRetryPolicy`](crate::outbound::PublishRetryPolicy)): each side
//! adds only what is retryable for it, and how it logs.
//!
//! The request is cloned before each attempt (a [`Request<Envelope>`] is
//! `Clone`); with `max_attempts` of 1, nothing is cloned.
//!
//! Put retries inside dedup (a redelivery that arrives while a message is being
//! retried is absorbed as a duplicate) and inside isolation (which then sees the
//! last attempt's error, and logs and dead-letters a message once); put the
//! timeout inside the retry, so that each attempt has its own.
//!
//! ```
//! use std::time::Duration;
//! use tower::{service_fn, BoxError, Layer, ServiceExt};
//! use tower_mqtt::{HandlerError, Envelope, Outcome, Request};
//! use tower_mqtt::layers::retry::MessageRetryLayer;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
//! let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
//! let counter = calls.clone();
//! let flaky = service_fn(move |_: Request<Envelope>| {
//!     let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
//!     async move {
//!         Ok::<_, BoxError>(if n < 2 {
//!             Outcome::Failed(HandlerError::new("database busy"))
//!         } else {
//!             Outcome::Handled
//!         })
//!     }
//! });
//! let svc = MessageRetryLayer::new(3)
//!     .backoff(Duration::from_millis(50), Duration::from_secs(1))
//!     .layer(flaky);
//!
//! let req = Request::builder("a").body(Envelope::new("t", serde_json::json!({})).unwrap()).unwrap();
//! assert!(matches!(svc.oneshot(req).await.unwrap(), Outcome::Handled));
//! assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 3);
//! # }
//! ```

use std::{fmt, time::Duration};

use tokio::time::Sleep;
use tower::{
    retry::{budget::Budget, Policy, Retry},
    Layer,
};
use tower_mqtt_core::{router::RoutesFailed, Envelope, Outcome, Request};

use self::attempts::{Attempts, Next};

pub use self::budget::{RetryBudget, DEPOSITS_PER_CLOCK_READ};

pub(crate) mod attempts;
mod budget;

/// The first backoff unless configured otherwise: 100 ms.
pub const DEFAULT_MIN_BACKOFF: Duration = Duration::from_millis(100);

/// The longest backoff unless configured otherwise: 5 s.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The jitter unless configured otherwise: up to 50 % of the backoff is added.
pub const DEFAULT_JITTER: f64 = 0.5;

/// A service with message retries: tower's [`Retry`] with a
/// [`MessageRetryPolicy`].
pub type MessageRetry<S> = Retry<MessageRetryPolicy, S>;

/// The retry policy for messages; see the [module docs](self).
///
/// Use it through [`MessageRetryLayer`], or with tower's own
/// [`RetryLayer`](tower::retry::RetryLayer).
///
/// ```
/// use tower::retry::RetryLayer;
/// use tower_mqtt::layers::retry::MessageRetryPolicy;
///
/// let policy = MessageRetryPolicy::new(4);
/// assert_eq!(policy.max_attempts(), 4);
/// let layer = RetryLayer::new(policy);
/// ```
#[derive(Clone)]
#[must_use]
pub struct MessageRetryPolicy {
    attempts: Attempts,
}

impl MessageRetryPolicy {
    /// At most `max_attempts` attempts (the first included; 0 counts as 1),
    /// with the default backoff, jitter and budget.
    pub fn new(max_attempts: u32) -> Self {
        Self {
            attempts: Attempts::new(max_attempts),
        }
    }

    /// Waits `min` before the first retry, doubling each time up to `max`
    /// (before jitter).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_mqtt::layers::retry::MessageRetryPolicy;
    ///
    /// let policy = MessageRetryPolicy::new(3).backoff(Duration::from_millis(50), Duration::from_secs(2));
    /// ```
    ///
    /// # Panics
    ///
    /// When `min > max` or `max` is zero.
    #[track_caller]
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.attempts = self.attempts.backoff(min, max);
        self
    }

    /// Adds a random part of up to `ratio` times the backoff (0 for none; the
    /// total never exceeds the maximum backoff).
    ///
    /// ```
    /// use tower_mqtt::layers::retry::MessageRetryPolicy;
    ///
    /// let steady = MessageRetryPolicy::new(3).jitter(0.0);
    /// ```
    ///
    /// # Panics
    ///
    /// When `ratio` is negative, above 100 or NaN.
    #[track_caller]
    pub fn jitter(mut self, ratio: f64) -> Self {
        self.attempts = self.attempts.jitter(ratio);
        self
    }

    /// Limits retries with `budget` instead of `RetryBudget::default()`: a
    /// [`RetryBudget`] of other limits, or any tower [`Budget`], such as its
    /// `TpsBudget`.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower::retry::budget::TpsBudget;
    /// use tower_mqtt::layers::retry::{MessageRetryPolicy, RetryBudget};
    ///
    /// // Retries may add 10 % to the load over 10 s, plus 1 retry a second.
    /// let policy = MessageRetryPolicy::new(3).budget(RetryBudget::new(Duration::from_secs(10), 1, 0.1));
    /// // The same rule, kept by tower's budget, which reads the clock per message.
    /// let policy = MessageRetryPolicy::new(3).budget(TpsBudget::new(Duration::from_secs(10), 1, 0.1));
    /// ```
    pub fn budget(mut self, budget: impl Budget + Send + Sync + 'static) -> Self {
        self.attempts = self.attempts.budget(budget);
        self
    }

    /// The most attempts a message gets, the first included.
    pub fn max_attempts(&self) -> u32 {
        self.attempts.max()
    }
}

impl fmt::Debug for MessageRetryPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MessageRetryPolicy")
            .field("attempts", &self.attempts)
            .finish()
    }
}

impl<E: fmt::Display> Policy<Request<Envelope>, Outcome, E> for MessageRetryPolicy {
    type Future = Sleep;

    fn retry(
        &mut self,
        req: &mut Request<Envelope>,
        result: &mut Result<Outcome, E>,
    ) -> Option<Self::Future> {
        let error: Option<&dyn fmt::Display> = match &*result {
            Ok(Outcome::Failed(err)) if err.is_retryable() => Some(err),
            Ok(_) => None,
            Err(err) => Some(err),
        };
        match self.attempts.next(error) {
            Next::Done | Next::LastAttempt { .. } => None,
            Next::OverBudget { attempt, error } => {
                tracing::warn!(attempt, %error, "retry budget exhausted, not retrying");
                None
            }
            Next::Retry {
                attempt,
                error,
                backoff,
            } => {
                tracing::warn!(attempt, %error, "message failed, retrying");
                // Routes that handled the message must not run again.
                if let Ok(Outcome::Failed(err)) = &*result {
                    if let Some(failed) = err.get_ref().downcast_ref::<RoutesFailed>() {
                        req.extensions_mut().insert(failed.remaining());
                    }
                }
                Some(backoff)
            }
        }
    }

    fn clone_request(&mut self, req: &Request<Envelope>) -> Option<Request<Envelope>> {
        self.attempts.clone_request(req)
    }
}

/// Makes [`MessageRetry`] services; see the [module docs](self).
///
/// Services made from one layer (and its clones) share its retry budget.
///
/// ```
/// use std::time::Duration;
/// use tower::ServiceBuilder;
/// use tower_mqtt::Router;
/// use tower_mqtt::layers::{retry::RetryBudget, MessageRetryLayer};
///
/// let retry = MessageRetryLayer::new(5)
///     .backoff(Duration::from_millis(200), Duration::from_secs(10))
///     .jitter(0.25)
///     .budget(RetryBudget::new(Duration::from_secs(10), 5, 0.1));
/// assert_eq!(retry.policy().max_attempts(), 5);
/// let svc = ServiceBuilder::new().layer(retry).service(Router::<()>::new());
/// ```
#[derive(Clone, Debug)]
#[must_use]
pub struct MessageRetryLayer {
    policy: MessageRetryPolicy,
}

impl MessageRetryLayer {
    /// At most `max_attempts` attempts (the first included), with the default
    /// backoff, jitter and budget.
    pub fn new(max_attempts: u32) -> Self {
        Self {
            policy: MessageRetryPolicy::new(max_attempts),
        }
    }

    /// See [`MessageRetryPolicy::backoff`].
    ///
    /// # Panics
    ///
    /// When `min > max` or `max` is zero.
    #[track_caller]
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.policy = self.policy.backoff(min, max);
        self
    }

    /// See [`MessageRetryPolicy::jitter`].
    ///
    /// # Panics
    ///
    /// When `ratio` is negative, above 100 or NaN.
    #[track_caller]
    pub fn jitter(mut self, ratio: f64) -> Self {
        self.policy = self.policy.jitter(ratio);
        self
    }

    /// See [`MessageRetryPolicy::budget`].
    pub fn budget(mut self, budget: impl Budget + Send + Sync + 'static) -> Self {
        self.policy = self.policy.budget(budget);
        self
    }

    /// The policy.
    pub fn policy(&self) -> &MessageRetryPolicy {
        &self.policy
    }
}

impl<S> Layer<S> for MessageRetryLayer {
    type Service = MessageRetry<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Retry::new(self.policy.clone(), inner)
    }
}

#[cfg(test)]
mod tests;
