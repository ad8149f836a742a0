//! What a route asks of the broker and of the dispatcher: [`Subscription`].
//!
//! A plain string is enough for most routes (QoS 1, ordered, a queue of 256 that
//! makes the broker wait when full). High-volume topics say otherwise:
//!
//! ```
//! use tower_mqtt::{Overflow, QoS, Subscription};
//!
//! let fft = Subscription::new("audio/fft")
//!     .qos(QoS::AtMostOnce)
//!     .capacity(32)
//!     .overflow(Overflow::DropOldest);
//! assert_eq!(fft.filter().as_str(), "audio/fft");
//! ```

use crate::{
    request::QoS,
    topic::{TopicError, TopicFilter},
};

/// The default number of messages a route's queue holds.
pub const DEFAULT_QUEUE_CAPACITY: usize = 256;

/// What to do with a message that arrives while its route's queue is full.
///
/// ```
/// use tower_mqtt::Overflow;
///
/// assert_eq!(Overflow::default(), Overflow::Block);
/// assert_eq!("drop_oldest".parse::<Overflow>().unwrap(), Overflow::DropOldest);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Overflow {
    /// Lose nothing at QoS 1 and 2: when the queue reaches its capacity the
    /// client stops reading from the broker (TCP then makes the broker wait)
    /// until the route has room again; acknowledgements and publishes keep
    /// flowing, and a PINGREQ keeps the connection alive. The backlog stays at
    /// the broker. The broker's own in-flight window is not relied on: a
    /// mosquitto whose acknowledgements flow sends past it. QoS 0 past the
    /// capacity is dropped, as with [`Overflow::DropNew`].
    #[default]
    Block,
    /// Discard the oldest queued message of the same topic to make room: the
    /// freshest data wins (audio levels, camera frames). When that topic has
    /// nothing queued (the room is taken by other topics of the route), the
    /// new message is discarded instead.
    DropOldest,
    /// Discard the new message: what is queued wins.
    DropNew,
}

/// A string that is not an [`Overflow`] policy.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown overflow policy {0:?}: expected block, drop_oldest or drop_new")]
pub struct UnknownOverflow(pub String);

impl std::str::FromStr for Overflow {
    type Err = UnknownOverflow;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "block" => Ok(Self::Block),
            "drop_oldest" => Ok(Self::DropOldest),
            "drop_new" => Ok(Self::DropNew),
            other => Err(UnknownOverflow(other.to_owned())),
        }
    }
}

/// A route's topic filter with the QoS to subscribe with and how its messages
/// are queued.
///
/// ```
/// use tower_mqtt::{QoS, Subscription};
///
/// let sub = Subscription::new("llm/stream").qos(QoS::AtMostOnce).unordered();
/// assert_eq!(sub.get_qos(), QoS::AtMostOnce);
/// assert!(!sub.is_ordered());
/// assert!(Subscription::try_new("llm/#/x").is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[must_use]
pub struct Subscription {
    filter: TopicFilter,
    qos: QoS,
    capacity: Option<usize>,
    overflow: Option<Overflow>,
    ordered: bool,
    ack: Ack,
    options: SubscribeOptions,
}

/// The MQTT 5 subscription options of a route (not sent over MQTT 3.1.1,
/// which has none).
///
/// ```
/// use tower_mqtt::{subscription::{RetainHandling, SubscribeOptions}, Subscription};
///
/// let sub = Subscription::new("chat/room")
///     .no_local()
///     .retain_handling(RetainHandling::OnNewSubscription);
/// assert_eq!(
///     sub.get_options(),
///     SubscribeOptions {
///         no_local: true,
///         retain_as_published: false,
///         retain_handling: RetainHandling::OnNewSubscription,
///     }
/// );
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SubscribeOptions {
    /// The broker does not send this client the messages it publishes itself.
    pub no_local: bool,
    /// Messages forwarded for this subscription keep their retain flag (for a
    /// bridge); otherwise only retained messages sent on subscribing have it.
    pub retain_as_published: bool,
    /// When the broker sends the topic's retained messages.
    pub retain_handling: RetainHandling,
}

/// When the broker sends retained messages for a subscription (MQTT 5).
///
/// ```
/// use tower_mqtt::subscription::RetainHandling;
///
/// assert_eq!(RetainHandling::default(), RetainHandling::OnSubscribe);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum RetainHandling {
    /// At every subscribe, as on MQTT 3.1.1 (so again at every reconnect).
    #[default]
    OnSubscribe,
    /// Only when the subscription did not exist yet (a resumed session keeps
    /// it, so a reconnect does not send them again).
    OnNewSubscription,
    /// Never.
    Never,
}

impl Subscription {
    /// A subscription to `filter` with the defaults: QoS 1, ordered, a queue of
    /// [`DEFAULT_QUEUE_CAPACITY`] with [`Overflow::Block`].
    ///
    /// # Panics
    ///
    /// When `filter` is not a valid topic filter; the message names it. Use
    /// [`Subscription::try_new`] for filters that come from input.
    #[track_caller]
    pub fn new(filter: &str) -> Self {
        match Self::try_new(filter) {
            Ok(sub) => sub,
            Err(err) => panic!("invalid route {filter:?}: {err}"),
        }
    }

    /// Like [`Subscription::new`], returning the error instead of panicking.
    pub fn try_new(filter: &str) -> Result<Self, TopicError> {
        Ok(Self::from_filter(TopicFilter::new(filter)?))
    }

    /// A subscription to an already validated filter, with the defaults.
    pub fn from_filter(filter: TopicFilter) -> Self {
        Self {
            filter,
            qos: QoS::AtLeastOnce,
            capacity: None,
            overflow: None,
            ordered: true,
            ack: Ack::AfterHandling,
            options: SubscribeOptions::default(),
        }
    }

    /// MQTT 5: the broker does not send this client the messages it publishes
    /// itself on the filter (No Local). Not available on shared subscriptions,
    /// where the broker refuses it.
    ///
    /// ```
    /// assert!(tower_mqtt::Subscription::new("chat/+").no_local().get_options().no_local);
    /// ```
    pub fn no_local(mut self) -> Self {
        self.options.no_local = true;
        self
    }

    /// MQTT 5: forwarded messages keep their retain flag (Retain As Published).
    ///
    /// ```
    /// let sub = tower_mqtt::Subscription::new("bridge/#").retain_as_published();
    /// assert!(sub.get_options().retain_as_published);
    /// ```
    pub fn retain_as_published(mut self) -> Self {
        self.options.retain_as_published = true;
        self
    }

    /// MQTT 5: when the broker sends retained messages (Retain Handling).
    ///
    /// ```
    /// use tower_mqtt::{subscription::RetainHandling, Subscription};
    ///
    /// let sub = Subscription::new("config/#").retain_handling(RetainHandling::Never);
    /// assert_eq!(sub.get_options().retain_handling, RetainHandling::Never);
    /// ```
    pub fn retain_handling(mut self, handling: RetainHandling) -> Self {
        self.options.retain_handling = handling;
        self
    }

    /// The MQTT 5 subscription options.
    ///
    /// ```
    /// let sub = tower_mqtt::Subscription::new("a");
    /// assert_eq!(sub.get_options(), Default::default());
    /// ```
    pub fn get_options(&self) -> SubscribeOptions {
        self.options
    }

    /// Sets the QoS to subscribe with (the broker delivers at most this QoS).
    pub fn qos(mut self, qos: QoS) -> Self {
        self.qos = qos;
        self
    }

    /// Sets how many messages may wait for this route (at least 1).
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = Some(capacity.max(1));
        self
    }

    /// Sets what happens when the queue is full.
    pub fn overflow(mut self, overflow: Overflow) -> Self {
        self.overflow = Some(overflow);
        self
    }

    /// Lets messages of one topic run concurrently (up to the global in-flight
    /// limit) instead of one after another.
    pub fn unordered(mut self) -> Self {
        self.ordered = false;
        self
    }

    /// Sets when this route's QoS 1/2 messages are acknowledged (default
    /// [`Ack::AfterHandling`]).
    ///
    /// ```
    /// use tower_mqtt::{Ack, Subscription};
    ///
    /// // A 30 s model call: a redelivery after a crash would only start it over.
    /// let llm = Subscription::new("llm/request").ack(Ack::OnReceipt);
    /// assert_eq!(llm.get_ack(), Ack::OnReceipt);
    /// ```
    pub fn ack(mut self, ack: Ack) -> Self {
        self.ack = ack;
        self
    }

    /// When this route's messages are acknowledged.
    pub fn get_ack(&self) -> Ack {
        self.ack
    }

    /// The topic filter.
    pub fn filter(&self) -> &TopicFilter {
        &self.filter
    }

    /// The QoS to subscribe with.
    pub fn get_qos(&self) -> QoS {
        self.qos
    }

    /// The queue capacity: the one set with [`Subscription::capacity`], else
    /// [`DEFAULT_QUEUE_CAPACITY`].
    pub fn get_capacity(&self) -> usize {
        self.capacity.unwrap_or(DEFAULT_QUEUE_CAPACITY)
    }

    /// The queue capacity if this route set one; the runtime otherwise takes
    /// the service's default (`MQTT_QUEUE_SIZE`).
    ///
    /// ```
    /// use tower_mqtt::Subscription;
    ///
    /// assert_eq!(Subscription::new("a").capacity_setting(), None);
    /// assert_eq!(Subscription::new("a").capacity(8).capacity_setting(), Some(8));
    /// ```
    pub fn capacity_setting(&self) -> Option<usize> {
        self.capacity
    }

    /// The overflow policy: the one set with [`Subscription::overflow`], else
    /// [`Overflow::Block`].
    pub fn get_overflow(&self) -> Overflow {
        self.overflow.unwrap_or_default()
    }

    /// The overflow policy if this route set one; the runtime otherwise takes
    /// the service's default (`MQTT_QUEUE_OVERFLOW`).
    ///
    /// ```
    /// use tower_mqtt::{Overflow, Subscription};
    ///
    /// let fft = Subscription::new("audio/fft").overflow(Overflow::DropOldest);
    /// assert_eq!(fft.overflow_setting(), Some(Overflow::DropOldest));
    /// ```
    pub fn overflow_setting(&self) -> Option<Overflow> {
        self.overflow
    }

    /// Whether messages of one topic are handled in arrival order.
    pub fn is_ordered(&self) -> bool {
        self.ordered
    }
}

/// When a route's QoS 1/2 messages are acknowledged to the broker.
///
/// ```
/// use tower_mqtt::{Ack, Subscription};
///
/// assert_eq!(Subscription::new("tts/say").get_ack(), Ack::AfterHandling);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Ack {
    /// When the handler has finished (handled, failed or found a duplicate):
    /// a message whose handler never finished, because the process died, is
    /// delivered again by a persistent session. The default.
    #[default]
    AfterHandling,
    /// As soon as the message is queued, before the handler runs: for
    /// long-running handlers where a redelivery would only repeat work that
    /// is already lost. A crash loses the message.
    OnReceipt,
}

/// The order acknowledgements leave in (`MQTT_ACK_ORDER`).
///
/// MQTT 3.1.1 requires a client to send PUBACK and PUBREC packets in the
/// order the PUBLISH packets were received on the connection
/// [MQTT-4.6.0-2, -3]; MQTT 5 keeps the rule. [`AckOrder::Connection`], the
/// default, follows it. Handlers still run side by side; only the
/// acknowledgements wait their turn, so a slow handler holds back the
/// acknowledgements of what arrived after it (and the pending limit caps how
/// many wait). A route whose handler is long can acknowledge on receipt
/// instead ([`Ack::OnReceipt`]) and hold nothing back.
///
/// [`AckOrder::Topic`] lines acknowledgements up per topic: a slow topic then
/// holds back only its own. **This is outside the specification.** Of the
/// brokers tested, rumqttd (the embedded broker) closes the connection at the
/// first acknowledgement out of receive order ("out of order ack"); mosquitto
/// 2.0.11, aedes and the Eclipse Paho conformance broker let it pass. Choose
/// it only for a broker known to accept it.
///
/// ```
/// use tower_mqtt::AckOrder;
///
/// assert_eq!(AckOrder::default(), AckOrder::Connection);
/// assert_eq!("topic".parse::<AckOrder>().unwrap(), AckOrder::Topic);
/// // "global", the name of receive order in earlier releases, still parses.
/// assert_eq!("global".parse::<AckOrder>().unwrap(), AckOrder::Connection);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AckOrder {
    /// In receive order across the whole connection, as the specification
    /// requires (the default).
    #[default]
    Connection,
    /// In receive order within each topic: outside the specification, see
    /// the [type docs](AckOrder).
    Topic,
}

/// A string that names no [`AckOrder`].
///
/// ```
/// assert!("fifo".parse::<tower_mqtt::AckOrder>().is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown acknowledgement order {0:?}: expected connection or topic")]
pub struct UnknownAckOrder(pub String);

impl std::str::FromStr for AckOrder {
    type Err = UnknownAckOrder;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "connection" | "global" => Ok(Self::Connection),
            "topic" => Ok(Self::Topic),
            _ => Err(UnknownAckOrder(s.to_owned())),
        }
    }
}

/// Anything a route can be declared with: a filter string or a [`Subscription`].
pub trait IntoSubscription {
    /// Performs the conversion, panicking with a message that names an invalid
    /// filter.
    #[track_caller]
    fn into_subscription(self) -> Subscription;
}

impl IntoSubscription for Subscription {
    fn into_subscription(self) -> Subscription {
        self
    }
}

impl IntoSubscription for &str {
    #[track_caller]
    fn into_subscription(self) -> Subscription {
        Subscription::new(self)
    }
}

impl IntoSubscription for String {
    #[track_caller]
    fn into_subscription(self) -> Subscription {
        Subscription::new(&self)
    }
}

impl IntoSubscription for TopicFilter {
    fn into_subscription(self) -> Subscription {
        Subscription::from_filter(self)
    }
}
