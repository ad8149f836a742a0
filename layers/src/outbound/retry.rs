//! Publishing again after a retryable failure, then giving up loudly. The
//! outbound mirror of [`retry`](crate::retry).
//!
//! tower's [`Retry`] with [`PublishRetryPolicy`]: a publish that failed in a
//! way another attempt can fix (the offline buffer was full, the session was
//! lost, the attempt timed out) is sent again after an exponential, jittered
//! backoff, up to a maximum number of attempts. After the last one the publish
//! is dropped: logged at error with its topic and counted
//! ([`PublishRetryLayer::dropped`]). Oversized payloads and a stopped runtime
//! are not retried.
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
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use tokio::time::Sleep;
use tower::{
    retry::{
        backoff::{Backoff, ExponentialBackoff, ExponentialBackoffMaker, MakeBackoff},
        Policy, Retry,
    },
    timeout::error::Elapsed,
    util::rng::HasherRng,
    Layer,
};
use tower_mqtt_core::{BoxError, Request};

use super::PublishError;

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
#[derive(Clone, Debug)]
pub struct PublishRetryPolicy {
    max_attempts: u32,
    attempt: u32,
    min_backoff: Duration,
    max_backoff: Duration,
    backoff: Option<ExponentialBackoff>,
    dropped: Arc<AtomicU64>,
}

impl Policy<Request<Bytes>, (), BoxError> for PublishRetryPolicy {
    type Future = Sleep;

    fn retry(
        &mut self,
        req: &mut Request<Bytes>,
        result: &mut Result<(), BoxError>,
    ) -> Option<Self::Future> {
        let Err(err) = result else {
            return None;
        };
        if !is_retryable(err) {
            return None;
        }
        if self.attempt >= self.max_attempts {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                topic = %req.topic(),
                attempts = self.attempt,
                error = %err,
                "publish dropped after the maximum number of attempts"
            );
            return None;
        }
        tracing::warn!(topic = %req.topic(), attempt = self.attempt, error = %err, "publish failed, retrying");
        self.attempt += 1;
        let (min, max) = (self.min_backoff, self.max_backoff);
        let backoff = self.backoff.get_or_insert_with(|| {
            // Fresh randomness per publish so retries do not move in lockstep.
            ExponentialBackoffMaker::new(min, max, 0.5, HasherRng::new())
                .expect("validated when configured")
                .make_backoff()
        });
        Some(backoff.next_backoff())
    }

    fn clone_request(&mut self, req: &Request<Bytes>) -> Option<Request<Bytes>> {
        (self.max_attempts > 1).then(|| req.clone())
    }
}

/// Makes publish-retrying services; see the [module docs](self).
///
/// Services made from one layer (and its clones) share the dropped counter.
#[derive(Clone, Debug)]
pub struct PublishRetryLayer {
    policy: PublishRetryPolicy,
}

impl PublishRetryLayer {
    /// Up to `max_attempts` attempts (at least 1), backing off from 100 ms to
    /// 5 s.
    pub fn new(max_attempts: u32) -> Self {
        Self {
            policy: PublishRetryPolicy {
                max_attempts: max_attempts.max(1),
                attempt: 1,
                min_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(5),
                backoff: None,
                dropped: Arc::default(),
            },
        }
    }

    /// Sets the backoff range.
    ///
    /// # Panics
    ///
    /// When `min` is zero or greater than `max`.
    #[must_use]
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        if let Err(err) = ExponentialBackoffMaker::new(min, max, 0.5, HasherRng::new()) {
            panic!("invalid publish backoff {min:?}..{max:?}: {err}");
        }
        self.policy.min_backoff = min;
        self.policy.max_backoff = max;
        self
    }

    /// How many publishes were dropped after their last attempt.
    pub fn dropped(&self) -> u64 {
        self.policy.dropped.load(Ordering::Relaxed)
    }
}

impl Default for PublishRetryLayer {
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
    use crate::outbound::DeliveryError;
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
