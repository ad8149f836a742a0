//! Waiting for the broker's confirmation, bounded: tower's [`Timeout`]. The
//! outbound mirror of [`timeout`](crate::timeout).
//!
//! The sink at the end of the outbound stack resolves a publish when it is
//! confirmed: QoS 1 by the broker's PUBACK, QoS 2 by its PUBCOMP, QoS 0 once
//! written; while the connection is down, after the publish has waited in the
//! offline buffer. This bounds that wait, [`DEFAULT_TIMEOUT`] (30 s) for each
//! attempt by default. An attempt that times out fails with tower's
//! [`Elapsed`], which the publish [`retry`](crate::outbound::retry) takes as
//! retryable.
//!
//! It sits inside the retry in the [outbound stack](crate::OutboundStack), so
//! each attempt waits its own time, as the inbound timeout sits inside the
//! message retry. A timed-out publish may still reach the broker: publishing
//! is at least once.
//!
//! ```
//! use bytes::Bytes;
//! use tower::{service_fn, Layer, ServiceExt};
//! use tower_mqtt::{layers::outbound::{confirm::{TimeoutLayer, DEFAULT_TIMEOUT}, is_retryable}, BoxError, Request};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
//! // A broker that never confirms.
//! let silent = service_fn(|_: Request<Bytes>| std::future::pending::<Result<(), BoxError>>());
//! let svc = TimeoutLayer::new(DEFAULT_TIMEOUT).layer(silent);
//! let err = svc.oneshot(Request::builder("a/b").body(Bytes::new()).unwrap()).await.unwrap_err();
//! assert!(is_retryable(&err));
//! # }
//! ```

use std::time::Duration;

pub use tower::timeout::{error::Elapsed, Timeout, TimeoutLayer};

/// The wait for a confirmation unless configured otherwise: 30 s per attempt.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
