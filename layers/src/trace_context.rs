//! W3C Trace Context across services: [`TraceContext`], carried in the
//! `traceparent` and `tracestate` user properties of MQTT 5 publishes.
//!
//! One trace id follows a request from service to service: the message that
//! starts a conversation carries a `traceparent`, the handler that takes it
//! runs in that trace, and every publish the handler makes (its reply, its
//! stream chunks, the requests it sends on) carries the same trace id with a
//! span id of its own. The layers do it, following OpenTelemetry's messaging
//! semantic conventions; nothing has to be passed by hand:
//!
//! - **Inbound**, [`CorrelationSpan`](crate::CorrelationSpan) reads the
//!   message's `traceparent` (and `tracestate`). When it is present and valid
//!   (`00-<32 hex>-<16 hex>-<2 hex>`, lowercase, neither id all zeros) the
//!   message continues that trace; when it is absent (every MQTT 3.1.1
//!   message) or invalid, the message starts a new trace with random ids: an
//!   invalid header is ignored, never a failure. Either way the message's
//!   context is [`current`] for the handler's future, and recorded on the
//!   `mqtt.message` span as `trace_id`, `span_id` and `parent_span_id` (the
//!   remote parent). It is deliberately not put in the request's extensions:
//!   the inbound stack keeps its requests free of an extension map, which
//!   every retry would copy (see the README's figures), and the task-local
//!   reaches everything the handler's future runs.
//! - **Outbound**, [`Correlate`](crate::outbound::Correlate) gives every
//!   publish a context of its own: the [`current`] one's [`child`] (same
//!   trace, flags and `tracestate`, a new span id), set as the publish's
//!   `traceparent` and `tracestate` user properties and recorded on its
//!   `mqtt.publish` span. A publish made outside any handled message starts a
//!   new trace, so every publish can be followed from where it starts,
//!   heartbeats included. A publish whose request already has a
//!   `traceparent` keeps it, and its `tracestate`, untouched.
//!
//! MQTT 3.1.1 has no user properties: the context is still made and logged,
//! but it does not travel. A reply to a 3.1.1 message therefore starts the
//! trace that its own receivers continue.
//!
//! Like [`correlation::current`](tower_mqtt_core::correlation::current), the
//! context is task-local: a task spawned by a handler does not inherit it.
//! Hand it over with [`scope`]:
//!
//! ```
//! use tower_mqtt::layers::trace_context::{self, TraceContext};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let parent = TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
//! assert_eq!(trace_context::current(), None);
//!
//! trace_context::scope(parent.clone(), async move {
//!     // What a publish made here carries: the same trace, a span of its own.
//!     let publish = trace_context::current().unwrap().child();
//!     assert_eq!(publish.trace_id(), parent.trace_id());
//!     assert_ne!(publish.span_id(), parent.span_id());
//!     assert!(publish.traceparent().starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
//!
//!     // A spawned task takes the context along explicitly.
//!     let context = trace_context::current().unwrap();
//!     tokio::spawn(trace_context::scope(context, async {
//!         assert!(trace_context::current().is_some());
//!     }))
//!     .await
//!     .unwrap();
//! })
//! .await;
//! # }
//! ```
//!
//! # OpenTelemetry
//!
//! With the cargo feature `opentelemetry` (tower-mqtt's feature of the same
//! name turns it on), the context is bridged to OpenTelemetry through
//! `tracing-opentelemetry`, when its layer is installed:
//!
//! - the `mqtt.message` span's OpenTelemetry parent is the message's remote
//!   context (or none: a message without one is the root of a new trace, not
//!   a child of whatever span the runtime runs in), and the message's
//!   [`TraceContext`] takes that span's ids, so logs and exported spans agree;
//! - a publish's context is the OpenTelemetry context of its `mqtt.publish`
//!   span, a child of the active OpenTelemetry span, so the span id a
//!   receiver sees as its parent is a span that is exported.
//!
//! With the feature, `TraceContext::from_span_context` and
//! `TraceContext::to_span_context` convert between the two. Without the layer installed, or without the
//! feature, the ids are this module's own.
//!
//! [`child`]: TraceContext::child

use std::{
    fmt,
    future::Future,
    num::{NonZeroU128, NonZeroU64},
    sync::Arc,
};

use tower_mqtt_core::Properties;
use tracing::{field, Span};

#[cfg(feature = "opentelemetry")]
mod otel;
/// Without the bridge, the ids are always this module's own.
#[cfg(not(feature = "opentelemetry"))]
mod otel {
    use super::{Span, TraceContext};

    pub(super) fn for_message(_: &Span, _: Option<&TraceContext>) -> Option<TraceContext> {
        None
    }

    pub(super) fn for_publish(_: &Span, _: Option<&TraceContext>) -> Option<TraceContext> {
        None
    }
}
#[cfg(test)]
mod tests;

/// The name of the user property that carries the trace context:
/// `traceparent`, as the W3C header.
pub const TRACEPARENT: &str = "traceparent";

/// The name of the user property that carries vendor-specific trace data:
/// `tracestate`, as the W3C header.
pub const TRACESTATE: &str = "tracestate";

/// The flag of a context whose trace may have been recorded (`01`).
pub const SAMPLED: u8 = 0x01;

/// A trace id: 16 bytes, never all zeros, shown as 32 lowercase hex digits.
///
/// ```
/// use tower_mqtt::layers::trace_context::TraceId;
///
/// let id = TraceId::new(0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736).unwrap();
/// assert_eq!(id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
/// assert_eq!(TraceId::new(0), None);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TraceId(NonZeroU128);

impl TraceId {
    /// The id `id`, or `None` for zero, which W3C reserves for "no trace".
    pub const fn new(id: u128) -> Option<Self> {
        match NonZeroU128::new(id) {
            Some(id) => Some(Self(id)),
            None => None,
        }
    }

    /// A random id.
    ///
    /// ```
    /// use tower_mqtt::layers::trace_context::TraceId;
    ///
    /// assert_ne!(TraceId::random(), TraceId::random());
    /// ```
    pub fn random() -> Self {
        // The full range: a bounded one costs a 128-bit division. Zero, one
        // chance in 2^128, becomes one.
        Self(NonZeroU128::new(fastrand::u128(..)).unwrap_or(NonZeroU128::MIN))
    }

    /// The id as a number.
    ///
    /// ```
    /// use tower_mqtt::layers::trace_context::TraceId;
    ///
    /// assert_eq!(TraceId::new(7).unwrap().get(), 7);
    /// ```
    pub const fn get(self) -> u128 {
        self.0.get()
    }
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut hex = [0; 32];
        write_hex(&mut hex, self.get());
        f.write_str(ascii(&hex))
    }
}

impl fmt::Debug for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A span id: 8 bytes, never all zeros, shown as 16 lowercase hex digits.
///
/// ```
/// use tower_mqtt::layers::trace_context::SpanId;
///
/// let id = SpanId::new(0x00f0_67aa_0ba9_02b7).unwrap();
/// assert_eq!(id.to_string(), "00f067aa0ba902b7");
/// assert_eq!(SpanId::new(0), None);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpanId(NonZeroU64);

impl SpanId {
    /// The id `id`, or `None` for zero, which W3C reserves for "no span".
    pub const fn new(id: u64) -> Option<Self> {
        match NonZeroU64::new(id) {
            Some(id) => Some(Self(id)),
            None => None,
        }
    }

    /// A random id.
    ///
    /// ```
    /// use tower_mqtt::layers::trace_context::SpanId;
    ///
    /// assert_ne!(SpanId::random(), SpanId::random());
    /// ```
    pub fn random() -> Self {
        Self(NonZeroU64::new(fastrand::u64(..)).unwrap_or(NonZeroU64::MIN))
    }

    /// The id as a number.
    ///
    /// ```
    /// use tower_mqtt::layers::trace_context::SpanId;
    ///
    /// assert_eq!(SpanId::new(7).unwrap().get(), 7);
    /// ```
    pub const fn get(self) -> u64 {
        self.0.get()
    }
}

impl fmt::Display for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut hex = [0; 16];
        write_hex(&mut hex, u128::from(self.get()));
        f.write_str(ascii(&hex))
    }
}

impl fmt::Debug for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A W3C trace context: the trace, the span that is its current position,
/// the trace flags and the vendors' `tracestate`; see the
/// [module docs](self).
///
/// Cheap to clone (the `tracestate` is shared). Displayed as its
/// `traceparent`.
///
/// ```
/// use tower_mqtt::layers::trace_context::TraceContext;
///
/// let ctx = TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
///     .unwrap()
///     .with_tracestate("congo=t61rcWkgMzE");
/// assert_eq!(ctx.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
/// assert_eq!(ctx.span_id().to_string(), "00f067aa0ba902b7");
/// assert_eq!(ctx.flags(), 0x01);
/// assert!(ctx.is_sampled());
/// assert_eq!(ctx.tracestate(), Some("congo=t61rcWkgMzE"));
/// assert_eq!(ctx.to_string(), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct TraceContext {
    trace_id: TraceId,
    span_id: SpanId,
    flags: u8,
    tracestate: Option<Arc<str>>,
}

impl TraceContext {
    /// The context of `span_id` in trace `trace_id`, with `flags` and no
    /// `tracestate`.
    ///
    /// ```
    /// use tower_mqtt::layers::trace_context::{SpanId, TraceContext, TraceId, SAMPLED};
    ///
    /// let ctx = TraceContext::new(TraceId::new(1).unwrap(), SpanId::new(2).unwrap(), SAMPLED);
    /// assert_eq!(ctx.traceparent(), "00-00000000000000000000000000000001-0000000000000002-01");
    /// ```
    pub const fn new(trace_id: TraceId, span_id: SpanId, flags: u8) -> Self {
        Self {
            trace_id,
            span_id,
            flags,
            tracestate: None,
        }
    }

    /// The start of a new trace: random trace and span ids, marked
    /// [sampled](Self::is_sampled).
    ///
    /// Sampled, because the flag tells the services downstream that the
    /// trace may be recorded: with OpenTelemetry's usual parent-based
    /// sampling, an unsampled root would keep every service after it from
    /// recording the trace at all.
    ///
    /// ```
    /// use tower_mqtt::layers::trace_context::TraceContext;
    ///
    /// let a = TraceContext::new_root();
    /// let b = TraceContext::new_root();
    /// assert_ne!(a.trace_id(), b.trace_id());
    /// assert!(a.is_sampled());
    /// assert_eq!(a.tracestate(), None);
    /// ```
    pub fn new_root() -> Self {
        Self::new(TraceId::random(), SpanId::random(), SAMPLED)
    }

    /// Parses a W3C `traceparent`: `00-<trace id>-<span id>-<flags>` in
    /// lowercase hex, `None` if it is not one.
    ///
    /// A trace or span id of all zeros, version `ff`, uppercase hex and a
    /// version `00` header with anything after the flags are invalid. A later
    /// version is read as far as version `00` goes, as W3C asks (and is sent
    /// on as version `00`). Surrounding whitespace is ignored.
    ///
    /// ```
    /// use tower_mqtt::layers::trace_context::TraceContext;
    ///
    /// let ok = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    /// assert!(TraceContext::parse(ok).is_some());
    /// assert!(TraceContext::parse("00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_none());
    /// assert!(TraceContext::parse("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01").is_none());
    /// assert!(TraceContext::parse("not a traceparent").is_none());
    /// ```
    pub fn parse(traceparent: &str) -> Option<Self> {
        let b = traceparent.trim().as_bytes();
        if b.len() < 55 || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
            return None;
        }
        let version = hex(&b[..2])?;
        let rest_ok = match version {
            0xff => false,
            0 => b.len() == 55,
            _ => b.len() == 55 || b[55] == b'-',
        };
        if !rest_ok {
            return None;
        }
        let trace_id = TraceId::new(hex(&b[3..35])?)?;
        let span_id = SpanId::new(u64::try_from(hex(&b[36..52])?).ok()?)?;
        let flags = u8::try_from(hex(&b[53..55])?).ok()?;
        Some(Self::new(trace_id, span_id, flags))
    }

    /// The context a message's user properties carry: its `traceparent`,
    /// with its `tracestate` if that is valid. `None` when there is no
    /// `traceparent`, more than one, or an invalid one.
    ///
    /// Several `tracestate` properties are joined in order, as several HTTP
    /// headers are.
    ///
    /// ```
    /// use tower_mqtt::{layers::trace_context::TraceContext, Properties};
    ///
    /// let mut props = Properties::new();
    /// assert_eq!(TraceContext::from_properties(&props), None);
    /// props.add_user_property("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
    /// props.add_user_property("tracestate", "congo=t61rcWkgMzE");
    /// props.add_user_property("tracestate", "rojo=00f067aa0ba902b7");
    /// let ctx = TraceContext::from_properties(&props).unwrap();
    /// assert_eq!(ctx.tracestate(), Some("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"));
    /// ```
    pub fn from_properties(properties: &Properties) -> Option<Self> {
        let mut traceparents = properties.user_property_values(TRACEPARENT);
        let traceparent = traceparents.next()?;
        if traceparents.next().is_some() {
            return None;
        }
        let ctx = Self::parse(traceparent)?;
        let mut states = properties.user_property_values(TRACESTATE);
        Some(match (states.next(), states.next()) {
            (None, _) => ctx,
            (Some(one), None) => ctx.with_tracestate(one),
            (Some(first), Some(second)) => {
                let mut joined = format!("{first},{second}");
                for more in states {
                    joined.push(',');
                    joined.push_str(more);
                }
                ctx.with_tracestate(joined)
            }
        })
    }

    /// With `tracestate`, if it is a valid W3C `tracestate` (at most 32
    /// `key=value` members, keys of lowercase letters, digits and `_-*/@`,
    /// values of printable ASCII without `,` and `=`); without one if it is
    /// invalid or empty, as W3C allows.
    ///
    /// ```
    /// use tower_mqtt::layers::trace_context::TraceContext;
    ///
    /// let ctx = TraceContext::new_root().with_tracestate(" congo=t61rcWkgMzE , rojo=1 ");
    /// assert_eq!(ctx.tracestate(), Some("congo=t61rcWkgMzE,rojo=1"));
    /// assert_eq!(ctx.with_tracestate("no equals sign").tracestate(), None);
    /// ```
    #[must_use]
    pub fn with_tracestate(mut self, tracestate: impl AsRef<str>) -> Self {
        self.tracestate = valid_tracestate(tracestate.as_ref()).map(Into::into);
        self
    }

    /// The context of a new span in the same trace: a new random span id,
    /// the same trace id, flags and `tracestate`. What a publish made while
    /// handling a message carries.
    ///
    /// ```
    /// use tower_mqtt::layers::trace_context::TraceContext;
    ///
    /// let parent = TraceContext::new_root().with_tracestate("k=v");
    /// let child = parent.child();
    /// assert_eq!(child.trace_id(), parent.trace_id());
    /// assert_ne!(child.span_id(), parent.span_id());
    /// assert_eq!(child.flags(), parent.flags());
    /// assert_eq!(child.tracestate(), Some("k=v"));
    /// ```
    #[must_use]
    pub fn child(&self) -> Self {
        Self {
            span_id: SpanId::random(),
            ..self.clone()
        }
    }

    /// The trace.
    ///
    /// ```
    /// let ctx = tower_mqtt::layers::trace_context::TraceContext::new_root();
    /// assert_eq!(ctx.trace_id().to_string().len(), 32);
    /// ```
    pub const fn trace_id(&self) -> TraceId {
        self.trace_id
    }

    /// The span: where in the trace this context is.
    ///
    /// ```
    /// let ctx = tower_mqtt::layers::trace_context::TraceContext::new_root();
    /// assert_eq!(ctx.span_id().to_string().len(), 16);
    /// ```
    pub const fn span_id(&self) -> SpanId {
        self.span_id
    }

    /// The trace flags, as received (bit 0: [`SAMPLED`]).
    ///
    /// ```
    /// use tower_mqtt::layers::trace_context::TraceContext;
    ///
    /// let ctx = TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-03").unwrap();
    /// assert_eq!(ctx.flags(), 0x03);
    /// ```
    pub const fn flags(&self) -> u8 {
        self.flags
    }

    /// Whether the trace may have been recorded upstream (flag `01`).
    ///
    /// ```
    /// use tower_mqtt::layers::trace_context::TraceContext;
    ///
    /// let ctx = TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").unwrap();
    /// assert!(!ctx.is_sampled());
    /// ```
    pub const fn is_sampled(&self) -> bool {
        self.flags & SAMPLED != 0
    }

    /// The vendors' `tracestate`, if any.
    ///
    /// ```
    /// let ctx = tower_mqtt::layers::trace_context::TraceContext::new_root();
    /// assert_eq!(ctx.tracestate(), None);
    /// assert_eq!(ctx.with_tracestate("k=v").tracestate(), Some("k=v"));
    /// ```
    pub fn tracestate(&self) -> Option<&str> {
        self.tracestate.as_deref()
    }

    /// The W3C `traceparent`: `00-<trace id>-<span id>-<flags>`.
    ///
    /// ```
    /// use tower_mqtt::layers::trace_context::TraceContext;
    ///
    /// let header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    /// assert_eq!(TraceContext::parse(header).unwrap().traceparent(), header);
    /// ```
    pub fn traceparent(&self) -> String {
        ascii(&self.encode()).to_owned()
    }

    /// The `traceparent`'s bytes, written by hand: made with `fmt`'s
    /// `{:032x}`, setting a publish's trace context cost about 2,400
    /// instructions, a third of the whole outbound stack's 6,700 (callgrind,
    /// 20,000 publishes into a sink that drops them); written here, about 800,
    /// of which this is under 300.
    fn encode(&self) -> [u8; 55] {
        let mut out = *b"00-00000000000000000000000000000000-0000000000000000-00";
        write_hex(&mut out[3..35], self.trace_id.get());
        write_hex(&mut out[36..52], u128::from(self.span_id.get()));
        write_hex(&mut out[53..55], u128::from(self.flags));
        out
    }

    /// Sets `properties`' `traceparent` user property to this context, and
    /// its `tracestate` to this context's, or removes it when there is none,
    /// so the two never disagree.
    ///
    /// ```
    /// use tower_mqtt::{layers::trace_context::TraceContext, Properties};
    ///
    /// let ctx = TraceContext::new_root().with_tracestate("k=v");
    /// let mut props = Properties::new();
    /// ctx.inject(&mut props);
    /// assert_eq!(props.user_property("traceparent"), Some(ctx.traceparent().as_str()));
    /// assert_eq!(props.user_property("tracestate"), Some("k=v"));
    /// assert_eq!(TraceContext::from_properties(&props), Some(ctx));
    /// ```
    pub fn inject(&self, properties: &mut Properties) {
        properties.set_user_property(TRACEPARENT, self.traceparent());
        match self.tracestate() {
            Some(state) => {
                properties.set_user_property(TRACESTATE, state);
            }
            None => properties
                .user_properties
                .retain(|(key, _)| key != TRACESTATE),
        }
    }
}

impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(ascii(&self.encode()))
    }
}

impl fmt::Debug for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TraceContext")
            .field("trace_id", &self.trace_id)
            .field("span_id", &self.span_id)
            .field("flags", &format_args!("{:02x}", self.flags))
            .field("tracestate", &self.tracestate)
            .finish()
    }
}

/// Writes the low `out.len()` hex digits of `n` into `out`, lowercase.
fn write_hex(out: &mut [u8], mut n: u128) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for digit in out.iter_mut().rev() {
        *digit = DIGITS[(n & 0xf) as usize];
        n >>= 4;
    }
}

/// Bytes this module wrote, all ASCII, as a `str`.
fn ascii(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).unwrap_or_default()
}

/// Lowercase hex digits as a number; at most 32 of them.
fn hex(digits: &[u8]) -> Option<u128> {
    digits.iter().try_fold(0u128, |n, &d| {
        let v = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            _ => return None,
        };
        Some(n << 4 | u128::from(v))
    })
}

/// `tracestate` with its members trimmed and empty ones dropped, or `None`
/// if it is empty or not valid.
fn valid_tracestate(tracestate: &str) -> Option<String> {
    const MAX_MEMBERS: usize = 32;
    let key_ok = |key: &str| {
        (1..=256).contains(&key.len())
            && key.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && key
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"_-*/@".contains(&c))
            && key.bytes().filter(|&c| c == b'@').count() <= 1
    };
    let value_ok = |value: &str| {
        (1..=256).contains(&value.len())
            && value
                .bytes()
                .all(|c| (0x20..=0x7e).contains(&c) && c != b',' && c != b'=')
            && !value.ends_with(' ')
    };
    let mut out = String::with_capacity(tracestate.len());
    let mut members = 0;
    for member in tracestate.split(',').map(|m| m.trim_matches([' ', '\t'])) {
        if member.is_empty() {
            continue;
        }
        let (key, value) = member.split_once('=')?;
        members += 1;
        if members > MAX_MEMBERS || !key_ok(key) || !value_ok(value) {
            return None;
        }
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(member);
    }
    (!out.is_empty()).then_some(out)
}

tokio::task_local! {
    static CURRENT: TraceContext;
}

/// Runs `future` with `context` as the [`current`] trace context.
///
/// The context is visible to everything the future polls on this task; a
/// task spawned from it does not inherit it (pass it along, as the
/// [module docs](self) show).
///
/// ```
/// use tower_mqtt::layers::trace_context::{self, TraceContext};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let ctx = TraceContext::new_root();
/// let seen = trace_context::scope(ctx.clone(), async { trace_context::current() }).await;
/// assert_eq!(seen, Some(ctx));
/// # }
/// ```
pub fn scope<F: Future>(context: TraceContext, future: F) -> Scoped<F> {
    CURRENT.scope(context, future)
}

/// The future [`scope`] returns: nameable, so middleware can hold it without
/// boxing.
pub type Scoped<F> = tokio::task::futures::TaskLocalFuture<TraceContext, F>;

/// The trace context of the message being handled on this task, if any; a
/// publish made here carries its [`child`](TraceContext::child).
///
/// ```
/// assert_eq!(tower_mqtt::layers::trace_context::current(), None);
/// ```
pub fn current() -> Option<TraceContext> {
    CURRENT.try_with(Clone::clone).ok()
}

/// The context of a message whose span is `span` and whose properties
/// carried `remote` (if valid), with its ids recorded on the span.
pub(crate) fn for_message(span: &Span, remote: Option<&TraceContext>) -> TraceContext {
    let own = otel::for_message(span, remote)
        .unwrap_or_else(|| remote.map_or_else(TraceContext::new_root, TraceContext::child));
    record(span, &own);
    if let (Some(remote), false) = (remote, span.is_disabled()) {
        span.record("parent_span_id", field::display(remote.span_id()));
    }
    own
}

/// The context of a publish whose span is `span`, made on this task now,
/// with its ids recorded on the span.
pub(crate) fn for_publish(span: &Span) -> TraceContext {
    let current = current();
    let own = otel::for_publish(span, current.as_ref()).unwrap_or_else(|| {
        current
            .as_ref()
            .map_or_else(TraceContext::new_root, TraceContext::child)
    });
    record(span, &own);
    own
}

/// Records the ids of `context` on `span`'s `trace_id` and `span_id` fields.
pub(crate) fn record(span: &Span, context: &TraceContext) {
    // A span nobody listens to would still look its fields up by name.
    if span.is_disabled() {
        return;
    }
    span.record("trace_id", field::display(context.trace_id()));
    span.record("span_id", field::display(context.span_id()));
}
