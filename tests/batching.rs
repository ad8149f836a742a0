//! The batching layer through the real client: every message is handled in a
//! batch of at most N and acknowledged once its batch is done.

mod support;

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde_json::json;
use support::{unique_id, Mosquitto, QoS as WireQoS};
use tower::{service_fn, Layer, ServiceBuilder};
use tower_mqtt::{
    config::Config,
    layers::batch::{Batch, BatchLayer},
    BoxError, Envelope, Router, Subscription,
};

const WAIT: Duration = Duration::from_secs(60);
const MAX: usize = 50;
const MAX_WAIT: Duration = Duration::from_millis(100);

/// Each batch's `n`s, and how long its first message waited.
type Batches = Arc<Mutex<Vec<(Vec<u64>, Duration)>>>;

/// Publishes `total` readings at QoS 1 from one client, 100 in flight, so
/// they arrive together.
async fn publish_fast(url: &str, total: u64) {
    let (host, port) = support::host_port(url);
    let mut options = rumqttc::MqttOptions::new(unique_id("readings"), host, port);
    options.set_inflight(100);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 2000);
    for n in 0..total {
        let env = Envelope::new("reading", json!({ "n": n })).unwrap();
        let topic = format!("readings/{}", n % 5);
        client
            .publish(topic, WireQoS::AtLeastOnce, false, env.to_vec())
            .await
            .unwrap();
    }
    support::await_pubacks(&mut eventloop, usize::try_from(total).unwrap(), WAIT).await;
}

#[tokio::test]
async fn a_thousand_messages_arrive_in_batches_and_are_all_acknowledged() {
    let broker = Mosquitto::start_with_config("max_queued_messages 0\nlog_type error\n").await;
    let url = broker.url();
    let client_id = unique_id("batching");
    let config = || {
        Config::new(&url)
            .unwrap()
            .with_client_id(&client_id)
            .with_clean_session(false)
    };
    let batches: Batches = Arc::default();
    let log = batches.clone();
    let store = service_fn(move |batch: Batch| {
        // How long the batch's first message waited for the batch.
        let waited = batch
            .iter()
            .filter_map(|req| req.extensions().get::<Instant>())
            .min()
            .map_or(Duration::ZERO, Instant::elapsed);
        let ns = batch
            .iter()
            .map(|req| req.body().data()["n"].as_u64().unwrap())
            .collect();
        log.lock().unwrap().push((ns, waited));
        std::future::ready(Ok::<_, BoxError>(()))
    });
    let stamped = ServiceBuilder::new()
        .map_request(|mut req: tower_mqtt::Request<Envelope>| {
            req.extensions_mut().insert(Instant::now());
            req
        })
        .service(BatchLayer::new(MAX, MAX_WAIT).layer(store));
    let router = Router::new().route_service(Subscription::new("readings/+").unordered(), stamped);
    let running = tower_mqtt::serve(config(), router.clone()).spawn().unwrap();
    tokio::time::timeout(WAIT, running.ready())
        .await
        .unwrap()
        .expect("subscribed");

    let total: u64 = 1000;
    publish_fast(&url, total).await;
    tokio::time::timeout(WAIT, async {
        loop {
            let stats = running.stats();
            if stats.handled >= total && stats.pending == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("every message handled and acknowledged");
    let report = running.shutdown().await;
    assert!(report.disconnected_cleanly, "{report:?}");
    let stats = report.stats;
    assert_eq!((stats.handled, stats.failed), (total, 0), "{stats:?}");

    let batches = batches.lock().unwrap().clone();
    let seen: HashSet<u64> = batches.iter().flat_map(|(ns, _)| ns.clone()).collect();
    assert_eq!(
        seen.len(),
        usize::try_from(total).unwrap(),
        "each message once"
    );
    assert!(batches.iter().all(|(ns, _)| ns.len() <= MAX));
    let largest = batches.iter().map(|(ns, _)| ns.len()).max().unwrap_or(0);
    let longest = batches.iter().map(|(_, w)| *w).max().unwrap_or_default();
    eprintln!(
        "FIGURES batching: messages={total} batches={} largest={largest} longest_wait_ms={}",
        batches.len(),
        longest.as_millis()
    );

    // Everything was acknowledged: the session gives nothing back.
    let again = Arc::new(Mutex::new(Vec::new()));
    let counted = again.clone();
    let router = Router::new().route("readings/+", move |req: tower_mqtt::Request<Envelope>| {
        counted.lock().unwrap().push(req.body().data()["n"].clone());
        std::future::ready(())
    });
    let running = tower_mqtt::serve(config(), router).spawn().unwrap();
    tokio::time::timeout(WAIT, running.ready())
        .await
        .unwrap()
        .expect("subscribed");
    tokio::time::sleep(Duration::from_millis(500)).await;
    running.shutdown().await;
    let again = again.lock().unwrap();
    assert!(
        again.is_empty(),
        "nothing was left unacknowledged; back: {again:?}, first life: {stats:?}"
    );
}

#[tokio::test]
async fn a_consumer_killed_mid_batch_gets_the_batch_again() {
    let broker = Mosquitto::start_with_config("max_queued_messages 0\nlog_type error\n").await;
    let url = broker.url();
    let proxy = support::Proxy::start(broker.addr()).await;
    let client_id = unique_id("mid-batch");
    let config = |url: &str| {
        Config::new(url)
            .unwrap()
            .with_client_id(&client_id)
            .with_clean_session(false)
    };
    // A batch that waits for ten messages or a minute: five stay pending.
    let handled = Arc::new(Mutex::new(0usize));
    let counted = handled.clone();
    let store = service_fn(move |batch: Batch| {
        *counted.lock().unwrap() += batch.len();
        std::future::ready(Ok::<_, BoxError>(()))
    });
    let router = Router::new().route_service(
        Subscription::new("readings/+").unordered(),
        BatchLayer::new(10, Duration::from_secs(60)).layer(store),
    );
    let running = tower_mqtt::serve(config(&proxy.url()), router)
        .spawn()
        .unwrap();
    tokio::time::timeout(WAIT, running.ready())
        .await
        .unwrap()
        .expect("subscribed");
    publish_fast(&url, 5).await;
    tokio::time::timeout(WAIT, async {
        while running.stats().received < 5 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the five arrived");
    // The process "dies" mid-batch: cut off, never to return.
    proxy.refuse();
    proxy.cut().await;
    let report = tokio::time::timeout(WAIT, running.shutdown())
        .await
        .unwrap();
    assert_eq!(
        *handled.lock().unwrap(),
        0,
        "the batch was never handed over"
    );
    assert_eq!(report.stats.handled, 0);

    // The same session again: the whole batch comes back.
    let again = Arc::new(Mutex::new(HashSet::new()));
    let seen = again.clone();
    let router = Router::new().route("readings/+", move |req: tower_mqtt::Request<Envelope>| {
        seen.lock()
            .unwrap()
            .insert(req.body().data()["n"].as_u64().unwrap());
        std::future::ready(())
    });
    let running = tower_mqtt::serve(config(&url), router).spawn().unwrap();
    tokio::time::timeout(WAIT, async {
        while again.lock().unwrap().len() < 5 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the batch came back");
    running.shutdown().await;
    assert_eq!(*again.lock().unwrap(), (0..5).collect::<HashSet<u64>>());
}
