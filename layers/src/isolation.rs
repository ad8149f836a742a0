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
//! With [`IsolationLayer::dead_letter`], a failed message is also published, as
//! an envelope of type `mqtt.dead_letter` (see [`DeadLetter`]), to a dead-letter
//! topic (default `mqtt/dead_letter`) through a sink: any
//! `Service<Request<Envelope>>`, such as the runtime's publisher. The publish
//! runs on a task of its own, bounded by a timeout, so a slow or failing sink
//! never delays or fails the message; the sink's errors are logged.
//!
//! Put isolation outside retries (so it sees the error of the last attempt,
//! and dead-letters a message once) and inside the correlation span (so its log
//! line is inside the span).
//!
//! ```
//! use tower::{service_fn, BoxError, Layer, ServiceExt};
//! use tower_mqtt::{Envelope, Outcome, Request};
//! use tower_mqtt_layers::isolation::IsolationLayer;
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
    sync::Arc,
    task::{ready, Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use futures_util::future::{CatchUnwind, FutureExt};
use pin_project_lite::pin_project;
use serde_json::{Map, Value};
use tower::{Layer, Service, ServiceExt};
use tower_mqtt_core::{
    correlation::{self, CorrelationId},
    router::Panicked,
    BoxError, Envelope, HandlerError, IntoOutcome, Outcome, Request, TopicName,
};
use tracing::Instrument;

use crate::decode::RawPayload;

/// The dead-letter topic unless configured otherwise: `mqtt/dead_letter`.
pub const DEFAULT_DEAD_LETTER_TOPIC: &str = "mqtt/dead_letter";

/// The event type of a dead letter: `mqtt.dead_letter`.
pub const DEAD_LETTER_TYPE: &str = "mqtt.dead_letter";

/// How long a dead letter may take to publish unless configured otherwise: 5 s.
pub const DEFAULT_DEAD_LETTER_TIMEOUT: Duration = Duration::from_secs(5);

/// What [`Isolation`] does with a failed message, besides logging it.
///
/// Implemented by [`NoDeadLetters`] (nothing, the default) and [`DeadLetter`]
/// (publish it). Implement it to send failed messages elsewhere.
///
/// ```
/// use std::sync::{Arc, Mutex};
/// use tower_mqtt::{Envelope, HandlerError, Request, TopicName};
/// use tower_mqtt_layers::isolation::{DeadLetterPolicy, IsolationLayer};
///
/// /// Counts failures per topic.
/// #[derive(Clone, Default)]
/// struct CountFailures(Arc<Mutex<Vec<TopicName>>>);
///
/// impl DeadLetterPolicy for CountFailures {
///     type Kept = TopicName;
///     fn keep(&mut self, req: &Request<Envelope>) -> TopicName {
///         req.topic().clone()
///     }
///     fn dead_letter(&mut self, topic: TopicName, _error: &HandlerError) {
///         self.0.lock().unwrap().push(topic);
///     }
/// }
///
/// let layer = IsolationLayer::new().dead_letter(CountFailures::default());
/// ```
pub trait DeadLetterPolicy: Clone {
    /// What is kept of each message until its outcome is known.
    type Kept: Send + 'static;

    /// Keeps what [`DeadLetterPolicy::dead_letter`] needs of `req`, before the
    /// inner service takes it. Runs for every message: keep it cheap.
    fn keep(&mut self, req: &Request<Envelope>) -> Self::Kept;

    /// Handles a failed message. Must not block.
    fn dead_letter(&mut self, kept: Self::Kept, error: &HandlerError);
}

/// Failed messages are only logged; the default [`DeadLetterPolicy`].
///
/// ```
/// use tower_mqtt_layers::isolation::{IsolationLayer, NoDeadLetters};
///
/// let layer: IsolationLayer<NoDeadLetters> = IsolationLayer::new();
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct NoDeadLetters;

impl DeadLetterPolicy for NoDeadLetters {
    type Kept = ();

    fn keep(&mut self, _req: &Request<Envelope>) {}

    fn dead_letter(&mut self, _kept: (), _error: &HandlerError) {}
}

/// Publishes failed messages to a dead-letter topic through a sink.
///
/// A dead letter is an envelope of type [`DEAD_LETTER_TYPE`] with the failed
/// message's id (so it correlates with it) and data
/// `{"topic": <topic>, "error": <error text>, "payload": <payload>}`, where
/// the payload is the envelope as a JSON object, or, for a plain JSON object
/// that was wrapped on arrival ([`RawPayload`]), the text as it arrived. It goes
/// at QoS 1 to the topic, default [`DEFAULT_DEAD_LETTER_TOPIC`].
///
/// The sink is any `Service<Request<Envelope>>`, called with `oneshot` on a
/// spawned task (in the failed message's correlation scope) and given
/// [`DEFAULT_DEAD_LETTER_TIMEOUT`] unless configured otherwise. Outside a tokio
/// runtime, the dead letter is logged and dropped.
///
/// Keeping the payload costs a clone of the envelope per message (a reference
/// count for raw payloads), whether or not it fails.
///
/// ```
/// use tower::{service_fn, BoxError};
/// use tower_mqtt::{Envelope, Request};
/// use tower_mqtt_layers::isolation::{DeadLetter, IsolationLayer};
///
/// let sink = service_fn(|letter: Request<Envelope>| async move {
///     println!("dead letter on {}", letter.topic());
///     Ok::<_, BoxError>(())
/// });
/// let layer = IsolationLayer::new()
///     .dead_letter(DeadLetter::new(sink).topic("ops/dead_letter").source("llm-worker"));
/// ```
#[derive(Clone)]
#[must_use]
pub struct DeadLetter<S> {
    sink: S,
    topic: TopicName,
    source: Option<Arc<str>>,
    timeout: Duration,
}

impl<S> DeadLetter<S> {
    /// Dead letters to [`DEFAULT_DEAD_LETTER_TOPIC`] through `sink`.
    ///
    /// # Panics
    ///
    /// Never: the default topic is a valid topic name.
    pub fn new(sink: S) -> Self {
        Self {
            sink,
            topic: TopicName::new(DEFAULT_DEAD_LETTER_TOPIC).expect("a valid topic"),
            source: None,
            timeout: DEFAULT_DEAD_LETTER_TIMEOUT,
        }
    }

    /// Publishes to `topic` instead.
    ///
    /// # Panics
    ///
    /// When `topic` is not a valid topic name.
    #[track_caller]
    pub fn topic(mut self, topic: &str) -> Self {
        self.topic = TopicName::new(topic)
            .unwrap_or_else(|err| panic!("invalid dead-letter topic {topic:?}: {err}"));
        self
    }

    /// Sets the `source` of dead letters (by default the envelope default,
    /// `router`): the name of this service.
    pub fn source(mut self, source: impl AsRef<str>) -> Self {
        self.source = Some(source.as_ref().into());
        self
    }

    /// Gives up publishing a dead letter after `timeout`.
    pub const fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The sink.
    pub fn get_ref(&self) -> &S {
        &self.sink
    }

    /// The dead-letter topic.
    pub fn dead_letter_topic(&self) -> &TopicName {
        &self.topic
    }

    /// The dead letter for a message, as published.
    fn letter(&self, failed: FailedMessage, error: &HandlerError) -> Request<Envelope> {
        let (id, payload) = match failed.payload {
            Payload::Envelope(envelope) => {
                let id = envelope.id().to_owned();
                (id, serde_json::to_value(envelope).unwrap_or(Value::Null))
            }
            Payload::Raw { id, text } => (
                id,
                Value::String(String::from_utf8_lossy(&text).into_owned()),
            ),
        };
        let mut data = Map::new();
        data.insert(
            "topic".into(),
            Value::String(failed.topic.as_str().to_owned()),
        );
        data.insert("error".into(), Value::String(error.to_string()));
        data.insert("payload".into(), payload);
        let mut envelope = Envelope::from_map(DEAD_LETTER_TYPE, data).with_id(id);
        if let Some(source) = &self.source {
            envelope = envelope.with_source(&**source);
        }
        // A new request is QoS 1, not retained.
        Request::new(self.topic.clone(), envelope)
    }
}

impl<S> fmt::Debug for DeadLetter<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadLetter")
            .field("sink", &std::any::type_name::<S>())
            .field("topic", &self.topic)
            .field("source", &self.source)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// What [`DeadLetter`] keeps of a message until its outcome is known.
#[derive(Debug)]
pub struct FailedMessage {
    topic: TopicName,
    payload: Payload,
}

#[derive(Debug)]
enum Payload {
    Envelope(Envelope),
    Raw { id: String, text: Bytes },
}

impl<S> DeadLetterPolicy for DeadLetter<S>
where
    S: Service<Request<Envelope>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
{
    type Kept = FailedMessage;

    fn keep(&mut self, req: &Request<Envelope>) -> FailedMessage {
        let payload = match req.extensions().get::<RawPayload>() {
            Some(raw) => Payload::Raw {
                id: req.body().id().to_owned(),
                text: raw.payload().clone(),
            },
            None => Payload::Envelope(req.body().clone()),
        };
        FailedMessage {
            topic: req.topic().clone(),
            payload,
        }
    }

    fn dead_letter(&mut self, kept: FailedMessage, error: &HandlerError) {
        let letter = self.letter(kept, error);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::error!(topic = %letter.topic(), "cannot dead-letter outside a tokio runtime");
            return;
        };
        let (sink, timeout) = (self.sink.clone(), self.timeout);
        let id = CorrelationId::new(letter.body().id());
        let topic = letter.topic().clone();
        let publish = async move {
            match tokio::time::timeout(timeout, sink.oneshot(letter)).await {
                Ok(Ok(_)) => tracing::debug!(%topic, "dead-lettered"),
                Ok(Err(err)) => {
                    let err: BoxError = err.into();
                    tracing::error!(%topic, error = %err, "cannot dead-letter");
                }
                Err(_) => tracing::error!(%topic, ?timeout, "dead-lettering timed out"),
            }
        };
        runtime.spawn(correlation::scope(id, publish).instrument(tracing::Span::current()));
    }
}

/// Makes [`Isolation`] services; see the [module docs](self).
///
/// ```
/// use tower::ServiceBuilder;
/// use tower_mqtt::Router;
/// use tower_mqtt_layers::IsolationLayer;
///
/// let svc = ServiceBuilder::new().layer(IsolationLayer::new()).service(Router::new());
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
/// use tower_mqtt_layers::{DeadLetter, Isolation};
///
/// let sink = service_fn(|_: Request<Envelope>| async { Ok::<_, BoxError>(()) });
/// let svc = Isolation::new(tower_mqtt::Router::new()).dead_letter(DeadLetter::new(sink));
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

    define_inner_service_accessors!();
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

#[cfg(test)]
#[allow(
    clippy::items_after_statements,
    clippy::unnecessary_wraps,
    clippy::type_complexity
)]
mod tests {
    use super::*;
    use crate::{correlation_span::CorrelationSpanLayer, test_util::capture};
    use serde_json::json;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::sync::mpsc;
    use tower::ServiceBuilder;
    use tower_test::mock;
    use tracing::Level;

    const ID: &str = "3f1c9b1e8a2d4c6f9e0b7a5d4c3b2a19";

    fn msg() -> Request<Envelope> {
        let env = Envelope::new("tts.say", json!({"text": "hi"}))
            .unwrap()
            .with_id(ID);
        Request::builder("tts/say").body(env).unwrap()
    }

    /// A sink that hands dead letters to a channel.
    fn channel_sink() -> (
        impl Service<Request<Envelope>, Response = (), Error = BoxError, Future: Send>
            + Clone
            + Send
            + 'static,
        mpsc::UnboundedReceiver<Request<Envelope>>,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        let sink = tower::service_fn(move |letter: Request<Envelope>| {
            let sent = tx.send(letter).map_err(|_| BoxError::from("closed"));
            async move { sent }
        });
        (sink, rx)
    }

    #[tokio::test]
    async fn errors_become_failed_outcomes_logged_once_inside_the_span() {
        let (logs, _guard) = capture();
        let svc = ServiceBuilder::new()
            .layer(CorrelationSpanLayer::new())
            .layer(IsolationLayer::new())
            .service(tower::service_fn(|_: Request<Envelope>| async {
                Err::<Outcome, _>(std::io::Error::other("db down"))
            }));
        let outcome = svc.oneshot(msg()).await.unwrap();
        let err = outcome.error().unwrap();
        assert_eq!(err.to_string(), "db down");
        assert!(err.is_retryable());
        let errors = logs.at(Level::ERROR);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].message(), "message failed");
        assert_eq!(errors[0].fields["error"], "db down");
        assert_eq!(errors[0].fields["topic"], "tts/say");
        assert_eq!(
            errors[0].span("mqtt.message").unwrap()["correlation_id"],
            ID
        );
    }

    #[tokio::test]
    async fn failed_outcomes_are_logged_and_keep_their_classification() {
        let (logs, _guard) = capture();
        let svc = Isolation::new(tower::service_fn(|_: Request<Envelope>| async {
            Ok::<_, Infallible>(Outcome::Failed(HandlerError::permanent("unknown command")))
        }));
        let outcome = svc.oneshot(msg()).await.unwrap();
        assert!(!outcome.error().unwrap().is_retryable());
        let errors = logs.at(Level::ERROR);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].fields["retryable"], "false");

        // A permanent error boxed by a layer in between is recovered.
        let svc = Isolation::new(tower::service_fn(|_: Request<Envelope>| async {
            Err::<Outcome, BoxError>(HandlerError::permanent("bad").into())
        }));
        assert!(!svc
            .oneshot(msg())
            .await
            .unwrap()
            .error()
            .unwrap()
            .is_retryable());
    }

    #[tokio::test]
    async fn successes_are_not_logged_as_errors() {
        let (logs, _guard) = capture();
        let svc = Isolation::new(tower::service_fn(|_: Request<Envelope>| async {
            Ok::<_, Infallible>(())
        }));
        assert!(matches!(
            svc.oneshot(msg()).await.unwrap(),
            Outcome::Handled
        ));
        assert!(logs.at(Level::ERROR).is_empty());
    }

    #[derive(Clone)]
    struct Panics {
        in_ready: Arc<AtomicUsize>,
        in_call: Arc<AtomicUsize>,
    }

    impl Service<Request<Envelope>> for Panics {
        type Response = Outcome;
        type Error = Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<Outcome, Infallible>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            assert!(
                self.in_ready.fetch_sub(1, Ordering::SeqCst) != 1,
                "poll_ready blew up"
            );
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: Request<Envelope>) -> Self::Future {
            assert!(
                self.in_call.fetch_sub(1, Ordering::SeqCst) != 1,
                "call blew up"
            );
            Box::pin(async move {
                assert!(!req.body().data().contains_key("boom"), "future blew up");
                Ok(Outcome::Handled)
            })
        }
    }

    #[tokio::test]
    async fn panics_anywhere_fail_one_message_only() {
        let (logs, _guard) = capture();
        let panics = Panics {
            in_ready: Arc::new(AtomicUsize::new(0)),
            in_call: Arc::new(AtomicUsize::new(0)),
        };
        let mut svc = Isolation::new(panics.clone());
        async fn send_one(svc: &mut Isolation<Panics>, req: Request<Envelope>) -> Outcome {
            svc.ready().await.unwrap().call(req).await.unwrap()
        }

        panics.in_ready.store(1, Ordering::SeqCst);
        let outcome = send_one(&mut svc, msg()).await;
        assert_eq!(
            outcome.error().unwrap().to_string(),
            "handler panicked: poll_ready blew up"
        );
        assert!(matches!(send_one(&mut svc, msg()).await, Outcome::Handled));

        panics.in_call.store(1, Ordering::SeqCst);
        let outcome = send_one(&mut svc, msg()).await;
        assert_eq!(
            outcome.error().unwrap().to_string(),
            "handler panicked: call blew up"
        );
        assert!(matches!(send_one(&mut svc, msg()).await, Outcome::Handled));

        let mut boom = msg();
        boom.body_mut().data_mut().insert("boom".into(), json!(1));
        let outcome = send_one(&mut svc, boom).await;
        assert_eq!(
            outcome.error().unwrap().to_string(),
            "handler panicked: future blew up"
        );
        assert!(outcome.error().unwrap().is_retryable());
        assert!(matches!(send_one(&mut svc, msg()).await, Outcome::Handled));

        assert_eq!(logs.at(Level::ERROR).len(), 3);
    }

    #[tokio::test]
    async fn a_readiness_error_fails_the_next_message_only() {
        let (mock, mut handle) = mock::pair::<Request<Envelope>, Outcome>();
        let mut svc = Isolation::new(mock);
        handle.send_error(std::io::Error::other("not ready"));
        let outcome = svc.ready().await.unwrap().call(msg()).await.unwrap();
        assert_eq!(outcome.error().unwrap().to_string(), "not ready");

        handle.allow(1);
        let call = svc.ready().await.unwrap().call(msg());
        let (_, respond) = handle.next_request().await.unwrap();
        respond.send_response(Outcome::Handled);
        assert!(matches!(call.await.unwrap(), Outcome::Handled));
    }

    #[tokio::test(start_paused = true)]
    async fn a_timeout_in_between_is_a_retryable_failure() {
        // Isolation -> ConcurrencyLimit -> Timeout -> a handler that hangs.
        let svc = ServiceBuilder::new()
            .layer(IsolationLayer::new())
            .concurrency_limit(1)
            .timeout(Duration::from_secs(30))
            .service(tower::service_fn(|_: Request<Envelope>| async {
                std::future::pending::<Result<Outcome, Infallible>>().await
            }));
        let outcome = svc.oneshot(msg()).await.unwrap();
        let err = outcome.error().unwrap();
        assert!(crate::timeout::is_timeout(err));
        assert!(err.is_retryable());
    }

    #[tokio::test]
    async fn failed_envelopes_are_dead_lettered() {
        let (sink, mut letters) = channel_sink();
        let svc = IsolationLayer::new()
            .dead_letter(DeadLetter::new(sink).source("tts-worker"))
            .layer(tower::service_fn(|_: Request<Envelope>| async {
                Err::<Outcome, _>("speaker unplugged")
            }));
        let outcome = svc.oneshot(msg()).await.unwrap();
        assert!(outcome.is_failed());

        let letter = letters.recv().await.unwrap();
        assert_eq!(letter.topic(), DEFAULT_DEAD_LETTER_TOPIC);
        assert_eq!(letter.qos(), tower_mqtt_core::QoS::AtLeastOnce);
        let env = letter.body();
        assert_eq!(env.event_type(), DEAD_LETTER_TYPE);
        assert_eq!(env.id(), ID);
        assert_eq!(env.source(), "tts-worker");
        let data = Value::Object(env.data().clone());
        assert_eq!(data["topic"], "tts/say");
        assert_eq!(data["error"], "speaker unplugged");
        assert_eq!(data["payload"]["id"], ID);
        assert_eq!(data["payload"]["type"], "tts.say");
        assert_eq!(data["payload"]["data"], json!({"text": "hi"}));
        // The letter is itself a valid envelope on the wire.
        let decoded = Envelope::from_slice(&env.to_vec()).unwrap();
        assert_eq!((decoded.id(), decoded.event_type()), (ID, DEAD_LETTER_TYPE));
        assert_eq!(decoded.data()["payload"]["data"], json!({"text": "hi"}));
    }

    #[tokio::test]
    async fn raw_payloads_are_dead_lettered_as_text() {
        let (sink, mut letters) = channel_sink();
        let svc = IsolationLayer::new()
            .dead_letter(DeadLetter::new(sink).topic("ops/dead"))
            .layer(tower::service_fn(|_: Request<Envelope>| async {
                Err::<Outcome, _>("nope")
            }));
        let mut req = msg();
        req.extensions_mut()
            .insert(RawPayload::new(Bytes::from_static(br#"{"text": "hi"}"#)));
        svc.oneshot(req).await.unwrap();
        let letter = letters.recv().await.unwrap();
        assert_eq!(letter.topic(), "ops/dead");
        assert_eq!(letter.body().data()["payload"], r#"{"text": "hi"}"#);
    }

    #[tokio::test]
    async fn successes_are_not_dead_lettered() {
        let (sink, mut letters) = channel_sink();
        let svc = IsolationLayer::new()
            .dead_letter(DeadLetter::new(sink))
            .layer(tower::service_fn(|_: Request<Envelope>| async {
                Ok::<_, Infallible>(Outcome::Duplicate)
            }));
        assert!(matches!(
            svc.oneshot(msg()).await.unwrap(),
            Outcome::Duplicate
        ));
        tokio::task::yield_now().await;
        assert!(letters.try_recv().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_stuck_or_failing_sink_delays_nothing_and_is_logged() {
        let (logs, _guard) = capture();
        let (stuck, mut sink_handle) = mock::pair::<Request<Envelope>, ()>();
        sink_handle.allow(1);
        let svc = IsolationLayer::new()
            .dead_letter(DeadLetter::new(stuck).timeout(Duration::from_secs(2)))
            .layer(tower::service_fn(|_: Request<Envelope>| async {
                Err::<Outcome, _>("nope")
            }));
        let started = tokio::time::Instant::now();
        assert!(svc.oneshot(msg()).await.unwrap().is_failed());
        assert_eq!(started.elapsed(), Duration::ZERO);
        let (letter, _never_answered) = sink_handle.next_request().await.unwrap();
        assert_eq!(letter.body().event_type(), DEAD_LETTER_TYPE);
        tokio::time::sleep(Duration::from_secs(3)).await;
        let errors = logs.at(Level::ERROR);
        assert!(
            errors
                .iter()
                .any(|e| e.message() == "dead-lettering timed out"),
            "{errors:?}"
        );

        let failing = tower::service_fn(|_: Request<Envelope>| async {
            Err::<(), BoxError>("broker gone".into())
        });
        let svc = IsolationLayer::new()
            .dead_letter(DeadLetter::new(failing))
            .layer(tower::service_fn(|_: Request<Envelope>| async {
                Err::<Outcome, _>("nope")
            }));
        assert!(svc.oneshot(msg()).await.unwrap().is_failed());
        tokio::task::yield_now().await;
        let errors = logs.at(Level::ERROR);
        let failed = errors
            .iter()
            .find(|e| e.message() == "cannot dead-letter")
            .expect("the sink's error is logged");
        assert_eq!(failed.fields["error"], "broker gone");
    }

    #[tokio::test]
    async fn the_sink_runs_in_the_failed_messages_correlation_scope() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let sink = tower::service_fn(move |_letter: Request<Envelope>| {
            tx.send(correlation::current()).unwrap();
            async { Ok::<_, BoxError>(()) }
        });
        let svc = IsolationLayer::new()
            .dead_letter(DeadLetter::new(sink))
            .layer(tower::service_fn(|_: Request<Envelope>| async {
                Err::<Outcome, _>("nope")
            }));
        svc.oneshot(msg()).await.unwrap();
        assert_eq!(rx.recv().await.unwrap().unwrap().as_str(), ID);
    }

    #[test]
    fn without_a_runtime_dead_letters_are_dropped_not_panicking() {
        let (sink, _letters) = channel_sink();
        let mut policy = DeadLetter::new(sink);
        let kept = policy.keep(&msg());
        policy.dead_letter(kept, &HandlerError::new("x"));
    }

    #[test]
    #[should_panic(expected = "invalid dead-letter topic \"dead/+\"")]
    fn an_invalid_dead_letter_topic_fails_at_build_time() {
        let (sink, _letters) = channel_sink();
        let _ = DeadLetter::new(sink).topic("dead/+");
    }
}
