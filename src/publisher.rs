//! Publishing: [`Publisher`], a cheap, clonable handle usable from any task
//! and from handlers, where it is an extractor.
//!
//! There is one way out: every publish goes through the outbound stack
//! ([`OutboundStack`]: the reply's id, the
//! service's source, the packet size check, retry with backoff, the wait for
//! the confirmation) to the connection. What the stack does is configured
//! once, from the [`Config`](crate::config::Config)
//! ([`Config::outbound_stack`](crate::config::Config::outbound_stack)).
//!
//! A publish resolves when it is confirmed: QoS 1 by the broker's PUBACK, QoS 2
//! by its PUBCOMP, QoS 0 once written. While the connection is down it waits in
//! a bounded offline buffer ([`Config::offline_buffer`](crate::config::Config::offline_buffer))
//! and goes out, in order, once it is back. Publishing never blocks the
//! connection, so a handler that publishes cannot deadlock the runtime.
//!
//! ```
//! use serde_json::json;
//! use tower_mqtt::{Envelope, Publisher, QoS, Request};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), tower_mqtt::BoxError> {
//! // In a service: `running.publisher()`, or a handler argument. In a test:
//! let (publisher, published) = Publisher::recording("memory-worker");
//!
//! // Type `memory.results` (from the topic), QoS 1, not retained:
//! publisher.publish("memory/results", json!({"k": 0})).await?;
//! // QoS 0, retained:
//! publisher.publish("system/character/current", json!({"mood": "dry"}))
//!     .qos(QoS::AtMostOnce)
//!     .retain(true)
//!     .await?;
//! // A reply: the request's id.
//! let query = Request::builder("memory/query")
//!     .body(Envelope::new("memory.query", json!({"text": "cats"}))?)?;
//! publisher.publish("memory/results", json!({"results": []})).reply_to(&query).await?;
//!
//! let sent = published.take();
//! assert_eq!(sent[0].envelope.event_type(), "memory.results");
//! assert_eq!(sent[0].envelope.source(), "memory-worker");
//! assert!(sent[1].retain);
//! assert_eq!(sent[2].envelope.id(), query.body().id());
//! # Ok(()) }
//! ```

use std::{
    fmt,
    future::{Future, IntoFuture},
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
};

use bytes::Bytes;
use serde::Serialize;
use serde_json::Value;
use tower::{util::BoxCloneSyncService, Layer, Service, ServiceExt};

use crate::{
    envelope::Envelope,
    extract::FromMessageParts,
    health::{self, Health},
    outcome::{BoxError, HandlerError},
    request::{QoS, Request},
    topic::TopicName,
};
/// The errors of a publish, from the outbound layers and the connection alike.
pub use tower_mqtt_layers::outbound::{DeliveryError, PublishError};
use tower_mqtt_layers::OutboundStack;

/// What a full offline buffer does with one more publish.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum OfflineOverflow {
    /// Reject the new publish with [`DeliveryError::BufferFull`].
    #[default]
    Reject,
    /// Evict the oldest buffered publish ([`DeliveryError::Evicted`]).
    DropOldest,
}

/// The outbound stack, type-erased: what
/// [`Client::publish_layer`](crate::Client::publish_layer) wraps.
pub type Outbound = BoxCloneSyncService<Request<Envelope>, (), BoxError>;
/// The sink under it, for what is not an envelope (clearing retained state).
pub(crate) type RawSink = BoxCloneSyncService<Request<Bytes>, (), BoxError>;

/// Publishes through the outbound stack; see the [module docs](self).
///
/// Cheap to clone, `Send + Sync`. In a handler, take it as an argument:
///
/// ```
/// use tower_mqtt::{handler::HandlerResult, Data, Envelope, Publisher, Request};
///
/// #[derive(serde::Deserialize)]
/// struct Query { text: String }
///
/// async fn query(publisher: Publisher, Data(q): Data<Query>, req: Request<Envelope>) -> HandlerResult {
///     let results = serde_json::json!({"query": q.text, "results": [], "k": 0});
///     publisher.publish("memory/results", results).reply_to(&req).await
/// }
/// ```
#[derive(Clone)]
pub struct Publisher {
    outbound: Outbound,
    raw: RawSink,
    source: Arc<str>,
    health_name: Arc<str>,
}

impl fmt::Debug for Publisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Publisher")
            .field("source", &self.source)
            .field("health_name", &self.health_name)
            .finish_non_exhaustive()
    }
}

impl Publisher {
    /// A publisher that sends through `outbound` for service `source`.
    pub(crate) fn new(outbound: Outbound, raw: RawSink, source: &str, health_name: &str) -> Self {
        Self {
            outbound,
            raw,
            source: source.into(),
            health_name: health_name.into(),
        }
    }

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

    /// Wraps the outbound stack in `layer` (outermost).
    pub(crate) fn layered<L>(self, layer: L) -> Self
    where
        L: Layer<Outbound>,
        L::Service: Service<Request<Envelope>, Response = ()> + Clone + Send + Sync + 'static,
        <L::Service as Service<Request<Envelope>>>::Error: Into<BoxError>,
        <L::Service as Service<Request<Envelope>>>::Future: Send + 'static,
    {
        let service = layer.layer(self.outbound);
        Self {
            outbound: Outbound::new(service.map_err(Into::into)),
            ..self
        }
    }

    /// The service name stamped as `source` on what is published.
    pub fn source_name(&self) -> &str {
        &self.source
    }

    /// Publishes `data` (an object) to `topic`; await the returned [`Publish`]
    /// after setting what differs from the defaults: QoS 1, not retained, a
    /// new id, and the event type named after the topic (`memory/results` is
    /// `memory.results`, as the fleet's event registry has it).
    ///
    /// A value that serializes to a whole envelope (all five keys, an
    /// [`Envelope`] for one) is sent as that envelope.
    pub fn publish(&self, topic: impl Into<String>, data: impl Serialize) -> Publish {
        Publish {
            publisher: self.clone(),
            topic: topic.into(),
            body: serde_json::to_value(data).map_err(BoxError::from),
            event_type: None,
            qos: QoS::AtLeastOnce,
            retain: false,
            reply_to: None,
        }
    }

    /// Publishes a request of an envelope as it is (topic, QoS, retain from
    /// the request).
    pub async fn send(&self, req: Request<Envelope>) -> Result<(), BoxError> {
        self.outbound.clone().oneshot(req).await
    }

    /// Clears the retained message of `topic` (an empty retained publish,
    /// the one thing that is not an envelope).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), tower_mqtt::BoxError> {
    /// let (publisher, published) = tower_mqtt::Publisher::recording("svc");
    /// publisher.clear_retained("system/character/current").await?;
    /// let sent = published.take();
    /// assert!(sent[0].retain && sent[0].payload.is_empty());
    /// # Ok(()) }
    /// ```
    pub async fn clear_retained(&self, topic: &str) -> Result<(), BoxError> {
        let req = Request::builder(topic)
            .qos(QoS::AtLeastOnce)
            .retain(true)
            .body(Bytes::new())?;
        self.raw.clone().oneshot(req).await
    }

    /// Publishes this service's health, retained at QoS 1 on
    /// `system/health/<health name>`: `Health::error("store unavailable")`
    /// reports a failure.
    ///
    /// ```
    /// use tower_mqtt::{health::Health, Publisher};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), tower_mqtt::BoxError> {
    /// let (publisher, published) = Publisher::recording("memory-worker");
    /// publisher.report_health(Health::error("store unavailable")).await?;
    /// let sent = published.take();
    /// assert_eq!(sent[0].topic, "system/health/memory-worker");
    /// assert_eq!(sent[0].envelope.data()["ok"], false);
    /// assert_eq!(sent[0].envelope.source(), "memory-worker");
    /// assert!(sent[0].retain);
    /// # Ok(()) }
    /// ```
    pub async fn report_health(&self, health: Health) -> Result<(), BoxError> {
        let req = Request::builder(health::health_topic(&self.health_name))
            .qos(QoS::AtLeastOnce)
            .retain(true)
            .body(
                health
                    .envelope(&self.health_name)
                    .with_source(&*self.source),
            )?;
        self.send(req).await
    }
}

impl Service<Request<Envelope>> for Publisher {
    type Response = ();
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.outbound.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Envelope>) -> Self::Future {
        self.outbound.call(req)
    }
}

/// A handler can take the [`Publisher`] of the client serving it.
impl<S> FromMessageParts<S> for Publisher {
    fn from_message_parts(req: &Request<Envelope>, _state: &S) -> Result<Self, HandlerError> {
        req.extensions().get::<Publisher>().cloned().ok_or_else(|| {
            HandlerError::permanent(
                "no Publisher for this message: the runtime adds one; in a test, add one \
                 with Request::builder(..).extension(publisher)",
            )
        })
    }
}

/// A publish being prepared; await it to send. Built by
/// [`Publisher::publish`].
#[must_use = "a publish does nothing until it is awaited"]
pub struct Publish {
    publisher: Publisher,
    topic: String,
    body: Result<Value, BoxError>,
    event_type: Option<String>,
    qos: QoS,
    retain: bool,
    reply_to: Option<String>,
}

impl fmt::Debug for Publish {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Publish")
            .field("topic", &self.topic)
            .field("qos", &self.qos)
            .field("retain", &self.retain)
            .finish_non_exhaustive()
    }
}

impl Publish {
    /// Sets the QoS (default 1).
    pub fn qos(mut self, qos: QoS) -> Self {
        self.qos = qos;
        self
    }

    /// Sets whether the broker keeps it as the topic's retained message.
    pub fn retain(mut self, retain: bool) -> Self {
        self.retain = retain;
        self
    }

    /// Makes it the reply to `request`: it takes the request's id, as the
    /// fleet correlates replies and stream chunks.
    pub fn reply_to(mut self, request: &Request<Envelope>) -> Self {
        self.reply_to = Some(request.body().id().to_owned());
        self
    }

    /// Sets the event type (default: the topic with `/` as `.`).
    pub fn event_type(mut self, event_type: impl Into<String>) -> Self {
        self.event_type = Some(event_type.into());
        self
    }

    fn request(self) -> Result<(Publisher, Request<Envelope>), BoxError> {
        let body = self.body?;
        let envelope = if is_whole_envelope(&body) {
            serde_json::from_value::<Envelope>(body)?
        } else {
            let event_type = self
                .event_type
                .unwrap_or_else(|| self.topic.replace('/', "."));
            Envelope::new(event_type, body)?
        };
        let envelope = match self.reply_to {
            Some(id) => envelope.with_id(id),
            None => envelope,
        };
        let req = Request::builder(self.topic)
            .qos(self.qos)
            .retain(self.retain)
            .body(envelope)?;
        Ok((self.publisher, req))
    }
}

/// An object of exactly the envelope's five keys is meant as one, as the
/// decoder reads it.
fn is_whole_envelope(value: &Value) -> bool {
    value.as_object().is_some_and(|object| {
        object.len() == 5
            && ["id", "type", "ts", "source", "data"]
                .iter()
                .all(|key| object.contains_key(*key))
    })
}

impl IntoFuture for Publish {
    type Output = Result<(), BoxError>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let (publisher, req) = self.request()?;
            publisher.send(req).await
        })
    }
}

/// One publish a [`Publisher::recording`] recorded: the bytes that would
/// have gone on the wire, and the envelope a receiver would decode from them.
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
}

impl Published {
    /// Whether the payload was an envelope (not an empty retained clear).
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
    pub fn take(&self) -> Vec<Published> {
        std::mem::take(&mut *self.lock())
    }

    /// A copy of everything recorded so far.
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
                });
            })
            .map_err(BoxError::from);
        std::future::ready(result)
    }
}
