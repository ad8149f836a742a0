//! Dropping messages already handled: [`Dedup`].
//!
//! MQTT at QoS 1 delivers at least once: after a reconnect the broker resends
//! what it had not seen acknowledged, a retained message comes again with every
//! subscription, and overlapping subscriptions can bring two copies. [`Dedup`]
//! remembers each envelope it let through, for a time-to-live (default 30 s) and
//! up to a number of entries (default 2048, the oldest evicted first),
//! and answers a copy with [`Outcome::Duplicate`](tower_mqtt_core::Outcome::Duplicate) without calling the inner
//! service.
//!
//! # The key
//!
//! An envelope is identified the way the fleet does it ([`DedupKey`]):
//! `type|id|seq=N` when `data.seq` is an integer, else `type|id|<hash>` with a
//! hash of `data` in canonical form (keys sorted at every level, whatever order
//! they arrived in). Keying on the id alone would drop every stream chunk after
//! the first, since the chunks of one stream share their id. The store holds a
//! 128-bit keyed hash of those parts rather than their text: a fixed-size key,
//! built without allocating.
//!
//! Requests marked [`RawPayload`](crate::decode::RawPayload) (plain JSON objects wrapped by
//! [`Decode`](crate::decode::Decode)) are never duplicates: their id was made up
//! on arrival, so two copies cannot be told apart from two messages.
//!
//! # Beyond the window
//!
//! A request the runtime marked [`HandledBefore`](tower_mqtt_core::HandledBefore)
//! repeats a message handled and acknowledged on an earlier connection, whose
//! acknowledgement was lost with that connection; a broker may deliver it again
//! long after the window forgot it (mosquitto 2.0.11 queued such redeliveries
//! behind thousands of newer messages). An envelope so marked is a duplicate
//! whatever the window remembers; a raw payload still is not.
//!
//! # Concurrent copies and failures
//!
//! The key is claimed atomically before the inner service is called, so of two
//! copies arriving together exactly one reaches the handler; the other is a
//! duplicate at once, even while the first is still running.
//!
//! If handling **fails** (the inner service answers [`Outcome::Failed`](tower_mqtt_core::Outcome::Failed) or an
//! error, or its future is dropped before it finishes), the claim is released:
//! a redelivery of the message is handled again instead of being dropped as a
//! duplicate of a message that was never handled. A copy that arrived while the
//! failed attempt was still running was already answered as a duplicate; that is
//! the price of never running one message twice at once. Put retries *inside*
//! `Dedup`, so the claim is released only when the last attempt has failed.
//!
//! ```
//! use tower::{service_fn, BoxError, Layer, ServiceExt};
//! use tower_mqtt::{Envelope, Outcome, Request};
//! use tower_mqtt::layers::dedup::DedupLayer;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let handler = service_fn(|_: Request<Envelope>| async { Ok::<_, BoxError>(Outcome::Handled) });
//! let svc = DedupLayer::new().layer(handler);
//!
//! let chunk = |seq: i64| {
//!     let env = Envelope::new("llm.stream", serde_json::json!({"seq": seq}))
//!         .unwrap()
//!         .with_id("3f1c9b1e8a2d4c6f9e0b7a5d4c3b2a19");
//!     Request::builder("llm/stream").body(env).unwrap()
//! };
//! assert!(matches!(svc.clone().oneshot(chunk(0)).await.unwrap(), Outcome::Handled));
//! assert!(matches!(svc.clone().oneshot(chunk(1)).await.unwrap(), Outcome::Handled));
//! assert!(matches!(svc.oneshot(chunk(0)).await.unwrap(), Outcome::Duplicate));
//! # }
//! ```
//!
//! The time-to-live is measured with [`tokio::time::Instant`], so it follows a
//! paused test clock. Expired entries are dropped as new ones arrive, without
//! a scan; at most `max_entries` are held, whatever the rate.
//!
//! # Turning it off
//!
//! A time-to-live of zero turns dedup off, as the fleet's `MQTT_DEDUPE_TTL=0`
//! does: [`DedupLayer::with_limits`] with [`Duration::ZERO`], or
//! [`DedupLayer::disabled`], makes a layer that lets every message through and
//! keeps no cache.
//!
//! # Layout
//!
//! The key is built in `key.rs`, the store of claimed keys (two generations
//! of hash tables, and why not a general cache) lives in `store.rs`, and the
//! middleware in `service.rs`; this module re-exports what users name.

use std::time::Duration;

mod key;
mod service;
mod store;

#[cfg(test)]
mod tests;

pub use self::{
    key::DedupKey,
    service::{Dedup, DedupLayer, ResponseFuture},
};

/// How long a handled message is remembered by default: 30 s.
pub const DEFAULT_TTL: Duration = Duration::from_secs(30);

/// How many handled messages are remembered at most by default: 2048.
pub const DEFAULT_MAX_ENTRIES: u64 = 2048;
