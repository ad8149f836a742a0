//! The [`Publish`] builder: the data of one publish and how it goes out.

use std::{
    fmt,
    future::{Future, IntoFuture},
    pin::Pin,
    time::Duration,
};

use bytes::Bytes;
use serde_json::Value;

use super::Publisher;
use crate::{
    envelope::Envelope,
    outcome::BoxError,
    properties::Properties,
    request::{QoS, Request},
};

/// A publish being prepared; await it to send. Built by
/// [`Publisher::publish`], which has the defaults.
///
/// ```
/// use tower_mqtt::{Publisher, QoS};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), tower_mqtt::BoxError> {
/// let (publisher, published) = Publisher::recording("stt-worker");
/// publisher
///     .publish("stt/partial", serde_json::json!({"text": "hel"}))
///     .qos(QoS::AtMostOnce)
///     .event_type("stt.partial")
///     .await?;
/// assert_eq!(published.take()[0].qos, QoS::AtMostOnce);
/// # Ok(()) }
/// ```
///
/// # MQTT 5 properties
///
/// [`user_property`](Self::user_property),
/// [`content_type`](Self::content_type),
/// [`message_expiry`](Self::message_expiry),
/// [`response_topic`](Self::response_topic),
/// [`correlation_data`](Self::correlation_data),
/// [`utf8_payload`](Self::utf8_payload) and [`properties`](Self::properties)
/// set the [`Properties`] of the publish. MQTT 3.1.1 has no properties: over
/// 3.1.1 they are not sent, and setting them changes nothing on the wire.
///
/// ```
/// use std::time::Duration;
/// use tower_mqtt::Publisher;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), tower_mqtt::BoxError> {
/// let (publisher, published) = Publisher::recording("orders");
/// publisher
///     .publish("orders/new", serde_json::json!({"sku": "A-7"}))
///     .user_property("tenant", "acme")
///     .content_type("application/json")
///     .message_expiry(Duration::from_secs(60))
///     .await?;
/// let props = &published.take()[0].properties;
/// assert_eq!(props.user_property("tenant"), Some("acme"));
/// assert_eq!(props.content_type.as_deref(), Some("application/json"));
/// assert_eq!(props.message_expiry, Some(Duration::from_secs(60)));
/// # Ok(()) }
/// ```
#[must_use = "a publish does nothing until it is awaited"]
pub struct Publish {
    publisher: Publisher,
    /// The topic given to [`Publisher::publish`]; it names the event type.
    topic: String,
    body: Result<Value, BoxError>,
    event_type: Option<String>,
    qos: QoS,
    retain: bool,
    properties: Properties,
    reply: Option<ReplyTo>,
}

/// What [`Publish::reply_to`] takes from the request it answers.
struct ReplyTo {
    /// The request's envelope id, which the reply reuses.
    id: String,
    /// The request's MQTT 5 response topic, which the reply goes to instead
    /// of the topic given to [`Publisher::publish`], and its correlation
    /// data, which the reply carries back.
    native: Option<(String, Option<Bytes>)>,
}

impl fmt::Debug for Publish {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Publish")
            .field("topic", &self.topic)
            .field("qos", &self.qos)
            .field("retain", &self.retain)
            .field("properties", &self.properties)
            .finish_non_exhaustive()
    }
}

impl Publish {
    pub(super) fn new(publisher: Publisher, topic: String, body: Result<Value, BoxError>) -> Self {
        Self {
            publisher,
            topic,
            body,
            event_type: None,
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Properties::new(),
            reply: None,
        }
    }

    /// Sets the QoS (default 1).
    pub fn qos(mut self, qos: QoS) -> Self {
        self.qos = qos;
        self
    }

    /// Sets whether the broker keeps it as the topic's retained message.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), tower_mqtt::BoxError> {
    /// let (publisher, published) = tower_mqtt::Publisher::recording("character");
    /// publisher.publish("system/character/current", serde_json::json!({"name": "TARS"})).retain(true).await?;
    /// assert!(published.take()[0].retain);
    /// # Ok(()) }
    /// ```
    pub fn retain(mut self, retain: bool) -> Self {
        self.retain = retain;
        self
    }

    /// Makes it the reply to `request`: it takes the request's id, as the
    /// fleet correlates replies and stream chunks.
    ///
    /// A request with an MQTT 5 response topic
    /// ([`Properties::response_topic`]) is answered natively: the reply goes
    /// to that topic instead of the one given to
    /// [`publish`](Publisher::publish), and carries the request's
    /// correlation data. The event type is still named after the given topic.
    /// A request without one (every request over MQTT 3.1.1) is answered on
    /// the given topic, by the id alone. The request's correlation data wins
    /// over any set with [`correlation_data`](Self::correlation_data) or
    /// [`properties`](Self::properties), whatever the order of the calls.
    ///
    /// ```
    /// use tower_mqtt::{Envelope, Publisher, Request};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), tower_mqtt::BoxError> {
    /// let (publisher, published) = Publisher::recording("memory-worker");
    /// let query = Request::builder("memory/query")
    ///     .body(Envelope::new("memory.query", serde_json::json!({"text": "cats"}))?)?;
    /// publisher.publish("memory/results", serde_json::json!({"results": []})).reply_to(&query).await?;
    /// let sent = published.take();
    /// assert_eq!(sent[0].topic, "memory/results");
    /// assert_eq!(sent[0].envelope.id(), query.body().id());
    ///
    /// // An MQTT 5 requester names its reply topic and correlation data.
    /// let mut native = query.clone();
    /// native.properties_mut().response_topic = Some("replies/llm-worker-7".into());
    /// native.properties_mut().correlation_data = Some(bytes::Bytes::from_static(b"q-1"));
    /// publisher.publish("memory/results", serde_json::json!({"results": []})).reply_to(&native).await?;
    /// let sent = published.take();
    /// assert_eq!(sent[0].topic, "replies/llm-worker-7");
    /// assert_eq!(sent[0].properties.correlation_data.as_deref(), Some(&b"q-1"[..]));
    /// assert_eq!(sent[0].envelope.id(), query.body().id());
    /// assert_eq!(sent[0].envelope.event_type(), "memory.results");
    /// # Ok(()) }
    /// ```
    pub fn reply_to(mut self, request: &Request<Envelope>) -> Self {
        let asked = request.properties();
        self.reply = Some(ReplyTo {
            id: request.body().id().to_owned(),
            native: asked
                .response_topic
                .clone()
                .map(|topic| (topic, asked.correlation_data.clone())),
        });
        self
    }

    /// Appends an MQTT 5 user property; call it again for more, names may
    /// repeat and keep their order. Not sent over MQTT 3.1.1 (see
    /// [MQTT 5 properties](Self#mqtt-5-properties)).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), tower_mqtt::BoxError> {
    /// let (publisher, published) = tower_mqtt::Publisher::recording("svc");
    /// publisher
    ///     .publish("a/b", serde_json::json!({}))
    ///     .user_property("tag", "x")
    ///     .user_property("tag", "y")
    ///     .await?;
    /// let sent = published.take();
    /// assert_eq!(sent[0].properties.user_property_values("tag").collect::<Vec<_>>(), ["x", "y"]);
    /// # Ok(()) }
    /// ```
    pub fn user_property(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties.add_user_property(name, value);
        self
    }

    /// Sets the MQTT 5 content type (a MIME type, by convention). Not sent
    /// over MQTT 3.1.1.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), tower_mqtt::BoxError> {
    /// let (publisher, published) = tower_mqtt::Publisher::recording("svc");
    /// publisher.publish("a/b", serde_json::json!({})).content_type("application/json").await?;
    /// assert_eq!(published.take()[0].properties.content_type.as_deref(), Some("application/json"));
    /// # Ok(()) }
    /// ```
    pub fn content_type(mut self, content_type: impl Into<String>) -> Self {
        self.properties.content_type = Some(content_type.into());
        self
    }

    /// Sets the MQTT 5 message expiry: how long the broker keeps the
    /// message for a subscriber that has not received it yet (whole seconds
    /// on the wire). Not sent over MQTT 3.1.1.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), tower_mqtt::BoxError> {
    /// let (publisher, published) = tower_mqtt::Publisher::recording("svc");
    /// publisher.publish("a/b", serde_json::json!({})).message_expiry(Duration::from_secs(30)).await?;
    /// assert_eq!(published.take()[0].properties.message_expiry, Some(Duration::from_secs(30)));
    /// # Ok(()) }
    /// ```
    pub fn message_expiry(mut self, expiry: Duration) -> Self {
        self.properties.message_expiry = Some(expiry);
        self
    }

    /// Sets the MQTT 5 response topic: where an MQTT 5 responder sends its
    /// reply. Not sent over MQTT 3.1.1. To publish a request and wait for its
    /// reply, [`Replies::request`](crate::reply::Replies::request) sets it
    /// and the correlation data itself.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), tower_mqtt::BoxError> {
    /// let (publisher, published) = tower_mqtt::Publisher::recording("svc");
    /// publisher
    ///     .publish("memory/query", serde_json::json!({"text": "cats"}))
    ///     .response_topic("replies/svc")
    ///     .correlation_data("q-1")
    ///     .await?;
    /// let sent = published.take();
    /// assert_eq!(sent[0].properties.response_topic.as_deref(), Some("replies/svc"));
    /// # Ok(()) }
    /// ```
    pub fn response_topic(mut self, topic: impl Into<String>) -> Self {
        self.properties.response_topic = Some(topic.into());
        self
    }

    /// Sets the MQTT 5 correlation data, which pairs a reply with its
    /// request. Not sent over MQTT 3.1.1.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), tower_mqtt::BoxError> {
    /// let (publisher, published) = tower_mqtt::Publisher::recording("svc");
    /// publisher.publish("a/b", serde_json::json!({})).correlation_data(vec![1, 2, 3]).await?;
    /// assert_eq!(published.take()[0].properties.correlation_data.as_deref(), Some(&[1, 2, 3][..]));
    /// # Ok(()) }
    /// ```
    pub fn correlation_data(mut self, data: impl Into<Bytes>) -> Self {
        self.properties.correlation_data = Some(data.into());
        self
    }

    /// Sets the MQTT 5 payload format indicator: `true` says the payload is
    /// UTF-8 text (which an envelope, JSON, always is), `false` (the
    /// default) leaves it unspecified. Not sent over MQTT 3.1.1.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), tower_mqtt::BoxError> {
    /// let (publisher, published) = tower_mqtt::Publisher::recording("svc");
    /// publisher.publish("a/b", serde_json::json!({})).utf8_payload(true).await?;
    /// assert!(published.take()[0].properties.utf8_payload);
    /// # Ok(()) }
    /// ```
    pub fn utf8_payload(mut self, utf8: bool) -> Self {
        self.properties.utf8_payload = utf8;
        self
    }

    /// Replaces every MQTT 5 property set so far with `properties` (the
    /// setters called after it change them further). Not sent over MQTT
    /// 3.1.1.
    ///
    /// ```
    /// use tower_mqtt::Properties;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), tower_mqtt::BoxError> {
    /// let (publisher, published) = tower_mqtt::Publisher::recording("svc");
    /// let mut props = Properties::new();
    /// props.add_user_property("tenant", "acme");
    /// publisher
    ///     .publish("a/b", serde_json::json!({}))
    ///     .properties(props)
    ///     .user_property("region", "eu")
    ///     .await?;
    /// let props = &published.take()[0].properties;
    /// assert_eq!(props.user_property("tenant"), Some("acme"));
    /// assert_eq!(props.user_property("region"), Some("eu"));
    /// # Ok(()) }
    /// ```
    pub fn properties(mut self, properties: Properties) -> Self {
        self.properties = properties;
        self
    }

    /// Sets the event type (default: the topic with `/` as `.`).
    pub fn event_type(mut self, event_type: impl Into<String>) -> Self {
        self.event_type = Some(event_type.into());
        self
    }

    fn request(self) -> Result<(Publisher, Request<Envelope>), BoxError> {
        let event_type = self
            .event_type
            .unwrap_or_else(|| self.topic.replace('/', "."));
        let mut envelope = Envelope::new(event_type, self.body?)?;
        let mut topic = self.topic;
        let mut properties = self.properties;
        if let Some(reply) = self.reply {
            envelope = envelope.with_id(reply.id);
            if let Some((response_topic, correlation_data)) = reply.native {
                topic = response_topic;
                if correlation_data.is_some() {
                    properties.correlation_data = correlation_data;
                }
            }
        }
        let req = Request::builder(topic)
            .qos(self.qos)
            .retain(self.retain)
            .properties(properties)
            .body(envelope)?;
        Ok((self.publisher, req))
    }
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[tokio::test]
    async fn data_with_exactly_the_five_envelope_keys_is_still_data() {
        let (out, recorded) = Publisher::recording("archive");
        let inner = Envelope::new("llm.request", json!({"text": "hi"})).unwrap();
        out.publish("archive/raw", &inner).await.unwrap();

        let sent = recorded.take();
        let outer = &sent[0].envelope;
        assert_eq!(outer.event_type(), "archive.raw");
        assert_eq!(outer.source(), "archive");
        assert_ne!(outer.id(), inner.id(), "a new envelope, with its own id");
        assert_eq!(
            Value::Object(outer.data().clone()),
            serde_json::to_value(&inner).unwrap(),
            "the five keys, whole, as the data"
        );
    }

    #[tokio::test]
    async fn send_publishes_a_whole_envelope_as_it_is() {
        let (out, recorded) = Publisher::recording("archive");
        let env = Envelope::new("llm.request", json!({"text": "hi"}))
            .unwrap()
            .with_source("llm-worker");
        let req = Request::builder("llm/request").body(env.clone()).unwrap();
        out.send(req).await.unwrap();
        assert_eq!(recorded.take()[0].envelope, env);
    }

    fn query(
        response_topic: Option<&str>,
        correlation_data: Option<&'static [u8]>,
    ) -> Request<Envelope> {
        let mut req = Request::builder("memory/query")
            .body(Envelope::new("memory.query", json!({"text": "cats"})).unwrap())
            .unwrap();
        req.properties_mut().response_topic = response_topic.map(Into::into);
        req.properties_mut().correlation_data = correlation_data.map(Bytes::from_static);
        req
    }

    #[tokio::test]
    async fn every_property_setter_reaches_the_wire_through_the_outbound_stack() {
        let (out, recorded) = Publisher::recording("svc");
        out.publish("orders/new", json!({"sku": "A-7"}))
            .user_property("tenant", "acme")
            .content_type("application/json")
            .user_property("tenant", "globex")
            .message_expiry(Duration::from_secs(90))
            .response_topic("replies/svc")
            .correlation_data(&b"c-9"[..])
            .utf8_payload(true)
            .await
            .unwrap();

        let sent = recorded.take();
        let props = &sent[0].properties;
        assert_eq!(
            props.user_property_values("tenant").collect::<Vec<_>>(),
            ["acme", "globex"]
        );
        assert_eq!(props.content_type.as_deref(), Some("application/json"));
        assert_eq!(props.message_expiry, Some(Duration::from_secs(90)));
        assert_eq!(props.response_topic.as_deref(), Some("replies/svc"));
        assert_eq!(props.correlation_data.as_deref(), Some(&b"c-9"[..]));
        assert!(props.utf8_payload);
        assert_eq!(sent[0].topic, "orders/new");
    }

    #[tokio::test]
    async fn properties_replaces_what_was_set_before_it_only() {
        let (out, recorded) = Publisher::recording("svc");
        let mut props = Properties::new();
        props.add_user_property("b", "2");
        out.publish("a/b", json!({}))
            .user_property("a", "1")
            .content_type("text/plain")
            .properties(props)
            .user_property("c", "3")
            .await
            .unwrap();
        let props = &recorded.take()[0].properties;
        assert_eq!(props.user_property("a"), None);
        assert_eq!(props.content_type, None);
        assert_eq!(props.user_property("b"), Some("2"));
        assert_eq!(props.user_property("c"), Some("3"));
    }

    #[tokio::test]
    async fn a_reply_without_a_response_topic_keeps_the_fleet_convention() {
        let (out, recorded) = Publisher::recording("memory-worker");
        // Correlation data alone does not make a native request.
        for request in [query(None, None), query(None, Some(b"q-1"))] {
            out.publish("memory/results", json!({"results": []}))
                .reply_to(&request)
                .await
                .unwrap();
            let sent = recorded.take();
            assert_eq!(sent[0].topic, "memory/results");
            assert_eq!(sent[0].envelope.id(), request.body().id());
            let props = &sent[0].properties;
            assert_eq!(props.correlation_data, None, "{props:?}");
            assert_eq!(props.response_topic, None, "{props:?}");
            // Only the trace context, which every publish carries.
            let names: Vec<&str> = props
                .user_properties
                .iter()
                .map(|(k, _)| k.as_str())
                .collect();
            assert_eq!(names, ["traceparent"], "{props:?}");
        }
    }

    #[tokio::test]
    async fn a_reply_to_a_native_request_goes_to_its_response_topic_with_its_correlation_data() {
        let (out, recorded) = Publisher::recording("memory-worker");
        let request = query(Some("replies/llm-worker-7"), Some(b"q-1"));
        // The request's correlation data wins whatever the order of the calls.
        out.publish("memory/results", json!({"results": []}))
            .reply_to(&request)
            .correlation_data(&b"mine"[..])
            .user_property("k", "v")
            .await
            .unwrap();
        let sent = recorded.take();
        assert_eq!(sent[0].topic, "replies/llm-worker-7");
        assert_eq!(sent[0].envelope.id(), request.body().id());
        assert_eq!(sent[0].envelope.event_type(), "memory.results");
        assert_eq!(
            sent[0].properties.correlation_data.as_deref(),
            Some(&b"q-1"[..])
        );
        assert_eq!(sent[0].properties.user_property("k"), Some("v"));
        assert_eq!(sent[0].properties.response_topic, None);

        // A response topic without correlation data: the topic, and no data.
        let request = query(Some("replies/llm-worker-7"), None);
        out.publish("memory/results", json!({}))
            .reply_to(&request)
            .await
            .unwrap();
        let sent = recorded.take();
        assert_eq!(sent[0].topic, "replies/llm-worker-7");
        assert_eq!(sent[0].properties.correlation_data, None);
    }

    #[tokio::test]
    async fn a_response_topic_that_is_not_a_topic_name_fails_before_sending() {
        let (out, recorded) = Publisher::recording("memory-worker");
        let request = query(Some("replies/+"), Some(b"q-1"));
        let err = out
            .publish("memory/results", json!({}))
            .reply_to(&request)
            .await
            .unwrap_err();
        assert!(err.is::<crate::TopicError>(), "{err}");
        assert!(recorded.take().is_empty());
    }

    #[tokio::test]
    async fn data_that_is_not_an_object_fails_before_sending() {
        let (out, recorded) = Publisher::recording("svc");
        let err = out.publish("a/b", [1, 2, 3]).await.unwrap_err();
        assert!(err.is::<crate::EnvelopeError>(), "{err}");
        assert!(recorded.take().is_empty());
    }
}
