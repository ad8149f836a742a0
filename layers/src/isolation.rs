//! Containing failures: [`Isolation`].
//!
//! [`Isolation`] turns everything that can go wrong inside it into an
//! [`Outcome::Failed`], so that one bad message never stops the service, its
//! topic or another route:
//!
//! - an error of the inner service (from `call`'s future, or from `poll_ready`,
//!   which then fails the next message instead of the service), such as tower's
//!   timeout error;
//! - a panic in the inner service's `poll_ready`, `call` or future (caught with
//!   `catch_unwind`, as tower-http's `CatchPanic` does);
//! - an [`Outcome::Failed`] the inner service answered with.
//!
//! Its error type is [`Infallible`]. Each failure is logged once, at `ERROR`,
//! when the message's outcome is known; inside a
//! [`CorrelationSpan`](crate::correlation_span::CorrelationSpan), that log line
//! carries the message's correlation id, topic and type. A
//! [`HandlerError`] keeps its retry classification; other errors and panics are
//! retryable.
//!
//! # Dead letters
//!
//! With [`IsolationLayer::dead_letter`], a failed message is also handed to a
//! dead-letter hook, a [`DeadLetterPolicy`] from the
//! [`dead_letter`](crate::dead_letter) module. [`DeadLetter`] publishes it, as an
//! envelope of type `mqtt.dead_letter`, to a dead-letter topic (default
//! `mqtt/dead_letter`) through a sink: any `Service<Request<Envelope>>`, such
//! as the runtime's publisher. The publish runs on a task of its own, bounded
//! by a timeout, so a slow or failing sink never delays or fails the message;
//! the sink's errors are logged. The hook's types are re-exported here.
//!
//! Put isolation outside retries (so it sees the error of the last attempt,
//! and dead-letters a message once) and inside the correlation span (so its log
//! line is inside the span).
//!
//! ```
//! use tower::{service_fn, BoxError, Layer, ServiceExt};
//! use tower_mqtt::{Envelope, Outcome, Request};
//! use tower_mqtt::layers::isolation::IsolationLayer;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let svc = IsolationLayer::new().layer(service_fn(|req: Request<Envelope>| async move {
//!     if req.body().data().contains_key("boom") {
//!         panic!("unexpected payload");
//!     }
//!     Ok::<_, BoxError>(Outcome::Handled)
//! }));
//!
//! let msg = |data| Request::builder("a/b").body(Envelope::new("t", data).unwrap()).unwrap();
//! let outcome = svc.clone().oneshot(msg(serde_json::json!({"boom": 1}))).await.unwrap();
//! assert_eq!(outcome.error().unwrap().to_string(), "handler panicked: unexpected payload");
//! // The next message is handled as usual.
//! assert!(matches!(svc.oneshot(msg(serde_json::json!({}))).await.unwrap(), Outcome::Handled));
//! # }
//! ```

use std::{
    convert::Infallible,
    fmt,
    future::Future,
    panic::{catch_unwind, AssertUnwindSafe},
    pin::Pin,
    task::{ready, Context, Poll},
};

use futures_util::future::{CatchUnwind, FutureExt};
use pin_project_lite::pin_project;
use tower::{Layer, Service};
use tower_mqtt_core::{
    router::Panicked, BoxError, Envelope, HandlerError, IntoOutcome, Outcome, Request, TopicName,
};

pub use crate::dead_letter::{
    DeadLetter, DeadLetterPolicy, FailedMessage, NoDeadLetters, DEAD_LETTER_TYPE,
    DEFAULT_DEAD_LETTER_TIMEOUT, DEFAULT_DEAD_LETTER_TOPIC,
};

#[cfg(test)]
mod tests;

/// Makes [`Isolation`] services; see the [module docs](self).
///
/// ```
/// use tower::ServiceBuilder;
/// use tower_mqtt::Router;
/// use tower_mqtt::layers::IsolationLayer;
///
/// let svc = ServiceBuilder::new().layer(IsolationLayer::new()).service(Router::<()>::new());
/// ```
#[derive(Clone, Copy, Debug, Default)]
#[must_use]
pub struct IsolationLayer<D = NoDeadLetters> {
    dead_letters: D,
}

impl IsolationLayer {
    /// Failures are logged, not dead-lettered.
    pub const fn new() -> Self {
        Self {
            dead_letters: NoDeadLetters,
        }
    }
}

impl<D> IsolationLayer<D> {
    /// Also hands failed messages to `dead_letters`, usually a [`DeadLetter`].
    pub fn dead_letter<D2: DeadLetterPolicy>(self, dead_letters: D2) -> IsolationLayer<D2> {
        IsolationLayer { dead_letters }
    }
}

impl<S, D: Clone> Layer<S> for IsolationLayer<D> {
    type Service = Isolation<S, D>;

    fn layer(&self, inner: S) -> Self::Service {
        Isolation {
            inner,
            dead_letters: self.dead_letters.clone(),
            ready_error: None,
        }
    }
}

/// Turns errors and panics of `S` into [`Outcome::Failed`]; see the
/// [module docs](self).
///
/// ```
/// use tower::{service_fn, BoxError};
/// use tower_mqtt::{Envelope, Request};
/// use tower_mqtt::layers::{DeadLetter, Isolation};
///
/// let sink = service_fn(|_: Request<Envelope>| async { Ok::<_, BoxError>(()) });
/// let svc = Isolation::new(tower_mqtt::Router::<()>::new()).dead_letter(DeadLetter::new(sink));
/// ```
#[must_use]
pub struct Isolation<S, D = NoDeadLetters> {
    inner: S,
    dead_letters: D,
    /// An error (or panic) of `poll_ready`, for the next call to report.
    ready_error: Option<HandlerError>,
}

impl<S> Isolation<S> {
    /// Wraps `inner`; failures are logged, not dead-lettered.
    pub const fn new(inner: S) -> Self {
        Self {
            inner,
            dead_letters: NoDeadLetters,
            ready_error: None,
        }
    }

    /// An [`IsolationLayer`] without dead letters.
    pub const fn layer() -> IsolationLayer {
        IsolationLayer::new()
    }
}

impl<S, D> Isolation<S, D> {
    /// Also hands failed messages to `dead_letters`.
    pub fn dead_letter<D2: DeadLetterPolicy>(self, dead_letters: D2) -> Isolation<S, D2> {
        Isolation {
            inner: self.inner,
            dead_letters,
            ready_error: self.ready_error,
        }
    }

    tower_mqtt_core::define_inner_service_accessors!();
}

impl<S: Clone, D: Clone> Clone for Isolation<S, D> {
    /// A clone has not seen the original's readiness error.
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            dead_letters: self.dead_letters.clone(),
            ready_error: None,
        }
    }
}

impl<S: fmt::Debug, D: fmt::Debug> fmt::Debug for Isolation<S, D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Isolation")
            .field("inner", &self.inner)
            .field("dead_letters", &self.dead_letters)
            .field("ready_error", &self.ready_error)
            .finish()
    }
}

fn panicked(payload: &(dyn std::any::Any + Send)) -> HandlerError {
    HandlerError::new(Panicked::from_payload(payload))
}

impl<S, D> Service<Request<Envelope>> for Isolation<S, D>
where
    S: Service<Request<Envelope>>,
    S::Response: IntoOutcome,
    S::Error: Into<BoxError>,
    D: DeadLetterPolicy,
{
    type Response = Outcome;
    type Error = Infallible;
    type Future = ResponseFuture<S::Future, D>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        if self.ready_error.is_some() {
            return Poll::Ready(Ok(()));
        }
        match catch_unwind(AssertUnwindSafe(|| self.inner.poll_ready(cx))) {
            Ok(Poll::Pending) => return Poll::Pending,
            Ok(Poll::Ready(Ok(()))) => {}
            Ok(Poll::Ready(Err(err))) => {
                self.ready_error = Some(HandlerError::from_boxed(err.into()));
            }
            Err(panic) => self.ready_error = Some(panicked(&*panic)),
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Envelope>) -> Self::Future {
        let on_failure = OnFailure {
            topic: req.topic().clone(),
            kept: self.dead_letters.keep(&req),
            dead_letters: self.dead_letters.clone(),
        };
        let kind = match self.ready_error.take() {
            Some(error) => Kind::Failed { error: Some(error) },
            None => match catch_unwind(AssertUnwindSafe(|| self.inner.call(req))) {
                Ok(future) => Kind::Running {
                    future: AssertUnwindSafe(future).catch_unwind(),
                },
                Err(panic) => Kind::Failed {
                    error: Some(panicked(&*panic)),
                },
            },
        };
        ResponseFuture {
            kind,
            on_failure: Some(on_failure),
        }
    }
}

/// What a failure needs: the topic for the log, the dead-letter policy and
/// what it kept.
struct OnFailure<D: DeadLetterPolicy> {
    topic: TopicName,
    kept: D::Kept,
    dead_letters: D,
}

pin_project! {
    /// The future of [`Isolation`].
    pub struct ResponseFuture<F, D>
    where
        D: DeadLetterPolicy,
    {
        #[pin]
        kind: Kind<F>,
        on_failure: Option<OnFailure<D>>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F> {
        Running { #[pin] future: CatchUnwind<AssertUnwindSafe<F>> },
        Failed { error: Option<HandlerError> },
    }
}

impl<F, D: DeadLetterPolicy> fmt::Debug for ResponseFuture<F, D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, T, E, D> Future for ResponseFuture<F, D>
where
    F: Future<Output = Result<T, E>>,
    T: IntoOutcome,
    E: Into<BoxError>,
    D: DeadLetterPolicy,
{
    type Output = Result<Outcome, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let outcome = match this.kind.project() {
            KindProj::Running { future } => match ready!(future.poll(cx)) {
                Ok(Ok(response)) => response.into_outcome(),
                Ok(Err(err)) => Outcome::Failed(HandlerError::from_boxed(err.into())),
                Err(panic) => Outcome::Failed(panicked(&*panic)),
            },
            KindProj::Failed { error } => {
                Outcome::Failed(error.take().expect("polled after completion"))
            }
        };
        if let (Outcome::Failed(error), Some(on_failure)) = (&outcome, this.on_failure.take()) {
            let OnFailure {
                topic,
                kept,
                mut dead_letters,
            } = on_failure;
            tracing::error!(%topic, %error, retryable = error.is_retryable(), "message failed");
            dead_letters.dead_letter(kept, error);
        }
        Poll::Ready(Ok(outcome))
    }
}
