//! Bounding the time a message may take: tower's [`Timeout`].
//!
//! The handler timeout is tower's own middleware, re-exported here with the
//! fleet's default, [`DEFAULT_TIMEOUT`] (30 s). A timed-out attempt fails with
//! tower's [`Elapsed`] error (`request timed out`), which
//! [`Isolation`](crate::isolation::Isolation) turns into an
//! [`Outcome::Failed`](tower_mqtt_core::Outcome::Failed); [`is_timeout`] recognises it.
//!
//! **Timeouts are retryable.** A handler usually times out because something it
//! waits for is slow or away for a moment, which is what a retry with backoff is
//! for; a handler that hangs on one particular message is stopped by the
//! attempt limit. The timeout sits inside the retry, so each attempt gets the
//! full time: with 3 attempts a message can hold its topic's queue for about
//! three timeouts plus the backoffs, so choose the attempts with the timeout in
//! mind (or, for a topic where a slow message must not be repeated, give the
//! route a retry of one attempt).
//!
//! ```
//! use std::time::Duration;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_mqtt::{Envelope, Outcome, Request};
//! use tower_mqtt::layers::{isolation::IsolationLayer, timeout::{is_timeout, TimeoutLayer, DEFAULT_TIMEOUT}};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
//! let svc = ServiceBuilder::new()
//!     .layer(IsolationLayer::new())
//!     .layer(TimeoutLayer::new(DEFAULT_TIMEOUT))
//!     .service(service_fn(|_: Request<Envelope>| async {
//!         std::future::pending::<Result<Outcome, std::convert::Infallible>>().await
//!     }));
//! let req = Request::builder("a").body(Envelope::new("t", serde_json::json!({})).unwrap()).unwrap();
//! let outcome = svc.oneshot(req).await.unwrap();
//! assert!(is_timeout(outcome.error().unwrap()));
//! # }
//! ```

use std::time::Duration;

pub use tower::timeout::{error::Elapsed, Timeout, TimeoutLayer};
use tower_mqtt_core::HandlerError;

/// The handler timeout unless configured otherwise: 30 s.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether `error` is a timeout of tower's [`Timeout`].
///
/// ```
/// use tower_mqtt::HandlerError;
/// use tower_mqtt::layers::timeout::{is_timeout, Elapsed};
///
/// assert!(is_timeout(&HandlerError::new(Elapsed::new())));
/// assert!(!is_timeout(&HandlerError::new("db down")));
/// ```
pub fn is_timeout(error: &HandlerError) -> bool {
    error.get_ref().is::<Elapsed>()
}
