//! What a service logs (FR-008): connecting, connected, subscribing and
//! disconnecting, each inside the `mqtt.client` span that names the client id
//! and the broker, never the password; every publish, retry and drop with its
//! correlation id.

mod support;

use std::time::Duration;

use support::{Captured, Proxy, TestBroker};
use tower_mqtt::{Envelope, Request, Router};

#[tokio::test]
async fn connection_lines_carry_the_client_id_and_the_broker() {
    let broker = TestBroker::start().await;
    let logs = Captured::default();
    let _guard = logs.install();
    let config = support::service_config(&broker.url(), "logged");
    let client_id = config.client_id.clone();
    let running = tower_mqtt::serve(
        config,
        Router::new().route("logged/in", |_: Request<Envelope>| std::future::ready(())),
    )
    .spawn()
    .unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(15), running.ready())
        .await
        .unwrap()
        .expect("subscribed");
    let report = running.shutdown().await;
    assert!(report.disconnected_cleanly);

    let span = format!("mqtt.client{{client_id={client_id} broker=mqtt://127.0.0.1:");
    for what in [
        "connecting",
        "connected",
        "subscribing",
        "disconnected cleanly",
        "shut down",
    ] {
        let lines = logs.lines_with(&[&span, what]);
        assert!(
            !lines.is_empty(),
            "a line for {what:?} inside {span}…}}: {:#?}",
            logs.lines()
        );
    }
    let subscribing = logs.lines_with(&[&span, "subscribing"]);
    assert!(
        subscribing[0].contains("filter=logged/in"),
        "{subscribing:?}"
    );
}

#[tokio::test]
async fn a_message_without_a_route_is_logged_with_its_topic() {
    let broker = TestBroker::start().await;
    let logs = Captured::default();
    let _guard = logs.install();
    // Subscribed, but no route handles it.
    let router = Router::new().subscribe(tower_mqtt::Subscription::new("stray/#"));
    let running = tower_mqtt::serve(support::service_config(&broker.url(), "stray"), router)
        .spawn()
        .unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(15), running.ready())
        .await
        .unwrap()
        .expect("subscribed");
    let env = Envelope::new("stray.thing", serde_json::json!({})).unwrap();
    support::publish_raw(
        &broker.url(),
        "stray/thing",
        env.to_vec(),
        support::QoS::AtLeastOnce,
        false,
    )
    .await;
    tokio::time::timeout(std::time::Duration::from_secs(15), async {
        while running.stats().unrouted == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("counted as unrouted");
    let warned = logs.lines_with(&["WARN", "no route", "topic=stray/thing"]);
    assert_eq!(warned.len(), 1, "{:#?}", logs.lines());
    running.shutdown().await;
}

#[tokio::test]
async fn publishes_retries_and_drops_are_logged_with_their_correlation_id() {
    let broker = TestBroker::start().await;
    let proxy = Proxy::start(broker.addr()).await;
    let logs = Captured::default();
    let _guard = logs.install();
    let mut config = support::service_config(&proxy.url(), "publog")
        .with_publish_retries(2, Duration::from_millis(20));
    config.offline_buffer = 1;
    let running = tower_mqtt::serve(config, Router::new()).spawn().unwrap();
    tokio::time::timeout(Duration::from_secs(15), running.connected())
        .await
        .unwrap();
    let publisher = running.publisher();

    // A confirmed publish.
    let sent = Envelope::new("publog.sent", serde_json::json!({"n": 1})).unwrap();
    publisher
        .send(
            Request::builder("publog/sent")
                .retain(true)
                .body(sent.clone())
                .unwrap(),
        )
        .await
        .unwrap();

    // Offline with a full buffer: the next publish is retried once, then dropped.
    proxy.refuse();
    proxy.cut().await;
    let mut state = running.state();
    tokio::time::timeout(
        Duration::from_secs(15),
        state.wait_for(|s| !s.is_connected()),
    )
    .await
    .unwrap()
    .unwrap();
    let filler = {
        let publisher = publisher.clone();
        let held = Envelope::new("publog.held", serde_json::json!({})).unwrap();
        tokio::spawn(async move {
            publisher
                .send(Request::builder("publog/held").body(held).unwrap())
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let dropped = Envelope::new("publog.dropped", serde_json::json!({})).unwrap();
    let err = publisher
        .send(
            Request::builder("publog/dropped")
                .body(dropped.clone())
                .unwrap(),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("offline buffer is full"), "{err}");

    let sent_id = format!("correlation_id={}", sent.id());
    let publishing = logs.lines_with(&[
        "DEBUG",
        "publishing",
        "topic=publog/sent",
        "qos=1",
        "retain=true",
        &sent_id,
    ]);
    assert_eq!(publishing.len(), 1, "{:#?}", logs.lines());

    let dropped_id = format!("correlation_id={}", dropped.id());
    let attempts = logs.lines_with(&["DEBUG", "publishing", "topic=publog/dropped", &dropped_id]);
    assert_eq!(
        attempts.len(),
        2,
        "one line per attempt: {:#?}",
        logs.lines()
    );
    let retried = logs.lines_with(&[
        "WARN",
        "publish failed, retrying",
        "topic=publog/dropped",
        &dropped_id,
    ]);
    assert_eq!(retried.len(), 1, "{:#?}", logs.lines());
    let gave_up = logs.lines_with(&[
        "ERROR",
        "publish dropped",
        "topic=publog/dropped",
        &dropped_id,
    ]);
    assert_eq!(gave_up.len(), 1, "{:#?}", logs.lines());
    assert_eq!(running.stats().publishes_dropped, 1);

    running.shutdown().await;
    let _ = filler.await;
}
