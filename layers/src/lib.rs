//! Inbound middleware for [tower-mqtt](tower_mqtt_core): decode, dedup,
//! correlation spans, error isolation, retry and timeout.
//!
//! Each middleware is an ordinary [`tower::Layer`], usable on its own, in any
//! `ServiceBuilder`, or around a single route with
//! [`Router::layer`](tower_mqtt_core::Router::layer). [`InboundStack`] composes
//! them in the order the runtime expects:
//!
//! | layer | module | what it does |
//! |---|---|---|
//! | [`DecodeLayer`] | [`decode`] | `Request<Bytes>` to `Request<Envelope>`; raw JSON objects wrapped with a type from the [`EventRegistry`]; typed, permanent decode errors |
//! | [`DedupLayer`] | [`dedup`] | copies of handled envelopes answered with `Outcome::Duplicate` (TTL cache keyed like the fleet) |
//! | [`CorrelationSpanLayer`] | [`correlation_span`] | a `mqtt.message` span per message; the correlation id in the extensions and in `correlation::current()` |
//! | [`IsolationLayer`] | [`isolation`] | errors, panics and timeouts become `Outcome::Failed`, logged once; a failed message goes to a [`dead_letter`] hook (a topic, a closure, or nothing) |
//! | [`MessageRetryLayer`] | [`retry`] | tower's `Retry` with exponential backoff, jitter and a retry budget, for retryable failures |
//! | [`TimeoutLayer`] | [`timeout`] | tower's timeout, 30 s by default; timeouts are retryable |
//!
//! Outgoing publishes have a mirrored stack in `tower_mqtt::outbound`, beside
//! the `Publisher` it wraps.
//!
//! ```
//! use bytes::Bytes;
//! use tower::ServiceExt;
//! use tower_mqtt::{Envelope, Outcome, Request, Router};
//! use tower_mqtt::layers::InboundStack;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let router = Router::new().route("stt/final", |req: Request<Envelope>| async move {
//!     println!("heard {}", req.body().data()["text"]);
//! });
//! let svc = InboundStack::new().service(router);
//!
//! // A raw JSON object, as some services publish: wrapped as an `stt.final`.
//! let req = Request::builder("stt/final").body(Bytes::from_static(br#"{"text":"lights on"}"#)).unwrap();
//! assert!(matches!(svc.oneshot(req).await.unwrap(), Outcome::Handled));
//! # }
//! ```

pub mod batch;
pub mod correlation_span;
pub mod dead_letter;
pub mod decode;
pub mod dedup;
pub mod isolation;
pub mod registry;
pub mod retry;
pub mod stack;
pub mod timeout;

#[cfg(test)]
mod test_util;

pub use batch::{Batch, BatchLayer, Batching};
pub use correlation_span::{CorrelationSpan, CorrelationSpanLayer};
pub use dead_letter::{DeadLetter, DeadLetterPolicy, NoDeadLetters};
pub use decode::{Decode, DecodeError, DecodeLayer, RawPayload};
pub use dedup::{Dedup, DedupKey, DedupLayer};
pub use isolation::{Isolation, IsolationLayer};
pub use registry::EventRegistry;
pub use retry::{MessageRetry, MessageRetryLayer, MessageRetryPolicy};
pub use stack::{InboundService, InboundStack};
pub use timeout::{Timeout, TimeoutLayer};
