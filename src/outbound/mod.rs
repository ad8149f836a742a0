//! Outbound middleware: the mirror of the inbound stack, from an envelope to
//! the broker.
//!
//! | layer | what it does |
//! |---|---|
//! | [`CorrelateLayer`] | a reply or stream chunk takes the id of the message being handled |
//! | [`EncodeLayer`] | envelope to JSON bytes (exactly five keys), stamping this service's source |
//! | [`SizeGuardLayer`] | a payload over the limit is an error before anything is sent |
//! | [`PublishRetryLayer`] | retryable failures sent again with backoff; dropped, logged and counted after the maximum |
//! | tower's `TimeoutLayer` | each attempt waits at most this long for the broker's confirmation |
//!
//! [`OutboundStack`] composes them in that order around a sink, usually the
//! runtime's [`Publisher`](crate::Publisher). Correlation comes first
//! because it needs the envelope; the size guard sits outside retry, since
//! another attempt cannot shrink a payload; the timeout sits inside retry, so
//! each attempt gets its own.
//!
//! ```
//! use bytes::Bytes;
//! use tower::{service_fn, ServiceExt};
//! use tower_mqtt::{BoxError, Envelope, Request};
//! use tower_mqtt::outbound::OutboundStack;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! // In a service the sink is `client.publisher()`.
//! let sink = service_fn(|req: Request<Bytes>| async move {
//!     println!("{} bytes to {}", req.body().len(), req.topic());
//!     Ok::<_, BoxError>(())
//! });
//! let outbound = OutboundStack::new("tts-worker").service(sink);
//! let status = Envelope::new("tts.status", serde_json::json!({"speaking": true})).unwrap();
//! outbound.oneshot(Request::builder("tts/status").body(status).unwrap()).await.unwrap();
//! # }
//! ```

pub mod correlate;
pub mod encode;
pub mod retry;
pub mod size_guard;

use std::time::Duration;

use tower::{retry::Retry, timeout::Timeout, Layer};

pub use self::{
    correlate::{Correlate, CorrelateLayer, Reply},
    encode::{Encode, EncodeLayer},
    retry::{is_retryable, PublishRetryLayer, PublishRetryPolicy, DEFAULT_PUBLISH_ATTEMPTS},
    size_guard::{packet_size, GuardFuture, SizeGuard, SizeGuardLayer, TooLarge},
};

/// The default limit for a publish attempt's confirmation.
pub const DEFAULT_PUBLISH_TIMEOUT: Duration = Duration::from_secs(30);
/// The default packet limit: 1 MiB, the runtime's default packet size.
pub const DEFAULT_MAX_PACKET: usize = 1 << 20;

/// The composed outbound service around a sink `S`.
pub type OutboundService<S> = Correlate<Encode<SizeGuard<Retry<PublishRetryPolicy, Timeout<S>>>>>;

/// Builds the outbound stack; see the [module docs](self).
#[derive(Clone, Debug)]
#[must_use]
pub struct OutboundStack {
    correlate: CorrelateLayer,
    encode: EncodeLayer,
    max_packet: usize,
    retry: PublishRetryLayer,
    timeout: Duration,
}

impl OutboundStack {
    /// The stack for service `source` with the defaults: correlate marked
    /// replies, a 1 MiB payload limit, [`DEFAULT_PUBLISH_ATTEMPTS`] attempts and
    /// a 30 s timeout per attempt.
    pub fn new(source: impl AsRef<str>) -> Self {
        Self {
            correlate: CorrelateLayer::new(),
            encode: EncodeLayer::new(source),
            max_packet: DEFAULT_MAX_PACKET,
            retry: PublishRetryLayer::default(),
            timeout: DEFAULT_PUBLISH_TIMEOUT,
        }
    }

    /// The stack for a configured service: its source name and packet size.
    ///
    /// ```
    /// use tower_mqtt::config::Config;
    /// use tower_mqtt::outbound::OutboundStack;
    ///
    /// let config = Config::new("mqtt://localhost").unwrap().with_source_name("llm-worker");
    /// let stack = OutboundStack::from_config(&config);
    /// # let _ = stack;
    /// ```
    pub fn from_config(config: &crate::config::Config) -> Self {
        Self::new(&config.source_name).max_packet_size(config.max_packet_size)
    }

    /// Correlates every publish made while a message is handled, not only
    /// those marked [`Reply`].
    pub fn correlate_always(mut self) -> Self {
        self.correlate = CorrelateLayer::always();
        self
    }

    /// Sets the packet limit in bytes (see [`packet_size`]).
    pub fn max_packet_size(mut self, bytes: usize) -> Self {
        self.max_packet = bytes;
        self
    }

    /// Sets the retry layer.
    pub fn retry(mut self, retry: PublishRetryLayer) -> Self {
        self.retry = retry;
        self
    }

    /// Sets the timeout of each attempt.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Publishes dropped after their last attempt, by every service this stack
    /// made.
    pub fn dropped(&self) -> u64 {
        self.retry.dropped()
    }

    /// Wraps `sink`.
    pub fn service<S>(&self, sink: S) -> OutboundService<S> {
        self.layer(sink)
    }
}

impl<S> Layer<S> for OutboundStack {
    type Service = OutboundService<S>;

    fn layer(&self, sink: S) -> Self::Service {
        let timed = Timeout::new(sink, self.timeout);
        let retried = self.retry.layer(timed);
        let guarded = SizeGuard::new(retried, self.max_packet);
        self.correlate.layer(self.encode.layer(guarded))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        correlation::{self, CorrelationId},
        BoxError, Envelope, Request,
    };
    use bytes::Bytes;
    use std::sync::{Arc, Mutex};
    use tower::{service_fn, ServiceExt};

    #[tokio::test]
    async fn composes_correlate_encode_and_guard() {
        let sent: Arc<Mutex<Vec<Bytes>>> = Arc::default();
        let log = sent.clone();
        let sink = service_fn(move |req: Request<Bytes>| {
            log.lock().unwrap().push(req.into_body());
            std::future::ready(Ok::<_, BoxError>(()))
        });
        let stack = OutboundStack::new("me").max_packet_size(200);
        let svc = stack.service(sink);

        let reply = Request::builder("memory/results")
            .extension(Reply)
            .body(Envelope::new("memory.results", serde_json::json!({"n": 1})).unwrap())
            .unwrap();
        correlation::scope(CorrelationId::new("q-1"), svc.clone().oneshot(reply))
            .await
            .unwrap();
        let wire = Envelope::from_slice(&sent.lock().unwrap()[0]).unwrap();
        assert_eq!((wire.id(), wire.source()), ("q-1", "me"));

        let big = Envelope::new("x.y", serde_json::json!({"blob": "x".repeat(500)})).unwrap();
        let err = svc
            .oneshot(Request::builder("x/y").body(big).unwrap())
            .await
            .unwrap_err();
        assert!(err.downcast_ref::<TooLarge>().is_some(), "{err}");
        assert_eq!(
            sent.lock().unwrap().len(),
            1,
            "nothing sent for the big one"
        );
    }
}
