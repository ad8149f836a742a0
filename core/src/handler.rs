//! Async functions as message handlers.
//!
//! Three shapes of `async fn` are handlers, each returning anything that is
//! [`IntoOutcome`] (`()`, `Result<(), E>`, an [`Outcome`]):
//!
//! - `async fn(Request<Envelope>)`: the whole message;
//! - `async fn(Data<T>)`: only `data`, decoded into `T: DeserializeOwned` before
//!   the function runs;
//! - `async fn(Request<Envelope>, Data<T>)`: both.
//!
//! Data that does not decode into `T` never reaches the function: the outcome is
//! a permanent (not retried) failure that names the type.
//!
//! Handlers are plain tower services ([`Handler::into_service`]), so they are
//! tested with `oneshot` and no broker:
//!
//! ```
//! use serde::Deserialize;
//! use tower::ServiceExt;
//! use tower_mqtt::{handler::Handler, Data, Envelope, Outcome, Request};
//!
//! #[derive(Deserialize)]
//! struct Say { text: String }
//!
//! async fn say(Data(say): Data<Say>) -> Result<(), std::io::Error> {
//!     println!("saying {}", say.text);
//!     Ok(())
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let env = Envelope::new("tts.say", serde_json::json!({"text": "hello"})).unwrap();
//! let req = Request::builder("tts/say").body(env).unwrap();
//! let outcome = say.into_service().oneshot(req).await.unwrap();
//! assert!(matches!(outcome, Outcome::Handled));
//! # }
//! ```

use std::{
    convert::Infallible,
    fmt,
    future::Future,
    marker::PhantomData,
    pin::Pin,
    task::{Context, Poll},
};

use serde::de::DeserializeOwned;
use tower::Service;

use crate::{
    envelope::Envelope,
    outcome::{HandlerError, IntoOutcome, Outcome},
    request::Request,
};

/// The envelope's `data`, decoded into `T`. Use it as a handler argument.
///
/// ```
/// use tower_mqtt::Data;
///
/// #[derive(serde::Deserialize)]
/// struct Cancel { reason: String }
///
/// async fn on_cancel(Data(cancel): Data<Cancel>) {
///     println!("cancelled: {}", cancel.reason);
/// }
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Data<T>(pub T);

impl<T: DeserializeOwned> Data<T> {
    fn extract(req: &Request<Envelope>) -> Result<Self, HandlerError> {
        req.body().data_as::<T>().map(Data).map_err(|err| {
            HandlerError::permanent(format!(
                "data of {:?} on {} is not a {}: {err}",
                req.body().event_type(),
                req.topic(),
                std::any::type_name::<T>()
            ))
        })
    }
}

/// The boxed future of a handler.
pub type BoxFuture = Pin<Box<dyn Future<Output = Outcome> + Send + 'static>>;

/// An async function that can handle messages; see the [module docs](self).
///
/// `M` only tells the implementations apart (the function's argument types); it
/// is inferred.
pub trait Handler<M>: Clone + Send + Sync + Sized + 'static {
    /// Handles one message.
    fn call(self, req: Request<Envelope>) -> BoxFuture;

    /// Turns the handler into a [`tower::Service`].
    fn into_service(self) -> HandlerService<Self, M> {
        HandlerService {
            handler: self,
            _marker: PhantomData,
        }
    }
}

impl<F, Fut, R> Handler<(Request<Envelope>,)> for F
where
    F: FnOnce(Request<Envelope>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = R> + Send + 'static,
    R: IntoOutcome,
{
    fn call(self, req: Request<Envelope>) -> BoxFuture {
        Box::pin(async move { self(req).await.into_outcome() })
    }
}

impl<F, Fut, R, T> Handler<(Data<T>,)> for F
where
    F: FnOnce(Data<T>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = R> + Send + 'static,
    R: IntoOutcome,
    T: DeserializeOwned + Send + 'static,
{
    fn call(self, req: Request<Envelope>) -> BoxFuture {
        let data = Data::<T>::extract(&req);
        Box::pin(async move {
            match data {
                Ok(data) => self(data).await.into_outcome(),
                Err(err) => Outcome::Failed(err),
            }
        })
    }
}

impl<F, Fut, R, T> Handler<(Request<Envelope>, Data<T>)> for F
where
    F: FnOnce(Request<Envelope>, Data<T>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = R> + Send + 'static,
    R: IntoOutcome,
    T: DeserializeOwned + Send + 'static,
{
    fn call(self, req: Request<Envelope>) -> BoxFuture {
        let data = Data::<T>::extract(&req);
        Box::pin(async move {
            match data {
                Ok(data) => self(req, data).await.into_outcome(),
                Err(err) => Outcome::Failed(err),
            }
        })
    }
}

/// A [`Handler`] as a [`tower::Service`]; built by [`Handler::into_service`].
///
/// Always ready; never fails (failures are an [`Outcome`]).
pub struct HandlerService<H, M> {
    handler: H,
    _marker: PhantomData<fn() -> M>,
}

impl<H: Clone, M> Clone for HandlerService<H, M> {
    fn clone(&self) -> Self {
        Self {
            handler: self.handler.clone(),
            _marker: PhantomData,
        }
    }
}

impl<H, M> fmt::Debug for HandlerService<H, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerService")
            .field("handler", &std::any::type_name::<H>())
            .finish()
    }
}

impl<H, M> Service<Request<Envelope>> for HandlerService<H, M>
where
    H: Handler<M>,
{
    type Response = Outcome;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Envelope>) -> Self::Future {
        ResponseFuture {
            inner: self.handler.clone().call(req),
        }
    }
}

/// The future of a [`HandlerService`].
pub struct ResponseFuture {
    inner: BoxFuture,
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl Future for ResponseFuture {
    type Output = Result<Outcome, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx).map(Ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use serde_json::json;
    use tower::ServiceExt;

    #[derive(Deserialize)]
    struct Chunk {
        seq: u32,
    }

    fn req(data: serde_json::Value) -> Request<Envelope> {
        Request::builder("llm/stream")
            .body(Envelope::new("llm.stream", data).unwrap())
            .unwrap()
    }

    #[tokio::test]
    async fn request_handler_sees_the_message() {
        async fn handler(req: Request<Envelope>) -> Result<(), String> {
            if req.body().event_type() == "llm.stream" {
                Ok(())
            } else {
                Err("wrong type".into())
            }
        }
        let outcome = handler
            .into_service()
            .oneshot(req(json!({})))
            .await
            .unwrap();
        assert!(matches!(outcome, Outcome::Handled));
    }

    #[tokio::test]
    async fn typed_handler_decodes_data() {
        async fn handler(Data(chunk): Data<Chunk>) -> Result<(), String> {
            (chunk.seq == 3)
                .then_some(())
                .ok_or_else(|| "wrong seq".into())
        }
        let outcome = handler
            .into_service()
            .oneshot(req(json!({"seq": 3})))
            .await
            .unwrap();
        assert!(matches!(outcome, Outcome::Handled));
    }

    #[tokio::test]
    async fn undecodable_data_is_a_permanent_failure() {
        let ran = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = ran.clone();
        let handler = move |_req: Request<Envelope>, Data(_chunk): Data<Chunk>| {
            let flag = flag.clone();
            async move { flag.store(true, std::sync::atomic::Ordering::SeqCst) }
        };
        let outcome = handler
            .into_service()
            .oneshot(req(json!({"seq": "three"})))
            .await
            .unwrap();
        let err = outcome.error().expect("decode failure");
        assert!(!err.is_retryable());
        assert!(err.to_string().contains("Chunk"), "{err}");
        assert!(!ran.load(std::sync::atomic::Ordering::SeqCst));
    }

    #[tokio::test]
    async fn handler_errors_become_failed_outcomes() {
        let handler =
            |_req: Request<Envelope>| async { Err::<(), _>(std::io::Error::other("nope")) };
        let outcome = handler
            .into_service()
            .oneshot(req(json!({})))
            .await
            .unwrap();
        assert_eq!(outcome.error().unwrap().to_string(), "nope");
    }
}
