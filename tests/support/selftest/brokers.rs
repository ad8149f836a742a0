//! Self-tests of the broker matrix: aedes starts and does what only it can do, and
//! every broker behaves as its `BrokerKind` says (the table in `support/mod.rs`).
//!
//! Compiled only into `support_selftest` (see its `#[path]` module).

use std::time::Duration;

use bytes::BytesMut;
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, MqttOptions, Packet, PubAck, PubRec,
    Publish, QoS, SubscribeFilter, SubscribeReasonCode,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::support::{
    accepted, broker_matrix, host_port, publish_all, publish_raw, unique_id, Aedes, AedesOptions,
    BrokerKind, TestBroker, WireClient, WireEnd,
};
use super::{connected, next_publish, WAIT};

/// How long "nothing more arrives" is watched for. Only absences are asserted with
/// it, so a slow machine can make such a check pass wrongly, never fail.
const QUIET: Duration = Duration::from_millis(300);

fn login_client(url: &str, password: &str) -> (AsyncClient, rumqttc::EventLoop) {
    let (host, port) = host_port(url);
    let mut options = MqttOptions::new(unique_id("selftest-aedes"), host, port);
    options.set_credentials("svc", password);
    AsyncClient::new(options, 16)
}

#[tokio::test]
async fn aedes_delivers_refuses_a_denied_filter_and_a_bad_password() {
    let Some(aedes) = Aedes::try_start_with(
        AedesOptions::new()
            .deny("selftest/denied")
            .login("svc", "right"),
    )
    .await
    else {
        return;
    };
    assert!(aedes.version().starts_with("0.51."), "{aedes:?}");

    // A wrong password is refused at CONNACK.
    let (_client, mut eventloop) = login_client(&aedes.url(), "wrong");
    match tokio::time::timeout(WAIT, eventloop.poll()).await {
        Ok(Err(ConnectionError::ConnectionRefused(code))) => {
            assert_eq!(code, ConnectReturnCode::BadUserNamePassword);
        }
        other => panic!("a wrong password got {other:?}\n{}", aedes.log()),
    }

    // The right one: one SUBSCRIBE, the denied entry refused and the other granted.
    let (client, mut eventloop) = login_client(&aedes.url(), "right");
    connected(&mut eventloop).await;
    client
        .subscribe_many([
            SubscribeFilter::new(String::from("selftest/denied"), QoS::AtLeastOnce),
            SubscribeFilter::new(String::from("selftest/allowed"), QoS::AtLeastOnce),
        ])
        .await
        .unwrap();
    let codes = loop {
        match tokio::time::timeout(WAIT, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::SubAck(ack)))) => break ack.return_codes,
            Ok(Ok(_)) => {}
            other => panic!("waiting for SUBACK: {other:?}\n{}", aedes.log()),
        }
    };
    assert_eq!(
        codes,
        [
            SubscribeReasonCode::Failure,
            SubscribeReasonCode::Success(QoS::AtLeastOnce)
        ]
    );

    // Published in this order on one connection: were the denied filter in force, its
    // message would arrive first.
    for topic in ["selftest/denied", "selftest/allowed"] {
        client
            .publish(topic, QoS::AtLeastOnce, false, topic)
            .await
            .unwrap();
    }
    let publish = next_publish(&mut eventloop).await;
    assert_eq!(publish.topic, "selftest/allowed");
    assert!(
        aedes.log().contains("refused subscription"),
        "{}",
        aedes.log()
    );
}

#[tokio::test]
async fn aedes_serves_mqtt_over_websocket() {
    let Some(aedes) = Aedes::try_start_with(AedesOptions::new().websocket()).await else {
        return;
    };
    let port = aedes.ws_port().expect("a WebSocket port");
    assert_eq!(aedes.ws_url(), format!("ws://127.0.0.1:{port}/"));

    let mut connect = BytesMut::new();
    Packet::Connect(rumqttc::Connect::new(unique_id("selftest-ws")))
        .write(&mut connect, 1024)
        .unwrap();
    let connack = websocket_exchange(port, &connect, 4).await;
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00], "{}", aedes.log());
}

#[tokio::test]
async fn aedes_restarts_on_the_same_ports_without_its_sessions() {
    let Some(mut aedes) = Aedes::try_start_with(AedesOptions::new().websocket()).await else {
        return;
    };
    let (port, ws_port) = (aedes.port(), aedes.ws_port());
    let client_id = unique_id("selftest-aedes-restart");
    let (mut wire, _) = WireClient::connect(&aedes.url(), &client_id, false).await;
    wire.subscribe("selftest/restart", QoS::AtLeastOnce).await;

    aedes.restart().await;
    assert_eq!(
        (aedes.port(), aedes.ws_port()),
        (port, ws_port),
        "{aedes:?}"
    );
    assert!(
        matches!(wire.recv(WAIT).await, Err(WireEnd::Closed(_))),
        "the restart closed the live connection"
    );
    // Sessions live in aedes's memory: the same client id finds none.
    let (_wire, ack) = WireClient::connect(&aedes.url(), &client_id, false).await;
    assert!(accepted(&ack), "{}", aedes.log());
    assert!(!ack.session_present, "{}", aedes.log());
    let log = aedes.log();
    let runs = log
        .lines()
        .filter(|line| line.starts_with("aedes ready "))
        .count();
    assert_eq!(runs, 2, "two runs in one log: {log}");
}

/// Opens a WebSocket (subprotocol `mqtt`), sends `payload` in one masked binary frame
/// and returns the first `want` bytes carried back. Just enough of RFC 6455 to prove
/// the listener speaks MQTT; the transport itself is tested elsewhere.
///
/// aedes writes a packet in several frames (the CONNACK's first byte alone, then the
/// rest): MQTT over WebSocket lets a packet span frames, so they are joined here.
async fn websocket_exchange(port: u16, payload: &[u8], want: usize) -> Vec<u8> {
    assert!(payload.len() < 126, "one short frame only");
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let request = format!(
        "GET /mqtt HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mask = [0x12, 0x34, 0x56, 0x78];
    let mut frame = vec![0x82, 0x80 | u8::try_from(payload.len()).unwrap()];
    frame.extend(mask);
    frame.extend(payload.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
    stream.write_all(&frame).await.unwrap();

    let mut received = Vec::new();
    let read = async {
        loop {
            let mut buf = [0_u8; 1024];
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&received));
            received.extend_from_slice(&buf[..n]);
            let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            let head = String::from_utf8_lossy(&received[..end]).into_owned();
            assert!(head.starts_with("HTTP/1.1 101"), "{head}");
            // Unmasked server frames with 7-bit lengths.
            let mut frames = &received[end + 4..];
            let mut data = Vec::new();
            while frames.len() >= 2 && frames.len() >= 2 + usize::from(frames[1] & 0x7f) {
                let len = usize::from(frames[1] & 0x7f);
                assert_eq!(frames[0] & 0x0f, 0x02, "a binary frame: {frames:?}");
                data.extend_from_slice(&frames[2..2 + len]);
                frames = &frames[2 + len..];
            }
            if data.len() >= want {
                return data;
            }
        }
    };
    tokio::time::timeout(WAIT, read)
        .await
        .expect("a WebSocket answer")
}

/// Subscribes a persistent session, has three messages delivered and left unacked,
/// reconnects, and returns (first delivery, redelivery).
async fn unacked_then_reconnect(
    broker: &TestBroker,
    qos: QoS,
) -> (Vec<Publish>, Vec<Publish>, bool) {
    let url = broker.url();
    let client_id = unique_id("facts");
    let topic = format!("selftest/facts/{}", unique_id("t"));
    let (mut wire, _) = WireClient::connect(&url, &client_id, false).await;
    wire.subscribe(&topic, qos).await;
    for i in 0..3 {
        publish_raw(&url, &topic, format!("m{i}"), qos, false).await;
    }
    let mut first = Vec::new();
    for _ in 0..3 {
        first.push(wire.expect_publish(WAIT).await);
    }
    drop(wire);
    let (mut wire, ack) = WireClient::connect(&url, &client_id, false).await;
    let mut again = Vec::new();
    for _ in 0..3 {
        again.push(wire.expect_publish(WAIT).await);
    }
    (first, again, ack.session_present)
}

fn ids(publishes: &[Publish]) -> Vec<u16> {
    publishes.iter().map(|publish| publish.pkid).collect()
}

#[tokio::test]
async fn brokers_behave_as_broker_kind_says() {
    for kind in broker_matrix() {
        let broker = TestBroker::start_kind(kind).await;
        let url = broker.url();

        // Unacked QoS 1 and QoS 2 come back to a resumed session with the same ids;
        // DUP only where the kind says so.
        for qos in [QoS::AtLeastOnce, QoS::ExactlyOnce] {
            let (first, again, session_present) = unacked_then_reconnect(&broker, qos).await;
            assert!(session_present, "[{kind}] {qos:?}");
            assert_eq!(ids(&again), ids(&first), "[{kind}] {qos:?}: same ids");
            assert!(first.iter().all(|publish| !publish.dup), "[{kind}]");
            assert!(
                again.iter().all(|p| p.dup == kind.sets_dup_on_redelivery()),
                "[{kind}] {qos:?}: DUP on redelivery {again:?}"
            );
        }

        // PUBREC sent, PUBREL received, PUBCOMP withheld, reconnect.
        let client_id = unique_id("facts-rel");
        let topic = format!("selftest/facts/{}", unique_id("t"));
        let (mut wire, _) = WireClient::connect(&url, &client_id, false).await;
        wire.subscribe(&topic, QoS::ExactlyOnce).await;
        publish_raw(&url, &topic, "q2", QoS::ExactlyOnce, false).await;
        let pkid = wire.expect_publish(WAIT).await.pkid;
        wire.send(Packet::PubRec(PubRec::new(pkid))).await;
        match wire.recv(WAIT).await {
            Ok(Packet::PubRel(rel)) => assert_eq!(rel.pkid, pkid, "[{kind}]"),
            other => panic!("[{kind}] expected PUBREL, got {other:?}"),
        }
        drop(wire);
        let (mut wire, ack) = WireClient::connect(&url, &client_id, false).await;
        assert!(ack.session_present, "[{kind}]");
        let (after, end) = if kind.resends_pubrel() {
            (vec![wire.recv(WAIT).await.expect("a PUBREL")], None)
        } else {
            wire.drain(QUIET).await
        };
        let resent: Vec<u16> = after
            .iter()
            .filter_map(|packet| match packet {
                Packet::PubRel(rel) => Some(rel.pkid),
                _ => None,
            })
            .collect();
        let expected = if kind.resends_pubrel() {
            vec![pkid]
        } else {
            Vec::new()
        };
        assert_eq!(
            resent, expected,
            "[{kind}] after reconnect: {after:?} {end:?}"
        );

        // Acks out of receive order, then an ack for an id never sent.
        for (disorder, send_reversed) in [("out of order", true), ("unsolicited", false)] {
            let (mut wire, _) = WireClient::connect(&url, &unique_id("facts-ack"), true).await;
            let topic = format!("selftest/facts/{}", unique_id("t"));
            wire.subscribe(&topic, QoS::AtLeastOnce).await;
            let mut held = Vec::new();
            if send_reversed {
                for i in 0..3 {
                    publish_raw(&url, &topic, format!("o{i}"), QoS::AtLeastOnce, false).await;
                    held.push(wire.expect_publish(WAIT).await.pkid);
                }
                held.reverse();
            } else {
                held.push(4242);
            }
            for pkid in held {
                let _ = wire.try_send(Packet::PubAck(PubAck::new(pkid))).await;
            }
            let (alive, _) = wire.ping(WAIT).await;
            assert_eq!(
                alive,
                !kind.closes_on_unexpected_ack(),
                "[{kind}] {disorder} PUBACK: served afterwards?"
            );
        }

        // A QoS 0 publish to a QoS 1 subscription: the lower of the two, or not.
        let (mut wire, _) = WireClient::connect(&url, &unique_id("facts-qos"), true).await;
        let topic = format!("selftest/facts/{}", unique_id("t"));
        wire.subscribe(&topic, QoS::AtLeastOnce).await;
        publish_raw(&url, &topic, "q0", QoS::AtMostOnce, false).await;
        let delivered = wire.expect_publish(WAIT).await.qos;
        let expected = if kind.delivers_at_subscription_qos() {
            QoS::AtLeastOnce
        } else {
            QoS::AtMostOnce
        };
        assert_eq!(delivered, expected, "[{kind}] QoS 0 to a QoS 1 subscriber");

        // The delivery window, and what the broker answers while it is full.
        window_and_answers(kind, &url).await;

        // Refusals: only aedes can be told to; everyone else grants (checked on
        // mosquitto's ACLs; docs/ARCHITECTURE.md, "Brokers").
        if kind.can_refuse_subscriptions() {
            let aedes = Aedes::start_with(AedesOptions::new().deny("selftest/facts/denied")).await;
            let (mut wire, ack) = WireClient::connect(&aedes.url(), &unique_id("f"), true).await;
            assert!(accepted(&ack));
            let suback = wire
                .subscribe("selftest/facts/denied", QoS::AtLeastOnce)
                .await;
            assert_eq!(suback.return_codes, [SubscribeReasonCode::Failure]);
        }
        assert_eq!(kind.can_restart(), broker.is_mosquitto());
    }
}

/// Fills the delivery window of a client that does not acknowledge, checks its size,
/// and whether the broker still answers a PINGREQ; where it does not, acknowledges the
/// oldest delivery and checks that the PINGRESP comes then.
async fn window_and_answers(kind: BrokerKind, url: &str) {
    let (mut wire, _) = WireClient::connect(url, &unique_id("facts-window"), true).await;
    let topic = format!("selftest/facts/{}", unique_id("t"));
    wire.subscribe(&topic, QoS::AtLeastOnce).await;
    // One more than the largest window in the table.
    let sent = 101;
    publish_all(url, &topic, (0..sent).map(|i| format!("w{i}").into_bytes())).await;
    let window = kind.delivery_window().unwrap_or(sent);
    let mut delivered = Vec::new();
    for _ in 0..window {
        delivered.push(wire.expect_publish(WAIT).await.pkid);
    }
    let (more, end) = wire.drain(QUIET).await;
    assert!(
        more.is_empty() && end.is_none(),
        "[{kind}] more than {window} deliveries before an ack: {more:?} {end:?}"
    );
    // An absence is watched for QUIET only; an answer may take WAIT.
    let withholds = kind.withholds_answers_while_window_full();
    let (answered, _) = wire.ping(if withholds { QUIET } else { WAIT }).await;
    assert_eq!(answered, !withholds, "[{kind}] PINGRESP with a full window");
    if withholds {
        // An ack of the oldest delivery frees the window, and the PINGRESP comes.
        wire.send(Packet::PubAck(PubAck::new(delivered[0]))).await;
        let answered = loop {
            match wire.recv(WAIT).await {
                Ok(Packet::PingResp) => break true,
                Ok(_) => {}
                Err(_) => break false,
            }
        };
        assert!(
            answered,
            "[{kind}] PINGRESP once a delivery was acknowledged"
        );
    }
}
