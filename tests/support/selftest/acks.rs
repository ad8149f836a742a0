//! Self-tests of the proxy's ack-order checker (`support/acks.rs`): first on bytes
//! encoded by rumqttc's own codec (an encoder we did not write), split at every
//! possible place, then through the proxy with real brokers and clients.
//!
//! Compiled only into `support_selftest` (see its `#[path]` module).

use std::panic::{catch_unwind, AssertUnwindSafe};

use bytes::BytesMut;
use rumqttc::v5::mqttbytes::v5 as mqtt5;
use rumqttc::{
    AsyncClient, Connect, Event, EventLoop, MqttOptions, Packet, PubAck, PubComp, PubRec, PubRel,
    Publish, QoS,
};

use super::support::{
    broker_matrix, host_port, unique_id, ConnectionAcks, Mosquitto, Proxy, TestBroker, WireClient,
};
use super::{connected, WAIT};

/// Encodes MQTT 3.1.1 packets with rumqttc.
fn v4(packets: &[Packet]) -> Vec<u8> {
    let mut out = BytesMut::new();
    for packet in packets {
        packet.write(&mut out, usize::MAX).expect("encode");
    }
    out.to_vec()
}

fn publish(topic: &str, qos: QoS, pkid: u16, payload_len: usize) -> Packet {
    let mut publish = Publish::new(topic, qos, vec![0x5a; payload_len]);
    publish.pkid = pkid;
    Packet::Publish(publish)
}

/// Feeds both directions in chunks of `size` (the broker's bytes first: a PUBLISH is
/// always on the books before its ack, as in the proxy) and returns the ledger.
fn feed(client: &[u8], broker: &[u8], size: usize) -> ConnectionAcks {
    let mut acks = ConnectionAcks::new(1);
    for chunk in broker.chunks(size) {
        acks.broker_sent(chunk);
    }
    for chunk in client.chunks(size) {
        acks.client_sent(chunk);
    }
    acks
}

#[test]
fn checker_follows_mqtt_3_1_1_frames_split_anywhere() {
    // A 40 KiB payload and a 300-byte topic push lengths into multi-byte varints and
    // across chunk boundaries.
    let long_topic = "t/".repeat(150);
    let broker = v4(&[
        Packet::ConnAck(rumqttc::ConnAck::new(
            rumqttc::ConnectReturnCode::Success,
            false,
        )),
        publish("a", QoS::AtLeastOnce, 1, 40 * 1024),
        publish(&long_topic, QoS::AtLeastOnce, 2, 10),
        publish("a", QoS::AtMostOnce, 0, 5),
        publish("a", QoS::AtLeastOnce, 3, 0),
        publish("b", QoS::ExactlyOnce, 4, 100),
        publish("b", QoS::ExactlyOnce, 5, 100),
        // For the client's own QoS 2 publishes 9 and 10.
        Packet::PubRec(PubRec::new(9)),
        Packet::PubRec(PubRec::new(10)),
        Packet::PingResp,
    ]);
    let client = v4(&[
        Packet::Connect(Connect::new("c")),
        Packet::PubAck(PubAck::new(1)),
        // 2 is head: acking 3 first is a violation; 2 afterwards is in order.
        Packet::PubAck(PubAck::new(3)),
        Packet::PubAck(PubAck::new(2)),
        Packet::PubRec(PubRec::new(4)),
        Packet::PubRec(PubRec::new(5)),
        Packet::PubRel(PubRel::new(10)),
        Packet::PubRel(PubRel::new(9)),
        // Never sent on this connection.
        Packet::PubAck(PubAck::new(77)),
        Packet::PubComp(PubComp::new(4)),
        Packet::PingReq,
        publish("own", QoS::ExactlyOnce, 9, 3),
    ]);

    let whole = client.len().max(broker.len());
    for size in (1..=9).chain([1000, whole]) {
        let report = feed(&client, &broker, size).report();
        let t = report.tally;
        assert_eq!(report.protocol_level, Some(4), "chunk size {size}");
        assert_eq!(t.publishes_to_client, [1, 3, 2], "chunk size {size}");
        assert_eq!(t.publishes_from_client, [0, 0, 1], "chunk size {size}");
        assert_eq!(
            (
                t.client_acks.puback,
                t.client_acks.pubrec,
                t.client_acks.pubrel
            ),
            (4, 2, 2),
            "chunk size {size}"
        );
        assert_eq!(t.client_pubcomps, 1);
        assert_eq!(t.broker_acks.pubrec, 2);
        assert_eq!(
            (
                t.violations.puback,
                t.violations.pubrec,
                t.violations.pubrel
            ),
            (1, 0, 1),
            "chunk size {size}: {report:?}"
        );
        assert_eq!(t.unsolicited.total(), 1, "chunk size {size}");
        assert_eq!(t.outstanding.total(), 0, "chunk size {size}");
        assert_eq!(t.framing_errors, 0, "chunk size {size}");
        assert_eq!(
            report.described,
            [
                "conn 1: PUBACK 3 while 2 was head",
                "conn 1: PUBREL 10 while 9 was head"
            ],
            "chunk size {size}"
        );
    }
}

#[test]
fn checker_reads_mqtt5_packets_with_reason_codes_and_properties() {
    let mut broker = BytesMut::new();
    for pkid in [7_u16, 8] {
        let properties = mqtt5::PublishProperties {
            user_properties: vec![(String::from("k"), String::from("v"))],
            content_type: Some(String::from("application/json")),
            ..mqtt5::PublishProperties::default()
        };
        let mut publish = mqtt5::Publish::new(
            "v5/topic",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            vec![1; 300],
            Some(properties),
        );
        publish.pkid = pkid;
        publish.write(&mut broker).expect("encode");
    }
    let mut client = BytesMut::new();
    let connect = mqtt5::Connect {
        keep_alive: 30,
        client_id: String::from("c5"),
        clean_start: true,
        properties: None,
    };
    connect.write(&None, &None, &mut client).expect("encode");
    // A v5 PUBACK may carry a reason code and properties after the packet id.
    let mut late = mqtt5::PubAck::new(
        8,
        Some(mqtt5::PubAckProperties {
            reason_string: Some(String::from("fine")),
            user_properties: Vec::new(),
        }),
    );
    late.reason = mqtt5::PubAckReason::NoMatchingSubscribers;
    late.write(&mut client).expect("encode");
    mqtt5::PubAck::new(7, None)
        .write(&mut client)
        .expect("encode");

    for size in [1, 2, 3, 5, 64, 4096] {
        let report = feed(&client, &broker, size).report();
        assert_eq!(report.protocol_level, Some(5), "chunk size {size}");
        assert_eq!(report.tally.publishes_to_client, [0, 2, 0]);
        assert_eq!(report.tally.client_acks.puback, 2);
        assert_eq!(report.tally.violations.puback, 1, "chunk size {size}");
        assert_eq!(report.described, ["conn 1: PUBACK 8 while 7 was head"]);
    }
}

#[test]
fn checker_tracks_reused_ids_and_long_reversals_cheaply() {
    // Id 2 acked out of order, then reused by the broker for a new message: the new 2
    // queues behind 1 and is in order once 1 is acked.
    let broker_1 = v4(&[
        publish("a", QoS::AtLeastOnce, 1, 1),
        publish("a", QoS::AtLeastOnce, 2, 1),
    ]);
    let mut acks = ConnectionAcks::new(3);
    acks.broker_sent(&broker_1);
    acks.client_sent(&v4(&[Packet::PubAck(PubAck::new(2))]));
    acks.broker_sent(&v4(&[publish("a", QoS::AtLeastOnce, 2, 1)]));
    acks.client_sent(&v4(&[
        Packet::PubAck(PubAck::new(1)),
        Packet::PubAck(PubAck::new(2)),
    ]));
    let report = acks.report();
    assert_eq!(report.tally.violations.puback, 1);
    assert_eq!(report.tally.unsolicited.puback, 0);
    assert_eq!(report.tally.outstanding.puback, 0);
    assert_eq!(report.described, ["conn 3: PUBACK 2 while 1 was head"]);

    // 50,000 QoS 1 messages owed at once and acked backwards: every ack but the last
    // is a violation. A quadratic checker would take minutes here.
    let count: u16 = 50_000;
    let mut acks = ConnectionAcks::new(1);
    let mut out = BytesMut::new();
    for pkid in 1..=count {
        publish("bulk", QoS::AtLeastOnce, pkid, 0)
            .write(&mut out, usize::MAX)
            .expect("encode");
    }
    acks.broker_sent(&out);
    let mut out = BytesMut::new();
    for pkid in (1..=count).rev() {
        Packet::PubAck(PubAck::new(pkid))
            .write(&mut out, usize::MAX)
            .expect("encode");
    }
    acks.client_sent(&out);
    let report = acks.report();
    assert_eq!(report.tally.violations.puback, u64::from(count) - 1);
    assert_eq!(report.tally.outstanding.puback, 0);
    assert_eq!(
        report.described.first().map(String::as_str),
        Some("conn 1: PUBACK 50000 while 1 was head")
    );
}

/// A plain rumqttc client that acknowledges by hand, as tower-mqtt's runtime does.
fn manual_ack_client(url: &str, client_id: &str) -> (AsyncClient, EventLoop) {
    let (host, port) = host_port(url);
    let mut options = MqttOptions::new(client_id, host, port);
    options.set_manual_acks(true).set_clean_session(true);
    // Acks go through the request channel; it must hold every ack the test queues at
    // once without blocking the task that polls.
    AsyncClient::new(options, 1024)
}

/// Polls until SUBACKs for `n` subscriptions have arrived.
async fn subacked(eventloop: &mut EventLoop, n: usize) {
    let mut seen = 0;
    while seen < n {
        match tokio::time::timeout(WAIT, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => seen += 1,
            Ok(Ok(_)) => {}
            other => panic!("waiting for SUBACK: {other:?}"),
        }
    }
}

/// Polls the event loop (so queued acks are written) until the proxy has seen `n`
/// client acks in all.
async fn until_proxy_saw_acks(eventloop: &mut EventLoop, proxy: &Proxy, n: u64) {
    let seen = proxy.wait_for_client_acks(n, WAIT);
    tokio::pin!(seen);
    loop {
        tokio::select! {
            done = &mut seen => {
                assert!(done, "the proxy saw {} of {n} acks\n{}", proxy.client_acks(), proxy.ack_report());
                return;
            }
            event = eventloop.poll() => {
                if let Err(err) = event {
                    panic!("client failed after {} acks: {err}\n{}", proxy.client_acks(), proxy.ack_report());
                }
            }
        }
    }
}

/// Publishes `count` messages at `qos` on its own connection and waits for the
/// broker's acknowledgements.
async fn publish_many(url: &str, topic: &str, qos: QoS, count: usize) {
    let (host, port) = host_port(url);
    let options = MqttOptions::new(unique_id("selftest-publisher"), host, port);
    let (client, mut eventloop) = AsyncClient::new(options, count + 8);
    for i in 0..count {
        client
            .try_publish(topic, qos, false, format!("m{i}"))
            .expect("queue PUBLISH");
    }
    let mut done = 0;
    while done < count {
        match tokio::time::timeout(WAIT, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_) | Packet::PubComp(_)))) => done += 1,
            Ok(Ok(_)) => {}
            other => panic!("publisher stalled after {done} of {count}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn in_order_manual_acks_pass_the_checker_on_every_broker() {
    const QOS1: usize = 60;
    const QOS2: usize = 20;
    const OWN_QOS2: usize = 10;
    for kind in broker_matrix() {
        let broker = TestBroker::start_kind(kind).await;
        let proxy = Proxy::start(broker.addr()).await;
        let (client, mut eventloop) = manual_ack_client(&proxy.url(), &unique_id("in-order"));
        connected(&mut eventloop).await;
        client
            .try_subscribe("selftest/acks/q1", QoS::AtLeastOnce)
            .unwrap();
        client
            .try_subscribe("selftest/acks/q2", QoS::ExactlyOnce)
            .unwrap();
        subacked(&mut eventloop, 2).await;

        let url = broker.url();
        let publisher = tokio::spawn(async move {
            publish_many(&url, "selftest/acks/q1", QoS::AtLeastOnce, QOS1).await;
            publish_many(&url, "selftest/acks/q2", QoS::ExactlyOnce, QOS2).await;
        });
        // The client's own QoS 2 publishes: the broker's PUBRECs make it owe PUBRELs.
        for i in 0..OWN_QOS2 {
            client
                .try_publish("selftest/acks/own", QoS::ExactlyOnce, false, format!("{i}"))
                .unwrap();
        }
        // Ack each message as it arrives: receive order.
        let mut received = 0;
        while received < QOS1 + QOS2 {
            match tokio::time::timeout(WAIT, eventloop.poll()).await {
                Ok(Ok(Event::Incoming(Packet::Publish(publish)))) => {
                    client.try_ack(&publish).unwrap();
                    received += 1;
                }
                Ok(Ok(_)) => {}
                other => panic!("[{kind}] consumer: {other:?} after {received}"),
            }
        }
        publisher.await.unwrap();
        let expected = u64::try_from(QOS1 + QOS2 + OWN_QOS2).unwrap();
        until_proxy_saw_acks(&mut eventloop, &proxy, expected).await;

        let report = proxy.ack_report();
        proxy.assert_acks_in_order();
        let t = report.totals;
        assert_eq!(report.connections.len(), 1, "[{kind}]\n{report}");
        assert_eq!(t.publishes_to_client, [0, 60, 20], "[{kind}]\n{report}");
        assert_eq!(t.publishes_from_client, [0, 0, 10], "[{kind}]\n{report}");
        assert_eq!(
            (
                t.client_acks.puback,
                t.client_acks.pubrec,
                t.client_acks.pubrel
            ),
            (60, 20, 10),
            "[{kind}]\n{report}"
        );
        assert_eq!(report.unsolicited(), 0, "[{kind}]\n{report}");
        assert_eq!(t.outstanding.total(), 0, "[{kind}]\n{report}");
    }
}

#[tokio::test]
async fn reversed_acks_are_counted_and_fail_the_assertion() {
    // mosquitto accepts acks in any order (rumqttd would close the connection).
    let Some(broker) = Mosquitto::try_start().await else {
        return;
    };
    let proxy = Proxy::start(broker.addr()).await;
    let (client, mut eventloop) = manual_ack_client(&proxy.url(), &unique_id("reversed"));
    connected(&mut eventloop).await;
    client
        .try_subscribe("selftest/rev/#", QoS::ExactlyOnce)
        .unwrap();
    subacked(&mut eventloop, 1).await;

    // Ten of each, under mosquitto's in-flight window of 20.
    let mut acked = 0;
    for (topic, qos) in [
        ("selftest/rev/q1", QoS::AtLeastOnce),
        ("selftest/rev/q2", QoS::ExactlyOnce),
    ] {
        publish_many(&broker.url(), topic, qos, 10).await;
        let mut held = Vec::new();
        while held.len() < 10 {
            match tokio::time::timeout(WAIT, eventloop.poll()).await {
                Ok(Ok(Event::Incoming(Packet::Publish(publish)))) => held.push(publish),
                Ok(Ok(_)) => {}
                other => panic!("consumer: {other:?}\n{}", broker.log()),
            }
        }
        for publish in held.iter().rev() {
            client.try_ack(publish).unwrap();
        }
        acked += 10;
        until_proxy_saw_acks(&mut eventloop, &proxy, acked).await;
        let first = held.first().unwrap().pkid;
        let last = held.last().unwrap().pkid;
        let kind = if qos == QoS::AtLeastOnce {
            "PUBACK"
        } else {
            "PUBREC"
        };
        let report = proxy.ack_report();
        assert!(
            report
                .described_violations()
                .contains(&format!("conn 1: {kind} {last} while {first} was head").as_str()),
            "{report}"
        );
    }

    let report = proxy.ack_report();
    assert_eq!(report.totals.violations.puback, 9, "{report}");
    assert_eq!(report.totals.violations.pubrec, 9, "{report}");
    assert_eq!(report.violations(), 18);
    assert_eq!(report.unsolicited(), 0, "{report}");
    assert_eq!(report.totals.outstanding.total(), 0, "{report}");

    let failed = catch_unwind(AssertUnwindSafe(|| proxy.assert_acks_in_order()));
    let message = failed.expect_err("18 violations must fail the assertion");
    let message = message
        .downcast_ref::<String>()
        .expect("a formatted panic message");
    assert!(
        message.contains("conn 1: PUBACK") && message.contains("MQTT-4.6.0"),
        "{message}"
    );
}

#[tokio::test]
async fn a_cut_ends_the_accounting_and_stale_acks_are_unsolicited() {
    // A persistent session, so mosquitto redelivers on the next connection.
    let Some(broker) = Mosquitto::try_start().await else {
        return;
    };
    let proxy = Proxy::start(broker.addr()).await;
    let client_id = unique_id("cut");
    let (mut wire, _) = WireClient::connect(&proxy.url(), &client_id, false).await;
    wire.subscribe("selftest/cut", QoS::AtLeastOnce).await;
    publish_many(&broker.url(), "selftest/cut", QoS::AtLeastOnce, 5).await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(wire.expect_publish(WAIT).await.pkid);
    }

    proxy.cut().await;
    let report = proxy.ack_report();
    let conn = &report.connections[0];
    assert!(!conn.open, "{report}");
    assert_eq!(conn.tally.outstanding.puback, 5, "{report}");
    assert_eq!(
        report.violations(),
        0,
        "owed ids at a cut are not violations"
    );
    drop(wire);

    let (mut wire, ack) = WireClient::connect(&proxy.url(), &client_id, false).await;
    assert!(ack.session_present, "{}", broker.log());
    let mut again = Vec::new();
    for _ in 0..5 {
        again.push(wire.expect_publish(WAIT).await.pkid);
    }
    assert_eq!(again, ids, "mosquitto redelivers with the same ids");
    for &pkid in &again {
        wire.send(Packet::PubAck(PubAck::new(pkid))).await;
    }
    // Acked already on this connection: not owed any more.
    wire.send(Packet::PubAck(PubAck::new(ids[0]))).await;
    assert!(proxy.wait_for_client_acks(6, WAIT).await);

    let report = proxy.ack_report();
    proxy.assert_acks_in_order();
    assert_eq!(report.connections.len(), 2, "{report}");
    let second = &report.connections[1].tally;
    assert_eq!(second.publishes_to_client[1], 5, "{report}");
    assert_eq!(second.client_acks.puback, 6, "{report}");
    assert_eq!(second.unsolicited.puback, 1, "{report}");
    assert_eq!(second.outstanding.puback, 0, "{report}");
    assert_eq!(
        report.totals.outstanding.puback, 5,
        "conn 1's, kept as it ended"
    );
}
