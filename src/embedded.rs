//! An in-process MQTT broker for examples, tests and local development
//! (feature `embedded-broker`, off by default: services do not compile a
//! broker; this crate's examples and tests turn it on).
//!
//! [`EmbeddedBroker::start`] runs a [rumqttd](https://docs.rs/rumqttd) 0.20 broker on
//! `127.0.0.1` at a free port ([`EmbeddedBroker::start_on`]: at a port you choose),
//! speaking MQTT 3.1.1, and returns once it answers a CONNECT. It is what the
//! quickstart uses when `MQTT_URL` is unset, and what tests fall back to where no
//! `mosquitto` binary exists.
//!
//! Its limits are generous: packets up to 16 MiB, 10 000 connections, no authentication.
//! One is not: rumqttd sends a client at most 100 unacknowledged deliveries and,
//! while those are out, answers nothing that client sends, not even the PUBACK of
//! its own publish. A handler that awaits its confirmed reply can then stall behind
//! acknowledgements that wait for it; acknowledge such request routes on receipt
//! (`Subscription::ack(Ack::OnReceipt)`) when serving them from this broker
//! (`docs/RELIABILITY.md` has the measurement).
//! It is not a production broker: it listens on loopback only, keeps no state on disk,
//! and, as rumqttd does, keeps at most 4 segments of 16 MiB of messages per topic in
//! memory, so a subscriber that falls further behind than that loses messages.
//!
//! # Lifetime
//!
//! rumqttd 0.20 has no way to stop a broker: its threads run until the process exits.
//! Dropping an [`EmbeddedBroker`] therefore does not stop it; the broker keeps serving
//! its port. Each call to [`EmbeddedBroker::start`] starts another broker, so a test
//! suite can give every test its own. To stop a broker and start it again (a broker
//! restart, as a test of reconnection), run it in a process of its own, end the
//! process, and start a new one on the same port with [`EmbeddedBroker::start_on`].
//!
//! # Example
//!
//! ```
//! use tower_mqtt::embedded::EmbeddedBroker;
//!
//! let broker = EmbeddedBroker::start()?;
//! assert_eq!(broker.url(), format!("mqtt://127.0.0.1:{}", broker.port()));
//! # Ok::<(), std::io::Error>(())
//! ```

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use rumqttd::{Broker, ConnectionSettings, RouterConfig, ServerSettings, Strategy};

/// Largest packet the broker accepts, in bytes.
const MAX_PACKET_SIZE: usize = 16 * 1024 * 1024;
/// Connections the broker accepts at once.
const MAX_CONNECTIONS: usize = 10_000;
/// How long `start` waits for the broker to answer.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How often `start` picks a new port when the chosen one was taken meanwhile.
const PORT_ATTEMPTS: usize = 3;
/// Client id of the readiness probe; `start` connects with it once.
const PROBE_CLIENT_ID: &[u8] = b"tower-mqtt-embedded-probe";

/// A rumqttd broker running in this process on `127.0.0.1`.
///
/// See the [module docs](self) for its limits and lifetime.
pub struct EmbeddedBroker {
    addr: SocketAddr,
}

impl EmbeddedBroker {
    /// Starts a broker on `127.0.0.1` at a free port and waits until it answers an MQTT
    /// CONNECT.
    ///
    /// The broker runs on threads of its own, so this can be called from synchronous
    /// code or from inside a tokio runtime. It blocks for the few milliseconds the
    /// broker takes to start (at most 10 seconds); in async code that must not block,
    /// call it through `tokio::task::spawn_blocking`.
    ///
    /// # Errors
    ///
    /// Fails when no free port can be found, when the broker's threads cannot be
    /// started, or when the broker does not answer within 10 seconds.
    pub fn start() -> io::Result<EmbeddedBroker> {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut last_error = None;
        for _ in 0..PORT_ATTEMPTS {
            // The port is free now, but it is released before rumqttd binds it, and
            // another process may take it meanwhile: then the broker's listener fails,
            // its thread ends, and another port is tried.
            let addr = free_port()?;
            match launch(addr, deadline) {
                Ok(broker) => return Ok(broker),
                Err(Launch::Stopped(error)) => last_error = Some(error),
                Err(Launch::Failed(error)) => return Err(error),
            }
        }
        Err(last_error.unwrap_or_else(|| io::Error::other("embedded MQTT broker did not start")))
    }

    /// Starts a broker on `127.0.0.1:port` and waits until it answers an MQTT CONNECT.
    ///
    /// For a fixed address: a local development setup whose services are configured
    /// with `MQTT_URL=mqtt://127.0.0.1:1883`, or a test that stops a process running the
    /// broker and starts another on the same port (the listener sets `SO_REUSEADDR`, so
    /// the port can be bound again while old connections linger in `TIME_WAIT`). Where
    /// any port will do, [`start`](Self::start) picks a free one.
    ///
    /// Like [`start`](Self::start), it blocks until the broker answers, at most 10
    /// seconds.
    ///
    /// ```
    /// use tower_mqtt::embedded::EmbeddedBroker;
    ///
    /// // A port that was free a moment ago; in development, usually 1883.
    /// let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    /// let broker = EmbeddedBroker::start_on(port)?;
    /// assert_eq!(broker.url(), format!("mqtt://127.0.0.1:{port}"));
    /// # Ok::<(), std::io::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// Fails with [`io::ErrorKind::InvalidInput`] for port 0 (use
    /// [`start`](Self::start)), with [`io::ErrorKind::AddrInUse`] when the port is
    /// taken, when the broker's threads cannot be started, or when the broker does not
    /// answer within 10 seconds.
    pub fn start_on(port: u16) -> io::Result<EmbeddedBroker> {
        if port == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "port 0: EmbeddedBroker::start picks a free port",
            ));
        }
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        launch(addr, Instant::now() + START_TIMEOUT).map_err(Launch::into_error)
    }

    /// The broker's URL, `mqtt://127.0.0.1:PORT`, in the syntax of `MQTT_URL`.
    pub fn url(&self) -> String {
        format!("mqtt://{}", self.addr)
    }

    /// The port the broker listens on.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The address the broker listens on (`127.0.0.1` and [`port`](Self::port)).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl fmt::Debug for EmbeddedBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmbeddedBroker")
            .field("addr", &self.addr)
            .finish()
    }
}

/// A loopback address whose port was free a moment ago.
fn free_port() -> io::Result<SocketAddr> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    listener.local_addr()
}

/// Why [`launch`] failed.
enum Launch {
    /// The port could not be bound, or the broker's thread ended while starting
    /// (another process took the port first): another port may do.
    Stopped(io::Error),
    /// Anything else.
    Failed(io::Error),
}

impl Launch {
    fn into_error(self) -> io::Error {
        match self {
            Launch::Stopped(error) | Launch::Failed(error) => error,
        }
    }
}

/// Runs a broker on `addr` on a thread of its own and waits until it answers.
fn launch(addr: SocketAddr, deadline: Instant) -> Result<EmbeddedBroker, Launch> {
    // rumqttd only logs a failed bind, and the readiness probe would then be answered
    // by whatever holds the port: make sure the port can be bound first (another
    // process may still take it in between, which `wait_until_ready` notices when the
    // broker's thread ends in time).
    drop(TcpListener::bind(addr).map_err(Launch::Stopped)?);
    let thread = thread::Builder::new()
        .name(format!("tower-mqtt-embedded-broker-{}", addr.port()))
        .spawn(move || {
            let mut broker = Broker::new(broker_config(addr));
            // Blocks as long as the listener runs, which is until the process exits
            // unless binding the port fails.
            if let Err(error) = broker.start() {
                tracing::error!(%error, %addr, "embedded MQTT broker failed");
            }
        })
        .map_err(Launch::Failed)?;
    match wait_until_ready(addr, &thread, deadline) {
        Ok(()) => {
            tracing::debug!(%addr, "embedded MQTT broker started");
            Ok(EmbeddedBroker { addr })
        }
        Err(error) if thread.is_finished() => Err(Launch::Stopped(error)),
        Err(error) => Err(Launch::Failed(error)),
    }
}

fn broker_config(listen: SocketAddr) -> rumqttd::Config {
    let connections = ConnectionSettings {
        // Time a client has to send CONNECT after the TCP connection opens.
        connection_timeout_ms: 10_000,
        // The largest remaining length of an incoming packet.
        max_payload_size: MAX_PACKET_SIZE,
        // Despite its name, how many packets are read from a connection in one batch;
        // rumqttd's in-flight window towards subscribers is fixed at 100.
        max_inflight_count: 1024,
        auth: None,
        external_auth: None,
        // Without dynamic filters rumqttd refuses publishes to topics that nobody has
        // subscribed to yet.
        dynamic_filters: true,
    };
    let server = ServerSettings {
        name: "tower-mqtt-embedded-v4".to_owned(),
        listen,
        tls: None,
        // rumqttd sleeps this long after each accepted connection.
        next_connection_delay_ms: 0,
        connections,
    };
    let router = RouterConfig {
        max_connections: MAX_CONNECTIONS,
        // QoS 0 messages read from a topic's log for a subscriber in one go.
        max_outgoing_packet_count: 1024,
        // Each topic keeps `max_segment_count` segments of this many bytes in memory.
        max_segment_size: MAX_PACKET_SIZE,
        max_segment_count: 4,
        custom_segment: None,
        initialized_filters: None,
        shared_subscriptions_strategy: Strategy::default(),
    };
    rumqttd::Config {
        id: 0,
        router,
        v4: Some(HashMap::from([("1".to_owned(), server)])),
        ..rumqttd::Config::default()
    }
}

/// Polls `addr` until an MQTT CONNECT there is answered by a successful CONNACK.
fn wait_until_ready(
    addr: SocketAddr,
    thread: &thread::JoinHandle<()>,
    deadline: Instant,
) -> io::Result<()> {
    let mut last_error: io::Error;
    loop {
        if thread.is_finished() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!(
                    "embedded MQTT broker on {addr} stopped while starting (was the port \
                     taken?); see the tracing output of rumqttd"
                ),
            ));
        }
        match probe(addr) {
            Ok(()) => return Ok(()),
            Err(error) => last_error = error,
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "embedded MQTT broker on {addr} did not answer within {}s: {last_error}",
                    START_TIMEOUT.as_secs()
                ),
            ));
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// Connects with MQTT 3.1.1, expects CONNACK "accepted", and disconnects cleanly (a bare
/// TCP probe would make rumqttd log an error for the missing CONNECT).
fn probe(addr: SocketAddr) -> io::Result<()> {
    let timeout = Duration::from_secs(2);
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;

    // Variable header: protocol name "MQTT", level 4, flags (clean session), keep-alive 10 s.
    let mut connect = vec![0x10, 0, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 10];
    let id_len = u8::try_from(PROBE_CLIENT_ID.len()).map_err(io::Error::other)?;
    connect.extend_from_slice(&[0, id_len]);
    connect.extend_from_slice(PROBE_CLIENT_ID);
    // Remaining length: everything after the two-byte fixed header (below 128 bytes,
    // so a single byte).
    connect[1] = u8::try_from(connect.len() - 2).map_err(io::Error::other)?;
    stream.write_all(&connect)?;

    let mut connack = [0_u8; 4];
    stream.read_exact(&mut connack)?;
    if connack[0] != 0x20 || connack[1] != 2 || connack[3] != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected answer to CONNECT: {connack:02x?}"),
        ));
    }
    stream.write_all(&[0xE0, 0])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
    use tokio::time::timeout;

    const WAIT: Duration = Duration::from_secs(10);

    fn client(broker: &EmbeddedBroker, id: &str) -> (AsyncClient, EventLoop) {
        let mut options = MqttOptions::new(id, "127.0.0.1", broker.port());
        options.set_max_packet_size(2 * 1024 * 1024, 2 * 1024 * 1024);
        AsyncClient::new(options, 16)
    }

    /// Polls until `pick` returns `Some` for an incoming packet.
    async fn next<T>(events: &mut EventLoop, mut pick: impl FnMut(&Packet) -> Option<T>) -> T {
        timeout(WAIT, async {
            loop {
                if let Event::Incoming(packet) = events.poll().await.expect("connection") {
                    if let Some(found) = pick(&packet) {
                        return found;
                    }
                }
            }
        })
        .await
        .expect("the awaited packet did not arrive in time")
    }

    #[test]
    fn starts_on_a_free_loopback_port() {
        let a = EmbeddedBroker::start().unwrap();
        let b = EmbeddedBroker::start().unwrap();
        assert_ne!(a.port(), b.port());
        assert_eq!(a.url(), format!("mqtt://127.0.0.1:{}", a.port()));
        assert_eq!(a.addr(), SocketAddr::from((Ipv4Addr::LOCALHOST, a.port())));
        probe(a.addr()).unwrap();
        assert!(format!("{a:?}").contains(&a.port().to_string()));
    }

    #[test]
    fn starts_on_a_chosen_port_and_refuses_a_taken_one() {
        let port = free_port().unwrap().port();
        let broker = EmbeddedBroker::start_on(port).unwrap();
        assert_eq!(broker.port(), port);
        probe(broker.addr()).unwrap();

        let taken = EmbeddedBroker::start_on(port).unwrap_err();
        assert_eq!(taken.kind(), io::ErrorKind::AddrInUse, "{taken}");
        let zero = EmbeddedBroker::start_on(0).unwrap_err();
        assert_eq!(zero.kind(), io::ErrorKind::InvalidInput, "{zero}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn qos1_round_trip_with_a_large_payload() {
        let broker = EmbeddedBroker::start().unwrap();
        let (subscriber, mut sub_events) = client(&broker, "embedded-test-sub");
        let (publisher, mut pub_events) = client(&broker, "embedded-test-pub");

        subscriber
            .subscribe("test/embedded/#", QoS::AtLeastOnce)
            .await
            .unwrap();
        let granted = next(&mut sub_events, |p| match p {
            Packet::SubAck(ack) => Some(ack.return_codes.clone()),
            _ => None,
        })
        .await;
        assert_eq!(
            granted,
            vec![rumqttc::SubscribeReasonCode::Success(QoS::AtLeastOnce)]
        );

        // Far above rumqttd's own default limit of 20 KiB.
        let payload: Vec<u8> = (0..1_048_576_u32).map(|i| (i % 251) as u8).collect();
        publisher
            .publish("test/embedded/a", QoS::AtLeastOnce, false, payload.clone())
            .await
            .unwrap();
        // Drive the publisher until the broker acknowledges, and the subscriber until the
        // message arrives.
        let ((), received) = tokio::join!(
            next(&mut pub_events, |p| matches!(p, Packet::PubAck(_))
                .then_some(())),
            next(&mut sub_events, |p| match p {
                Packet::Publish(publish) => Some(publish.clone()),
                _ => None,
            }),
        );
        assert_eq!(received.topic, "test/embedded/a");
        assert_eq!(received.qos, QoS::AtLeastOnce);
        assert_eq!(received.payload.len(), payload.len());
        assert!(received.payload == payload);
    }
}
