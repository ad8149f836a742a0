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
    /// Lose nothing at QoS 1 and 2: past the capacity, messages still queue,
    /// and since each is acknowledged only after handling, the broker's
    /// in-flight window (mosquitto's `max_inflight_messages`, 20 by default)
    /// stops it sending more. The backlog stays at the broker; the connection
    /// and its keepalive are never held up. QoS 0 has no such window: past the
    /// capacity a QoS 0 message is dropped, as with [`Overflow::DropNew`].
    #[default]
    Block,
    /// Discard the oldest queued message to make room: the freshest data wins
    /// (audio levels, camera frames).
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
    capacity: usize,
    overflow: Overflow,
    ordered: bool,
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
            capacity: DEFAULT_QUEUE_CAPACITY,
            overflow: Overflow::Block,
            ordered: true,
        }
    }

    /// Sets the QoS to subscribe with (the broker delivers at most this QoS).
    pub fn qos(mut self, qos: QoS) -> Self {
        self.qos = qos;
        self
    }

    /// Sets how many messages may wait for this route (at least 1).
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity.max(1);
        self
    }

    /// Sets what happens when the queue is full.
    pub fn overflow(mut self, overflow: Overflow) -> Self {
        self.overflow = overflow;
        self
    }

    /// Lets messages of one topic run concurrently (up to the global in-flight
    /// limit) instead of one after another.
    pub fn unordered(mut self) -> Self {
        self.ordered = false;
        self
    }

    /// The topic filter.
    pub fn filter(&self) -> &TopicFilter {
        &self.filter
    }

    /// The QoS to subscribe with.
    pub fn get_qos(&self) -> QoS {
        self.qos
    }

    /// The queue capacity.
    pub fn get_capacity(&self) -> usize {
        self.capacity
    }

    /// The overflow policy.
    pub fn get_overflow(&self) -> Overflow {
        self.overflow
    }

    /// Whether messages of one topic are handled in arrival order.
    pub fn is_ordered(&self) -> bool {
        self.ordered
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
