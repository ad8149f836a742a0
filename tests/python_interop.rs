//! The fleet's memory worker (`examples/memory_worker.rs`) driven by the fleet's
//! own kind of client: `tests/interop/fleet_client.py`, written with `aiomqtt` and
//! the strict pydantic `Envelope` (`strict=True, extra="forbid"`) the Python
//! services use. Every message the worker publishes must pass that model.
//!
//! The worker runs as its own process against a test-started broker, as in
//! production: `MQTT_URL` from the environment, SIGTERM for a graceful shutdown.
//! The run itself is `tests/interop/worker.rs`, shared with `tests/brokers.rs`,
//! which runs it on every broker of the matrix through the ack-order proxy; here
//! it runs on the default broker with the worker connected directly.
//!
//! Whatever version the suite runs on, an MQTT 5 client asks the worker (connected
//! with MQTT 5) natively as well: `tests/interop/v5_requester.py`, with paho's
//! response topic, correlation data and a W3C `traceparent` user property.
//!
//! Needs `python3` (3.11+) with `aiomqtt` 2 and `pydantic` 2, which `.ci/run`
//! installs. Without them the tests print "skipped" and pass, except on CI (env
//! `CI` non-empty), where they fail.

mod support;
#[path = "interop/worker.rs"]
mod worker;

use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;
use tower_mqtt::config::Protocol;

use support::{on_ci, test_protocol, BrokerKind, Probe, TestBroker};
use worker::{
    checked_health_data, fleet_flow, python_ready, retained_health, worker_binary, Worker, HEALTH,
    WAIT,
};

/// The MQTT 5 requester.
const V5_REQUESTER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/v5_requester.py");
/// Upper bound for the MQTT 5 requester (its own limit is 20 s).
const V5_REQUESTER_DEADLINE: Duration = Duration::from_secs(25);

#[tokio::test]
async fn the_fleet_python_client_accepts_the_memory_worker() {
    if !python_ready().await {
        return;
    }
    let broker = TestBroker::start().await;
    let run = fleet_flow(&broker, &broker.url()).await;
    println!("{}", run.summary);
    assert_eq!(
        run.reconnects(),
        0,
        "the worker kept its connection:\n{}",
        run.log
    );
}

#[tokio::test]
async fn a_killed_memory_worker_leaves_its_last_will_on_its_health_topic() {
    let binary = worker_binary();
    let broker = TestBroker::start().await;
    let mut health = Probe::subscribe(&broker.url(), HEALTH).await;
    let mut worker = Worker::spawn(&binary, &broker.url(), test_protocol());
    worker.wait_health(&mut health, true, "ready").await;

    worker.child.start_kill().expect("SIGKILL the worker");
    let status = tokio::time::timeout(WAIT, worker.child.wait())
        .await
        .expect("the killed worker exits")
        .expect("wait for the worker");
    assert!(!status.success(), "killed, not exited: {status}");

    // The broker publishes the will when it sees the connection drop.
    let will = worker.wait_health(&mut health, false, "").await;
    checked_health_data(&will);
    let retained = retained_health(&broker, &worker).await;
    assert_eq!(
        retained.payload_str(),
        will.payload_str(),
        "the Last Will is what stays retained"
    );
}

#[tokio::test]
async fn an_mqtt5_python_requester_is_answered_on_its_response_topic_with_its_correlation_data() {
    if !python_ready().await {
        return;
    }
    // The embedded broker speaks MQTT 3.1.1 only, and aedes does not speak MQTT 5.
    if let Err(reason) = BrokerKind::Mosquitto.available() {
        assert!(!on_ci(), "CI must run the MQTT 5 interop test: {reason}");
        eprintln!("skipped: the MQTT 5 requester needs mosquitto: {reason}");
        return;
    }
    let broker = TestBroker::start_kind(BrokerKind::Mosquitto).await;
    let binary = worker_binary();
    let mut health = Probe::subscribe(&broker.url(), HEALTH).await;
    let mut worker = Worker::spawn(&binary, &broker.url(), Protocol::V5);
    worker.wait_health(&mut health, true, "ready").await;

    let requester = Command::new("python3")
        .arg(V5_REQUESTER)
        .arg(broker.host())
        .arg(broker.port().to_string())
        // Each reply continues its request's trace: same trace id, a span of its own.
        .arg("--require-trace-context")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(V5_REQUESTER_DEADLINE, requester)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the MQTT 5 requester ran longer than {V5_REQUESTER_DEADLINE:?}\n{}",
                worker.log()
            )
        })
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the MQTT 5 requester failed ({}):\n{stdout}{stderr}\n{}",
        output.status,
        worker.log()
    );
    // How the replies carried the requests' trace ("trace context: ...").
    println!("{}", stdout.trim_end());
}
