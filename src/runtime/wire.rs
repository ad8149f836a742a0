//! Everything that knows rumqttc's insides: conversions between our types and
//! its (no rumqttc type appears in a public signature), and the workarounds
//! for what rumqttc 0.25 does not do or does wrong.

use std::time::Duration;

use bytes::Bytes;
use rumqttc::{Event, EventLoop, Outgoing, Packet};

use super::{delivery::Deliveries, dispatch::AckPacket};
use crate::{
    request::{QoS, Request},
    router::Router,
    topic::{TopicError, TopicName},
};

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

/// A PUBLISH received from the broker, in our types: what the dispatcher
/// takes, whichever protocol version brought it.
#[derive(Clone, Debug)]
pub(crate) struct Inbound {
    pub(crate) topic: String,
    pub(crate) payload: Bytes,
    pub(crate) qos: QoS,
    pub(crate) retain: bool,
    pub(crate) dup: bool,
    /// 0 for QoS 0.
    pub(crate) pkid: u16,
}

impl Inbound {
    /// The request for this message.
    pub(crate) fn request(&self) -> Result<Request<Bytes>, TopicError> {
        let mut req = Request::new(TopicName::new(&self.topic)?, self.payload.clone());
        req.set_qos(self.qos);
        req.set_retain(self.retain);
        req.set_dup(self.dup);
        Ok(req)
    }
}

/// A PUBLISH packet received by rumqttc, taken apart without copying.
pub(crate) fn inbound(publish: rumqttc::Publish) -> Inbound {
    Inbound {
        topic: publish.topic,
        payload: publish.payload,
        qos: from_wire(publish.qos),
        retain: publish.retain,
        dup: publish.dup,
        pkid: publish.pkid,
    }
}

/// The publish rumqttc's `AsyncClient::ack` takes for `packet`: only its QoS
/// and packet id are read.
pub(crate) fn ack_publish(packet: AckPacket) -> rumqttc::Publish {
    let mut publish = rumqttc::Publish::new("", to_wire(packet.qos), Bytes::new());
    publish.pkid = packet.pkid;
    publish
}

/// The router's filters with the QoS to subscribe at.
pub(crate) fn subscriptions(router: &Router) -> Vec<(String, QoS)> {
    router
        .subscriptions()
        .into_iter()
        .map(|(filter, qos)| (filter.as_str().to_owned(), qos))
        .collect()
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
pub(crate) fn expect_pubrels(eventloop: &mut EventLoop) {
    let events = eventloop.state.events.len();
    let mut marker = rumqttc::Publish::new("", rumqttc::QoS::ExactlyOnce, Bytes::new());
    for pkid in 1..=u16::MAX {
        marker.pkid = pkid;
        // Only bookkeeping: with manual acks nothing is written.
        let _ = eventloop
            .state
            .handle_incoming_packet(Packet::Publish(marker.clone()));
        if pkid % 1024 == 0 {
            eventloop.state.events.truncate(events);
        }
    }
    eventloop.state.events.truncate(events);
}

/// A CONNACK refusal in words, with its return code.
pub(crate) fn describe_refusal(code: rumqttc::ConnectReturnCode) -> String {
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

/// Writes a PINGREQ past rumqttc, which is not being polled (reading is
/// paused); its PINGRESP is read when reading resumes and clears nothing
/// rumqttc waits for. Returns false when the write failed (the next poll then
/// finds the broken connection).
pub(crate) async fn ping(eventloop: &mut EventLoop, timeout: Duration) -> bool {
    let Some(network) = eventloop.network.as_mut() else {
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
pub(crate) async fn disconnect(eventloop: &mut EventLoop, timeout: Duration) {
    if let Some(network) = eventloop.network.as_mut() {
        let write = async {
            network.write(Packet::Disconnect).await?;
            network.flush().await
        };
        if matches!(tokio::time::timeout(timeout, write).await, Ok(Ok(()))) {
            await_close(eventloop, timeout).await;
        }
    }
    eventloop.clean();
    eventloop.network = None;
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
pub(crate) async fn await_close(eventloop: &mut EventLoop, timeout: Duration) -> bool {
    let Some(network) = eventloop.network.as_mut() else {
        return false;
    };
    let closed = async { while network.read().await.is_ok() {} };
    tokio::time::timeout(timeout, closed).await.is_ok()
}

/// Reads the events rumqttc buffered before the connection failed (it records
/// an outgoing publish before writing it, and reads packets in batches): a
/// publish it reported written and acks that arrived still count, or the
/// confirmation FIFO would drift by one; so do acknowledgements it reported
/// written (`ack_written`). Incoming publishes are left
/// unacknowledged; the broker sends them again if it can.
pub(crate) fn salvage_events(
    eventloop: &mut EventLoop,
    deliveries: &Deliveries,
    mut ack_written: impl FnMut(),
) {
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
pub(crate) fn release_collision(eventloop: &mut EventLoop) {
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
        let inbound = inbound(publish);
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
        assert!(inbound(publish).request().is_err());
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
