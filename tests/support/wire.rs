//! A scripted MQTT 3.1.1 client: it sends exactly the packets a test writes and
//! nothing else (no automatic PUBACK, PUBCOMP, PINGREQ or resend), and hands back every
//! packet the broker sends. Packets are encoded and decoded with rumqttc's own codec.
//!
//! For what a library client cannot be made to do: withhold a PUBCOMP after PUBREC,
//! send acks out of order or for ids that were never received, drop the connection at
//! a chosen packet. Use [`Probe`](super::Probe) to observe delivery and this to provoke
//! a broker.
//!
//! ```ignore
//! let (mut wire, ack) = WireClient::connect(&broker.url(), "c1", false).await;
//! assert!(!ack.session_present);
//! wire.subscribe("t/#", QoS::AtLeastOnce).await;
//! let publish = wire.expect_publish(WAIT).await;
//! wire.send(Packet::PubAck(PubAck::new(publish.pkid))).await;
//! drop(wire); // TCP close without DISCONNECT
//! ```
//!
//! All waits are bounded (the caller's timeout, 10 s where none is given).

use std::time::Duration;

use bytes::BytesMut;
use rumqttc::{ConnAck, Connect, ConnectReturnCode, Packet, Publish, QoS, SubAck, Subscribe};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::probe::host_port;

/// Deadline for connecting and for a SUBACK.
const DEADLINE: Duration = Duration::from_secs(10);
/// Largest packet accepted from the broker.
const MAX_PACKET: usize = 64 * 1024 * 1024;

/// Why [`WireClient::recv`] returned no packet.
#[derive(Debug)]
pub(crate) enum WireEnd {
    /// Nothing arrived within the timeout; the connection is still open.
    TimedOut,
    /// The broker closed the connection (or reset it).
    Closed(String),
    /// The bytes did not decode as MQTT 3.1.1.
    Malformed(String),
}

/// One MQTT connection driven packet by packet.
pub(crate) struct WireClient {
    stream: TcpStream,
    buf: BytesMut,
    client_id: String,
    next_pkid: u16,
}

impl WireClient {
    /// Connects with keep-alive 60 s (no PINGREQ is ever sent by itself, so keep the
    /// test shorter than 90 s) and returns the CONNACK, whatever its return code.
    ///
    /// # Panics
    ///
    /// If the TCP connect fails or no CONNACK arrives within 10 s.
    pub(crate) async fn connect(
        url: &str,
        client_id: &str,
        clean_session: bool,
    ) -> (WireClient, ConnAck) {
        let mut connect = Connect::new(client_id);
        connect.clean_session = clean_session;
        connect.keep_alive = 60;
        Self::connect_with(url, connect).await
    }

    /// Like [`connect`](WireClient::connect) with a CONNECT the caller built (a login,
    /// a will).
    pub(crate) async fn connect_with(url: &str, connect: Connect) -> (WireClient, ConnAck) {
        let (host, port) = host_port(url);
        let stream = tokio::time::timeout(DEADLINE, TcpStream::connect((host.as_str(), port)))
            .await
            .unwrap_or_else(|_| panic!("wire client: TCP connect to {url} timed out"))
            .unwrap_or_else(|err| panic!("wire client: TCP connect to {url}: {err}"));
        let _ = stream.set_nodelay(true);
        let mut client = WireClient {
            stream,
            buf: BytesMut::with_capacity(64 * 1024),
            client_id: connect.client_id.clone(),
            next_pkid: 1,
        };
        client.send(Packet::Connect(connect)).await;
        match client.recv(DEADLINE).await {
            Ok(Packet::ConnAck(ack)) => (client, ack),
            other => panic!(
                "wire client {}: expected CONNACK from {url}, got {other:?}",
                client.client_id
            ),
        }
    }

    /// The client id it connected with.
    pub(crate) fn client_id(&self) -> &str {
        &self.client_id
    }

    /// Writes one packet.
    ///
    /// # Panics
    ///
    /// If it cannot be encoded or written (the broker closed the connection: use
    /// [`try_send`](WireClient::try_send) where that is expected).
    pub(crate) async fn send(&mut self, packet: Packet) {
        if let Err(err) = self.try_send(packet).await {
            panic!("wire client {}: send failed: {err}", self.client_id);
        }
    }

    /// Writes one packet; the I/O error if the connection is gone.
    pub(crate) async fn try_send(&mut self, packet: Packet) -> std::io::Result<()> {
        let mut out = BytesMut::with_capacity(packet.size() + 8);
        packet
            .write(&mut out, MAX_PACKET)
            .unwrap_or_else(|err| panic!("encode {packet:?}: {err:?}"));
        self.stream.write_all(&out).await
    }

    /// The next packet from the broker, waiting at most `timeout`.
    pub(crate) async fn recv(&mut self, timeout: Duration) -> Result<Packet, WireEnd> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match Packet::read(&mut self.buf, MAX_PACKET) {
                Ok(packet) => return Ok(packet),
                Err(rumqttc::Error::InsufficientBytes(_)) => {}
                Err(err) => return Err(WireEnd::Malformed(format!("{err:?}"))),
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Err(_) => return Err(WireEnd::TimedOut),
                Ok(Ok(0)) => return Err(WireEnd::Closed(String::from("end of stream"))),
                Ok(Ok(_)) => {}
                Ok(Err(err)) => return Err(WireEnd::Closed(err.to_string())),
            }
        }
    }

    /// Every packet that arrives until `quiet` passes with none (or the connection
    /// ends), for "what does the broker send now" questions.
    pub(crate) async fn drain(&mut self, quiet: Duration) -> (Vec<Packet>, Option<WireEnd>) {
        let mut packets = Vec::new();
        loop {
            match self.recv(quiet).await {
                Ok(packet) => packets.push(packet),
                Err(WireEnd::TimedOut) => return (packets, None),
                Err(end) => return (packets, Some(end)),
            }
        }
    }

    /// The next packet, which must be a PUBLISH.
    ///
    /// # Panics
    ///
    /// On any other packet, a closed connection or a timeout.
    pub(crate) async fn expect_publish(&mut self, timeout: Duration) -> Publish {
        match self.recv(timeout).await {
            Ok(Packet::Publish(publish)) => publish,
            other => panic!(
                "wire client {}: expected PUBLISH, got {other:?}",
                self.client_id
            ),
        }
    }

    /// Subscribes to one filter and returns the SUBACK.
    ///
    /// # Panics
    ///
    /// If anything but the SUBACK arrives first, or none within 10 s.
    pub(crate) async fn subscribe(&mut self, filter: &str, qos: QoS) -> SubAck {
        let mut subscribe = Subscribe::new(filter, qos);
        subscribe.pkid = self.pkid();
        self.send(Packet::Subscribe(subscribe)).await;
        match self.recv(DEADLINE).await {
            Ok(Packet::SubAck(ack)) => ack,
            other => panic!(
                "wire client {}: expected SUBACK for {filter:?}, got {other:?}",
                self.client_id
            ),
        }
    }

    /// Sends PINGREQ and reports whether PINGRESP comes back within `timeout` (packets
    /// arriving before it are returned too): a cheap "is the connection still served".
    pub(crate) async fn ping(&mut self, timeout: Duration) -> (bool, Vec<Packet>) {
        let mut before = Vec::new();
        if self.try_send(Packet::PingReq).await.is_err() {
            return (false, before);
        }
        loop {
            match self.recv(timeout).await {
                Ok(Packet::PingResp) => return (true, before),
                Ok(packet) => before.push(packet),
                Err(_) => return (false, before),
            }
        }
    }

    /// Sends DISCONNECT and waits (bounded) for the broker to close the socket.
    pub(crate) async fn disconnect(mut self) {
        if self.try_send(Packet::Disconnect).await.is_ok() {
            let _ = self.drain(DEADLINE).await;
        }
    }

    fn pkid(&mut self) -> u16 {
        let pkid = self.next_pkid;
        self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
        pkid
    }
}

impl std::fmt::Debug for WireClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WireClient")
            .field("client_id", &self.client_id)
            .field("buffered", &self.buf.len())
            .finish_non_exhaustive()
    }
}

/// Whether a CONNACK accepted the connection.
pub(crate) fn accepted(ack: &ConnAck) -> bool {
    ack.code == ConnectReturnCode::Success
}
