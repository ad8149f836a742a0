//! The runtime against a real broker: subscribe and handle, reconnect,
//! ordering, overflow, acknowledgement after handling, Last Will, shutdown.

mod support;

use support::service_config as config;

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use rumqttc::QoS as WireQoS;
use serde_json::json;
use support as probe;
use support::{Proxy, TestBroker};
use tokio::sync::mpsc;
use tower_mqtt::{
    config::Config, Client, ConnectionState, Envelope, Overflow, Request, Router, Subscription,
};

const WAIT: Duration = Duration::from_secs(15);

fn envelope_bytes(event: &str, data: serde_json::Value) -> Vec<u8> {
    Envelope::new(event, data).unwrap().to_vec()
}

/// A handler that forwards what it sees.
fn recorder(
    tx: mpsc::UnboundedSender<(String, Envelope)>,
) -> impl Fn(Request<Envelope>) -> std::future::Ready<()> + Clone + Send + Sync + 'static {
    move |req: Request<Envelope>| {
        let _ = tx.send((req.topic().to_string(), req.body().clone()));
        std::future::ready(())
    }
}

async fn recv(rx: &mut mpsc::UnboundedReceiver<(String, Envelope)>) -> (String, Envelope) {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("a message in time")
        .expect("channel open")
}

#[tokio::test]
async fn subscribes_to_the_router_and_handles_messages() {
    let broker = TestBroker::start().await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let router = Router::new()
        .route("tts/say", recorder(tx.clone()))
        .route("camera/+/frame", recorder(tx));
    let running = tower_mqtt::serve(config(&broker.url(), "subscriber"), router)
        .spawn()
        .unwrap();
    tokio::time::timeout(WAIT, running.connected())
        .await
        .unwrap();

    // The subscription is made after CONNACK; publish until it is in place.
    let publisher = running.publisher();
    let say = Envelope::new("tts.say", json!({"text": "hello"})).unwrap();
    let got = loop {
        publisher
            .send(Request::builder("tts/say").body(say.clone()).unwrap())
            .await
            .unwrap();
        if let Ok(Some(got)) = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await {
            break got;
        }
    };
    assert_eq!(got.0, "tts/say");
    assert_eq!(got.1.id(), say.id());
    assert_eq!(
        got.1.source(),
        "subscriber",
        "the publisher stamps its name"
    );

    probe::publish_raw(
        &broker.url(),
        "camera/front/frame",
        envelope_bytes("camera.frame", json!({"n": 1})),
        WireQoS::AtLeastOnce,
        false,
    )
    .await;
    let (topic, env) = recv(&mut rx).await;
    assert_eq!(topic, "camera/front/frame");
    assert_eq!(env.data()["n"], 1);

    let report = running.shutdown().await;
    assert!(report.disconnected_cleanly);
    assert!(report.stats.handled >= 2);
}

#[tokio::test]
async fn reconnects_and_resubscribes_after_a_broker_restart() {
    let mut broker = TestBroker::start().await;
    if !broker.is_mosquitto() {
        eprintln!("skipped: needs mosquitto to restart the broker");
        return;
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    // The default delays (0.5 s to 5 s), as a service would run.
    let cfg = config(&broker.url(), "restart")
        .with_reconnect_delays(Duration::from_millis(500), Duration::from_secs(5));
    let running = tower_mqtt::serve(cfg, Router::new().route("llm/request", recorder(tx)))
        .spawn()
        .unwrap();
    let mut state = running.state();
    tokio::time::timeout(WAIT, running.connected())
        .await
        .unwrap();

    let mut delays = Vec::new();
    for round in 0..3 {
        broker.stop().await.unwrap();
        tokio::time::timeout(
            WAIT,
            state.wait_for(|s| matches!(s, ConnectionState::Disconnected { .. })),
        )
        .await
        .unwrap()
        .unwrap();
        // Leave the client failing for a while so its backoff grows.
        tokio::time::sleep(Duration::from_secs(3)).await;
        broker.restart().await.unwrap();
        let back = Instant::now();
        tokio::time::timeout(WAIT, state.wait_for(ConnectionState::is_connected))
            .await
            .unwrap()
            .unwrap();
        let delay = back.elapsed();
        delays.push(delay);
        assert!(
            delay < Duration::from_secs(10),
            "round {round}: reconnected after {delay:?}"
        );

        // Resubscribed: a message published now reaches the handler.
        let sent = Envelope::new("llm.request", json!({"round": round})).unwrap();
        let got = loop {
            probe::publish_raw(
                &broker.url(),
                "llm/request",
                sent.to_vec(),
                WireQoS::AtLeastOnce,
                false,
            )
            .await;
            if let Ok(Some(got)) = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await
            {
                break got;
            }
        };
        assert_eq!(got.1.data()["round"], round);
    }
    eprintln!("reconnect delays after the broker came back: {delays:?}");
    let report = running.shutdown().await;
    assert_eq!(report.stats.connections, 4);
}

#[tokio::test]
async fn keeps_per_topic_order_while_topics_run_concurrently() {
    let broker = TestBroker::start().await;
    let seen: Arc<Mutex<Vec<(String, i64)>>> = Arc::default();
    let running_now = Arc::new(AtomicUsize::new(0));
    let max_running = Arc::new(AtomicUsize::new(0));
    let handler = {
        let (seen, running_now, max_running) =
            (seen.clone(), running_now.clone(), max_running.clone());
        move |req: Request<Envelope>| {
            let (seen, running_now, max_running) =
                (seen.clone(), running_now.clone(), max_running.clone());
            async move {
                let now = running_now.fetch_add(1, Ordering::SeqCst) + 1;
                max_running.fetch_max(now, Ordering::SeqCst);
                let n = req.body().data()["n"].as_i64().unwrap();
                // Later messages finish faster: any reordering would show.
                tokio::time::sleep(Duration::from_millis(u64::try_from(20 - n % 20).unwrap()))
                    .await;
                seen.lock().unwrap().push((req.topic().to_string(), n));
                running_now.fetch_sub(1, Ordering::SeqCst);
            }
        }
    };
    let running = tower_mqtt::serve(
        config(&broker.url(), "order"),
        Router::new().route("order/+", handler),
    )
    .spawn()
    .unwrap();
    tokio::time::timeout(WAIT, running.connected())
        .await
        .unwrap();
    let publisher = running.publisher();
    // Wait until the subscription is live.
    loop {
        publisher
            .send(
                Request::builder("order/warmup")
                    .body(Envelope::new("t", json!({"n": 0})).unwrap())
                    .unwrap(),
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        if !seen.lock().unwrap().is_empty() {
            break;
        }
    }
    seen.lock().unwrap().clear();

    let topics = ["order/a", "order/b", "order/c", "order/d"];
    let per_topic = 30;
    for n in 1..=per_topic {
        for topic in topics {
            publisher
                .send(
                    Request::builder(topic)
                        .body(Envelope::new("t", json!({"n": n})).unwrap())
                        .unwrap(),
                )
                .await
                .unwrap();
        }
    }
    let deadline = Instant::now() + WAIT;
    while seen.lock().unwrap().len() < topics.len() * usize::try_from(per_topic).unwrap() {
        assert!(
            Instant::now() < deadline,
            "only {} handled",
            seen.lock().unwrap().len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seen = seen.lock().unwrap().clone();
    for topic in topics {
        let order: Vec<i64> = seen
            .iter()
            .filter(|(t, _)| t == topic)
            .map(|(_, n)| *n)
            .collect();
        assert_eq!(
            order,
            (1..=per_topic).collect::<Vec<_>>(),
            "{topic} out of order"
        );
    }
    assert!(
        max_running.load(Ordering::SeqCst) >= 2,
        "topics should overlap"
    );
    assert!(
        max_running.load(Ordering::SeqCst) <= topics.len(),
        "one at a time per topic"
    );
    running.shutdown().await;
}

/// Publishes `count` QoS 0 messages to `topic` as fast as the client allows.
async fn flood(url: &str, topic: &str, count: usize, qos: WireQoS) {
    let (client, mut eventloop) = rumqttc::AsyncClient::new(
        rumqttc::MqttOptions::new(
            probe::unique_id("flood"),
            "127.0.0.1",
            probe::host_port(url).1,
        ),
        count + 10,
    );
    for n in 0..count {
        client
            .publish(
                topic,
                qos,
                false,
                envelope_bytes("audio.fft", json!({"n": n})),
            )
            .await
            .unwrap();
    }
    client.disconnect().await.unwrap();
    loop {
        match eventloop.poll().await {
            Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

/// A slow handler: each message waits for a permit of `gate`, then its
/// `data.n` is recorded in `seen`.
#[allow(clippy::type_complexity)]
fn gated_recorder() -> (
    Arc<Mutex<Vec<i64>>>,
    Arc<tokio::sync::Semaphore>,
    impl Fn(Request<Envelope>) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
        + Clone
        + Send
        + Sync
        + 'static,
) {
    let seen: Arc<Mutex<Vec<i64>>> = Arc::default();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let handler = {
        let (seen, gate) = (seen.clone(), gate.clone());
        move |req: Request<Envelope>| {
            let (seen, gate) = (seen.clone(), gate.clone());
            Box::pin(async move {
                gate.acquire().await.unwrap().forget();
                seen.lock()
                    .unwrap()
                    .push(req.body().data()["n"].as_i64().unwrap());
            }) as std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
        }
    };
    (seen, gate, handler)
}

async fn overflow_case(policy: Overflow) -> (tower_mqtt::runtime::Stats, Vec<i64>) {
    let broker = TestBroker::start().await;
    let (seen, gate, handler) = gated_recorder();
    let sub = Subscription::new("audio/fft")
        .qos(tower_mqtt::QoS::AtMostOnce)
        .capacity(8)
        .overflow(policy);
    let mut cfg = config(&broker.url(), "overflow");
    let keep_alive = support::short_keep_alive();
    cfg = cfg.with_keep_alive(keep_alive);
    let running = tower_mqtt::serve(cfg, Router::new().route(sub, handler))
        .spawn()
        .unwrap();
    tokio::time::timeout(WAIT, running.connected())
        .await
        .unwrap();
    // Let the subscription land before flooding.
    let warm = running.publisher();
    loop {
        warm.publish("audio/fft", json!({"n": -1}))
            .qos(tower_mqtt::QoS::AtMostOnce)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        if running.stats().received > 0 {
            break;
        }
    }
    gate.add_permits(1);
    tokio::time::timeout(WAIT, async {
        while seen.lock().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    seen.lock().unwrap().clear();

    flood(&broker.url(), "audio/fft", 200, WireQoS::AtMostOnce).await;
    // Hold the handler past two keepalive periods: the connection must stay up.
    let deadline = Instant::now() + Duration::from_secs(5);
    while running.stats().received < 201 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(keep_alive * 2).await;
    gate.add_permits(1000);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let totals = running.stats();
    assert_eq!(
        totals.connections, 1,
        "no reconnect while the handler was slow: {totals:?}"
    );
    let seen_numbers = seen.lock().unwrap().clone();
    running.shutdown().await;
    (totals, seen_numbers)
}

#[tokio::test]
async fn drop_oldest_keeps_the_freshest_messages() {
    let (stats, handled) = overflow_case(Overflow::DropOldest).await;
    assert!(stats.dropped_oldest > 0, "{stats:?}");
    assert!(
        handled.len() <= 8 + 1,
        "bounded by the queue: {}",
        handled.len()
    );
    assert_eq!(
        handled.last(),
        Some(&199),
        "the newest survives: {handled:?}"
    );
}

#[tokio::test]
async fn drop_new_keeps_what_was_queued() {
    let (stats, handled) = overflow_case(Overflow::DropNew).await;
    assert!(stats.dropped_new > 0, "{stats:?}");
    assert!(
        handled.len() <= 8 + 1,
        "bounded by the queue: {}",
        handled.len()
    );
    assert_eq!(
        handled.first(),
        Some(&0),
        "the first queued survives: {handled:?}"
    );
}

#[tokio::test]
async fn block_drops_qos0_past_the_capacity_and_keeps_the_connection() {
    let (stats, handled) = overflow_case(Overflow::Block).await;
    // QoS 0 has no in-flight window to push back with: past the capacity the
    // newest are dropped, and the connection never waits for the handler.
    assert!(
        handled.windows(2).all(|w| w[0] < w[1]),
        "in order: {handled:?}"
    );
    assert_eq!(
        usize::try_from(stats.received - stats.dropped_new).unwrap() - 1,
        handled.len(),
        "every message not dropped was handled: {stats:?}"
    );
}

#[tokio::test]
async fn block_at_qos1_loses_nothing_and_pushes_back_on_the_broker() {
    let broker = TestBroker::start().await;
    let (seen, gate, handler) = gated_recorder();
    let keep_alive = support::short_keep_alive();
    let cfg = config(&broker.url(), "block").with_keep_alive(keep_alive);
    let running = tower_mqtt::serve(
        cfg,
        Router::new().route(Subscription::new("jobs/slow").capacity(8), handler),
    )
    .spawn()
    .unwrap();
    tokio::time::timeout(WAIT, running.ready())
        .await
        .unwrap()
        .expect("subscribed");

    let total = 120;
    let sender = tower_mqtt::serve(config(&broker.url(), "block-tx"), Router::new())
        .spawn()
        .unwrap();
    for n in 0..total {
        let job = Envelope::new("jobs.slow", json!({"n": n})).unwrap();
        sender
            .publisher()
            .send(Request::builder("jobs/slow").body(job).unwrap())
            .await
            .unwrap();
    }
    sender.shutdown().await;
    // Hold every handler past two keepalives.
    tokio::time::sleep(keep_alive * 2).await;
    let held = running.stats();
    assert!(
        held.received < u64::try_from(total).unwrap(),
        "the broker held messages back while none were acknowledged: {held:?}"
    );
    gate.add_permits(total);
    tokio::time::timeout(WAIT, async {
        while seen.lock().unwrap().len() < total {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "every message handled once the handler catches up: {} of {total}, {:?}",
            seen.lock().unwrap().len(),
            running.stats(),
        )
    });
    let order = seen.lock().unwrap().clone();
    assert_eq!(
        order,
        (0..i64::try_from(total).unwrap()).collect::<Vec<_>>()
    );
    let totals = running.stats();
    assert_eq!(totals.dropped_new + totals.dropped_oldest, 0, "{totals:?}");
    assert_eq!(totals.connections, 1, "no reconnect: {totals:?}");
    running.shutdown().await;
}

#[tokio::test]
async fn unacknowledged_messages_come_back_with_a_persistent_session() {
    let broker = TestBroker::start().await;
    let proxy = Proxy::start(broker.addr()).await;
    let client_id = probe::unique_id("persistent");
    let started = Arc::new(tokio::sync::Notify::new());

    // First life: the handler starts, then the process "dies" (its connection
    // is cut and never comes back) before the handler finishes.
    let hang = {
        let started = started.clone();
        move |_req: Request<Envelope>| {
            let started = started.clone();
            async move {
                started.notify_one();
                std::future::pending::<()>().await;
            }
        }
    };
    let cfg = config(&proxy.url(), "persistent")
        .with_client_id(&client_id)
        .with_clean_session(false);
    let first = tower_mqtt::serve(cfg, Router::new().route("jobs/run", hang))
        .drain_timeout(Duration::from_millis(100))
        .spawn()
        .unwrap();
    tokio::time::timeout(WAIT, first.connected()).await.unwrap();
    let job = Envelope::new("jobs.run", json!({"job": 42})).unwrap();
    let publish = async {
        loop {
            probe::publish_raw(
                &broker.url(),
                "jobs/run",
                job.to_vec(),
                WireQoS::AtLeastOnce,
                false,
            )
            .await;
            if tokio::time::timeout(Duration::from_millis(500), started.notified())
                .await
                .is_ok()
            {
                break;
            }
        }
    };
    tokio::time::timeout(WAIT, publish).await.unwrap();
    proxy.refuse();
    proxy.cut().await;
    let report = first.shutdown().await;
    assert_eq!(report.abandoned, 1, "{report:?}");
    assert!(!report.disconnected_cleanly);

    // Second life, same client id, straight to the broker: the message is back.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let cfg = config(&broker.url(), "persistent")
        .with_client_id(&client_id)
        .with_clean_session(false);
    let second = tower_mqtt::serve(cfg, Router::new().route("jobs/run", recorder(tx)))
        .spawn()
        .unwrap();
    let (_, env) = recv(&mut rx).await;
    assert_eq!(env.id(), job.id());
    second.shutdown().await;
}

#[tokio::test]
async fn last_will_on_an_abrupt_drop_and_none_on_a_clean_shutdown() {
    let broker = TestBroker::start().await;
    let proxy = Proxy::start(broker.addr()).await;
    let service = format!("svc{}", probe::unique_id("w").replace('-', ""));
    let mut health =
        probe::Probe::subscribe(&broker.url(), &format!("system/health/{service}")).await;

    let cfg = config(&proxy.url(), &service).with_health(true);
    let running = tower_mqtt::serve(cfg, Router::new()).spawn().unwrap();
    let ready = health.next(WAIT).await.expect("ready health");
    let ready = Envelope::from_slice(&ready.payload).unwrap();
    assert_eq!(ready.data()["event"], "ready");
    assert_eq!(ready.data()["ok"], true);
    assert_eq!(ready.event_type(), format!("system.health.{service}"));

    // Abrupt: the connection dies without DISCONNECT; the broker publishes the Will.
    proxy.refuse();
    proxy.cut().await;
    let will = health.next(WAIT).await.expect("the Last Will");
    let will = Envelope::from_slice(&will.payload).unwrap();
    assert_eq!(will.data()["event"], "offline");
    assert_eq!(will.data()["ok"], false);
    running.shutdown().await;

    // Clean: the final health is "shutdown" and no Will follows.
    let cfg = config(&broker.url(), &service).with_health(true);
    let running = tower_mqtt::serve(cfg, Router::new()).spawn().unwrap();
    let ready = health.next(WAIT).await.expect("ready again");
    assert_eq!(
        Envelope::from_slice(&ready.payload).unwrap().data()["event"],
        "ready"
    );
    let report = running.shutdown().await;
    assert!(
        report.health_published && report.disconnected_cleanly,
        "{report:?}"
    );
    let last = health.next(WAIT).await.expect("shutdown health");
    assert_eq!(
        Envelope::from_slice(&last.payload).unwrap().data()["event"],
        "shutdown"
    );
    let after = health.collect_for(Duration::from_secs(1)).await;
    assert!(
        after.is_empty(),
        "no Will after a clean shutdown: {after:?}"
    );
}

#[tokio::test]
async fn shutdown_lets_running_handlers_finish() {
    let broker = TestBroker::start().await;
    let done = Arc::new(AtomicUsize::new(0));
    let started = Arc::new(tokio::sync::Notify::new());
    let slow = {
        let (done, started) = (done.clone(), started.clone());
        move |_req: Request<Envelope>| {
            let (done, started) = (done.clone(), started.clone());
            async move {
                started.notify_one();
                tokio::time::sleep(Duration::from_millis(300)).await;
                done.fetch_add(1, Ordering::SeqCst);
            }
        }
    };
    let running = tower_mqtt::serve(
        config(&broker.url(), "drain"),
        Router::new().route("work/+", slow),
    )
    .drain_timeout(Duration::from_secs(5))
    .spawn()
    .unwrap();
    tokio::time::timeout(WAIT, running.ready())
        .await
        .unwrap()
        .expect("subscribed");
    let job = Envelope::new("w", json!({})).unwrap();
    running
        .publisher()
        .send(Request::builder("work/a").body(job).unwrap())
        .await
        .unwrap();
    tokio::time::timeout(WAIT, started.notified())
        .await
        .unwrap();
    let handle = running.shutdown_handle();
    handle.shutdown();
    handle.shutdown(); // idempotent
    let report = running.join().await;
    assert!(report.finished >= 1, "{report:?}");
    assert!(report.finished <= done.load(Ordering::SeqCst), "{report:?}");
    assert!(report.disconnected_cleanly);
    assert!(
        done.load(Ordering::SeqCst) >= 1,
        "the running handler finished"
    );
}

#[tokio::test]
async fn shutdown_abandons_handlers_past_the_deadline() {
    let broker = TestBroker::start().await;
    let started = Arc::new(tokio::sync::Notify::new());
    let stuck = {
        let started = started.clone();
        move |_req: Request<Envelope>| {
            let started = started.clone();
            async move {
                started.notify_one();
                std::future::pending::<()>().await;
            }
        }
    };
    let running = tower_mqtt::serve(
        config(&broker.url(), "abandon"),
        Router::new().route("stuck", stuck),
    )
    .drain_timeout(Duration::from_millis(200))
    .spawn()
    .unwrap();
    tokio::time::timeout(WAIT, running.ready())
        .await
        .unwrap()
        .expect("subscribed");
    let job = Envelope::new("s", json!({})).unwrap();
    running
        .publisher()
        .send(Request::builder("stuck").body(job).unwrap())
        .await
        .unwrap();
    tokio::time::timeout(WAIT, started.notified())
        .await
        .unwrap();
    let report = tokio::time::timeout(WAIT, running.shutdown())
        .await
        .expect("shutdown is bounded");
    assert_eq!(report.finished, 0);
    assert!(report.abandoned >= 1, "{report:?}");
}

/// Handlers that finish while the service shuts down have their messages
/// acknowledged before the goodbye: the session gives none of them back.
#[tokio::test]
async fn messages_finished_during_shutdown_are_acknowledged_before_disconnecting() {
    // A window wide enough for every message to be running at once.
    let broker = support::Mosquitto::start_with_config("max_inflight_messages 0\n").await;
    let client_id = probe::unique_id("ack-on-exit");
    let cfg = || {
        config(&broker.url(), "ack-on-exit")
            .with_client_id(&client_id)
            .with_clean_session(false)
            // Acknowledgements queue up on their way to the socket.
            .with_request_channel_capacity(1)
    };
    let total = 64;
    let (seen, gate, handler) = gated_recorder();
    let running = tower_mqtt::serve(
        cfg(),
        Router::new().route(Subscription::new("work/+").unordered(), handler),
    )
    .max_in_flight(total)
    .drain_timeout(WAIT)
    .spawn()
    .unwrap();
    tokio::time::timeout(WAIT, running.ready())
        .await
        .unwrap()
        .expect("subscribed");
    for n in 0..total {
        let job = Envelope::new("work.job", json!({ "n": n })).unwrap();
        running
            .publisher()
            .send(Request::builder("work/a").body(job).unwrap())
            .await
            .unwrap();
    }
    tokio::time::timeout(WAIT, async {
        while running.stats().received < total as u64 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("every message is running: {:?}", running.stats()));

    // Every handler finishes at once, and the shutdown begins the moment the
    // last one is done: their acknowledgements are the last thing the
    // connection writes.
    gate.add_permits(total);
    tokio::time::timeout(WAIT, async {
        while running.stats().pending > 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("every message handled");
    let report = tokio::time::timeout(WAIT, running.shutdown())
        .await
        .unwrap();
    assert!(report.disconnected_cleanly, "{report:?}");
    assert_eq!(seen.lock().unwrap().len(), total);

    // The same session again: nothing comes back, and a new message does
    // arrive, so the session is the persistent one.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let second = tower_mqtt::serve(cfg(), Router::new().route("work/+", recorder(tx)))
        .spawn()
        .unwrap();
    tokio::time::timeout(WAIT, second.ready())
        .await
        .unwrap()
        .expect("subscribed");
    let marker = Envelope::new("work.marker", json!({})).unwrap();
    second
        .publisher()
        .send(
            Request::builder("work/marker")
                .body(marker.clone())
                .unwrap(),
        )
        .await
        .unwrap();
    let (topic, env) = recv(&mut rx).await;
    assert_eq!(
        (topic.as_str(), env.id()),
        ("work/marker", marker.id()),
        "a handled message came back: {env:?}"
    );
    second.shutdown().await;
}

/// `serve` takes the runtime's two limits: handlers at once, and the time
/// they get at shutdown.
#[tokio::test]
async fn serve_sets_the_handler_limit_and_the_drain_timeout() {
    let broker = TestBroker::start().await;
    let (started, running_now, peak) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let stuck = {
        let (started, running_now, peak) = (started.clone(), running_now.clone(), peak.clone());
        move |_req: Request<Envelope>| {
            started.fetch_add(1, Ordering::SeqCst);
            let now = running_now.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(now, Ordering::SeqCst);
            std::future::pending::<()>()
        }
    };
    let router = Router::new().route(Subscription::new("work/+").unordered(), stuck);
    let running = tower_mqtt::serve(config(&broker.url(), "serve-limits"), router)
        .max_in_flight(3)
        .drain_timeout(Duration::from_millis(200))
        .spawn()
        .unwrap();
    tokio::time::timeout(WAIT, running.ready())
        .await
        .unwrap()
        .expect("subscribed");
    for n in 0..10 {
        let job = Envelope::new("work.job", json!({ "n": n })).unwrap();
        running
            .publisher()
            .send(Request::builder("work/a").body(job).unwrap())
            .await
            .unwrap();
    }
    tokio::time::timeout(WAIT, async {
        while running.stats().received < 10 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("all ten received");
    // Three run and never finish; the other seven wait for a worker.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(started.load(Ordering::SeqCst), 3);
    assert_eq!(peak.load(Ordering::SeqCst), 3);

    // The default drain timeout (10 s) would not fit in this wait.
    let report = tokio::time::timeout(Duration::from_secs(5), running.shutdown())
        .await
        .expect("the drain timeout applies");
    assert_eq!((report.finished, report.abandoned), (0, 10), "{report:?}");
}

#[tokio::test]
async fn a_stalled_connection_is_detected_by_the_heartbeat_and_replaced() {
    let broker = TestBroker::start().await;
    let proxy = Proxy::start(broker.addr()).await;
    // A long keepalive: only the heartbeat can notice the stall in time.
    let cfg = config(&proxy.url(), "watchdog")
        .with_keep_alive(Duration::from_secs(60))
        .with_heartbeat(true)
        .with_heartbeat_interval(Duration::from_millis(200));
    let running = tower_mqtt::serve(cfg, Router::new()).spawn().unwrap();
    tokio::time::timeout(WAIT, running.ready())
        .await
        .unwrap()
        .expect("subscribed");
    let mut state = running.state();

    proxy.stall();
    let stalled_at = Instant::now();
    let reason = tokio::time::timeout(WAIT, async {
        loop {
            state.changed().await.unwrap();
            if let ConnectionState::Disconnected { reason, .. } = &*state.borrow() {
                break reason.clone();
            }
        }
    })
    .await
    .expect("the stall is detected");
    assert!(reason.contains("heartbeat"), "{reason}");
    let detected = stalled_at.elapsed();
    assert!(
        detected < Duration::from_secs(5),
        "detected after {detected:?}"
    );

    proxy.resume();
    tokio::time::timeout(WAIT, state.wait_for(ConnectionState::is_connected))
        .await
        .unwrap()
        .unwrap();
    assert!(running.stats().connections >= 2);
    running.shutdown().await;
}

#[tokio::test]
async fn configuration_errors_are_clear_and_secret() {
    let err = Config::from_lookup(|var| {
        (var == "MQTT_URL").then(|| "mqtt://fleet:hunter2@broker:notaport".to_owned())
    })
    .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("MQTT_URL"), "{text}");
    assert!(!text.contains("hunter2"), "the password leaked: {text}");
    assert!(!format!("{err:?}").contains("hunter2"));

    let err = Config::from_lookup(|var| match var {
        "MQTT_URL" => Some("mqtt://localhost".to_owned()),
        "MQTT_KEEPALIVE" => Some("soon".to_owned()),
        _ => None,
    })
    .unwrap_err();
    assert!(err.to_string().contains("MQTT_KEEPALIVE"), "{err}");

    let missing = Config::from_lookup(|_| None).unwrap_err();
    assert!(missing.is_missing_url());

    // A value rumqttc would panic on is refused before it gets there.
    let zero_keepalive = Config::new("mqtt://localhost")
        .unwrap()
        .with_keep_alive(Duration::from_millis(200));
    assert!(Client::new(zero_keepalive).is_err());
}

#[tokio::test]
async fn a_handler_publishing_into_a_full_channel_does_not_deadlock() {
    let broker = TestBroker::start().await;
    let mut probe = probe::Probe::subscribe(&broker.url(), "fanout/out").await;
    // A request channel of one: a handler's burst cannot fit.
    let cfg = config(&broker.url(), "fanout").with_request_channel_capacity(1);
    let client = Client::new(cfg).unwrap();
    let publisher = client.publisher();
    let fan_out = move |_req: Request<Envelope>| {
        let publisher = publisher.clone();
        async move {
            let sends = (0..200).map(|n| {
                let publisher = publisher.clone();
                async move {
                    publisher
                        .send(
                            Request::builder("fanout/out")
                                .body(Envelope::new("fan.out", json!({"n": n})).unwrap())
                                .unwrap(),
                        )
                        .await
                }
            });
            for result in futures_util::future::join_all(sends).await {
                result?;
            }
            Ok::<_, tower_mqtt::BoxError>(())
        }
    };
    let running = client
        .serve(Router::new().route("fanout/in", fan_out))
        .spawn()
        .unwrap();
    tokio::time::timeout(WAIT, running.ready())
        .await
        .unwrap()
        .expect("subscribed");
    probe::publish_raw(
        &broker.url(),
        "fanout/in",
        envelope_bytes("fan.in", json!({})),
        WireQoS::AtLeastOnce,
        false,
    )
    .await;
    let got = probe.take(200, WAIT).await;
    assert_eq!(got.len(), 200);
    let report = tokio::time::timeout(WAIT, running.shutdown())
        .await
        .unwrap();
    assert_eq!(report.stats.handled, 1, "{report:?}");
}

#[tokio::test]
async fn an_unordered_route_runs_one_topic_concurrently() {
    let broker = TestBroker::start().await;
    let running_now = Arc::new(AtomicUsize::new(0));
    let max_running = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let handler = {
        let (running_now, max_running, done) =
            (running_now.clone(), max_running.clone(), done.clone());
        move |_req: Request<Envelope>| {
            let (running_now, max_running, done) =
                (running_now.clone(), max_running.clone(), done.clone());
            async move {
                let now = running_now.fetch_add(1, Ordering::SeqCst) + 1;
                max_running.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(100)).await;
                running_now.fetch_sub(1, Ordering::SeqCst);
                done.fetch_add(1, Ordering::SeqCst);
            }
        }
    };
    let route = Subscription::new("frames/cam").unordered();
    let running = tower_mqtt::serve(
        config(&broker.url(), "unordered"),
        Router::new().route(route, handler),
    )
    .max_in_flight(4)
    .spawn()
    .unwrap();
    tokio::time::timeout(WAIT, running.ready())
        .await
        .unwrap()
        .expect("subscribed");
    let publisher = running.publisher();
    for n in 0..12 {
        publisher
            .send(
                Request::builder("frames/cam")
                    .body(Envelope::new("frame", json!({"n": n})).unwrap())
                    .unwrap(),
            )
            .await
            .unwrap();
    }
    tokio::time::timeout(WAIT, async {
        while done.load(Ordering::SeqCst) < 12 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    let max = max_running.load(Ordering::SeqCst);
    assert!(max >= 2, "one topic ran concurrently: {max}");
    assert!(max <= 4, "the in-flight limit holds: {max}");
    running.shutdown().await;
}

#[tokio::test]
async fn the_start_hook_runs_once_and_the_connect_hook_after_every_connect() {
    let broker = TestBroker::start().await;
    let proxy = Proxy::start(broker.addr()).await;
    let started = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let connected = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = |counter: &Arc<std::sync::atomic::AtomicUsize>| {
        let counter = counter.clone();
        move |_publisher: tower_mqtt::Publisher| {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            std::future::ready(())
        }
    };
    let running = tower_mqtt::serve(
        config(&proxy.url(), "hooks"),
        Router::new().route("hooks/in", |_: Request<Envelope>| std::future::ready(())),
    )
    .on_start(count(&started))
    .on_connect(count(&connected))
    .spawn()
    .unwrap();
    let hooks_ran = |n: usize| {
        let connected = connected.clone();
        async move {
            tokio::time::timeout(WAIT, async {
                while connected.load(std::sync::atomic::Ordering::SeqCst) < n {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
            .await
            .expect("the connect hook ran");
        }
    };
    hooks_ran(1).await;
    for reconnect in 2..=3 {
        proxy.cut().await;
        hooks_ran(reconnect).await;
    }
    assert_eq!(started.load(std::sync::atomic::Ordering::SeqCst), 1, "once");
    assert_eq!(connected.load(std::sync::atomic::Ordering::SeqCst), 3);
    assert_eq!(running.stats().connections, 3);
    running.shutdown().await;
}

#[tokio::test]
async fn heartbeats_go_out_on_the_keepalive_topic_at_their_interval() {
    let broker = TestBroker::start().await;
    let client_id = probe::unique_id("beating");
    let mut beats =
        probe::Probe::subscribe(&broker.url(), &format!("system/keepalive/{client_id}")).await;
    let interval = Duration::from_millis(300);
    let cfg = config(&broker.url(), "beating")
        .with_client_id(&client_id)
        .with_heartbeat(true)
        .with_heartbeat_interval(interval);
    let running = tower_mqtt::serve(cfg, Router::new()).spawn().unwrap();
    tokio::time::timeout(WAIT, running.ready())
        .await
        .unwrap()
        .expect("subscribed");
    let got = beats.take(5, WAIT).await;
    assert_eq!(got.len(), 5, "five heartbeats on the keepalive topic");
    let mut stamps = Vec::new();
    for beat in &got {
        assert_eq!(beat.qos, WireQoS::AtMostOnce);
        assert!(!beat.retain);
        let body: serde_json::Value = serde_json::from_slice(&beat.payload).unwrap();
        let object = body.as_object().expect("a JSON object");
        assert_eq!(object.len(), 3, "{body}");
        assert_eq!((&body["ok"], &body["event"]), (&json!(true), &json!("hb")));
        stamps.push(body["ts"].as_f64().expect("ts in epoch seconds"));
    }
    // Stamped when sent: the spacing is the sender's interval, whatever the
    // delivery's jitter (generous bounds for a busy machine).
    for pair in stamps.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            (0.5 * interval.as_secs_f64()..2.0 * interval.as_secs_f64()).contains(&gap),
            "heartbeats {gap:.3} s apart, every {interval:?} wanted: {stamps:?}"
        );
    }
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_connection_behind_a_backlog_is_not_replaced_by_the_watchdog() {
    let broker = TestBroker::start().await;
    // The watchdog fires after three silent intervals: 0.6 s. The backlog
    // takes seconds to read, with the heartbeat's echo behind it.
    let cfg = config(&broker.url(), "beating-busy")
        .with_heartbeat(true)
        .with_heartbeat_interval(Duration::from_millis(200));
    let handled = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let slow = {
        let handled = handled.clone();
        move |_req: Request<Envelope>| {
            let handled = handled.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(2)).await;
                handled.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
    };
    let running = tower_mqtt::serve(cfg, Router::new().route("busy/work", slow))
        .spawn()
        .unwrap();
    tokio::time::timeout(WAIT, running.ready())
        .await
        .unwrap()
        .expect("subscribed");
    let total = 1_500;
    let messages = (0..total)
        .map(|seq| envelope_bytes("busy.work", json!({ "seq": seq })))
        .collect::<Vec<_>>();
    probe::publish_all(&broker.url(), "busy/work", messages).await;
    tokio::time::timeout(Duration::from_secs(60), async {
        while handled.load(std::sync::atomic::Ordering::SeqCst) < total {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the backlog is handled");
    let stats = running.stats();
    assert_eq!(
        (stats.connections, stats.connection_failures),
        (1, 0),
        "the watchdog left the healthy connection alone: {stats:?}"
    );
    assert!(stats.read_pauses > 0, "reading was paced: {stats:?}");
    running.shutdown().await;
}
