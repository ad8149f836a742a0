//! Why a publish failed: [`PublishError`], and [`DeliveryError`] when the
//! broker did not confirm it.
//!
//! They live beside the outbound layers because the layers decide with them
//! (the size guard fails with [`PublishError::TooLarge`], the retry asks
//! [`PublishError::is_retryable`]), and the runtime's sink, at the end of the
//! stack, fails with them too. The outbound stack's services have `BoxError`
//! as their error; downcast it to look inside.
//!
//! ```
//! use tower_mqtt::{layers::outbound::{DeliveryError, PublishError}, BoxError};
//!
//! let err: BoxError = PublishError::Delivery(DeliveryError::SessionLost).into();
//! let publish = err.downcast_ref::<PublishError>().unwrap();
//! assert!(publish.is_retryable());
//! assert!(matches!(publish, PublishError::Delivery(DeliveryError::SessionLost)));
//! ```

use std::time::Duration;

use tower_mqtt_core::TopicError;

/// Why a publish failed. Nothing is sent when the error is found before
/// sending (topic, size, a full offline buffer).
///
/// ```
/// use tower_mqtt::layers::outbound::PublishError;
///
/// let err = PublishError::TooLarge { topic: "a/b".into(), size: 2048, max: 1024 };
/// assert!(!err.is_retryable(), "another attempt cannot shrink it");
/// assert!(err.to_string().ends_with("nothing was sent"));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The topic is not a valid topic name.
    #[error(transparent)]
    Topic(#[from] TopicError),
    /// The packet would be larger than the packet limit; nothing was sent.
    #[error(
        "publish to {topic} carries {size} bytes, over the limit of {max} bytes; nothing was sent"
    )]
    TooLarge {
        /// The topic.
        topic: String,
        /// The size of the packet, as
        /// [`packet_size`](crate::outbound::size_guard::packet_size) counts it.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The broker did not confirm it.
    #[error(transparent)]
    Delivery(#[from] DeliveryError),
    /// The runtime is gone.
    #[error("the MQTT runtime has stopped")]
    Closed,
}

impl PublishError {
    /// Whether sending again might succeed (a lost session, a full offline
    /// buffer); size, topic and expiry errors will not go away.
    ///
    /// ```
    /// use tower_mqtt::layers::outbound::{DeliveryError, PublishError};
    ///
    /// assert!(PublishError::from(DeliveryError::BufferFull { limit: 10 }).is_retryable());
    /// assert!(!PublishError::Closed.is_retryable());
    /// ```
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Delivery(DeliveryError::SessionLost | DeliveryError::BufferFull { .. })
        )
    }
}

/// Why a publish was not confirmed.
///
/// ```
/// use std::time::Duration;
/// use tower_mqtt::layers::outbound::DeliveryError;
///
/// let err = DeliveryError::Expired { max_age: Duration::from_secs(60) };
/// assert_eq!(err.to_string(), "waited longer than 60s for the connection; nothing was sent");
/// ```
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DeliveryError {
    /// The connection dropped and the broker started a clean session: the
    /// publish may or may not have reached it, and rumqttc will not resend it.
    #[error("the connection was lost before the broker confirmed the publish, and the session did not survive")]
    SessionLost,
    /// The runtime stopped before the publish was confirmed.
    #[error("the MQTT runtime stopped before the publish was confirmed")]
    Closed,
    /// Disconnected, and the offline buffer already holds its limit.
    #[error("disconnected and the offline buffer is full ({limit} publishes); nothing was sent")]
    BufferFull {
        /// The buffer's limit.
        limit: usize,
    },
    /// Evicted from a full offline buffer by a newer publish.
    #[error("evicted from the full offline buffer by a newer publish; nothing was sent")]
    Evicted,
    /// Waited longer than the offline limit while disconnected.
    #[error("waited longer than {max_age:?} for the connection; nothing was sent")]
    Expired {
        /// The limit.
        max_age: Duration,
    },
    /// The broker refused it (MQTT 5: PUBACK or PUBREC with a reason code of
    /// 0x80 or above, such as not authorized or quota exceeded).
    ///
    /// ```
    /// use tower_mqtt::layers::outbound::DeliveryError;
    ///
    /// let err = DeliveryError::Refused { code: 0x87, reason: "not authorized".into() };
    /// assert_eq!(err.to_string(), "the broker refused the publish: not authorized (reason code 0x87)");
    /// ```
    #[error("the broker refused the publish: {reason} (reason code {code:#04x})")]
    Refused {
        /// The reason code.
        code: u8,
        /// The reason code in words, and the broker's reason string if it gave one.
        reason: String,
    },
    /// Larger than the broker accepts (the Maximum Packet Size of its MQTT 5
    /// CONNACK); nothing was sent.
    #[error(
        "the packet of {size} bytes is over the broker's maximum of {max} bytes; nothing was sent"
    )]
    TooLargeForBroker {
        /// The size of the packet.
        size: usize,
        /// The broker's limit.
        max: usize,
    },
}
