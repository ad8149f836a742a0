//! A burst of requests into a handler that answers each with a confirmed QoS 1
//! reply, as the memory worker answers `memory/query`: 150 requests arrive at once,
//! and every one must be answered, once, before a handler could run into its timeout
//! (30 s by default).
//!
//! On rumqttd 0.20 a service must acknowledge such requests on receipt, and this
//! scenario does so there. rumqttd sends a client at most 100 unacknowledged
//! deliveries, and while those 100 are out it answers nothing the client sends:
//! not the PUBACK of the first handler's reply. That handler cannot finish
//! without it; receive order holds the acknowledgement of every later request
//! behind the first one; so rumqttd never sees the acknowledgement that would let
//! it answer. Measured with acknowledgement after handling: 100 requests
//! delivered and none acknowledged for 90 s, until the first request's handler had
//! timed out on every retry and was failed (its reply published once per
//! attempt); the other 149 were then answered within a second. Per-topic order
//! would not help (one topic). mosquitto (20 in flight, and it answers
//! regardless) and aedes (no limit) need no workaround; docs/RELIABILITY.md says
//! the same.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tower_mqtt::{handler::HandlerResult, Ack, Envelope, Publisher, Request, Router, Subscription};

use super::support::{publish_all, BrokerKind, Ledger, Proxy, TestBroker};
use super::{config, serve_router, Figures, EVENT};

/// Requests in the burst: more than rumqttd's 100 deliveries in flight.
const REQUESTS: u64 = 150;
const REQUEST_TOPIC: &str = "matrix/ask";
const REPLY_TOPIC: &str = "matrix/answer";
/// The default handler timeout: the burst must be answered before any handler
/// could have run into it.
const HANDLER_TIMEOUT: Duration = Duration::from_secs(30);

/// The scenario on `kind`.
pub(crate) async fn reply_burst(kind: BrokerKind) {
    let broker = TestBroker::start_kind(kind).await;
    let proxy = Proxy::start(broker.addr()).await;
    let ledger = Ledger::new(EVENT);
    let confirmed = Arc::new(AtomicU64::new(0));
    let handler = {
        let (ledger, confirmed) = (ledger.clone(), Arc::clone(&confirmed));
        move |publisher: Publisher, req: Request<Envelope>| {
            let (ledger, confirmed) = (ledger.clone(), Arc::clone(&confirmed));
            async move {
                let answer = serde_json::json!({ "answer": req.body().data()["seq"] });
                publisher
                    .publish(REPLY_TOPIC, answer)
                    .reply_to(&req)
                    .await?;
                confirmed.fetch_add(1, Ordering::Relaxed);
                ledger.record(req.body());
                HandlerResult::Ok(())
            }
        }
    };
    // rumqttd stalls a connection that holds 100 unacknowledged deliveries (see
    // the module docs): there, the requests are acknowledged on receipt.
    let requests = match kind {
        BrokerKind::Embedded => Subscription::new(REQUEST_TOPIC).ack(Ack::OnReceipt),
        _ => Subscription::new(REQUEST_TOPIC),
    };
    let router = Router::new().route(requests, handler);
    let running = serve_router(config(&proxy.url(), "matrix-replies"), router).await;

    let started = Instant::now();
    publish_all(
        &broker.url(),
        REQUEST_TOPIC,
        (0..REQUESTS).map(|seq| ledger.envelope(seq)),
    )
    .await;
    let all = ledger
        .wait_unique(usize::try_from(REQUESTS).unwrap(), HANDLER_TIMEOUT)
        .await;
    let elapsed = started.elapsed();
    let acked = proxy
        .wait_for_client_acks(REQUESTS, Duration::from_secs(5))
        .await;

    let stats = running.stats();
    let report = proxy.ack_report();
    let tally = ledger.tally(0..REQUESTS);
    let totals = &report.totals;
    Figures::new(kind, "reply_burst")
        .add("requests", REQUESTS)
        .add("answered", tally.handled)
        .add("replies_confirmed", confirmed.load(Ordering::Relaxed))
        .add("replies_published", totals.publishes_from_client[1])
        .add("replies_acked_by_broker", totals.broker_acks.puback)
        .add("deliveries", totals.publishes_to_client[1])
        .add("failed", stats.failed)
        .add("connections", stats.connections)
        .acks(&report)
        .add("elapsed_ms", elapsed.as_millis())
        .print();
    let diagnosis = format!("[{kind}] {stats:?}\n{report}");
    assert!(
        all,
        "{} of {REQUESTS} requests answered within {HANDLER_TIMEOUT:?}; the broker \
         delivered {} and acknowledged {} of the {} replies; {diagnosis}",
        tally.handled,
        totals.publishes_to_client[1],
        totals.broker_acks.puback,
        totals.publishes_from_client[1],
    );
    assert!(
        tally.twice.is_empty() && stats.failed == 0,
        "each answered once, none failed: {:?}; {diagnosis}",
        tally.twice
    );
    assert_eq!(stats.connections, 1, "one connection; {diagnosis}");
    assert!(acked, "every request acknowledged; {diagnosis}");
    proxy.assert_acks_in_order();
    assert_eq!(report.unsolicited(), 0, "no unsolicited ack; {diagnosis}");
    running.shutdown().await;
}
