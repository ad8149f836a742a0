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
//! Needs `python3` (3.11+) with `aiomqtt` 2 and `pydantic` 2, which `.ci/run`
//! installs. Without them the tests print "skipped" and pass, except on CI (env
//! `CI` non-empty), where they fail.

mod support;
#[path = "interop/worker.rs"]
mod worker;

use support::{test_protocol, Probe, TestBroker};
use worker::{
    checked_health_data, fleet_flow, python_ready, retained_health, worker_binary, Worker, HEALTH,
    WAIT,
};

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
