//! A consumer killed with SIGKILL while a handler runs, then started again with the
//! same client id: the broker hands back everything that was not acknowledged.
//!
//! The consumer is a child process (`consumer_child`, this binary re-run) with a
//! persistent session through the proxy. It handles messages `0..STUCK_AT` of one
//! topic in order; the handler of `STUCK_AT` never finishes, which holds back the
//! topic's later messages. Once the acknowledgements of the finished ones have passed
//! the proxy (so that the kill cannot land between a handler finishing and its
//! PUBACK being written) and the broker has processed them
//! ([`broker_processed_acks`], so that the new connection's takeover cannot overtake
//! them), the child is killed; a consumer with the same client id in this process must then
//! handle every other message: none lost, none handled twice, and the one that was
//! mid-flight run again (it never finished, so it was never acknowledged).

use std::collections::BTreeSet;
use std::time::Duration;

use tower_mqtt::{Envelope, Request, Router};

use super::support::{
    parent_lines, publish_all, unique_id, BrokerKind, Ledger, Proxy, TestBroker, TestChild,
};
use super::{
    config, say, serve_ledger, settle, sync_with_broker, Figures, EVENT, MARKER, STREAM_WAIT, WAIT,
};

/// Messages published.
const TOTAL: u64 = 300;
/// The message whose handler is running when the child is killed.
const STUCK_AT: u64 = 100;
const TOPIC: &str = "matrix/killed";
/// The child's environment: where to connect, as whom, and where to get stuck.
const CHILD_URL: &str = "TOWER_MQTT_MATRIX_CHILD_URL";
const CHILD_ID: &str = "TOWER_MQTT_MATRIX_CHILD_ID";
const CHILD_STUCK_AT: &str = "TOWER_MQTT_MATRIX_CHILD_STUCK_AT";
/// The most the child serves if its parent neither kills it nor closes its stdin.
const CHILD_LIFETIME: Duration = Duration::from_secs(120);

/// The scenario on `kind`.
// One scenario, read top to bottom.
#[allow(clippy::too_many_lines)]
pub(crate) async fn consumer_kill(kind: BrokerKind) {
    let broker = TestBroker::start_kind(kind).await;
    let proxy = Proxy::start(broker.addr()).await;
    let client_id = unique_id("matrix-killed");
    let mut child = TestChild::spawn(
        "consumer_child",
        &[
            (CHILD_URL, proxy.url()),
            (CHILD_ID, client_id.clone()),
            (CHILD_STUCK_AT, STUCK_AT.to_string()),
        ],
    );
    child.line("CHILD-READY", WAIT).await;

    let ledger = Ledger::new(EVENT);
    publish_all(
        &broker.url(),
        TOPIC,
        (0..TOTAL).map(|seq| ledger.envelope(seq)),
    )
    .await;
    child.line(&format!("CHILD-STUCK {STUCK_AT}"), WAIT).await;
    let finished_acked = proxy.wait_for_client_acks(STUCK_AT, WAIT).await;
    assert!(
        finished_acked,
        "[{kind}] the child's acks for its {STUCK_AT} finished messages passed the proxy: {}",
        proxy.ack_report()
    );
    broker_processed_acks(kind, &proxy, &mut child).await;
    let exit = child.kill().await;
    assert!(!exit.success(), "[{kind}] killed, not exited: {exit:?}");
    let child_connections = proxy.total_accepted();
    let printed = child.lines();
    let done_in_child: BTreeSet<u64> = numbers(&printed, "CHILD-DONE ");
    let stuck_in_child: BTreeSet<u64> = numbers(&printed, "CHILD-STUCK ");

    // The same client id again, in this process.
    let revived_config = config(&proxy.url(), "matrix-revived").with_client_id(&client_id);
    let revived = serve_ledger(revived_config, TOPIC, &ledger).await;
    let unhandled: Vec<u64> = (0..TOTAL)
        .filter(|seq| !done_in_child.contains(seq))
        .collect();
    let all = ledger
        .wait_all(unhandled.iter().copied(), STREAM_WAIT)
        .await;
    let marker = settle(&ledger, &broker.url(), TOPIC).await;
    // The revived consumer's acks: every unhandled message and the marker.
    let acked = proxy
        .wait_for_client_acks(STUCK_AT + unhandled.len() as u64 + 1, WAIT)
        .await;

    // A run in the child counts as handling when it finished, and as a run when it
    // started (the stuck one started and never finished).
    let counts = ledger.counts();
    let lost: Vec<u64> = unhandled
        .iter()
        .copied()
        .filter(|seq| !counts.contains_key(seq))
        .collect();
    let twice: Vec<u64> = (0..TOTAL)
        .filter(|seq| {
            let here = counts.get(seq).copied().unwrap_or_default();
            here > 1 || (here == 1 && done_in_child.contains(seq))
        })
        .collect();
    let rerun: Vec<u64> = stuck_in_child
        .iter()
        .copied()
        .filter(|seq| counts.contains_key(seq))
        .collect();
    let stats = revived.stats();
    let report = proxy.ack_report();
    Figures::new(kind, "consumer_kill")
        .add("sent", TOTAL)
        .add("handled_by_child", done_in_child.len())
        .add("mid_flight", stuck_in_child.len())
        .add(
            "handled_after_restart",
            counts.keys().filter(|seq| **seq != MARKER).count(),
        )
        .add("lost", lost.len())
        .add("twice", twice.len())
        .add("mid_flight_run_again", rerun.len())
        .add("child_connections", child_connections)
        .add("revived_connections", stats.connections)
        .acks(&report)
        .print();
    let diagnosis = format!("[{kind}] {stats:?}\n{report}");
    assert_eq!(
        done_in_child,
        (0..STUCK_AT).collect::<BTreeSet<u64>>(),
        "the child handled the topic's messages in order up to the stuck one; {diagnosis}"
    );
    assert!(
        all && lost.is_empty(),
        "lost {}: {:?}; {diagnosis}",
        lost.len(),
        &lost[..lost.len().min(20)]
    );
    assert!(
        marker,
        "the marker after everything was handled; {diagnosis}"
    );
    assert!(
        twice.is_empty(),
        "handled twice (in the child and again here, or twice here): {twice:?}; {diagnosis}"
    );
    assert_eq!(
        rerun,
        [STUCK_AT],
        "the message that was mid-flight is run again; {diagnosis}"
    );
    assert_eq!(
        (child_connections, stats.connections),
        (1, 1),
        "one connection each; {diagnosis}"
    );
    assert!(acked, "every redelivery acknowledged; {diagnosis}");
    proxy.assert_acks_in_order();
    assert_eq!(report.unsolicited(), 0, "no unsolicited ack; {diagnosis}");
    revived.shutdown().await;
}

/// Waits until the broker has processed the child's acks of its finished messages,
/// so that the takeover by the revived consumer cannot overtake them (they have
/// passed the proxy, but may still wait unread in the broker's socket).
///
/// A broker handles a connection's packets in order, so the child publishes a
/// message and waits for its PUBACK ([`sync_with_broker`]). rumqttd sends the child
/// no PUBACK while its 100 deliveries are unacknowledged, and the stuck handler holds
/// the acknowledgement of the oldest one; there, the window refilling (100 deliveries
/// after the `STUCK_AT` acknowledged ones) proves that it processed the acks.
async fn broker_processed_acks(kind: BrokerKind, proxy: &Proxy, child: &mut TestChild) {
    if kind.withholds_answers_while_window_full() {
        let window = kind.delivery_window().expect("rumqttd has a window");
        let refilled = proxy
            .wait_for_publishes_to_clients(STUCK_AT + window, WAIT)
            .await;
        assert!(
            refilled,
            "[{kind}] the delivery window refilled after the child's acks: {}",
            proxy.ack_report()
        );
    } else {
        child.send("SYNC").await;
        child.line("CHILD-SYNCED", WAIT).await;
    }
}

/// The numbers after `prefix` in the lines that contain it.
fn numbers(lines: &[String], prefix: &str) -> BTreeSet<u64> {
    lines
        .iter()
        .filter_map(|line| {
            let at = line.find(prefix)?;
            line[at + prefix.len()..].trim().parse().ok()
        })
        .collect()
}

/// The consumer process: serves [`TOPIC`] with a persistent session, says on stdout
/// which messages it finished, and gets stuck on `CHILD_STUCK_AT` until it is killed.
pub(crate) async fn consumer_child() {
    let var = |name: &str| std::env::var(name).expect("started by the parent test");
    let stuck_at: u64 = var(CHILD_STUCK_AT).parse().expect("a sequence number");
    let handler = move |req: Request<Envelope>| async move {
        let Some(seq) = req.body().data()["seq"].as_u64() else {
            return;
        };
        if seq == stuck_at {
            say(format_args!("CHILD-STUCK {seq}"));
            std::future::pending::<()>().await;
        }
        // Said before the handler returns, so before its PUBACK can leave.
        say(format_args!("CHILD-DONE {seq}"));
    };
    let child_config = config(&var(CHILD_URL), "matrix-child").with_client_id(var(CHILD_ID));
    let running = tower_mqtt::serve(child_config, Router::new().route(TOPIC, handler))
        .spawn()
        .expect("a valid configuration");
    tokio::time::timeout(WAIT, running.ready())
        .await
        .expect("child ready")
        .expect("subscribed");
    say("CHILD-READY");
    // Serve until killed; a parent that is gone closes stdin.
    let mut parent = parent_lines();
    while let Ok(Some(line)) = tokio::time::timeout(CHILD_LIFETIME, parent.recv()).await {
        if line == "SYNC" {
            sync_with_broker(&running.publisher()).await;
            say("CHILD-SYNCED");
        }
    }
}
