//! Batching: [`BatchLayer`] collects messages and hands its inner service a
//! [`Batch`], up to `max_messages` at a time, at most `max_wait` after the
//! first one arrived.
//!
//! Each message's outcome is its batch's outcome, so a message is
//! acknowledged only once its batch is handled, and a failed batch fails each
//! of its messages (retryable if the batch's failure was). A persistent
//! session therefore delivers an unfinished batch again after a crash.
//!
//! Put it on an **unordered** route
//! ([`Subscription::unordered`](tower_mqtt_core::Subscription::unordered)):
//! an ordered route hands over a topic's next message only once the previous
//! one is done, which would make every batch of one topic a batch of one. A
//! batch is also at most the client's in-flight limit
//! (`Serve::max_in_flight`, 64 by default), since each waiting message holds
//! a handler slot.
//!
//! ```
//! use std::time::Duration;
//! use tower::{service_fn, Layer};
//! use tower_mqtt::{layers::batch::{Batch, BatchLayer}, BoxError, Router, Subscription};
//!
//! let store = service_fn(|batch: Batch| async move {
//!     println!("writing {} readings at once", batch.len());
//!     Ok::<_, BoxError>(())
//! });
//! let router: Router = Router::new().route_service(
//!     Subscription::new("sensors/+/reading").unordered(),
//!     BatchLayer::new(100, Duration::from_millis(50)).layer(store),
//! );
//! ```

use std::{
    fmt,
    future::Future,
    mem,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
    time::Duration,
};

use tokio::sync::oneshot;
use tower::{Layer, Service, ServiceExt};
use tower_mqtt_core::{BoxError, Envelope, HandlerError, IntoOutcome, Outcome, Request};

/// The messages a batch hands its service, in arrival order.
pub type Batch = Vec<Request<Envelope>>;

/// Makes [`Batching`] services; see the [module docs](self).
#[derive(Clone, Copy, Debug)]
pub struct BatchLayer {
    max_messages: usize,
    max_wait: Duration,
}

impl BatchLayer {
    /// Batches of at most `max_messages` (at least 1), each handed over at
    /// most `max_wait` after its first message.
    pub const fn new(max_messages: usize, max_wait: Duration) -> Self {
        Self {
            max_messages: if max_messages == 0 { 1 } else { max_messages },
            max_wait,
        }
    }
}

impl<S> Layer<S> for BatchLayer {
    type Service = Batching<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Batching::new(inner, self.max_messages, self.max_wait)
    }
}

type Waiter = oneshot::Sender<Outcome>;

#[derive(Default)]
struct Pending {
    messages: Batch,
    waiters: Vec<Waiter>,
    /// Bumped at every hand-over, so a timer for an earlier batch does not
    /// hand over a later one early.
    generation: u64,
}

struct Shared<S> {
    inner: Mutex<S>,
    pending: Mutex<Pending>,
    max_messages: usize,
    max_wait: Duration,
}

/// Collects messages into batches for `S`; see the [module docs](self).
pub struct Batching<S> {
    shared: Arc<Shared<S>>,
}

impl<S> Clone for Batching<S> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<S> fmt::Debug for Batching<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Batching")
            .field("max_messages", &self.shared.max_messages)
            .field("max_wait", &self.shared.max_wait)
            .finish_non_exhaustive()
    }
}

impl<S> Batching<S> {
    /// Batches for `inner`; see [`BatchLayer::new`].
    pub fn new(inner: S, max_messages: usize, max_wait: Duration) -> Self {
        let layer = BatchLayer::new(max_messages, max_wait);
        Self {
            shared: Arc::new(Shared {
                inner: Mutex::new(inner),
                pending: Mutex::default(),
                max_messages: layer.max_messages,
                max_wait: layer.max_wait,
            }),
        }
    }

    /// A [`BatchLayer`].
    pub const fn layer(max_messages: usize, max_wait: Duration) -> BatchLayer {
        BatchLayer::new(max_messages, max_wait)
    }
}

impl<S> Batching<S>
where
    S: Service<Batch> + Clone + Send + 'static,
    S::Response: IntoOutcome,
    S::Error: Into<BoxError>,
    S::Future: Send,
{
    /// Hands the pending batch over, if it is still `generation`.
    fn flush(&self, generation: Option<u64>) {
        let (messages, waiters) = {
            let mut pending = self
                .shared
                .pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if generation.is_some_and(|g| g != pending.generation) || pending.messages.is_empty() {
                return;
            }
            pending.generation += 1;
            (
                mem::take(&mut pending.messages),
                mem::take(&mut pending.waiters),
            )
        };
        let inner = self
            .shared
            .inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        tokio::spawn(async move {
            let outcome = match inner.oneshot(messages).await {
                Ok(response) => response.into_outcome(),
                Err(err) => Outcome::Failed(HandlerError::from_boxed(err.into())),
            };
            for waiter in waiters {
                let _ = waiter.send(each(&outcome));
            }
        });
    }
}

/// One message's share of its batch's outcome.
fn each(outcome: &Outcome) -> Outcome {
    match outcome {
        Outcome::Failed(err) => {
            let message = format!("its batch failed: {err}");
            Outcome::Failed(if err.is_retryable() {
                HandlerError::new(message)
            } else {
                HandlerError::permanent(message)
            })
        }
        Outcome::Duplicate => Outcome::Duplicate,
        Outcome::Unrouted => Outcome::Unrouted,
        _ => Outcome::Handled,
    }
}

impl<S> Service<Request<Envelope>> for Batching<S>
where
    S: Service<Batch> + Clone + Send + 'static,
    S::Response: IntoOutcome,
    S::Error: Into<BoxError>,
    S::Future: Send,
{
    type Response = Outcome;
    type Error = std::convert::Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Envelope>) -> Self::Future {
        let (tx, rx) = oneshot::channel();
        let (full, first) = {
            let mut pending = self
                .shared
                .pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            pending.messages.push(req);
            pending.waiters.push(tx);
            let first = (pending.messages.len() == 1).then_some(pending.generation);
            (pending.messages.len() >= self.shared.max_messages, first)
        };
        if full {
            self.flush(None);
        } else if let Some(generation) = first {
            let this = self.clone();
            let wait = self.shared.max_wait;
            tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                this.flush(Some(generation));
            });
        }
        ResponseFuture { rx }
    }
}

/// The future of [`Batching`]: the outcome of the message's batch.
pub struct ResponseFuture {
    rx: oneshot::Receiver<Outcome>,
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl Future for ResponseFuture {
    type Output = Result<Outcome, std::convert::Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.rx).poll(cx).map(|outcome| {
            Ok(outcome.unwrap_or_else(|_| {
                Outcome::Failed(HandlerError::new(
                    "its batch was dropped before it finished",
                ))
            }))
        })
    }
}

#[cfg(test)]
mod tests;
