use super::{
    key::{hash_entries, hash_object},
    store::Store,
    *,
};
use crate::decode::RawPayload;
use serde_json::{json, Map, Value};
use std::{
    convert::Infallible,
    future::Future,
    hash::{DefaultHasher, Hasher},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    task::Poll,
};
use tower::{Layer, Service, ServiceBuilder, ServiceExt};
use tower_mqtt_core::{Envelope, HandlerError, Outcome, Request};
use tower_test::mock;

fn canonical_hash(data: &Map<String, Value>) -> u64 {
    let mut hasher = DefaultHasher::new();
    hash_object(data, &mut hasher);
    hasher.finish()
}

const ID: &str = "3f1c9b1e8a2d4c6f9e0b7a5d4c3b2a19";

fn msg(event_type: &str, data: Value) -> Request<Envelope> {
    let env = Envelope::new(event_type, data).unwrap().with_id(ID);
    Request::builder("a/b").body(env).unwrap()
}

/// A handler that counts its calls and answers with `outcome()`.
fn counting(
    outcome: fn() -> Outcome,
) -> (
    Arc<AtomicUsize>,
    impl Service<Request<Envelope>, Response = Outcome, Error = Infallible, Future: Send> + Clone,
) {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let svc = tower::service_fn(move |_req: Request<Envelope>| {
        counter.fetch_add(1, Ordering::SeqCst);
        async move { Ok::<_, Infallible>(outcome()) }
    });
    (calls, svc)
}

async fn send<S>(svc: &S, req: Request<Envelope>) -> Outcome
where
    S: Service<Request<Envelope>, Response = Outcome, Error = Infallible> + Clone,
{
    svc.clone().oneshot(req).await.unwrap()
}

#[tokio::test]
async fn a_copy_is_a_duplicate_and_skips_the_handler() {
    let (calls, handler) = counting(|| Outcome::Handled);
    let svc = DedupLayer::new().layer(handler);
    let first = send(&svc, msg("t", json!({"x": 1}))).await;
    let second = send(&svc, msg("t", json!({"x": 1}))).await;
    assert!(matches!(first, Outcome::Handled));
    assert!(matches!(second, Outcome::Duplicate));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn stream_chunks_sharing_an_id_all_get_through() {
    let (calls, handler) = counting(|| Outcome::Handled);
    let svc = Dedup::new(handler);
    for seq in 0..5 {
        let outcome = send(&svc, msg("llm.stream", json!({"seq": seq, "delta": "x"}))).await;
        assert!(matches!(outcome, Outcome::Handled), "chunk {seq}");
    }
    // A chunk is identified by its seq alone: a resent chunk 2 is a duplicate
    // even if its delta differs.
    let again = send(&svc, msg("llm.stream", json!({"seq": 2, "delta": "y"}))).await;
    assert!(matches!(again, Outcome::Duplicate));
    assert_eq!(calls.load(Ordering::SeqCst), 5);
}

#[tokio::test]
async fn without_an_integer_seq_the_data_decides() {
    let (calls, handler) = counting(|| Outcome::Handled);
    let svc = Dedup::new(handler);
    for data in [
        json!({"text": "a"}),
        json!({"text": "b"}),
        json!({"seq": "1"}),
        json!({"seq": 1.5}),
        json!({"seq": 1}),
    ] {
        assert!(matches!(send(&svc, msg("t", data)).await, Outcome::Handled));
    }
    // Another type with the same id and data is another message.
    assert!(matches!(
        send(&svc, msg("u", json!({"text": "a"}))).await,
        Outcome::Handled
    ));
    assert!(matches!(
        send(&svc, msg("t", json!({"seq": 1.5}))).await,
        Outcome::Duplicate
    ));
    assert_eq!(calls.load(Ordering::SeqCst), 6);
}

#[test]
fn keys_are_the_fleet_key_parts() {
    let key = |event_type: &str, id: &str, data: Value| {
        DedupKey::new(&Envelope::new(event_type, data).unwrap().with_id(id))
    };
    let chunk = key("llm.stream", ID, json!({"seq": 7, "delta": "a"}));
    // With an integer seq, the rest of the data does not count.
    assert_eq!(
        chunk,
        key("llm.stream", ID, json!({"seq": 7, "delta": "b"}))
    );
    assert_ne!(
        chunk,
        key("llm.stream", ID, json!({"seq": 8, "delta": "a"}))
    );
    assert_ne!(chunk, key("llm.other", ID, json!({"seq": 7, "delta": "a"})));
    assert_ne!(chunk, key("llm.stream", "another", json!({"seq": 7})));
    // Without one, the data does, and the source and ts never do.
    let env = Envelope::new("t", json!({"a": 1})).unwrap().with_id(ID);
    let same = env.clone().with_source("elsewhere").with_ts(1.0);
    assert_eq!(DedupKey::new(&env), DedupKey::new(&same));
    assert_ne!(DedupKey::new(&env), key("t", ID, json!({"a": 2})));
    let text = chunk.to_string();
    assert_eq!(text.len(), 32);
    assert!(format!("{chunk:?}").contains(&text));
}

#[test]
fn type_and_id_are_not_confused_at_their_border() {
    let a = Envelope::from_map("ab", Map::new()).with_id("c");
    let b = Envelope::from_map("a", Map::new()).with_id("bc");
    assert_ne!(DedupKey::new(&a), DedupKey::new(&b));
}

#[test]
fn canonical_hash_ignores_key_order_at_every_level() {
    let a: Map<String, Value> =
        serde_json::from_str(r#"{"b":{"y":1,"x":[{"q":1,"p":2}]},"a":null}"#).unwrap();
    let b: Map<String, Value> =
        serde_json::from_str(r#"{"a":null,"b":{"x":[{"p":2,"q":1}],"y":1}}"#).unwrap();
    assert_eq!(canonical_hash(&a), canonical_hash(&b));

    // The sorting fallback, for maps that keep insertion order.
    let (k1, k2) = ("a".to_owned(), "b".to_owned());
    let (v1, v2) = (json!(1), json!([true]));
    let hash = |entries: &[(&String, &Value)]| {
        let mut hasher = DefaultHasher::new();
        hash_entries(entries.iter().copied(), entries.len(), &mut hasher);
        hasher.finish()
    };
    assert_eq!(
        hash(&[(&k2, &v2), (&k1, &v1)]),
        hash(&[(&k1, &v1), (&k2, &v2)])
    );
    assert_ne!(
        hash(&[(&k1, &v2), (&k2, &v1)]),
        hash(&[(&k1, &v1), (&k2, &v2)])
    );
}

#[test]
fn canonical_hash_tells_values_apart() {
    let hashes: Vec<u64> = [
        json!({}),
        json!({"a": null}),
        json!({"a": false}),
        json!({"a": 0}),
        json!({"a": "0"}),
        json!({"a": []}),
        json!({"a": {}}),
        json!({"a": [null]}),
        json!({"a": [[]]}),
        json!({"a": ["x", "y"]}),
        json!({"a": ["xy"]}),
        json!({"a": 1.0}),
        json!({"a": 1}),
        json!({"ab": 1}),
    ]
    .iter()
    .map(|v| canonical_hash(v.as_object().unwrap()))
    .collect();
    let mut unique = hashes.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), hashes.len());
}

#[tokio::test]
async fn raw_payloads_are_never_duplicates() {
    let (calls, handler) = counting(|| Outcome::Handled);
    let svc = Dedup::new(handler);
    for _ in 0..3 {
        let mut req = msg("t", json!({"x": 1}));
        req.extensions_mut()
            .insert(RawPayload::new(bytes::Bytes::from_static(br#"{"x":1}"#)));
        assert!(matches!(send(&svc, req).await, Outcome::Handled));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_delivery_handled_before_is_a_duplicate_beyond_the_window_unless_raw() {
    let (calls, handler) = counting(|| Outcome::Handled);
    // A window of one entry has long forgotten the first copy.
    let svc = Dedup::with_limits(handler, std::time::Duration::from_secs(30), 1);
    assert!(matches!(
        send(&svc, msg("t", json!({"x": 1}))).await,
        Outcome::Handled
    ));
    assert!(matches!(
        send(&svc, msg("t", json!({"x": 2}))).await,
        Outcome::Handled
    ));
    let mut again = msg("t", json!({"x": 1}));
    again.extensions_mut().insert(tower_mqtt::HandledBefore);
    assert!(matches!(send(&svc, again).await, Outcome::Duplicate));
    let mut raw = msg("t", json!({"x": 3}));
    raw.extensions_mut().insert(tower_mqtt::HandledBefore);
    raw.extensions_mut()
        .insert(RawPayload::new(bytes::Bytes::from_static(br#"{"x":3}"#)));
    assert!(matches!(send(&svc, raw).await, Outcome::Handled));
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    // Dedup turned off lets it run.
    let (calls, handler) = counting(|| Outcome::Handled);
    let off = DedupLayer::disabled().layer(handler);
    let mut again = msg("t", json!({"x": 1}));
    again.extensions_mut().insert(tower_mqtt::HandledBefore);
    assert!(matches!(send(&off, again).await, Outcome::Handled));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn of_two_concurrent_copies_exactly_one_reaches_the_handler() {
    let (mock, mut handle) = mock::pair::<Request<Envelope>, Outcome>();
    let svc = DedupLayer::new().layer(mock);
    handle.allow(2);
    let first = tokio::spawn(svc.clone().oneshot(msg("t", json!({"x": 1}))));
    let (_req, respond) = handle.next_request().await.unwrap();
    // The first is still running: the copy is answered at once.
    let second = svc
        .clone()
        .oneshot(msg("t", json!({"x": 1})))
        .await
        .unwrap();
    assert!(matches!(second, Outcome::Duplicate));
    respond.send_response(Outcome::Handled);
    assert!(matches!(first.await.unwrap().unwrap(), Outcome::Handled));
    assert!(futures_util::FutureExt::now_or_never(handle.next_request()).is_none());
}

#[test]
fn concurrent_claims_on_threads_admit_one() {
    let seen = Store::new(DEFAULT_TTL, DEFAULT_MAX_ENTRIES);
    let key = DedupKey::new(msg("t", json!({"x": 1})).body());
    let barrier = Arc::new(std::sync::Barrier::new(8));
    let admitted: usize = (0..8)
        .map(|_| {
            let (seen, barrier) = (seen.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                seen.claim(key).map(|mut claim| claim.keep()).is_ok()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|thread| usize::from(thread.join().unwrap()))
        .sum();
    assert_eq!(admitted, 1);
}

#[tokio::test]
async fn a_failed_message_is_handled_again_on_redelivery() {
    let (calls, handler) = counting(|| Outcome::Failed(HandlerError::new("db down")));
    let svc = Dedup::new(handler);
    for _ in 0..2 {
        assert!(send(&svc, msg("t", json!({"x": 1}))).await.is_failed());
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn an_error_or_a_dropped_future_releases_the_key() {
    let (mock, mut handle) = mock::pair::<Request<Envelope>, Outcome>();
    let svc = Dedup::new(mock);
    // Four calls: a duplicate too waits for the inner service's readiness.
    handle.allow(4);

    let call = svc.clone().oneshot(msg("t", json!({"x": 1})));
    let (result, ()) = tokio::join!(call, async {
        let (_, respond) = handle.next_request().await.unwrap();
        respond.send_error(std::io::Error::other("boom"));
    });
    assert!(result.is_err());

    // Redelivered, and this time the caller gives up (a timeout, a shutdown).
    let mut call = Box::pin(svc.clone().oneshot(msg("t", json!({"x": 1}))));
    let pending = std::future::poll_fn(|cx| Poll::Ready(call.as_mut().poll(cx).is_pending())).await;
    assert!(pending);
    let (_, _respond) = handle.next_request().await.unwrap();
    drop(call);

    // Redelivered again: handled.
    let call = svc.clone().oneshot(msg("t", json!({"x": 1})));
    let (result, ()) = tokio::join!(call, async {
        let (_, respond) = handle.next_request().await.unwrap();
        respond.send_response(Outcome::Handled);
    });
    assert!(matches!(result.unwrap(), Outcome::Handled));
    assert!(matches!(
        svc.oneshot(msg("t", json!({"x": 1}))).await.unwrap(),
        Outcome::Duplicate
    ));
}

#[tokio::test]
async fn unrouted_and_duplicate_outcomes_keep_the_key() {
    let (calls, handler) = counting(|| Outcome::Unrouted);
    let svc = Dedup::new(handler);
    assert!(matches!(
        send(&svc, msg("t", json!({}))).await,
        Outcome::Unrouted
    ));
    assert!(matches!(
        send(&svc, msg("t", json!({}))).await,
        Outcome::Duplicate
    ));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_copy_after_the_ttl_is_handled_again() {
    let (calls, handler) = counting(|| Outcome::Handled);
    let svc = Dedup::with_limits(handler, Duration::from_secs(30), 16);
    assert!(matches!(
        send(&svc, msg("t", json!({}))).await,
        Outcome::Handled
    ));
    tokio::time::advance(Duration::from_secs(29)).await;
    assert!(matches!(
        send(&svc, msg("t", json!({}))).await,
        Outcome::Duplicate
    ));
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(matches!(
        send(&svc, msg("t", json!({}))).await,
        Outcome::Handled
    ));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn a_late_failure_does_not_release_a_newer_claim() {
    let (mock, mut handle) = mock::pair::<Request<Envelope>, Outcome>();
    let svc = Dedup::new(mock);
    handle.allow(3);
    let old = tokio::spawn(svc.clone().oneshot(msg("t", json!({}))));
    let (_, respond_old) = handle.next_request().await.unwrap();
    tokio::time::advance(DEFAULT_TTL).await;
    let new = tokio::spawn(svc.clone().oneshot(msg("t", json!({}))));
    let (_, respond_new) = handle.next_request().await.unwrap();

    respond_old.send_response(Outcome::Failed(HandlerError::new("slow and failed")));
    assert!(old.await.unwrap().unwrap().is_failed());
    // The newer attempt still holds the key.
    assert!(matches!(
        svc.clone().oneshot(msg("t", json!({}))).await.unwrap(),
        Outcome::Duplicate
    ));
    respond_new.send_response(Outcome::Handled);
    assert!(matches!(new.await.unwrap().unwrap(), Outcome::Handled));
}

#[test]
fn limits_reach_the_store() {
    let layer = DedupLayer::new();
    let store = layer.store.as_ref().unwrap();
    assert_eq!(
        (store.ttl(), store.max_entries()),
        (DEFAULT_TTL, DEFAULT_MAX_ENTRIES)
    );
    let layer = DedupLayer::with_limits(Duration::from_secs(5), 10);
    let store = layer.store.as_ref().unwrap();
    assert_eq!(
        (store.ttl(), store.max_entries()),
        (Duration::from_secs(5), 10)
    );
    assert!(format!("{layer:?}").contains("max_entries: 10"));
}

#[tokio::test]
async fn the_oldest_keys_are_evicted_beyond_max_entries() {
    let (calls, handler) = counting(|| Outcome::Handled);
    let layer = DedupLayer::with_limits(DEFAULT_TTL, 4);
    let svc = layer.layer(handler);
    for n in 0..8 {
        send(&svc, msg("t", json!({"n": n}))).await;
        assert!(layer.store.as_ref().unwrap().len() <= 4);
    }
    // The newest are remembered, the oldest are not.
    for n in [6, 7] {
        assert!(matches!(
            send(&svc, msg("t", json!({"n": n}))).await,
            Outcome::Duplicate
        ));
    }
    assert!(matches!(
        send(&svc, msg("t", json!({"n": 0}))).await,
        Outcome::Handled
    ));
    assert_eq!(calls.load(Ordering::SeqCst), 9);
}

/// The bound holds for a big store too, with keys spread over its shards;
/// each shard always remembers the newest half of its part, so the newest
/// keys overall are remembered but for the unevenness of the spread (the
/// newest 35 % here: every shard's share of them stays far below half).
#[tokio::test]
async fn a_large_store_stays_within_its_bound() {
    let (_calls, handler) = counting(|| Outcome::Handled);
    let max = 10_000;
    let layer = DedupLayer::with_limits(DEFAULT_TTL, max);
    let svc = layer.layer(handler);
    let store = layer.store.clone().unwrap();
    for n in 0..50_000 {
        send(&svc, msg("t", json!({"seq": n}))).await;
    }
    let held = store.len();
    assert!(held <= 10_000, "{held} keys held");
    assert!(held >= 5_000, "{held} keys held");
    for n in 46_500..50_000 {
        assert!(
            matches!(
                send(&svc, msg("t", json!({"seq": n}))).await,
                Outcome::Duplicate
            ),
            "seq {n} forgotten"
        );
    }
}

/// Expired keys are dropped without a scan: a store idle for a TTL holds
/// only what came after.
#[tokio::test(start_paused = true)]
async fn expired_keys_are_dropped_as_new_ones_arrive() {
    let (_calls, handler) = counting(|| Outcome::Handled);
    let layer = DedupLayer::with_limits(Duration::from_secs(30), 4);
    let svc = layer.layer(handler);
    let store = layer.store.clone().unwrap();
    send(&svc, msg("t", json!({"n": 0}))).await;
    send(&svc, msg("t", json!({"n": 1}))).await;
    tokio::time::advance(Duration::from_secs(30)).await;
    send(&svc, msg("t", json!({"n": 2}))).await;
    tokio::time::advance(Duration::from_secs(30)).await;
    send(&svc, msg("t", json!({"n": 3}))).await;
    assert_eq!(store.len(), 2, "the first two are gone");
    assert!(matches!(
        send(&svc, msg("t", json!({"n": 0}))).await,
        Outcome::Handled
    ));
}

#[tokio::test(start_paused = true)]
async fn a_timed_out_handler_releases_the_key() {
    // Dedup -> tower's Timeout -> handler: the timeout's error is a failure.
    let slow = Arc::new(AtomicUsize::new(0));
    let counter = slow.clone();
    let svc = ServiceBuilder::new()
        .layer(DedupLayer::new())
        .timeout(Duration::from_secs(1))
        .service(tower::service_fn(move |_req: Request<Envelope>| {
            let first = counter.fetch_add(1, Ordering::SeqCst) == 0;
            async move {
                if first {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                }
                Ok::<_, Infallible>(Outcome::Handled)
            }
        }));
    let err = svc.clone().oneshot(msg("t", json!({}))).await.unwrap_err();
    assert!(err.is::<tower::timeout::error::Elapsed>());
    let outcome = svc.clone().oneshot(msg("t", json!({}))).await.unwrap();
    assert!(matches!(outcome, Outcome::Handled));
    assert_eq!(slow.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_zero_ttl_turns_dedup_off() {
    for layer in [
        DedupLayer::with_limits(Duration::ZERO, 16),
        DedupLayer::disabled(),
    ] {
        assert!(!layer.is_enabled());
        assert!(layer.store.is_none(), "no cache is kept");
        let (calls, handler) = counting(|| Outcome::Handled);
        let svc = layer.layer(handler);
        for _ in 0..3 {
            assert!(matches!(
                send(&svc, msg("t", json!({"x": 1}))).await,
                Outcome::Handled
            ));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }
    assert!(DedupLayer::new().is_enabled());
}
