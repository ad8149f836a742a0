//! Metrics through the `metrics` facade: they agree with `Stats`, and the
//! route label is the route's filter, so ten thousand topics make one series.
//!
//! One test function: the recorder is process-wide, and the checks compare
//! totals that parallel tests in this binary would disturb.

mod support;

use std::{collections::HashMap, time::Duration};

use metrics_util::{
    debugging::{DebugValue, DebuggingRecorder, Snapshotter},
    MetricKind,
};
use serde_json::json;
use support::{QoS as WireQoS, TestBroker};
use tower_mqtt::{metrics as names, Envelope, Request, Router, Running};

const WAIT: Duration = Duration::from_secs(30);

/// Every counter of a snapshot (taking one resets the recorder's counters).
type Counters = Vec<(String, HashMap<String, String>, u64)>;

fn counters(snapshotter: &Snapshotter) -> Counters {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(key, ..)| key.kind() == MetricKind::Counter)
        .map(|(key, _, _, value)| {
            let labels = key
                .key()
                .labels()
                .map(|label| (label.key().to_owned(), label.value().to_owned()))
                .collect();
            let DebugValue::Counter(count) = value else {
                unreachable!("a counter")
            };
            (key.key().name().to_owned(), labels, count)
        })
        .collect()
}

/// The series of one counter: labels and value.
fn series(counters: &Counters, name: &str) -> Vec<(HashMap<String, String>, u64)> {
    counters
        .iter()
        .filter(|(counter, ..)| counter == name)
        .map(|(_, labels, count)| (labels.clone(), *count))
        .collect()
}

fn total(counters: &Counters, name: &str) -> u64 {
    series(counters, name).iter().map(|(_, n)| n).sum()
}

async fn wait_until(running: &Running, done: impl Fn(&tower_mqtt::runtime::Stats) -> bool) {
    tokio::time::timeout(WAIT, async {
        while !done(&running.stats()) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("within {WAIT:?}: {:?}", running.stats()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::too_many_lines)] // one scenario, read top to bottom
async fn metrics_agree_with_stats_and_label_routes_by_filter() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("the only recorder of this binary");
    let broker = TestBroker::start().await;

    // Routes that handle, fail and panic; a subscription no route handles.
    let router = Router::new()
        .route("metrics/+/t", |_: Request<Envelope>| std::future::ready(()))
        .route("metrics/fail", |_: Request<Envelope>| async {
            Err::<(), _>(tower_mqtt::HandlerError::permanent("refused"))
        })
        .route("metrics/panic", |req: Request<Envelope>| async move {
            // A handler bug: it assumes every message carries `n`.
            let _n = req.body().data()["n"].as_i64().expect("n is missing");
        })
        .subscribe(tower_mqtt::Subscription::new("metrics/stray"));
    let running = tower_mqtt::serve(
        support::service_config(&broker.url(), "metrics").with_max_packet_size(2048),
        router,
    )
    .spawn()
    .unwrap();
    tokio::time::timeout(WAIT, running.ready())
        .await
        .unwrap()
        .expect("subscribed");

    // Ten thousand topics under one route.
    let topics = 10_000;
    let url = broker.url();
    for chunk in 0..10 {
        let publishes = (chunk * 1_000..(chunk + 1) * 1_000).map(|i| {
            let env = Envelope::new("metrics.t", json!({ "seq": i })).unwrap();
            (format!("metrics/{i}/t"), env.to_vec())
        });
        support::publish_each(&url, publishes).await;
    }
    let copy = Envelope::new("metrics.t", json!({ "seq": 0 })).unwrap();
    let fresh = || Envelope::new("metrics.t", json!({})).unwrap().to_vec();
    for (topic, payload) in [
        ("metrics/dup/t", copy.to_vec()),
        ("metrics/dup/t", copy.to_vec()),
        ("metrics/bad/t", b"not json".to_vec()),
        ("metrics/bad/t", Vec::new()),
        ("metrics/big/t", vec![b' '; 4096]),
        ("metrics/fail", fresh()),
        ("metrics/panic", fresh()),
        ("metrics/stray", fresh()),
    ] {
        support::publish_raw(&url, topic, payload, WireQoS::AtLeastOnce, false).await;
    }
    let expected = u64::try_from(topics).unwrap() + 8;
    wait_until(&running, |stats| {
        stats.received >= expected && stats.pending == 0
    })
    .await;

    // The outbound side: confirmed publishes, and one too large to send.
    let publisher = running.publisher();
    for seq in 0..20 {
        publisher
            .publish("metrics/out", json!({ "seq": seq }))
            .await
            .expect("confirmed");
    }
    let too_large = publisher
        .publish("metrics/out", json!({ "pad": "x".repeat(4096) }))
        .await;
    assert!(too_large.is_err(), "over the packet limit");
    let stats = running.stats();
    let seen = counters(&snapshotter);

    // One series per route, never a concrete topic.
    let consumed = series(&seen, names::CONSUMED_MESSAGES);
    let route_values: Vec<&str> = consumed
        .iter()
        .map(|(labels, _)| labels[names::ROUTE].as_str())
        .collect();
    assert!(
        route_values
            .iter()
            .all(|route| !route.starts_with("metrics/")
                || !route.contains(|c: char| c.is_ascii_digit())),
        "a concrete topic as a label: {route_values:?}"
    );
    let under_route = consumed
        .iter()
        .filter(|(labels, _)| labels[names::ROUTE] == "metrics/+/t")
        .collect::<Vec<_>>();
    assert_eq!(
        under_route.len(),
        1,
        "one series for the route: {consumed:?}"
    );
    assert!(under_route[0].1 >= u64::try_from(topics).unwrap());
    assert!(consumed
        .iter()
        .all(|(labels, _)| labels[names::SYSTEM] == "mqtt"));

    // The metrics and Stats never disagree.
    let decode_failures = stats.decode_failures.total();
    for (name, from_stats) in [
        (names::CONSUMED_MESSAGES, stats.received),
        (names::HANDLED_MESSAGES, stats.handled),
        (names::FAILED_MESSAGES, stats.failed),
        (names::DUPLICATE_MESSAGES, stats.duplicates),
        (names::UNROUTED_MESSAGES, stats.unrouted),
        (names::DECODE_FAILURES, decode_failures),
        (
            names::DROPPED_MESSAGES,
            stats.dropped_oldest
                + stats.dropped_new
                + stats.dropped_over_limit
                + stats.oversized
                + stats.invalid_topic,
        ),
        (names::CONNECTIONS, stats.connections),
        (names::SENT_MESSAGES, stats.publishes_sent),
        (names::CONFIRMED_MESSAGES, stats.publishes_confirmed),
        (names::PUBLISH_DROPPED, stats.publishes_dropped),
    ] {
        assert_eq!(total(&seen, name), from_stats, "{name}: {stats:?}");
    }
    assert_eq!(stats.publishes_confirmed, 20, "{stats:?}");
    assert_eq!(total(&seen, names::PUBLISH_TOO_LARGE), 1);
    // And each class was exercised.
    assert_eq!(stats.duplicates, 1, "{stats:?}");
    assert_eq!(decode_failures, 2, "{stats:?}");
    assert_eq!(stats.oversized, 1, "{stats:?}");
    assert_eq!(stats.unrouted, 1, "{stats:?}");
    let failed = series(&seen, names::FAILED_MESSAGES);
    let by_type = |kind: &str| -> u64 {
        failed
            .iter()
            .filter(|(labels, _)| labels[names::ERROR_TYPE] == kind)
            .map(|(_, n)| n)
            .sum()
    };
    assert_eq!(
        (by_type("decode"), by_type("handler"), by_type("panic")),
        (2, 1, 1),
        "{failed:?}"
    );
    running.shutdown().await;
}
