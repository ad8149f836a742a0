//! Bounding the time a message may take: [`Timeout`].
//!
//! Each attempt may take [`DEFAULT_TIMEOUT`] (30 s) unless configured
//! otherwise. A timed-out attempt fails with tower's [`Elapsed`] error
//! (`request timed out`), which
//! [`Isolation`](crate::isolation::Isolation) turns into an
//! [`Outcome::Failed`](tower_mqtt_core::Outcome::Failed); [`is_timeout`] recognises it.
//!
//! **Timeouts are retryable.** A handler usually times out because something it
//! waits for is slow or away for a moment, which is what a retry with backoff is
//! for; a handler that hangs on one particular message is stopped by the
//! attempt limit. The timeout sits inside the retry, so each attempt gets the
//! full time: with 3 attempts a message can hold its topic's queue for about
//! three timeouts plus the backoffs, so choose the attempts with the timeout in
//! mind (or, for a topic where a slow message must not be repeated, give the
//! route a retry of one attempt).
//!
//! # Why not tower's `Timeout`
//!
//! This is tower's `Timeout` (same constructors, same `Elapsed` error, boxed
//! the same way) with one difference, made because of a measurement: tower's
//! reads the clock and makes a timer (`tokio::time::sleep`, which also takes a
//! handle on the runtime) in `call`, for every attempt, about 60 ns on the
//! 2-core development machine, while most handlers of the fleet finish the
//! first time they are polled and never need the timer. This one makes the
//! timer the first time the inner future is not finished when polled, and
//! counts the time from then: from the start of the attempt, since the stack
//! polls an attempt as soon as it makes it. A handler that awaits something
//! pays what tower's would; one that finishes at once reads no clock.
//!
//! ```
//! use std::time::Duration;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_mqtt::{Envelope, Outcome, Request};
//! use tower_mqtt::layers::{isolation::IsolationLayer, timeout::{is_timeout, TimeoutLayer, DEFAULT_TIMEOUT}};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
//! let svc = ServiceBuilder::new()
//!     .layer(IsolationLayer::new())
//!     .layer(TimeoutLayer::new(DEFAULT_TIMEOUT))
//!     .service(service_fn(|_: Request<Envelope>| async {
//!         std::future::pending::<Result<Outcome, std::convert::Infallible>>().await
//!     }));
//! let req = Request::builder("a").body(Envelope::new("t", serde_json::json!({})).unwrap()).unwrap();
//! let outcome = svc.oneshot(req).await.unwrap();
//! assert!(is_timeout(outcome.error().unwrap()));
//! # }
//! ```

use std::{
    fmt,
    future::Future,
    pin::Pin,
    task::{ready, Context, Poll},
    time::Duration,
};

use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower::{Layer, Service};
use tower_mqtt_core::{BoxError, HandlerError};

pub use tower::timeout::error::Elapsed;

/// The handler timeout unless configured otherwise: 30 s.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether `error` is a timeout of [`Timeout`] (or of tower's own).
///
/// ```
/// use tower_mqtt::HandlerError;
/// use tower_mqtt::layers::timeout::{is_timeout, Elapsed};
///
/// assert!(is_timeout(&HandlerError::new(Elapsed::new())));
/// assert!(!is_timeout(&HandlerError::new("db down")));
/// ```
pub fn is_timeout(error: &HandlerError) -> bool {
    error.get_ref().is::<Elapsed>()
}

/// Makes [`Timeout`] services; see the [module docs](self).
///
/// ```
/// use std::time::Duration;
/// use tower::ServiceBuilder;
/// use tower_mqtt::Router;
/// use tower_mqtt::layers::timeout::TimeoutLayer;
///
/// let layer = TimeoutLayer::new(Duration::from_secs(5));
/// assert_eq!(layer.timeout(), Duration::from_secs(5));
/// let svc = ServiceBuilder::new().layer(layer).service(Router::<()>::new());
/// ```
#[derive(Clone, Copy, Debug)]
#[must_use]
pub struct TimeoutLayer {
    timeout: Duration,
}

impl TimeoutLayer {
    /// Each attempt may take `timeout`.
    pub const fn new(timeout: Duration) -> Self {
        Self { timeout }
    }

    /// The time each attempt may take.
    pub const fn timeout(&self) -> Duration {
        self.timeout
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Timeout::new(inner, self.timeout)
    }
}

/// Fails a call that takes longer than its time with [`Elapsed`]; see the
/// [module docs](self).
///
/// ```
/// use std::time::Duration;
/// use tower_mqtt::Router;
/// use tower_mqtt::layers::Timeout;
///
/// let svc = Timeout::new(Router::<()>::new(), Duration::from_secs(5));
/// let router: &Router = svc.get_ref();
/// ```
#[derive(Clone, Copy, Debug)]
#[must_use]
pub struct Timeout<S> {
    inner: S,
    timeout: Duration,
}

impl<S> Timeout<S> {
    /// Wraps `inner`: each call may take `timeout`.
    pub const fn new(inner: S, timeout: Duration) -> Self {
        Self { inner, timeout }
    }

    /// A [`TimeoutLayer`] of `timeout`.
    pub const fn layer(timeout: Duration) -> TimeoutLayer {
        TimeoutLayer::new(timeout)
    }

    tower_mqtt_core::define_inner_service_accessors!();
}

impl<S, R> Service<R> for Timeout<S>
where
    S: Service<R>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: R) -> Self::Future {
        ResponseFuture {
            response: self.inner.call(req),
            timeout: self.timeout,
            sleep: None,
        }
    }
}

pin_project! {
    /// The future of [`Timeout`]: the inner future, and its timer once it
    /// has not finished at a poll.
    pub struct ResponseFuture<F> {
        #[pin]
        response: F,
        timeout: Duration,
        #[pin]
        sleep: Option<Sleep>,
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Poll::Ready(result) = this.response.poll(cx) {
            return Poll::Ready(result.map_err(Into::into));
        }
        if this.sleep.is_none() {
            this.sleep.set(Some(tokio::time::sleep(*this.timeout)));
        }
        let sleep = this.sleep.as_pin_mut().expect("set above");
        ready!(sleep.poll(cx));
        Poll::Ready(Err(Elapsed::new().into()))
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("timeout", &self.timeout)
            .field("started", &self.sleep.is_some())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        convert::Infallible,
        sync::{
            atomic::{AtomicUsize, Ordering},
            Arc,
        },
    };
    use tokio::time::Instant;
    use tower::ServiceExt;

    #[tokio::test(start_paused = true)]
    async fn an_attempt_that_takes_too_long_fails_with_elapsed_at_its_time() {
        let svc = Timeout::new(
            tower::service_fn(|()| std::future::pending::<Result<(), Infallible>>()),
            Duration::from_secs(30),
        );
        let started = Instant::now();
        let err = svc.oneshot(()).await.unwrap_err();
        assert!(err.is::<Elapsed>());
        assert_eq!(started.elapsed(), Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_but_timely_attempt_and_errors_pass_through() {
        let svc = TimeoutLayer::new(Duration::from_secs(30)).layer(tower::service_fn(
            |fail: bool| async move {
                tokio::time::sleep(Duration::from_secs(29)).await;
                if fail {
                    Err(std::io::Error::other("db down"))
                } else {
                    Ok(7)
                }
            },
        ));
        assert_eq!(svc.oneshot(false).await.unwrap(), 7);
        let err = svc.oneshot(true).await.unwrap_err();
        assert_eq!(err.to_string(), "db down");
        assert!(!err.is::<Elapsed>());
    }

    #[tokio::test(start_paused = true)]
    async fn the_time_counts_from_the_first_poll_that_waits() {
        let polls = Arc::new(AtomicUsize::new(0));
        let counter = polls.clone();
        let mut svc = Timeout::new(
            tower::service_fn(move |()| {
                let counter = counter.clone();
                std::future::poll_fn(move |_| {
                    counter.fetch_add(1, Ordering::SeqCst);
                    Poll::<Result<(), Infallible>>::Pending
                })
            }),
            Duration::from_secs(5),
        );
        let future = svc.call(());
        // Made, not yet polled: no timer runs.
        tokio::time::advance(Duration::from_secs(60)).await;
        let started = Instant::now();
        assert!(future.await.unwrap_err().is::<Elapsed>());
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        assert!(polls.load(Ordering::SeqCst) >= 2);
    }

    #[test]
    fn a_ready_attempt_needs_no_runtime() {
        // No timer is made, so no tokio runtime (and no clock) is needed.
        let svc = Timeout::new(
            tower::service_fn(|n: u32| std::future::ready(Ok::<_, Infallible>(n + 1))),
            Duration::from_secs(1),
        );
        let out = futures_util::FutureExt::now_or_never(svc.oneshot(1)).unwrap();
        assert_eq!(out.unwrap(), 2);
    }
}
