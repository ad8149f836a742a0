//! Outbound middleware, the mirror of the inbound: from an envelope a service
//! publishes to the connection.
//!
//! | layer | module | what it does | inbound mirror |
//! |---|---|---|---|
//! | [`CorrelateLayer`] | [`correlate`] | a reply or stream chunk takes the id of the message being handled; every publish carries its [trace context](crate::trace_context), in an `mqtt.publish` span | [`correlation_span`](crate::correlation_span) |
//! | [`EncodeLayer`] | [`encode`] | envelope to JSON bytes (exactly the five keys), stamped with this service's source | [`decode`](crate::decode) |
//! | [`SizeGuardLayer`] | [`size_guard`] | a packet over the limit is a [`PublishError::TooLarge`] before anything is sent | — |
//! | [`PublishRetryLayer`] | [`retry`] | retryable failures sent again with backoff, within a budget; dropped, logged and counted after that | [`retry`](crate::retry) |
//! | tower's [`TimeoutLayer`](confirm::TimeoutLayer) | [`confirm`] | each attempt waits at most this long for the broker's confirmation | [`timeout`](crate::timeout) |
//!
//! [`OutboundStack`](crate::OutboundStack) composes them in that order
//! around a sink (in a service, the runtime's connection; in a test, a
//! recorder); the [`stack`](crate::stack) module shows both stacks side by
//! side, and why each is in its order. The errors a publish fails with are
//! in [`error`], for the layers here and the sink alike.
//!
//! ```
//! use bytes::Bytes;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_mqtt::{layers::outbound::{CorrelateLayer, EncodeLayer, SizeGuardLayer}, BoxError, Envelope, Request};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let sink = service_fn(|req: Request<Bytes>| async move {
//!     println!("{} bytes to {}", req.body().len(), req.topic());
//!     Ok::<_, BoxError>(())
//! });
//! // One layer at a time, as the outbound stack composes them.
//! let outbound = ServiceBuilder::new()
//!     .layer(CorrelateLayer::new())
//!     .layer(EncodeLayer::new("tts-worker"))
//!     .layer(SizeGuardLayer::new(64 * 1024))
//!     .service(sink);
//! let status = Envelope::new("tts.status", serde_json::json!({"speaking": true})).unwrap();
//! outbound.oneshot(Request::builder("tts/status").body(status).unwrap()).await.unwrap();
//! # }
//! ```

pub mod confirm;
pub mod correlate;
pub mod encode;
pub mod error;
pub mod retry;
pub mod size_guard;

pub use self::{
    correlate::{Correlate, CorrelateLayer, Reply},
    encode::{Encode, EncodeLayer},
    error::{DeliveryError, PublishError},
    retry::{is_retryable, PublishRetry, PublishRetryLayer, PublishRetryPolicy},
    size_guard::{packet_size, SizeGuard, SizeGuardLayer},
};
