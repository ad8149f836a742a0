//! What happens to publishes while the connection is down.

/// What a full offline buffer does with one more publish
/// (`MQTT_OFFLINE_OVERFLOW`, [`Config::offline_overflow`](super::Config::offline_overflow)).
///
/// ```
/// use tower_mqtt::config::{Config, OfflineOverflow};
///
/// let mut config = Config::new("mqtt://localhost")?;
/// assert_eq!(config.offline_overflow, OfflineOverflow::Reject);
/// // Telemetry: the newest reading matters more than the oldest.
/// config.offline_overflow = OfflineOverflow::DropOldest;
/// # Ok::<(), tower_mqtt::config::ConfigError>(())
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum OfflineOverflow {
    /// Reject the new publish with
    /// [`DeliveryError::BufferFull`](crate::publisher::DeliveryError::BufferFull).
    #[default]
    Reject,
    /// Evict the oldest buffered publish
    /// ([`DeliveryError::Evicted`](crate::publisher::DeliveryError::Evicted)).
    DropOldest,
}
