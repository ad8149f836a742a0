//! One tracing span per message, its correlation id and its trace context:
//! [`CorrelationSpan`].
//!
//! For every message, [`CorrelationSpan`]:
//!
//! - opens a span, `mqtt.message` by default, with the fields `correlation_id`
//!   (the envelope id), `event_type`, `topic`, `qos`, `source`, `retain`, `dup`
//!   and `raw` (whether the payload was a plain object wrapped by
//!   [`Decode`](crate::decode::Decode)), and the attributes of OpenTelemetry's
//!   messaging conventions for a consumer: `messaging.system = "mqtt"`,
//!   `messaging.destination.name` (the topic), `messaging.operation.name =
//!   "process"`, `messaging.operation.type = "process"` and `otel.kind =
//!   "consumer"`. The span is entered while the inner service's `call` runs
//!   and on every poll of its future, so everything the inner layers and the
//!   handler log carries these fields;
//! - continues the message's W3C trace: the `traceparent` and `tracestate`
//!   user properties when they are present and valid, a new trace when not
//!   (see [`trace_context`]). The span's `trace_id`,
//!   `span_id` and `parent_span_id` fields get the message's ids (a custom
//!   [`MakeSpan`] gets them too if it declares those fields, as
//!   `tracing::field::Empty`), and [`trace_context::current`] gives the
//!   [`TraceContext`] in the handler's future, where every publish takes it
//!   up;
//! - sets the id as the request's
//!   [`correlation_id`](tower_mqtt_core::Request::correlation_id), for code
//!   that runs in the inner `call` or hands the id to a spawned task (a
//!   handler takes it as a [`CorrelationId`] argument);
//! - runs the inner future inside [`correlation::scope`] (and
//!   [`trace_context::scope`]), so
//!   [`correlation::current`] gives the id anywhere in the handler's future, and
//!   a publish made while handling the message can correlate its reply without
//!   the id being passed along. A task spawned by the handler does not inherit
//!   it (pass the id). Inner services' `call` methods run before the
//!   future and outside the scope: they read the request's id.
//!
//! Put it outside error isolation, so the errors isolation logs are inside the
//! span.
//!
//! ```
//! use tower::{service_fn, BoxError, Layer, ServiceExt};
//! use tower_mqtt::{correlation::{self, CorrelationId}, Envelope, Outcome, Request};
//! use tower_mqtt::layers::correlation_span::CorrelationSpanLayer;
//! use tower_mqtt::layers::trace_context;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let handler = service_fn(|req: Request<Envelope>| async move {
//!     let id = req.correlation_id().unwrap();
//!     assert_eq!(id.as_str(), "3f1c9b1e8a2d4c6f9e0b7a5d4c3b2a19");
//!     assert_eq!(correlation::current().as_ref(), Some(id));
//!     // The sender's trace, continued.
//!     let trace = trace_context::current().unwrap();
//!     assert_eq!(trace.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
//!     tracing::info!("handling"); // logged inside the `mqtt.message` span
//!     Ok::<_, BoxError>(Outcome::Handled)
//! });
//! let svc = CorrelationSpanLayer::new().layer(handler);
//!
//! let env = Envelope::new("llm.request", serde_json::json!({"text": "hi"}))
//!     .unwrap()
//!     .with_id("3f1c9b1e8a2d4c6f9e0b7a5d4c3b2a19");
//! let mut req = Request::builder("llm/request").body(env).unwrap();
//! req.properties_mut()
//!     .add_user_property("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
//! assert!(matches!(svc.oneshot(req).await.unwrap(), Outcome::Handled));
//! # }
//! ```

use std::{
    fmt,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use pin_project_lite::pin_project;
use tower::{Layer, Service};
use tower_mqtt_core::{
    correlation::{self, CorrelationId},
    Envelope, Request,
};
use tracing::{field::Empty, Level, Span};

use crate::{
    decode::RawPayload,
    trace_context::{self, TraceContext, TRACEPARENT},
};

/// Makes the span of a message; implemented for closures
/// `FnMut(&Request<Envelope>) -> Span`.
///
/// ```
/// use tower_mqtt::{Envelope, Request};
/// use tower_mqtt::layers::correlation_span::CorrelationSpanLayer;
///
/// let layer = CorrelationSpanLayer::new().make_span(|req: &Request<Envelope>| {
///     tracing::debug_span!("job", id = %req.body().id())
/// });
/// ```
pub trait MakeSpan {
    /// The span for `req`.
    fn make_span(&mut self, req: &Request<Envelope>) -> Span;
}

impl<F> MakeSpan for F
where
    F: FnMut(&Request<Envelope>) -> Span,
{
    fn make_span(&mut self, req: &Request<Envelope>) -> Span {
        self(req)
    }
}

/// The default [`MakeSpan`]: a span named `mqtt.message` with the fields
/// listed in the [module docs](self), at level `INFO` unless changed.
///
/// ```
/// use tracing::Level;
/// use tower_mqtt::layers::correlation_span::{CorrelationSpanLayer, DefaultMakeSpan};
///
/// let layer = CorrelationSpanLayer::new().make_span(DefaultMakeSpan::new().level(Level::DEBUG));
/// ```
#[derive(Clone, Copy, Debug)]
#[must_use]
pub struct DefaultMakeSpan {
    level: Level,
}

impl DefaultMakeSpan {
    /// At level `INFO`, so the fields accompany every log at `INFO` and above.
    pub const fn new() -> Self {
        Self { level: Level::INFO }
    }

    /// Sets the level of the span.
    pub const fn level(mut self, level: Level) -> Self {
        self.level = level;
        self
    }
}

impl Default for DefaultMakeSpan {
    fn default() -> Self {
        Self::new()
    }
}

impl MakeSpan for DefaultMakeSpan {
    fn make_span(&mut self, req: &Request<Envelope>) -> Span {
        let env = req.body();
        let raw = req.extensions().get::<RawPayload>().is_some();
        // `span!` needs its level as a constant.
        macro_rules! make_span {
            ($level:expr) => {
                tracing::span!(
                    $level,
                    "mqtt.message",
                    correlation_id = %env.id(),
                    event_type = %env.event_type(),
                    topic = %req.topic(),
                    qos = u8::from(req.qos()),
                    source = %env.source(),
                    retain = req.retain(),
                    dup = req.dup(),
                    raw,
                    messaging.system = "mqtt",
                    messaging.destination.name = %req.topic(),
                    messaging.operation.name = "process",
                    messaging.operation.type = "process",
                    otel.kind = "consumer",
                    trace_id = Empty,
                    span_id = Empty,
                    parent_span_id = Empty,
                )
            };
        }
        match self.level {
            Level::ERROR => make_span!(Level::ERROR),
            Level::WARN => make_span!(Level::WARN),
            Level::INFO => make_span!(Level::INFO),
            Level::DEBUG => make_span!(Level::DEBUG),
            Level::TRACE => make_span!(Level::TRACE),
        }
    }
}

/// Makes [`CorrelationSpan`] services; see the [module docs](self).
///
/// ```
/// use tower::ServiceBuilder;
/// use tower_mqtt::Router;
/// use tower_mqtt::layers::correlation_span::CorrelationSpanLayer;
///
/// let svc = ServiceBuilder::new().layer(CorrelationSpanLayer::new()).service(Router::<()>::new());
/// ```
#[derive(Clone, Copy, Debug, Default)]
#[must_use]
pub struct CorrelationSpanLayer<M = DefaultMakeSpan> {
    make_span: M,
}

impl CorrelationSpanLayer {
    /// With [`DefaultMakeSpan`].
    pub const fn new() -> Self {
        Self {
            make_span: DefaultMakeSpan::new(),
        }
    }
}

impl<M> CorrelationSpanLayer<M> {
    /// Makes spans with `make_span` instead.
    pub fn make_span<M2>(self, make_span: M2) -> CorrelationSpanLayer<M2> {
        CorrelationSpanLayer { make_span }
    }
}

impl<S, M: Clone> Layer<S> for CorrelationSpanLayer<M> {
    type Service = CorrelationSpan<S, M>;

    fn layer(&self, inner: S) -> Self::Service {
        CorrelationSpan {
            inner,
            make_span: self.make_span.clone(),
        }
    }
}

/// Runs each message in its own span, correlation scope and trace context;
/// see the [module docs](self).
///
/// ```
/// use tower_mqtt::Router;
/// use tower_mqtt::layers::CorrelationSpan;
///
/// let svc = CorrelationSpan::new(Router::<()>::new());
/// let router: &Router = svc.get_ref();
/// ```
#[derive(Clone, Copy, Debug)]
#[must_use]
pub struct CorrelationSpan<S, M = DefaultMakeSpan> {
    inner: S,
    make_span: M,
}

impl<S> CorrelationSpan<S> {
    /// Wraps `inner`, with [`DefaultMakeSpan`].
    pub const fn new(inner: S) -> Self {
        Self {
            inner,
            make_span: DefaultMakeSpan::new(),
        }
    }

    /// A [`CorrelationSpanLayer`] with [`DefaultMakeSpan`].
    pub const fn layer() -> CorrelationSpanLayer {
        CorrelationSpanLayer::new()
    }
}

impl<S, M> CorrelationSpan<S, M> {
    /// Makes spans with `make_span` instead.
    pub fn make_span<M2>(self, make_span: M2) -> CorrelationSpan<S, M2> {
        CorrelationSpan {
            inner: self.inner,
            make_span,
        }
    }

    tower_mqtt_core::define_inner_service_accessors!();
}

impl<S, M> Service<Request<Envelope>> for CorrelationSpan<S, M>
where
    S: Service<Request<Envelope>>,
    S::Future: Send + 'static,
    M: MakeSpan,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Envelope>) -> Self::Future {
        let span = self.make_span.make_span(&req);
        let id = CorrelationId::of(req.body());
        req.set_correlation_id(id.clone());
        let remote = TraceContext::from_properties(req.properties());
        let trace = trace_context::for_message(&span, remote.as_ref());
        let future = {
            let _entered = span.enter();
            if remote.is_none() {
                if let Some(invalid) = req.properties().user_property(TRACEPARENT) {
                    tracing::debug!(
                        traceparent = invalid,
                        "invalid traceparent ignored: the message starts a new trace"
                    );
                }
            }
            self.inner.call(req)
        };
        ResponseFuture {
            inner: correlation::scope(id, trace_context::scope(trace, future)),
            span,
        }
    }
}

pin_project! {
    /// The future of [`CorrelationSpan`]: the inner future in the correlation
    /// scope and trace context, polled inside the span.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: correlation::Scoped<trace_context::Scoped<F>>,
        span: Span,
    }
}

impl<F: Future> Future for ResponseFuture<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let _entered = this.span.enter();
        this.inner.poll(cx)
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("span", &self.span)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::capture;
    use std::{convert::Infallible, time::Duration};
    use tower::{ServiceBuilder, ServiceExt};
    use tower_mqtt_core::{Outcome, QoS};
    use tower_test::mock;

    const ID: &str = "3f1c9b1e8a2d4c6f9e0b7a5d4c3b2a19";

    fn msg() -> Request<Envelope> {
        let env = Envelope::new("llm.request", serde_json::json!({"text": "hi"}))
            .unwrap()
            .with_id(ID)
            .with_source("llm-worker");
        Request::builder("llm/request")
            .qos(QoS::AtMostOnce)
            .body(env)
            .unwrap()
    }

    #[tokio::test]
    async fn the_handler_sees_the_id_on_the_request_and_in_scope() {
        let svc = CorrelationSpan::new(tower::service_fn(|req: Request<Envelope>| async move {
            tokio::task::yield_now().await;
            let from_request = req.correlation_id().cloned();
            Ok::<_, Infallible>((from_request, correlation::current()))
        }));
        let (from_request, current) = svc.oneshot(msg()).await.unwrap();
        assert_eq!(from_request.unwrap().as_str(), ID);
        assert_eq!(current.unwrap().as_str(), ID);
        assert_eq!(
            correlation::current(),
            None,
            "the scope ends with the message"
        );
    }

    #[tokio::test]
    async fn logs_of_call_and_of_every_poll_are_inside_the_span() {
        #[derive(Clone)]
        struct Logs;
        impl Service<Request<Envelope>> for Logs {
            type Response = Outcome;
            type Error = Infallible;
            type Future = Pin<Box<dyn Future<Output = Result<Outcome, Infallible>> + Send>>;
            fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
                Poll::Ready(Ok(()))
            }
            fn call(&mut self, _: Request<Envelope>) -> Self::Future {
                tracing::info!("in call");
                Box::pin(async {
                    tracing::info!("first poll");
                    tokio::task::yield_now().await;
                    tracing::info!("second poll");
                    Ok(Outcome::Handled)
                })
            }
        }
        let (logs, _guard) = capture();
        CorrelationSpanLayer::new()
            .layer(Logs)
            .oneshot(msg())
            .await
            .unwrap();
        tracing::info!("after");
        let events = logs.events();
        assert_eq!(events.len(), 4);
        for event in &events[..3] {
            let span = event.span("mqtt.message").expect("inside the span");
            assert_eq!(span["correlation_id"], ID);
            assert_eq!(span["event_type"], "llm.request");
            assert_eq!(span["topic"], "llm/request");
            assert_eq!(span["qos"], "0");
            assert_eq!(span["source"], "llm-worker");
            assert_eq!(span["raw"], "false");
        }
        assert!(events[3].span("mqtt.message").is_none());
    }

    #[tokio::test]
    async fn raw_payloads_are_flagged_in_the_span() {
        let (logs, _guard) = capture();
        let mut req = msg();
        req.extensions_mut()
            .insert(RawPayload::new(bytes::Bytes::from_static(b"{}")));
        let svc = CorrelationSpan::new(tower::service_fn(|_: Request<Envelope>| async {
            tracing::warn!("handled");
            Ok::<_, Infallible>(())
        }));
        svc.oneshot(req).await.unwrap();
        assert_eq!(
            logs.events()[0].span("mqtt.message").unwrap()["raw"],
            "true"
        );
    }

    #[tokio::test]
    async fn a_custom_span_and_level() {
        let (logs, _guard) = capture();
        let svc = CorrelationSpan::new(tower::service_fn(|_: Request<Envelope>| async {
            tracing::warn!("handled");
            Ok::<_, Infallible>(())
        }))
        .make_span(|req: &Request<Envelope>| tracing::warn_span!("job", id = %req.body().id()));
        svc.oneshot(msg()).await.unwrap();
        assert_eq!(logs.events()[0].span("job").unwrap()["id"], ID);

        let svc = CorrelationSpanLayer::new()
            .make_span(DefaultMakeSpan::new().level(Level::DEBUG))
            .layer(tower::service_fn(|_: Request<Envelope>| async {
                tracing::warn!("handled");
                Ok::<_, Infallible>(())
            }));
        svc.oneshot(msg()).await.unwrap();
        assert_eq!(
            logs.events()[1].span("mqtt.message").unwrap()["topic"],
            "llm/request"
        );
        assert_eq!(
            logs.events()[1].span_level("mqtt.message"),
            Some(Level::DEBUG)
        );
    }

    #[tokio::test]
    async fn errors_pass_through_unchanged() {
        let (mock, mut handle) = mock::pair::<Request<Envelope>, Outcome>();
        let svc = CorrelationSpan::new(mock);
        handle.allow(1);
        let (result, ()) = tokio::join!(svc.oneshot(msg()), async {
            let (req, respond) = handle.next_request().await.unwrap();
            assert_eq!(req.correlation_id().unwrap().as_str(), ID);
            assert!(req.extensions().get::<CorrelationId>().is_none());
            respond.send_error(std::io::Error::other("boom"));
        });
        assert_eq!(result.unwrap_err().to_string(), "boom");
    }

    const TRACEPARENT_01: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn traced(traceparent: &str) -> Request<Envelope> {
        let mut req = msg();
        req.properties_mut()
            .add_user_property(TRACEPARENT, traceparent)
            .add_user_property("tracestate", "congo=t61rcWkgMzE");
        req
    }

    #[tokio::test]
    async fn the_handler_continues_the_remote_trace() {
        let svc = CorrelationSpan::new(tower::service_fn(|req: Request<Envelope>| async move {
            tokio::task::yield_now().await;
            let in_extensions = req.extensions().get::<TraceContext>().cloned();
            Ok::<_, Infallible>((in_extensions, trace_context::current()))
        }));
        let (in_extensions, current) = svc.oneshot(traced(TRACEPARENT_01)).await.unwrap();
        let current = current.unwrap();
        assert_eq!(in_extensions, None, "no extension map per message");
        assert_eq!(
            current.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_ne!(current.span_id().to_string(), "00f067aa0ba902b7");
        assert_eq!(current.tracestate(), Some("congo=t61rcWkgMzE"));
        assert_eq!(
            trace_context::current(),
            None,
            "the context ends with the message"
        );
    }

    #[tokio::test]
    async fn an_invalid_traceparent_starts_a_new_trace() {
        let svc = CorrelationSpan::new(tower::service_fn(|_: Request<Envelope>| async {
            Ok::<_, Infallible>(trace_context::current())
        }));
        let upper = "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01";
        let current = svc.oneshot(traced(upper)).await.unwrap().unwrap();
        assert_ne!(
            current.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(current.tracestate(), None);
    }

    #[tokio::test]
    async fn a_custom_span_gets_the_trace_fields_it_declares() {
        let (logs, _guard) = capture();
        let svc = CorrelationSpan::new(tower::service_fn(|_: Request<Envelope>| async {
            tracing::warn!("handled");
            Ok::<_, Infallible>(())
        }))
        .make_span(|_: &Request<Envelope>| {
            tracing::warn_span!("job", trace_id = tracing::field::Empty)
        });
        svc.oneshot(traced(TRACEPARENT_01)).await.unwrap();
        assert_eq!(
            logs.events()[0].span("job").unwrap()["trace_id"],
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_scope_reaches_through_other_layers() {
        // CorrelationSpan -> ConcurrencyLimit -> Timeout -> handler.
        let svc = ServiceBuilder::new()
            .layer(CorrelationSpanLayer::new())
            .concurrency_limit(1)
            .timeout(Duration::from_secs(5))
            .service(tower::service_fn(|_: Request<Envelope>| async {
                tokio::time::sleep(Duration::from_secs(1)).await;
                Ok::<_, Infallible>(correlation::current())
            }));
        let current = svc.oneshot(msg()).await.unwrap();
        assert_eq!(current.unwrap().as_str(), ID);
    }
}
