//! The recording double: [`Publisher::recording`], a publisher for tests
//! that runs the real outbound stack into a [`Recorded`] list instead of a
//! broker.

use std::{
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
};

use bytes::Bytes;
use tower::{Service, ServiceExt};
use tower_mqtt_layers::OutboundStack;

use super::{Outbound, Publisher, RawSink};
use crate::{
    envelope::Envelope,
    outcome::BoxError,
    properties::Properties,
    request::{QoS, Request},
    topic::TopicName,
};

impl Publisher {
    /// A publisher for tests: the outbound stack of service `source`, as a
    /// default configuration builds it, ending in a recorder instead of a
    /// broker. What it records is what would have gone on the wire.
    ///
    /// ```
    /// use tower_mqtt::Publisher;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), tower_mqtt::BoxError> {
    /// let (publisher, published) = Publisher::recording("tts-worker");
    /// publisher.publish("tts/status", serde_json::json!({"speaking": true})).await?;
    /// let sent = published.take();
    /// assert_eq!(sent[0].topic, "tts/status");
    /// assert_eq!(sent[0].envelope.data()["speaking"], true);
    /// # Ok(()) }
    /// ```
    pub fn recording(source: &str) -> (Self, Recorded) {
        let recorded = Recorded::default();
        let stack = OutboundStack::new(source).service(recorded.clone());
        let outbound = Outbound::new(stack.map_err(Into::into));
        let raw = RawSink::new(recorded.clone());
        (Self::new(outbound, raw, source, source), recorded)
    }
}

/// One publish a [`Publisher::recording`] recorded: the bytes that would
/// have gone on the wire, the envelope a receiver would decode from them, and
/// the MQTT 5 properties that would go with them.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), tower_mqtt::BoxError> {
/// let (publisher, published) = tower_mqtt::Publisher::recording("svc");
/// publisher.publish("a/b", serde_json::json!({})).user_property("tenant", "acme").await?;
/// let sent = published.take();
/// assert_eq!(sent[0].topic, "a/b");
/// assert_eq!(sent[0].properties.user_property("tenant"), Some("acme"));
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Published {
    /// The topic.
    pub topic: TopicName,
    /// The QoS.
    pub qos: QoS,
    /// Whether it was retained.
    pub retain: bool,
    /// The payload.
    pub payload: Bytes,
    /// The envelope, as a receiver would decode it (empty for a cleared
    /// retained message: see [`Published::is_envelope`]).
    pub envelope: Envelope,
    /// The MQTT 5 properties: what a connection over MQTT 5 sends with the
    /// publish, and one over MQTT 3.1.1 leaves out (empty when none were
    /// set).
    pub properties: Properties,
}

impl Published {
    /// Whether the payload was an envelope (not an empty retained clear).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), tower_mqtt::BoxError> {
    /// let (publisher, published) = tower_mqtt::Publisher::recording("svc");
    /// publisher.clear_retained("a/b").await?;
    /// assert!(!published.take()[0].is_envelope());
    /// # Ok(()) }
    /// ```
    pub fn is_envelope(&self) -> bool {
        !self.payload.is_empty()
    }
}

/// What a [`Publisher::recording`] published; cheap to clone.
///
/// ```
/// let (publisher, published) = tower_mqtt::Publisher::recording("svc");
/// assert!(published.take().is_empty());
/// # let _ = publisher;
/// ```
#[derive(Clone, Debug, Default)]
pub struct Recorded {
    published: Arc<Mutex<Vec<Published>>>,
}

impl Recorded {
    /// Takes everything recorded so far.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), tower_mqtt::BoxError> {
    /// let (publisher, published) = tower_mqtt::Publisher::recording("svc");
    /// publisher.publish("a/b", serde_json::json!({})).await?;
    /// assert_eq!(published.take().len(), 1);
    /// assert!(published.take().is_empty());
    /// # Ok(()) }
    /// ```
    pub fn take(&self) -> Vec<Published> {
        std::mem::take(&mut *self.lock())
    }

    /// A copy of everything recorded so far.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), tower_mqtt::BoxError> {
    /// let (publisher, published) = tower_mqtt::Publisher::recording("svc");
    /// publisher.publish("a/b", serde_json::json!({})).await?;
    /// assert_eq!(published.all().len(), 1);
    /// assert_eq!(published.all().len(), 1);
    /// # Ok(()) }
    /// ```
    pub fn all(&self) -> Vec<Published> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Published>> {
        self.published
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl Service<Request<Bytes>> for Recorded {
    type Response = ();
    type Error = BoxError;
    type Future = std::future::Ready<Result<(), BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        let envelope = if req.body().is_empty() {
            Ok(Envelope::from_map("", serde_json::Map::new()))
        } else {
            Envelope::from_slice(req.body())
        };
        let result = envelope
            .map(|envelope| {
                self.lock().push(Published {
                    topic: req.topic().clone(),
                    qos: req.qos(),
                    retain: req.retain(),
                    payload: req.body().clone(),
                    envelope,
                    properties: req.properties().clone(),
                });
            })
            .map_err(BoxError::from);
        std::future::ready(result)
    }
}
