//! The message a service receives: [`Request`], and the delivery levels, [`QoS`].
//!
//! A request is the topic and flags of a PUBLISH packet around a body: raw
//! [`Bytes`] as it comes off the wire, an [`Envelope`](crate::Envelope) once
//! decoded. Two things every handled message has are fields of their own,
//! cheap to copy: the values of the route's wildcards
//! ([`Request::topic_params`], left by the router) and the correlation id
//! ([`Request::correlation_id`], left by the correlation layer). Anything else
//! a layer leaves for the next goes into typed [`Extensions`], as in
//! `http::Request`.
//!
//! ```
//! use bytes::Bytes;
//! use tower_mqtt::{QoS, Request};
//!
//! let req = Request::builder("llm/request")
//!     .qos(QoS::AtLeastOnce)
//!     .body(Bytes::from_static(br#"{"prompt":"hi"}"#))
//!     .unwrap();
//! assert_eq!(req.topic(), "llm/request");
//! assert_eq!(req.qos(), QoS::AtLeastOnce);
//!
//! // Changing the body keeps the topic, flags, parameters, correlation id and
//! // extensions.
//! let req = req.map(|bytes| bytes.len());
//! assert_eq!(*req.body(), 15);
//! ```

use std::{fmt, sync::Arc};

use bytes::Bytes;
pub use http::Extensions;

use crate::{
    correlation::CorrelationId,
    properties::{self, Properties},
    topic::{TopicError, TopicName, TopicParams},
};

/// Marks a delivery that repeats a message this client handled and
/// acknowledged on an earlier connection: the same packet id, topic and
/// payload, delivered again because the acknowledgement was lost when that
/// connection broke. The runtime puts it into the request's extensions; the
/// dedup layer answers such an envelope as a duplicate however long ago it
/// was handled. A raw payload (not an envelope) still runs: the fleet never
/// treats those as duplicates.
///
/// ```
/// use bytes::Bytes;
/// use tower_mqtt::{HandledBefore, Request};
///
/// let req = Request::builder("tts/say")
///     .extension(HandledBefore)
///     .body(Bytes::from_static(b"{}"))
///     .unwrap();
/// assert!(req.extensions().get::<HandledBefore>().is_some());
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HandledBefore;

/// MQTT quality of service: how hard the broker and client try to deliver.
///
/// ```
/// use tower_mqtt::QoS;
///
/// assert_eq!(QoS::try_from(1).unwrap(), QoS::AtLeastOnce);
/// assert_eq!(u8::from(QoS::ExactlyOnce), 2);
/// assert!(QoS::AtMostOnce < QoS::AtLeastOnce);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum QoS {
    /// QoS 0: fire and forget. Streams, partials, telemetry.
    AtMostOnce,
    /// QoS 1: delivered at least once, acknowledged by PUBACK. Commands and
    /// responses; the default.
    #[default]
    AtLeastOnce,
    /// QoS 2: delivered exactly once, by a four-packet handshake.
    ExactlyOnce,
}

/// A QoS number other than 0, 1 or 2.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid QoS {0}: expected 0, 1 or 2")]
pub struct InvalidQoS(pub u8);

impl TryFrom<u8> for QoS {
    type Error = InvalidQoS;
    fn try_from(value: u8) -> Result<Self, Self::Error> {
        match value {
            0 => Ok(Self::AtMostOnce),
            1 => Ok(Self::AtLeastOnce),
            2 => Ok(Self::ExactlyOnce),
            other => Err(InvalidQoS(other)),
        }
    }
}

impl From<QoS> for u8 {
    fn from(qos: QoS) -> Self {
        match qos {
            QoS::AtMostOnce => 0,
            QoS::AtLeastOnce => 1,
            QoS::ExactlyOnce => 2,
        }
    }
}

/// An incoming message: the topic and flags of a PUBLISH around a body `T`.
///
/// `T` is [`Bytes`] off the wire and [`Envelope`](crate::Envelope) after
/// decoding. Cloning is cheap when `T` is: the topic, the
/// [topic parameters](Self::topic_params) and the
/// [correlation id](Self::correlation_id) are shared, and the extensions,
/// which are cloned entry by entry, are empty unless a layer or the runtime
/// put something there.
#[derive(Clone)]
pub struct Request<T> {
    topic: TopicName,
    qos: QoS,
    retain: bool,
    dup: bool,
    topic_params: Option<TopicParams>,
    correlation_id: Option<CorrelationId>,
    properties: Option<Arc<Properties>>,
    extensions: Extensions,
    body: T,
}

impl<T> Request<T> {
    /// A request on `topic` with QoS 1, no flags and no extensions.
    ///
    /// ```
    /// use tower_mqtt::{Request, TopicName};
    ///
    /// let req = Request::new(TopicName::new("tts/say").unwrap(), "hello");
    /// assert_eq!(req.topic(), "tts/say");
    /// ```
    pub fn new(topic: TopicName, body: T) -> Self {
        Self {
            topic,
            qos: QoS::default(),
            retain: false,
            dup: false,
            topic_params: None,
            correlation_id: None,
            properties: None,
            extensions: Extensions::new(),
            body,
        }
    }

    /// The topic the message was published to.
    pub fn topic(&self) -> &TopicName {
        &self.topic
    }

    /// The QoS the message was delivered with.
    pub fn qos(&self) -> QoS {
        self.qos
    }

    /// Whether the broker delivered this as retained state (sent because of a new
    /// subscription rather than a new publish).
    pub fn retain(&self) -> bool {
        self.retain
    }

    /// Whether the DUP flag was set: the sender may have sent this packet before.
    pub fn dup(&self) -> bool {
        self.dup
    }

    /// The body.
    pub fn body(&self) -> &T {
        &self.body
    }

    /// The body, mutably.
    pub fn body_mut(&mut self) -> &mut T {
        &mut self.body
    }

    /// Consumes the request and returns its body.
    pub fn into_body(self) -> T {
        self.body
    }

    /// The values the topic gave to the wildcards of the route's filter, set
    /// by the [`Router`](crate::Router) before it calls the route; `None`
    /// before routing. Handlers take them with the [`TopicParams`],
    /// [`Wildcard`](crate::extract::Wildcard) and
    /// [`Wildcards`](crate::extract::Wildcards) extractors.
    ///
    /// ```
    /// use tower::ServiceExt;
    /// use tower_mqtt::{Envelope, Request, Router};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let router = Router::new().route("camera/+/frame", |req: Request<Envelope>| async move {
    ///     assert_eq!(req.topic_params().unwrap().get(0), Some("front"));
    /// });
    /// let env = Envelope::new("camera.frame", serde_json::json!({})).unwrap();
    /// let req = Request::builder("camera/front/frame").body(env).unwrap();
    /// assert!(req.topic_params().is_none());
    /// assert!(router.oneshot(req).await.unwrap().error().is_none());
    /// # }
    /// ```
    pub fn topic_params(&self) -> Option<&TopicParams> {
        self.topic_params.as_ref()
    }

    /// Sets the [topic parameters](Self::topic_params): what the router does
    /// for each route it calls. A cheap clone of `params` shares its values.
    ///
    /// ```
    /// use tower_mqtt::{Request, TopicFilter, TopicName};
    ///
    /// let topic = TopicName::new("rooms/kitchen").unwrap();
    /// let params = TopicFilter::new("rooms/+").unwrap().captures(&topic).unwrap();
    /// let mut req = Request::new(topic, ());
    /// req.set_topic_params(params);
    /// assert_eq!(req.topic_params().unwrap().get(0), Some("kitchen"));
    /// ```
    pub fn set_topic_params(&mut self, params: TopicParams) {
        self.topic_params = Some(params);
    }

    /// The correlation id of the message: inbound, set by the correlation
    /// span layer (`tower_mqtt::layers::CorrelationSpanLayer`) to the
    /// envelope's id, `None` before it; outbound, set by the encode layer to
    /// the envelope's id, so the layers below it, which see only bytes, can
    /// log it. Handlers take it with the [`CorrelationId`] extractor, and
    /// [`correlation::current`](crate::correlation::current) gives it
    /// anywhere in the handler's future.
    ///
    /// ```
    /// use tower_mqtt::{correlation::CorrelationId, Request, TopicName};
    ///
    /// let mut req = Request::new(TopicName::new("llm/request").unwrap(), ());
    /// assert!(req.correlation_id().is_none());
    /// req.set_correlation_id(CorrelationId::new("3f1c9b1e"));
    /// assert_eq!(req.correlation_id().unwrap().as_str(), "3f1c9b1e");
    /// ```
    pub fn correlation_id(&self) -> Option<&CorrelationId> {
        self.correlation_id.as_ref()
    }

    /// Sets the [correlation id](Self::correlation_id); cloning a
    /// [`CorrelationId`] shares its string.
    ///
    /// ```
    /// use tower_mqtt::{correlation::CorrelationId, Envelope, Request};
    ///
    /// let env = Envelope::new("llm.request", serde_json::json!({})).unwrap();
    /// let mut req = Request::builder("llm/request").body(env).unwrap();
    /// req.set_correlation_id(CorrelationId::of(req.body()));
    /// assert_eq!(req.correlation_id().unwrap().as_str(), req.body().id());
    /// ```
    pub fn set_correlation_id(&mut self, id: CorrelationId) {
        self.correlation_id = Some(id);
    }

    /// The MQTT 5 [`Properties`] of the message: user properties, content
    /// type, response topic, correlation data, message expiry, payload
    /// format. Empty for a message received over MQTT 3.1.1.
    ///
    /// ```
    /// use tower_mqtt::{Properties, Request};
    ///
    /// let mut props = Properties::new();
    /// props.add_user_property("tenant", "acme");
    /// let req = Request::builder("orders/new").properties(props).body(()).unwrap();
    /// assert_eq!(req.properties().user_property("tenant"), Some("acme"));
    /// assert!(Request::builder("a").body(()).unwrap().properties().is_empty());
    /// ```
    pub fn properties(&self) -> &Properties {
        self.properties.as_deref().unwrap_or(&properties::NONE)
    }

    /// The [properties](Self::properties), to change; clones of the request
    /// keep theirs.
    ///
    /// ```
    /// use tower_mqtt::Request;
    ///
    /// let mut req = Request::builder("a").body(()).unwrap();
    /// let copy = req.clone();
    /// req.properties_mut().content_type = Some("text/plain".into());
    /// assert_eq!(req.properties().content_type.as_deref(), Some("text/plain"));
    /// assert!(copy.properties().is_empty());
    /// ```
    pub fn properties_mut(&mut self) -> &mut Properties {
        Arc::make_mut(self.properties.get_or_insert_with(Default::default))
    }

    /// The properties as shared by clones, `None` when there are none: for a
    /// runtime that passes them on without copying.
    #[doc(hidden)]
    pub fn shared_properties(&self) -> Option<&Arc<Properties>> {
        self.properties.as_ref()
    }

    /// Replaces the [properties](Self::properties).
    ///
    /// ```
    /// use tower_mqtt::{Properties, Request};
    ///
    /// let mut req = Request::builder("a").body(()).unwrap();
    /// let mut props = Properties::new();
    /// props.response_topic = Some("replies/a".into());
    /// req.set_properties(props);
    /// assert_eq!(req.properties().response_topic.as_deref(), Some("replies/a"));
    /// ```
    pub fn set_properties(&mut self, properties: Properties) {
        self.properties = (!properties.is_empty()).then(|| Arc::new(properties));
    }

    /// Typed data that layers attach for later layers and handlers.
    pub fn extensions(&self) -> &Extensions {
        &self.extensions
    }

    /// Typed data that layers attach for later layers and handlers, mutably.
    ///
    /// ```
    /// use tower_mqtt::{Request, TopicName};
    ///
    /// #[derive(Clone)]
    /// struct Tenant(&'static str);
    ///
    /// let mut req = Request::new(TopicName::new("a").unwrap(), ());
    /// req.extensions_mut().insert(Tenant("acme"));
    /// assert_eq!(req.extensions().get::<Tenant>().unwrap().0, "acme");
    /// ```
    pub fn extensions_mut(&mut self) -> &mut Extensions {
        &mut self.extensions
    }

    /// Sets the QoS.
    pub fn set_qos(&mut self, qos: QoS) {
        self.qos = qos;
    }

    /// Sets the retain flag.
    pub fn set_retain(&mut self, retain: bool) {
        self.retain = retain;
    }

    /// Sets the DUP flag.
    pub fn set_dup(&mut self, dup: bool) {
        self.dup = dup;
    }

    /// Replaces the body with `f(body)`, keeping the topic, flags, topic
    /// parameters, correlation id and extensions.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Request<U> {
        let (parts, body) = self.into_parts();
        Request::from_parts(parts, f(body))
    }

    /// Splits the request into its [`Parts`] and body.
    pub fn into_parts(self) -> (Parts, T) {
        (
            Parts {
                topic: self.topic,
                qos: self.qos,
                retain: self.retain,
                dup: self.dup,
                topic_params: self.topic_params,
                correlation_id: self.correlation_id,
                properties: self.properties,
                extensions: self.extensions,
            },
            self.body,
        )
    }

    /// Joins [`Parts`] and a body into a request.
    pub fn from_parts(parts: Parts, body: T) -> Self {
        Self {
            topic: parts.topic,
            qos: parts.qos,
            retain: parts.retain,
            dup: parts.dup,
            topic_params: parts.topic_params,
            correlation_id: parts.correlation_id,
            properties: parts.properties,
            extensions: parts.extensions,
            body,
        }
    }
}

impl Request<()> {
    /// Starts building a request on `topic`; the topic is validated by
    /// [`Builder::body`].
    pub fn builder(topic: impl Into<String>) -> Builder {
        Builder {
            topic: topic.into(),
            qos: QoS::default(),
            retain: false,
            dup: false,
            topic_params: None,
            correlation_id: None,
            properties: None,
            extensions: Extensions::new(),
        }
    }
}

impl<T: fmt::Debug> fmt::Debug for Request<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request")
            .field("topic", &self.topic)
            .field("qos", &self.qos)
            .field("retain", &self.retain)
            .field("dup", &self.dup)
            .field("topic_params", &self.topic_params)
            .field("correlation_id", &self.correlation_id)
            .field("properties", self.properties())
            .field("body", &self.body)
            .finish_non_exhaustive()
    }
}

impl Request<Bytes> {}

/// Everything of a [`Request`] but its body.
///
/// ```
/// use tower_mqtt::{Request, TopicName};
///
/// let (parts, body) = Request::new(TopicName::new("a").unwrap(), 1).into_parts();
/// let req = Request::from_parts(parts, body + 1);
/// assert_eq!(*req.body(), 2);
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Parts {
    /// The topic.
    pub topic: TopicName,
    /// The QoS.
    pub qos: QoS,
    /// The retain flag.
    pub retain: bool,
    /// The DUP flag.
    pub dup: bool,
    /// The values of the route's wildcards; see [`Request::topic_params`].
    pub topic_params: Option<TopicParams>,
    /// The correlation id; see [`Request::correlation_id`].
    pub correlation_id: Option<CorrelationId>,
    /// The MQTT 5 properties, `None` when there are none; shared by clones.
    /// See [`Request::properties`].
    pub properties: Option<Arc<Properties>>,
    /// The extensions.
    pub extensions: Extensions,
}

/// Builds a [`Request`]; see [`Request::builder`].
///
/// ```
/// use tower_mqtt::{QoS, Request};
///
/// let req = Request::builder("system/character/current")
///     .qos(QoS::AtLeastOnce)
///     .retain(true)
///     .body(())
///     .unwrap();
/// assert!(req.retain());
/// assert!(Request::builder("bad/+").body(()).is_err());
/// ```
#[derive(Debug)]
#[must_use]
pub struct Builder {
    topic: String,
    qos: QoS,
    retain: bool,
    dup: bool,
    topic_params: Option<TopicParams>,
    correlation_id: Option<CorrelationId>,
    properties: Option<Arc<Properties>>,
    extensions: Extensions,
}

impl Builder {
    /// Sets the QoS (default 1).
    pub fn qos(mut self, qos: QoS) -> Self {
        self.qos = qos;
        self
    }

    /// Sets the retain flag.
    pub fn retain(mut self, retain: bool) -> Self {
        self.retain = retain;
        self
    }

    /// Sets the DUP flag.
    pub fn dup(mut self, dup: bool) -> Self {
        self.dup = dup;
        self
    }

    /// Sets the [topic parameters](Request::topic_params), as a router
    /// would: for a request built in a test of a handler that reads them.
    ///
    /// ```
    /// use tower_mqtt::{Request, TopicFilter, TopicName};
    ///
    /// let topic = TopicName::new("rooms/kitchen").unwrap();
    /// let params = TopicFilter::new("rooms/+").unwrap().captures(&topic).unwrap();
    /// let req = Request::builder("rooms/kitchen").topic_params(params).body(()).unwrap();
    /// assert_eq!(req.topic_params().unwrap().get(0), Some("kitchen"));
    /// ```
    pub fn topic_params(mut self, params: TopicParams) -> Self {
        self.topic_params = Some(params);
        self
    }

    /// Sets the [correlation id](Request::correlation_id), as the
    /// correlation layer would.
    ///
    /// ```
    /// use tower_mqtt::{correlation::CorrelationId, Request};
    ///
    /// let req = Request::builder("llm/request")
    ///     .correlation_id(CorrelationId::new("3f1c9b1e"))
    ///     .body(())
    ///     .unwrap();
    /// assert_eq!(req.correlation_id().unwrap().as_str(), "3f1c9b1e");
    /// ```
    pub fn correlation_id(mut self, id: CorrelationId) -> Self {
        self.correlation_id = Some(id);
        self
    }

    /// Sets the MQTT 5 [properties](Request::properties).
    ///
    /// ```
    /// use tower_mqtt::{Properties, Request};
    ///
    /// let mut props = Properties::new();
    /// props.content_type = Some("application/json".into());
    /// let req = Request::builder("a").properties(props).body(()).unwrap();
    /// assert_eq!(req.properties().content_type.as_deref(), Some("application/json"));
    /// ```
    pub fn properties(mut self, properties: Properties) -> Self {
        self.properties = (!properties.is_empty()).then(|| Arc::new(properties));
        self
    }

    /// Adds an extension.
    pub fn extension<E: Clone + Send + Sync + 'static>(mut self, value: E) -> Self {
        self.extensions.insert(value);
        self
    }

    /// Validates the topic and finishes the request with `body`.
    pub fn body<T>(self, body: T) -> Result<Request<T>, TopicError> {
        Ok(Request {
            topic: TopicName::new(&self.topic)?,
            qos: self.qos,
            retain: self.retain,
            dup: self.dup,
            topic_params: self.topic_params,
            correlation_id: self.correlation_id,
            properties: self.properties,
            extensions: self.extensions,
            body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qos_numbers_round_trip() {
        for n in 0..=2u8 {
            let qos = QoS::try_from(n).unwrap();
            assert_eq!(u8::from(qos), n);
        }
        assert_eq!(QoS::try_from(3), Err(InvalidQoS(3)));
    }

    #[test]
    fn map_keeps_extensions() {
        let mut req = Request::builder("a").body(1).unwrap();
        req.extensions_mut().insert(7u32);
        let req = req.map(|n| n * 2);
        assert_eq!(*req.body(), 2);
        assert_eq!(req.extensions().get::<u32>(), Some(&7));
    }

    #[test]
    fn params_and_correlation_id_survive_map_parts_and_clone() {
        let topic = TopicName::new("rooms/kitchen").unwrap();
        let params = crate::TopicFilter::new("rooms/+")
            .unwrap()
            .captures(&topic)
            .unwrap();
        let req = Request::builder("rooms/kitchen")
            .topic_params(params.clone())
            .correlation_id(CorrelationId::new("c-1"))
            .body(1)
            .unwrap();
        let req = req.map(|n| n + 1);
        let (parts, body) = req.into_parts();
        assert_eq!(parts.topic_params.as_ref(), Some(&params));
        let req = Request::from_parts(parts, body).clone();
        assert_eq!(req.topic_params(), Some(&params));
        assert_eq!(req.correlation_id().unwrap().as_str(), "c-1");
        assert!(req.extensions().is_empty());
    }
}
