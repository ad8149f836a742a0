//! What a service logs about its connection (FR-008): connecting, connected,
//! subscribing and disconnecting, each inside the `mqtt.client` span that
//! names the client id and the broker, never the password.

mod support;

use support::{Captured, TestBroker};
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
