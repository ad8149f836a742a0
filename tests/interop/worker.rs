//! The fleet's memory worker (`examples/memory_worker.rs`) as a process, and the
//! fleet's own kind of client driving it: `tests/interop/fleet_client.py`, written
//! with `aiomqtt` and the strict pydantic `Envelope` (`strict=True, extra="forbid"`)
//! the Python services use. Every message the worker publishes must pass that model.
//!
//! Shared by `tests/python_interop.rs` (the worker on the default broker) and
//! `tests/brokers.rs` (on every broker of the matrix, through the ack-order proxy):
//! [`fleet_flow`] is the whole run, from start to SIGTERM.
//!
//! The worker runs as its own process, as in production: `MQTT_URL` from the
//! environment, SIGTERM for a graceful shutdown. The Python client needs `python3`
//! (3.11+) with `aiomqtt` 2 and `pydantic` 2, which `.ci/run` installs; without them
//! [`python_ready`] says "skipped", except on CI (env `CI` non-empty), where it fails.
//!
//! ```ignore
//! #[path = "interop/worker.rs"]
//! mod worker;
//!
//! if !worker::python_ready().await { return; }
//! let run = worker::fleet_flow(&broker, &proxy.url()).await;
//! assert_eq!(run.reconnects(), 0, "{}", run.log);
//! ```

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use serde_json::{Map, Value};
use tempfile::TempDir;
use tokio::process::{Child, Command};

use tower_mqtt::config::Protocol;

use crate::support::{example_binary, on_ci, test_protocol, Probe, ReceivedPublish, TestBroker};

/// The worker's health topic, retained, and its Last Will.
pub(crate) const HEALTH: &str = "system/health/memory";
/// The name every envelope from the worker carries as `source`.
const SOURCE: &str = "memory-worker";
/// The Python client.
const CLIENT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/fleet_client.py");
/// The worker's example target.
const EXAMPLE: &str = "memory_worker";
/// Upper bound for the worker to start, report health, or exit.
pub(crate) const WAIT: Duration = Duration::from_secs(15);
/// Upper bound for the Python client (its own limit is 45 s).
const CLIENT_DEADLINE: Duration = Duration::from_secs(50);
/// The client's exit status when Python or its modules are missing.
const CLIENT_MISSING_MODULES: i32 = 3;

/// What a [`fleet_flow`] run leaves to look at.
#[derive(Debug)]
pub(crate) struct FleetRun {
    /// The Python client's summary line (counts of what it checked).
    pub(crate) summary: String,
    /// Everything the worker logged, start to exit.
    pub(crate) log: String,
}

impl FleetRun {
    /// How often the worker lost its connection: the runtime logs "connection lost"
    /// at WARN before every reconnect.
    pub(crate) fn reconnects(&self) -> usize {
        self.log.matches("connection lost").count()
    }
}

/// The whole interop run against `broker`, with the worker connected to `worker_url`
/// (the broker's URL, or a proxy in front of it): the worker reports ready; the
/// Python client checks its contract (health, 20 queries answered once among junk,
/// the character read, updated and retained); the worker logged the junk; SIGTERM
/// ends it with exit status 0 and leaves `ok=false, event="shutdown"` retained.
///
/// The Python client and the health probes connect to `broker` directly. On a broker
/// that delivers at the subscription's QoS (rumqttd), the client cannot see the QoS
/// the worker published with, and is told so.
///
/// # Panics
///
/// When any of that fails; the message carries the client's output and the worker's
/// log.
pub(crate) async fn fleet_flow(broker: &TestBroker, worker_url: &str) -> FleetRun {
    let binary = worker_binary();
    let mut health = Probe::subscribe(&broker.url(), HEALTH).await;
    let mut worker = Worker::spawn(&binary, worker_url, test_protocol());
    worker.wait_health(&mut health, true, "ready").await;

    let mut client = Command::new("python3");
    client
        .arg(CLIENT)
        .arg(broker.host())
        .arg(broker.port().to_string());
    if broker.broker_kind().delivers_at_subscription_qos() {
        // rumqttd: the worker's QoS 0 replies arrive at the subscription's QoS 1.
        client.arg("--delivered-at-subscription-qos");
    }
    let client = client.stdin(Stdio::null()).kill_on_drop(true).output();
    let output = tokio::time::timeout(CLIENT_DEADLINE, client)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the Python client ran longer than {CLIENT_DEADLINE:?}\n{}",
                worker.log()
            )
        })
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the Python client failed ({}):\n{stdout}{stderr}\n{}",
        output.status,
        worker.log()
    );

    let log = worker.log();
    assert!(
        log.contains("WARN") || log.contains("ERROR"),
        "the worker logged none of the junk it was sent:\n{log}"
    );

    let status = worker.terminate().await;
    assert!(
        status.success(),
        "SIGTERM: the worker exited with {status}\n{}",
        worker.log()
    );
    let retained = retained_health(broker, &worker).await;
    let data = checked_health_data(&retained);
    assert_eq!(
        (&data["ok"], &data["event"]),
        (&Value::Bool(false), &Value::from("shutdown")),
        "retained health after SIGTERM: {}",
        retained.payload_str()
    );
    FleetRun {
        summary: stdout.trim_end().to_owned(),
        log: worker.log(),
    }
}

/// Whether `python3` runs the client; `false` (after printing "skipped") when it
/// cannot, except on CI, where that fails the test.
pub(crate) async fn python_ready() -> bool {
    let check = Command::new("python3")
        .args([CLIENT, "--check"])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let missing = match tokio::time::timeout(WAIT, check).await {
        Err(elapsed) => panic!("`python3 {CLIENT} --check`: {elapsed} after {WAIT:?}"),
        Ok(Err(err)) => format!("cannot run python3: {err}"),
        Ok(Ok(output)) if output.status.success() => return true,
        Ok(Ok(output)) => {
            let reason = String::from_utf8_lossy(&output.stderr).trim().to_owned();
            assert_eq!(
                output.status.code(),
                Some(CLIENT_MISSING_MODULES),
                "`python3 {CLIENT} --check` failed: {reason}"
            );
            reason
        }
    };
    assert!(
        !on_ci(),
        "CI must run the Python interop test: {missing} (.ci/run installs aiomqtt and pydantic)"
    );
    eprintln!("skipped: {missing}");
    false
}

/// The memory worker, a process of its own with its output in a log file.
pub(crate) struct Worker {
    pub(crate) child: Child,
    log: PathBuf,
    _dir: TempDir,
}

impl Worker {
    /// Starts the worker with `MQTT_URL=url` (a broker, or a proxy in front of
    /// one), `MQTT_PROTOCOL=protocol`, and no other `MQTT_*` setting from this
    /// environment. The suites pass [`test_protocol`], so the worker speaks the
    /// version the suite runs on.
    pub(crate) fn spawn(binary: &Path, url: &str, protocol: Protocol) -> Worker {
        let dir = tempfile::Builder::new()
            .prefix("tower-mqtt-memory-worker-")
            .tempdir()
            .expect("create a directory for the worker's log");
        let log = dir.path().join("memory_worker.log");
        let out = File::create(&log).expect("create the worker's log");
        let err = out.try_clone().expect("share the worker's log");
        let mut command = Command::new(binary);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("MQTT_") {
                command.env_remove(name);
            }
        }
        let child = command
            .env("MQTT_URL", url)
            .env("MQTT_PROTOCOL", protocol.to_string())
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .expect("start the memory worker");
        Worker {
            child,
            log,
            _dir: dir,
        }
    }

    /// What the worker printed so far.
    pub(crate) fn log(&self) -> String {
        let text = std::fs::read(&self.log).unwrap_or_default();
        format!(
            "--- memory worker output ---\n{}",
            String::from_utf8_lossy(&text)
        )
    }

    /// The next health report with `ok` (and `event`, unless empty), checked to
    /// be a fleet envelope.
    ///
    /// # Panics
    ///
    /// If none arrives within [`WAIT`], or the worker exits first.
    pub(crate) async fn wait_health(
        &mut self,
        probe: &mut Probe,
        ok: bool,
        event: &str,
    ) -> ReceivedPublish {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let publish = tokio::select! {
                publish = probe.next(WAIT) => publish,
                status = self.child.wait(), if ok => panic!(
                    "the worker exited ({status:?}) before reporting health\n{}",
                    self.log()
                ),
            };
            let Some(publish) = publish.filter(|_| tokio::time::Instant::now() < deadline) else {
                panic!(
                    "no health ok={ok} event={event:?} on {HEALTH} within {WAIT:?}\n{}",
                    self.log()
                );
            };
            let data = health_data(&publish);
            if data["ok"] == ok && (event.is_empty() || data["event"] == event) {
                return publish;
            }
        }
    }

    /// Sends SIGTERM and waits for the exit.
    pub(crate) async fn terminate(&mut self) -> ExitStatus {
        let pid = self.child.id().expect("the worker is running");
        let kill = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("run `kill -TERM`");
        assert!(kill.success(), "`kill -TERM {pid}` failed");
        match tokio::time::timeout(WAIT, self.child.wait()).await {
            Ok(status) => status.expect("wait for the worker"),
            Err(elapsed) => panic!(
                "the worker ignored SIGTERM ({elapsed} after {WAIT:?})\n{}",
                self.log()
            ),
        }
    }
}

/// The retained health, as a new subscriber gets it.
pub(crate) async fn retained_health(broker: &TestBroker, worker: &Worker) -> ReceivedPublish {
    let mut fresh = Probe::subscribe(&broker.url(), HEALTH).await;
    let publish = fresh
        .next(WAIT)
        .await
        .unwrap_or_else(|| panic!("nothing retained on {HEALTH}\n{}", worker.log()));
    assert!(publish.retain, "the first publish on subscribe is retained");
    publish
}

/// The `data` of a health report, unchecked: the Python client checks what the
/// worker publishes while it runs.
fn health_data(publish: &ReceivedPublish) -> Map<String, Value> {
    let text = publish.payload_str();
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(mut envelope)) => match envelope.remove("data") {
            Some(Value::Object(data)) => data,
            _ => panic!("{HEALTH}: no data object in {text}"),
        },
        _ => panic!("{HEALTH}: not a JSON object: {text}"),
    }
}

/// The `data` of a health envelope published when no client runs (shutdown,
/// Last Will), checked against the fleet's contract: exactly five keys, a
/// 32-hex id, the health type, the worker's source, the health keys.
pub(crate) fn checked_health_data(publish: &ReceivedPublish) -> Map<String, Value> {
    let text = publish.payload_str();
    let Ok(Value::Object(envelope)) = serde_json::from_str::<Value>(text) else {
        panic!("{HEALTH}: not a JSON object: {text}");
    };
    let mut keys: Vec<&str> = envelope.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        ["data", "id", "source", "ts", "type"],
        "{HEALTH}: envelope keys of {text}"
    );
    let id = envelope["id"].as_str().unwrap_or_default();
    let hex = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
    assert!(
        id.len() == 32 && id.bytes().all(hex),
        "{HEALTH}: id is not 32 lowercase hex: {text}"
    );
    assert_eq!(
        envelope["type"], "system.health.memory",
        "{HEALTH}: type of {text}"
    );
    assert_eq!(envelope["source"], SOURCE, "{HEALTH}: source of {text}");
    assert!(
        envelope["ts"].is_f64(),
        "{HEALTH}: ts is not a float: {text}"
    );
    let data = health_data(publish);
    let mut keys: Vec<&str> = data.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        ["err", "event", "message_id", "ok", "timestamp"],
        "{HEALTH}: data keys of {text}"
    );
    data
}

/// `target/<profile>/examples/memory_worker` (see [`example_binary`]).
pub(crate) fn worker_binary() -> PathBuf {
    example_binary(EXAMPLE)
}
