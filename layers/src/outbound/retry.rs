//! Publishing again after a retryable failure, then giving up loudly. The
//! outbound mirror of [`retry`](crate::retry).
//!
//! tower's [`Retry`] with [`PublishRetryPolicy`]: a publish that failed in a
//! way another attempt can fix (the offline buffer was full, the session was
//! lost, the attempt timed out: [`is_retryable`]) is sent again after an
//! exponential, jittered backoff, up to a maximum number of attempts and while
//! the retry budget allows. Otherwise the publish is dropped: logged at
//! `ERROR` with its topic and correlation id, and counted ([`PublishRetryLayer::dropped`]).
//! Oversized payloads and a stopped runtime are not retried.
//!
//! The attempts, the backoff (by default from 100 ms, doubling, up to 5 s,
//! plus up to 50 % jitter, each publish with its own random sequence) and the
//! budget ([`RetryBudget`](crate::retry::RetryBudget), by default 20 % on top of the publishes of the
//! last 10 s plus 10 retries a second, shared by every service made from one
//! layer) are the same core as the inbound
//! [`MessageRetryPolicy`](crate::retry::MessageRetryPolicy)'s; only what is
//! retryable, and the logging, differ.
//!
//! A timed-out attempt may still reach the broker, so a retry can deliver a
//! message twice: publishing is at least once, and the fleet's receivers
//! deduplicate.
//!
//! ```
//! use std::time::Duration;
//! use tower_mqtt::layers::outbound::PublishRetryLayer;
//!
//! let retry = PublishRetryLayer::new(5).backoff(Duration::from_millis(50), Duration::from_secs(2));
//! assert_eq!(retry.dropped(), 0);
//! ```

use std::{
    fmt,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use tokio::time::Sleep;
use tower::{
    retry::{budget::Budget, Policy, Retry},
    timeout::error::Elapsed,
    Layer,
};
use tower_mqtt_core::{correlation::CorrelationId, BoxError, Request};

use super::PublishError;
use crate::retry::attempts::{Attempts, Next};

/// Attempts unless configured otherwise.
pub const DEFAULT_PUBLISH_ATTEMPTS: u32 = 3;

/// Whether another attempt could help with `err`: a retryable
/// [`PublishError`], or an attempt that timed out waiting for its
/// confirmation.
///
/// ```
/// use tower_mqtt::{layers::outbound::{is_retryable, DeliveryError, PublishError}, BoxError};
///
/// let lost: BoxError = PublishError::from(DeliveryError::SessionLost).into();
/// assert!(is_retryable(&lost));
/// let stopped: BoxError = PublishError::Closed.into();
/// assert!(!is_retryable(&stopped));
/// ```
pub fn is_retryable(err: &BoxError) -> bool {
    err.downcast_ref::<PublishError>()
        .is_some_and(PublishError::is_retryable)
        || err.is::<Elapsed>()
}

/// A service with publish retries: tower's [`Retry`] with a
/// [`PublishRetryPolicy`].
pub type PublishRetry<S> = Retry<PublishRetryPolicy, S>;

/// The retry policy for publishes; see the [module docs](self).
///
/// Use it through [`PublishRetryLayer`], or with tower's own
/// [`RetryLayer`](tower::retry::RetryLayer).
///
/// ```
/// use tower::retry::RetryLayer;
/// use tower_mqtt::layers::outbound::PublishRetryPolicy;
///
/// let policy = PublishRetryPolicy::new(4);
/// assert_eq!(policy.max_attempts(), 4);
/// let layer = RetryLayer::new(policy);
/// ```
#[derive(Clone)]
#[must_use]
pub struct PublishRetryPolicy {
    attempts: Attempts,
    dropped: Arc<AtomicU64>,
    counts: Arc<Counts>,
}

/// What the policy counts through the `metrics` facade (registered when the
/// policy is made).
struct Counts {
    retries: metrics::Counter,
    dropped_after_attempts: metrics::Counter,
    dropped_over_budget: metrics::Counter,
}

impl Counts {
    fn new() -> Self {
        use tower_mqtt_core::metrics as names;
        let dropped = |reason: &'static str| metrics::counter!(names::PUBLISH_DROPPED, names::SYSTEM => "mqtt", names::REASON => reason);
        Self {
            retries: metrics::counter!(names::PUBLISH_RETRIES, names::SYSTEM => "mqtt"),
            dropped_after_attempts: dropped("attempts"),
            dropped_over_budget: dropped("budget"),
        }
    }
}

impl PublishRetryPolicy {
    /// At most `max_attempts` attempts (the first included; 0 counts as 1),
    /// with the default backoff, jitter and budget.
    pub fn new(max_attempts: u32) -> Self {
        Self {
            attempts: Attempts::new(max_attempts),
            dropped: Arc::default(),
            counts: Arc::new(Counts::new()),
        }
    }

    /// Waits `min` before the first retry, doubling each time up to `max`
    /// (before jitter).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_mqtt::layers::outbound::PublishRetryPolicy;
    ///
    /// let policy = PublishRetryPolicy::new(3).backoff(Duration::from_millis(50), Duration::from_secs(2));
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
    /// use tower_mqtt::layers::outbound::PublishRetryPolicy;
    ///
    /// let steady = PublishRetryPolicy::new(3).jitter(0.0);
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
    /// [`RetryBudget`](crate::retry::RetryBudget) of other limits, or any tower [`Budget`], such as its
    /// `TpsBudget`.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_mqtt::layers::{outbound::PublishRetryPolicy, retry::RetryBudget};
    ///
    /// // Retries may add 10 % to the publishes of the last 10 s, plus 1 a second.
    /// let policy = PublishRetryPolicy::new(3).budget(RetryBudget::new(Duration::from_secs(10), 1, 0.1));
    /// ```
    pub fn budget(mut self, budget: impl Budget + Send + Sync + 'static) -> Self {
        self.attempts = self.attempts.budget(budget);
        self
    }

    /// The most attempts a publish gets, the first included.
    pub fn max_attempts(&self) -> u32 {
        self.attempts.max()
    }
}

impl fmt::Debug for PublishRetryPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PublishRetryPolicy")
            .field("attempts", &self.attempts)
            .field("dropped", &self.dropped.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Policy<Request<Bytes>, (), BoxError> for PublishRetryPolicy {
    type Future = Sleep;

    fn retry(
        &mut self,
        req: &mut Request<Bytes>,
        result: &mut Result<(), BoxError>,
    ) -> Option<Self::Future> {
        let error = result.as_ref().err().filter(|err| is_retryable(err));
        let topic = req.topic().as_str();
        // Set by the encode layer from the envelope's id; "" for bytes sent
        // past it.
        let correlation_id = req.correlation_id().map_or("", CorrelationId::as_str);
        match self.attempts.next(error) {
            Next::Done => None,
            Next::LastAttempt { attempt, error } => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                self.counts.dropped_after_attempts.increment(1);
                tracing::error!(
                    %topic,
                    %correlation_id,
                    attempts = attempt,
                    %error,
                    "publish dropped after the maximum number of attempts"
                );
                None
            }
            Next::OverBudget { attempt, error } => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                self.counts.dropped_over_budget.increment(1);
                tracing::error!(
                    %topic,
                    %correlation_id,
                    attempts = attempt,
                    %error,
                    "publish dropped: the retry budget is exhausted"
                );
                None
            }
            Next::Retry {
                attempt,
                error,
                backoff,
            } => {
                self.counts.retries.increment(1);
                tracing::warn!(%topic, %correlation_id, attempt, %error, "publish failed, retrying");
                Some(backoff)
            }
        }
    }

    fn clone_request(&mut self, req: &Request<Bytes>) -> Option<Request<Bytes>> {
        self.attempts.clone_request(req)
    }
}

/// Makes [`PublishRetry`] services; see the [module docs](self).
///
/// Services made from one layer (and its clones) share its retry budget and
/// the dropped counter.
///
/// ```
/// use std::time::Duration;
/// use tower_mqtt::layers::{outbound::PublishRetryLayer, retry::RetryBudget};
///
/// let retry = PublishRetryLayer::new(5)
///     .backoff(Duration::from_millis(200), Duration::from_secs(10))
///     .jitter(0.25)
///     .budget(RetryBudget::new(Duration::from_secs(10), 5, 0.1));
/// assert_eq!(retry.policy().max_attempts(), 5);
/// ```
#[derive(Clone, Debug)]
#[must_use]
pub struct PublishRetryLayer {
    policy: PublishRetryPolicy,
}

impl PublishRetryLayer {
    /// At most `max_attempts` attempts (the first included), with the default
    /// backoff, jitter and budget.
    ///
    /// ```
    /// use tower_mqtt::layers::outbound::PublishRetryLayer;
    ///
    /// let retry = PublishRetryLayer::new(1); // no retries
    /// # let _ = retry;
    /// ```
    pub fn new(max_attempts: u32) -> Self {
        Self {
            policy: PublishRetryPolicy::new(max_attempts),
        }
    }

    /// See [`PublishRetryPolicy::backoff`].
    ///
    /// # Panics
    ///
    /// When `min > max` or `max` is zero.
    #[track_caller]
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.policy = self.policy.backoff(min, max);
        self
    }

    /// See [`PublishRetryPolicy::jitter`].
    ///
    /// # Panics
    ///
    /// When `ratio` is negative, above 100 or NaN.
    #[track_caller]
    pub fn jitter(mut self, ratio: f64) -> Self {
        self.policy = self.policy.jitter(ratio);
        self
    }

    /// See [`PublishRetryPolicy::budget`].
    pub fn budget(mut self, budget: impl Budget + Send + Sync + 'static) -> Self {
        self.policy = self.policy.budget(budget);
        self
    }

    /// The policy.
    pub fn policy(&self) -> &PublishRetryPolicy {
        &self.policy
    }

    /// How many publishes were dropped after their last attempt, by every
    /// service this layer made.
    ///
    /// ```
    /// use tower_mqtt::layers::outbound::PublishRetryLayer;
    ///
    /// assert_eq!(PublishRetryLayer::default().dropped(), 0);
    /// ```
    pub fn dropped(&self) -> u64 {
        self.policy.dropped.load(Ordering::Relaxed)
    }
}

impl Default for PublishRetryLayer {
    /// [`DEFAULT_PUBLISH_ATTEMPTS`] attempts with the default backoff, jitter
    /// and budget.
    fn default() -> Self {
        Self::new(DEFAULT_PUBLISH_ATTEMPTS)
    }
}

impl<S> Layer<S> for PublishRetryLayer {
    type Service = PublishRetry<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Retry::new(self.policy.clone(), inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{outbound::DeliveryError, retry::RetryBudget};
    use std::sync::atomic::AtomicUsize;
    use tower::{service_fn, ServiceExt};

    fn failing(
        calls: Arc<AtomicUsize>,
        err: fn() -> BoxError,
    ) -> impl tower::Service<Request<Bytes>, Response = (), Error = BoxError, Future = impl Send> + Clone
    {
        service_fn(move |_req: Request<Bytes>| {
            calls.fetch_add(1, Ordering::SeqCst);
            std::future::ready(Err(err()))
        })
    }

    fn req() -> Request<Bytes> {
        Request::builder("a/b")
            .body(Bytes::from_static(b"{}"))
            .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn retries_retryable_errors_then_drops_and_counts() {
        let calls = Arc::new(AtomicUsize::new(0));
        let layer = PublishRetryLayer::new(3);
        let svc = layer.layer(failing(calls.clone(), || {
            PublishError::Delivery(DeliveryError::BufferFull { limit: 1 }).into()
        }));
        let err = svc.oneshot(req()).await.unwrap_err();
        assert!(err.to_string().contains("offline buffer is full"));
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(layer.dropped(), 1);
    }

    fn buffer_full() -> BoxError {
        PublishError::Delivery(DeliveryError::BufferFull { limit: 1 }).into()
    }

    #[tokio::test(start_paused = true)]
    async fn an_empty_budget_stops_retries_and_counts_the_drop() {
        let calls = Arc::new(AtomicUsize::new(0));
        let layer =
            PublishRetryLayer::new(5).budget(RetryBudget::new(Duration::from_secs(1), 0, 0.0));
        let svc = layer.layer(failing(calls.clone(), buffer_full));
        assert!(svc.oneshot(req()).await.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(layer.dropped(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_is_shared_by_services_of_one_layer() {
        // A reserve of 1 retry a second over 1 s, nothing earned by publishes.
        let calls = Arc::new(AtomicUsize::new(0));
        let layer =
            PublishRetryLayer::new(2).budget(RetryBudget::new(Duration::from_secs(1), 1, 0.0));
        let first = layer.layer(failing(calls.clone(), buffer_full));
        let second = layer.layer(failing(calls.clone(), buffer_full));
        assert!(first.oneshot(req()).await.is_err());
        assert!(second.oneshot(req()).await.is_err());
        // The first publish used the one retry; the second got none.
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(layer.dropped(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_doubles_up_to_the_maximum() {
        let times = Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = times.clone();
        let sink = service_fn(move |_req: Request<Bytes>| {
            record.lock().unwrap().push(tokio::time::Instant::now());
            std::future::ready(Err::<(), _>(buffer_full()))
        });
        let svc = PublishRetryLayer::new(5)
            .backoff(Duration::from_millis(100), Duration::from_millis(300))
            .jitter(0.0)
            .layer(sink);
        assert!(svc.oneshot(req()).await.is_err());
        let times = times.lock().unwrap();
        let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
        assert_eq!(gaps, [100, 200, 300, 300].map(Duration::from_millis));
    }

    #[test]
    #[should_panic(expected = "maximum must not be less than minimum")]
    fn an_inverted_backoff_fails_at_build_time() {
        let _ = PublishRetryLayer::new(3).backoff(Duration::from_secs(2), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn does_not_retry_what_cannot_improve() {
        let calls = Arc::new(AtomicUsize::new(0));
        let layer = PublishRetryLayer::new(5);
        let svc = layer.layer(failing(calls.clone(), || PublishError::Closed.into()));
        assert!(svc.oneshot(req()).await.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(layer.dropped(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_timed_out_attempt_is_retried() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let slow_then_fast = service_fn(move |_req: Request<Bytes>| {
            let first = counted.fetch_add(1, Ordering::SeqCst) == 0;
            async move {
                if first {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                }
                Ok::<_, BoxError>(())
            }
        });
        let svc = tower::ServiceBuilder::new()
            .layer(PublishRetryLayer::new(2))
            .timeout(Duration::from_secs(1))
            .service(slow_then_fast);
        svc.oneshot(req()).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }
}
