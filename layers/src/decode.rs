//! Decoding payloads into envelopes: [`Decode`].
//!
//! [`Decode`] turns the raw [`Request<Bytes>`] of a PUBLISH into a
//! [`Request<Envelope>`] for the services inside it, following the fleet's
//! receivers (strict envelope first, then plain JSON):
//!
//! | payload | becomes |
//! |---|---|
//! | a valid envelope (exactly the five keys, right JSON types) | that [`Envelope`] |
//! | any other JSON object | an envelope around it (`data` = the object), marked [`RawPayload`] |
//! | a JSON object of envelope keys only, with `type`, that is not a valid envelope (`"data": [1]`, `"ts": "now"`) | [`DecodeError::InvalidEnvelope`] |
//! | a JSON array, string, number, `true`/`false`, `null` | [`DecodeError::NotAnObject`] |
//! | not JSON, not UTF-8, empty | [`DecodeError::NotJson`], [`DecodeError::NotUtf8`], [`DecodeError::Empty`] |
//!
//! The `type` of a wrapped object is the one the [`EventRegistry`] has for the
//! topic; else the layer's [default type](DecodeLayer::default_type); else the
//! topic with `/` replaced by `.` (the fleet's naming: `stt/final` carries
//! `stt.final`). A wrapped envelope has a fresh id, the current time and the
//! default source, like the Python receiver's.
//!
//! An object with a key the envelope does not have is a raw payload, as in the
//! Python receiver, which falls back to plain JSON whenever strict validation
//! fails. Unlike it, an object made only of envelope keys that fails validation
//! is an error rather than a raw payload: such a message is a broken envelope,
//! and wrapping it would hand the handler a payload of the wrong shape.
//!
//! A decode error is never retried: the outcome is a permanent
//! [`Outcome::Failed`] holding the [`DecodeError`], and the inner service is not
//! called. Put `Decode` outermost, so that no retry layer ever sees the bytes.
//!
//! # Bad input is logged
//!
//! Each message that cannot be decoded is logged once, at `WARN`, with its
//! `topic`, its `size` in bytes, the `reason` ([`DecodeError::reason`]) and the
//! `error` (its first 160 characters), never the payload. The line is inside an
//! `mqtt.message` span with the topic, QoS and flags, the span the
//! [`CorrelationSpan`](crate::correlation_span::CorrelationSpan) layer opens for
//! messages that do decode. A flood of junk cannot flood the log: at most 10
//! lines a second are written for each reason, and the next line written says
//! how many were held back (`suppressed`).
//!
//! ```
//! use bytes::Bytes;
//! use tower::{service_fn, BoxError, Layer, ServiceExt};
//! use tower_mqtt::{Envelope, Outcome, Request};
//! use tower_mqtt::layers::{decode::{DecodeError, DecodeLayer, RawPayload}, EventRegistry};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let handler = service_fn(|req: Request<Envelope>| async move {
//!     assert_eq!(req.body().event_type(), "stt.final");
//!     assert!(req.extensions().get::<RawPayload>().is_some());
//!     Ok::<_, BoxError>(Outcome::Handled)
//! });
//! let svc = DecodeLayer::new(EventRegistry::fleet()).layer(handler);
//!
//! // A raw JSON object on stt/final is wrapped as an `stt.final` envelope.
//! let raw = Request::builder("stt/final").body(Bytes::from_static(br#"{"text":"hi"}"#)).unwrap();
//! assert!(matches!(svc.clone().oneshot(raw).await.unwrap(), Outcome::Handled));
//!
//! // Garbage is a permanent failure; the handler never runs.
//! let bad = Request::builder("stt/final").body(Bytes::from_static(b"\xff")).unwrap();
//! let outcome = svc.oneshot(bad).await.unwrap();
//! let err = outcome.error().unwrap();
//! assert!(!err.is_retryable());
//! assert!(matches!(err.get_ref().downcast_ref(), Some(DecodeError::NotUtf8(_))));
//! # }
//! ```

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use pin_project_lite::pin_project;
use serde_json::{Map, Value};
use tower::{Layer, Service};
use tower_mqtt_core::{
    envelope::json_type, request::Parts, Envelope, EnvelopeError, HandlerError, Outcome, Request,
    TopicName,
};

use tower_mqtt_core::log_limit::LogLimit;

use crate::registry::EventRegistry;

/// Why a payload could not be decoded; see the [module docs](self).
///
/// [`Decode`] hands it over inside a permanent [`HandlerError`]:
///
/// ```
/// use tower_mqtt::HandlerError;
/// use tower_mqtt::layers::DecodeError;
///
/// let err = HandlerError::permanent(DecodeError::NotAnObject { found: "array" });
/// assert_eq!(err.to_string(), "payload is a JSON array, not an object");
/// assert!(matches!(err.get_ref().downcast_ref(), Some(DecodeError::NotAnObject { .. })));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The payload was empty (as when a retained message is cleared).
    #[error("empty payload")]
    Empty,
    /// The payload is not valid UTF-8, so it cannot be JSON.
    #[error("payload is not valid UTF-8: {0}")]
    NotUtf8(#[source] std::str::Utf8Error),
    /// The payload is UTF-8 but not JSON.
    #[error("payload is not JSON: {0}")]
    NotJson(#[source] serde_json::Error),
    /// The payload is JSON but not an object.
    #[error("payload is a JSON {found}, not an object")]
    NotAnObject {
        /// The JSON type that was sent (`array`, `string`, `number`, ...).
        found: &'static str,
    },
    /// The payload is an object of envelope keys that is not a valid envelope:
    /// a missing or non-string `type`, a key of the wrong JSON type.
    #[error("{0}")]
    InvalidEnvelope(#[source] EnvelopeError),
}

/// How many kinds of [`DecodeError`] there are.
const REASONS: usize = 5;

impl DecodeError {
    /// A short name for the kind of error, for logs and metrics: `empty`,
    /// `not_utf8`, `not_json`, `not_an_object` or `invalid_envelope`.
    ///
    /// ```
    /// use tower_mqtt::layers::DecodeError;
    ///
    /// assert_eq!(DecodeError::NotAnObject { found: "array" }.reason(), "not_an_object");
    /// ```
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Empty => "empty",
            Self::NotUtf8(_) => "not_utf8",
            Self::NotJson(_) => "not_json",
            Self::NotAnObject { .. } => "not_an_object",
            Self::InvalidEnvelope(_) => "invalid_envelope",
        }
    }

    fn index(&self) -> usize {
        match self {
            Self::Empty => 0,
            Self::NotUtf8(_) => 1,
            Self::NotJson(_) => 2,
            Self::NotAnObject { .. } => 3,
            Self::InvalidEnvelope(_) => 4,
        }
    }
}

/// Marks a request whose payload was a plain JSON object, not an envelope,
/// and holds the payload as it arrived.
///
/// [`Decode`] inserts it into the extensions of the requests it wraps; the
/// dedup layer never treats such a request as a duplicate (its envelope id was
/// made up on arrival), and the dead-letter topic gets the original text.
///
/// ```
/// use bytes::Bytes;
/// use tower_mqtt::layers::decode::RawPayload;
///
/// let raw = RawPayload::new(Bytes::from_static(br#"{"level":3}"#));
/// assert_eq!(&raw.payload()[..], br#"{"level":3}"#);
/// ```
#[derive(Clone, Debug)]
pub struct RawPayload(Bytes);

impl RawPayload {
    /// Marks `payload` as a raw payload.
    pub const fn new(payload: Bytes) -> Self {
        Self(payload)
    }

    /// The payload as it arrived.
    pub fn payload(&self) -> &Bytes {
        &self.0
    }
}

/// The keys of the envelope; an object of these only is meant as one.
const ENVELOPE_KEYS: [&str; 5] = ["id", "type", "ts", "source", "data"];

/// The longest error text a warning carries: serde's messages can quote a
/// value from the payload.
const MAX_ERROR_CHARS: usize = 160;

#[derive(Clone, Debug, Default)]
struct Config {
    registry: EventRegistry,
    default_type: Option<String>,
    /// Shared by the layer's services, so the limit holds for all of them.
    warnings: Arc<LogLimit<REASONS>>,
}

impl Config {
    fn decode(&self, req: Request<Bytes>) -> Result<Request<Envelope>, DecodeError> {
        let (mut parts, bytes) = req.into_parts();
        match Envelope::from_slice(&bytes) {
            Ok(envelope) => Ok(Request::from_parts(parts, envelope)),
            Err(not_an_envelope) => {
                let object = raw_object(&bytes, not_an_envelope)
                    .inspect_err(|error| self.warn(&parts, bytes.len(), error))?;
                let envelope = Envelope::from_map(self.event_type_for(&parts.topic), object);
                parts.extensions.insert(RawPayload(bytes));
                Ok(Request::from_parts(parts, envelope))
            }
        }
    }

    /// Logs a message that cannot be decoded, within the rate limit.
    fn warn(&self, parts: &Parts, size: usize, error: &DecodeError) {
        let Some(suppressed) = self.warnings.admit(error.index()) else {
            return;
        };
        let span = tracing::info_span!(
            "mqtt.message",
            topic = %parts.topic,
            qos = u8::from(parts.qos),
            retain = parts.retain,
            dup = parts.dup,
        );
        let _entered = span.enter();
        let mut text = error.to_string();
        if let Some((cut, _)) = text.char_indices().nth(MAX_ERROR_CHARS) {
            text.truncate(cut);
            text.push('…');
        }
        tracing::warn!(
            topic = %parts.topic,
            size,
            reason = error.reason(),
            error = %text,
            suppressed,
            "dropping a message that cannot be decoded",
        );
    }

    fn event_type_for(&self, topic: &TopicName) -> String {
        if let Some(event_type) = self.registry.event_type_for(topic.as_str()) {
            return event_type.into_owned();
        }
        match &self.default_type {
            Some(event_type) => event_type.clone(),
            None => topic.as_str().replace('/', "."),
        }
    }
}

/// The fallback after strict envelope decoding failed: a plain JSON object.
fn raw_object(
    bytes: &[u8],
    not_an_envelope: EnvelopeError,
) -> Result<Map<String, Value>, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    let text = std::str::from_utf8(bytes).map_err(DecodeError::NotUtf8)?;
    match serde_json::from_str(text).map_err(DecodeError::NotJson)? {
        Value::Object(object) => {
            let meant_as_envelope = object.contains_key("type")
                && object
                    .keys()
                    .all(|key| ENVELOPE_KEYS.contains(&key.as_str()));
            if meant_as_envelope {
                Err(DecodeError::InvalidEnvelope(not_an_envelope))
            } else {
                Ok(object)
            }
        }
        other => Err(DecodeError::NotAnObject {
            found: json_type(&other),
        }),
    }
}

/// Decodes payloads for the services inside it; see the [module docs](self).
///
/// Holds its configuration behind an `Arc`: cloning is cheap, and every
/// service it makes shares the registry.
#[derive(Clone, Debug, Default)]
#[must_use]
pub struct DecodeLayer {
    config: Arc<Config>,
}

impl DecodeLayer {
    /// Decodes with `registry` for the types of raw payloads.
    pub fn new(registry: EventRegistry) -> Self {
        Self {
            config: Arc::new(Config {
                registry,
                default_type: None,
                warnings: Arc::default(),
            }),
        }
    }

    /// The type of raw payloads on topics the registry does not know, instead of
    /// the topic with `/` replaced by `.`.
    ///
    /// ```
    /// use tower_mqtt::layers::{decode::DecodeLayer, EventRegistry};
    ///
    /// let layer = DecodeLayer::new(EventRegistry::new()).default_type("raw.json");
    /// ```
    pub fn default_type(mut self, event_type: impl Into<String>) -> Self {
        Arc::make_mut(&mut self.config).default_type = Some(event_type.into());
        self
    }

    /// Replaces the registry, keeping the default type.
    pub(crate) fn with_registry(mut self, registry: EventRegistry) -> Self {
        Arc::make_mut(&mut self.config).registry = registry;
        self
    }

    /// The registry.
    pub fn registry(&self) -> &EventRegistry {
        &self.config.registry
    }
}

impl<S> Layer<S> for DecodeLayer {
    type Service = Decode<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Decode {
            inner,
            config: self.config.clone(),
        }
    }
}

/// Decodes [`Request<Bytes>`] into [`Request<Envelope>`] for `S`; see the
/// [module docs](self).
///
/// ```
/// use tower_mqtt::Router;
/// use tower_mqtt::layers::{Decode, EventRegistry};
///
/// let svc = Decode::new(Router::<()>::new(), EventRegistry::fleet());
/// assert_eq!(svc.get_ref().routes().count(), 0);
/// ```
#[derive(Clone, Debug)]
#[must_use]
pub struct Decode<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S> Decode<S> {
    /// Wraps `inner`, with `registry` for the types of raw payloads.
    pub fn new(inner: S, registry: EventRegistry) -> Self {
        DecodeLayer::new(registry).layer(inner)
    }

    /// A [`DecodeLayer`] with `registry`.
    pub fn layer(registry: EventRegistry) -> DecodeLayer {
        DecodeLayer::new(registry)
    }

    tower_mqtt_core::define_inner_service_accessors!();
}

impl<S> Service<Request<Bytes>> for Decode<S>
where
    S: Service<Request<Envelope>, Response = Outcome>,
{
    type Response = Outcome;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        match self.config.decode(req) {
            Ok(req) => ResponseFuture {
                kind: Kind::Inner {
                    future: self.inner.call(req),
                },
            },
            Err(error) => ResponseFuture {
                kind: Kind::Failed { error: Some(error) },
            },
        }
    }
}

pin_project! {
    /// The future of [`Decode`].
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        kind: Kind<F>,
    }
}

pin_project! {
    #[project = KindProj]
    #[derive(Debug)]
    enum Kind<F> {
        Inner { #[pin] future: F },
        Failed { error: Option<DecodeError> },
    }
}

impl<F, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Outcome, E>>,
{
    type Output = Result<Outcome, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Inner { future } => future.poll(cx),
            KindProj::Failed { error } => {
                let error = error.take().expect("polled after completion");
                Poll::Ready(Ok(Outcome::Failed(HandlerError::permanent(error))))
            }
        }
    }
}

#[cfg(test)]
mod tests;
