//! Shared support for integration tests: real brokers and real faults (DESIGN.md §7).
//!
//! Include it from a test file with `mod support;`.
//!
//! - [`broker`] / [`TestBroker`]: mosquitto when installed, else the embedded broker.
//!   CI (env `CI` non-empty) must have mosquitto and never falls back.
//! - [`Mosquitto`]: a mosquitto process per test on a free port; stop, kill, restart on
//!   the same port with sessions kept.
//! - [`Proxy`]: a TCP proxy between client and broker that cuts, stalls and refuses.
//! - [`Probe`], [`publish_raw`], [`MosquittoSub`]: plain clients that observe the wire
//!   independently of tower-mqtt.
//! - [`Pki`], [`TlsFront`]: certificates made by the test, mosquitto TLS listener
//!   settings, and a TLS-terminating front (ALPN, `wss://`).
//! - [`WsBroker`]: rumqttd with a WebSocket listener.
//!
//! ```ignore
//! mod support;
//! use support::{broker, Probe, Proxy};
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
//! ```
//!
//! The helpers wait in real time with bounded deadlines (10 s unless given); do not use
//! them in a test with paused tokio time.

// Each test binary compiles this module and uses only part of it.
#![allow(dead_code)]

mod mosquitto;
mod probe;
mod proxy;
mod tls;
mod websocket;

use std::net::{Ipv4Addr, SocketAddr};

// Re-exports for test files; each binary uses a different subset.
#[allow(unused_imports)]
pub(crate) use mosquitto::{find_binary, on_ci, Mosquitto, HOST};
#[allow(unused_imports)]
pub(crate) use probe::{
    await_pubacks, host_port, publish_raw, unique_id, CapturedPublish, MosquittoSub, Probe,
    ReceivedPublish,
};
#[allow(unused_imports)]
pub(crate) use proxy::Proxy;
#[allow(unused_imports)]
pub(crate) use rumqttc::QoS;
#[allow(unused_imports)]
pub(crate) use tls::{ClientCerts, File, FrontSeen, Leaf, Pki, TlsFront};
#[allow(unused_imports)]
pub(crate) use websocket::WsBroker;

/// A running broker for a test: mosquitto when installed, else the embedded broker.
///
/// Only a mosquitto broker can be stopped, killed or restarted; on the embedded one those
/// return [`NotMosquitto`], so a test that needs them can skip (see [`TestBroker::restart`]).
pub(crate) enum TestBroker {
    /// A mosquitto process owned by the test.
    Mosquitto(Mosquitto),
    /// The in-process rumqttd broker (`tower_mqtt::embedded`).
    #[cfg(feature = "embedded-broker")]
    Embedded(tower_mqtt::embedded::EmbeddedBroker),
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
        }
    }

    /// The broker's port.
    pub(crate) fn port(&self) -> u16 {
        match self {
            TestBroker::Mosquitto(broker) => broker.port(),
            #[cfg(feature = "embedded-broker")]
            TestBroker::Embedded(broker) => broker.port(),
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

    /// `"mosquitto"` or `"embedded"`, for messages.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            TestBroker::Mosquitto(_) => "mosquitto",
            #[cfg(feature = "embedded-broker")]
            TestBroker::Embedded(_) => "embedded",
        }
    }

    /// Whether this is a mosquitto process (which can be stopped and restarted).
    pub(crate) fn is_mosquitto(&self) -> bool {
        matches!(self, TestBroker::Mosquitto(_))
    }

    /// The mosquitto process, if this is one.
    // Always `Some` without the embedded broker to fall back to.
    #[cfg_attr(not(feature = "embedded-broker"), allow(clippy::unnecessary_wraps))]
    pub(crate) fn mosquitto(&mut self) -> Option<&mut Mosquitto> {
        match self {
            TestBroker::Mosquitto(broker) => Some(broker),
            #[cfg(feature = "embedded-broker")]
            TestBroker::Embedded(_) => None,
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

    /// The broker log (mosquitto only; a note otherwise), for assertion messages.
    pub(crate) fn log(&self) -> String {
        match self {
            TestBroker::Mosquitto(broker) => broker.log(),
            #[cfg(feature = "embedded-broker")]
            TestBroker::Embedded(_) => String::from("(embedded broker: no log file)"),
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
        }
    }
}

/// A stop/kill/restart was asked of a broker that is not a mosquitto process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct NotMosquitto;

impl std::fmt::Display for NotMosquitto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(
            "the embedded broker cannot be stopped or restarted; this test needs mosquitto \
             (apt-get install mosquitto)",
        )
    }
}

impl std::error::Error for NotMosquitto {}
