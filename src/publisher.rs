//! Publishing: [`Publisher`], a cheap, clonable handle usable from any task.
//!
//! Every publish is confirmed before it resolves: QoS 1 by the broker's PUBACK,
//! QoS 2 by its PUBCOMP, QoS 0 once written to the connection. While the
//! connection is down, publishes wait in a bounded offline buffer
//! ([`Config::offline_buffer`](crate::config::Config::offline_buffer), each at
//! most [`Config::offline_max_age`](crate::config::Config::offline_max_age))
//! and go out, in order, once it is back. A publish that was written but not
//! yet acknowledged when the connection dropped is sent again after the
//! reconnect (at least once), or replayed by rumqttc when the broker resumes a
//! persistent session.
//!
//! Publishing never blocks the connection: the handle only ever *tries* to put a
//! request into rumqttc's channel and buffers when it is full. So a handler
//! that publishes cannot deadlock the runtime, however full the channel is.
//!
//! ```no_run
//! use tower_mqtt::{config::Config, Client, Envelope};
//!
//! # async fn run() -> Result<(), tower_mqtt::BoxError> {
//! let client = Client::new(Config::new("mqtt://localhost:1883")?)?;
//! let publisher = client.publisher();
//! let say = Envelope::new("tts.say", serde_json::json!({"text": "hello"}))?;
//! publisher.publish("tts/say", say).await?;
//! # Ok(()) }
//! ```

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use tokio::sync::oneshot;
use tower::Service;

use crate::{
    correlation,
    envelope::{Envelope, DEFAULT_SOURCE},
    request::{QoS, Request},
    runtime::{
        delivery::DeliveryError,
        outbox::{Outbox, Outgoing},
    },
    topic::TopicError,
};

/// Why a publish failed. Nothing is sent when the error is found before
/// sending (topic, size, a full offline buffer).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The topic is not a valid topic name.
    #[error(transparent)]
    Topic(#[from] TopicError),
    /// The packet would be larger than the configured maximum; nothing was sent.
    #[error("publish to {topic} is {size} bytes, over the maximum packet size of {max} bytes; nothing was sent")]
    TooLarge {
        /// The topic.
        topic: String,
        /// The encoded packet size.
        size: usize,
        /// The configured maximum.
        max: usize,
    },
    /// The broker did not confirm it.
    #[error(transparent)]
    Delivery(#[from] DeliveryError),
    /// The runtime is gone.
    #[error("the MQTT runtime has stopped")]
    Closed,
}

pub use crate::runtime::outbox::OfflineOverflow;

impl PublishError {
    /// Whether sending again might succeed (a lost session, a full offline
    /// buffer); size, topic and expiry errors will not go away.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Delivery(DeliveryError::SessionLost | DeliveryError::BufferFull { .. })
        )
    }
}

/// See the [module docs](self).
#[derive(Clone)]
pub struct Publisher {
    outbox: Arc<Outbox>,
    source: Arc<str>,
    max_packet_size: usize,
}

impl fmt::Debug for Publisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Publisher")
            .field("source", &self.source)
            .field("max_packet_size", &self.max_packet_size)
            .finish_non_exhaustive()
    }
}

/// Fixed header, remaining length, topic length and packet id, at most.
const PUBLISH_OVERHEAD: usize = 1 + 4 + 2 + 2;

impl Publisher {
    pub(crate) fn new(outbox: Arc<Outbox>, source: &str, max_packet_size: usize) -> Self {
        Self {
            outbox,
            source: source.into(),
            max_packet_size,
        }
    }

    /// The service name stamped as `source` on envelopes that kept the default.
    pub fn source_name(&self) -> &str {
        &self.source
    }

    /// Publishes `envelope` to `topic` at QoS 1 and waits for the broker's
    /// PUBACK. An envelope whose source is still the default gets this
    /// service's name.
    pub async fn publish(&self, topic: &str, envelope: Envelope) -> Result<(), PublishError> {
        let req = Request::builder(topic)
            .qos(QoS::AtLeastOnce)
            .body(envelope)?;
        self.send_envelope(req).await
    }

    /// Publishes a reply or stream chunk: `envelope` takes the id of the message
    /// being handled on this task ([`correlation::current`]), if there is one.
    pub async fn publish_correlated(
        &self,
        topic: &str,
        envelope: Envelope,
    ) -> Result<(), PublishError> {
        let envelope = match correlation::current() {
            Some(id) => envelope.with_id(id.as_str()),
            None => envelope,
        };
        self.publish(topic, envelope).await
    }

    /// Publishes an envelope with the request's topic, QoS and retain flag.
    pub async fn send_envelope(&self, req: Request<Envelope>) -> Result<(), PublishError> {
        let req = req.map(|envelope| {
            let envelope = if envelope.source() == DEFAULT_SOURCE {
                envelope.with_source(&*self.source)
            } else {
                envelope
            };
            envelope.to_bytes()
        });
        self.send(req).await
    }

    /// Publishes raw bytes with the request's topic, QoS and retain flag. An
    /// empty payload with `retain` clears the topic's retained message.
    pub async fn send(&self, req: Request<Bytes>) -> Result<(), PublishError> {
        self.start(&req)?.await
    }

    /// Checks the publish and hands it to the outbox; the future resolves on
    /// the broker's confirmation.
    fn start(
        &self,
        req: &Request<Bytes>,
    ) -> Result<impl Future<Output = Result<(), PublishError>> + Send + 'static, PublishError> {
        let topic = req.topic().as_str();
        let size = PUBLISH_OVERHEAD + topic.len() + req.body().len();
        if size > self.max_packet_size {
            return Err(PublishError::TooLarge {
                topic: topic.to_owned(),
                size,
                max: self.max_packet_size,
            });
        }
        let (tx, rx) = oneshot::channel();
        let message = Outgoing {
            topic: topic.to_owned(),
            qos: crate::runtime::wire::to_wire(req.qos()),
            retain: req.retain(),
            payload: req.body().clone(),
        };
        self.outbox.send(message, Some(tx))?;
        Ok(async move {
            match rx.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(err)) => Err(err.into()),
                Err(_) => Err(PublishError::Closed),
            }
        })
    }
}

/// The future of a [`Publisher`] call.
pub type PublishFuture = Pin<Box<dyn Future<Output = Result<(), PublishError>> + Send>>;

impl Service<Request<Bytes>> for Publisher {
    type Response = ();
    type Error = PublishError;
    type Future = PublishFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        match self.start(&req) {
            Ok(fut) => Box::pin(fut),
            Err(err) => Box::pin(std::future::ready(Err(err))),
        }
    }
}

impl Service<Request<Envelope>> for Publisher {
    type Response = ();
    type Error = PublishError;
    type Future = PublishFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Envelope>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { this.send_envelope(req).await })
    }
}
