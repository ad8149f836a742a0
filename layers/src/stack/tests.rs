#![allow(
    clippy::items_after_statements,
    clippy::unnecessary_wraps,
    clippy::type_complexity
)]

use super::*;
use crate::{
    dead_letter::DeadLetter, decode::DecodeError, test_util::capture, timeout::is_timeout,
};
use bytes::Bytes;
use serde_json::json;
use std::{
    convert::Infallible,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
};
use tokio::sync::mpsc;
use tower::{BoxError, Service, ServiceExt};
use tower_mqtt_core::{
    correlation, correlation::CorrelationId, Data, Envelope, Outcome, Request, Router,
};

const ID: &str = "3f1c9b1e8a2d4c6f9e0b7a5d4c3b2a19";

fn envelope(topic: &str, event_type: &str, data: serde_json::Value) -> Request<Bytes> {
    let env = Envelope::new(event_type, data).unwrap().with_id(ID);
    Request::builder(topic).body(env.to_bytes()).unwrap()
}

fn raw(topic: &str, payload: &'static [u8]) -> Request<Bytes> {
    Request::builder(topic)
        .body(Bytes::from_static(payload))
        .unwrap()
}

fn counter() -> (Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let count = Arc::new(AtomicUsize::new(0));
    (count.clone(), count)
}

#[derive(serde::Deserialize)]
struct Say {
    text: String,
}

/// A router with a good route, a panicking one, a failing one and a slow one;
/// it records what the good route saw.
fn router(
    seen: Arc<Mutex<Vec<(String, String, Option<String>, Option<String>)>>>,
    said: Arc<AtomicUsize>,
    panics: Arc<AtomicUsize>,
    failures: Arc<AtomicUsize>,
) -> Router {
    Router::new()
        .route(
            "tts/say",
            move |Data(say): Data<Say>, req: Request<Envelope>| {
                let (seen, said) = (seen.clone(), said.clone());
                async move {
                    said.fetch_add(1, Ordering::SeqCst);
                    seen.lock().unwrap().push((
                        say.text,
                        req.body().event_type().to_owned(),
                        req.correlation_id().map(ToString::to_string),
                        correlation::current().map(|id| id.to_string()),
                    ));
                }
            },
        )
        .route("crash/now", move |_req: Request<Envelope>| {
            let panics = panics.clone();
            async move {
                panics.fetch_add(1, Ordering::SeqCst);
                handler_bug();
            }
        })
        .route("fail/once", move |_req: Request<Envelope>| {
            let failures = failures.clone();
            async move {
                if failures.fetch_add(1, Ordering::SeqCst) < 3 {
                    Err::<(), _>("storage unavailable")
                } else {
                    Ok(())
                }
            }
        })
        .route("slow/down", |_req: Request<Envelope>| async {
            std::future::pending::<()>().await;
        })
}

fn handler_bug() {
    panic!("handler bug");
}

type Seen = Arc<Mutex<Vec<(String, String, Option<String>, Option<String>)>>>;

struct Fixture {
    seen: Seen,
    said: Arc<AtomicUsize>,
    panics: Arc<AtomicUsize>,
    failures: Arc<AtomicUsize>,
    router: Router,
}

fn fixture() -> Fixture {
    let seen = Seen::default();
    let (said, said_in) = counter();
    let (panics, panics_in) = counter();
    let (failures, failures_in) = counter();
    let router = router(seen.clone(), said_in, panics_in, failures_in);
    Fixture {
        seen,
        said,
        panics,
        failures,
        router,
    }
}

fn assert_runtime_ready<S>(_: &S)
where
    S: Service<Request<Bytes>, Response = Outcome, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
}

#[tokio::test(start_paused = true)]
async fn good_duplicate_malformed_and_panicking_messages() {
    let f = fixture();
    let svc = InboundStack::new()
        .registry(EventRegistry::fleet())
        .retry(
            MessageRetryLayer::new(3)
                .backoff(Duration::from_millis(10), Duration::from_millis(100)),
        )
        .service(f.router.clone());
    assert_runtime_ready(&svc);

    // Good.
    let good = envelope("tts/say", "tts.say", json!({"text": "hello"}));
    let outcome = svc.clone().oneshot(good.clone()).await.unwrap();
    assert!(matches!(outcome, Outcome::Handled), "{outcome:?}");
    assert_eq!(
        f.seen.lock().unwrap()[0],
        (
            "hello".into(),
            "tts.say".into(),
            Some(ID.into()),
            Some(ID.into())
        )
    );

    // Duplicate: the handler does not run again.
    let outcome = svc.clone().oneshot(good).await.unwrap();
    assert!(matches!(outcome, Outcome::Duplicate), "{outcome:?}");
    assert_eq!(f.said.load(Ordering::SeqCst), 1);

    // Malformed: a permanent decode failure, never retried, handler untouched.
    for payload in [
        &b"not json"[..],
        b"[1,2]",
        b"\xff\xfe",
        br#"{"type":"tts.say","data":[]}"#,
    ] {
        let req = Request::builder("tts/say")
            .body(Bytes::copy_from_slice(payload))
            .unwrap();
        let outcome = svc.clone().oneshot(req).await.unwrap();
        let err = outcome.error().expect("a failure");
        assert!(!err.is_retryable());
        assert!(err.get_ref().is::<DecodeError>());
    }
    assert_eq!(f.said.load(Ordering::SeqCst), 1);

    // Panicking: a failure, and the service goes on. The router reports a
    // panic as retryable, so it is tried the configured 3 times.
    let crash = envelope("crash/now", "crash.now", json!({}));
    let outcome = svc.clone().oneshot(crash).await.unwrap();
    let err = outcome.error().expect("a failure");
    assert!(
        err.to_string().contains("handler panicked: handler bug"),
        "{err}"
    );
    assert_eq!(f.panics.load(Ordering::SeqCst), 3);

    // Raw JSON on a registered topic takes the registry's type.
    let outcome = svc
        .clone()
        .oneshot(raw("tts/say", br#"{"text":"raw"}"#))
        .await
        .unwrap();
    assert!(matches!(outcome, Outcome::Handled));
    // ... and is never a duplicate.
    let outcome = svc
        .clone()
        .oneshot(raw("tts/say", br#"{"text":"raw"}"#))
        .await
        .unwrap();
    assert!(matches!(outcome, Outcome::Handled));
    assert_eq!(f.said.load(Ordering::SeqCst), 3);
    assert_eq!(f.seen.lock().unwrap()[2].1, "tts.say");

    // Unrouted.
    let outcome = svc
        .oneshot(envelope("no/route", "x", json!({})))
        .await
        .unwrap();
    assert!(matches!(outcome, Outcome::Unrouted));
}

#[tokio::test(start_paused = true)]
async fn a_failure_is_retried_logged_once_and_dead_lettered_once() {
    let (logs, _guard) = capture();
    let f = fixture();
    let (tx, mut letters) = mpsc::unbounded_channel();
    let sink = tower::service_fn(move |letter: Request<Envelope>| {
        tx.send(letter).unwrap();
        async { Ok::<_, BoxError>(()) }
    });
    let svc = InboundStack::new()
        .dead_letter(DeadLetter::new(sink))
        .service(f.router.clone());
    assert_runtime_ready(&svc);

    let msg = envelope("fail/once", "fail.once", json!({"n": 1}));
    let outcome = svc.clone().oneshot(msg.clone()).await.unwrap();
    assert_eq!(outcome.error().unwrap().to_string(), "storage unavailable");
    assert_eq!(f.failures.load(Ordering::SeqCst), 3);

    let errors = logs.at(Level::ERROR);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(
        errors[0].span("mqtt.message").unwrap()["correlation_id"],
        ID
    );
    assert_eq!(logs.at(Level::WARN).len(), 2, "one warning per retry");

    let letter = letters.recv().await.unwrap();
    assert_eq!(letter.topic(), "mqtt/dead_letter");
    assert_eq!(letter.body().data()["topic"], "fail/once");
    tokio::task::yield_now().await;
    assert!(letters.try_recv().is_err(), "one dead letter per message");

    // The failure released the dedup key: a redelivery runs (and now works).
    let outcome = svc.oneshot(msg).await.unwrap();
    assert!(matches!(outcome, Outcome::Handled), "{outcome:?}");
    assert_eq!(f.failures.load(Ordering::SeqCst), 4);
}

#[tokio::test(start_paused = true)]
async fn a_hanging_handler_times_out_per_attempt() {
    let f = fixture();
    let svc = InboundStack::new()
        .timeout(Duration::from_secs(5))
        .retry(
            MessageRetryLayer::new(2)
                .backoff(Duration::from_secs(1), Duration::from_secs(1))
                .jitter(0.0),
        )
        .service(f.router.clone());
    let started = tokio::time::Instant::now();
    let outcome = svc
        .oneshot(envelope("slow/down", "slow.down", json!({})))
        .await
        .unwrap();
    assert!(is_timeout(outcome.error().unwrap()));
    assert_eq!(started.elapsed(), Duration::from_secs(5 + 1 + 5));
}

#[tokio::test(start_paused = true)]
async fn a_redelivery_during_retries_is_a_duplicate() {
    let f = fixture();
    let svc = InboundStack::new()
        .retry(
            MessageRetryLayer::new(5)
                .backoff(Duration::from_secs(1), Duration::from_secs(1))
                .jitter(0.0),
        )
        .service(f.router.clone());
    let msg = envelope("fail/once", "fail.once", json!({}));
    let first = tokio::spawn(svc.clone().oneshot(msg.clone()));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // The first is between attempts: its redelivery is absorbed.
    let outcome = svc.clone().oneshot(msg).await.unwrap();
    assert!(matches!(outcome, Outcome::Duplicate));
    assert!(matches!(first.await.unwrap().unwrap(), Outcome::Handled));
    assert_eq!(f.failures.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn stream_chunks_sharing_an_id_all_reach_the_handler() {
    let (count, counted) = counter();
    let router = Router::new().route("llm/stream", move |_req: Request<Envelope>| {
        let counted = counted.clone();
        async move {
            counted.fetch_add(1, Ordering::SeqCst);
        }
    });
    let svc = InboundStack::new().service(router);
    for seq in 0..10 {
        let chunk = envelope(
            "llm/stream",
            "llm.stream",
            json!({"seq": seq, "delta": "x"}),
        );
        assert!(matches!(
            svc.clone().oneshot(chunk).await.unwrap(),
            Outcome::Handled
        ));
    }
    assert_eq!(count.load(Ordering::SeqCst), 10);
}

#[tokio::test]
async fn settings_reach_the_layers() {
    let stack = InboundStack::new()
        .dedup_ttl(Duration::from_secs(7))
        .dedup_max_entries(9)
        .default_type("raw.json")
        .registry(EventRegistry::fleet())
        .span_level(Level::DEBUG);
    assert_eq!(stack.dedup.ttl(), Duration::from_secs(7));
    assert_eq!(stack.dedup.max_entries(), 9);
    assert!(!stack.decode.registry().is_empty());

    let (tx, mut rx) = mpsc::unbounded_channel();
    let svc = stack.service(tower::service_fn(move |req: Request<Envelope>| {
        tx.send(req.body().event_type().to_owned()).unwrap();
        async { Ok::<_, Infallible>(Outcome::Handled) }
    }));
    svc.clone().oneshot(raw("x/y", b"{}")).await.unwrap();
    svc.oneshot(raw("tts/say", b"{}")).await.unwrap();
    assert_eq!(rx.recv().await.unwrap(), "raw.json");
    assert_eq!(rx.recv().await.unwrap(), "tts.say");
}

#[tokio::test]
async fn the_stack_is_a_layer_sharing_one_cache() {
    let (count, counted) = counter();
    let handler = tower::service_fn(move |_req: Request<Envelope>| {
        counted.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, Infallible>(Outcome::Handled) }
    });
    let stack = InboundStack::new();
    let a = ServiceBuilder::new()
        .layer(stack.clone())
        .service(handler.clone());
    let b = stack.layer(handler);
    let msg = envelope("a", "t", json!({}));
    assert!(matches!(
        a.oneshot(msg.clone()).await.unwrap(),
        Outcome::Handled
    ));
    assert!(matches!(b.oneshot(msg).await.unwrap(), Outcome::Duplicate));
    assert_eq!(count.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn dedup_can_be_turned_off() {
    for stack in [
        InboundStack::new().without_dedup(),
        InboundStack::new().dedup_ttl(Duration::ZERO),
        InboundStack::new()
            .dedup_ttl(Duration::ZERO)
            .dedup_max_entries(10),
    ] {
        assert!(!stack.dedup.is_enabled());
        let (count, counted) = counter();
        let svc = stack.service(tower::service_fn(move |_req: Request<Envelope>| {
            counted.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, Infallible>(Outcome::Handled) }
        }));
        let msg = envelope("a", "t", json!({}));
        for _ in 0..3 {
            let outcome = svc.clone().oneshot(msg.clone()).await.unwrap();
            assert!(matches!(outcome, Outcome::Handled));
        }
        assert_eq!(count.load(Ordering::SeqCst), 3);
    }
    // A TTL again turns it back on.
    let stack = InboundStack::new()
        .without_dedup()
        .dedup_ttl(Duration::from_secs(1));
    assert!(stack.dedup.is_enabled());
}

#[test]
fn the_inbound_defaults_are_the_fleets() {
    let stack = InboundStack::new();
    assert_eq!(
        stack
            .decode
            .registry()
            .event_type_for("system/health/llm-worker")
            .as_deref(),
        Some("system.health.llm-worker")
    );
    assert_eq!(stack.dedup.ttl(), crate::dedup::DEFAULT_TTL);
    assert_eq!(stack.dedup.max_entries(), crate::dedup::DEFAULT_MAX_ENTRIES);
    assert_eq!(stack.timeout, DEFAULT_TIMEOUT);
    assert_eq!(stack.retry.policy().max_attempts(), DEFAULT_MAX_ATTEMPTS);
}

#[tokio::test]
async fn the_outbound_stack_correlates_encodes_and_guards() {
    use crate::outbound::{PublishError, Reply};

    let sent: Arc<Mutex<Vec<Bytes>>> = Arc::default();
    let log = sent.clone();
    let sink = tower::service_fn(move |req: Request<Bytes>| {
        log.lock().unwrap().push(req.into_body());
        std::future::ready(Ok::<_, BoxError>(()))
    });
    let svc = OutboundStack::new("me").max_packet_size(200).service(sink);

    let reply = Request::builder("memory/results")
        .extension(Reply)
        .body(Envelope::new("memory.results", json!({"n": 1})).unwrap())
        .unwrap();
    correlation::scope(CorrelationId::new("q-1"), svc.clone().oneshot(reply))
        .await
        .unwrap();
    let wire = Envelope::from_slice(&sent.lock().unwrap()[0]).unwrap();
    assert_eq!((wire.id(), wire.source()), ("q-1", "me"));

    let big = Envelope::new("x.y", json!({"blob": "x".repeat(500)})).unwrap();
    let err = svc
        .oneshot(Request::builder("x/y").body(big).unwrap())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err.downcast_ref(),
            Some(PublishError::TooLarge { max: 200, .. })
        ),
        "{err}"
    );
    assert_eq!(
        sent.lock().unwrap().len(),
        1,
        "nothing sent for the big one"
    );
}

#[tokio::test(start_paused = true)]
async fn the_outbound_stack_retries_an_attempt_that_waited_too_long() {
    let attempts = Arc::new(AtomicUsize::new(0));
    let counted = attempts.clone();
    let sink = tower::service_fn(move |_: Request<Bytes>| {
        let first = counted.fetch_add(1, Ordering::SeqCst) == 0;
        async move {
            if first {
                std::future::pending::<()>().await;
            }
            Ok::<_, BoxError>(())
        }
    });
    let svc = OutboundStack::new("me")
        .timeout(Duration::from_secs(5))
        .service(sink);
    let env = Envelope::new("a.b", json!({})).unwrap();
    svc.oneshot(Request::builder("a/b").body(env).unwrap())
        .await
        .unwrap();
    assert_eq!(attempts.load(Ordering::SeqCst), 2);
}
