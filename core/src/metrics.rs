//! The metrics a service records, through the [`metrics`](https://docs.rs/metrics)
//! facade: install any recorder (Prometheus, OpenTelemetry, `StatsD`, ...)
//! *before* serving, and every message, publish and connection shows up in it.
//! Without a recorder, every metric is a no-op.
//!
//! Names follow OpenTelemetry's messaging semantic conventions where one
//! exists (`messaging.client.consumed.messages`, `messaging.process.duration`,
//! `messaging.client.sent.messages`, `messaging.client.operation.duration`),
//! and the same style elsewhere. Every metric carries
//! `messaging.system="mqtt"`. Inbound metrics carry the route as
//! [`ROUTE`] (`messaging.destination.template`): the route's *filter*
//! (`sensors/+/temp`), never the concrete topic, so a service has one series
//! per route however many topics it sees; messages no route took (rejected
//! before routing, or joined to a copy still held) are under `(none)`, and
//! those for the fallback under `(fallback)`.
//!
//! The counters agree with `tower_mqtt::runtime::Stats`: each is
//! incremented at the same point as its `Stats` field.
//!
//! ```
//! use tower_mqtt::metrics;
//!
//! assert_eq!(metrics::CONSUMED_MESSAGES, "messaging.client.consumed.messages");
//! assert_eq!(metrics::ROUTE, "messaging.destination.template");
//! ```
//!
//! `docs/OBSERVABILITY.md` lists every metric with its labels and meaning,
//! and alert rules; `examples/metrics.rs` serves them to Prometheus.

/// Label of every metric: `mqtt`.
pub const SYSTEM: &str = "messaging.system";
/// Label of inbound metrics: the route's filter.
pub const ROUTE: &str = "messaging.destination.template";
/// Label of failures: `decode`, `timeout`, `panic`, `handler` or `service`.
pub const ERROR_TYPE: &str = "error.type";
/// Label of drops and decode failures: why.
pub const REASON: &str = "reason";

/// Counter: messages received from the broker (`Stats::received`).
pub const CONSUMED_MESSAGES: &str = "messaging.client.consumed.messages";
/// Counter: messages handled (`Stats::handled`).
pub const HANDLED_MESSAGES: &str = "messaging.client.handled.messages";
/// Counter: messages that failed, by [`ERROR_TYPE`] (`Stats::failed`); each
/// was acknowledged.
pub const FAILED_MESSAGES: &str = "messaging.client.failed.messages";
/// Counter: copies recognised by the dedup layer (`Stats::duplicates`).
pub const DUPLICATE_MESSAGES: &str = "messaging.client.duplicate.messages";
/// Counter: redeliveries joined to a copy still held from an earlier
/// connection (`Stats::redelivered`).
pub const REDELIVERED_MESSAGES: &str = "messaging.client.redelivered.messages";
/// Counter: messages no route handled and no fallback took (`Stats::unrouted`).
pub const UNROUTED_MESSAGES: &str = "messaging.client.unrouted.messages";
/// Counter: messages dropped, by [`REASON`]: `drop_oldest`, `drop_new`,
/// `over_limit` (QoS 0 past the pending limit), `oversized`, `invalid_topic`.
pub const DROPPED_MESSAGES: &str = "messaging.client.dropped.messages";
/// Counter: messages that could not be decoded, by [`REASON`]: `empty`,
/// `not_utf8`, `not_json`, `not_an_object`, `invalid_envelope`
/// (`Stats::decode_failures`); each also counts as failed.
pub const DECODE_FAILURES: &str = "messaging.client.decode.failures";
/// Histogram, seconds: how long the inbound stack and the handlers took per
/// message.
pub const PROCESS_DURATION: &str = "messaging.process.duration";
/// Counter: QoS 1/2 messages read past the pending limit and withheld until
/// the next connection (`Stats::withheld`).
pub const WITHHELD_MESSAGES: &str = "messaging.client.withheld.messages";
/// Counter: QoS 1/2 messages kept past the pending limit, with a clean
/// session (`Stats::kept_over_limit`).
pub const KEPT_OVER_LIMIT: &str = "messaging.client.kept_over_limit.messages";
/// Gauge: messages held now: queued, running, or waiting for their
/// acknowledgement's turn (`Stats::pending`).
pub const PENDING_MESSAGES: &str = "messaging.client.pending.messages";
/// Gauge: payload bytes of queued and running messages (`Stats::pending_bytes`).
pub const PENDING_BYTES: &str = "messaging.client.pending.bytes";

/// Gauge: 1 while connected, else 0.
pub const CONNECTED: &str = "messaging.client.connected";
/// Counter: connections made (`Stats::connections`).
pub const CONNECTIONS: &str = "messaging.client.connections";
/// Counter: connections and attempts that failed, by [`REASON`]: `refused`
/// (CONNACK) or `lost` (`Stats::connection_failures`).
pub const CONNECTION_FAILURES: &str = "messaging.client.connection.failures";
/// Counter: deliberate reconnects that took withheld messages back
/// (`Stats::recoveries`).
pub const RECOVERIES: &str = "messaging.client.recoveries";
/// Counter: subscriptions the broker refused (`Stats::subscriptions_refused`).
pub const SUBSCRIPTIONS_REFUSED: &str = "messaging.client.subscriptions.refused";
/// Counter: publishes the broker refused with an MQTT 5 reason code
/// (`Stats::publishes_refused`).
pub const PUBLISHES_REFUSED: &str = "messaging.client.publishes.refused";

/// Label of the publish duration: the operation, `publish`.
pub const OPERATION: &str = "messaging.operation.name";
/// Label of outbound metrics: the QoS, `0`, `1` or `2`.
pub const QOS: &str = "mqtt.qos";

/// Counter: publishes handed to the connection, by [`QOS`]; a retried
/// publish counts once per attempt.
pub const SENT_MESSAGES: &str = "messaging.client.sent.messages";
/// Counter: publishes the broker confirmed (PUBACK, PUBCOMP; QoS 0 once
/// written), by [`QOS`].
pub const CONFIRMED_MESSAGES: &str = "messaging.client.confirmed.messages";
/// Histogram, seconds: from handing a publish to the connection to its
/// confirmation, with [`OPERATION`] `publish` and [`QOS`].
pub const OPERATION_DURATION: &str = "messaging.client.operation.duration";
/// Counter: publish attempts retried after a retryable failure.
pub const PUBLISH_RETRIES: &str = "messaging.client.publish.retries";
/// Counter: publishes given up on, by [`REASON`]: `attempts` (the last
/// attempt failed) or `budget` (the retry budget was spent).
pub const PUBLISH_DROPPED: &str = "messaging.client.publish.dropped";
/// Counter: publishes refused before sending because the packet would be
/// over `MQTT_MAX_PACKET_SIZE`.
pub const PUBLISH_TOO_LARGE: &str = "messaging.client.publish.too_large";
/// Gauge: publishes waiting in the offline buffer for a connection.
pub const OFFLINE_MESSAGES: &str = "messaging.client.offline.messages";
/// Counter: publishes the offline buffer gave up on, by [`REASON`]:
/// `rejected` (full, with `reject`), `evicted` (full, with `drop_oldest`) or
/// `expired` (older than `MQTT_OFFLINE_MAX_AGE`).
pub const OFFLINE_DROPPED: &str = "messaging.client.offline.dropped";
