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
//!   [`ExponentialBackoff`]; by default from 100 ms, doubling, up to 5 s, plus up
//!   to 50 % random jitter), each message with its own random sequence so that
//!   messages failing together do not retry in lockstep;
//! - while a retry budget allows (tower's [`TpsBudget`]; by default retries may
//!   add 20 % to the messages handled over 10 s, plus 10 retries a second), so a
//!   broken dependency does not turn every message into `max_attempts` of them.
//!   The budget is shared by every service made from one layer.
//!
//! Each retry is logged at `WARN` with the error and the attempt number.
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
//! use tower_mqtt_layers::retry::MessageRetryLayer;
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

use std::{fmt, sync::Arc, time::Duration};

use tokio::time::Sleep;
use tower::{
    retry::{
        backoff::{Backoff, ExponentialBackoff, ExponentialBackoffMaker, MakeBackoff},
        budget::{Budget, TpsBudget},
        Policy, Retry,
    },
    util::rng::HasherRng,
    Layer,
};
use tower_mqtt_core::{router::RoutesFailed, Envelope, Outcome, Request};

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
/// use tower_mqtt_layers::retry::MessageRetryPolicy;
///
/// let policy = MessageRetryPolicy::new(4);
/// assert_eq!(policy.max_attempts(), 4);
/// let layer = RetryLayer::new(policy);
/// ```
#[derive(Clone)]
#[must_use]
pub struct MessageRetryPolicy {
    max_attempts: u32,
    /// The attempt running, counted from 1; each request has its own copy.
    attempt: u32,
    min_backoff: Duration,
    max_backoff: Duration,
    jitter: f64,
    budget: Arc<TpsBudget>,
    /// Made at the first retry, with a random generator of its own.
    backoff: Option<ExponentialBackoff>,
}

impl MessageRetryPolicy {
    /// At most `max_attempts` attempts (the first included; 0 counts as 1),
    /// with the default backoff, jitter and budget.
    pub fn new(max_attempts: u32) -> Self {
        Self {
            max_attempts: max_attempts.max(1),
            attempt: 1,
            min_backoff: DEFAULT_MIN_BACKOFF,
            max_backoff: DEFAULT_MAX_BACKOFF,
            jitter: DEFAULT_JITTER,
            budget: Arc::new(TpsBudget::default()),
            backoff: None,
        }
    }

    /// Waits `min` before the first retry, doubling each time up to `max`
    /// (before jitter).
    ///
    /// # Panics
    ///
    /// When `min > max` or `max` is zero.
    #[track_caller]
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.min_backoff = min;
        self.max_backoff = max;
        self.validate();
        self
    }

    /// Adds a random part of up to `ratio` times the backoff (0 for none; the
    /// total never exceeds the maximum backoff).
    ///
    /// # Panics
    ///
    /// When `ratio` is negative, above 100 or NaN.
    #[track_caller]
    pub fn jitter(mut self, ratio: f64) -> Self {
        self.jitter = ratio;
        self.validate();
        self
    }

    /// Limits retries with `budget` instead of `TpsBudget::default()`.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower::retry::budget::TpsBudget;
    /// use tower_mqtt_layers::retry::MessageRetryPolicy;
    ///
    /// // Retries may add 10 % to the load over 10 s, plus 1 retry a second.
    /// let policy = MessageRetryPolicy::new(3).budget(TpsBudget::new(Duration::from_secs(10), 1, 0.1));
    /// ```
    pub fn budget(mut self, budget: TpsBudget) -> Self {
        self.budget = Arc::new(budget);
        self
    }

    /// The most attempts a message gets, the first included.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    #[track_caller]
    fn validate(&self) {
        if let Err(err) = self.backoff_maker() {
            panic!(
                "{err}: min {:?}, max {:?}, jitter {}",
                self.min_backoff, self.max_backoff, self.jitter
            );
        }
    }

    fn backoff_maker(
        &self,
    ) -> Result<ExponentialBackoffMaker, tower::retry::backoff::InvalidBackoff> {
        // A fresh generator (a fresh `RandomState`) for each message: one cloned
        // from a shared maker would give every message the same jitter.
        ExponentialBackoffMaker::new(
            self.min_backoff,
            self.max_backoff,
            self.jitter,
            HasherRng::new(),
        )
    }
}

impl fmt::Debug for MessageRetryPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MessageRetryPolicy")
            .field("max_attempts", &self.max_attempts)
            .field("attempt", &self.attempt)
            .field("min_backoff", &self.min_backoff)
            .field("max_backoff", &self.max_backoff)
            .field("jitter", &self.jitter)
            .field("budget", &self.budget)
            .finish_non_exhaustive()
    }
}

impl<E: fmt::Display> Policy<Request<Envelope>, Outcome, E> for MessageRetryPolicy {
    type Future = Sleep;

    fn retry(
        &mut self,
        req: &mut Request<Envelope>,
        result: &mut Result<Outcome, E>,
    ) -> Option<Self::Future> {
        if self.attempt == 1 {
            // One deposit per message, whatever its fate.
            self.budget.deposit();
        }
        let error: &dyn fmt::Display = match &*result {
            Ok(Outcome::Failed(err)) if err.is_retryable() => err,
            Ok(_) => return None,
            Err(err) => err,
        };
        if self.attempt >= self.max_attempts {
            return None;
        }
        if !self.budget.withdraw() {
            tracing::warn!(attempt = self.attempt, %error, "retry budget exhausted, not retrying");
            return None;
        }
        tracing::warn!(attempt = self.attempt, %error, "message failed, retrying");
        // Routes that handled the message must not run again.
        if let Ok(Outcome::Failed(err)) = &*result {
            if let Some(failed) = err.get_ref().downcast_ref::<RoutesFailed>() {
                req.extensions_mut().insert(failed.remaining());
            }
        }
        self.attempt += 1;
        let backoff = match &mut self.backoff {
            Some(backoff) => backoff,
            None => self.backoff.insert(
                self.backoff_maker()
                    .expect("validated when configured")
                    .make_backoff(),
            ),
        };
        Some(backoff.next_backoff())
    }

    fn clone_request(&mut self, req: &Request<Envelope>) -> Option<Request<Envelope>> {
        (self.max_attempts > 1).then(|| req.clone())
    }
}

/// Makes [`MessageRetry`] services; see the [module docs](self).
///
/// Services made from one layer (and its clones) share its retry budget.
///
/// ```
/// use std::time::Duration;
/// use tower::{retry::budget::TpsBudget, ServiceBuilder};
/// use tower_mqtt::Router;
/// use tower_mqtt_layers::MessageRetryLayer;
///
/// let retry = MessageRetryLayer::new(5)
///     .backoff(Duration::from_millis(200), Duration::from_secs(10))
///     .jitter(0.25)
///     .budget(TpsBudget::new(Duration::from_secs(10), 5, 0.1));
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
    pub fn budget(mut self, budget: TpsBudget) -> Self {
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
#[allow(
    clippy::items_after_statements,
    clippy::unnecessary_wraps,
    clippy::type_complexity
)]
mod tests {
    use super::*;
    use std::{
        convert::Infallible,
        sync::{
            atomic::{AtomicUsize, Ordering},
            Mutex,
        },
    };
    use tokio::time::Instant;
    use tower::{Service, ServiceBuilder, ServiceExt};
    use tower_mqtt_core::{BoxError, HandlerError};

    fn msg() -> Request<Envelope> {
        let env = Envelope::new("t", serde_json::json!({"n": 1})).unwrap();
        Request::builder("a/b").body(env).unwrap()
    }

    /// A handler answering the `n`th call with `script(n)`, recording when.
    fn scripted(
        script: fn(usize) -> Result<Outcome, BoxError>,
    ) -> (
        Arc<Mutex<Vec<Instant>>>,
        impl Service<Request<Envelope>, Response = Outcome, Error = BoxError, Future: Send> + Clone,
    ) {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let record = calls.clone();
        let svc = tower::service_fn(move |req: Request<Envelope>| {
            assert_eq!(req.body().data()["n"], 1, "each attempt gets the request");
            let n = {
                let mut calls = record.lock().unwrap();
                calls.push(Instant::now());
                calls.len() - 1
            };
            async move { script(n) }
        });
        (calls, svc)
    }

    fn retryable() -> Result<Outcome, BoxError> {
        Ok(Outcome::Failed(HandlerError::new("busy")))
    }

    #[tokio::test(start_paused = true)]
    async fn retryable_failures_are_retried_until_handled() {
        let (calls, handler) = scripted(|n| {
            if n < 2 {
                retryable()
            } else {
                Ok(Outcome::Handled)
            }
        });
        let svc = MessageRetryLayer::new(3).layer(handler);
        assert!(matches!(
            svc.oneshot(msg()).await.unwrap(),
            Outcome::Handled
        ));
        assert_eq!(calls.lock().unwrap().len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_are_limited_and_the_last_failure_is_returned() {
        let (calls, handler) =
            scripted(|n| Ok(Outcome::Failed(HandlerError::new(format!("busy {n}")))));
        let svc = MessageRetryLayer::new(3).layer(handler);
        let outcome = svc.oneshot(msg()).await.unwrap();
        assert_eq!(outcome.error().unwrap().to_string(), "busy 2");
        assert_eq!(calls.lock().unwrap().len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn errors_of_the_inner_service_are_retried() {
        let (calls, handler) = scripted(|n| {
            if n == 0 {
                Err("connection reset".into())
            } else {
                Ok(Outcome::Handled)
            }
        });
        let svc = MessageRetryLayer::new(2).layer(handler);
        assert!(matches!(
            svc.oneshot(msg()).await.unwrap(),
            Outcome::Handled
        ));
        assert_eq!(calls.lock().unwrap().len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn final_outcomes_are_not_retried() {
        for script in [
            (|_| Ok(Outcome::Failed(HandlerError::permanent("bad input")))) as fn(usize) -> _,
            |_| Ok(Outcome::Handled),
            |_| Ok(Outcome::Duplicate),
            |_| Ok(Outcome::Unrouted),
        ] {
            let (calls, handler) = scripted(script);
            MessageRetryLayer::new(5)
                .layer(handler)
                .oneshot(msg())
                .await
                .unwrap();
            assert_eq!(calls.lock().unwrap().len(), 1);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_doubles_up_to_the_maximum() {
        let (calls, handler) = scripted(|_| retryable());
        let svc = MessageRetryLayer::new(5)
            .backoff(Duration::from_millis(100), Duration::from_millis(300))
            .jitter(0.0)
            .layer(handler);
        svc.oneshot(msg()).await.unwrap();
        let calls = calls.lock().unwrap();
        let gaps: Vec<Duration> = calls.windows(2).map(|w| w[1] - w[0]).collect();
        assert_eq!(
            gaps,
            [100, 200, 300, 300].map(Duration::from_millis),
            "100 ms, doubled, capped at 300 ms"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn jitter_is_bounded_and_differs_between_messages() {
        // (tower computes the jitter of the whole seconds and of the fraction
        // of a backoff separately, truncating each: a backoff of exactly 1 s
        // gets none. Sub-second backoffs show it.)
        let layer = MessageRetryLayer::new(2)
            .backoff(Duration::from_millis(100), Duration::from_secs(10))
            .jitter(1.0);
        let mut first_gaps = Vec::new();
        for _ in 0..4 {
            let (calls, handler) = scripted(|_| retryable());
            layer.layer(handler).oneshot(msg()).await.unwrap();
            let calls = calls.lock().unwrap();
            let gap = calls[1] - calls[0];
            assert!(
                gap >= Duration::from_millis(100) && gap <= Duration::from_millis(200),
                "{gap:?}"
            );
            first_gaps.push(gap);
        }
        first_gaps.dedup();
        assert!(
            first_gaps.len() > 1,
            "every message got the same jitter: {first_gaps:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_empty_budget_stops_retries() {
        let (calls, handler) = scripted(|_| retryable());
        let svc = MessageRetryLayer::new(5)
            .budget(TpsBudget::new(Duration::from_secs(1), 0, 0.0))
            .layer(handler);
        assert!(svc.oneshot(msg()).await.unwrap().is_failed());
        assert_eq!(calls.lock().unwrap().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_is_shared_by_services_of_one_layer() {
        // A reserve of 1 retry a second over 1 s, nothing earned by successes.
        let layer =
            MessageRetryLayer::new(2).budget(TpsBudget::new(Duration::from_secs(1), 1, 0.0));
        let (calls, handler) = scripted(|_| retryable());
        layer.layer(handler.clone()).oneshot(msg()).await.unwrap();
        layer.layer(handler).oneshot(msg()).await.unwrap();
        // The first message used the one retry; the second got none.
        assert_eq!(calls.lock().unwrap().len(), 3);
    }

    #[tokio::test]
    async fn a_single_attempt_clones_nothing_and_retries_nothing() {
        let (calls, handler) = scripted(|_| retryable());
        let layer = MessageRetryLayer::new(1);
        let mut policy = layer.policy().clone();
        assert!(Policy::<_, Outcome, BoxError>::clone_request(&mut policy, &msg()).is_none());
        assert!(layer
            .layer(handler)
            .oneshot(msg())
            .await
            .unwrap()
            .is_failed());
        assert_eq!(calls.lock().unwrap().len(), 1);
        assert_eq!(MessageRetryPolicy::new(0).max_attempts(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_timed_out_attempt_is_retried_with_a_fresh_timeout() {
        // Retry -> Timeout -> a handler that hangs on its first attempt.
        let attempts = Arc::new(AtomicUsize::new(0));
        let counter = attempts.clone();
        let svc = ServiceBuilder::new()
            .layer(MessageRetryLayer::new(2))
            .timeout(Duration::from_secs(30))
            .service(tower::service_fn(move |_: Request<Envelope>| {
                let first = counter.fetch_add(1, Ordering::SeqCst) == 0;
                async move {
                    if first {
                        std::future::pending::<()>().await;
                    }
                    Ok::<_, Infallible>(Outcome::Handled)
                }
            }));
        let started = Instant::now();
        assert!(matches!(
            svc.oneshot(msg()).await.unwrap(),
            Outcome::Handled
        ));
        assert_eq!(attempts.load(Ordering::SeqCst), 2);
        assert!(started.elapsed() >= Duration::from_secs(30));
    }

    #[test]
    #[should_panic(expected = "maximum must not be less than minimum")]
    fn an_inverted_backoff_fails_at_build_time() {
        let _ = MessageRetryLayer::new(3).backoff(Duration::from_secs(2), Duration::from_secs(1));
    }

    #[test]
    #[should_panic(expected = "jitter must not be negative")]
    fn a_negative_jitter_fails_at_build_time() {
        let _ = MessageRetryLayer::new(3).jitter(-1.0);
    }
}
