use super::*;
use crate::{
    outbound::Reply,
    stack::{InboundStack, OutboundService, OutboundStack},
    test_util::capture,
};
use bytes::Bytes;
use std::{
    sync::Mutex,
    task::{Context, Poll},
};
use tower::{BoxError, Service, ServiceExt};
use tower_mqtt_core::{Envelope, Outcome, Request, Router};
use tracing::Level;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";
// Flags `03`: sampled, and a flag this crate does not know, kept as it came.
const TRACEPARENT_03: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-03";

#[test]
fn parses_and_formats_a_traceparent() {
    let ctx = TraceContext::parse(TRACEPARENT_03).unwrap();
    assert_eq!(ctx.trace_id().to_string(), TRACE);
    assert_eq!(ctx.span_id().to_string(), PARENT);
    assert_eq!(ctx.flags(), 0x03);
    assert!(ctx.is_sampled());
    assert_eq!(ctx.traceparent(), TRACEPARENT_03);
    assert_eq!(
        TraceContext::parse(&format!("  {TRACEPARENT_03}\t")),
        Some(ctx),
        "surrounding whitespace"
    );
    // Small ids keep their leading zeros.
    let small = TraceContext::new(TraceId::new(1).unwrap(), SpanId::new(1).unwrap(), 0);
    assert_eq!(
        small.traceparent(),
        "00-00000000000000000000000000000001-0000000000000001-00"
    );
    assert_eq!(TraceContext::parse(&small.traceparent()), Some(small));
}

#[test]
fn rejects_what_w3c_calls_invalid() {
    let invalid = [
        "",
        "00",
        // all-zero trace id, all-zero span id
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        // uppercase hex, non-hex digits
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
        "00-4bf92f3577b34da6a3ce929d0e0e473x-00f067aa0ba902b7-01",
        // version ff, a version that is not hex
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        // wrong lengths and separators
        "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b-01",
        "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01extra",
        // a sign is not a digit
        "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    ];
    for header in invalid {
        assert_eq!(TraceContext::parse(header), None, "{header:?}");
    }
}

#[test]
fn a_later_version_is_read_as_far_as_version_00_goes() {
    let ctx =
        TraceContext::parse("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-else")
            .unwrap();
    assert_eq!(
        ctx.traceparent(),
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    );
}

#[test]
fn tracestate_is_validated_and_normalised() {
    let ctx = TraceContext::new_root();
    let with = |state: &str| {
        ctx.clone()
            .with_tracestate(state)
            .tracestate()
            .map(str::to_owned)
    };
    assert_eq!(
        with("congo=t61rcWkgMzE").as_deref(),
        Some("congo=t61rcWkgMzE")
    );
    assert_eq!(
        with("rojo=00f067aa0ba902b7,, congo=t61rcWkgMzE ,\tfw529a3039@dt=x").as_deref(),
        Some("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE,fw529a3039@dt=x")
    );
    for invalid in [
        "",
        " , ",
        "novalue",
        "Upper=x",
        "k=",
        "=v",
        "k=a=b",
        "k=caf\u{e9}",
        "a@b@c=x",
    ] {
        assert_eq!(with(invalid), None, "{invalid:?}");
    }
    let members: Vec<String> = (0..33).map(|i| format!("k{i}=v")).collect();
    assert_eq!(with(&members.join(",")), None, "more than 32 members");
    assert!(with(&members[..32].join(",")).is_some());
}

#[test]
fn from_properties_takes_one_traceparent_and_its_tracestate() {
    let mut props = Properties::new();
    props.add_user_property(TRACEPARENT, TRACEPARENT_03);
    assert_eq!(
        TraceContext::from_properties(&props).unwrap().tracestate(),
        None
    );
    props.add_user_property(TRACESTATE, "a=1");
    props.add_user_property(TRACESTATE, "b=2");
    props.add_user_property(TRACESTATE, "c=3");
    assert_eq!(
        TraceContext::from_properties(&props).unwrap().tracestate(),
        Some("a=1,b=2,c=3")
    );

    let mut bad_state = Properties::new();
    bad_state.add_user_property(TRACEPARENT, TRACEPARENT_03);
    bad_state.add_user_property(TRACESTATE, "not a tracestate");
    let ctx = TraceContext::from_properties(&bad_state).expect("the traceparent still counts");
    assert_eq!(ctx.tracestate(), None);

    let mut two = Properties::new();
    two.add_user_property(TRACEPARENT, TRACEPARENT_03);
    two.add_user_property(TRACEPARENT, TraceContext::new_root().traceparent());
    assert_eq!(TraceContext::from_properties(&two), None, "ambiguous");
}

#[test]
fn inject_replaces_and_keeps_the_pair_consistent() {
    let mut props = Properties::new();
    props.add_user_property("tenant", "acme");
    TraceContext::parse(TRACEPARENT_03)
        .unwrap()
        .with_tracestate("a=1")
        .inject(&mut props);
    let fresh = TraceContext::new_root();
    fresh.inject(&mut props);
    assert_eq!(props.user_property("tenant"), Some("acme"));
    assert_eq!(
        props.user_property(TRACEPARENT),
        Some(fresh.traceparent().as_str())
    );
    assert_eq!(
        props.user_property(TRACESTATE),
        None,
        "the old tracestate went with its traceparent"
    );
    assert_eq!(props.user_properties.len(), 2);
}

#[test]
fn random_ids_are_never_zero_and_differ() {
    let mut traces = std::collections::HashSet::new();
    for _ in 0..1000 {
        let ctx = TraceContext::new_root();
        assert!(ctx.trace_id().get() != 0 && ctx.span_id().get() != 0);
        assert!(traces.insert(ctx.trace_id()));
    }
}

// Across the stacks: a message in, its handler, the reply out.

/// [`capture`], made safe to run beside tests that have no subscriber.
///
/// While at most one dispatcher is registered, tracing-core works out the
/// interest of a callsite reached for the first time from the dispatcher of
/// the thread that reaches it: a test without a subscriber would cache
/// "never" for a callsite this test then needs. A second dispatcher that
/// lives as long as the test binary makes it ask every registered one.
fn capturing() -> (crate::test_util::Logs, tracing::subscriber::DefaultGuard) {
    keep_dispatchers_apart();
    capture()
}

fn keep_dispatchers_apart() {
    static SECOND: std::sync::OnceLock<tracing::Dispatch> = std::sync::OnceLock::new();
    SECOND.get_or_init(|| tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default()));
}

/// The connection's stand-in: what would go on the wire.
#[derive(Clone, Default)]
struct Wire(Arc<Mutex<Vec<Request<Bytes>>>>);

impl Wire {
    fn take(&self) -> Vec<Request<Bytes>> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

impl Service<Request<Bytes>> for Wire {
    type Response = ();
    type Error = BoxError;
    type Future = std::future::Ready<Result<(), BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        tracing::info!("on the wire");
        self.0.lock().unwrap().push(req);
        std::future::ready(Ok(()))
    }
}

fn sent_context(req: &Request<Bytes>) -> TraceContext {
    TraceContext::from_properties(req.properties()).expect("every publish has a traceparent")
}

/// A service answering `llm/request` on `llm/response`, recording the trace
/// context its handler saw.
struct Fixture {
    inbound: crate::InboundService<Router>,
    outbound: OutboundService<Wire>,
    wire: Wire,
    seen: Arc<Mutex<Vec<Option<TraceContext>>>>,
}

fn service() -> Fixture {
    let wire = Wire::default();
    let outbound = OutboundStack::new("llm-worker").service(wire.clone());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (publisher, record) = (outbound.clone(), seen.clone());
    let router = Router::new().route("llm/request", move |req: Request<Envelope>| {
        let (publisher, record) = (publisher.clone(), record.clone());
        async move {
            tokio::task::yield_now().await;
            record.lock().unwrap().push(current());
            assert!(req.extensions().is_empty(), "no extension map per message");
            let reply = Envelope::new("llm.response", serde_json::json!({"text": "hi"})).unwrap();
            let reply = Request::builder("llm/response")
                .extension(Reply)
                .body(reply)
                .unwrap();
            publisher.oneshot(reply).await
        }
    });
    Fixture {
        inbound: InboundStack::new().without_dedup().service(router),
        outbound,
        wire,
        seen,
    }
}

fn request(properties: &[(&str, &str)]) -> Request<Bytes> {
    let env = Envelope::new("llm.request", serde_json::json!({"text": "hello"})).unwrap();
    let mut req = Request::builder("llm/request")
        .body(env.to_bytes())
        .unwrap();
    for (name, value) in properties {
        req.properties_mut().add_user_property(*name, *value);
    }
    req
}

#[tokio::test]
async fn one_trace_from_request_through_handler_to_reply() {
    let svc = service();
    let req = request(&[
        (TRACEPARENT, TRACEPARENT_03),
        (TRACESTATE, "congo=t61rcWkgMzE"),
    ]);
    let outcome = svc.inbound.clone().oneshot(req).await.unwrap();
    assert!(matches!(outcome, Outcome::Handled), "{outcome:?}");

    let handler = svc.seen.lock().unwrap()[0].clone().unwrap();
    assert_eq!(handler.trace_id().to_string(), TRACE);
    assert_ne!(
        handler.span_id().to_string(),
        PARENT,
        "the handler's own span"
    );

    let sent = svc.wire.take();
    assert_eq!(sent.len(), 1);
    let reply = sent_context(&sent[0]);
    assert_eq!(reply.trace_id().to_string(), TRACE, "one trace id");
    assert_ne!(reply.span_id().to_string(), PARENT);
    assert_ne!(reply.span_id(), handler.span_id(), "the publish's own span");
    assert_eq!(reply.flags(), 0x03, "flags kept");
    assert_eq!(reply.tracestate(), Some("congo=t61rcWkgMzE"));
    assert_eq!(
        sent[0].properties().user_property(TRACESTATE),
        Some("congo=t61rcWkgMzE")
    );
}

#[tokio::test]
async fn without_a_traceparent_each_message_starts_a_trace_its_reply_continues() {
    let svc = service();
    for _ in 0..2 {
        let outcome = svc.inbound.clone().oneshot(request(&[])).await.unwrap();
        assert!(matches!(outcome, Outcome::Handled));
    }
    let seen: Vec<TraceContext> = svc.seen.lock().unwrap().iter().flatten().cloned().collect();
    let sent = svc.wire.take();
    assert_eq!((seen.len(), sent.len()), (2, 2));
    assert_ne!(seen[0].trace_id(), seen[1].trace_id(), "a new trace each");
    for (handler, reply) in seen.iter().zip(&sent) {
        let reply = sent_context(reply);
        assert_eq!(reply.trace_id(), handler.trace_id());
        assert_ne!(reply.span_id(), handler.span_id());
        assert!(reply.is_sampled());
        assert_eq!(reply.tracestate(), None);
    }
}

#[tokio::test]
async fn an_invalid_traceparent_is_ignored_and_logged_not_a_failure() {
    let (logs, _guard) = capturing();
    let svc = service();
    let zeros = "00-00000000000000000000000000000000-00f067aa0ba902b7-01";
    let req = request(&[(TRACEPARENT, zeros), (TRACESTATE, "congo=t61rcWkgMzE")]);
    let outcome = svc.inbound.clone().oneshot(req).await.unwrap();
    assert!(matches!(outcome, Outcome::Handled), "{outcome:?}");

    let handler = svc.seen.lock().unwrap()[0].clone().unwrap();
    assert_ne!(handler.trace_id().get(), 0);
    let reply = sent_context(&svc.wire.take()[0]);
    assert_eq!(
        reply.trace_id(),
        handler.trace_id(),
        "the new trace, continued"
    );
    assert_eq!(
        reply.tracestate(),
        None,
        "a tracestate without its traceparent means nothing"
    );
    let ignored = logs.at(Level::DEBUG);
    let ignored = ignored
        .iter()
        .find(|e| e.message().starts_with("invalid traceparent"))
        .expect("logged at DEBUG");
    assert_eq!(ignored.fields["traceparent"], zeros);
}

#[tokio::test]
async fn publishes_outside_a_message_start_their_own_traces() {
    let svc = service();
    for _ in 0..2 {
        let status = Envelope::new("llm.status", serde_json::json!({})).unwrap();
        let req = Request::builder("llm/status").body(status).unwrap();
        svc.outbound.clone().oneshot(req).await.unwrap();
    }
    let sent = svc.wire.take();
    let (a, b) = (sent_context(&sent[0]), sent_context(&sent[1]));
    assert_ne!(a.trace_id(), b.trace_id());
    assert!(a.is_sampled() && b.is_sampled());
}

#[tokio::test]
async fn a_publish_that_has_a_traceparent_keeps_it() {
    let svc = service();
    let mine = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
    let status = Envelope::new("llm.status", serde_json::json!({})).unwrap();
    let mut req = Request::builder("llm/status").body(status).unwrap();
    req.properties_mut()
        .add_user_property(TRACEPARENT, mine)
        .add_user_property(TRACESTATE, "mine=1");
    let handling = TraceContext::parse(TRACEPARENT_03).unwrap();
    scope(handling, svc.outbound.clone().oneshot(req))
        .await
        .unwrap();
    let sent = svc.wire.take();
    assert_eq!(sent[0].properties().user_property(TRACEPARENT), Some(mine));
    assert_eq!(
        sent[0].properties().user_property(TRACESTATE),
        Some("mine=1")
    );
}

#[tokio::test]
async fn a_spawned_task_given_the_context_publishes_in_the_trace() {
    let svc = service();
    let outbound = svc.outbound.clone();
    let handling = TraceContext::parse(TRACEPARENT_03).unwrap();
    scope(handling, async move {
        let context = current().unwrap();
        tokio::spawn(scope(context, async move {
            let chunk = Envelope::new("llm.stream", serde_json::json!({})).unwrap();
            let req = Request::builder("llm/stream").body(chunk).unwrap();
            outbound.oneshot(req).await.unwrap();
        }))
        .await
        .unwrap();
    })
    .await;
    assert_eq!(
        sent_context(&svc.wire.take()[0]).trace_id().to_string(),
        TRACE
    );
}

#[tokio::test]
async fn the_spans_carry_the_ids_and_the_messaging_attributes() {
    let (logs, _guard) = capturing();
    let svc = service();
    let req = request(&[(TRACEPARENT, TRACEPARENT_03)]);
    svc.inbound.clone().oneshot(req).await.unwrap();
    let sent = sent_context(&svc.wire.take()[0]);
    let handler = svc.seen.lock().unwrap()[0].clone().unwrap();

    let events = logs.events();
    let on_the_wire = events
        .iter()
        .find(|e| e.message() == "on the wire")
        .expect("the wire logs");
    let message = on_the_wire
        .span("mqtt.message")
        .expect("inside the message");
    assert_eq!(message["trace_id"], TRACE);
    assert_eq!(message["span_id"], handler.span_id().to_string());
    assert_eq!(message["parent_span_id"], PARENT);
    assert_eq!(message["messaging.system"], "mqtt");
    assert_eq!(message["messaging.destination.name"], "llm/request");
    assert_eq!(message["messaging.operation.name"], "process");
    assert_eq!(message["messaging.operation.type"], "process");
    assert_eq!(message["otel.kind"], "consumer");

    let publish = on_the_wire
        .span("mqtt.publish")
        .expect("inside the publish");
    assert_eq!(publish["trace_id"], TRACE);
    assert_eq!(publish["span_id"], sent.span_id().to_string());
    assert_eq!(publish["messaging.system"], "mqtt");
    assert_eq!(publish["messaging.destination.name"], "llm/response");
    assert_eq!(publish["messaging.operation.name"], "publish");
    assert_eq!(publish["messaging.operation.type"], "send");
    assert_eq!(publish["otel.kind"], "producer");
}

#[tokio::test]
async fn a_message_without_a_trace_has_no_parent_in_its_span() {
    let (logs, _guard) = capturing();
    let svc = service();
    svc.inbound.clone().oneshot(request(&[])).await.unwrap();
    let handler = svc.seen.lock().unwrap()[0].clone().unwrap();
    let events = logs.events();
    let message = events[0].span("mqtt.message").unwrap();
    assert_eq!(message["trace_id"], handler.trace_id().to_string());
    assert!(!message.contains_key("parent_span_id"));
}

#[cfg(feature = "opentelemetry")]
mod opentelemetry_bridge {
    use super::*;
    use opentelemetry::trace::{SpanKind, TracerProvider as _};
    use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
    use tracing::{subscriber::DefaultGuard, Instrument};
    use tracing_subscriber::prelude::*;

    /// Exports the spans of this thread to memory until the guard is dropped.
    fn exporting() -> (InMemorySpanExporter, SdkTracerProvider, DefaultGuard) {
        keep_dispatchers_apart();
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("tests")));
        (
            exporter,
            provider,
            tracing::subscriber::set_default(subscriber),
        )
    }

    fn span<'a>(spans: &'a [SpanData], name: &str) -> &'a SpanData {
        spans
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no {name} span in {spans:#?}"))
    }

    fn ids(span: &SpanData) -> (String, String) {
        (
            span.span_context.trace_id().to_string(),
            span.span_context.span_id().to_string(),
        )
    }

    fn ids_of(ctx: &TraceContext) -> (String, String) {
        (ctx.trace_id().to_string(), ctx.span_id().to_string())
    }

    #[tokio::test]
    async fn the_message_span_continues_the_remote_trace_and_the_reply_names_its_publish_span() {
        let (exporter, _provider, _guard) = exporting();
        let svc = service();
        let req = request(&[
            (TRACEPARENT, TRACEPARENT_03),
            (TRACESTATE, "congo=t61rcWkgMzE"),
        ]);
        // The runtime's own span, around every message: not their parent.
        let client = tracing::info_span!("mqtt.client");
        let outcome = svc.inbound.clone().oneshot(req).instrument(client).await;
        assert!(matches!(outcome.unwrap(), Outcome::Handled));

        let spans = exporter.get_finished_spans().unwrap();
        let message = span(&spans, "mqtt.message");
        assert_eq!(message.span_context.trace_id().to_string(), TRACE);
        assert_eq!(message.parent_span_id.to_string(), PARENT);
        assert!(message.parent_span_is_remote);
        assert_eq!(message.span_kind, SpanKind::Consumer);

        let publish = span(&spans, "mqtt.publish");
        assert_eq!(publish.span_context.trace_id().to_string(), TRACE);
        assert_eq!(publish.parent_span_id, message.span_context.span_id());
        assert_eq!(publish.span_kind, SpanKind::Producer);

        // The handler's context is the exported message span, and the reply
        // names the exported publish span as its receivers' parent.
        let handler = svc.seen.lock().unwrap()[0].clone().unwrap();
        assert_eq!(ids_of(&handler), ids(message));
        let reply = sent_context(&svc.wire.take()[0]);
        assert_eq!(ids_of(&reply), ids(publish));
        assert!(reply.is_sampled());
        assert_eq!(reply.tracestate(), Some("congo=t61rcWkgMzE"));
    }

    #[tokio::test]
    async fn a_message_without_a_trace_is_a_root_not_a_child_of_the_runtime_span() {
        let (exporter, _provider, _guard) = exporting();
        let svc = service();
        let client = tracing::info_span!("mqtt.client");
        svc.inbound
            .clone()
            .oneshot(request(&[]))
            .instrument(client)
            .await
            .unwrap();
        drop(svc.inbound);

        let spans = exporter.get_finished_spans().unwrap();
        let message = span(&spans, "mqtt.message");
        let client = span(&spans, "mqtt.client");
        assert_eq!(
            message.parent_span_id,
            opentelemetry::trace::SpanId::INVALID
        );
        assert_ne!(
            message.span_context.trace_id(),
            client.span_context.trace_id()
        );
        let handler = svc.seen.lock().unwrap()[0].clone().unwrap();
        assert_eq!(ids_of(&handler), ids(message));
        let publish = span(&spans, "mqtt.publish");
        assert_eq!(ids_of(&sent_context(&svc.wire.take()[0])), ids(publish));
    }

    #[tokio::test]
    async fn a_spawned_task_given_the_context_exports_its_publish_into_the_trace() {
        let (exporter, _provider, _guard) = exporting();
        let svc = service();
        let handed = TraceContext::parse(TRACEPARENT_03).unwrap();
        let outbound = svc.outbound.clone();
        // No span is active in the spawned task: the handed context is the parent.
        tokio::spawn(scope(handed, async move {
            let chunk = Envelope::new("llm.stream", serde_json::json!({})).unwrap();
            let req = Request::builder("llm/stream").body(chunk).unwrap();
            outbound.oneshot(req).await.unwrap();
        }))
        .await
        .unwrap();

        let spans = exporter.get_finished_spans().unwrap();
        let publish = span(&spans, "mqtt.publish");
        assert_eq!(publish.span_context.trace_id().to_string(), TRACE);
        assert_eq!(publish.parent_span_id.to_string(), PARENT);
        assert_eq!(ids_of(&sent_context(&svc.wire.take()[0])), ids(publish));
    }

    #[tokio::test]
    async fn without_the_layer_the_ids_are_the_crates_own() {
        // A subscriber, but no OpenTelemetry layer in it.
        let (_logs, _guard) = capturing();
        let svc = service();
        let req = request(&[(TRACEPARENT, TRACEPARENT_03)]);
        svc.inbound.clone().oneshot(req).await.unwrap();
        let reply = sent_context(&svc.wire.take()[0]);
        assert_eq!(reply.trace_id().to_string(), TRACE);
        assert_eq!(reply.flags(), 0x03);
    }
}
