//! The two stacks a configured service runs, built in one place: what
//! arrives goes through [`Config::inbound_stack`], what is published through
//! its mirror, [`Config::outbound_stack`].

use tower_mqtt_layers::{outbound::PublishRetryLayer, retry, InboundStack, OutboundStack};

use super::{Config, Protocol};

impl Config {
    /// The inbound stack as this configuration asks for it: dedup TTL and size
    /// from `MQTT_DEDUPE_TTL` and `MQTT_DEDUPE_MAX_ENTRIES`, the handler
    /// timeout from `MQTT_HANDLER_TIMEOUT`, and the fleet's event registry for
    /// raw payloads. With the defaults it is [`InboundStack::new()`].
    ///
    /// [`serve`](crate::serve) runs it in front of the router, unless
    /// [`Serve::inbound_stack`](crate::Serve::inbound_stack) replaces it.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_mqtt::config::Config;
    ///
    /// let config = Config::new("mqtt://localhost:1883")?.with_handler_timeout(Duration::from_secs(120));
    /// let stack = config.inbound_stack();
    /// # let _ = stack;
    /// # Ok::<(), tower_mqtt::config::ConfigError>(())
    /// ```
    pub fn inbound_stack(&self) -> InboundStack {
        InboundStack::new()
            .dedup_ttl(self.dedupe_ttl)
            .dedup_max_entries(self.dedupe_max_entries)
            .timeout(self.handler_timeout)
    }

    /// The outbound stack as this configuration asks for it: this service's
    /// source name (`MQTT_SOURCE_NAME`), the packet limit
    /// (`MQTT_MAX_PACKET_SIZE`), and the publish retries
    /// (`MQTT_PUBLISH_RETRIES`, `MQTT_PUBLISH_RETRY_BACKOFF`); on MQTT 3.1.1
    /// publishes do not carry their trace context (no properties are sent).
    /// With the defaults it is [`OutboundStack::new(source_name)`](OutboundStack::new)
    /// with [`carry_trace_context(false)`](OutboundStack::carry_trace_context).
    ///
    /// Every [`Publisher`](crate::Publisher) of a client publishes through it.
    ///
    /// ```
    /// use tower_mqtt::config::Config;
    ///
    /// let config = Config::new("mqtt://localhost:1883")?.with_source_name("llm-worker");
    /// let stack = config.outbound_stack();
    /// assert_eq!(stack.dropped(), 0);
    /// # Ok::<(), tower_mqtt::config::ConfigError>(())
    /// ```
    pub fn outbound_stack(&self) -> OutboundStack {
        let first = self.publish_retry_backoff;
        let retry = PublishRetryLayer::new(self.publish_attempts)
            .backoff(first, first.max(retry::DEFAULT_MAX_BACKOFF));
        OutboundStack::new(&self.source_name)
            .max_packet_size(self.max_packet_size)
            .retry(retry)
            // MQTT 3.1.1 sends no properties: the trace context is only logged.
            .carry_trace_context(self.protocol == Protocol::V5)
    }
}
