//! The cost of the inbound stack per message.
//!
//! `inbound/envelope_from_slice` is the floor: decoding a ~200-byte envelope
//! with `serde_json`, which any receiver pays. `inbound/standard_stack` is a
//! message through `InboundStack` (decode, dedup, correlation span,
//! isolation, retry, timeout) into a `Router` with one trivial route. The
//! difference is what the middleware costs, and
//! `inbound/standard_stack_minus_decode` measures it directly, alternating
//! the two message by message so that drift in the machine cancels; the
//! `layers/*` group adds one layer
//! at a time to show where it goes, and `parts/*` times single pieces.
//!
//! Every message has its own id: the pool of messages is larger than the dedup
//! store holds, so each is new to it, as on a live topic. The route's handler
//! is done at its first poll. No tracing subscriber is installed, so spans
//! and logs cost what tracing does without one.
//!
//! Run with `cargo bench --bench inbound`.
//!
//! Where the time goes. The development machine (2 cores, shared) is noisy:
//! one run's median can be off by a third. So the figures below are the
//! median of the medians of 15 to 26 short runs of
//! `inbound/standard_stack_minus_decode` (`--warm-up-time 1
//! --measurement-time 4`, pinned to one core while the other was idle, the
//! builds of each step interleaved). The stack cost 1.40 µs over decode-only
//! before the work below and 0.92 µs after it (single runs 0.64 to 1.06 µs):
//!
//! | step | median |
//! |---|---|
//! | before | 1.40 µs |
//! | topic parameters and correlation id as `Request` fields, not extensions (no map to clone with the request) | 1.27 µs |
//! | an `Envelope` clone is one reference count | 1.14 µs |
//! | the retry budget deposits with one atomic add, no clock read | 1.01 µs |
//! | dedup claims without a process-wide counter | 1.03 µs (no change beyond noise) |
//! | the handler timeout makes its timer only for a handler that is pending | 0.92 µs |
//!
//! The plain `cargo bench --bench inbound -- standard_stack_minus`, not
//! pinned, three runs of each interleaved: medians of 1.50 to 1.56 µs
//! before, 0.91 to 1.02 µs after.
//!
//! Later, a route match that allocates nothing (wildcard values as byte
//! ranges into the topic, no `Vec` when one route matches): plain runs on a
//! quiet machine, 0.54 to 0.60 µs against 0.64 µs for the code before it in
//! the same session; `routing/100_routes_match` 71 to 75 ns against 126 ns.
//!
//! A profile of what is left (`perf record` of the standard stack and of
//! decode-only, 400,000 messages each, the difference per symbol) puts about
//! half of it in dedup: its 128-bit key over the canonical data a fifth
//! (`parts/dedup_key`, 130 to 170 ns), and the claim a quarter (an insert
//! into a hash table the message stream has pushed out of the cache, under
//! the shard's lock, and the claim's clock read). Then the retry layer about
//! a sixth: tower's `Retry` clones the policy, the inner service and the
//! request it keeps for another attempt (`parts/request_envelope_clone`, 40
//! to 55 ns), and deposits in the budget (`parts/budget_deposit`, 11 to 12
//! ns, against 55 to 68 ns for tower's `TpsBudget` in
//! `parts/budget_deposit_tps`). Moving and dropping the layers' nested
//! futures (about 500 bytes) an eighth; the span and the correlation scope a
//! tenth (with no subscriber a span still builds its fields, since tracing's
//! `log` feature is on in the build); isolation a twelfth; the timeout next to
//! nothing when the handler is done at its first poll. On this machine an
//! atomic read-modify-write costs about 10 ns, and the stack still makes
//! about two dozen per message (reference counts taken and dropped, the
//! shard's lock, the budget).

// `criterion_group!` defines a public function without docs.
#![allow(missing_docs)]

use std::{
    convert::Infallible,
    fmt::Debug,
    time::{Duration, Instant},
};

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use tokio::runtime::Runtime;
use tower::{
    retry::budget::{Budget, TpsBudget},
    Layer, Service, ServiceBuilder, ServiceExt,
};
use tower_mqtt::layers::{
    correlation_span::CorrelationSpanLayer,
    decode::DecodeLayer,
    dedup::DedupKey,
    isolation::IsolationLayer,
    retry::{MessageRetryLayer, RetryBudget},
    timeout::TimeoutLayer,
    DedupLayer, EventRegistry, InboundStack,
};
use tower_mqtt::{Envelope, Outcome, Request, Router};

/// More than the dedup store holds (2048), so a message is new when it comes
/// round again.
const POOL: usize = 16_384;

/// Realistic envelopes of about 200 bytes, each with its own id.
fn pool() -> Vec<Request<Bytes>> {
    (0..POOL)
        .map(|n| {
            let payload = format!(
                r#"{{"id":"{n:032x}","type":"llm.request","ts":1732650123.456789,"source":"router","data":{{"text":"turn on the kitchen lights, please","conversation_id":"c-{n}","stream":true}}}}"#
            );
            Request::builder("llm/request")
                .body(Bytes::from(payload))
                .unwrap()
        })
        .collect()
}

fn router() -> Router {
    Router::new().route("llm/request", |_req: Request<Envelope>| async {})
}

fn bench_service<S>(c: &mut Criterion, rt: &Runtime, name: &str, svc: &S, pool: &[Request<Bytes>])
where
    S: Service<Request<Bytes>, Response = Outcome> + Clone,
    S::Error: Debug,
{
    let mut next = 0;
    c.bench_function(name, |b| {
        b.to_async(rt).iter(|| {
            let req = pool[next % pool.len()].clone();
            next += 1;
            let svc = svc.clone();
            async move {
                let outcome = svc.oneshot(req).await.unwrap();
                assert!(matches!(outcome, Outcome::Handled), "{outcome:?}");
            }
        });
    });
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The floor and the whole stack.
fn inbound(c: &mut Criterion) {
    let rt = runtime();
    let pool = pool();
    assert!(
        (190..=230).contains(&pool[0].body().len()),
        "{}",
        pool[0].body().len()
    );

    let mut next = 0;
    c.bench_function("inbound/envelope_from_slice", |b| {
        b.iter(|| {
            let bytes = pool[next % POOL].body();
            next += 1;
            black_box(Envelope::from_slice(black_box(bytes)).unwrap())
        });
    });

    let stack = InboundStack::new().registry(EventRegistry::fleet());
    bench_service(
        c,
        &rt,
        "inbound/standard_stack",
        &stack.service(router()),
        &pool,
    );

    // The target itself, measured so that the machine's drift cancels: each
    // iteration sends one message through the decode-only service and the
    // next through the standard stack, and only the difference is counted.
    let bare = DecodeLayer::new(EventRegistry::fleet()).layer(router());
    let standard = InboundStack::new()
        .registry(EventRegistry::fleet())
        .service(router());
    let mut next = 0;
    c.bench_function("inbound/standard_stack_minus_decode", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let (bare, standard) = (bare.clone(), standard.clone());
            let requests: Vec<_> = (0..iters)
                .map(|_| {
                    next += 2;
                    (
                        pool[(next - 2) % POOL].clone(),
                        pool[(next - 1) % POOL].clone(),
                    )
                })
                .collect();
            async move {
                let nanos = |d: Duration| i128::try_from(d.as_nanos()).unwrap_or(i128::MAX);
                let mut extra_nanos: i128 = 0;
                for (a, b) in requests {
                    let started = Instant::now();
                    black_box(bare.clone().oneshot(a).await.unwrap());
                    let middle = Instant::now();
                    black_box(standard.clone().oneshot(b).await.unwrap());
                    let ended = Instant::now();
                    extra_nanos += nanos(ended - middle) - nanos(middle - started);
                }
                // On a busy machine a sample can come out at or below zero
                // (a preemption landed in the decode-only half); criterion
                // rejects a zero, so such a sample counts as 1 ns.
                Duration::from_nanos(u64::try_from(extra_nanos.max(1)).unwrap_or(u64::MAX))
            }
        });
    });
}

/// One layer more at a time.
fn layers(c: &mut Criterion) {
    let rt = runtime();
    let pool = pool();
    let decode = || DecodeLayer::new(EventRegistry::fleet());
    let with_decode = ServiceBuilder::new().layer(decode());
    bench_service(
        c,
        &rt,
        "layers/1_decode_router",
        &with_decode.service(router()),
        &pool,
    );
    let with_dedup = ServiceBuilder::new()
        .layer(decode())
        .layer(DedupLayer::new());
    bench_service(
        c,
        &rt,
        "layers/2_+dedup",
        &with_dedup.service(router()),
        &pool,
    );
    let with_span = ServiceBuilder::new()
        .layer(decode())
        .layer(DedupLayer::new())
        .layer(CorrelationSpanLayer::new());
    bench_service(
        c,
        &rt,
        "layers/3_+span",
        &with_span.service(router()),
        &pool,
    );
    let with_isolation = ServiceBuilder::new()
        .layer(decode())
        .layer(DedupLayer::new())
        .layer(CorrelationSpanLayer::new())
        .layer(IsolationLayer::new());
    bench_service(
        c,
        &rt,
        "layers/4_+isolation",
        &with_isolation.service(router()),
        &pool,
    );
    let with_retry = ServiceBuilder::new()
        .layer(decode())
        .layer(DedupLayer::new())
        .layer(CorrelationSpanLayer::new())
        .layer(IsolationLayer::new())
        .layer(MessageRetryLayer::new(3));
    bench_service(
        c,
        &rt,
        "layers/5_+retry",
        &with_retry.service(router()),
        &pool,
    );
    let with_timeout = ServiceBuilder::new()
        .layer(decode())
        .layer(DedupLayer::new())
        .layer(CorrelationSpanLayer::new())
        .layer(IsolationLayer::new())
        .layer(MessageRetryLayer::new(3))
        .layer(TimeoutLayer::new(Duration::from_secs(30)));
    bench_service(
        c,
        &rt,
        "layers/6_+timeout",
        &with_timeout.service(router()),
        &pool,
    );
}

/// The pieces that allocate.
fn parts(c: &mut Criterion) {
    let rt = runtime();
    let decoded: Vec<Request<Envelope>> = pool()
        .into_iter()
        .take(1024)
        .map(|req| req.map(|bytes| Envelope::from_slice(&bytes).unwrap()))
        .collect();
    let mut next = 0;
    c.bench_function("parts/request_envelope_clone", |b| {
        b.iter(|| {
            next += 1;
            black_box(decoded[next % decoded.len()].clone())
        });
    });
    let mut next = 0;
    c.bench_function("parts/dedup_key", |b| {
        b.iter(|| {
            next += 1;
            black_box(DedupKey::new(decoded[next % decoded.len()].body()))
        });
    });
    // What a retry layer's budget costs each message: one deposit.
    let tps = TpsBudget::default();
    c.bench_function("parts/budget_deposit_tps", |b| {
        b.iter(|| black_box(&tps).deposit());
    });
    let ours = RetryBudget::default();
    c.bench_function("parts/budget_deposit", |b| {
        b.iter(|| black_box(&ours).deposit());
    });
    let mut next = 0;
    let route_only = router();
    c.bench_function("parts/router_with_request_clone", |b| {
        b.to_async(&rt).iter(|| {
            next += 1;
            let req = decoded[next % decoded.len()].clone();
            let router = route_only.clone();
            async move {
                black_box(
                    router
                        .oneshot(req)
                        .await
                        .unwrap_or_else(|e: Infallible| match e {}),
                )
            }
        });
    });
}

/// 100 routes with wildcards, as a large service has: what finding the
/// matching ones costs per message (issue target: at most 300 ns).
fn routing(c: &mut Criterion) {
    let mut router: Router = Router::new();
    for n in 0..100 {
        let filter = match n % 4 {
            0 => format!("svc{n}/+/state"),
            1 => format!("svc{n}/#"),
            2 => format!("svc{n}/events/+"),
            _ => format!("svc{n}/exact/topic"),
        };
        router = router.subscribe(filter.as_str());
    }
    let topics: Vec<tower_mqtt::TopicName> = (0..100)
        .map(|n| tower_mqtt::TopicName::new(format!("svc{n}/kitchen/state")).unwrap())
        .collect();
    let mut next = 0;
    c.bench_function("routing/100_routes_match", |b| {
        b.iter(|| {
            next += 1;
            let topic = &topics[next % topics.len()];
            black_box(router.matching(topic).count())
        });
    });
}

criterion_group!(benches, inbound, layers, parts, routing);
criterion_main!(benches);
