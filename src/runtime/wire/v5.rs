//! rumqttc's MQTT 5 client behind [`super::Connection`] and
//! [`super::Handle`].
//!
//! What differs from the MQTT 3.1.1 client (rumqttc 0.25.1):
//! - **The socket is private** (`v5::EventLoop::network`): the poll loop
//!   cannot write its own PINGREQ while reading is paused, nor read until the
//!   broker closes after our DISCONNECT. While paused it polls again when
//!   rumqttc's keep-alive timer is due ([`Connection::ping_due`]); DISCONNECT
//!   goes through the channel and the connection is polled until it ends.
//!   Whether a connection is up is a flag of ours.
//! - **Reason codes arrive as packets**: a PUBACK or PUBREC of 0x80 or above
//!   is an [`Event::Refused`]; rumqttc leaves a publish that collided on that
//!   packet id waiting, which is put back here. A refused PUBREC keeps its
//!   in-flight slot in rumqttc until the connection ends.
//! - **Topic aliases are off**: rumqttc hands a message over before it
//!   resolves an incoming alias (the handler would see an empty topic), so no
//!   Topic Alias Maximum is announced and none is used outbound.
//! - **The broker's Maximum Packet Size** (CONNACK) fails a larger publish in
//!   rumqttc, which drops the connection and replays it forever: the handle
//!   refuses such a publish before it enters the channel.

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use rumqttc::{
    v5::{
        mqttbytes::{
            v5::{
                ConnectReturnCode, Filter as WireFilter, LastWill, Packet, PubAckReason,
                PubRecReason, Publish, PublishProperties, RetainForwardRule, SubscribeReasonCode,
            },
            QoS as WireQoS,
        },
        AsyncClient, ConnectionError, EventLoop, MqttOptions, Request as WireRequest, StateError,
    },
    Outgoing,
};
use tokio::time::Instant;

use super::{words, Event, Filter, Lost, PollError, Reason, Received, TrySendError};
use crate::{
    config::FailureKind,
    properties::Properties,
    request::QoS,
    runtime::{
        delivery::Deliveries,
        dispatch::AckPacket,
        outbox::{self, Outbox},
    },
    subscription::RetainHandling,
};

/// The connection to the broker, one after another: rumqttc's MQTT 5 event
/// loop.
pub(crate) struct Connection {
    eventloop: EventLoop,
    /// For the DISCONNECT, which has to go through the channel.
    client: AsyncClient,
    connected: bool,
    /// When rumqttc last wrote a PINGREQ, or connected: its keep-alive timer
    /// fires one keep-alive later.
    last_ping: Instant,
    /// In-flight slots rumqttc lost to refused PUBRECs on this connection
    /// (it never gives them back), and how many it has.
    leaked_inflight: u16,
    inflight_limit: u16,
    /// The broker's Maximum Packet Size, 0 when it set none.
    broker_max_packet: Arc<AtomicUsize>,
}

/// Puts requests into the connection's channel; cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct Handle {
    client: AsyncClient,
    broker_max_packet: Arc<AtomicUsize>,
}

/// See [`super::connect`].
pub(super) fn connect(
    mut options: MqttOptions,
    will: Option<(String, Vec<u8>)>,
    capacity: usize,
) -> (Handle, Connection) {
    options.set_manual_acks(true);
    if let Some((topic, payload)) = will {
        options.set_last_will(LastWill::new(
            topic,
            payload,
            WireQoS::AtLeastOnce,
            true,
            None,
        ));
    }
    // Nagle's algorithm off, as for MQTT 3.1.1 (see `v4::connect`).
    let mut network = options.network_options();
    network.set_tcp_nodelay(true);
    options.set_network_options(network);
    let inflight_limit = options
        .get_outgoing_inflight_upper_limit()
        .unwrap_or(u16::MAX);
    let (client, eventloop) = AsyncClient::new(options, capacity);
    let broker_max_packet = Arc::new(AtomicUsize::new(0));
    (
        Handle {
            client: client.clone(),
            broker_max_packet: broker_max_packet.clone(),
        },
        Connection {
            eventloop,
            client,
            connected: false,
            last_ping: Instant::now(),
            leaked_inflight: 0,
            inflight_limit,
            broker_max_packet,
        },
    )
}

impl Handle {
    /// Puts a publish, with its properties, into the channel.
    pub(crate) fn try_publish(&self, message: &outbox::Outgoing) -> Result<(), TrySendError> {
        let properties = message.properties.as_deref().map(to_wire_properties);
        let max = self.broker_max_packet.load(Ordering::Relaxed);
        if max != 0 {
            let mut publish = Publish::new(
                message.topic.as_str(),
                to_wire(message.qos),
                message.payload.clone(),
                properties.clone(),
            );
            publish.pkid = 1; // counts the packet id's two bytes
            let size = publish.size();
            if size > max {
                return Err(TrySendError::TooLarge { size, max });
            }
        }
        let (topic, qos, retain) = (message.topic.as_str(), to_wire(message.qos), message.retain);
        // The payload's Bytes is shared, not copied.
        let payload = message.payload.clone();
        match properties {
            Some(properties) => self
                .client
                .try_publish_with_properties(topic, qos, retain, payload, properties),
            None => self.client.try_publish(topic, qos, retain, payload),
        }
        .map_err(|_| TrySendError::Full)
    }

    /// See [`super::Handle::try_ack`].
    pub(crate) fn try_ack(&self, packet: AckPacket) -> bool {
        let mut publish = Publish::new("", to_wire(packet.qos), Bytes::new(), None);
        publish.pkid = packet.pkid;
        self.client.try_ack(&publish).is_ok()
    }

    /// See [`super::Handle::subscribe`]: with each filter's options.
    pub(crate) async fn subscribe(&self, filters: &[Filter]) -> Result<(), String> {
        let filters = filters.iter().map(|f| WireFilter {
            path: f.path.clone(),
            qos: to_wire(f.qos),
            nolocal: f.options.no_local,
            preserve_retain: f.options.retain_as_published,
            retain_forward_rule: match f.options.retain_handling {
                RetainHandling::OnSubscribe => RetainForwardRule::OnEverySubscribe,
                RetainHandling::OnNewSubscription => RetainForwardRule::OnNewSubscribe,
                RetainHandling::Never => RetainForwardRule::Never,
            },
        });
        self.client
            .subscribe_many(filters)
            .await
            .map_err(|err| err.to_string())
    }

    /// See [`super::Handle::disconnect`].
    pub(crate) async fn disconnect(&self) {
        let _ = self.client.disconnect().await;
    }
}

impl Connection {
    /// See [`super::Connection::is_connected`].
    pub(crate) fn is_connected(&self) -> bool {
        self.connected
    }

    /// The credentials of the next connection attempt.
    pub(crate) fn set_credentials(&mut self, user: String, password: &str) {
        self.eventloop.options.set_credentials(user, password);
    }

    /// See [`super::Connection::clear_ping_check`].
    pub(crate) fn clear_ping_check(&mut self) {
        self.eventloop.state.await_pingresp = false;
    }

    /// See [`super::Connection::collided`]; also true once refused PUBRECs
    /// took every in-flight slot, which stops rumqttc reading its channel
    /// (acknowledgements included) until the connection ends.
    pub(crate) fn collided(&self) -> bool {
        self.eventloop.state.collision.is_some() || self.leaked_inflight >= self.inflight_limit
    }

    /// When rumqttc writes its next PINGREQ, if polled: one keep-alive after
    /// the last (the broker's Server Keep Alive, when it sent one, replaces
    /// the configured one in rumqttc's options).
    pub(crate) fn ping_due(&self) -> Instant {
        self.last_ping + self.eventloop.options.keep_alive()
    }

    /// See [`super::Connection::poll`].
    pub(crate) async fn poll(&mut self) -> Result<Event, PollError> {
        let event = match self.eventloop.poll().await {
            Ok(event) => event,
            Err(err) => {
                self.connected = false;
                return Err(poll_error(err));
            }
        };
        Ok(match event {
            rumqttc::v5::Event::Incoming(packet) => match packet {
                Packet::ConnAck(ack) => {
                    self.connected = true;
                    self.last_ping = Instant::now();
                    self.leaked_inflight = 0;
                    if let Some(limit) = ack.properties.as_ref().and_then(|props| props.receive_max)
                    {
                        self.inflight_limit = self.inflight_limit.min(limit);
                    }
                    let max = ack
                        .properties
                        .as_ref()
                        .and_then(|props| props.max_packet_size)
                        .map_or(0, |max| usize::try_from(max).unwrap_or(usize::MAX));
                    self.broker_max_packet.store(max, Ordering::Relaxed);
                    Event::Connected {
                        session_present: ack.session_present,
                    }
                }
                Packet::Publish(publish) => Event::Publish(received(publish)),
                Packet::PubAck(ack) => match puback_refusal(ack.reason) {
                    None => Event::Confirmed(ack.pkid),
                    Some(code) => {
                        self.release_collision();
                        let string = ack.properties.and_then(|props| props.reason_string);
                        Event::Refused {
                            pkid: ack.pkid,
                            code,
                            reason: reason_text(&format!("{:?}", ack.reason), string),
                        }
                    }
                },
                Packet::PubRec(rec) => match pubrec_refusal(rec.reason) {
                    None => Event::Read,
                    Some(code) => {
                        self.leaked_inflight = self.leaked_inflight.saturating_add(1);
                        self.release_collision();
                        let string = rec.properties.and_then(|props| props.reason_string);
                        Event::Refused {
                            pkid: rec.pkid,
                            code,
                            reason: reason_text(&format!("{:?}", rec.reason), string),
                        }
                    }
                },
                Packet::PubComp(comp) => Event::Confirmed(comp.pkid),
                Packet::SubAck(suback) => {
                    let string = suback.properties.and_then(|props| props.reason_string);
                    Event::Subscribed(
                        suback
                            .return_codes
                            .iter()
                            .map(|code| suback_refusal(*code, string.as_deref()))
                            .collect(),
                    )
                }
                _ => Event::Read,
            },
            rumqttc::v5::Event::Outgoing(outgoing) => match outgoing {
                Outgoing::Publish(pkid) => Event::PublishWritten(pkid),
                Outgoing::PubAck(_) | Outgoing::PubRec(_) => Event::AckWritten,
                Outgoing::PingReq => {
                    self.last_ping = Instant::now();
                    Event::PingWritten
                }
                Outgoing::Disconnect => Event::DisconnectWritten,
                _ => Event::Written,
            },
        })
    }

    /// See [`super::Connection::abandon`].
    pub(crate) fn abandon(&mut self) {
        self.eventloop.clean();
        self.connected = false;
    }

    /// See [`super::Connection::forget_connection`] and `v4::salvage_events`.
    pub(crate) fn forget_connection(
        &mut self,
        deliveries: &Deliveries,
        mut ack_written: impl FnMut(),
    ) {
        use rumqttc::v5::Event as E;
        self.connected = false;
        self.eventloop.clean();
        self.eventloop
            .pending
            .retain(|request| !matches!(request, WireRequest::PubAck(_) | WireRequest::PubRec(_)));
        for event in self.eventloop.state.events.drain(..) {
            match event {
                E::Outgoing(Outgoing::Publish(pkid)) => deliveries.written(pkid),
                E::Outgoing(Outgoing::PubAck(_) | Outgoing::PubRec(_)) => ack_written(),
                E::Incoming(Packet::PubAck(ack)) => match puback_refusal(ack.reason) {
                    None => deliveries.confirmed(ack.pkid),
                    Some(code) => deliveries.refused(
                        ack.pkid,
                        code,
                        reason_text(&format!("{:?}", ack.reason), None),
                    ),
                },
                E::Incoming(Packet::PubRec(rec)) => {
                    if let Some(code) = pubrec_refusal(rec.reason) {
                        let reason = reason_text(&format!("{:?}", rec.reason), None);
                        deliveries.refused(rec.pkid, code, reason);
                    }
                }
                E::Incoming(Packet::PubComp(comp)) => deliveries.confirmed(comp.pkid),
                _ => {}
            }
        }
    }

    /// See [`super::Connection::carry_publishes`].
    pub(crate) fn carry_publishes(&mut self, outbox: &Outbox, reclaim: bool) -> usize {
        self.release_collision();
        outbox.disconnected(reclaim.then(|| take_publishes(&mut self.eventloop.pending)));
        self.eventloop
            .pending
            .iter()
            .filter(|req| matches!(req, WireRequest::Publish(p) if p.pkid == 0))
            .count()
    }

    /// See `v4::Connection::expect_pubrels`: the same, through rumqttc's MQTT 5
    /// incoming-publish path.
    pub(crate) fn expect_pubrels(&mut self) {
        let events = self.eventloop.state.events.len();
        let mut marker = Publish::new("", WireQoS::ExactlyOnce, Bytes::new(), None);
        for pkid in 1..=u16::MAX {
            marker.pkid = pkid;
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

    /// See [`super::Connection::disconnect`]: DISCONNECT through the channel,
    /// behind the acknowledgements already in it; then the connection is
    /// polled until the broker closes it.
    pub(crate) async fn disconnect(&mut self, timeout: Duration, mut event: impl FnMut(Event)) {
        let queued = self.connected
            && matches!(
                tokio::time::timeout(timeout, self.client.disconnect()).await,
                Ok(Ok(()))
            );
        if queued {
            let written = async {
                loop {
                    match self.poll().await {
                        Ok(Event::DisconnectWritten) => return true,
                        Ok(other) => event(other),
                        Err(_) => return false,
                    }
                }
            };
            if matches!(tokio::time::timeout(timeout, written).await, Ok(true)) {
                self.await_close(timeout, event).await;
            }
        }
        self.eventloop.clean();
        // A DISCONNECT not written (the connection failed first) must not be
        // written on the next connection, which would take it for shutdown.
        self.eventloop
            .pending
            .retain(|request| !matches!(request, WireRequest::Disconnect));
        self.connected = false;
    }

    /// See [`super::Connection::await_close`].
    pub(crate) async fn await_close(
        &mut self,
        timeout: Duration,
        mut event: impl FnMut(Event),
    ) -> bool {
        if !self.connected {
            return false;
        }
        let closed = async {
            while let Ok(next) = self.poll().await {
                event(next);
            }
        };
        let closed = tokio::time::timeout(timeout, closed).await.is_ok();
        // What rumqttc still holds belongs to the next connection; the poll
        // must not connect again on its own.
        self.eventloop.clean();
        self.connected = false;
        closed
    }

    /// rumqttc keeps a publish that collided on a packet id outside its
    /// pending list until the id's ack arrives; a refused PUBACK (or a lost
    /// connection) never lets it go. Put it back as the oldest publish without
    /// a packet id (see `v4::release_collision`).
    fn release_collision(&mut self) {
        let Some(mut publish) = self.eventloop.state.collision.take() else {
            return;
        };
        publish.pkid = 0;
        let pending = &mut self.eventloop.pending;
        let at = pending
            .iter()
            .position(|req| matches!(req, WireRequest::Publish(p) if p.pkid == 0))
            .unwrap_or(pending.len());
        pending.insert(at, WireRequest::Publish(publish));
    }
}

/// The poll loop's view of a failed poll.
fn poll_error(err: ConnectionError) -> PollError {
    let kind = match &err {
        ConnectionError::ConnectionRefused(code) => {
            return PollError::Refused(describe_refusal(*code));
        }
        ConnectionError::MqttState(StateError::ServerDisconnect {
            reason_code,
            reason_string,
        }) => {
            let code = *reason_code as u8;
            let words = reason_text(&format!("{reason_code:?}"), reason_string.clone());
            return PollError::Lost(Lost {
                error: Box::new(Reason(format!(
                    "the broker disconnected: {words} (DISCONNECT reason code {code:#04x})"
                ))),
                kind: FailureKind::Other,
            });
        }
        ConnectionError::Tls(_) => FailureKind::Tls,
        #[cfg(feature = "websocket")]
        ConnectionError::Websocket(_)
        | ConnectionError::WsConnect(_)
        | ConnectionError::ResponseValidation(_)
        | ConnectionError::InvalidUrl(_) => FailureKind::WebSocket,
        _ => FailureKind::Other,
    };
    PollError::Lost(Lost {
        error: Box::new(err),
        kind,
    })
}

/// A reason code's name in words, with the broker's reason string.
fn reason_text(name: &str, string: Option<String>) -> String {
    match string {
        Some(string) if !string.is_empty() => format!("{}: {string}", words(name)),
        _ => words(name),
    }
}

/// The reason code of a refusing PUBACK; `None` for success (rumqttc keeps
/// the code private, so the table is ours: MQTT 5 section 3.4.2.1).
fn puback_refusal(reason: PubAckReason) -> Option<u8> {
    Some(match reason {
        PubAckReason::Success | PubAckReason::NoMatchingSubscribers => return None,
        PubAckReason::UnspecifiedError => 0x80,
        PubAckReason::ImplementationSpecificError => 0x83,
        PubAckReason::NotAuthorized => 0x87,
        PubAckReason::TopicNameInvalid => 0x90,
        PubAckReason::PacketIdentifierInUse => 0x91,
        PubAckReason::QuotaExceeded => 0x97,
        PubAckReason::PayloadFormatInvalid => 0x99,
    })
}

/// The same for PUBREC (section 3.5.2.1).
fn pubrec_refusal(reason: PubRecReason) -> Option<u8> {
    Some(match reason {
        PubRecReason::Success | PubRecReason::NoMatchingSubscribers => return None,
        PubRecReason::UnspecifiedError => 0x80,
        PubRecReason::ImplementationSpecificError => 0x83,
        PubRecReason::NotAuthorized => 0x87,
        PubRecReason::TopicNameInvalid => 0x90,
        PubRecReason::PacketIdentifierInUse => 0x91,
        PubRecReason::QuotaExceeded => 0x97,
        PubRecReason::PayloadFormatInvalid => 0x99,
    })
}

/// Why a SUBACK refused a filter, `None` when it granted it. rumqttc decodes
/// 0x80 as `Unspecified` (and never as `Failure`): anything but success is a
/// refusal.
fn suback_refusal(code: SubscribeReasonCode, string: Option<&str>) -> Option<String> {
    let number = match code {
        SubscribeReasonCode::Success(_) => return None,
        SubscribeReasonCode::Failure | SubscribeReasonCode::Unspecified => 0x80,
        SubscribeReasonCode::ImplementationSpecific => 0x83,
        SubscribeReasonCode::NotAuthorized => 0x87,
        SubscribeReasonCode::TopicFilterInvalid => 0x8F,
        SubscribeReasonCode::PkidInUse => 0x91,
        SubscribeReasonCode::QuotaExceeded => 0x97,
        SubscribeReasonCode::SharedSubscriptionsNotSupported => 0x9E,
        SubscribeReasonCode::SubscriptionIdNotSupported => 0xA1,
        SubscribeReasonCode::WildcardSubscriptionsNotSupported => 0xA2,
    };
    let name = match code {
        SubscribeReasonCode::Failure | SubscribeReasonCode::Unspecified => "UnspecifiedError",
        other => &format!("{other:?}"),
    };
    Some(format!(
        "the broker refused it: {} (SUBACK reason code {number:#04x})",
        reason_text(name, string.map(str::to_owned))
    ))
}

/// A CONNACK refusal in words, with its reason code.
fn describe_refusal(code: ConnectReturnCode) -> String {
    use ConnectReturnCode as C;
    let number: u8 = match code {
        C::Success => 0x00,
        C::RefusedProtocolVersion | C::UnsupportedProtocolVersion => 0x84,
        C::BadClientId | C::ClientIdentifierNotValid => 0x85,
        C::ServiceUnavailable | C::ServerUnavailable => 0x88,
        C::UnspecifiedError => 0x80,
        C::MalformedPacket => 0x81,
        C::ProtocolError => 0x82,
        C::ImplementationSpecificError => 0x83,
        C::BadUserNamePassword => 0x86,
        C::NotAuthorized => 0x87,
        C::ServerBusy => 0x89,
        C::Banned => 0x8A,
        C::BadAuthenticationMethod => 0x8C,
        C::TopicNameInvalid => 0x90,
        C::PacketTooLarge => 0x95,
        C::QuotaExceeded => 0x97,
        C::PayloadFormatInvalid => 0x99,
        C::RetainNotSupported => 0x9A,
        C::QoSNotSupported => 0x9B,
        C::UseAnotherServer => 0x9C,
        C::ServerMoved => 0x9D,
        C::ConnectionRateExceeded => 0x9F,
    };
    format!(
        "{} (CONNACK reason code {number:#04x})",
        words(&format!("{code:?}"))
    )
}

/// Our QoS as rumqttc's MQTT 5 QoS.
fn to_wire(qos: QoS) -> WireQoS {
    match qos {
        QoS::AtMostOnce => WireQoS::AtMostOnce,
        QoS::AtLeastOnce => WireQoS::AtLeastOnce,
        QoS::ExactlyOnce => WireQoS::ExactlyOnce,
    }
}

fn from_wire(qos: WireQoS) -> QoS {
    match qos {
        WireQoS::AtMostOnce => QoS::AtMostOnce,
        WireQoS::AtLeastOnce => QoS::AtLeastOnce,
        WireQoS::ExactlyOnce => QoS::ExactlyOnce,
    }
}

/// Our properties as a PUBLISH's.
fn to_wire_properties(props: &Properties) -> PublishProperties {
    PublishProperties {
        payload_format_indicator: props.utf8_payload.then_some(1),
        // Whole seconds, rounded up: 0 would be an expiry of no time at all.
        message_expiry_interval: props.message_expiry.map(|expiry| {
            let secs = expiry.as_secs() + u64::from(expiry.subsec_nanos() > 0);
            u32::try_from(secs).unwrap_or(u32::MAX)
        }),
        topic_alias: None,
        response_topic: props.response_topic.clone(),
        correlation_data: props.correlation_data.clone(),
        user_properties: props.user_properties.clone(),
        subscription_identifiers: Vec::new(),
        content_type: props.content_type.clone(),
    }
}

/// A PUBLISH's properties as ours; `None` when it has none we keep.
fn from_wire_properties(props: PublishProperties) -> Option<Arc<Properties>> {
    let mut ours = Properties::new();
    ours.user_properties = props.user_properties;
    ours.content_type = props.content_type;
    ours.response_topic = props.response_topic;
    ours.correlation_data = props.correlation_data;
    ours.message_expiry = props
        .message_expiry_interval
        .map(|secs| Duration::from_secs(secs.into()));
    ours.utf8_payload = props.payload_format_indicator == Some(1);
    (!ours.is_empty()).then(|| Arc::new(ours))
}

/// A PUBLISH packet received by rumqttc, in our types.
fn received(publish: Publish) -> Received {
    Received {
        // A topic that is not UTF-8 fails as a bad topic, as on MQTT 3.1.1.
        topic: String::from_utf8(publish.topic.to_vec())
            .unwrap_or_else(|err| String::from_utf8_lossy(err.as_bytes()).into_owned()),
        payload: publish.payload,
        qos: from_wire(publish.qos),
        retain: publish.retain,
        dup: publish.dup,
        pkid: publish.pkid,
        properties: publish.properties.and_then(from_wire_properties),
    }
}

/// Takes the publishes out of rumqttc's pending list, in its order, as
/// (packet id, message); the other requests stay.
fn take_publishes(pending: &mut VecDeque<WireRequest>) -> Vec<(u16, outbox::Outgoing)> {
    let mut publishes = Vec::new();
    let mut kept = VecDeque::new();
    for request in pending.drain(..) {
        match request {
            WireRequest::Publish(publish) => publishes.push((
                publish.pkid,
                outbox::Outgoing {
                    topic: String::from_utf8_lossy(&publish.topic).into_owned(),
                    qos: from_wire(publish.qos),
                    retain: publish.retain,
                    payload: publish.payload,
                    properties: publish.properties.and_then(from_wire_properties),
                },
            )),
            other => kept.push_back(other),
        }
    }
    *pending = kept;
    publishes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_round_trip_through_the_wire_type() {
        let mut props = Properties::new();
        props
            .add_user_property("traceparent", "00-abc")
            .add_user_property("k", "1")
            .add_user_property("k", "2");
        props.content_type = Some("application/json".into());
        props.response_topic = Some("replies/1".into());
        props.correlation_data = Some(Bytes::from_static(b"\x00\x01"));
        props.message_expiry = Some(Duration::from_secs(30));
        props.utf8_payload = true;
        let back = from_wire_properties(to_wire_properties(&props)).unwrap();
        assert_eq!(*back, props);
        assert!(from_wire_properties(PublishProperties::default()).is_none());
    }

    #[test]
    fn a_received_publish_keeps_flags_and_properties() {
        let wire = PublishProperties {
            user_properties: vec![("a".into(), "b".into())],
            ..PublishProperties::default()
        };
        let mut publish = Publish::new("a/b", WireQoS::ExactlyOnce, b"xy".to_vec(), Some(wire));
        publish.retain = true;
        publish.pkid = 7;
        let received = received(publish);
        assert_eq!(received.pkid, 7);
        let req = received.request().unwrap();
        assert_eq!(req.topic(), "a/b");
        assert_eq!(req.qos(), QoS::ExactlyOnce);
        assert!(req.retain());
        assert_eq!(req.properties().user_property("a"), Some("b"));
    }

    #[test]
    fn a_server_disconnect_names_its_reason() {
        use rumqttc::v5::mqttbytes::v5::DisconnectReasonCode;
        let err = ConnectionError::MqttState(StateError::ServerDisconnect {
            reason_code: DisconnectReasonCode::SessionTakenOver,
            reason_string: Some("another client".into()),
        });
        let PollError::Lost(lost) = poll_error(err) else {
            panic!("a lost connection, not a refusal");
        };
        assert_eq!(
            lost.error.to_string(),
            "the broker disconnected: session taken over: another client \
             (DISCONNECT reason code 0x8e)"
        );
    }

    #[test]
    fn refusals_name_their_reason_and_code() {
        assert_eq!(puback_refusal(PubAckReason::Success), None);
        assert_eq!(puback_refusal(PubAckReason::NoMatchingSubscribers), None);
        assert_eq!(puback_refusal(PubAckReason::NotAuthorized), Some(0x87));
        assert_eq!(pubrec_refusal(PubRecReason::QuotaExceeded), Some(0x97));
        let refused = suback_refusal(SubscribeReasonCode::Unspecified, Some("acl")).unwrap();
        assert_eq!(
            refused,
            "the broker refused it: unspecified error: acl (SUBACK reason code 0x80)"
        );
        assert!(suback_refusal(SubscribeReasonCode::Success(WireQoS::AtLeastOnce), None).is_none());
        assert_eq!(
            describe_refusal(ConnectReturnCode::NotAuthorized),
            "not authorized (CONNACK reason code 0x87)"
        );
    }
}
