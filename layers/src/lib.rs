//! Middleware for [tower-mqtt](tower_mqtt_core), both ways: the inbound
//! layers a message goes through on its way to a handler, and their outbound
//! mirrors a publish goes through on its way to the broker.
//!
//! Each middleware is an ordinary [`tower::Layer`], usable on its own, in any
//! `ServiceBuilder`, or around a single route with
//! [`Router::layer`](tower_mqtt_core::Router::layer). [`InboundStack`] and
//! [`OutboundStack`] compose them in the order the runtime expects, read
//! down each column (outermost first):
//!
//! | | inbound: a message, on its way to a handler | outbound: a publish, on its way to the broker |
//! |---|---|---|
//! | 1 | [`DecodeLayer`] ([`decode`]): bytes to an envelope; raw JSON objects typed from the [`EventRegistry`] | [`CorrelateLayer`](outbound::CorrelateLayer) ([`outbound::correlate`]): a reply or stream chunk takes the id of the message being handled, every publish its trace context, in an `mqtt.publish` span |
//! | 2 | [`DedupLayer`] ([`dedup`]): copies of handled envelopes end as `Outcome::Duplicate` (keyed like the fleet) | [`EncodeLayer`](outbound::EncodeLayer) ([`outbound::encode`]): the envelope to bytes, exactly the five keys, with this service's source |
//! | 3 | [`CorrelationSpanLayer`] ([`correlation_span`]): an `mqtt.message` span, the correlation id and the [trace context](trace_context) for everything below | [`SizeGuardLayer`](outbound::SizeGuardLayer) ([`outbound::size_guard`]): a packet over the limit fails before anything is sent |
//! | 4 | [`IsolationLayer`] ([`isolation`]): errors, panics and timeouts become `Outcome::Failed`, logged once, optionally [dead-lettered](dead_letter) | [`PublishRetryLayer`](outbound::PublishRetryLayer) ([`outbound::retry`]): retryable failures sent again; dropped, logged and counted after the last attempt |
//! | 5 | [`MessageRetryLayer`] ([`retry`]): retryable failures tried again | tower's timeout ([`outbound::confirm`]): each attempt's wait for the broker's confirmation bounded (30 s) |
//! | 6 | [`TimeoutLayer`] ([`timeout`]): each attempt bounded (30 s); timeouts are retryable | the sink: tower-mqtt's connection, resolving on PUBACK or PUBCOMP |
//! | 7 | your `Router` and its handlers | |
//!
//! Why each is where it is (the [`stack`] module has the reasons in full):
//! decode and the size guard are outermost in their column so that what can
//! never succeed fails once, unretried; dedup sits outside the retry, so a
//! redelivery during retries is a duplicate; the span (inbound) opens before
//! anything logs, and correlation (outbound) runs while the publish is still
//! an envelope; isolation sees only the last attempt's error; and in both
//! columns the timeout sits inside the retry, so each attempt has its own.
//! Both retries share one core: attempts, tower's exponential backoff with
//! jitter, and a retry budget.
//!
//! The [`trace_context`] module is what the two correlation layers share: the
//! W3C trace context a message arrives with, and its publishes leave with.
//!
//! Users depend on `tower-mqtt`, which re-exports this crate as
//! `tower_mqtt::layers` and builds both stacks from its configuration
//! (`Config::inbound_stack()`, `Config::outbound_stack()`).
//!
//! ```
//! use bytes::Bytes;
//! use tower::{service_fn, ServiceExt};
//! use tower_mqtt::layers::{InboundStack, OutboundStack};
//! use tower_mqtt::{BoxError, Envelope, Outcome, Request, Router};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let router = Router::new().route("stt/final", |req: Request<Envelope>| async move {
//!     println!("heard {}", req.body().data()["text"]);
//! });
//! let inbound = InboundStack::new().service(router);
//!
//! // A raw JSON object, as some services publish: wrapped as an `stt.final`.
//! let req = Request::builder("stt/final").body(Bytes::from_static(br#"{"text":"lights on"}"#)).unwrap();
//! assert!(matches!(inbound.oneshot(req).await.unwrap(), Outcome::Handled));
//!
//! // And the way out, here into a sink that prints what would be sent.
//! let sink = service_fn(|req: Request<Bytes>| async move {
//!     println!("{}", String::from_utf8_lossy(req.body()));
//!     Ok::<_, BoxError>(())
//! });
//! let outbound = OutboundStack::new("stt-worker").service(sink);
//! let heard = Envelope::new("stt.final", serde_json::json!({"text": "lights on"})).unwrap();
//! outbound.oneshot(Request::builder("stt/final").body(heard).unwrap()).await.unwrap();
//! # }
//! ```

pub mod batch;
pub mod correlation_span;
pub mod dead_letter;
pub mod decode;
pub mod dedup;
pub mod isolation;
pub mod outbound;
pub mod registry;
pub mod retry;
pub mod stack;
pub mod timeout;
pub mod trace_context;

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
pub use stack::{InboundService, InboundStack, OutboundService, OutboundStack};
pub use timeout::{Timeout, TimeoutLayer};
pub use trace_context::TraceContext;
