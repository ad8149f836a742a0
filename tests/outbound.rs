//! Publishing against a real broker: confirmation, size limits, outages,
//! request/reply and the exact bytes on the wire.

mod support;

use support::service_config as config;

use std::{future::Future, time::Duration};

use futures_util::future::join_all;
use serde_json::json;
use support::{MosquittoSub, Probe, Proxy, TestBroker};
use tower_mqtt::{
    config::Config, layers::outbound::PublishError, reply::Replies, Client, Envelope, QoS, Request,
    Router, Running,
};

const WAIT: Duration = Duration::from_secs(15);

#[tokio::test]
async fn a_hundred_concurrent_publishes_are_all_confirmed() {
    let broker = TestBroker::start().await;
    let mut probe = Probe::subscribe(&broker.url(), "load/#").await;
    let running = tower_mqtt::serve(config(&broker.url(), "load"), Router::new())
        .spawn()
        .unwrap();
    let publisher = running.publisher();
    let tasks = (0..100).map(|n| {
        let publisher = publisher.clone();
        tokio::spawn(async move {
            let env = Envelope::new("load.test", json!({"n": n})).unwrap();
            publisher
                .send(
                    Request::builder(format!("load/{}", n % 7))
                        .body(env)
                        .unwrap(),
                )
                .await
        })
    });
    for result in join_all(tasks).await {
        result.unwrap().expect("confirmed by PUBACK");
    }
    let got = probe.take(100, WAIT).await;
    assert_eq!(got.len(), 100);
    running.shutdown().await;
}

#[tokio::test]
async fn an_oversized_payload_is_rejected_before_sending() {
    let broker = TestBroker::start().await;
    let mut probe = Probe::subscribe(&broker.url(), "big").await;
    let cfg = config(&broker.url(), "big").with_max_packet_size(4096);
    let running = tower_mqtt::serve(cfg, Router::new()).spawn().unwrap();
    let publisher = running.publisher();
    let huge = json!({"blob": "x".repeat(10_000)});
    let err = publisher.publish("big", huge).await.unwrap_err();
    assert!(
        matches!(
            err.downcast_ref(),
            Some(PublishError::TooLarge { max: 4096, .. })
        ),
        "the size guard's error: {err}"
    );
    assert!(err
        .to_string()
        .contains("limit of 4096 bytes; nothing was sent"));
    assert!(!tower_mqtt::layers::outbound::is_retryable(&err));
    // The connection is fine, and nothing of the big one arrived.
    publisher
        .publish("big", json!({}))
        .event_type("big.small")
        .await
        .unwrap();
    let got = probe.next(WAIT).await.unwrap();
    assert!(got.payload_str().contains("big.small"));
    assert!(probe
        .collect_for(Duration::from_millis(300))
        .await
        .is_empty());
    running.shutdown().await;
}

#[tokio::test]
async fn publishes_during_an_outage_are_delivered_in_order_once_back() {
    let mut broker = TestBroker::start().await;
    if !broker.is_mosquitto() {
        eprintln!("skipped: needs mosquitto to stop the broker");
        return;
    }
    // The receiver keeps a persistent session, so the broker holds what is
    // published for it while it reconnects too.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let record = move |req: Request<Envelope>| {
        let _ = tx.send(req.body().data()["n"].as_i64().unwrap());
        std::future::ready(())
    };
    let receiver_cfg = config(&broker.url(), "outage-rx").with_clean_session(false);
    let receiver = tower_mqtt::serve(receiver_cfg, Router::new().route("outage/seq", record))
        .spawn()
        .unwrap();
    let sender = tower_mqtt::serve(config(&broker.url(), "outage-tx"), Router::new())
        .spawn()
        .unwrap();
    tokio::time::timeout(WAIT, receiver.connected())
        .await
        .unwrap();
    tokio::time::timeout(WAIT, sender.connected())
        .await
        .unwrap();
    let publisher = sender.publisher();
    loop {
        let warmup = Envelope::new("outage.test", json!({"n": -1})).unwrap();
        publisher
            .send(Request::builder("outage/seq").body(warmup).unwrap())
            .await
            .unwrap();
        if tokio::time::timeout(Duration::from_millis(300), rx.recv())
            .await
            .is_ok()
        {
            break;
        }
    }
    while rx.try_recv().is_ok() {}

    broker.stop().await.unwrap();
    let mut state = sender.state();
    tokio::time::timeout(WAIT, state.wait_for(|s| !s.is_connected()))
        .await
        .unwrap()
        .unwrap();
    // Publish while the broker is down: they wait in the client, in order.
    // Each publish is polled once, which hands it to the client, before the
    // next one starts.
    let mut pending = Vec::new();
    for n in 0..20 {
        let publisher = publisher.clone();
        let mut publish = Box::pin(async move {
            publisher
                .publish("outage/seq", json!({"n": n}))
                .event_type("outage.test")
                .await
        });
        std::future::poll_fn(|cx| {
            assert!(
                publish.as_mut().poll(cx).is_pending(),
                "no confirmation while the broker is down"
            );
            std::task::Poll::Ready(())
        })
        .await;
        pending.push(tokio::spawn(publish));
    }
    broker.restart().await.unwrap();
    for handle in pending {
        tokio::time::timeout(WAIT, handle)
            .await
            .unwrap()
            .unwrap()
            .expect("confirmed once the broker is back");
    }
    let mut order = Vec::new();
    while order.len() < 20 {
        let n = tokio::time::timeout(WAIT, rx.recv())
            .await
            .unwrap()
            .unwrap();
        order.push(n);
    }
    assert_eq!(order, (0..20).collect::<Vec<_>>());
    sender.shutdown().await;
    receiver.shutdown().await;
}

#[tokio::test]
async fn fifty_concurrent_request_reply_round_trips() {
    let broker = TestBroker::start().await;
    // The responder: answers memory/query on memory/results with the same id.
    let responder_client = Client::new(config(&broker.url(), "memory-worker")).unwrap();
    let responder_pub = responder_client.publisher();
    let respond = move |req: Request<Envelope>| {
        let publisher = responder_pub.clone();
        async move {
            let text = req.body().data()["text"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let reply = Envelope::reply_to(req.body(), "memory.results", json!({"echo": text}))?;
            publisher
                .send(Request::builder("memory/results").body(reply).unwrap())
                .await?;
            Ok::<_, tower_mqtt::BoxError>(())
        }
    };
    let responder = responder_client
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
    tokio::time::timeout(WAIT, requester.connected())
        .await
        .unwrap();
    tokio::time::timeout(WAIT, responder.connected())
        .await
        .unwrap();
    let publisher = requester.publisher();

    // Wait until both subscriptions are live.
    loop {
        let probe = Envelope::new("memory.query", json!({"text": "warmup"})).unwrap();
        if replies
            .request(
                &publisher,
                "memory/query",
                probe,
                Duration::from_millis(500),
            )
            .await
            .is_ok()
        {
            break;
        }
    }

    let calls = (0..50).map(|n| {
        let (replies, publisher) = (replies.clone(), publisher.clone());
        async move {
            let query = Envelope::new("memory.query", json!({"text": format!("q{n}")})).unwrap();
            let id = query.id().to_owned();
            let reply = replies
                .request(&publisher, "memory/query", query, Duration::from_secs(10))
                .await
                .unwrap();
            assert_eq!(reply.id(), id);
            assert_eq!(reply.data()["echo"], format!("q{n}"));
        }
    });
    join_all(calls).await;
    assert_eq!(replies.waiting(), 0);

    // A request nobody answers times out and leaves no waiter behind.
    let lonely = Envelope::new("memory.query", json!({"text": "nobody"})).unwrap();
    let err = replies
        .request(
            &publisher,
            "nobody/listens",
            lonely,
            Duration::from_millis(200),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no reply"), "{err}");
    assert_eq!(replies.waiting(), 0);

    requester.shutdown().await;
    responder.shutdown().await;
}

#[tokio::test]
async fn mosquitto_sub_sees_exactly_the_five_keys() {
    let broker = TestBroker::start().await;
    let Some(sub) = MosquittoSub::spawn(broker.port(), "wire/check", 1).await else {
        eprintln!("skipped: mosquitto_sub is not installed");
        return;
    };
    let running = tower_mqtt::serve(config(&broker.url(), "wire"), Router::new())
        .spawn()
        .unwrap();
    let publisher = running.publisher();
    let env = Envelope::new("stt.final", json!({"text": "hi", "confidence": 0.5})).unwrap();
    let expected = env.clone().with_source("wire").to_vec();
    // mosquitto_sub may subscribe after the first publish; retained makes it see one.
    let req = Request::builder("wire/check")
        .qos(QoS::AtLeastOnce)
        .retain(true)
        .body(env)
        .unwrap();
    publisher.send(req).await.unwrap();
    let captured = sub.wait(WAIT).await;
    assert_eq!(captured.len(), 1);
    assert_eq!(captured[0].payload, expected, "byte for byte");
    let value: serde_json::Value = serde_json::from_slice(&captured[0].payload).unwrap();
    let mut keys: Vec<&str> = value
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(keys, ["data", "id", "source", "ts", "type"]);

    // Clearing the retained message: an empty retained payload.
    publisher.clear_retained("wire/check").await.unwrap();
    let mut late = Probe::subscribe(&broker.url(), "wire/check").await;
    assert!(
        late.collect_for(Duration::from_millis(500))
            .await
            .is_empty(),
        "retained state cleared"
    );
    running.shutdown().await;
}

/// A client whose connection runs through `proxy`, with a small offline buffer.
async fn through_proxy(proxy: &Proxy, name: &str, cfg: impl FnOnce(Config) -> Config) -> Running {
    let running = tower_mqtt::serve(cfg(config(&proxy.url(), name)), Router::new())
        .spawn()
        .unwrap();
    tokio::time::timeout(WAIT, running.connected())
        .await
        .unwrap();
    running
}

async fn go_offline(proxy: &Proxy, running: &Running) {
    proxy.refuse();
    proxy.cut().await;
    let mut state = running.state();
    tokio::time::timeout(WAIT, state.wait_for(|s| !s.is_connected()))
        .await
        .unwrap()
        .unwrap();
}

fn numbered(n: i64) -> Envelope {
    Envelope::new("offline.test", json!({"n": n})).unwrap()
}

#[tokio::test]
async fn a_full_offline_buffer_rejects_with_a_clear_error() {
    let broker = TestBroker::start().await;
    let proxy = Proxy::start(broker.addr()).await;
    let running = through_proxy(&proxy, "full", |mut c| {
        c.offline_buffer = 3;
        c
    })
    .await;
    go_offline(&proxy, &running).await;
    let publisher = running.publisher();
    let waiting: Vec<_> = (0..3)
        .map(|n| {
            let publisher = publisher.clone();
            tokio::spawn(async move {
                publisher
                    .send(Request::builder("offline/x").body(numbered(n)).unwrap())
                    .await
            })
        })
        .collect();
    // Let the three reach the buffer.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let err = publisher
        .send(Request::builder("offline/x").body(numbered(3)).unwrap())
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("offline buffer is full (3 publishes)"),
        "{err}"
    );

    // Back online: the buffered three go out, in order.
    let mut probe = Probe::subscribe(&broker.url(), "offline/x").await;
    proxy.resume();
    for handle in waiting {
        tokio::time::timeout(WAIT, handle)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
    let got: Vec<i64> = probe
        .take(3, WAIT)
        .await
        .iter()
        .map(|p| {
            Envelope::from_slice(&p.payload).unwrap().data()["n"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!(got, [0, 1, 2]);
    running.shutdown().await;
}

#[tokio::test]
async fn drop_oldest_evicts_and_old_publishes_expire() {
    let broker = TestBroker::start().await;
    let proxy = Proxy::start(broker.addr()).await;
    let running = through_proxy(&proxy, "evict", |mut c| {
        c.offline_buffer = 2;
        c.offline_overflow = tower_mqtt::config::OfflineOverflow::DropOldest;
        c.offline_max_age = Duration::from_millis(400);
        c
    })
    .await;
    go_offline(&proxy, &running).await;
    let publisher = running.publisher();
    let spawn = |n| {
        let publisher = publisher.clone();
        tokio::spawn(async move {
            publisher
                .send(Request::builder("offline/y").body(numbered(n)).unwrap())
                .await
        })
    };
    let first = spawn(0);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let second = spawn(1);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let third = spawn(2);
    let evicted = first.await.unwrap().unwrap_err();
    assert!(evicted.to_string().contains("evicted"), "{evicted}");
    // The other two wait past the age limit and expire.
    for handle in [second, third] {
        let expired = tokio::time::timeout(WAIT, handle)
            .await
            .unwrap()
            .unwrap()
            .unwrap_err();
        assert!(
            expired.to_string().contains("waited longer than"),
            "{expired}"
        );
    }
    running.shutdown().await;
}

/// Publishes into a stalled connection (written, never acknowledged), cuts
/// it, and checks the publish is confirmed after the reconnect and reaches a
/// subscriber. Returns the connection state afterwards.
async fn unacknowledged_publish_survives_a_cut(clean_session: bool) -> tower_mqtt::ConnectionState {
    let broker = TestBroker::start().await;
    let proxy = Proxy::start(broker.addr()).await;
    let mut probe = Probe::subscribe(&broker.url(), "unacked/z").await;
    let running = through_proxy(&proxy, "unacked", |c| c.with_clean_session(clean_session)).await;
    let publisher = running.publisher();
    proxy.stall();
    let sent = {
        let publisher = publisher.clone();
        tokio::spawn(async move {
            publisher
                .send(Request::builder("unacked/z").body(numbered(7)).unwrap())
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!sent.is_finished(), "not confirmed while stalled");
    // The connection dies; the client reconnects through the resumed proxy.
    proxy.cut().await;
    proxy.resume();
    tokio::time::timeout(WAIT, sent)
        .await
        .unwrap()
        .unwrap()
        .expect("confirmed after the reconnect");
    let got = probe.next(WAIT).await.unwrap();
    assert_eq!(Envelope::from_slice(&got.payload).unwrap().data()["n"], 7);
    let state = running.state().borrow().clone();
    running.shutdown().await;
    state
}

#[tokio::test]
async fn with_a_clean_session_an_unacknowledged_publish_is_sent_again() {
    // rumqttc alone would drop it when the broker starts a clean session.
    let state = unacknowledged_publish_survives_a_cut(true).await;
    assert_eq!(
        state,
        tower_mqtt::ConnectionState::Connected {
            session_present: false
        }
    );
}

#[tokio::test]
async fn with_a_persistent_session_rumqttc_replays_the_unacknowledged_publish() {
    let state = unacknowledged_publish_survives_a_cut(false).await;
    assert_eq!(
        state,
        tower_mqtt::ConnectionState::Connected {
            session_present: true
        }
    );
}
