//! Request/reply, over MQTT 3.1.1 and natively over MQTT 5: [`Replies`].
//!
//! MQTT 3.1.1 has no response topic or correlation data, so the fleet answers a
//! request on a known reply topic with an envelope that reuses the request's id
//! (llm-worker asks on `memory/query` and waits on `memory/results`).
//! [`Replies`] is both halves of that on the requesting side: a route for the
//! reply topic, and [`Replies::request`], which publishes and waits for the
//! first reply whose id matches, with a timeout.
//!
//! MQTT 5 has request/reply in the protocol: a request names the topic to
//! answer on (its response topic) and data the answer carries back (its
//! correlation data). Every request carries its id as correlation data, and a
//! `Replies` that knows the topic it is routed on
//! ([`Replies::with_reply_topic`]) sends it as the response topic, so an MQTT 5
//! responder answers natively: tower-mqtt's
//! [`reply_to`](crate::Publish::reply_to), or a Python service with paho's
//! `ResponseTopic` and `CorrelationData`. A reply with correlation data is
//! matched by it (the UTF-8 of the request's id); one without, by its
//! envelope's id. Over MQTT 3.1.1 the properties are not sent, and the fleet's
//! convention works as before.
//!
//! Many requests may wait at once; each reply goes to the waiter with its id. A
//! waiter that times out is removed, and a reply that comes later (or answers
//! someone else) is ignored.
//!
//! ```no_run
//! # async fn run(client: tower_mqtt::Client) -> Result<(), tower_mqtt::BoxError> {
//! use std::time::Duration;
//! use tower_mqtt::{reply::Replies, Envelope, Router};
//!
//! // The topic it is routed on, named once more for MQTT 5 responders.
//! let replies = Replies::new().with_reply_topic("memory/results");
//! let router: Router = Router::new().route_service("memory/results", replies.clone());
//! let publisher = client.publisher();
//! // ... client.serve(router) ...
//! # let _ = router;
//! let query = Envelope::new("memory.query", serde_json::json!({"text": "cats"}))?;
//! let results = replies
//!     .request(&publisher, "memory/query", query, Duration::from_secs(5))
//!     .await?;
//! println!("{:?}", results.data());
//! # Ok(()) }
//! ```

use std::{
    collections::HashMap,
    convert::Infallible,
    fmt,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use tokio::sync::oneshot;
use tower::Service;
use tracing::debug;

use crate::{
    envelope::Envelope, outcome::BoxError, outcome::Outcome, publisher::Publisher,
    request::Request, topic::TopicName,
};

/// Why a request got no reply.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// The request could not be published.
    #[error("could not publish the request: {0}")]
    Publish(#[source] BoxError),
    /// No reply with the request's id arrived in time.
    #[error("no reply to request {id} within {timeout:?}")]
    Timeout {
        /// The request's id.
        id: String,
        /// How long it waited.
        timeout: Duration,
    },
    /// Another waiter already uses this id.
    #[error("a request with id {0} is already waiting for its reply")]
    DuplicateId(String),
}

type Waiters = Arc<Mutex<HashMap<String, oneshot::Sender<Envelope>>>>;

/// See the [module docs](self). Cheap to clone; clones share their waiters.
#[derive(Clone, Default)]
pub struct Replies {
    waiters: Waiters,
    reply_topic: Option<TopicName>,
}

impl fmt::Debug for Replies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Replies")
            .field("reply_topic", &self.reply_topic)
            .field("waiting", &self.waiting())
            .finish_non_exhaustive()
    }
}

/// Removes a waiter when its request ends, however it ends.
struct WaiterGuard {
    waiters: Waiters,
    id: String,
}

impl Drop for WaiterGuard {
    fn drop(&mut self) {
        if let Ok(mut waiters) = self.waiters.lock() {
            waiters.remove(&self.id);
        }
    }
}

impl Replies {
    /// No waiters yet, and no reply topic: requests go out without a
    /// response topic, so responders answer by the fleet's convention.
    ///
    /// ```
    /// let replies = tower_mqtt::reply::Replies::new();
    /// assert_eq!(replies.waiting(), 0);
    /// assert!(replies.reply_topic().is_none());
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// Names the topic this `Replies` is routed on, so that every request
    /// carries it as its MQTT 5 response topic and an MQTT 5 responder answers
    /// there (not sent over MQTT 3.1.1). Routing the topic is still the
    /// router's: route the same topic to this `Replies`.
    ///
    /// # Panics
    ///
    /// When `topic` is not a valid topic name (a response topic has no
    /// wildcards); the message names it.
    ///
    /// ```
    /// use tower_mqtt::{reply::Replies, Router};
    ///
    /// let replies = Replies::new().with_reply_topic("replies/llm-worker-7");
    /// let router: Router = Router::new().route_service("replies/llm-worker-7", replies.clone());
    /// assert_eq!(replies.reply_topic().unwrap(), "replies/llm-worker-7");
    /// # let _ = router;
    /// ```
    #[must_use]
    #[track_caller]
    pub fn with_reply_topic(mut self, topic: &str) -> Self {
        match TopicName::new(topic) {
            Ok(topic) => self.reply_topic = Some(topic),
            Err(err) => panic!("invalid reply topic {topic:?}: {err}"),
        }
        self
    }

    /// The topic set with [`with_reply_topic`](Self::with_reply_topic).
    ///
    /// ```
    /// use tower_mqtt::reply::Replies;
    ///
    /// assert_eq!(Replies::new().with_reply_topic("memory/results").reply_topic().unwrap(), "memory/results");
    /// ```
    pub fn reply_topic(&self) -> Option<&TopicName> {
        self.reply_topic.as_ref()
    }

    /// How many requests wait for a reply.
    pub fn waiting(&self) -> usize {
        self.waiters.lock().map_or(0, |waiters| waiters.len())
    }

    /// Publishes `request` to `topic` (QoS 1) and waits up to `timeout` for the
    /// first reply with the same id. The reply topic must be routed to this
    /// `Replies` (see the [module docs](self)).
    ///
    /// Over MQTT 5 the request carries its id as correlation data and, when
    /// this `Replies` has [one](Self::with_reply_topic), the reply topic as its
    /// response topic.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_mqtt::{reply::{Replies, RequestError}, Envelope, Publisher};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), tower_mqtt::BoxError> {
    /// let (publisher, published) = Publisher::recording("llm-worker");
    /// let replies = Replies::new().with_reply_topic("replies/llm-worker");
    /// let query = Envelope::new("memory.query", serde_json::json!({"text": "cats"}))?;
    /// let id = query.id().to_owned();
    ///
    /// // Nobody answers a recording publisher: the request times out.
    /// let err = replies
    ///     .request(&publisher, "memory/query", query, Duration::from_millis(10))
    ///     .await
    ///     .unwrap_err();
    /// assert!(matches!(err, RequestError::Timeout { .. }));
    ///
    /// let sent = published.take();
    /// assert_eq!(sent[0].topic, "memory/query");
    /// assert_eq!(sent[0].properties.response_topic.as_deref(), Some("replies/llm-worker"));
    /// assert_eq!(sent[0].properties.correlation_data.as_deref(), Some(id.as_bytes()));
    /// # Ok(()) }
    /// ```
    pub async fn request(
        &self,
        publisher: &Publisher,
        topic: &str,
        request: Envelope,
        timeout: Duration,
    ) -> Result<Envelope, RequestError> {
        let id = request.id().to_owned();
        let (tx, rx) = oneshot::channel();
        {
            let mut waiters = self.waiters.lock().unwrap_or_else(PoisonError::into_inner);
            if waiters.contains_key(&id) {
                return Err(RequestError::DuplicateId(id));
            }
            // Registered before publishing: a fast reply cannot slip past.
            waiters.insert(id.clone(), tx);
        }
        let _guard = WaiterGuard {
            waiters: self.waiters.clone(),
            id: id.clone(),
        };
        let exchange = async {
            let mut req = Request::builder(topic)
                .body(request)
                .map_err(|err| RequestError::Publish(err.into()))?;
            let properties = req.properties_mut();
            properties.correlation_data = Some(Bytes::from(id.clone()));
            properties.response_topic = self.reply_topic.as_ref().map(ToString::to_string);
            publisher.send(req).await.map_err(RequestError::Publish)?;
            rx.await.map_err(|_| RequestError::Timeout {
                id: id.clone(),
                timeout,
            })
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(RequestError::Timeout { id, timeout }),
        }
    }

    /// Hands `reply` to the request waiting for its id; `false` when none is.
    /// (Routed to a `Replies`, a reply with MQTT 5 correlation data is matched
    /// by that instead.)
    ///
    /// ```
    /// use tower_mqtt::{reply::Replies, Envelope};
    ///
    /// let replies = Replies::new();
    /// let stray = Envelope::new("memory.results", serde_json::json!({})).unwrap();
    /// assert!(!replies.deliver(stray), "no request waits for it");
    /// ```
    pub fn deliver(&self, reply: Envelope) -> bool {
        match self.waiter(reply.id()) {
            Some(tx) => tx.send(reply).is_ok(),
            None => false,
        }
    }

    /// Takes the waiter of the request with id `id`.
    fn waiter(&self, id: &str) -> Option<oneshot::Sender<Envelope>> {
        self.waiters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id)
    }
}

/// The id of the request `reply` answers: its correlation data when it has
/// some (`None` when that is not UTF-8, so not an id of ours), else its
/// envelope's id.
fn answers(reply: &Request<Envelope>) -> Option<&str> {
    match &reply.properties().correlation_data {
        Some(data) => std::str::from_utf8(data).ok(),
        None => Some(reply.body().id()),
    }
}

impl Service<Request<Envelope>> for Replies {
    type Response = Outcome;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Outcome, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Envelope>) -> Self::Future {
        if let Some(tx) = answers(&req).and_then(|id| self.waiter(id)) {
            // The waiter may have timed out since it was taken: nothing to do.
            let _ = tx.send(req.into_body());
        } else {
            debug!(
                id = %req.body().id(),
                correlation_data = ?req.properties().correlation_data,
                "reply with no waiting request (late or not ours); ignored"
            );
        }
        std::future::ready(Ok(Outcome::Handled))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        extract::State,
        publisher::{Published, Recorded},
        Router,
    };
    use serde_json::json;
    use tower::ServiceExt;

    fn envelope(id: &str) -> Envelope {
        Envelope::from_map("memory.results", serde_json::Map::new()).with_id(id)
    }

    /// A reply on `topic` with `correlation_data`, as the router hands it over.
    fn reply(topic: &str, id: &str, correlation_data: Option<&'static [u8]>) -> Request<Envelope> {
        let mut req = Request::builder(topic).body(envelope(id)).unwrap();
        req.properties_mut().correlation_data = correlation_data.map(Bytes::from_static);
        req
    }

    /// What a subscriber of `sent.topic` receives, over MQTT 5.
    fn received(sent: Published) -> Request<Envelope> {
        Request::builder(sent.topic.as_str())
            .properties(sent.properties)
            .body(sent.envelope)
            .unwrap()
    }

    /// The next publish `recorded` records: the recording publisher records
    /// as it is called, so a few turns of the runtime are enough.
    async fn next(recorded: &Recorded) -> Published {
        for _ in 0..100 {
            if let Some(sent) = recorded.take().pop() {
                return sent;
            }
            tokio::task::yield_now().await;
        }
        panic!("nothing was published");
    }

    #[tokio::test]
    async fn a_request_carries_its_id_as_correlation_data_and_its_reply_topic_if_known() {
        let (publisher, recorded) = Publisher::recording("llm-worker");
        for (replies, response_topic) in [
            (Replies::new(), None),
            (
                Replies::new().with_reply_topic("replies/llm-worker"),
                Some("replies/llm-worker"),
            ),
        ] {
            let query = Envelope::new("memory.query", json!({})).unwrap();
            let id = query.id().to_owned();
            let ask = replies.request(&publisher, "memory/query", query, Duration::from_secs(5));
            let answer = async {
                let sent = next(&recorded).await;
                assert_eq!(sent.topic, "memory/query");
                assert_eq!(sent.properties.response_topic.as_deref(), response_topic);
                assert_eq!(
                    sent.properties.correlation_data.as_deref(),
                    Some(id.as_bytes())
                );
                // The fleet's convention: the same id, no properties.
                assert!(replies.deliver(envelope(&id)));
            };
            let (got, ()) = tokio::join!(ask, answer);
            assert_eq!(got.unwrap().id(), id);
            assert_eq!(replies.waiting(), 0);
        }
    }

    #[tokio::test]
    async fn a_native_responder_answers_on_the_reply_topic_and_is_matched() {
        // The responder: a tower-mqtt handler that replies with `reply_to`, on
        // the fleet's reply topic, which the response topic replaces.
        async fn respond(
            State(publisher): State<Publisher>,
            req: Request<Envelope>,
        ) -> crate::HandlerResult {
            publisher
                .publish("memory/results", json!({"results": ["tabby"]}))
                .reply_to(&req)
                .await
        }
        let (responder, answered) = Publisher::recording("memory-worker");
        let router = Router::new()
            .route("memory/query", respond)
            .with_state(responder);

        let (publisher, recorded) = Publisher::recording("llm-worker");
        let replies = Replies::new().with_reply_topic("replies/llm-worker-7");
        let query = Envelope::new("memory.query", json!({"text": "cats"})).unwrap();
        let ask = replies.request(&publisher, "memory/query", query, Duration::from_secs(5));
        let answer = async {
            let outcome = router
                .oneshot(received(next(&recorded).await))
                .await
                .unwrap();
            assert!(matches!(outcome, Outcome::Handled), "{outcome:?}");
            let sent = next(&answered).await;
            assert_eq!(sent.topic, "replies/llm-worker-7");
            replies.clone().oneshot(received(sent)).await.unwrap();
        };
        let (got, ()) = tokio::join!(ask, answer);
        let got = got.unwrap();
        assert_eq!(got.event_type(), "memory.results");
        assert_eq!(got.data()["results"][0], "tabby");
    }

    #[tokio::test]
    async fn correlation_data_decides_over_the_envelope_id() {
        let replies = Replies::new();
        let (tx, rx) = oneshot::channel();
        replies.waiters.lock().unwrap().insert("abc".into(), tx);

        // Its envelope id is ours, but its correlation data is someone else's,
        // or not an id at all: not ours.
        for stranger in [
            reply("memory/results", "abc", Some(b"zzz")),
            reply("memory/results", "abc", Some(&[0xff, 0xfe])),
        ] {
            replies.clone().oneshot(stranger).await.unwrap();
            assert_eq!(replies.waiting(), 1);
        }
        // A fresh envelope that carries our correlation data back: ours.
        replies
            .clone()
            .oneshot(reply("memory/results", "fresh", Some(b"abc")))
            .await
            .unwrap();
        assert_eq!(rx.await.unwrap().id(), "fresh");
        assert_eq!(replies.waiting(), 0);
    }

    #[test]
    #[should_panic(expected = "invalid reply topic \"replies/+\"")]
    fn a_reply_topic_with_a_wildcard_fails_loudly() {
        let _ = Replies::new().with_reply_topic("replies/+");
    }

    #[tokio::test]
    async fn delivers_by_id_and_ignores_strangers() {
        let replies = Replies::new();
        let (tx, rx) = oneshot::channel();
        replies.waiters.lock().unwrap().insert("abc".into(), tx);
        let stranger = Envelope::from_map("memory.results", serde_json::Map::new()).with_id("zzz");
        let req = Request::builder("memory/results").body(stranger).unwrap();
        replies.clone().oneshot(req).await.unwrap();
        assert_eq!(replies.waiting(), 1);
        let reply = Envelope::from_map("memory.results", serde_json::Map::new()).with_id("abc");
        assert!(replies.deliver(reply));
        assert_eq!(rx.await.unwrap().id(), "abc");
        assert_eq!(replies.waiting(), 0);
    }
}
