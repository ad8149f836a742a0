//! A broker that speaks MQTT over WebSockets: rumqttd 0.20 in this process,
//! with a WebSocket listener beside a TCP one (Debian 12's mosquitto has no
//! WebSocket listener).
//!
//! ```ignore
//! let broker = WsBroker::start().await;
//! // ws://127.0.0.1:<broker.ws_port()>/mqtt, and mqtt://127.0.0.1:<broker.tcp_port()>
//! ```
//!
//! rumqttd cannot be stopped: its threads serve their ports until the test
//! process exits. It accepts any upgrade path.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use rumqttd::{Broker, ConnectionSettings, RouterConfig, ServerSettings, Strategy};

/// How long the broker may take to accept connections.
const START_DEADLINE: Duration = Duration::from_secs(10);

/// A rumqttd broker with a TCP and a WebSocket listener on loopback.
#[derive(Debug)]
pub(crate) struct WsBroker {
    tcp: SocketAddr,
    ws: SocketAddr,
}

impl WsBroker {
    /// Starts it and waits until both listeners accept TCP.
    ///
    /// # Panics
    ///
    /// If it is not listening within 10 s.
    pub(crate) async fn start() -> WsBroker {
        let tcp = free_addr();
        let ws = free_addr();
        let config = rumqttd::Config {
            id: 0,
            router: RouterConfig {
                max_connections: 100,
                max_outgoing_packet_count: 200,
                max_segment_size: 1024 * 1024,
                max_segment_count: 10,
                custom_segment: None,
                initialized_filters: None,
                shared_subscriptions_strategy: Strategy::default(),
            },
            v4: Some(HashMap::from([("tcp".to_owned(), server("tcp", tcp))])),
            ws: Some(HashMap::from([("ws".to_owned(), server("ws", ws))])),
            ..rumqttd::Config::default()
        };
        std::thread::Builder::new()
            .name(format!("test-ws-broker-{}", ws.port()))
            .spawn(move || {
                if let Err(error) = Broker::new(config).start() {
                    eprintln!("the WebSocket test broker stopped: {error}");
                }
            })
            .expect("start the broker's thread");
        let deadline = Instant::now() + START_DEADLINE;
        for addr in [tcp, ws] {
            while tokio::net::TcpStream::connect(addr).await.is_err() {
                assert!(
                    Instant::now() < deadline,
                    "the WebSocket test broker is not listening on {addr}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        WsBroker { tcp, ws }
    }

    /// The port of the WebSocket listener.
    pub(crate) fn ws_port(&self) -> u16 {
        self.ws.port()
    }

    /// The WebSocket listener's address.
    pub(crate) fn ws_addr(&self) -> SocketAddr {
        self.ws
    }

    /// `mqtt://127.0.0.1:<port>`, the same broker over TCP.
    pub(crate) fn tcp_url(&self) -> String {
        format!("mqtt://{}", self.tcp)
    }
}

fn server(name: &str, listen: SocketAddr) -> ServerSettings {
    ServerSettings {
        name: format!("test-{name}"),
        listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections: ConnectionSettings {
            connection_timeout_ms: 10_000,
            max_payload_size: 1024 * 1024,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    }
}

fn free_addr() -> SocketAddr {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a free port");
    listener.local_addr().expect("its address")
}
