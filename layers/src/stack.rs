//! The inbound stack: [`InboundStack`].
//!
//! One builder composes the inbound middleware in the order the runtime
//! expects, around a service of [`Request<Envelope>`](tower_mqtt_core::Request) (usually a
//! [`Router`](tower_mqtt_core::Router)):
//!
//! ```text
//! Request<Bytes>
//!   -> Decode            bytes to envelope; decode errors end here
//!   -> Dedup             copies of handled envelopes end here
//!   -> CorrelationSpan   span + correlation id for everything below
//!   -> Isolation         errors, panics, timeouts become Outcome::Failed
//!   -> Retry             retryable failures tried again, with backoff
//!   -> Timeout           each attempt bounded (30 s)
//!   -> your service      Request<Envelope> -> Outcome
//! ```
//!
//! Why this order:
//!
//! - **Decode outermost**, so a payload that cannot be decoded fails at once,
//!   permanently, and is never retried: no layer below ever sees it.
//! - **Dedup outside retry**, so a redelivery that arrives while the message is
//!   being retried is absorbed as a duplicate instead of running the handler a
//!   second time in parallel; and the dedup key is released only when the last
//!   attempt has failed, so a later redelivery of a failed message runs again.
//! - **The span outside isolation**, so the error isolation logs is inside the
//!   message's span, with its correlation id, topic and type. Dedup logs at
//!   `DEBUG` only. A payload that cannot be decoded has no envelope to make
//!   that span from: decode logs its `WARN` (rate-limited, with topic, size and
//!   reason) inside an `mqtt.message` span of its own, with the topic and
//!   flags, so both kinds of line are found under one span name.
//! - **Isolation outside retry**, so it sees the final error, after the last
//!   attempt: a failed message is logged and dead-lettered once, not once per
//!   attempt.
//! - **Timeout inside retry**, so each attempt has its own time, and a timed-out
//!   attempt is retried (see [`timeout`](crate::timeout) for why timeouts are
//!   retryable).
//!
//! The result is a `Service<Request<Bytes>, Response = Outcome, Error =
//! Infallible>`: `Clone`, `Send`, `'static`, with a `Send` future, which is what
//! the runtime drives. Every failure is an [`Outcome`](tower_mqtt_core::Outcome), never an error.
//!
//! ```
//! use bytes::Bytes;
//! use std::time::Duration;
//! use tower::{service_fn, BoxError, ServiceExt};
//! use tower_mqtt::{correlation, Data, Envelope, Outcome, Request, Router};
//! use tower_mqtt::layers::{dead_letter::DeadLetter, retry::MessageRetryLayer, InboundStack};
//!
//! #[derive(serde::Deserialize)]
//! struct Say { text: String }
//!
//! async fn say(Data(say): Data<Say>) -> Result<(), BoxError> {
//!     assert!(correlation::current().is_some());
//!     println!("saying {}", say.text);
//!     Ok(())
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! // Where failed messages go: in a service, the runtime's publisher.
//! let publisher = service_fn(|_: Request<Envelope>| async { Ok::<_, BoxError>(()) });
//!
//! let svc = InboundStack::new()
//!     .dedup_ttl(Duration::from_secs(30))
//!     .dedup_max_entries(2048)
//!     .retry(MessageRetryLayer::new(3).backoff(Duration::from_millis(100), Duration::from_secs(5)))
//!     .timeout(Duration::from_secs(30))
//!     .dead_letter(DeadLetter::new(publisher).source("tts-worker"))
//!     .service(Router::new().route("tts/say", say));
//!
//! let bytes = Envelope::new("tts.say", serde_json::json!({"text": "hello"})).unwrap().to_bytes();
//! let msg = Request::builder("tts/say").body(bytes).unwrap();
//! assert!(matches!(svc.clone().oneshot(msg.clone()).await.unwrap(), Outcome::Handled));
//! assert!(matches!(svc.clone().oneshot(msg).await.unwrap(), Outcome::Duplicate));
//!
//! let garbage = Request::builder("tts/say").body(Bytes::from_static(b"\x00")).unwrap();
//! assert!(svc.oneshot(garbage).await.unwrap().is_failed());
//! # }
//! ```

use std::time::Duration;

use tower::{Layer, ServiceBuilder};
use tracing::Level;

use crate::{
    correlation_span::{CorrelationSpan, CorrelationSpanLayer, DefaultMakeSpan},
    dead_letter::{DeadLetterPolicy, NoDeadLetters},
    decode::{Decode, DecodeLayer},
    dedup::{Dedup, DedupLayer},
    isolation::{Isolation, IsolationLayer},
    registry::EventRegistry,
    retry::{MessageRetry, MessageRetryLayer},
    timeout::{Timeout, TimeoutLayer, DEFAULT_TIMEOUT},
};

/// The most attempts a message gets in the inbound stack unless configured
/// otherwise: 3.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;

/// The service [`InboundStack`] makes around `S`.
pub type InboundService<S, D = NoDeadLetters> =
    Decode<Dedup<CorrelationSpan<Isolation<MessageRetry<Timeout<S>>, D>>>>;

/// Builds the inbound stack; see the [module docs](self).
///
/// Defaults, the same as a default configuration's
/// (`Config::inbound_stack()` in tower-mqtt): the fleet's [`EventRegistry`]
/// for the types of raw payloads, dedup for 30 s and 2048 entries (off with a
/// TTL of zero, or [`without_dedup`](Self::without_dedup)), spans at `INFO`,
/// no dead letters, [`DEFAULT_MAX_ATTEMPTS`] attempts with the default backoff
/// and budget, and a 30 s timeout per attempt.
///
/// It is also a [`Layer`]: every service it makes shares one dedup cache and
/// one retry budget.
///
/// ```
/// use tower::ServiceBuilder;
/// use tower_mqtt::{layers::InboundStack, Router};
///
/// let svc = ServiceBuilder::new()
///     .layer(InboundStack::new())
///     .service(Router::<()>::new());
/// ```
#[derive(Clone, Debug)]
#[must_use]
pub struct InboundStack<D = NoDeadLetters> {
    decode: DecodeLayer,
    dedup: DedupLayer,
    span: DefaultMakeSpan,
    dead_letters: D,
    retry: MessageRetryLayer,
    timeout: Duration,
}

impl InboundStack {
    /// The stack with its defaults (see [`InboundStack`]).
    ///
    /// ```
    /// use bytes::Bytes;
    /// use tower::ServiceExt;
    /// use tower_mqtt::{layers::InboundStack, Envelope, Outcome, Request, Router};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let router = Router::new().route("stt/final", |req: Request<Envelope>| async move {
    ///     assert_eq!(req.body().event_type(), "stt.final");
    /// });
    /// // A raw JSON object, as some services publish: wrapped as the fleet's `stt.final`.
    /// let raw = Request::builder("stt/final").body(Bytes::from_static(br#"{"text":"hi"}"#)).unwrap();
    /// let outcome = InboundStack::new().service(router).oneshot(raw).await.unwrap();
    /// assert!(matches!(outcome, Outcome::Handled));
    /// # }
    /// ```
    pub fn new() -> Self {
        Self {
            decode: DecodeLayer::new(EventRegistry::fleet()),
            dedup: DedupLayer::new(),
            span: DefaultMakeSpan::new(),
            dead_letters: NoDeadLetters,
            retry: MessageRetryLayer::new(DEFAULT_MAX_ATTEMPTS),
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

impl Default for InboundStack {
    fn default() -> Self {
        Self::new()
    }
}

impl<D> InboundStack<D> {
    /// The event registry for the types of raw JSON payloads (default: the
    /// fleet's).
    ///
    /// ```
    /// use tower_mqtt::layers::{EventRegistry, InboundStack};
    ///
    /// let registry = EventRegistry::fleet().event("camera.frame", "camera/front/frame");
    /// let stack = InboundStack::new().registry(registry);
    /// ```
    pub fn registry(mut self, registry: EventRegistry) -> Self {
        self.decode = self.decode.with_registry(registry);
        self
    }

    /// The type of raw payloads on topics the registry does not know; see
    /// [`DecodeLayer::default_type`].
    pub fn default_type(mut self, event_type: impl Into<String>) -> Self {
        self.decode = self.decode.default_type(event_type);
        self
    }

    /// How long a handled message is remembered (default 30 s). Starts a new
    /// dedup cache.
    ///
    /// Zero turns dedup off, as the fleet's `MQTT_DEDUPE_TTL=0` does: the
    /// setting can be passed through as it is configured. See
    /// [`without_dedup`](Self::without_dedup).
    pub fn dedup_ttl(mut self, ttl: Duration) -> Self {
        self.dedup = DedupLayer::with_limits(ttl, self.dedup.max_entries());
        self
    }

    /// How many handled messages are remembered at most (default 2048). Starts
    /// a new dedup cache.
    pub fn dedup_max_entries(mut self, max_entries: u64) -> Self {
        self.dedup = DedupLayer::with_limits(self.dedup.ttl(), max_entries);
        self
    }

    /// Lets every message through, copies included: no dedup cache is kept.
    /// The same as [`dedup_ttl(Duration::ZERO)`](Self::dedup_ttl).
    ///
    /// For services whose handlers are idempotent, or that deduplicate on
    /// their own. The `Dedup` layer stays in the stack's type, as a pass-through.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use tower::ServiceExt;
    /// use tower_mqtt::{layers::InboundStack, Envelope, Outcome, Request, Router};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let router = Router::new().route("tts/say", |_: Request<Envelope>| async {});
    /// let svc = InboundStack::new().without_dedup().service(router);
    /// let bytes = Envelope::new("tts.say", serde_json::json!({})).unwrap().to_bytes();
    /// let msg = Request::builder("tts/say").body(bytes).unwrap();
    /// assert!(matches!(svc.clone().oneshot(msg.clone()).await.unwrap(), Outcome::Handled));
    /// assert!(matches!(svc.oneshot(msg).await.unwrap(), Outcome::Handled));
    /// # }
    /// ```
    pub fn without_dedup(mut self) -> Self {
        self.dedup = DedupLayer::with_limits(Duration::ZERO, self.dedup.max_entries());
        self
    }

    /// Uses `dedup`, and its cache, for deduplication: stacks given the same
    /// layer share what they have seen.
    pub fn dedup(mut self, dedup: DedupLayer) -> Self {
        self.dedup = dedup;
        self
    }

    /// The level of the `mqtt.message` span (default `INFO`).
    pub fn span_level(mut self, level: Level) -> Self {
        self.span = self.span.level(level);
        self
    }

    /// The retries: attempts, backoff, budget.
    pub fn retry(mut self, retry: MessageRetryLayer) -> Self {
        self.retry = retry;
        self
    }

    /// The time each attempt may take (default 30 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Where failed messages go besides the log, usually a
    /// [`DeadLetter`](crate::dead_letter::DeadLetter).
    pub fn dead_letter<D2: DeadLetterPolicy>(self, dead_letters: D2) -> InboundStack<D2> {
        InboundStack {
            decode: self.decode,
            dedup: self.dedup,
            span: self.span,
            dead_letters,
            retry: self.retry,
            timeout: self.timeout,
        }
    }

    /// Wraps `inner` in the stack.
    pub fn service<S>(&self, inner: S) -> InboundService<S, D>
    where
        D: DeadLetterPolicy,
    {
        self.layer(inner)
    }
}

impl<S, D: DeadLetterPolicy> Layer<S> for InboundStack<D> {
    type Service = InboundService<S, D>;

    fn layer(&self, inner: S) -> Self::Service {
        ServiceBuilder::new()
            .layer(self.decode.clone())
            .layer(self.dedup.clone())
            .layer(CorrelationSpanLayer::new().make_span(self.span))
            .layer(IsolationLayer::new().dead_letter(self.dead_letters.clone()))
            .layer(self.retry.clone())
            .layer(TimeoutLayer::new(self.timeout))
            .service(inner)
    }
}

#[cfg(test)]
mod tests;
