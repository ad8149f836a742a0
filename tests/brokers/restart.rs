//! A broker restart: the service (with its default reconnect delays, 0.5 s to 5 s
//! with jitter) must be connected and subscribed again within 10 s of the broker
//! accepting connections again, and handle a message published after the restart.
//!
//! How each broker restarts on the same port:
//! - mosquitto: SIGTERM and a new process with the same config and persistence
//!   ([`Mosquitto::restart`]); the session survives (`session_present = 1`).
//! - aedes: its stdin closed and a new process ([`Aedes::restart`]); sessions live in
//!   its memory, so none survives.
//! - rumqttd 0.20 has no way to stop a broker in-process, so here it runs in a child
//!   process of its own ([`EmbeddedProcess`]: this binary re-run as
//!   `embedded_broker_child`, on `EmbeddedBroker::start_on` a kept port), and restarts
//!   by SIGKILL and a new process; sessions are in memory, so none survives.
//!
//! Where the session is lost the service must subscribe again on its own; it does on
//! every CONNACK. Every message before the restart is acknowledged on the wire, and
//! the acknowledgements processed by the broker ([`sync_with_broker`]), before the
//! restart: nothing is carried to a connection whose broker never delivers it again,
//! and a broker that keeps the session has nothing to deliver again.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use tower_mqtt::{embedded::EmbeddedBroker, ConnectionState};

use super::support::{
    publish_all, until_stdin_closes, Aedes, BrokerKind, Ledger, Mosquitto, Proxy, TestChild,
};
use super::{config, say, serve_ledger, settle, sync_with_broker, Figures, EVENT, WAIT};

/// The requirement: ready again within this long of the broker's return.
const READY_WITHIN: Duration = Duration::from_secs(10);
/// Messages before and after the restart.
const BEFORE: u64 = 20;
const AFTER: u64 = 20;
const TOPIC: &str = "matrix/restart";
/// The embedded broker child's port.
const BROKER_PORT: &str = "TOWER_MQTT_MATRIX_BROKER_PORT";
/// Fresh ports tried when a chosen one was taken before the child could bind it.
const PORT_ATTEMPTS: usize = 5;
/// The most a child broker lives if its parent never closes its stdin.
const CHILD_LIFETIME: Duration = Duration::from_secs(600);

/// The scenario on `kind`.
// One scenario, read top to bottom.
#[allow(clippy::too_many_lines)]
pub(crate) async fn broker_restart(kind: BrokerKind) {
    let mut broker = RestartableBroker::start(kind).await;
    let proxy = Proxy::start(broker.addr()).await;
    let ledger = Ledger::new(EVENT);
    let running = serve_ledger(config(&proxy.url(), "matrix-restart"), TOPIC, &ledger).await;

    publish_all(
        &broker.url(),
        TOPIC,
        (0..BEFORE).map(|seq| ledger.envelope(seq)),
    )
    .await;
    let before = ledger
        .wait_unique(usize::try_from(BEFORE).unwrap(), WAIT)
        .await;
    let acked_before = proxy.wait_for_client_acks(BEFORE, WAIT).await;
    assert!(
        before && acked_before,
        "[{kind}] handled and acknowledged before the restart: {:?}\n{}",
        ledger.tally(0..BEFORE),
        proxy.ack_report()
    );
    // ... and those acknowledgements processed by the broker, so that a broker that
    // keeps the session does not deliver them again.
    sync_with_broker(&running.publisher()).await;

    let mut connection = running.state();
    connection.borrow_and_update();
    broker.restart().await;
    let back = Instant::now();
    let ready = tokio::time::timeout(WAIT, async {
        // The first change is the lost connection, whenever the client notices it;
        // then connected again (readiness was reset on the loss), then subscribed.
        connection.changed().await.expect("the client runs");
        connection
            .wait_for(ConnectionState::is_connected)
            .await
            .expect("the client runs");
        running.ready().await
    })
    .await;
    let reconnect = back.elapsed();
    let session_present = matches!(
        *running.state().borrow(),
        ConnectionState::Connected {
            session_present: true
        }
    );

    publish_all(
        &broker.url(),
        TOPIC,
        (BEFORE..BEFORE + AFTER).map(|seq| ledger.envelope(seq)),
    )
    .await;
    let after = ledger.wait_all(BEFORE..BEFORE + AFTER, WAIT).await;
    let marker = settle(&ledger, &broker.url(), TOPIC).await;
    let acked = proxy.wait_for_client_acks(BEFORE + AFTER + 1, WAIT).await;

    let stats = running.stats();
    let report = proxy.ack_report();
    let tally = ledger.tally(0..BEFORE + AFTER);
    Figures::new(kind, "broker_restart")
        .add("ready_after_restart_ms", reconnect.as_millis())
        .add("session_present", session_present)
        .add("sent", BEFORE + AFTER)
        .add("handled", tally.handled)
        .add("lost", tally.lost.len())
        .add("twice", tally.twice.len())
        .add("connections", stats.connections)
        .add("connection_failures", stats.connection_failures)
        .acks(&report)
        .print();
    let diagnosis = format!(
        "[{kind}] {stats:?} {:?}\n{report}\n--- broker log ---\n{}",
        *running.state().borrow(),
        broker.log()
    );
    match ready {
        Ok(Ok(())) => {}
        Ok(Err(refused)) => panic!("not subscribed again: {refused}; {diagnosis}"),
        Err(elapsed) => panic!("not ready again ({elapsed} after {WAIT:?}); {diagnosis}"),
    }
    assert!(
        reconnect < READY_WITHIN,
        "ready again {reconnect:?} after the broker accepted connections again, over \
         {READY_WITHIN:?}; {diagnosis}"
    );
    assert_eq!(
        session_present,
        broker.keeps_sessions(),
        "the session survived the restart only where the broker keeps sessions; {diagnosis}"
    );
    assert!(
        after && tally.lost.is_empty(),
        "lost {:?}; {diagnosis}",
        tally.lost
    );
    assert!(
        marker,
        "the marker after everything was handled; {diagnosis}"
    );
    assert!(
        tally.twice.is_empty(),
        "handled twice: {:?}; {diagnosis}",
        tally.twice
    );
    assert_eq!(
        stats.connections, 2,
        "one connection before the restart and one after; {diagnosis}"
    );
    assert!(acked, "every delivery acknowledged; {diagnosis}");
    proxy.assert_acks_in_order();
    assert_eq!(report.unsolicited(), 0, "no unsolicited ack; {diagnosis}");
    running.shutdown().await;
}

/// A broker of any kind that restarts on the same port.
enum RestartableBroker {
    Mosquitto(Mosquitto),
    Embedded(EmbeddedProcess),
    Aedes(Aedes),
}

impl RestartableBroker {
    /// Starts a broker of `kind`.
    async fn start(kind: BrokerKind) -> RestartableBroker {
        match kind {
            BrokerKind::Mosquitto => RestartableBroker::Mosquitto(Mosquitto::start().await),
            BrokerKind::Embedded => RestartableBroker::Embedded(EmbeddedProcess::start().await),
            BrokerKind::Aedes => RestartableBroker::Aedes(Aedes::start().await),
        }
    }

    fn port(&self) -> u16 {
        match self {
            RestartableBroker::Mosquitto(broker) => broker.port(),
            RestartableBroker::Embedded(broker) => broker.port,
            RestartableBroker::Aedes(broker) => broker.port(),
        }
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port()))
    }

    fn url(&self) -> String {
        format!("mqtt://{}", self.addr())
    }

    /// The broker's log (none for the embedded broker), for assertion messages.
    fn log(&self) -> String {
        match self {
            RestartableBroker::Mosquitto(broker) => broker.log(),
            RestartableBroker::Embedded(_) => String::from("(embedded broker: no log)"),
            RestartableBroker::Aedes(broker) => broker.log(),
        }
    }

    /// Whether a persistent session survives [`restart`](Self::restart).
    fn keeps_sessions(&self) -> bool {
        matches!(self, RestartableBroker::Mosquitto(_))
    }

    /// Stops the broker and starts it again on the same port; returns once it
    /// accepts connections.
    async fn restart(&mut self) {
        match self {
            RestartableBroker::Mosquitto(broker) => broker.restart().await,
            RestartableBroker::Embedded(broker) => broker.restart().await,
            RestartableBroker::Aedes(broker) => broker.restart().await,
        }
    }
}

/// rumqttd in a child process of its own (`embedded_broker_child`), so that it can
/// be stopped: rumqttd 0.20 cannot stop a broker in-process.
struct EmbeddedProcess {
    child: TestChild,
    port: u16,
}

impl EmbeddedProcess {
    /// Starts the child broker on a free port.
    ///
    /// # Panics
    ///
    /// If no port works in a few attempts.
    async fn start() -> EmbeddedProcess {
        let mut failures = Vec::new();
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port();
            match Self::spawn(port).await {
                Ok(child) => return EmbeddedProcess { child, port },
                Err(why) => failures.push(why),
            }
        }
        panic!("the embedded broker process did not start: {failures:?}");
    }

    /// Starts a child broker on `port`; its failure line if it could not.
    async fn spawn(port: u16) -> Result<TestChild, String> {
        let mut child =
            TestChild::spawn("embedded_broker_child", &[(BROKER_PORT, port.to_string())]);
        let line = child.line("EMBEDDED-BROKER-", WAIT).await;
        if line.starts_with("EMBEDDED-BROKER-READY") {
            Ok(child)
        } else {
            Err(line)
        }
    }

    /// SIGKILL (rumqttd has no graceful stop), then a new process on the same port.
    ///
    /// # Panics
    ///
    /// If it does not come back within [`WAIT`].
    async fn restart(&mut self) {
        self.child.kill().await;
        let deadline = Instant::now() + WAIT;
        loop {
            match Self::spawn(self.port).await {
                Ok(child) => {
                    self.child = child;
                    return;
                }
                // A socket of the old process may linger for a moment.
                Err(why) if Instant::now() < deadline => {
                    eprintln!("embedded broker restart on {}: {why}; retrying", self.port);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(why) => panic!(
                    "the embedded broker did not come back on {}: {why}",
                    self.port
                ),
            }
        }
    }
}

/// A loopback port that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .expect("a free loopback port")
        .port()
}

/// The broker process: rumqttd on the port in `BROKER_PORT`, until the parent closes
/// this process's stdin or kills it. Says `EMBEDDED-BROKER-READY <port>` once it
/// answers, or `EMBEDDED-BROKER-FAILED <why>`.
pub(crate) fn embedded_broker_child() {
    let port: u16 = std::env::var(BROKER_PORT)
        .expect("started by the parent test")
        .parse()
        .expect("a port");
    match EmbeddedBroker::start_on(port) {
        Ok(broker) => {
            say(format_args!("EMBEDDED-BROKER-READY {}", broker.port()));
            until_stdin_closes(CHILD_LIFETIME);
        }
        Err(err) => say(format_args!("EMBEDDED-BROKER-FAILED {err}")),
    }
}
