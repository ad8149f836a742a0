//! tower's own layers through the real client, with the semantics the README
//! documents: `Serve::layer` puts them around the router, inside the standard
//! stack, so what they refuse is retried by the stack's retry and, past its
//! attempts, failed and acknowledged (counted in `Stats::failed`).

mod support;

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use serde_json::json;
use support::{QoS as WireQoS, TestBroker};
use tower::{
    buffer::BufferLayer, limit::ConcurrencyLimitLayer, limit::RateLimitLayer,
    load_shed::LoadShedLayer, timeout::TimeoutLayer, ServiceBuilder,
};
use tower_mqtt::{config::Config, Envelope, Request, Router, Running};

const WAIT: Duration = Duration::from_secs(30);

fn config(url: &str, name: &str) -> Config {
    support::service_config(url, name)
}

async fn publish(url: &str, topic: &str, n: usize) {
    let env = Envelope::new("load.item", json!({ "n": n })).unwrap();
    support::publish_raw(url, topic, env.to_vec(), WireQoS::AtLeastOnce, false).await;
}

async fn settle(running: &Running, total: u64) -> tower_mqtt::runtime::Stats {
    tokio::time::timeout(WAIT, async {
        loop {
            let stats = running.stats();
            if stats.handled + stats.failed >= total && stats.pending == 0 {
                return stats;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("every message settled")
}

#[tokio::test]
async fn rate_limit_behind_a_buffer_delays_but_loses_nothing() {
    let broker = TestBroker::start().await;
    let seen = Arc::new(AtomicUsize::new(0));
    let counted = seen.clone();
    let router = Router::new().route("rate/+", move |_req: Request<Envelope>| {
        counted.fetch_add(1, Ordering::SeqCst);
        std::future::ready(())
    });
    // RateLimit is not Clone: a Buffer in front gives every worker a handle
    // to the one limiter.
    let limited = ServiceBuilder::new()
        .layer(BufferLayer::new(64))
        .layer(RateLimitLayer::new(5, Duration::from_millis(50)));
    let running = tower_mqtt::serve(config(&broker.url(), "rate"), router)
        .layer(limited)
        .spawn()
        .unwrap();
    tokio::time::timeout(WAIT, running.ready())
        .await
        .unwrap()
        .expect("subscribed");
    for n in 0..20 {
        publish(&broker.url(), &format!("rate/{}", n % 4), n).await;
    }
    let stats = settle(&running, 20).await;
    assert_eq!((stats.handled, stats.failed), (20, 0), "{stats:?}");
    assert_eq!(seen.load(Ordering::SeqCst), 20);
    running.shutdown().await;
}

#[tokio::test]
async fn a_shed_message_is_retried_then_failed_and_acknowledged() {
    let broker = TestBroker::start().await;
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = runs.clone();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let held = gate.clone();
    let router = Router::new().route("shed/+", move |req: Request<Envelope>| {
        let (counted, held) = (counted.clone(), held.clone());
        async move {
            counted.fetch_add(1, Ordering::SeqCst);
            if req.topic() == "shed/slow" {
                held.acquire().await.unwrap().forget();
            }
        }
    });
    // One message at a time; what finds the limit taken is shed.
    let shedding = ServiceBuilder::new()
        .layer(LoadShedLayer::new())
        .layer(ConcurrencyLimitLayer::new(1));
    let running = tower_mqtt::serve(config(&broker.url(), "shed"), router)
        .layer(shedding)
        .spawn()
        .unwrap();
    tokio::time::timeout(WAIT, running.ready())
        .await
        .unwrap()
        .expect("subscribed");
    publish(&broker.url(), "shed/slow", 0).await;
    tokio::time::timeout(WAIT, async {
        while runs.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    // Another topic runs side by side in the dispatcher, so it meets the
    // taken limit: shed on every attempt while slow is held.
    publish(&broker.url(), "shed/fast", 1).await;
    tokio::time::timeout(WAIT, async {
        while running.stats().failed == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the shed message fails after its retries");
    gate.add_permits(1);
    let stats = settle(&running, 2).await;
    assert_eq!((stats.handled, stats.failed), (1, 1), "{stats:?}");
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "a shed message never reached the handler"
    );
    running.shutdown().await;
}

#[tokio::test]
async fn timeout_fails_a_slow_handler_after_its_retries() {
    let broker = TestBroker::start().await;
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = runs.clone();
    let router = Router::new().route("slow", move |_req: Request<Envelope>| {
        counted.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(60))
    });
    let running = tower_mqtt::serve(config(&broker.url(), "timeout"), router)
        .layer(TimeoutLayer::new(Duration::from_millis(50)))
        .spawn()
        .unwrap();
    tokio::time::timeout(WAIT, running.ready())
        .await
        .unwrap()
        .expect("subscribed");
    publish(&broker.url(), "slow", 0).await;
    let stats = settle(&running, 1).await;
    assert_eq!((stats.handled, stats.failed), (0, 1), "{stats:?}");
    assert_eq!(
        runs.load(Ordering::SeqCst),
        3,
        "the inbound stack's three attempts"
    );
    running.shutdown().await;
}
