//! Publishing: [`Publisher`], a cheap, clonable handle usable from any task
//! and from handlers, where it is an extractor.
//!
//! There is one way out: every publish goes through the outbound stack
//! ([`OutboundStack`](crate::layers::OutboundStack): the reply's id, the
//! service's source, the packet size check, retry with backoff, the wait for
//! the confirmation) to the connection. What the stack does is configured
//! once, from the [`Config`](crate::config::Config)
//! ([`Config::outbound_stack`](crate::config::Config::outbound_stack)).
//!
//! Two ways in, one for each thing a caller has:
//!
//! - the *data* of an event: [`Publisher::publish`]`(topic, data)` wraps it in
//!   a new envelope (a fresh id, the type named after the topic, this
//!   service's source); the returned [`Publish`] sets QoS, retain, a reply's
//!   id, the type or MQTT 5 properties (user properties, content type, ...;
//!   not sent over MQTT 3.1.1) before it is awaited. `data` is always the
//!   envelope's `data`, whatever its keys.
//! - a whole *envelope*, built or received: [`Publisher::send`] a
//!   [`Request<Envelope>`](Request) whose topic, QoS and retain flag say where
//!   and how, and whose envelope goes out as it is (only the source is
//!   stamped if it kept the default).
//!
//! A publish resolves when it is confirmed: QoS 1 by the broker's PUBACK, QoS 2
//! by its PUBCOMP, QoS 0 once written. While the connection is down it waits in
//! a bounded offline buffer ([`Config::offline_buffer`](crate::config::Config::offline_buffer))
//! and goes out, in order, once it is back. Publishing never blocks the
//! connection, so a handler that publishes cannot deadlock the runtime. Why a
//! publish failed is a [`PublishError`] inside the `BoxError`.
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
//! // A whole envelope, as it is:
//! let forwarded = Request::builder("memory/archive").body(query.body().clone())?;
//! publisher.send(forwarded).await?;
//!
//! let sent = published.take();
//! assert_eq!(sent[0].envelope.event_type(), "memory.results");
//! assert_eq!(sent[0].envelope.source(), "memory-worker");
//! assert!(sent[1].retain);
//! assert_eq!(sent[2].envelope.id(), query.body().id());
//! assert_eq!(sent[3].envelope.data()["text"], "cats");
//! # Ok(()) }
//! ```

mod publish;
mod recording;

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use serde::Serialize;
use tower::{util::BoxCloneSyncService, Layer, Service, ServiceExt};

pub use self::{
    publish::Publish,
    recording::{Published, Recorded},
};
/// The errors of a publish, from the outbound layers and the connection alike.
pub use tower_mqtt_layers::outbound::{DeliveryError, PublishError};

use crate::{
    envelope::Envelope,
    extract::FromMessageParts,
    health::{self, Health},
    outcome::{BoxError, HandlerError},
    request::{QoS, Request},
};

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
pub struct Publisher {
    shared: Arc<Shared>,
    /// The outbound stack this handle drives as a tower [`Service`]: cloned
    /// from `shared` when it is first driven so, and kept, so that cloning a
    /// publisher (the runtime hands one to every message) is one reference
    /// count, not a clone of the whole stack.
    ready: Option<Outbound>,
}

/// What every clone of a [`Publisher`] shares.
struct Shared {
    outbound: Outbound,
    raw: RawSink,
    source: Arc<str>,
    health_name: Arc<str>,
}

impl Clone for Publisher {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
            ready: None,
        }
    }
}

impl fmt::Debug for Publisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Publisher")
            .field("source", &self.shared.source)
            .field("health_name", &self.shared.health_name)
            .finish_non_exhaustive()
    }
}

impl Publisher {
    /// A publisher that sends through `outbound` for service `source`.
    pub(crate) fn new(outbound: Outbound, raw: RawSink, source: &str, health_name: &str) -> Self {
        Self {
            shared: Arc::new(Shared {
                outbound,
                raw,
                source: source.into(),
                health_name: health_name.into(),
            }),
            ready: None,
        }
    }

    /// Wraps the outbound stack in `layer` (outermost).
    pub(crate) fn layered<L>(self, layer: L) -> Self
    where
        L: Layer<Outbound>,
        L::Service: Service<Request<Envelope>, Response = ()> + Clone + Send + Sync + 'static,
        <L::Service as Service<Request<Envelope>>>::Error: Into<BoxError>,
        <L::Service as Service<Request<Envelope>>>::Future: Send + 'static,
    {
        let shared = &self.shared;
        let service = layer.layer(shared.outbound.clone());
        Self {
            shared: Arc::new(Shared {
                outbound: Outbound::new(service.map_err(Into::into)),
                raw: shared.raw.clone(),
                source: shared.source.clone(),
                health_name: shared.health_name.clone(),
            }),
            ready: None,
        }
    }

    /// The service name stamped as `source` on what is published.
    ///
    /// ```
    /// let (publisher, _) = tower_mqtt::Publisher::recording("tts-worker");
    /// assert_eq!(publisher.source_name(), "tts-worker");
    /// ```
    pub fn source_name(&self) -> &str {
        &self.shared.source
    }

    /// Publishes `data` to `topic` as the `data` of a new envelope; await the
    /// returned [`Publish`] after setting what differs from the defaults: QoS
    /// 1, not retained, a new id, and the event type named after the topic
    /// (`memory/results` is `memory.results`, as the fleet's event registry
    /// has it).
    ///
    /// `data` must serialize to a JSON object, and it is always the
    /// envelope's `data`, even when it has the envelope's own keys. To send an
    /// envelope as it is, use [`send`](Self::send).
    ///
    /// ```
    /// use serde_json::json;
    /// use tower_mqtt::Publisher;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), tower_mqtt::BoxError> {
    /// let (publisher, published) = Publisher::recording("wake-worker");
    /// // Data that happens to look like an envelope is still data.
    /// let data = json!({"id": "x", "type": "y", "ts": 0.0, "source": "z", "data": {}});
    /// publisher.publish("wake/event", &data).await?;
    /// let sent = published.take();
    /// assert_eq!(sent[0].envelope.event_type(), "wake.event");
    /// assert_eq!(sent[0].envelope.data()["type"], "y");
    /// # Ok(()) }
    /// ```
    pub fn publish(&self, topic: impl Into<String>, data: impl Serialize) -> Publish {
        Publish::new(
            self.clone(),
            topic.into(),
            serde_json::to_value(data).map_err(BoxError::from),
        )
    }

    /// Publishes a whole envelope as it is, to the request's topic with its
    /// QoS and retain flag: the way to forward an envelope, or to send one
    /// built with [`Envelope::new`] or [`Envelope::reply_to`]. Like every
    /// publish it goes through the outbound stack, which stamps this service's
    /// source on an envelope that kept the default one, and correlates it if
    /// the request is marked [`Reply`](crate::layers::outbound::Reply).
    ///
    /// ```
    /// use tower_mqtt::{Envelope, Publisher, QoS, Request};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), tower_mqtt::BoxError> {
    /// let (publisher, published) = Publisher::recording("llm-worker");
    /// let request = Envelope::new("llm.request", serde_json::json!({"text": "hi"}))?;
    /// let chunk = Envelope::reply_to(&request, "llm.stream", serde_json::json!({"seq": 0, "delta": "He"}))?;
    /// publisher.send(Request::builder("llm/stream").qos(QoS::AtMostOnce).body(chunk)?).await?;
    /// let sent = published.take();
    /// assert_eq!(sent[0].envelope.id(), request.id());
    /// assert_eq!(sent[0].qos, QoS::AtMostOnce);
    /// # Ok(()) }
    /// ```
    pub async fn send(&self, req: Request<Envelope>) -> Result<(), BoxError> {
        self.shared.outbound.clone().oneshot(req).await
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
        self.shared.raw.clone().oneshot(req).await
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
        let Shared {
            source,
            health_name,
            ..
        } = &*self.shared;
        let req = Request::builder(health::health_topic(health_name))
            .qos(QoS::AtLeastOnce)
            .retain(true)
            .body(health.envelope(health_name).with_source(&**source))?;
        self.send(req).await
    }
}

impl Service<Request<Envelope>> for Publisher {
    type Response = ();
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        let shared = &self.shared;
        self.ready
            .get_or_insert_with(|| shared.outbound.clone())
            .poll_ready(cx)
    }

    fn call(&mut self, req: Request<Envelope>) -> Self::Future {
        let shared = &self.shared;
        self.ready
            .get_or_insert_with(|| shared.outbound.clone())
            .call(req)
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

#[cfg(test)]
mod tests {
    use tower::{Service, ServiceExt};

    use super::Publisher;
    use crate::{envelope::Envelope, request::Request};

    fn request(event_type: &str) -> Request<Envelope> {
        Request::builder("svc/out")
            .body(Envelope::new(event_type, serde_json::json!({})).unwrap())
            .unwrap()
    }

    #[tokio::test]
    async fn clones_share_the_stack_and_each_drives_it_as_a_service() {
        let (mut publisher, recorded) = Publisher::recording("svc");
        let mut clone = publisher.clone();
        publisher
            .ready()
            .await
            .unwrap()
            .call(request("a"))
            .await
            .unwrap();
        clone
            .ready()
            .await
            .unwrap()
            .call(request("b"))
            .await
            .unwrap();
        // Readiness is per call: a second call polls it again.
        publisher
            .ready()
            .await
            .unwrap()
            .call(request("c"))
            .await
            .unwrap();
        let sent = recorded.take();
        let types: Vec<_> = sent.iter().map(|p| p.envelope.event_type()).collect();
        assert_eq!(types, ["a", "b", "c"]);
        assert!(sent.iter().all(|p| p.envelope.source() == "svc"));
        assert_eq!(clone.source_name(), "svc");
    }

    #[tokio::test]
    async fn a_call_without_poll_ready_goes_to_the_stack() {
        let (mut publisher, recorded) = Publisher::recording("svc");
        publisher.call(request("a")).await.unwrap();
        assert_eq!(recorded.take().len(), 1);
    }
}
