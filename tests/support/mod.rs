//! Shared support for integration tests: real brokers and real faults
//! (docs/ARCHITECTURE.md, "Brokers, and how the tests use them").
//!
//! Include it from a test file with `mod support;`.
//!
//! - [`broker`] / [`TestBroker`]: mosquitto when installed, else the embedded broker.
//!   CI (env `CI` non-empty) must have mosquitto and never falls back.
//! - [`broker_matrix`] / [`TestBroker::start_kind`]: the same scenario on every broker
//!   available here (mosquitto, the embedded rumqttd, aedes); CI must have all three.
//! - [`Mosquitto`]: a mosquitto process per test on a free port; stop, kill, restart on
//!   the same port with sessions kept.
//! - [`Aedes`]: an aedes (node) process per test; refuses chosen subscriptions,
//!   requires a login, serves MQTT over WebSocket; restarts on the same port, its
//!   in-memory sessions lost.
//! - [`Proxy`]: a TCP proxy between client and broker that cuts, stalls and refuses,
//!   and checks the client's acknowledgement order ([`Proxy::assert_acks_in_order`]).
//! - [`Probe`], [`publish_raw`], [`publish_all`], [`MosquittoSub`]: plain clients that
//!   observe and feed the wire independently of tower-mqtt.
//! - [`Ledger`]: how many times each numbered message was handled (lost, twice).
//! - [`TestChild`]: an ignored test of this binary run as a child process, to kill a
//!   consumer with SIGKILL or to stop a broker that cannot stop in-process.
//! - [`WireClient`]: a scripted client that sends exactly the packets a test writes
//!   (acks withheld, out of order, stale), to provoke a broker.
//! - [`Pki`], [`TlsFront`]: certificates made by the test, mosquitto TLS listener
//!   settings, and a TLS-terminating front (ALPN, `wss://`).
//! - [`WsBroker`]: rumqttd with a WebSocket listener.
//!
//! ```ignore
//! mod support;
//! use support::{broker, broker_matrix, Probe, Proxy, TestBroker};
//!
//! #[tokio::test]
//! async fn reconnects_after_a_cut() {
//!     let broker = broker().await;
//!     let proxy = Proxy::start(broker.addr()).await;
//!     let mut probe = Probe::subscribe(&broker.url(), "t/#").await;
//!     // ... client under test connects to proxy.url() ...
//!     proxy.cut().await;
//!     // ... assert it reconnects and delivers, observed by the probe ...
//! }
//!
//! #[tokio::test]
//! async fn acks_in_receive_order_on_every_broker() {
//!     for kind in broker_matrix() {
//!         let broker = TestBroker::start_kind(kind).await;
//!         // ... same scenario; `kind` in every assertion message ...
//!     }
//! }
//! ```
//!
//! The helpers wait in real time with bounded deadlines (10 s unless given); do not use
//! them in a test with paused tokio time.

// Each test binary compiles this module and uses only part of it.
#![allow(dead_code)]

mod acks;
mod aedes;
mod child;
mod example;
mod frames;
mod ledger;
mod logs;
mod mosquitto;
mod probe;
mod proxy;
mod tls;
mod websocket;
mod wire;

use std::net::{Ipv4Addr, SocketAddr};

// Re-exports for test files; each binary uses a different subset.
#[allow(unused_imports)]
pub(crate) use acks::{AckKind, AckReport, AckTally, ConnectionAcks, ConnectionReport, PerKind};
#[allow(unused_imports)]
pub(crate) use aedes::{aedes_available, Aedes, AedesOptions};
#[allow(unused_imports)]
pub(crate) use child::{parent_lines, until_stdin_closes, TestChild};
#[allow(unused_imports)]
pub(crate) use example::example_binary;
#[allow(unused_imports)]
pub(crate) use ledger::{Ledger, Tally};
#[allow(unused_imports)]
pub(crate) use logs::Captured;
#[allow(unused_imports)]
pub(crate) use mosquitto::{find_binary, on_ci, Mosquitto, HOST};
#[allow(unused_imports)]
pub(crate) use probe::{
    await_pubacks, host_port, publish_all, publish_each, publish_raw, unique_id, CapturedPublish,
    MosquittoSub, Probe, ReceivedPublish,
};
#[allow(unused_imports)]
pub(crate) use proxy::Proxy;

/// The configuration every test service starts from: a unique client id made
/// from `name`, `name` as the source name, and reconnect delays of 100 ms to
/// 1 s, so that faults are recovered from quickly. Tests add what they need.
///
/// # Panics
///
/// If `url` is not a broker URL.
pub(crate) fn service_config(url: &str, name: &str) -> tower_mqtt::config::Config {
    tower_mqtt::config::Config::new(url)
        .expect("a test broker URL")
        .with_client_id(unique_id(name))
        .with_source_name(name)
        .with_protocol(test_protocol())
        .with_reconnect_delays(
            std::time::Duration::from_millis(100),
            std::time::Duration::from_secs(1),
        )
}

/// The MQTT version the suites run on: 3.1.1, or MQTT 5 with
/// `TOWER_MQTT_TEST_PROTOCOL=5` (`.ci/run` runs the runtime, backlog, fault,
/// broker and interop suites on both).
#[allow(dead_code)]
pub(crate) fn test_protocol() -> tower_mqtt::config::Protocol {
    match std::env::var("TOWER_MQTT_TEST_PROTOCOL") {
        Ok(raw) if !raw.trim().is_empty() => raw
            .parse()
            .unwrap_or_else(|err| panic!("TOWER_MQTT_TEST_PROTOCOL: {err}")),
        _ => tower_mqtt::config::Protocol::V311,
    }
}

/// The shortest keep-alive the suites' protocol allows a client: 2 s, or
/// 5 s on MQTT 5 (rumqttc's MQTT 5 client asserts at least that).
#[allow(dead_code)]
pub(crate) fn short_keep_alive() -> std::time::Duration {
    std::time::Duration::from_secs(if on_v5() { 5 } else { 2 })
}

/// Whether the suites run on MQTT 5 (see [`test_protocol`]).
#[allow(dead_code)]
pub(crate) fn on_v5() -> bool {
    test_protocol() == tower_mqtt::config::Protocol::V5
}
#[allow(unused_imports)]
pub(crate) use rumqttc::QoS;
#[allow(unused_imports)]
pub(crate) use tls::{ClientCerts, File, FrontSeen, Leaf, Pki, TlsFront};
#[allow(unused_imports)]
pub(crate) use websocket::WsBroker;
#[allow(unused_imports)]
pub(crate) use wire::{accepted, WireClient, WireEnd};

/// The brokers a scenario can run on.
///
/// They differ where MQTT lets them and where they stray from it. Measured with a
/// scripted MQTT 3.1.1 client ([`WireClient`]), and kept true by
/// `brokers_behave_as_broker_kind_says` in `tests/support_selftest.rs`:
///
/// | | mosquitto 2.0.11 | rumqttd 0.20 (embedded) | aedes 0.51.3 |
/// |---|---|---|---|
/// | persistent session (`clean_session = false`) | kept; survives a graceful restart | kept in memory | kept in memory |
/// | unacked QoS 1/2 PUBLISH after reconnect | resent, same ids, DUP = 1 | resent, same ids, DUP = 0 | resent, same ids, DUP = 0 |
/// | PUBREC sent, no PUBCOMP, reconnect | PUBREL resent | nothing resent | PUBREL resent |
/// | PUBACK/PUBREC out of receive order | accepted | connection closed ("out of order ack") | accepted |
/// | PUBACK for an id it never sent | ignored | connection closed | ignored |
/// | QoS 0 PUBLISH to a QoS 1 subscription | delivered at QoS 0 | delivered at QoS 1 | delivered at QoS 0 |
/// | QoS 1/2 deliveries sent before the client acks (window) | 20 (`max_inflight_messages`) | 100 | unbounded |
/// | PUBACK, SUBACK, PINGRESP to a client whose window is full | sent | withheld until it acks a delivery | sent |
/// | SUBSCRIBE with an invalid filter (`a/#/b`) | connection closed | granted | connection closed |
/// | refusing a subscription (SUBACK 0x80) | impossible: ACL-denied filters are granted | impossible | [`AedesOptions::deny`] |
/// | WebSocket listener | not in Debian 12's build | not configured | [`AedesOptions::websocket`] |
/// | packet ids of a new session | from 1 | from 1 | arbitrary (for example 31457) |
///
/// DUP = 0 on a redelivery breaks [MQTT-3.3.1-1]; a client must not rely on DUP to
/// recognise one. rumqttd delivers every message at the subscription's QoS
/// (`forward_device_data` in its `router/routing.rs` sets it), where MQTT 3.1.1 section
/// 3.8.4 says the lower of the published and the granted QoS: a subscriber cannot tell
/// there at which QoS a message was published. And while a client has 100 QoS 1/2
/// deliveries unacknowledged, rumqttd answers nothing it sends (its scheduler leaves a
/// connection paused as "inflight full" until an ack of a delivery comes in, and sends
/// PUBACK, SUBACK and PINGRESP only from there): a client that must acknowledge in
/// receive order and whose oldest delivery waits on a confirmed publish of its own
/// waits for a PUBACK that cannot come. A client that acks an id from an earlier connection on a new one is
/// disconnected by rumqttd, unless that id was redelivered first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum BrokerKind {
    /// A mosquitto process ([`Mosquitto`]): the fleet's broker and the reference.
    Mosquitto,
    /// The in-process rumqttd (`tower_mqtt::embedded`): strict about ack order.
    Embedded,
    /// An aedes process ([`Aedes`]): refusals and WebSocket.
    Aedes,
}

impl BrokerKind {
    /// All kinds, in the order [`broker_matrix`] lists them.
    pub(crate) const ALL: [BrokerKind; 3] = [
        BrokerKind::Mosquitto,
        BrokerKind::Embedded,
        BrokerKind::Aedes,
    ];

    /// `"mosquitto"`, `"embedded"` or `"aedes"`, for messages.
    pub(crate) fn name(self) -> &'static str {
        match self {
            BrokerKind::Mosquitto => "mosquitto",
            BrokerKind::Embedded => "embedded",
            BrokerKind::Aedes => "aedes",
        }
    }

    /// Whether this kind can be started here; why not otherwise.
    pub(crate) fn available(self) -> Result<(), String> {
        match self {
            BrokerKind::Mosquitto => find_binary("mosquitto").map(|_| ()).ok_or_else(|| {
                String::from("`mosquitto` is not installed (apt-get install mosquitto)")
            }),
            #[cfg(feature = "embedded-broker")]
            BrokerKind::Embedded => Ok(()),
            #[cfg(not(feature = "embedded-broker"))]
            BrokerKind::Embedded => Err(String::from("the `embedded-broker` feature is off")),
            BrokerKind::Aedes => aedes_available(),
        }
    }

    /// Whether it closes the connection on a PUBACK or PUBREC that is not for the
    /// oldest unacknowledged PUBLISH, or for an id it never sent (rumqttd).
    pub(crate) fn closes_on_unexpected_ack(self) -> bool {
        self == BrokerKind::Embedded
    }

    /// Whether a PUBLISH redelivered to a resumed session carries DUP = 1
    /// [MQTT-3.3.1-1] (mosquitto only).
    pub(crate) fn sets_dup_on_redelivery(self) -> bool {
        self == BrokerKind::Mosquitto
    }

    /// Whether, after a reconnect, it resends PUBREL for a QoS 2 delivery the client
    /// answered with PUBREC but never completed [MQTT-4.4.0-1] (not rumqttd).
    pub(crate) fn resends_pubrel(self) -> bool {
        self != BrokerKind::Embedded
    }

    /// Whether it delivers every message at the subscription's granted QoS, even one
    /// published at a lower QoS (rumqttd), instead of the lower of the two (MQTT 3.1.1
    /// section 3.8.4).
    pub(crate) fn delivers_at_subscription_qos(self) -> bool {
        self == BrokerKind::Embedded
    }

    /// How many QoS 1/2 deliveries it sends a client before that client acknowledges
    /// one, with the configuration the tests start it with; `None`: no limit.
    pub(crate) fn delivery_window(self) -> Option<u64> {
        match self {
            BrokerKind::Mosquitto => Some(20),
            BrokerKind::Embedded => Some(100),
            BrokerKind::Aedes => None,
        }
    }

    /// Whether, while a client's [`delivery_window`](Self::delivery_window) is full, it
    /// withholds every answer to that client (PUBACK, SUBACK, PINGRESP) until the
    /// client acknowledges a delivery (rumqttd).
    pub(crate) fn withholds_answers_while_window_full(self) -> bool {
        self == BrokerKind::Embedded
    }

    /// Whether a test can make it refuse a subscription with SUBACK 0x80 (aedes).
    pub(crate) fn can_refuse_subscriptions(self) -> bool {
        self == BrokerKind::Aedes
    }

    /// Whether it can be stopped and restarted with its sessions (mosquitto).
    pub(crate) fn can_restart(self) -> bool {
        self == BrokerKind::Mosquitto
    }
}

impl std::fmt::Display for BrokerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The brokers available here, for running one scenario on each:
/// mosquitto, the embedded rumqttd and aedes.
///
/// A missing one is left out with a printed reason; on CI (env `CI` non-empty) a
/// missing one panics, because CI must run every scenario on all three.
pub(crate) fn broker_matrix() -> Vec<BrokerKind> {
    BrokerKind::ALL
        .into_iter()
        .filter(|kind| match kind.available() {
            Ok(()) => true,
            Err(reason) => {
                assert!(!on_ci(), "CI must run against {kind}: {reason}");
                eprintln!("broker matrix: skipping {kind}: {reason}");
                false
            }
        })
        .collect()
}

/// A running broker for a test: mosquitto when installed, else the embedded broker; or
/// any [`BrokerKind`] through [`TestBroker::start_kind`].
///
/// Only a mosquitto broker can be stopped, killed or restarted; on the others those
/// return [`NotMosquitto`], so a test that needs them can skip (see [`TestBroker::restart`]).
pub(crate) enum TestBroker {
    /// A mosquitto process owned by the test.
    Mosquitto(Mosquitto),
    /// The in-process rumqttd broker (`tower_mqtt::embedded`).
    #[cfg(feature = "embedded-broker")]
    Embedded(tower_mqtt::embedded::EmbeddedBroker),
    /// An aedes (node) process owned by the test.
    Aedes(Aedes),
}

/// Starts a broker for one test: mosquitto when installed, else the embedded broker.
///
/// # Panics
///
/// On CI (env `CI` non-empty) without mosquitto; without mosquitto when the
/// `embedded-broker` feature is off; if the chosen broker fails to start.
pub(crate) async fn broker() -> TestBroker {
    TestBroker::start().await
}

impl TestBroker {
    /// See [`broker`].
    pub(crate) async fn start() -> TestBroker {
        if let Some(mosquitto) = Mosquitto::try_start().await {
            return TestBroker::Mosquitto(mosquitto);
        }
        #[cfg(feature = "embedded-broker")]
        {
            eprintln!("falling back to the embedded broker");
            TestBroker::embedded()
        }
        #[cfg(not(feature = "embedded-broker"))]
        panic!("no mosquitto and the `embedded-broker` feature is off: no broker to test against");
    }

    /// Starts a broker of `kind` with default settings (for mosquitto the generated
    /// config of [`Mosquitto::start`], for aedes [`AedesOptions::new`]).
    ///
    /// # Panics
    ///
    /// If `kind` is not available here (iterate [`broker_matrix`] to skip those), or it
    /// fails to start.
    pub(crate) async fn start_kind(kind: BrokerKind) -> TestBroker {
        if let Err(reason) = kind.available() {
            panic!("cannot start {kind}: {reason}");
        }
        match kind {
            BrokerKind::Mosquitto => TestBroker::Mosquitto(Mosquitto::start().await),
            #[cfg(feature = "embedded-broker")]
            BrokerKind::Embedded => TestBroker::embedded(),
            #[cfg(not(feature = "embedded-broker"))]
            BrokerKind::Embedded => unreachable!("`available` said no"),
            BrokerKind::Aedes => TestBroker::Aedes(Aedes::start().await),
        }
    }

    /// The embedded broker, whether or not mosquitto is installed.
    ///
    /// # Panics
    ///
    /// If it fails to start.
    #[cfg(feature = "embedded-broker")]
    pub(crate) fn embedded() -> TestBroker {
        let broker =
            tower_mqtt::embedded::EmbeddedBroker::start().expect("start the embedded broker");
        TestBroker::Embedded(broker)
    }

    /// `mqtt://127.0.0.1:<port>`.
    pub(crate) fn url(&self) -> String {
        match self {
            TestBroker::Mosquitto(broker) => broker.url(),
            #[cfg(feature = "embedded-broker")]
            TestBroker::Embedded(broker) => broker.url(),
            TestBroker::Aedes(broker) => broker.url(),
        }
    }

    /// The broker's port.
    pub(crate) fn port(&self) -> u16 {
        match self {
            TestBroker::Mosquitto(broker) => broker.port(),
            #[cfg(feature = "embedded-broker")]
            TestBroker::Embedded(broker) => broker.port(),
            TestBroker::Aedes(broker) => broker.port(),
        }
    }

    /// Always `127.0.0.1`.
    // A method like `url()` and `port()`, so callers need not know it is constant.
    #[allow(clippy::unused_self)]
    pub(crate) fn host(&self) -> &'static str {
        HOST
    }

    /// The listening address, for [`Proxy::start`].
    pub(crate) fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port()))
    }

    /// Which kind of broker this is.
    pub(crate) fn broker_kind(&self) -> BrokerKind {
        match self {
            TestBroker::Mosquitto(_) => BrokerKind::Mosquitto,
            #[cfg(feature = "embedded-broker")]
            TestBroker::Embedded(_) => BrokerKind::Embedded,
            TestBroker::Aedes(_) => BrokerKind::Aedes,
        }
    }

    /// `"mosquitto"`, `"embedded"` or `"aedes"`, for messages.
    pub(crate) fn kind(&self) -> &'static str {
        self.broker_kind().name()
    }

    /// Whether this is a mosquitto process (which can be stopped and restarted).
    pub(crate) fn is_mosquitto(&self) -> bool {
        matches!(self, TestBroker::Mosquitto(_))
    }

    /// The mosquitto process, if this is one.
    pub(crate) fn mosquitto(&mut self) -> Option<&mut Mosquitto> {
        match self {
            TestBroker::Mosquitto(broker) => Some(broker),
            #[cfg(feature = "embedded-broker")]
            TestBroker::Embedded(_) => None,
            TestBroker::Aedes(_) => None,
        }
    }

    /// The aedes process, if this is one.
    pub(crate) fn aedes(&mut self) -> Option<&mut Aedes> {
        match self {
            TestBroker::Aedes(broker) => Some(broker),
            _ => None,
        }
    }

    /// Restarts mosquitto on the same port ([`Mosquitto::restart`]).
    ///
    /// ```ignore
    /// if let Err(skip) = broker.restart().await {
    ///     eprintln!("skipping: {skip}");
    ///     return;
    /// }
    /// ```
    pub(crate) async fn restart(&mut self) -> Result<(), NotMosquitto> {
        self.mosquitto().ok_or(NotMosquitto)?.restart().await;
        Ok(())
    }

    /// Stops mosquitto gracefully ([`Mosquitto::stop`]).
    pub(crate) async fn stop(&mut self) -> Result<(), NotMosquitto> {
        self.mosquitto().ok_or(NotMosquitto)?.stop().await;
        Ok(())
    }

    /// Kills mosquitto with SIGKILL ([`Mosquitto::kill`]).
    pub(crate) fn kill(&mut self) -> Result<(), NotMosquitto> {
        self.mosquitto().ok_or(NotMosquitto)?.kill();
        Ok(())
    }

    /// The broker log (mosquitto and aedes; a note for the embedded broker), for
    /// assertion messages.
    pub(crate) fn log(&self) -> String {
        match self {
            TestBroker::Mosquitto(broker) => broker.log(),
            #[cfg(feature = "embedded-broker")]
            TestBroker::Embedded(_) => String::from("(embedded broker: no log file)"),
            TestBroker::Aedes(broker) => broker.log(),
        }
    }
}

impl std::fmt::Debug for TestBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TestBroker::Mosquitto(broker) => broker.fmt(f),
            #[cfg(feature = "embedded-broker")]
            TestBroker::Embedded(broker) => f
                .debug_struct("EmbeddedBroker")
                .field("port", &broker.port())
                .finish_non_exhaustive(),
            TestBroker::Aedes(broker) => broker.fmt(f),
        }
    }
}

/// A stop/kill/restart was asked of a broker that is not a mosquitto process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct NotMosquitto;

impl std::fmt::Display for NotMosquitto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(
            "only mosquitto can be stopped or restarted with its sessions (the embedded \
             broker runs in-process, aedes keeps sessions in memory); this test needs \
             mosquitto (apt-get install mosquitto)",
        )
    }
}

impl std::error::Error for NotMosquitto {}
