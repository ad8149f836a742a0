//! The [`Publish`] builder: the data of one publish and how it goes out.

use std::{
    fmt,
    future::{Future, IntoFuture},
    pin::Pin,
};

use serde_json::Value;

use super::Publisher;
use crate::{
    envelope::Envelope,
    outcome::BoxError,
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
    pub(super) fn new(publisher: Publisher, topic: String, body: Result<Value, BoxError>) -> Self {
        Self {
            publisher,
            topic,
            body,
            event_type: None,
            qos: QoS::AtLeastOnce,
            retain: false,
            reply_to: None,
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
    /// ```
    /// use tower_mqtt::{Envelope, Publisher, Request};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), tower_mqtt::BoxError> {
    /// let (publisher, published) = Publisher::recording("memory-worker");
    /// let query = Request::builder("memory/query")
    ///     .body(Envelope::new("memory.query", serde_json::json!({"text": "cats"}))?)?;
    /// publisher.publish("memory/results", serde_json::json!({"results": []})).reply_to(&query).await?;
    /// assert_eq!(published.take()[0].envelope.id(), query.body().id());
    /// # Ok(()) }
    /// ```
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
        let event_type = self
            .event_type
            .unwrap_or_else(|| self.topic.replace('/', "."));
        let envelope = Envelope::new(event_type, self.body?)?;
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

    #[tokio::test]
    async fn data_that_is_not_an_object_fails_before_sending() {
        let (out, recorded) = Publisher::recording("svc");
        let err = out.publish("a/b", [1, 2, 3]).await.unwrap_err();
        assert!(err.is::<crate::EnvelopeError>(), "{err}");
        assert!(recorded.take().is_empty());
    }
}
