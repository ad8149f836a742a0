//! QoS 2 end to end on mosquitto, on a persistent session: a QoS 2 route gets
//! each message once across a consumer's kill -9 and across cuts (the broker's
//! resent PUBREL must not loop the connection), and a publish at QoS 2
//! resolves once the broker has completed it (PUBCOMP).
//!
//! `qos2_consumer_child` is ignored: it is not a test but the consumer process
//! the kill test starts by re-running this binary with `--ignored`.

mod support;

use std::{
    collections::BTreeMap,
    io::Write as _,
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet};
use serde_json::json;
use support::{AckKind, Proxy, TestBroker};
use tokio::io::{AsyncBufReadExt, BufReader};
use tower_mqtt::{config::Config, Envelope, QoS, Request, Router, Subscription};

const WAIT: Duration = Duration::from_secs(20);
const TOPIC: &str = "exactly/once";

fn config(url: &str, client_id: &str) -> Config {
    support::service_config(url, "exactly-once")
        .with_client_id(client_id)
        .with_clean_session(false)
}

fn route() -> Subscription {
    Subscription::new(TOPIC).qos(QoS::ExactlyOnce)
}

/// mosquitto, or `None` where only the embedded broker exists (it never
/// resends PUBREL, so it cannot show what these tests check).
async fn mosquitto() -> Option<TestBroker> {
    let broker = TestBroker::start().await;
    if broker.is_mosquitto() {
        Some(broker)
    } else {
        eprintln!("skipped: needs mosquitto");
        None
    }
}

/// How many times each `data.seq` was handled, and at which QoS.
#[derive(Clone, Default)]
struct Ledger(Arc<Mutex<BTreeMap<u64, u32>>>);

impl Ledger {
    fn record(&self, req: &Request<Envelope>) {
        assert_eq!(req.qos(), QoS::ExactlyOnce, "delivered at QoS 2");
        let seq = req.body().data()["seq"].as_u64().expect("seq");
        *self.0.lock().unwrap().entry(seq).or_default() += 1;
    }

    async fn wait_for(&self, seqs: impl Iterator<Item = u64> + Clone) -> bool {
        tokio::time::timeout(WAIT, async {
            while !seqs
                .clone()
                .all(|seq| self.0.lock().unwrap().contains_key(&seq))
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .is_ok()
    }

    fn twice(&self) -> Vec<(u64, u32)> {
        let counts = self.0.lock().unwrap();
        counts
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(seq, n)| (*seq, *n))
            .collect()
    }
}

/// Publishes `seqs` at QoS 2 with a plain rumqttc client, directly to the
/// broker, one at a time, and returns once every one is complete (PUBCOMP).
///
/// One at a time, because mosquitto 2.0.11 loses QoS 2 messages that arrive
/// while an earlier one from the same client is not yet complete (measured:
/// 1,000 published with rumqttc's 100 in flight, 533 never delivered;
/// eclipse-mosquitto/mosquitto#3056 reports the same).
async fn publish_qos2(url: &str, seqs: std::ops::Range<u64>) {
    let (host, port) = support::host_port(url);
    let mut options = MqttOptions::new(support::unique_id("qos2-feed"), host, port);
    options.set_inflight(1);
    let count = seqs.end - seqs.start;
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    let poll = tokio::spawn(async move {
        let mut complete = 0;
        while complete < count {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubComp(_))) => complete += 1,
                Ok(_) => {}
                Err(err) => panic!("the QoS 2 feed lost its broker: {err}"),
            }
        }
    });
    for seq in seqs {
        let env = Envelope::new("exactly.once", json!({ "seq": seq })).unwrap();
        client
            .publish(TOPIC, rumqttc::QoS::ExactlyOnce, false, env.to_vec())
            .await
            .expect("queue PUBLISH");
    }
    tokio::time::timeout(WAIT, poll)
        .await
        .expect("every QoS 2 publish completed")
        .unwrap();
}

const CHILD_URL: &str = "TOWER_MQTT_QOS2_CHILD_URL";
const CHILD_ID: &str = "TOWER_MQTT_QOS2_CHILD_ID";
/// The message the child hangs on; those before it it handles.
const HANG_AT: u64 = 20;

/// The consumer process: handles messages before [`HANG_AT`] (announcing each
/// on stdout), and hangs on that one until the parent kills it.
#[tokio::test]
#[ignore = "the consumer process of a_qos2_route_gets_each_message_once_across_a_consumer_kill_9"]
async fn qos2_consumer_child() {
    let url = std::env::var(CHILD_URL).expect("started by the parent test");
    let client_id = std::env::var(CHILD_ID).expect("started by the parent test");
    let handler = |req: Request<Envelope>| async move {
        let seq = req.body().data()["seq"].as_u64().unwrap_or(u64::MAX);
        let say = |line: String| {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        };
        if seq >= HANG_AT {
            say(format!("CHILD-HANGING {seq}"));
            std::future::pending::<()>().await;
        }
        say(format!("CHILD-HANDLED {seq}"));
    };
    let running = tower_mqtt::serve(
        config(&url, &client_id),
        Router::new().route(route(), handler),
    )
    .spawn()
    .unwrap();
    tokio::time::timeout(WAIT, running.ready())
        .await
        .expect("child ready")
        .expect("subscribed");
    println!("CHILD-READY");
    let _ = std::io::stdout().flush();
    // Serve until killed; the parent bounds how long that can be.
    tokio::time::sleep(Duration::from_secs(120)).await;
}

/// Reads the child's stdout until a line containing `prefix`, counting the
/// messages it reports handled on the way.
async fn read_until(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    handled: &mut BTreeMap<u64, u32>,
    prefix: &str,
) {
    tokio::time::timeout(WAIT, async {
        loop {
            let line = lines
                .next_line()
                .await
                .ok()
                .flatten()
                .unwrap_or_else(|| panic!("the child exited before {prefix}"));
            if let Some(at) = line.find("CHILD-HANDLED ") {
                let seq = line[at + 14..].trim().parse().expect("a sequence number");
                *handled.entry(seq).or_default() += 1;
            }
            if line.contains(prefix) {
                return;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the child printed {prefix} within {WAIT:?}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos2_route_gets_each_message_once_across_a_consumer_kill_9() {
    let Some(broker) = mosquitto().await else {
        return;
    };
    let proxy = Proxy::start(broker.addr()).await;
    let client_id = support::unique_id("qos2-killed");
    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "qos2_consumer_child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_URL, proxy.url())
        .env(CHILD_ID, &client_id)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the consumer process");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut handled_by_child = BTreeMap::<u64, u32>::new();
    read_until(&mut lines, &mut handled_by_child, "CHILD-READY").await;

    let total = 50;
    publish_qos2(&broker.url(), 0..total).await;
    read_until(&mut lines, &mut handled_by_child, "CHILD-HANGING").await;
    // Kill only once the PUBRECs of the handled ones have passed the proxy:
    // a kill between a handler's end and its PUBREC would repeat that one,
    // which is at-least-once across a crash, not what is tested here.
    assert!(
        proxy.wait_for_client_acks(HANG_AT, WAIT).await,
        "the child acknowledged what it handled: {}",
        proxy.ack_report()
    );
    child.start_kill().expect("SIGKILL the consumer");
    let exit = child.wait().await.unwrap();
    assert!(!exit.success(), "killed, not exited: {exit:?}");
    let before_kill = proxy.ack_report();

    // The same session in this process: the rest comes back, the handled ones
    // do not (the broker resends PUBREL for those it got no PUBCOMP for).
    let ledger = Ledger::default();
    let handler = {
        let ledger = ledger.clone();
        move |req: Request<Envelope>| {
            ledger.record(&req);
            std::future::ready(())
        }
    };
    let revived = tower_mqtt::serve(
        config(&proxy.url(), &client_id),
        Router::new().route(route(), handler),
    )
    .spawn()
    .unwrap();
    let all = ledger.wait_for(HANG_AT..total).await;
    // A marker after everything: once handled, every redelivery came.
    publish_qos2(&broker.url(), 1000..1001).await;
    let marked = ledger.wait_for(1000..1001).await;
    let stats = revived.stats();
    let revived_seen: Vec<u64> = ledger.0.lock().unwrap().keys().copied().collect();
    let again: Vec<u64> = revived_seen
        .iter()
        .copied()
        .filter(|seq| handled_by_child.contains_key(seq))
        .collect();
    eprintln!(
        "FIGURES qos2 kill -9: sent={total} handled_by_child={} handled_after={} \
         handled_twice={} child_pubrecs={} pubcomps_before_kill={} connections_after={} \
         failures_after={}",
        handled_by_child.len(),
        revived_seen.len(),
        again.len(),
        before_kill.totals.client_acks.get(AckKind::Pubrec),
        before_kill.totals.client_pubcomps,
        stats.connections,
        stats.connection_failures,
    );
    assert_eq!(
        handled_by_child.keys().copied().collect::<Vec<_>>(),
        (0..HANG_AT).collect::<Vec<_>>(),
        "the child handled the first {HANG_AT}"
    );
    assert!(all && marked, "the rest came back: {revived_seen:?}");
    assert!(again.is_empty(), "handled again after the kill: {again:?}");
    assert!(
        ledger.twice().is_empty(),
        "handled twice: {:?}",
        ledger.twice()
    );
    assert_eq!(
        stats.connection_failures, 0,
        "the resent PUBRELs did not loop the connection: {stats:?}"
    );
    proxy.assert_acks_in_order();
    revived.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos2_route_on_a_persistent_session_survives_cuts_without_a_reconnect_loop() {
    let Some(broker) = mosquitto().await else {
        return;
    };
    let proxy = Arc::new(Proxy::start(broker.addr()).await);
    let ledger = Ledger::default();
    let handler = {
        let ledger = ledger.clone();
        move |req: Request<Envelope>| {
            let ledger = ledger.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(2)).await;
                ledger.record(&req);
            }
        }
    };
    let running = tower_mqtt::serve(
        config(&proxy.url(), &support::unique_id("qos2-cuts")),
        Router::new().route(route(), handler),
    )
    .spawn()
    .unwrap();
    tokio::time::timeout(WAIT, running.ready())
        .await
        .expect("ready")
        .expect("subscribed");
    let total = 1_000;
    let cutter = {
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let mut cuts = 0;
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_millis(400)).await;
                if proxy.connections() > 0 {
                    proxy.cut().await;
                    cuts += 1;
                }
            }
            cuts
        })
    };
    publish_qos2(&broker.url(), 0..total).await;
    let cuts: u64 = cutter.await.unwrap();
    let all = ledger.wait_for(0..total).await;
    publish_qos2(&broker.url(), 10_000..10_001).await;
    let marked = ledger.wait_for(10_000..10_001).await;
    let stats = running.stats();
    let report = proxy.ack_report();
    eprintln!(
        "FIGURES qos2 cuts: sent={total} cuts={cuts} handled_twice={} connections={} \
         failures={} redelivered={} pubrecs={} pubcomps={} ack_violations={}",
        ledger.twice().len(),
        stats.connections,
        stats.connection_failures,
        stats.redelivered,
        report.totals.client_acks.get(AckKind::Pubrec),
        report.totals.client_pubcomps,
        report.violations(),
    );
    assert!(all && marked, "every message handled: {stats:?}");
    assert!(
        ledger.twice().is_empty(),
        "handled twice: {:?}",
        ledger.twice()
    );
    assert_eq!(
        stats.connection_failures, cuts,
        "no reconnect but those the cuts caused: {stats:?}"
    );
    proxy.assert_acks_in_order();
    assert_eq!(
        report.unsolicited(),
        0,
        "no stale acknowledgement: {report}"
    );
    running.shutdown().await;
}

#[tokio::test]
async fn a_publish_at_qos2_resolves_once_the_broker_completed_it() {
    let broker = TestBroker::start().await;
    let proxy = Proxy::start(broker.addr()).await;
    let ledger = Ledger::default();
    let handler = {
        let ledger = ledger.clone();
        move |req: Request<Envelope>| {
            ledger.record(&req);
            std::future::ready(())
        }
    };
    let consumer = tower_mqtt::serve(
        config(&broker.url(), &support::unique_id("qos2-consumer")),
        Router::new().route(route(), handler),
    )
    .spawn()
    .unwrap();
    tokio::time::timeout(WAIT, consumer.ready())
        .await
        .expect("ready")
        .expect("subscribed");
    let producer = tower_mqtt::serve(
        config(&proxy.url(), &support::unique_id("qos2-producer")),
        Router::new(),
    )
    .spawn()
    .unwrap();
    for seq in 0..10 {
        tokio::time::timeout(
            WAIT,
            producer
                .publisher()
                .publish(TOPIC, json!({ "seq": seq }))
                .qos(QoS::ExactlyOnce),
        )
        .await
        .expect("resolved")
        .expect("published");
        // The proxy counts a packet before relaying it: the PUBCOMP passed
        // before the publish resolved.
        let report = proxy.ack_report();
        assert_eq!(
            report.totals.broker_pubcomps,
            seq + 1,
            "resolved on the broker's PUBCOMP: {report}"
        );
    }
    assert!(ledger.wait_for(0..10).await);
    assert!(ledger.twice().is_empty());
    let report = proxy.ack_report();
    assert_eq!(report.totals.publishes_from_client[2], 10);
    assert_eq!(report.totals.client_acks.get(AckKind::Pubrel), 10);
    proxy.assert_acks_in_order();
    producer.shutdown().await;
    consumer.shutdown().await;
}

#[tokio::test]
async fn a_pubrel_resent_on_a_resumed_session_is_completed_without_a_reconnect_loop() {
    let Some(broker) = mosquitto().await else {
        return;
    };
    let proxy = Proxy::start(broker.addr()).await;
    let client_id = support::unique_id("qos2-pubrel");
    // A scripted client takes a QoS 2 message, sends PUBREC, and leaves
    // without answering the broker's PUBREL: the session now owes a PUBCOMP.
    let (mut wire, ack) = support::WireClient::connect(&broker.url(), &client_id, false).await;
    assert!(support::accepted(&ack));
    wire.subscribe(TOPIC, rumqttc::QoS::ExactlyOnce).await;
    publish_qos2(&broker.url(), 0..1).await;
    let first = wire.expect_publish(WAIT).await;
    wire.send(Packet::PubRec(rumqttc::PubRec::new(first.pkid)))
        .await;
    let pubrel = wire.recv(WAIT).await.expect("the broker's PUBREL");
    assert!(matches!(pubrel, Packet::PubRel(_)), "{pubrel:?}");
    drop(wire);

    // The service resumes that session: the broker resends the PUBREL first.
    let ledger = Ledger::default();
    let handler = {
        let ledger = ledger.clone();
        move |req: Request<Envelope>| {
            ledger.record(&req);
            std::future::ready(())
        }
    };
    let running = tower_mqtt::serve(
        config(&proxy.url(), &client_id),
        Router::new().route(route(), handler),
    )
    .spawn()
    .unwrap();
    tokio::time::timeout(WAIT, running.ready())
        .await
        .expect("ready")
        .expect("subscribed");
    publish_qos2(&broker.url(), 1..2).await;
    assert!(ledger.wait_for(1..2).await, "the next message is handled");
    let stats = running.stats();
    let report = proxy.ack_report();
    assert_eq!(
        (stats.connections, stats.connection_failures),
        (1, 0),
        "the PUBREL did not fail the connection: {stats:?}"
    );
    assert!(
        report.totals.client_pubcomps >= 2,
        "the resent PUBREL was answered: {report}"
    );
    assert!(
        !ledger.0.lock().unwrap().contains_key(&0),
        "the message released by the PUBREL is not handled again"
    );
    running.shutdown().await;
}
