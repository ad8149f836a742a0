//! Everything that knows the MQTT client underneath (rumqttc 0.25, its MQTT
//! 3.1.1 client in [`v4`] and its MQTT 5 client in [`v5`]): the
//! [`Connection`] the poll loop drives and the [`Handle`] the other tasks
//! send requests through, conversions between our types and rumqttc's (no
//! rumqttc type appears in a public signature, and the runtime's other
//! modules name none), and the workarounds for what rumqttc does not do or
//! does wrong. Only this module knows which version is spoken.

mod v4;
mod v5;

use std::{error::Error as StdError, fmt, sync::Arc, time::Duration};

use bytes::Bytes;
use tokio::time::Instant;

use super::{
    delivery::Deliveries,
    dispatch::AckPacket,
    outbox::{self, Outbox},
};
use crate::{
    config::{Config, ConfigError, ConnectionAttempts, FailureKind, Protocol},
    properties::Properties,
    request::{QoS, Request},
    router::Router,
    subscription::SubscribeOptions,
    topic::{TopicError, TopicName},
};

/// What happened on the connection, as the poll loop needs it.
#[derive(Debug)]
pub(crate) enum Event {
    /// The broker accepted the connection (CONNACK).
    Connected { session_present: bool },
    /// A message arrived.
    Publish(Received),
    /// The broker confirmed one of our publishes (PUBACK, or PUBCOMP).
    Confirmed(u16),
    /// The broker refused one of our publishes (MQTT 5: PUBACK or PUBREC with
    /// a reason code of 0x80 or above): its code, and the code in words with
    /// the broker's reason string.
    Refused { pkid: u16, code: u8, reason: String },
    /// The broker answered the subscriptions: for each filter in the order
    /// subscribed, why it was refused, or `None`.
    Subscribed(Vec<Option<String>>),
    /// A publish of ours went out with this packet id (0 for QoS 0).
    PublishWritten(u16),
    /// An acknowledgement of ours (PUBACK or PUBREC) went out.
    AckWritten,
    /// A PINGREQ went out.
    PingWritten,
    /// Our DISCONNECT went out.
    DisconnectWritten,
    /// Anything else read from the broker.
    Read,
    /// Anything else written.
    Written,
}

impl Event {
    /// Whether the broker sent it: anything read shows the connection alive
    /// (see the poll loop's keep-alive check).
    pub(crate) fn is_read(&self) -> bool {
        matches!(
            self,
            Self::Connected { .. }
                | Self::Publish(_)
                | Self::Confirmed(_)
                | Self::Refused { .. }
                | Self::Subscribed(_)
                | Self::Read
        )
    }
}

/// Why a poll ended the connection (or the attempt).
#[derive(Debug)]
pub(crate) enum PollError {
    /// The broker refused the connection; its reason in words.
    Refused(String),
    /// Anything else: network, TLS, protocol, the broker's DISCONNECT.
    Lost(Lost),
}

/// A connection (or an attempt) that failed for a reason other than a
/// refusal.
#[derive(Debug)]
pub(crate) struct Lost {
    pub(crate) error: Box<dyn StdError + Send + Sync>,
    pub(crate) kind: FailureKind,
}

impl Lost {
    /// The reason, for the logs and the connection state (see
    /// [`ConnectionAttempts::failed`]).
    pub(crate) fn describe(&self, attempts: &mut ConnectionAttempts) -> String {
        attempts.failed(self.error.as_ref(), self.kind)
    }
}

/// A failure told in words of ours (a server's DISCONNECT, say).
#[derive(Debug)]
struct Reason(String);

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl StdError for Reason {}

/// The connection to the broker, one after another.
// Both boxed: one per client, hundreds of bytes each, moved into the poll
// loop once.
pub(crate) enum Connection {
    V4(Box<v4::Connection>),
    V5(Box<v5::Connection>),
}

/// Puts requests into the connection's channel; cheap to clone.
#[derive(Clone, Debug)]
pub(crate) enum Handle {
    V4(v4::Handle),
    V5(v5::Handle),
}

/// A client for `config` with manual acknowledgements, its Last Will (topic,
/// payload, retained at QoS 1) and `capacity` requests of channel.
pub(crate) fn connect(
    config: &Config,
    will: Option<(String, Vec<u8>)>,
) -> Result<(Handle, Connection), ConfigError> {
    let capacity = config.request_channel_capacity;
    Ok(if config.protocol == Protocol::V5 {
        let (handle, connection) = v5::connect(config.mqtt5_options()?, will, capacity);
        (Handle::V5(handle), Connection::V5(Box::new(connection)))
    } else {
        let (handle, connection) = v4::connect(config.mqtt_options()?, will, capacity);
        (Handle::V4(handle), Connection::V4(Box::new(connection)))
    })
}

/// Why a publish did not enter the channel.
#[derive(Debug)]
pub(crate) enum TrySendError {
    /// The channel is full, or the connection's task is gone: try later.
    Full,
    /// The broker's Maximum Packet Size (MQTT 5 CONNACK) is below this
    /// publish's size: it can never be sent on this connection.
    TooLarge { size: usize, max: usize },
}

impl Handle {
    /// Puts a publish into the channel, or says why not.
    pub(crate) fn try_publish(&self, message: &outbox::Outgoing) -> Result<(), TrySendError> {
        match self {
            Self::V4(handle) => handle.try_publish(message),
            Self::V5(handle) => handle.try_publish(message),
        }
    }

    /// Puts an acknowledgement into the channel; false when it is full (or
    /// the connection's task is gone).
    pub(crate) fn try_ack(&self, packet: AckPacket) -> bool {
        match self {
            Self::V4(handle) => handle.try_ack(packet),
            Self::V5(handle) => handle.try_ack(packet),
        }
    }

    /// Subscribes to `filters`, waiting for room in the channel.
    pub(crate) async fn subscribe(&self, filters: &[Filter]) -> Result<(), String> {
        match self {
            Self::V4(handle) => handle.subscribe(filters).await,
            Self::V5(handle) => handle.subscribe(filters).await,
        }
    }

    /// Asks for a DISCONNECT after every request already in the channel.
    pub(crate) async fn disconnect(&self) {
        match self {
            Self::V4(handle) => handle.disconnect().await,
            Self::V5(handle) => handle.disconnect().await,
        }
    }
}

impl Connection {
    /// Whether a connection is up (or being set up).
    pub(crate) fn is_connected(&self) -> bool {
        match self {
            Self::V4(connection) => connection.is_connected(),
            Self::V5(connection) => connection.is_connected(),
        }
    }

    /// Before a connection attempt: the current credentials (see
    /// [`ConnectionAttempts::prepare`]).
    pub(crate) fn prepare(&mut self, attempts: &mut ConnectionAttempts) -> Result<(), String> {
        if self.is_connected() {
            return Ok(());
        }
        match self {
            Self::V4(connection) => attempts.prepare(|user, password| {
                connection.set_credentials(user, password);
            }),
            Self::V5(connection) => attempts.prepare(|user, password| {
                connection.set_credentials(user, password);
            }),
        }
    }

    /// Clears rumqttc's own keep-alive check, which the poll loop replaces
    /// (see the dispatcher's module docs).
    pub(crate) fn clear_ping_check(&mut self) {
        match self {
            Self::V4(connection) => connection.clear_ping_check(),
            Self::V5(connection) => connection.clear_ping_check(),
        }
    }

    /// Whether an outgoing publish waits on a packet id still in use.
    pub(crate) fn collided(&self) -> bool {
        match self {
            Self::V4(connection) => connection.collided(),
            Self::V5(connection) => connection.collided(),
        }
    }

    /// The next event; connects first when there is no connection.
    pub(crate) async fn poll(&mut self) -> Result<Event, PollError> {
        match self {
            Self::V4(connection) => connection.poll().await,
            Self::V5(connection) => connection.poll().await,
        }
    }

    /// Drops the connection without a word to the broker.
    pub(crate) fn abandon(&mut self) {
        match self {
            Self::V4(connection) => connection.abandon(),
            Self::V5(connection) => connection.abandon(),
        }
    }

    /// After the connection ended: drops the acknowledgements that were
    /// meant for it and counts what the client reported written before it
    /// failed.
    pub(crate) fn forget_connection(&mut self, deliveries: &Deliveries, ack_written: impl FnMut()) {
        match self {
            Self::V4(connection) => connection.forget_connection(deliveries, ack_written),
            Self::V5(connection) => connection.forget_connection(deliveries, ack_written),
        }
    }

    /// After the connection ended, before the next: with `reclaim` (a clean
    /// session, which forgets them) the unconfirmed publishes go back to the
    /// outbox to be sent again. Returns how many publishes without a packet id
    /// the client keeps for the next connection.
    pub(crate) fn carry_publishes(&mut self, outbox: &Outbox, reclaim: bool) -> usize {
        match self {
            Self::V4(connection) => connection.carry_publishes(outbox, reclaim),
            Self::V5(connection) => connection.carry_publishes(outbox, reclaim),
        }
    }

    /// Lets the client answer a PUBREL for any packet id (see
    /// `v4::Connection::expect_pubrels`).
    pub(crate) fn expect_pubrels(&mut self) {
        match self {
            Self::V4(connection) => connection.expect_pubrels(),
            Self::V5(connection) => connection.expect_pubrels(),
        }
    }

    /// While reading is paused: `Some(at)` when the client must be polled
    /// again at `at` to write its PINGREQ itself (MQTT 5: rumqttc's socket is
    /// out of reach), `None` when [`ping`](Self::ping) writes one past it.
    pub(crate) fn ping_due(&self) -> Option<Instant> {
        match self {
            Self::V4(_) => None,
            Self::V5(connection) => Some(connection.ping_due()),
        }
    }

    /// Writes a PINGREQ past the client, which is not being polled (reading
    /// is paused). Returns false when the write failed, or cannot be done.
    pub(crate) async fn ping(&mut self, timeout: Duration) -> bool {
        match self {
            Self::V4(connection) => connection.ping(timeout).await,
            Self::V5(_) => false,
        }
    }

    /// Sends DISCONNECT and drops the connection once the broker has read it,
    /// so that the broker keeps the session and does not publish the Last
    /// Will; the next poll reconnects. Events read meanwhile go to `event`.
    pub(crate) async fn disconnect(&mut self, timeout: Duration, event: impl FnMut(Event)) {
        match self {
            Self::V4(connection) => connection.disconnect(timeout).await,
            Self::V5(connection) => connection.disconnect(timeout, event).await,
        }
    }

    /// After our DISCONNECT: waits until the broker closes the connection, at
    /// most `timeout`; returns whether it did. Events read meanwhile go to
    /// `event`.
    pub(crate) async fn await_close(
        &mut self,
        timeout: Duration,
        event: impl FnMut(Event),
    ) -> bool {
        match self {
            Self::V4(connection) => connection.await_close(timeout).await,
            Self::V5(connection) => connection.await_close(timeout, event).await,
        }
    }
}

/// A filter to subscribe to, with its QoS and MQTT 5 options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Filter {
    pub(crate) path: String,
    pub(crate) qos: QoS,
    pub(crate) options: SubscribeOptions,
}

impl Filter {
    /// A filter with the default options.
    pub(crate) fn new(filter: impl Into<String>, qos: QoS) -> Self {
        Self {
            path: filter.into(),
            qos,
            options: SubscribeOptions::default(),
        }
    }
}

/// The router's filters with the QoS and options to subscribe with.
pub(crate) fn subscriptions(router: &Router) -> Vec<Filter> {
    router
        .subscriptions_with_options()
        .into_iter()
        .map(|(filter, qos, options)| Filter {
            path: filter.as_str().to_owned(),
            qos,
            options,
        })
        .collect()
}

/// A PUBLISH received from the broker, in our types: what the dispatcher
/// takes.
#[derive(Clone, Debug)]
pub(crate) struct Received {
    pub(crate) topic: String,
    pub(crate) payload: Bytes,
    pub(crate) qos: QoS,
    pub(crate) retain: bool,
    pub(crate) dup: bool,
    /// 0 for QoS 0.
    pub(crate) pkid: u16,
    /// MQTT 5 properties; `None` when there are none.
    pub(crate) properties: Option<Arc<Properties>>,
}

impl Received {
    /// The request for this message.
    pub(crate) fn request(&self) -> Result<Request<Bytes>, TopicError> {
        let mut req = Request::new(TopicName::new(&self.topic)?, self.payload.clone());
        req.set_qos(self.qos);
        req.set_retain(self.retain);
        req.set_dup(self.dup);
        if self.properties.is_some() {
            // The Arc itself, not a copy of what it holds.
            let (mut parts, body) = req.into_parts();
            parts.properties.clone_from(&self.properties);
            req = Request::from_parts(parts, body);
        }
        Ok(req)
    }
}

/// A reason code's name in words: `NotAuthorized` as "not authorized".
fn words(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push(' ');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_names_read_as_words() {
        assert_eq!(words("NotAuthorized"), "not authorized");
        assert_eq!(words("QuotaExceeded"), "quota exceeded");
        assert_eq!(words("Banned"), "banned");
    }

    #[test]
    fn a_received_message_keeps_its_properties() {
        let mut props = Properties::new();
        props.add_user_property("k", "v");
        let received = Received {
            topic: "a/b".into(),
            payload: Bytes::from_static(b"{}"),
            qos: QoS::AtLeastOnce,
            retain: false,
            dup: false,
            pkid: 1,
            properties: Some(Arc::new(props.clone())),
        };
        assert_eq!(*received.request().unwrap().properties(), props);
    }
}
