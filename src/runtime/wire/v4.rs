//! rumqttc's MQTT 3.1.1 client behind [`super::Connection`] and
//! [`super::Handle`].

use std::{collections::VecDeque, time::Duration};

use bytes::Bytes;
use rumqttc::{AsyncClient, ConnectionError, EventLoop, LastWill, MqttOptions, Outgoing, Packet};

use super::{Event, Filter, Lost, PollError, Received, TrySendError};
use crate::{
    config::FailureKind,
    request::QoS,
    runtime::{
        delivery::Deliveries,
        dispatch::AckPacket,
        outbox::{self, Outbox},
    },
};

/// The connection to the broker, one after another: rumqttc's event loop.
pub(crate) struct Connection {
    eventloop: EventLoop,
}

/// Puts requests into the connection's channel (rumqttc's `AsyncClient`);
/// cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct Handle {
    client: AsyncClient,
}

/// A client for `options` with manual acknowledgements, its Last Will (topic,
/// payload, retained at QoS 1) and `capacity` requests of channel.
pub(crate) fn connect(
    mut options: MqttOptions,
    will: Option<(String, Vec<u8>)>,
    capacity: usize,
) -> (Handle, Connection) {
    options.set_manual_acks(true);
    if let Some((topic, payload)) = will {
        options.set_last_will(LastWill::new(
            topic,
            payload,
            rumqttc::QoS::AtLeastOnce,
            true,
        ));
    }
    let (client, mut eventloop) = AsyncClient::new(options, capacity);
    // rumqttc leaves Nagle's algorithm on: a reply published right after
    // another then waited ~40 ms for the delayed ACK (measured: every
    // second reply of a request/reply burst took 42-47 ms instead of 0.6).
    let mut network = eventloop.network_options();
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);
    (Handle { client }, Connection { eventloop })
}

impl Handle {
    /// Puts a publish into the channel, or hands back an error when it is
    /// full (or the connection's task is gone).
    pub(crate) fn try_publish(&self, message: &outbox::Outgoing) -> Result<(), TrySendError> {
        // MQTT 3.1.1 has no properties: those of the message are not sent.
        self.client
            .try_publish(
                message.topic.as_str(),
                to_wire(message.qos),
                message.retain,
                message.payload.to_vec(),
            )
            .map_err(|_| TrySendError::Full)
    }

    /// Puts an acknowledgement into the channel; false when it is full (or
    /// the connection's task is gone).
    pub(crate) fn try_ack(&self, packet: AckPacket) -> bool {
        self.client.try_ack(&ack_publish(packet)).is_ok()
    }

    /// Subscribes to `filters`, waiting for room in the channel.
    pub(crate) async fn subscribe(&self, filters: &[Filter]) -> Result<(), String> {
        // MQTT 3.1.1 has no subscription options.
        let filters: Vec<rumqttc::SubscribeFilter> = filters
            .iter()
            .map(|f| rumqttc::SubscribeFilter::new(f.path.clone(), to_wire(f.qos)))
            .collect();
        self.client
            .subscribe_many(filters)
            .await
            .map_err(|err| err.to_string())
    }

    /// Asks for a DISCONNECT after every request already in the channel.
    pub(crate) async fn disconnect(&self) {
        let _ = self.client.disconnect().await;
    }
}

impl Connection {
    /// Whether a connection is up (or being set up).
    pub(crate) fn is_connected(&self) -> bool {
        self.eventloop.network.is_some()
    }

    /// The credentials of the next connection attempt.
    pub(crate) fn set_credentials(&mut self, user: String, password: &str) {
        self.eventloop.mqtt_options.set_credentials(user, password);
    }

    /// Clears rumqttc's own keep-alive check, which the poll loop replaces
    /// (see the dispatcher's module docs).
    pub(crate) fn clear_ping_check(&mut self) {
        self.eventloop.state.await_pingresp = false;
    }

    /// Whether an outgoing publish waits on a packet id still in use.
    pub(crate) fn collided(&self) -> bool {
        self.eventloop.state.collision.is_some()
    }

    /// The next event; connects first when there is no connection.
    pub(crate) async fn poll(&mut self) -> Result<Event, PollError> {
        let event = match self.eventloop.poll().await {
            Ok(event) => event,
            Err(ConnectionError::ConnectionRefused(code)) => {
                return Err(PollError::Refused(describe_refusal(code)))
            }
            Err(err) => {
                let kind = FailureKind::of_v4(&err);
                return Err(PollError::Lost(Lost {
                    error: Box::new(err),
                    kind,
                }));
            }
        };
        Ok(match event {
            rumqttc::Event::Incoming(packet) => match packet {
                Packet::ConnAck(ack) => Event::Connected {
                    session_present: ack.session_present,
                },
                Packet::Publish(publish) => Event::Publish(received(publish)),
                Packet::PubAck(ack) => Event::Confirmed(ack.pkid),
                Packet::PubComp(comp) => Event::Confirmed(comp.pkid),
                Packet::SubAck(suback) => Event::Subscribed(
                    suback
                        .return_codes
                        .iter()
                        .map(|code| {
                            matches!(code, rumqttc::SubscribeReasonCode::Failure)
                                .then(|| "the broker refused it (SUBACK 0x80)".to_owned())
                        })
                        .collect(),
                ),
                _ => Event::Read,
            },
            rumqttc::Event::Outgoing(outgoing) => match outgoing {
                Outgoing::Publish(pkid) => Event::PublishWritten(pkid),
                Outgoing::PubAck(_) | Outgoing::PubRec(_) => Event::AckWritten,
                Outgoing::PingReq => Event::PingWritten,
                Outgoing::Disconnect => Event::DisconnectWritten,
                _ => Event::Written,
            },
        })
    }

    /// Drops the connection without a word to the broker.
    pub(crate) fn abandon(&mut self) {
        self.eventloop.clean();
        self.eventloop.network = None;
    }

    /// After the connection ended: drops the acknowledgements that were
    /// meant for it (rumqttc's `clean` drops PUBACKs from the channel;
    /// PUBRECs and anything already in its pending list are ours to drop),
    /// and counts what it reported written before it failed (see
    /// [`salvage_events`]).
    pub(crate) fn forget_connection(&mut self, deliveries: &Deliveries, ack_written: impl FnMut()) {
        self.eventloop.clean();
        self.eventloop.pending.retain(|request| {
            !matches!(
                request,
                rumqttc::Request::PubAck(_) | rumqttc::Request::PubRec(_)
            )
        });
        salvage_events(&mut self.eventloop, deliveries, ack_written);
    }

    /// After the connection ended, before the next: see [`release_collision`];
    /// with `reclaim` (a clean session, which forgets them) the unconfirmed
    /// publishes go back to the outbox to be sent again. Returns how many
    /// publishes without a packet id rumqttc keeps for the next connection.
    pub(crate) fn carry_publishes(&mut self, outbox: &Outbox, reclaim: bool) -> usize {
        release_collision(&mut self.eventloop);
        outbox.disconnected(reclaim.then(|| take_publishes(&mut self.eventloop.pending)));
        self.eventloop
            .pending
            .iter()
            .filter(|req| matches!(req, rumqttc::Request::Publish(p) if p.pkid == 0))
            .count()
    }

    /// Lets rumqttc answer a PUBREL for any packet id.
    ///
    /// rumqttc answers PUBREL with PUBCOMP only for packet ids it saw a QoS 2
    /// PUBLISH for on the current connection; any other PUBREL fails the
    /// connection ("unsolicited pubrel"). A resumed session resends the PUBREL of
    /// every QoS 2 message acknowledged (PUBREC) before the connection, or the
    /// process, ended [MQTT-4.4.0-1], so the next connection would fail the same
    /// way, forever. The protocol asks for a PUBCOMP for every PUBREL
    /// [MQTT-4.3.3-2] and the broker sends PUBREL only after our PUBREC, so every
    /// packet id is marked as awaiting one, through rumqttc's own incoming-publish
    /// path (its bit set is private). Marking all 65,535 takes a few milliseconds
    /// per resumed session with a QoS 2 route.
    pub(crate) fn expect_pubrels(&mut self) {
        let events = self.eventloop.state.events.len();
        let mut marker = rumqttc::Publish::new("", rumqttc::QoS::ExactlyOnce, Bytes::new());
        for pkid in 1..=u16::MAX {
            marker.pkid = pkid;
            // Only bookkeeping: with manual acks nothing is written.
            let _ = self
                .eventloop
                .state
                .handle_incoming_packet(Packet::Publish(marker.clone()));
            if pkid % 1024 == 0 {
                self.eventloop.state.events.truncate(events);
            }
        }
        self.eventloop.state.events.truncate(events);
    }

    /// Writes a PINGREQ past rumqttc, which is not being polled (reading is
    /// paused); its PINGRESP is read when reading resumes and clears nothing
    /// rumqttc waits for. Returns false when the write failed (the next poll then
    /// finds the broken connection).
    pub(crate) async fn ping(&mut self, timeout: Duration) -> bool {
        let Some(network) = self.eventloop.network.as_mut() else {
            return false;
        };
        let write = async {
            network.write(Packet::PingReq).await?;
            network.flush().await
        };
        matches!(tokio::time::timeout(timeout, write).await, Ok(Ok(())))
    }

    /// Sends DISCONNECT and drops the connection once the broker has read it, so
    /// that the broker keeps the session and does not publish the Last Will; the
    /// next poll reconnects, and rumqttc keeps what it had not sent.
    pub(crate) async fn disconnect(&mut self, timeout: Duration) {
        if let Some(network) = self.eventloop.network.as_mut() {
            let write = async {
                network.write(Packet::Disconnect).await?;
                network.flush().await
            };
            if matches!(tokio::time::timeout(timeout, write).await, Ok(Ok(()))) {
                self.await_close(timeout).await;
            }
        }
        self.eventloop.clean();
        self.eventloop.network = None;
    }

    /// After our DISCONNECT: waits until the broker closes the connection, at most
    /// `timeout`; returns whether it did.
    ///
    /// Writing the DISCONNECT is not enough. The broker reads the socket in order,
    /// but a new connection under the same client id (the next process of a
    /// redeploy, or our own reconnect) takes the session over at once, and what
    /// the broker had not yet read of the old socket is lost: acknowledgements
    /// included, and their messages are delivered again (seen with mosquitto
    /// 2.0.11: PUBACKs 53 to 64 of 64 dropped so). Once the broker has closed the
    /// connection, it has read everything before the DISCONNECT. Publishes it
    /// sent meanwhile are dropped unacknowledged; the session delivers them again.
    pub(crate) async fn await_close(&mut self, timeout: Duration) -> bool {
        let Some(network) = self.eventloop.network.as_mut() else {
            return false;
        };
        let closed = async { while network.read().await.is_ok() {} };
        tokio::time::timeout(timeout, closed).await.is_ok()
    }
}

/// Takes the publishes out of rumqttc's pending list, in its order, as
/// (packet id, message); the other requests stay.
fn take_publishes(pending: &mut VecDeque<rumqttc::Request>) -> Vec<(u16, outbox::Outgoing)> {
    let mut publishes = Vec::new();
    let mut kept = VecDeque::new();
    for request in pending.drain(..) {
        match request {
            rumqttc::Request::Publish(publish) => publishes.push((
                publish.pkid,
                outbox::Outgoing {
                    topic: publish.topic,
                    qos: from_wire(publish.qos),
                    retain: publish.retain,
                    payload: publish.payload,
                    // MQTT 3.1.1 sent none.
                    properties: None,
                },
            )),
            other => kept.push_back(other),
        }
    }
    *pending = kept;
    publishes
}

/// Our QoS as rumqttc's.
pub(crate) fn to_wire(qos: QoS) -> rumqttc::QoS {
    match qos {
        QoS::AtMostOnce => rumqttc::QoS::AtMostOnce,
        QoS::AtLeastOnce => rumqttc::QoS::AtLeastOnce,
        QoS::ExactlyOnce => rumqttc::QoS::ExactlyOnce,
    }
}

/// rumqttc's QoS as ours.
pub(crate) fn from_wire(qos: rumqttc::QoS) -> QoS {
    match qos {
        rumqttc::QoS::AtMostOnce => QoS::AtMostOnce,
        rumqttc::QoS::AtLeastOnce => QoS::AtLeastOnce,
        rumqttc::QoS::ExactlyOnce => QoS::ExactlyOnce,
    }
}

/// A PUBLISH packet received by rumqttc, taken apart without copying.
fn received(publish: rumqttc::Publish) -> Received {
    Received {
        topic: publish.topic,
        payload: publish.payload,
        qos: from_wire(publish.qos),
        retain: publish.retain,
        dup: publish.dup,
        pkid: publish.pkid,
        properties: None,
    }
}

/// The publish rumqttc's `AsyncClient::ack` takes for `packet`: only its QoS
/// and packet id are read.
fn ack_publish(packet: AckPacket) -> rumqttc::Publish {
    let mut publish = rumqttc::Publish::new("", to_wire(packet.qos), Bytes::new());
    publish.pkid = packet.pkid;
    publish
}

/// A CONNACK refusal in words, with its return code.
fn describe_refusal(code: rumqttc::ConnectReturnCode) -> String {
    use rumqttc::ConnectReturnCode as Code;
    let (number, words) = match code {
        Code::Success => (0, "accepted"),
        Code::RefusedProtocolVersion => (1, "unacceptable protocol version"),
        Code::BadClientId => (2, "client identifier rejected"),
        Code::ServiceUnavailable => (3, "server unavailable"),
        Code::BadUserNamePassword => (4, "bad user name or password"),
        Code::NotAuthorized => (5, "not authorized"),
    };
    format!("{words} (CONNACK return code {number})")
}

/// Reads the events rumqttc buffered before the connection failed (it records
/// an outgoing publish before writing it, and reads packets in batches): a
/// publish it reported written and acks that arrived still count, or the
/// confirmation FIFO would drift by one; so do acknowledgements it reported
/// written (`ack_written`). Incoming publishes are left
/// unacknowledged; the broker sends them again if it can.
fn salvage_events(
    eventloop: &mut EventLoop,
    deliveries: &Deliveries,
    mut ack_written: impl FnMut(),
) {
    use rumqttc::Event;
    for event in eventloop.state.events.drain(..) {
        match event {
            Event::Outgoing(Outgoing::Publish(pkid)) => deliveries.written(pkid),
            Event::Outgoing(Outgoing::PubAck(_) | Outgoing::PubRec(_)) => ack_written(),
            Event::Incoming(Packet::PubAck(ack)) => deliveries.confirmed(ack.pkid),
            Event::Incoming(Packet::PubComp(comp)) => deliveries.confirmed(comp.pkid),
            _ => {}
        }
    }
}

/// rumqttc keeps a publish that collided on a packet id outside its pending
/// list, and keeps refusing requests while it holds one, even across
/// reconnects. Put it back where it belongs: before the publishes that came
/// after it, as the oldest one without a packet id.
fn release_collision(eventloop: &mut EventLoop) {
    let Some(mut publish) = eventloop.state.collision.take() else {
        return;
    };
    publish.pkid = 0;
    let pending = &mut eventloop.pending;
    let at = pending
        .iter()
        .position(|req| matches!(req, rumqttc::Request::Publish(p) if p.pkid == 0))
        .unwrap_or(pending.len());
    pending.insert(at, rumqttc::Request::Publish(publish));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_publish_keeps_its_flags() {
        let mut publish = rumqttc::Publish::new("a/b", rumqttc::QoS::ExactlyOnce, b"xy".to_vec());
        publish.retain = true;
        publish.dup = true;
        publish.pkid = 7;
        let inbound = received(publish);
        assert_eq!(inbound.pkid, 7);
        let req = inbound.request().unwrap();
        assert_eq!(req.topic(), "a/b");
        assert_eq!(req.qos(), QoS::ExactlyOnce);
        assert!(req.retain() && req.dup());
        assert_eq!(&req.body()[..], b"xy");
    }

    #[test]
    fn a_publish_with_a_bad_topic_is_refused() {
        let publish = rumqttc::Publish::new("a/+", rumqttc::QoS::AtMostOnce, Vec::new());
        assert!(received(publish).request().is_err());
    }

    #[test]
    fn an_acknowledgement_names_its_packet_and_qos() {
        for qos in [QoS::AtLeastOnce, QoS::ExactlyOnce] {
            let publish = ack_publish(AckPacket { pkid: 9, qos });
            assert_eq!((publish.pkid, from_wire(publish.qos)), (9, qos));
        }
    }

    #[test]
    fn qos_round_trips() {
        for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
            assert_eq!(from_wire(to_wire(qos)), qos);
        }
    }
}
