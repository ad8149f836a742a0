//! The fleet's interop flow (`tests/interop/worker.rs`: the memory worker as a
//! process, driven by the fleet's strict Python client) with the worker's connection
//! through the proxy: its acknowledgements leave in receive order, and it never
//! reconnects. rumqttd used to close the worker's connection here ("out of order
//! ack") while acknowledgements were ordered per topic only.

use super::support::{BrokerKind, Proxy, TestBroker};
use super::worker::{fleet_flow, python_ready};
use super::Figures;

/// The scenario on `kind`.
pub(crate) async fn fleet_interop(kind: BrokerKind) {
    if !python_ready().await {
        return;
    }
    let broker = TestBroker::start_kind(kind).await;
    let proxy = Proxy::start(broker.addr()).await;
    let run = fleet_flow(&broker, &proxy.url()).await;
    println!("[{kind}] {}", run.summary);

    let report = proxy.ack_report();
    let totals = &report.totals;
    Figures::new(kind, "fleet_interop")
        .add("worker_connections", proxy.total_accepted())
        .add("reconnects", run.reconnects())
        .add("qos1_to_worker", totals.publishes_to_client[1])
        .add("qos0_to_worker", totals.publishes_to_client[0])
        .add("qos0_from_worker", totals.publishes_from_client[0])
        .add("qos1_from_worker", totals.publishes_from_client[1])
        .acks(&report)
        .print();
    let diagnosis = format!("[{kind}] {report}\n{}", run.log);
    assert_eq!(
        run.reconnects(),
        0,
        "the worker lost its connection; {diagnosis}"
    );
    assert_eq!(
        proxy.total_accepted(),
        1,
        "the worker connected once; {diagnosis}"
    );
    assert_eq!(
        totals.client_acks.puback, totals.publishes_to_client[1],
        "the worker acknowledged every QoS 1 delivery; {diagnosis}"
    );
    // The QoS the worker publishes with, seen on the wire: rumqttd delivers at the
    // subscription's QoS, so there only the proxy sees the QoS 0 replies as such.
    assert!(
        totals.publishes_from_client[0] > 0 && totals.publishes_from_client[2] == 0,
        "the worker's character/result replies left at QoS 0, nothing at QoS 2; {diagnosis}"
    );
    proxy.assert_acks_in_order();
    assert_eq!(report.unsolicited(), 0, "no unsolicited ack; {diagnosis}");
}
