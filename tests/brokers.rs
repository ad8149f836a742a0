//! The broker matrix: the same core scenarios on every broker a service may run on —
//! mosquitto 2 (the fleet's broker), rumqttd 0.20 (the embedded broker) and aedes
//! 0.51 — each served the way a service runs (`tower_mqtt::serve`), its connection
//! through a proxy that checks the acknowledgement order on every connection.
//!
//! | scenario | what must hold |
//! |---|---|
//! | [`stream`] | 2,000 QoS 1 messages, each handled exactly once, on one connection |
//! | [`kill`] | a consumer killed with SIGKILL mid-handler and started again with its client id: nothing lost; nothing handled twice but the message that was mid-flight |
//! | [`restart`] | after a broker restart, ready again within 10 s of the broker accepting connections; a message published after it is handled |
//! | [`interop`] | the memory worker passes the fleet's strict Python client, with no reconnect |
//! | [`replies`] | 150 requests at once into a handler that awaits a confirmed reply are all answered before a handler could time out (ignored on rumqttd, where it stalls) |
//!
//! Each also asserts that every PUBACK left in receive order [MQTT-4.6.0-2] on every
//! connection and that none was unsolicited (rumqttd closes the connection on
//! either). The dedup layer is off (`MQTT_DEDUPE_TTL=0`), so a message the runtime ran
//! twice is counted instead of hidden.
//!
//! There is one test per broker and scenario, named after both
//! (`embedded::two_thousand_qos1_messages_are_each_handled_once`), so a failure names
//! its broker. A broker that is not installed here is skipped with a printed reason;
//! on CI (env `CI` non-empty) it fails instead ([`support::broker_matrix`]). Every run
//! prints one `FIGURES broker=<name> scenario=<name> ...` line for the docs:
//!
//! ```sh
//! cargo test --test brokers -- --nocapture 2>&1 | grep FIGURES
//! cargo test --test brokers embedded::      # one broker
//! ```
//!
//! What a broker cannot do, and how the scenarios deal with it:
//! - rumqttd 0.20 cannot be stopped in-process, so [`restart`] runs it in a child
//!   process (`embedded_broker_child`) on a port it keeps
//!   (`EmbeddedBroker::start_on`), and restarts it with SIGKILL and a new process.
//! - rumqttd and aedes keep sessions in memory: a restart loses them, and the service
//!   comes back to `session_present = 0` and must subscribe again (it subscribes on
//!   every CONNACK). mosquitto keeps them across its graceful restart.
//! - rumqttd keeps at most 4 × 16 MiB of messages per topic in memory; the 2,000
//!   envelopes of [`stream`] are about 200 KiB.
//! - rumqttd delivers every message at the subscription's QoS, so in [`interop`] the
//!   fleet client cannot check the QoS the worker published with there, and is told
//!   so (the proxy still sees the worker's QoS 0 replies leave at QoS 0).
//! - rumqttd answers nothing a client sends (PUBACK, SUBACK, PINGRESP) while that
//!   client has 100 deliveries unacknowledged: [`replies`] stalls there and is ignored,
//!   and in [`kill`] the stuck consumer cannot prove with a publish of its own that the
//!   broker processed its acks, so its delivery window refilling is the proof.
//! - aedes 0.51 refuses MQTT 5 and rumqttd never resends PUBREL after a reconnect:
//!   every scenario here is MQTT 3.1.1 at QoS 1, so neither is in the way (QoS 2 and
//!   the brokers' PUBREL behaviour are in `tests/support_selftest.rs`).
//!
//! `consumer_child` and `embedded_broker_child` are ignored: they are not tests but
//! the processes that [`kill`] and [`restart`] start by re-running this test binary.

mod support;

#[path = "brokers/interop.rs"]
mod interop;
#[path = "brokers/kill.rs"]
mod kill;
#[path = "brokers/replies.rs"]
mod replies;
#[path = "brokers/restart.rs"]
mod restart;
#[path = "brokers/stream.rs"]
mod stream;
#[path = "interop/worker.rs"]
mod worker;

use std::fmt::{Display, Write as _};
use std::io::Write as _;
use std::time::Duration;

use support::{broker_matrix, publish_all, AckReport, BrokerKind, Ledger};
use tower_mqtt::{config::Config, Publisher, Router, Running};

/// Bound for a single step (connect, subscribe, a message to arrive, a process).
const WAIT: Duration = Duration::from_secs(15);
/// Bound for a whole stream of messages to be handled.
const STREAM_WAIT: Duration = Duration::from_secs(90);
/// The event type of every numbered envelope.
const EVENT: &str = "matrix.seq";
/// The sequence number of [`settle`]'s marker, above every scenario's messages.
const MARKER: u64 = 1_000_000;
/// Where [`sync_with_broker`] publishes; nothing subscribes to it.
const SYNC_TOPIC: &str = "matrix/sync";

/// Whether `kind` is in the matrix here; a missing broker is skipped with a printed
/// reason (on CI it panics).
fn in_matrix(kind: BrokerKind) -> bool {
    if support::on_v5() {
        if let Some(why) = without_mqtt5(kind) {
            eprintln!("skipped on MQTT 5: {why}");
            return false;
        }
    }
    broker_matrix().contains(&kind)
}

/// Why a broker of the matrix is not run on MQTT 5, if it is not.
fn without_mqtt5(kind: BrokerKind) -> Option<&'static str> {
    match kind {
        BrokerKind::Mosquitto => None,
        BrokerKind::Embedded => Some(
            "rumqttd 0.20 serves MQTT 5 on a listener of its own, a partial implementation \
             the embedded broker does not start",
        ),
        BrokerKind::Aedes => Some("aedes 0.51 refuses MQTT 5 connections"),
    }
}

/// A service's configuration for the scenarios: a unique client id, a persistent
/// session, no dedup layer, everything else as a service has it by default.
fn config(url: &str, name: &str) -> Config {
    // The default reconnect delays (0.5 to 5 s), which the restart figures in
    // docs/RELIABILITY.md were measured with.
    support::service_config(url, name)
        .with_reconnect_delays(Duration::from_millis(500), Duration::from_secs(5))
        .with_clean_session(false)
        .with_dedupe(Duration::ZERO, 2048)
}

/// Serves `topic` into `ledger` the way a service runs (`tower_mqtt::serve`) and
/// returns once it is subscribed.
///
/// # Panics
///
/// If it is not ready within [`WAIT`], or the broker refused the subscription.
async fn serve_ledger(config: Config, topic: &str, ledger: &Ledger) -> Running {
    serve_router(config, Router::new().route(topic, ledger.handler())).await
}

/// Serves `router` the way a service runs (`tower_mqtt::serve`) and returns once it
/// is subscribed.
///
/// # Panics
///
/// If it is not ready within [`WAIT`], or the broker refused a subscription.
async fn serve_router(config: Config, router: Router) -> Running {
    let running = tower_mqtt::serve(config, router)
        .spawn()
        .expect("a valid configuration");
    tokio::time::timeout(WAIT, running.ready())
        .await
        .expect("ready within WAIT")
        .expect("subscribed");
    running
}

/// Publishes the [`MARKER`] after everything else on `topic` and waits until it is
/// handled: a broker delivers a session's messages to it in order, so by then every
/// redelivery of an earlier message has arrived too. `false` if it is not handled
/// within [`WAIT`].
async fn settle(ledger: &Ledger, url: &str, topic: &str) -> bool {
    publish_all(url, topic, [ledger.envelope(MARKER)]).await;
    ledger.wait_all([MARKER], WAIT).await
}

/// Publishes a QoS 1 message on the connection of `publisher`'s service and waits for
/// the broker's PUBACK. A broker handles a connection's packets in order, so by then
/// it has processed every acknowledgement the service wrote before, which their
/// having passed the proxy does not prove: mosquitto stopped with SIGTERM saves a
/// session whose PUBACKs still wait unread in its socket, and after the restart
/// delivers those messages again (seen as 5 to 18 of 20 handled twice).
///
/// # Panics
///
/// If the broker does not confirm within [`WAIT`].
async fn sync_with_broker(publisher: &Publisher) {
    let confirmed = tokio::time::timeout(
        WAIT,
        publisher.publish(SYNC_TOPIC, serde_json::json!({ "sync": true })),
    )
    .await;
    match confirmed {
        Ok(Ok(())) => {}
        Ok(Err(err)) => panic!("the sync publish failed: {err}"),
        Err(elapsed) => panic!("the broker did not confirm the sync publish: {elapsed}"),
    }
}

/// Prints a line on stdout at once (a child process's message to its parent).
fn say(line: impl Display) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// One `FIGURES broker=<name> scenario=<name> key=value ...` line.
struct Figures(String);

impl Figures {
    fn new(kind: BrokerKind, scenario: &str) -> Figures {
        Figures(format!("FIGURES broker={kind} scenario={scenario}"))
    }

    fn add(mut self, key: &str, value: impl Display) -> Figures {
        let _ = write!(self.0, " {key}={value}");
        self
    }

    /// The client's acks, the order violations and the unsolicited acks.
    fn acks(self, report: &AckReport) -> Figures {
        self.add("acks", report.totals.client_acks.total())
            .add("ack_violations", report.violations())
            .add("unsolicited_acks", report.unsolicited())
    }

    fn print(&self) {
        eprintln!("{}", self.0);
    }
}

/// One test per broker and scenario, in a module named after the broker; the
/// attributes in brackets go on that broker's reply-burst test.
macro_rules! on_every_broker {
    ($($broker:ident => $kind:expr, [$(#[$reply_burst:meta])*];)*) => {$(
        #[doc = concat!("The scenarios on ", stringify!($broker), ".")]
        mod $broker {
            use super::*;

            const KIND: BrokerKind = $kind;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn two_thousand_qos1_messages_are_each_handled_once() {
                if in_matrix(KIND) {
                    stream::qos1_stream(KIND).await;
                }
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_consumer_killed_mid_handler_gets_every_unhandled_message_back() {
                if in_matrix(KIND) {
                    kill::consumer_kill(KIND).await;
                }
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn after_a_broker_restart_the_service_is_ready_within_ten_seconds() {
                if in_matrix(KIND) {
                    restart::broker_restart(KIND).await;
                }
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            $(#[$reply_burst])*
            async fn a_burst_of_requests_into_a_replying_handler_is_answered_in_time() {
                if in_matrix(KIND) {
                    replies::reply_burst(KIND).await;
                }
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn the_fleet_python_client_accepts_the_memory_worker_with_no_reconnect() {
                if in_matrix(KIND) {
                    interop::fleet_interop(KIND).await;
                }
            }
        }
    )*};
}

on_every_broker! {
    mosquitto => BrokerKind::Mosquitto, [];
    embedded => BrokerKind::Embedded, [];
    aedes => BrokerKind::Aedes, [];
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the consumer process of the kill scenario; started by a_consumer_killed_mid_handler_gets_every_unhandled_message_back"]
async fn consumer_child() {
    kill::consumer_child().await;
}

#[test]
#[ignore = "the rumqttd process of the restart scenario; started by embedded::after_a_broker_restart_the_service_is_ready_within_ten_seconds"]
fn embedded_broker_child() {
    restart::embedded_broker_child();
}
