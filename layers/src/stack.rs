//! The two stacks: [`InboundStack`] for messages that arrive, and its mirror
//! [`OutboundStack`] for what a service publishes.
//!
//! Each composes its middleware in the order the runtime expects:
//!
//! ```text
//! inbound                                     outbound
//! Request<Bytes> from the broker              Request<Envelope> from a handler or task
//!   -> Decode           bytes to envelope        -> Correlate   a reply takes the request's id,
//!                                                               every publish the trace, in a span
//!   -> Dedup            copies end here          -> Encode      envelope to bytes, with the source
//!   -> CorrelationSpan  span, correlation id,    -> SizeGuard   too large ends here, unsent
//!                       trace context
//!   -> Isolation        failures to Outcomes     -> Retry       retryable failures sent again
//!   -> Retry            failures tried again     -> Confirm     each attempt's wait bounded
//!   -> Timeout          each attempt bounded     -> sink        the connection: PUBACK, PUBCOMP
//!   -> your Router      Request<Envelope>
//! ```
//!
//! Why the inbound order:
//!
//! - **Decode outermost**, so a payload that cannot be decoded fails at once,
//!   permanently, and is never retried: no layer below ever sees it.
//! - **Dedup outside retry**, so a redelivery that arrives while the message is
//!   being retried is absorbed as a duplicate instead of running the handler a
//!   second time in parallel; and the dedup key is released only when the last
//!   attempt has failed, so a later redelivery of a failed message runs again.
//! - **The span inside dedup**: a duplicate, which is not handled, gets
//!   neither a span nor a trace context. The span continues the sender's
//!   trace (its `traceparent`), so what the handler publishes belongs to it;
//!   see [`trace_context`](crate::trace_context).
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
//! Why the outbound order, which mirrors it:
//!
//! - **Correlate first**, while the publish is still an envelope whose id can
//!   be replaced: it reads the correlation id and trace context the inbound
//!   span set for the handler that publishes, and its `mqtt.publish` span
//!   covers every layer below, each attempt included, so a retry or a drop is
//!   logged with the publish's topic and trace.
//! - **Encode before the size guard**, which measures the packet as it will go
//!   on the wire.
//! - **The size guard outside retry**, since another attempt cannot shrink a
//!   payload: a publish that is too large fails once, unsent, and is never
//!   retried (as decode errors are never retried inbound).
//! - **Retry outside confirm**, so each attempt waits its own time for the
//!   broker's confirmation, and an attempt that timed out is sent again.
//!
//! The inbound stack is a `Service<Request<Bytes>, Response = Outcome, Error =
//! Infallible>`: `Clone`, `Send`, `'static`, with a `Send` future, which is
//! what the runtime drives; every failure is an
//! [`Outcome`](tower_mqtt_core::Outcome), never an error. The outbound stack
//! is a `Service<Request<Envelope>, Response = (), Error = BoxError>` whose
//! errors downcast to [`PublishError`](crate::outbound::PublishError) or
//! tower's `Elapsed`.
//!
//! In a service, both are built from the configuration, in one place:
//! `Config::inbound_stack()` and `Config::outbound_stack()` in tower-mqtt. With
//! the configuration's defaults they are exactly `InboundStack::new()` and
//! `OutboundStack::new(source_name)`.
//!
//! ```
//! use bytes::Bytes;
//! use std::time::Duration;

use std::time::Duration;

use tower::{Layer, ServiceBuilder};
use tracing::Level;

use crate::{
    correlation_span::{CorrelationSpan, CorrelationSpanLayer, DefaultMakeSpan},
    dead_letter::{DeadLetterPolicy, NoDeadLetters},
    decode::{Decode, DecodeLayer},
    dedup::{Dedup, DedupLayer},
    isolation::{Isolation, IsolationLayer},
    outbound::{
        confirm, size_guard::DEFAULT_MAX_PACKET_SIZE, Correlate, CorrelateLayer, Encode,
        EncodeLayer, PublishRetry, PublishRetryLayer, SizeGuard, SizeGuardLayer,
    },
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
/// Defaults, the same as a default configuration's: the fleet's
/// [`EventRegistry`] for the types of raw payloads, dedup for 30 s and 2048
/// entries (off with a TTL of zero, or [`without_dedup`](Self::without_dedup)),
/// spans at `INFO`, no dead letters, [`DEFAULT_MAX_ATTEMPTS`] attempts with
/// the default backoff and budget, and a 30 s timeout per attempt.
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

/// The service [`OutboundStack`] makes around a sink `S`.
pub type OutboundService<S> = Correlate<Encode<SizeGuard<PublishRetry<confirm::Timeout<S>>>>>;

/// Builds the outbound stack, the mirror of [`InboundStack`]; see the
/// [module docs](self).
///
/// Defaults, the same as a default configuration's: correlate publishes
/// marked [`Reply`](crate::outbound::Reply), a packet limit of 1 MiB,
/// [`DEFAULT_PUBLISH_ATTEMPTS`](crate::outbound::retry::DEFAULT_PUBLISH_ATTEMPTS)
/// attempts with the default backoff and budget, and a 30 s wait for each
/// attempt's confirmation.
///
/// It is also a [`Layer`]: every service it makes shares one retry budget
/// and one count of dropped publishes.
///
/// ```
/// use bytes::Bytes;
/// use tower::{service_fn, ServiceExt};
/// use tower_mqtt::{layers::OutboundStack, BoxError, Envelope, Request};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// // In a service the sink is the connection, and `Publisher` wraps all this.
/// let sink = service_fn(|req: Request<Bytes>| async move {
///     println!("{} bytes to {}", req.body().len(), req.topic());
///     Ok::<_, BoxError>(())
/// });
/// let outbound = OutboundStack::new("tts-worker").service(sink);
/// let status = Envelope::new("tts.status", serde_json::json!({"speaking": true})).unwrap();
/// outbound.oneshot(Request::builder("tts/status").body(status).unwrap()).await.unwrap();
/// # }
/// ```
#[derive(Clone, Debug)]
#[must_use]
pub struct OutboundStack {
    correlate: CorrelateLayer,
    correlate_always: bool,
    correlate_carries: bool,
    encode: EncodeLayer,
    max_packet_size: usize,
    retry: PublishRetryLayer,
    timeout: Duration,
}

impl OutboundStack {
    /// The stack of the service named `source` (stamped on envelopes that
    /// kept the default source), with the defaults (see [`OutboundStack`]).
    ///
    /// ```
    /// use tower_mqtt::layers::OutboundStack;
    ///
    /// let stack = OutboundStack::new("llm-worker");
    /// assert_eq!(stack.dropped(), 0);
    /// ```
    pub fn new(source: impl AsRef<str>) -> Self {
        Self {
            correlate: CorrelateLayer::new(),
            correlate_always: false,
            correlate_carries: true,
            encode: EncodeLayer::new(source),
            max_packet_size: DEFAULT_MAX_PACKET_SIZE,
            retry: PublishRetryLayer::default(),
            timeout: confirm::DEFAULT_TIMEOUT,
        }
    }

    /// Correlates every publish made while a message is handled, not only
    /// those marked [`Reply`](crate::outbound::Reply).
    ///
    /// ```
    /// let stack = tower_mqtt::layers::OutboundStack::new("llm-worker").correlate_always();
    /// ```
    pub fn correlate_always(mut self) -> Self {
        self.correlate = CorrelateLayer::always().carry_trace_context(self.correlate_carries);
        self.correlate_always = true;
        self
    }

    /// Whether publishes carry their trace context as `traceparent` and
    /// `tracestate` user properties (default: they do). tower-mqtt's runtime
    /// turns it off on MQTT 3.1.1, which sends no properties; the context is
    /// still recorded on each publish's span.
    ///
    /// ```
    /// let stack = tower_mqtt::layers::OutboundStack::new("llm-worker").carry_trace_context(false);
    /// ```
    pub fn carry_trace_context(mut self, carry: bool) -> Self {
        self.correlate_carries = carry;
        let layer = if self.correlate_always {
            CorrelateLayer::always()
        } else {
            CorrelateLayer::new()
        };
        self.correlate = layer.carry_trace_context(carry);
        self
    }

    /// The packet limit in bytes (default 1 MiB), as
    /// [`packet_size`](crate::outbound::packet_size) counts a packet.
    ///
    /// ```
    /// let stack = tower_mqtt::layers::OutboundStack::new("camera").max_packet_size(8 << 20);
    /// ```
    pub fn max_packet_size(mut self, bytes: usize) -> Self {
        self.max_packet_size = bytes;
        self
    }

    /// The retries: attempts, backoff, budget.
    ///
    /// ```
    /// use tower_mqtt::layers::{outbound::PublishRetryLayer, OutboundStack};
    ///
    /// let stack = OutboundStack::new("llm-worker").retry(PublishRetryLayer::new(5));
    /// ```
    pub fn retry(mut self, retry: PublishRetryLayer) -> Self {
        self.retry = retry;
        self
    }

    /// The time each attempt may wait for its confirmation (default 30 s).
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let stack = tower_mqtt::layers::OutboundStack::new("llm-worker").timeout(Duration::from_secs(5));
    /// ```
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Publishes dropped after their last attempt, by every service this stack
    /// made.
    ///
    /// ```
    /// assert_eq!(tower_mqtt::layers::OutboundStack::new("svc").dropped(), 0);
    /// ```
    pub fn dropped(&self) -> u64 {
        self.retry.dropped()
    }

    /// Wraps `sink` in the stack.
    pub fn service<S>(&self, sink: S) -> OutboundService<S> {
        self.layer(sink)
    }
}

impl<S> Layer<S> for OutboundStack {
    type Service = OutboundService<S>;

    fn layer(&self, sink: S) -> Self::Service {
        ServiceBuilder::new()
            .layer(self.correlate)
            .layer(self.encode.clone())
            .layer(SizeGuardLayer::new(self.max_packet_size))
            .layer(self.retry.clone())
            .layer(confirm::TimeoutLayer::new(self.timeout))
            .service(sink)
    }
}

#[cfg(test)]
mod tests;
