//! Both stacks together against a real broker: replies correlated through the
//! outbound stack, failed messages dead-lettered through it, health published
//! through it, and the fleet's raw and duplicate messages on the way in.

mod support;

use support::service_config as config;

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use serde_json::json;
use support::{publish_raw, unique_id, Probe, TestBroker};
use tower::{layer::layer_fn, ServiceExt};
use tower_mqtt::{
    layers::{isolation::DeadLetter, outbound::Reply},
    publisher::Outbound,
    reply::Replies,
    Client, Envelope, Publisher, Request, Router,
};

const WAIT: Duration = Duration::from_secs(15);

#[tokio::test]
async fn a_reply_through_the_outbound_stack_takes_the_request_id() {
    let broker = TestBroker::start().await;
    let cfg = config(&broker.url(), "memory-worker");
    let responder = Client::new(cfg.clone()).unwrap();
    // The handler builds a *new* envelope marked `Reply`; the stack gives it
    // the request's id because the handler runs inside the request's
    // correlation scope. The publisher is a handler argument.
    let respond = |publisher: Publisher, req: Request<Envelope>| async move {
        let results = Envelope::new("memory.results", json!({"for": req.body().data()["text"]}))?;
        let reply = Request::builder("memory/results")
            .extension(Reply)
            .body(results)?;
        publisher.send(reply).await
    };
    let responder = responder
        .serve(Router::new().route("memory/query", respond))
        .spawn()
        .unwrap();

    let replies = Replies::new();
    let requester = tower_mqtt::serve(
        config(&broker.url(), "llm-worker"),
        Router::new().route_service("memory/results", replies.clone()),
    )
    .spawn()
    .unwrap();
    tokio::time::timeout(WAIT, responder.ready())
        .await
        .unwrap()
        .expect("subscribed");
    tokio::time::timeout(WAIT, requester.ready())
        .await
        .unwrap()
        .expect("subscribed");

    let query = Envelope::new("memory.query", json!({"text": "cats"})).unwrap();
    let reply = replies
        .request(&requester.publisher(), "memory/query", query.clone(), WAIT)
        .await
        .unwrap();
    assert_eq!(reply.id(), query.id());
    assert_eq!(reply.source(), "memory-worker");
    assert_eq!(reply.data()["for"], "cats");
    requester.shutdown().await;
    responder.shutdown().await;
}

#[tokio::test]
async fn a_failing_message_is_dead_lettered_through_the_outbound_stack() {
    let broker = TestBroker::start().await;
    let mut dead = Probe::subscribe(&broker.url(), "mqtt/dead_letter").await;
    let cfg = config(&broker.url(), "fragile");
    let client = Client::new(cfg.clone()).unwrap();
    let stack = cfg
        .inbound_stack()
        .dead_letter(DeadLetter::new(client.publisher()));
    let attempts = Arc::new(AtomicUsize::new(0));
    let counted = attempts.clone();
    let fragile = move |_req: Request<Envelope>| {
        counted.fetch_add(1, Ordering::SeqCst);
        async {
            Err::<(), _>(tower_mqtt::HandlerError::permanent(
                "cannot parse the command",
            ))
        }
    };
    let running = client
        .serve(Router::new().route("tts/say", fragile))
        .inbound_stack(stack)
        .spawn()
        .unwrap();
    tokio::time::timeout(WAIT, running.ready())
        .await
        .unwrap()
        .expect("subscribed");

    let bad = Envelope::new("tts.say", json!({"text": 42})).unwrap();
    publish_raw(
        &broker.url(),
        "tts/say",
        bad.to_vec(),
        support::QoS::AtLeastOnce,
        false,
    )
    .await;
    let letter = dead.next(WAIT).await.expect("a dead letter");
    let letter = Envelope::from_slice(&letter.payload).unwrap();
    assert_eq!(letter.event_type(), "mqtt.dead_letter");
    assert_eq!(letter.source(), "fragile");
    assert_eq!(letter.data()["topic"], "tts/say");
    assert!(letter.data()["error"]
        .as_str()
        .unwrap()
        .contains("cannot parse the command"));
    assert_eq!(
        attempts.load(Ordering::SeqCst),
        1,
        "permanent errors are not retried"
    );

    let report = running.shutdown().await;
    assert_eq!(report.stats.failed, 1);
}

#[tokio::test]
async fn health_goes_through_the_publish_layer() {
    let broker = TestBroker::start().await;
    let through = Arc::new(AtomicUsize::new(0));
    let counter = through.clone();
    let counting = layer_fn(move |inner: Outbound| {
        let counter = counter.clone();
        tower::service_fn(move |req: Request<Envelope>| {
            counter.fetch_add(1, Ordering::SeqCst);
            inner.clone().oneshot(req)
        })
    });
    let service = unique_id("svc").replace('-', "");
    let mut health = Probe::subscribe(&broker.url(), &format!("system/health/{service}")).await;
    let running = Client::new(config(&broker.url(), &service).with_health(true))
        .unwrap()
        .publish_layer(counting)
        .serve(Router::new())
        .spawn()
        .unwrap();
    let ready = health.next(WAIT).await.expect("ready");
    assert_eq!(
        Envelope::from_slice(&ready.payload).unwrap().data()["event"],
        "ready"
    );
    let report = running.shutdown().await;
    assert!(report.health_published);
    assert_eq!(through.load(Ordering::SeqCst), 2, "ready and shutdown");
}

#[tokio::test]
async fn raw_python_payloads_and_duplicates_on_the_way_in() {
    let broker = TestBroker::start().await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let record = move |req: Request<Envelope>| {
        let _ = tx.send(req.body().clone());
        std::future::ready(())
    };
    let cfg = config(&broker.url(), "stt-consumer");
    let running = tower_mqtt::serve(cfg, Router::new().route("stt/final", record))
        .spawn()
        .unwrap();
    tokio::time::timeout(WAIT, running.ready())
        .await
        .unwrap()
        .expect("subscribed");

    // A service that publishes plain JSON: wrapped with the registry's type.
    publish_raw(
        &broker.url(),
        "stt/final",
        r#"{"text":"lights on"}"#,
        support::QoS::AtLeastOnce,
        false,
    )
    .await;
    let raw = tokio::time::timeout(WAIT, rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(raw.event_type(), "stt.final");
    assert_eq!(raw.data()["text"], "lights on");

    // The same envelope twice (a redelivery): handled once.
    let env = Envelope::new("stt.final", json!({"text": "once"}))
        .unwrap()
        .with_source("stt");
    for _ in 0..2 {
        publish_raw(
            &broker.url(),
            "stt/final",
            env.to_vec(),
            support::QoS::AtLeastOnce,
            false,
        )
        .await;
    }
    // A stream of chunks sharing one id: all handled.
    for seq in 0..3 {
        let chunk = Envelope::reply_to(&env, "stt.final", json!({"seq": seq})).unwrap();
        publish_raw(
            &broker.url(),
            "stt/final",
            chunk.to_vec(),
            support::QoS::AtLeastOnce,
            false,
        )
        .await;
    }
    let mut got = Vec::new();
    while got.len() < 4 {
        got.push(
            tokio::time::timeout(WAIT, rx.recv())
                .await
                .unwrap()
                .unwrap(),
        );
    }
    assert_eq!(got[0].data()["text"], "once");
    assert_eq!(
        got[1..]
            .iter()
            .map(|e| e.seq().unwrap())
            .collect::<Vec<_>>(),
        [0, 1, 2]
    );
    let report = running.shutdown().await;
    assert_eq!(report.stats.duplicates, 1, "{report:?}");
}

#[tokio::test]
async fn bad_input_and_a_panicking_handler_lose_nothing_else() {
    let broker = TestBroker::start().await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let good = move |req: Request<Envelope>| {
        let _ = tx.send(req.body().data()["n"].clone());
        std::future::ready(())
    };
    // A handler bug: it assumes every message carries `n`.
    let explode = |req: Request<Envelope>| async move {
        let _n = req.body().data()["n"].as_i64().expect("n is missing");
    };
    let cfg = config(&broker.url(), "robust");
    let stack = cfg
        .inbound_stack()
        .retry(tower_mqtt::layers::MessageRetryLayer::new(1));
    let router = Router::new()
        .route("robust/good", good)
        .route("robust/panic", explode);
    let running = tower_mqtt::serve(cfg, router)
        .inbound_stack(stack)
        .spawn()
        .unwrap();
    tokio::time::timeout(WAIT, running.ready())
        .await
        .unwrap()
        .expect("subscribed");
    let url = broker.url();
    let qos = support::QoS::AtLeastOnce;
    publish_raw(&url, "robust/good", b"not json at all".to_vec(), qos, false).await;
    publish_raw(&url, "robust/good", vec![0xff, 0xfe, 0x00], qos, false).await;
    publish_raw(&url, "robust/good", b"[1,2,3]".to_vec(), qos, false).await;
    let panicking = Envelope::new("robust.panic", json!({})).unwrap();
    publish_raw(&url, "robust/panic", panicking.to_vec(), qos, false).await;
    let fine = Envelope::new("robust.good", json!({"n": 1})).unwrap();
    publish_raw(&url, "robust/good", fine.to_vec(), qos, false).await;

    let n = tokio::time::timeout(WAIT, rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, 1, "the good message after the bad ones is handled");
    let report = running.shutdown().await;
    assert_eq!(report.stats.failed, 4, "{report:?}");
    assert_eq!(report.stats.handled, 1, "{report:?}");
    assert!(report.disconnected_cleanly);
}
