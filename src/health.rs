//! The fleet's health and heartbeat messages.
//!
//! Health is retained state at QoS 1 on `system/health/<service>`: an envelope
//! of type `system.health.<service>` whose data is
//! `{message_id, ok, event, err, timestamp}`. The runtime publishes
//! `ok=true, event="ready"` on every connect, `ok=false, event="shutdown"` on a
//! clean shutdown, and registers `ok=false, event="offline"` as the Last Will,
//! which the broker publishes if the connection drops without a DISCONNECT.
//!
//! The heartbeat is a QoS 0 JSON object `{"ok":true,"event":"hb","ts":...}` on
//! `system/keepalive/<client id>`.
//!
//! ```
//! use tower_mqtt::health::{self, Health};
//!
//! let ready = Health::ready();
//! let env = ready.envelope("stt-worker");
//! assert_eq!(env.event_type(), "system.health.stt-worker");
//! assert_eq!(env.data()["ok"], true);
//! assert_eq!(health::health_topic("stt-worker"), "system/health/stt-worker");
//! ```

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::envelope::{self, Envelope};

/// The topic health is published on for `service`.
pub fn health_topic(service: &str) -> String {
    format!("system/health/{service}")
}

/// The topic heartbeats are published on for `client_id`.
///
/// ```
/// assert_eq!(tower_mqtt::health::heartbeat_topic("stt-1"), "system/keepalive/stt-1");
/// ```
pub fn heartbeat_topic(client_id: &str) -> String {
    format!("system/keepalive/{client_id}")
}

/// One heartbeat payload, stamped now.
///
/// ```
/// let hb: serde_json::Value = serde_json::from_slice(&tower_mqtt::health::heartbeat_payload()).unwrap();
/// assert_eq!(hb["event"], "hb");
/// ```
pub fn heartbeat_payload() -> Vec<u8> {
    serde_json::to_vec(&json!({"ok": true, "event": "hb", "ts": envelope::now()}))
        .unwrap_or_default()
}

/// The `data` of a health envelope.
///
/// ```
/// use tower_mqtt::health::Health;
///
/// let down = Health::error("database unreachable");
/// assert!(!down.ok);
/// assert_eq!(down.err.as_deref(), Some("database unreachable"));
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Health {
    /// A fresh id for this report.
    pub message_id: String,
    /// Whether the service works.
    pub ok: bool,
    /// What happened: `ready`, `shutdown`, `offline`, `error`, ...
    pub event: String,
    /// The error, when there is one.
    pub err: Option<String>,
    /// When, in epoch seconds.
    pub timestamp: f64,
}

impl Health {
    /// A report of `event` with `ok` and an optional error.
    pub fn new(ok: bool, event: impl Into<String>, err: Option<String>) -> Self {
        Self {
            message_id: envelope::new_id(),
            ok,
            event: event.into(),
            err,
            timestamp: envelope::now(),
        }
    }

    /// `ok=true, event="ready"`: published on connect.
    pub fn ready() -> Self {
        Self::new(true, "ready", None)
    }

    /// `ok=false, event="shutdown"`: published on a clean shutdown.
    pub fn shutdown() -> Self {
        Self::new(false, "shutdown", None)
    }

    /// `ok=false, event="offline"`: the Last Will.
    pub fn offline() -> Self {
        Self::new(false, "offline", Some("connection lost".to_owned()))
    }

    /// `ok=false, event="error"` with the error text.
    pub fn error(err: impl Into<String>) -> Self {
        Self::new(false, "error", Some(err.into()))
    }

    /// The envelope for `service`: type `system.health.<service>`, source
    /// `service`.
    pub fn envelope(&self, service: &str) -> Envelope {
        Envelope::new(format!("system.health.{service}"), self)
            .unwrap_or_else(|_| {
                Envelope::from_map(format!("system.health.{service}"), serde_json::Map::new())
            })
            .with_source(service)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_data_has_the_fleet_keys() {
        let env = Health::shutdown().envelope("llm");
        let mut keys: Vec<&str> = env.data().keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["err", "event", "message_id", "ok", "timestamp"]);
        assert_eq!(env.data()["event"], "shutdown");
        assert_eq!(env.source(), "llm");
    }
}
