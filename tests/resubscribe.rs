//! Subscriptions always match the router, whatever session the broker resumes.
//!
//! With a persistent session (`clean_session = false`) the broker may resume a
//! session that lacks some or all of the router's filters: one created by an
//! earlier deployment with fewer routes, one whose first SUBSCRIBE never
//! arrived, or one made by another program under the same client id. The
//! runtime subscribes on every CONNACK, and `Running::ready()` resolves only on
//! the SUBACK of the current connection. Each test runs against its own
//! mosquitto, which keeps sessions in memory across connections.

mod support;

use std::time::Duration;

use futures_util::FutureExt;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS as WireQoS};
use serde_json::json;
use support::{Proxy, TestBroker};
use tokio::sync::mpsc;
use tower_mqtt::{config::Config, Client, ConnectionState, Envelope, Request, Router, Running};
use tower_mqtt_layers::InboundStack;

/// Upper bound for every wait: a failing test fails instead of hanging.
const WAIT: Duration = Duration::from_secs(15);

/// Starts mosquitto, or `None` (the test is skipped) where only the embedded
/// broker exists; on CI a missing mosquitto panics in the support module.
async fn mosquitto() -> Option<TestBroker> {
    let broker = TestBroker::start().await;
    if broker.is_mosquitto() {
        Some(broker)
    } else {
        eprintln!("skipped: needs mosquitto (persistent sessions across connections)");
        None
    }
}

/// A service config with a persistent session under `client_id`.
fn persistent(url: &str, client_id: &str) -> Config {
    Config::new(url)
        .expect("test URL")
        .with_client_id(client_id)
        .with_source_name("resubscribe")
        .with_clean_session(false)
        .with_reconnect_delays(Duration::from_millis(100), Duration::from_secs(1))
}

type Seen = mpsc::UnboundedReceiver<(String, Envelope)>;

/// A router with one recording route per filter, and what the routes see.
fn recording_router(filters: &[&str]) -> (Router, Seen) {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut router = Router::new();
    for filter in filters {
        let tx = tx.clone();
        router = router.route(*filter, move |req: Request<Envelope>| {
            let _ = tx.send((req.topic().to_string(), req.body().clone()));
            std::future::ready(())
        });
    }
    (router, rx)
}

fn spawn(config: Config, router: Router) -> Running {
    Client::new(config)
        .expect("valid config")
        .spawn(router, InboundStack::new())
}

async fn ready(running: &Running) {
    tokio::time::timeout(WAIT, running.ready())
        .await
        .unwrap_or_else(|_| panic!("ready() within {WAIT:?}: {:?}", running.stats()))
        .expect("subscribed");
}

/// Publishes one envelope on `topic` (once: after `ready()` the subscription
/// must be in place) and waits for the service to handle it.
async fn delivered(broker: &TestBroker, seen: &mut Seen, topic: &str) {
    let sent = Envelope::new("resubscribe.check", json!({"topic": topic})).unwrap();
    support::publish_raw(
        &broker.url(),
        topic,
        sent.to_vec(),
        WireQoS::AtLeastOnce,
        false,
    )
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(deadline, seen.recv()).await {
            Ok(Some((got_topic, env))) if env.id() == sent.id() => {
                assert_eq!(got_topic, topic);
                return;
            }
            // A redelivery of an earlier check; keep waiting for this one.
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => panic!(
                "a message on {topic:?} published after ready() was never handled: \
                 the resumed session is not subscribed to it"
            ),
        }
    }
}

/// Creates a persistent session for `client_id` with no subscriptions: a plain
/// rumqttc client connects with `clean_session = false` and disconnects.
async fn precreate_empty_session(url: &str, client_id: &str) {
    let (host, port) = support::host_port(url);
    let mut options = MqttOptions::new(client_id, host, port);
    options.set_clean_session(false);
    let (client, mut eventloop) = AsyncClient::new(options, 8);
    let connected = tokio::time::timeout(WAIT, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => break ack,
                Ok(_) => {}
                Err(err) => panic!("pre-creating the session: {err}"),
            }
        }
    })
    .await
    .expect("CONNACK in time");
    assert!(
        !connected.session_present,
        "a fresh client id has no session"
    );
    client.disconnect().await.expect("queue DISCONNECT");
    let _ = tokio::time::timeout(WAIT, async { while eventloop.poll().await.is_ok() {} }).await;
}

#[tokio::test]
async fn a_resumed_session_without_subscriptions_is_subscribed() {
    let Some(broker) = mosquitto().await else {
        return;
    };
    let client_id = support::unique_id("resub-empty");
    precreate_empty_session(&broker.url(), &client_id).await;

    let (router, mut seen) = recording_router(&["resub/a", "resub/b/+"]);
    let running = spawn(persistent(&broker.url(), &client_id), router);
    ready(&running).await;
    assert_eq!(
        *running.state().borrow(),
        ConnectionState::Connected {
            session_present: true
        },
        "the broker resumed the pre-created session"
    );
    delivered(&broker, &mut seen, "resub/a").await;
    delivered(&broker, &mut seen, "resub/b/1").await;
    running.shutdown().await;
}

#[tokio::test]
async fn a_redeploy_with_a_new_route_subscribes_the_new_route() {
    let Some(broker) = mosquitto().await else {
        return;
    };
    let client_id = support::unique_id("resub-redeploy");

    // First deployment: route A only.
    let (router, mut seen) = recording_router(&["deploy/a"]);
    let first = spawn(persistent(&broker.url(), &client_id), router);
    ready(&first).await;
    delivered(&broker, &mut seen, "deploy/a").await;
    let report = first.shutdown().await;
    assert!(report.disconnected_cleanly, "{report:?}");

    // Second deployment, same client id: routes A and B.
    let (router, mut seen) = recording_router(&["deploy/a", "deploy/b"]);
    let second = spawn(persistent(&broker.url(), &client_id), router);
    ready(&second).await;
    assert_eq!(
        *second.state().borrow(),
        ConnectionState::Connected {
            session_present: true
        },
        "the broker resumed the first deployment's session"
    );
    delivered(&broker, &mut seen, "deploy/b").await;
    delivered(&broker, &mut seen, "deploy/a").await;
    second.shutdown().await;
}

#[tokio::test]
async fn a_subscribe_lost_with_the_first_connection_is_sent_again() {
    let Some(broker) = mosquitto().await else {
        return;
    };
    let proxy = Proxy::start(broker.addr()).await;
    proxy.cut_next_subscribe();
    let client_id = support::unique_id("resub-lost");

    let (router, mut seen) = recording_router(&["lost/a"]);
    let running = spawn(persistent(&proxy.url(), &client_id), router);
    ready(&running).await;
    assert!(
        proxy.subscribe_cut_done(),
        "the first SUBSCRIBE was cut by the proxy"
    );
    assert!(
        running.stats().connections >= 2,
        "the service reconnected after the cut: {:?}",
        running.stats()
    );
    assert_eq!(
        *running.state().borrow(),
        ConnectionState::Connected {
            session_present: true
        },
        "the reconnect resumed the session the first connection created"
    );
    delivered(&broker, &mut seen, "lost/a").await;
    running.shutdown().await;
}

#[tokio::test]
async fn ready_waits_for_the_suback_of_the_current_connection() {
    let Some(broker) = mosquitto().await else {
        return;
    };
    let proxy = Proxy::start(broker.addr()).await;
    let client_id = support::unique_id("resub-ready");
    let (router, mut seen) = recording_router(&["ready/a"]);

    // First connection: connected, but not ready while the SUBACK cannot come.
    proxy.hold_subscribes();
    let running = spawn(persistent(&proxy.url(), &client_id), router);
    assert!(
        proxy.wait_for_subscribes_seen(1, WAIT).await,
        "the service subscribes on its first connection"
    );
    assert!(running.state().borrow().is_connected());
    assert!(
        running.ready().now_or_never().is_none(),
        "ready() before any SUBACK"
    );
    proxy.release_subscribes();
    ready(&running).await;
    delivered(&broker, &mut seen, "ready/a").await;

    // Reconnect into the resumed session: ready() is false again until this
    // connection's SUBACK arrives.
    proxy.hold_subscribes();
    let mut state = running.state();
    proxy.cut().await;
    tokio::time::timeout(
        WAIT,
        state.wait_for(|s| matches!(s, ConnectionState::Disconnected { .. })),
    )
    .await
    .expect("the cut is noticed")
    .unwrap();
    tokio::time::timeout(WAIT, state.wait_for(ConnectionState::is_connected))
        .await
        .expect("reconnected")
        .unwrap();
    assert!(
        proxy.wait_for_subscribes_seen(2, WAIT).await,
        "the service subscribes again on the resumed session"
    );
    assert!(
        running.ready().now_or_never().is_none(),
        "ready() on a reconnect before that connection's SUBACK"
    );
    proxy.release_subscribes();
    ready(&running).await;
    delivered(&broker, &mut seen, "ready/a").await;
    running.shutdown().await;
}
