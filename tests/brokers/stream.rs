//! 2,000 QoS 1 messages, published with a plain rumqttc client straight to the
//! broker, consumed by a service with a persistent session through the proxy: each
//! is handled exactly once, on one connection, and acknowledged in receive order.

use std::time::Instant;

use super::support::{publish_all, BrokerKind, Ledger, Proxy, TestBroker};
use super::{config, serve_ledger, settle, Figures, EVENT, STREAM_WAIT, WAIT};

/// Messages published.
const MESSAGES: u64 = 2_000;
const TOPIC: &str = "matrix/stream";

/// The scenario on `kind`.
pub(crate) async fn qos1_stream(kind: BrokerKind) {
    let broker = TestBroker::start_kind(kind).await;
    let proxy = Proxy::start(broker.addr()).await;
    let ledger = Ledger::new(EVENT);
    let running = serve_ledger(config(&proxy.url(), "matrix-stream"), TOPIC, &ledger).await;

    let started = Instant::now();
    publish_all(
        &broker.url(),
        TOPIC,
        (0..MESSAGES).map(|seq| ledger.envelope(seq)),
    )
    .await;
    let all = ledger
        .wait_unique(usize::try_from(MESSAGES).unwrap(), STREAM_WAIT)
        .await;
    let marker = settle(&ledger, &broker.url(), TOPIC).await;
    let elapsed = started.elapsed();
    // The marker's PUBACK too.
    let acked = proxy.wait_for_client_acks(MESSAGES + 1, WAIT).await;

    let stats = running.stats();
    let report = proxy.ack_report();
    let tally = ledger.tally(0..MESSAGES);
    Figures::new(kind, "qos1_stream")
        .add("sent", MESSAGES)
        .add("handled", tally.handled)
        .add("lost", tally.lost.len())
        .add("twice", tally.twice.len())
        .add("connections", stats.connections)
        .add("received", stats.received)
        .add("redelivered", stats.redelivered)
        .acks(&report)
        .add("elapsed_ms", elapsed.as_millis())
        .print();
    let diagnosis = format!("[{kind}] {stats:?}\n{report}");
    assert!(
        all && tally.lost.is_empty(),
        "lost {}: {:?}; {diagnosis}",
        tally.lost.len(),
        &tally.lost[..tally.lost.len().min(20)]
    );
    assert!(
        marker,
        "the marker after the stream was handled; {diagnosis}"
    );
    assert!(
        tally.twice.is_empty(),
        "handled twice: {:?}; {diagnosis}",
        tally.twice
    );
    assert!(
        stats.connections == 1 && proxy.total_accepted() == 1,
        "one connection throughout; {diagnosis}"
    );
    assert!(acked, "every delivery acknowledged; {diagnosis}");
    assert_eq!(
        report.totals.client_acks.puback, report.totals.publishes_to_client[1],
        "one PUBACK per QoS 1 delivery; {diagnosis}"
    );
    proxy.assert_acks_in_order();
    assert_eq!(report.unsolicited(), 0, "no unsolicited ack; {diagnosis}");
    running.shutdown().await;
}
