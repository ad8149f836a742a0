//! The bridge to OpenTelemetry, through `tracing-opentelemetry`: conversions
//! to and from [`SpanContext`], and the parents of the layers' spans.

use opentelemetry::{
    trace::{SpanContext, TraceContextExt, TraceFlags, TraceState},
    Context,
};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::{SpanId, TraceContext, TraceId};

impl TraceContext {
    /// The context of an OpenTelemetry span, `None` if it is not valid. Its
    /// `tracestate` is the span context's, if any.
    ///
    /// Needs the cargo feature `opentelemetry`.
    ///
    /// ```
    /// use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
    /// use tower_mqtt::layers::trace_context::TraceContext;
    ///
    /// let otel = SpanContext::new(
    ///     TraceId::from(0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736),
    ///     SpanId::from(0x00f0_67aa_0ba9_02b7),
    ///     TraceFlags::SAMPLED,
    ///     true,
    ///     TraceState::NONE,
    /// );
    /// let ctx = TraceContext::from_span_context(&otel).unwrap();
    /// assert_eq!(ctx.traceparent(), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
    /// assert_eq!(TraceContext::from_span_context(&SpanContext::empty_context()), None);
    /// ```
    pub fn from_span_context(span_context: &SpanContext) -> Option<Self> {
        let trace_id = TraceId::new(u128::from_be_bytes(span_context.trace_id().to_bytes()))?;
        let span_id = SpanId::new(u64::from_be_bytes(span_context.span_id().to_bytes()))?;
        let ctx = Self::new(trace_id, span_id, span_context.trace_flags().to_u8());
        let state = span_context.trace_state().header();
        Some(if state.is_empty() {
            ctx
        } else {
            ctx.with_tracestate(state)
        })
    }

    /// This context as a remote OpenTelemetry span context: the parent of a
    /// span that continues a trace received from another service.
    ///
    /// Needs the cargo feature `opentelemetry`.
    ///
    /// ```
    /// use tower_mqtt::layers::trace_context::TraceContext;
    ///
    /// let ctx = TraceContext::new_root().with_tracestate("k=v");
    /// let otel = ctx.to_span_context();
    /// assert!(otel.is_remote());
    /// assert_eq!(otel.trace_state().get("k"), Some("v"));
    /// assert_eq!(TraceContext::from_span_context(&otel), Some(ctx));
    /// ```
    pub fn to_span_context(&self) -> SpanContext {
        let state = self
            .tracestate()
            .and_then(|state| state.parse().ok())
            .unwrap_or(TraceState::NONE);
        SpanContext::new(
            opentelemetry::trace::TraceId::from_bytes(self.trace_id().get().to_be_bytes()),
            opentelemetry::trace::SpanId::from_bytes(self.span_id().get().to_be_bytes()),
            TraceFlags::new(self.flags()),
            true,
            state,
        )
    }
}

/// The OpenTelemetry context of `span`, if the `tracing-opentelemetry` layer
/// made one.
fn context_of(span: &Span) -> Option<TraceContext> {
    TraceContext::from_span_context(span.context().span().span_context())
}

/// Makes the message's span a child of `remote`, or a root without it, and
/// takes the span's own ids; keeps the `tracestate` as it was received.
pub(super) fn for_message(span: &Span, remote: Option<&TraceContext>) -> Option<TraceContext> {
    let parent = remote.map_or_else(Context::new, |remote| {
        Context::new().with_remote_span_context(remote.to_span_context())
    });
    // An error means no OpenTelemetry layer, or a disabled span: the ids are
    // then this crate's own.
    span.set_parent(parent).ok()?;
    let own = context_of(span)?;
    Some(match remote.and_then(TraceContext::tracestate) {
        Some(state) => own.with_tracestate(state),
        None => own,
    })
}

/// The publish span's own context, as a child of the active OpenTelemetry
/// span, or of the message being handled (`current`) when no span is active
/// on this task (a task the handler spawned, with the context handed over).
pub(super) fn for_publish(span: &Span, current: Option<&TraceContext>) -> Option<TraceContext> {
    let outer = context_of(&Span::current());
    if let (None, Some(current)) = (&outer, current) {
        // Ignored error: without the layer there is no OpenTelemetry parent to set.
        let _ = span.set_parent(Context::new().with_remote_span_context(current.to_span_context()));
    }
    let own = context_of(span).or_else(|| outer.as_ref().map(TraceContext::child))?;
    if own.tracestate().is_some() {
        return Some(own);
    }
    Some(match current.filter(|c| c.trace_id() == own.trace_id()) {
        Some(current) => TraceContext {
            tracestate: current.tracestate.clone(),
            ..own
        },
        None => own,
    })
}
