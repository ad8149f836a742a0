//! What happens to a failed message besides its log line: [`DeadLetterPolicy`].
//!
//! [`Isolation`](crate::isolation::Isolation) calls a dead-letter hook once for
//! every message that fails for good (after the last retry). The hook is a
//! [`DeadLetterPolicy`]: [`NoDeadLetters`] by default (the failure is only
//! logged), [`DeadLetter`] to publish the failed message to a dead-letter topic,
//! a closure `FnMut(FailedMessage, &HandlerError)`, or a type of your own.
//! Install it with
//! [`IsolationLayer::dead_letter`](crate::isolation::IsolationLayer::dead_letter).
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use tower::{service_fn, BoxError, Layer, ServiceExt};
//! use tower_mqtt::{Envelope, HandlerError, Outcome, Request};
//! use tower_mqtt::layers::{dead_letter::FailedMessage, IsolationLayer};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let failed = Arc::new(Mutex::new(Vec::new()));
//! let record = failed.clone();
//! let svc = IsolationLayer::new()
//!     .dead_letter(move |msg: FailedMessage, error: &HandlerError| {
//!         record.lock().unwrap().push(format!("{} on {}: {error}", msg.id(), msg.topic()));
//!     })
//!     .layer(service_fn(|_: Request<Envelope>| async { Err::<Outcome, BoxError>("db down".into()) }));
//!
//! let env = Envelope::new("tts.say", serde_json::json!({})).unwrap().with_id("ab12");
//! let outcome = svc.oneshot(Request::builder("tts/say").body(env).unwrap()).await.unwrap();
//! assert!(outcome.is_failed());
//! assert_eq!(failed.lock().unwrap()[0], "ab12 on tts/say: db down");
//! # }
//! ```

use std::{fmt, sync::Arc, time::Duration};

use bytes::Bytes;
use serde_json::{Map, Value};
use tower::{Service, ServiceExt};
use tower_mqtt_core::{
    correlation::{self, CorrelationId},
    BoxError, Envelope, HandlerError, Request, TopicName,
};
use tracing::Instrument;

use crate::decode::RawPayload;

#[cfg(test)]
mod tests;

/// The dead-letter topic unless configured otherwise: `mqtt/dead_letter`.
pub const DEFAULT_DEAD_LETTER_TOPIC: &str = "mqtt/dead_letter";

/// The event type of a dead letter: `mqtt.dead_letter`.
pub const DEAD_LETTER_TYPE: &str = "mqtt.dead_letter";

/// How long a dead letter may take to publish unless configured otherwise: 5 s.
pub const DEFAULT_DEAD_LETTER_TIMEOUT: Duration = Duration::from_secs(5);

/// What [`Isolation`](crate::isolation::Isolation) does with a failed message,
/// besides logging it; see the [module docs](self).
///
/// Implemented by [`NoDeadLetters`] (nothing, the default), [`DeadLetter`]
/// (publish it) and closures `FnMut(FailedMessage, &HandlerError) + Clone`.
/// Implement it to keep less of each message, or to send failed messages
/// elsewhere.
///
/// ```
/// use std::sync::{Arc, Mutex};
/// use tower_mqtt::{Envelope, HandlerError, Request, TopicName};
/// use tower_mqtt::layers::{dead_letter::DeadLetterPolicy, IsolationLayer};
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
/// use tower_mqtt::layers::{dead_letter::NoDeadLetters, IsolationLayer};
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
/// spawned task, in the failed message's correlation scope and with its
/// correlation id on the letter
/// ([`Request::correlation_id`](tower_mqtt_core::Request::correlation_id)), and given
/// [`DEFAULT_DEAD_LETTER_TIMEOUT`] unless configured otherwise. Outside a tokio
/// runtime, the dead letter is logged and dropped.
///
/// Keeping the payload costs a clone of the envelope per message (a reference
/// count for raw payloads), whether or not it fails.
///
/// ```
/// use tower::{service_fn, BoxError};
/// use tower_mqtt::{Envelope, Request};
/// use tower_mqtt::layers::{dead_letter::DeadLetter, IsolationLayer};
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
    fn letter(&self, failed: &FailedMessage, error: &HandlerError) -> Request<Envelope> {
        let mut data = Map::new();
        data.insert(
            "topic".into(),
            Value::String(failed.topic.as_str().to_owned()),
        );
        data.insert("error".into(), Value::String(error.to_string()));
        data.insert("payload".into(), failed.payload());
        let mut envelope = Envelope::from_map(DEAD_LETTER_TYPE, data).with_id(failed.id());
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

/// What [`DeadLetter`] (and a closure hook) keeps of a message until its
/// outcome is known: the topic and the payload.
///
/// ```
/// use tower_mqtt::{Envelope, Request};
/// use tower_mqtt::layers::dead_letter::FailedMessage;
///
/// let env = Envelope::new("tts.say", serde_json::json!({"text": "hi"})).unwrap().with_id("ab12");
/// let failed = FailedMessage::new(&Request::builder("tts/say").body(env).unwrap());
/// assert_eq!((failed.topic().as_str(), failed.id()), ("tts/say", "ab12"));
/// assert_eq!(failed.payload()["data"]["text"], "hi");
/// ```
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

impl FailedMessage {
    /// Keeps what a dead letter needs of `req`: a clone of the envelope, or a
    /// reference to the text of a [`RawPayload`].
    pub fn new(req: &Request<Envelope>) -> Self {
        let payload = match req.extensions().get::<RawPayload>() {
            Some(raw) => Payload::Raw {
                id: req.body().id().to_owned(),
                text: raw.payload().clone(),
            },
            None => Payload::Envelope(req.body().clone()),
        };
        Self {
            topic: req.topic().clone(),
            payload,
        }
    }

    /// The topic the message came on.
    pub fn topic(&self) -> &TopicName {
        &self.topic
    }

    /// The envelope id of the message.
    pub fn id(&self) -> &str {
        match &self.payload {
            Payload::Envelope(envelope) => envelope.id(),
            Payload::Raw { id, .. } => id,
        }
    }

    /// The message as a dead letter carries it: the envelope as a JSON object,
    /// or, for a plain JSON object wrapped on arrival ([`RawPayload`]), the text
    /// as it arrived.
    pub fn payload(&self) -> Value {
        match &self.payload {
            Payload::Envelope(envelope) => serde_json::to_value(envelope).unwrap_or(Value::Null),
            Payload::Raw { text, .. } => Value::String(String::from_utf8_lossy(text).into_owned()),
        }
    }
}

impl<F> DeadLetterPolicy for F
where
    F: FnMut(FailedMessage, &HandlerError) + Clone,
{
    type Kept = FailedMessage;

    fn keep(&mut self, req: &Request<Envelope>) -> FailedMessage {
        FailedMessage::new(req)
    }

    fn dead_letter(&mut self, kept: FailedMessage, error: &HandlerError) {
        self(kept, error);
    }
}

impl<S> DeadLetterPolicy for DeadLetter<S>
where
    S: Service<Request<Envelope>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
{
    type Kept = FailedMessage;

    fn keep(&mut self, req: &Request<Envelope>) -> FailedMessage {
        FailedMessage::new(req)
    }

    fn dead_letter(&mut self, kept: FailedMessage, error: &HandlerError) {
        let mut letter = self.letter(&kept, error);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::error!(topic = %letter.topic(), "cannot dead-letter outside a tokio runtime");
            return;
        };
        let (sink, timeout) = (self.sink.clone(), self.timeout);
        let id = CorrelationId::of(letter.body());
        letter.set_correlation_id(id.clone());
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
