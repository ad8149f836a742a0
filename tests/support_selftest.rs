//! Proves the shared test support works: brokers start and restart, the proxy injects
//! its faults, the probes see what is on the wire.

mod support;

// The self-tests of the ack checker and of the broker matrix live beside the code they
// test; as modules of this file they are compiled into this binary only, not into every
// test binary that includes `support`.
#[path = "support/selftest/acks.rs"]
mod ack_checker;
#[path = "support/selftest/brokers.rs"]
mod broker_matrix;

use std::time::Duration;

use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Packet, QoS};
use support::{broker, host_port, publish_raw, unique_id, Mosquitto, MosquittoSub, Probe, Proxy};

const WAIT: Duration = Duration::from_secs(10);

/// A plain client whose event loop the test drives, to see connection errors.
fn raw_client(url: &str, client_id: &str, clean_session: bool) -> (AsyncClient, EventLoop) {
    let (host, port) = host_port(url);
    let mut options = MqttOptions::new(client_id, host, port);
    options.set_clean_session(clean_session);
    AsyncClient::new(options, 16)
}

/// Polls until CONNACK; panics on error or timeout.
async fn connected(eventloop: &mut EventLoop) -> bool {
    loop {
        match tokio::time::timeout(WAIT, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) => return ack.session_present,
            Ok(Ok(_)) => {}
            Ok(Err(err)) => panic!("connect failed: {err:?}"),
            Err(elapsed) => panic!("no CONNACK: {elapsed} after {WAIT:?}"),
        }
    }
}

/// Polls until the event loop reports an error; panics if it keeps working.
async fn next_error(eventloop: &mut EventLoop) -> ConnectionError {
    loop {
        match tokio::time::timeout(WAIT, eventloop.poll()).await {
            Ok(Ok(_)) => {}
            Ok(Err(err)) => return err,
            Err(elapsed) => panic!("connection still healthy: {elapsed} after {WAIT:?}"),
        }
    }
}

/// Polls until a publish arrives.
async fn next_publish(eventloop: &mut EventLoop) -> rumqttc::Publish {
    loop {
        match tokio::time::timeout(WAIT, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(publish)))) => return publish,
            Ok(Ok(_)) => {}
            Ok(Err(err)) => panic!("connection failed while waiting for a publish: {err:?}"),
            Err(elapsed) => panic!("no publish: {elapsed} after {WAIT:?}"),
        }
    }
}

#[tokio::test]
async fn broker_and_probe_round_trip() {
    let broker = broker().await;
    let mut probe = Probe::subscribe(&broker.url(), "selftest/+").await;

    let payload = b"line\nwith\0bytes\xff".to_vec();
    publish_raw(
        &broker.url(),
        "selftest/a",
        payload.clone(),
        QoS::AtLeastOnce,
        false,
    )
    .await;
    publish_raw(&broker.url(), "selftest/b", "zero", QoS::AtMostOnce, false).await;

    let received = probe.take(2, WAIT).await;
    assert_eq!(received.len(), 2, "{received:?}\n{}", broker.log());
    assert_eq!(received[0].topic, "selftest/a");
    assert_eq!(received[0].payload, payload);
    assert_eq!(received[0].qos, QoS::AtLeastOnce);
    assert_eq!(received[1].topic, "selftest/b");
    assert_eq!(received[1].payload_str(), "zero");
    assert_eq!(received[1].qos, QoS::AtMostOnce);
    assert!(probe
        .collect_for(Duration::from_millis(100))
        .await
        .is_empty());
}

#[tokio::test]
async fn retained_message_is_seen_by_a_later_probe() {
    let broker = broker().await;
    publish_raw(
        &broker.url(),
        "selftest/retained",
        "kept",
        QoS::AtLeastOnce,
        true,
    )
    .await;

    let mut probe = Probe::subscribe(&broker.url(), "selftest/retained").await;
    let publish = probe.next(WAIT).await.expect("the retained message");
    assert!(publish.retain);
    assert_eq!(publish.payload_str(), "kept");
}

#[tokio::test]
async fn restart_keeps_port_and_persistent_sessions() {
    let Some(mut broker) = Mosquitto::try_start().await else {
        return;
    };
    let port = broker.port();
    let client_id = unique_id("selftest-session");

    // A persistent session with a QoS 1 subscription, then offline.
    let (client, mut eventloop) = raw_client(&broker.url(), &client_id, false);
    assert!(!connected(&mut eventloop).await, "a brand-new session");
    client
        .subscribe("selftest/session", QoS::AtLeastOnce)
        .await
        .unwrap();
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = eventloop.poll().await.unwrap() {
            break;
        }
    }
    drop((client, eventloop));

    broker.restart().await;
    assert_eq!(broker.port(), port);
    assert!(broker.is_running());

    // Queued for the offline session on the restarted broker.
    publish_raw(
        &broker.url(),
        "selftest/session",
        "queued",
        QoS::AtLeastOnce,
        false,
    )
    .await;
    let (_client, mut eventloop) = raw_client(&broker.url(), &client_id, false);
    assert!(
        connected(&mut eventloop).await,
        "session lost across restart\n{}",
        broker.log()
    );
    let publish = next_publish(&mut eventloop).await;
    assert_eq!(&publish.payload[..], b"queued");
}

#[tokio::test]
async fn stop_and_kill_end_the_process_and_restart_recovers() {
    let Some(mut broker) = Mosquitto::try_start().await else {
        return;
    };

    broker.stop().await;
    assert!(!broker.is_running());
    let (_client, mut eventloop) = raw_client(&broker.url(), &unique_id("selftest"), true);
    assert!(
        eventloop.poll().await.is_err(),
        "connect to a stopped broker"
    );

    broker.restart().await;
    let (_client, mut eventloop) = raw_client(&broker.url(), &unique_id("selftest"), true);
    connected(&mut eventloop).await;

    broker.kill();
    assert!(!broker.is_running());
    next_error(&mut eventloop).await;

    broker.restart().await;
    assert!(broker.is_running());
    let mut probe = Probe::subscribe(&broker.url(), "selftest/after-kill").await;
    publish_raw(
        &broker.url(),
        "selftest/after-kill",
        "up",
        QoS::AtLeastOnce,
        false,
    )
    .await;
    assert!(probe.next(WAIT).await.is_some());
    assert!(broker.log().contains("running"));
}

#[tokio::test]
async fn proxy_forwards_and_cut_drops_live_connections() {
    let broker = broker().await;
    let proxy = Proxy::start(broker.addr()).await;

    // Forwarding: a subscription and a publish both through the proxy.
    let mut probe = Probe::subscribe(&proxy.url(), "selftest/proxy").await;
    publish_raw(
        &proxy.url(),
        "selftest/proxy",
        "via proxy",
        QoS::AtLeastOnce,
        false,
    )
    .await;
    assert_eq!(probe.next(WAIT).await.unwrap().payload_str(), "via proxy");
    assert!(
        proxy.wait_for_connections(1, WAIT).await,
        "publisher gone, probe left"
    );

    let (_client, mut eventloop) = raw_client(&proxy.url(), &unique_id("selftest"), true);
    connected(&mut eventloop).await;
    assert_eq!(proxy.connections(), 2);
    let accepted = proxy.total_accepted();

    proxy.cut().await;
    assert_eq!(proxy.connections(), 0);
    next_error(&mut eventloop).await;
    assert!(
        probe.next(WAIT).await.is_none(),
        "the probe's connection ended"
    );
    assert!(!probe.is_connected());

    // Still accepting: the client reconnects through the proxy.
    connected(&mut eventloop).await;
    assert_eq!(proxy.total_accepted(), accepted + 1);
    assert_eq!(proxy.connections(), 1);
}

#[tokio::test]
async fn proxy_refuse_fails_connects_until_resume() {
    let broker = broker().await;
    let proxy = Proxy::start(broker.addr()).await;
    proxy.refuse();

    let (_client, mut eventloop) = raw_client(&proxy.url(), &unique_id("selftest"), true);
    let err = next_error(&mut eventloop).await;
    assert!(proxy.wait_for_accepted(1, WAIT).await);
    assert_eq!(proxy.connections(), 0, "refused after {err:?}");

    proxy.resume();
    connected(&mut eventloop).await;
    assert_eq!(proxy.total_accepted(), 2);
}

#[tokio::test]
async fn proxy_stall_holds_bytes_until_resume() {
    let broker = broker().await;
    let proxy = Proxy::start(broker.addr()).await;
    let mut probe = Probe::subscribe(&proxy.url(), "selftest/stall").await;

    proxy.stall();
    publish_raw(
        &broker.url(),
        "selftest/stall",
        "held",
        QoS::AtLeastOnce,
        false,
    )
    .await;
    // The broker has sent it (PUBACK received); nothing may pass the stalled proxy.
    let leaked = probe.collect_for(Duration::from_millis(300)).await;
    assert!(
        leaked.is_empty(),
        "bytes passed a stalled proxy: {leaked:?}"
    );
    assert_eq!(proxy.connections(), 1, "a stall keeps connections open");

    proxy.resume();
    assert_eq!(probe.next(WAIT).await.unwrap().payload_str(), "held");
}

#[tokio::test]
async fn mosquitto_sub_captures_exact_payload_bytes() {
    let Some(broker) = Mosquitto::try_start().await else {
        return;
    };
    let Some(capture) = MosquittoSub::spawn(broker.port(), "selftest/wire/#", 2).await else {
        return;
    };

    let binary = vec![0x00, 0x0a, 0xff, b' ', b'x'];
    publish_raw(
        &broker.url(),
        "selftest/wire/a b",
        binary.clone(),
        QoS::AtLeastOnce,
        false,
    )
    .await;
    publish_raw(
        &broker.url(),
        "selftest/wire/empty",
        Vec::new(),
        QoS::AtMostOnce,
        false,
    )
    .await;

    let captured = capture.wait(WAIT).await;
    assert_eq!(captured.len(), 2, "{captured:?}\n{}", broker.log());
    assert_eq!(captured[0].topic, "selftest/wire/a b");
    assert_eq!(captured[0].payload, binary);
    assert_eq!(captured[0].qos, 1);
    assert!(!captured[0].retain);
    assert_eq!(captured[1].topic, "selftest/wire/empty");
    assert!(captured[1].payload.is_empty());
    assert_eq!(captured[1].qos, 0);
}

#[cfg(feature = "embedded-broker")]
#[tokio::test]
async fn embedded_fallback_round_trip() {
    let broker = support::TestBroker::embedded();
    assert!(!broker.is_mosquitto());
    let mut probe = Probe::subscribe(&broker.url(), "selftest/embedded").await;
    publish_raw(
        &broker.url(),
        "selftest/embedded",
        "in-process",
        QoS::AtLeastOnce,
        false,
    )
    .await;
    assert_eq!(probe.next(WAIT).await.unwrap().payload_str(), "in-process");
}

#[tokio::test]
async fn proxy_cuts_at_the_next_subscribe_and_holds_subscribes() {
    let broker = broker().await;
    let proxy = Proxy::start(broker.addr()).await;

    // Armed cut: the connection that subscribes is closed before its SUBSCRIBE passes.
    proxy.cut_next_subscribe();
    let (mut wire, _) =
        support::WireClient::connect(&proxy.url(), &unique_id("selftest"), true).await;
    let mut subscribe = rumqttc::Subscribe::new("selftest/sub", QoS::AtLeastOnce);
    subscribe.pkid = 1;
    wire.send(rumqttc::Packet::Subscribe(subscribe)).await;
    match wire.recv(WAIT).await {
        Err(support::WireEnd::Closed(_)) => {}
        other => panic!("expected the cut, got {other:?}"),
    }
    assert!(proxy.subscribe_cut_done());
    assert_eq!(proxy.subscribes_seen(), 1);

    // One-shot: the next connection's SUBSCRIBE passes.
    let (mut wire, _) =
        support::WireClient::connect(&proxy.url(), &unique_id("selftest"), true).await;
    let suback = wire.subscribe("selftest/sub", QoS::AtLeastOnce).await;
    assert_eq!(suback.return_codes.len(), 1);

    // Held: no SUBACK until released.
    proxy.hold_subscribes();
    let mut held = rumqttc::Subscribe::new("selftest/held", QoS::AtLeastOnce);
    held.pkid = 9;
    wire.send(rumqttc::Packet::Subscribe(held)).await;
    assert!(proxy.wait_for_subscribes_seen(3, WAIT).await);
    assert!(
        matches!(
            wire.recv(Duration::from_millis(200)).await,
            Err(support::WireEnd::TimedOut)
        ),
        "a SUBACK passed a held SUBSCRIBE"
    );
    proxy.release_subscribes();
    match wire.recv(WAIT).await {
        Ok(rumqttc::Packet::SubAck(_)) => {}
        other => panic!("expected the SUBACK after release, got {other:?}"),
    }
}
