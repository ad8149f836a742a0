//! Request/reply on MQTT 3.1.1: [`Replies`].
//!
//! MQTT 3.1.1 has no response topic or correlation data, so the fleet answers a
//! request on a known reply topic with an envelope that reuses the request's id
//! (llm-worker asks on `memory/query` and waits on `memory/results`).
//! [`Replies`] is both halves of that on the requesting side: a route for the
//! reply topic, and [`Replies::request`], which publishes and waits for the
//! first reply whose id matches, with a timeout.
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
//! let replies = Replies::new();
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

use tokio::sync::oneshot;
use tower::Service;
use tracing::debug;

use crate::{
    envelope::Envelope, outcome::BoxError, outcome::Outcome, publisher::Publisher, request::Request,
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
}

impl fmt::Debug for Replies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Replies")
            .field("waiting", &self.waiting())
            .finish()
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
    /// No waiters yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many requests wait for a reply.
    pub fn waiting(&self) -> usize {
        self.waiters.lock().map_or(0, |waiters| waiters.len())
    }

    /// Publishes `request` to `topic` (QoS 1) and waits up to `timeout` for the
    /// first reply with the same id. The reply topic must be routed to this
    /// `Replies` (see the [module docs](self)).
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
            let req = Request::builder(topic)
                .body(request)
                .map_err(|err| RequestError::Publish(err.into()))?;
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
    pub fn deliver(&self, reply: Envelope) -> bool {
        let waiter = self
            .waiters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(reply.id());
        match waiter {
            Some(tx) => tx.send(reply).is_ok(),
            None => false,
        }
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
        let id = req.body().id().to_owned();
        if !self.deliver(req.into_body()) {
            debug!(%id, "reply with no waiting request (late or not ours); ignored");
        }
        std::future::ready(Ok(Outcome::Handled))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

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
