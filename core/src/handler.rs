//! Async functions as message handlers.
//!
//! A handler is an `async fn` taking up to eight [extractors](crate::extract)
//! in any combination (the whole message, if taken, last) and returning
//! anything that is [`IntoOutcome`]: `()`, `Result<(), E>` with `E` any error
//! ([`HandlerResult`] is the short form), or an [`Outcome`].
//!
//! - `async fn(Request<Envelope>)`: the whole message;
//! - `async fn(Data<T>)`: only `data`, decoded into `T: DeserializeOwned` before
//!   the function runs;
//! - `async fn(State<Store>, Wildcard<String>, Data<T>)`: the router's state,
//!   the topic's wildcard value and the data.
//!
//! An extractor that fails (data that does not decode into `T`, say) keeps the
//! function from running: the outcome is a permanent (not retried) failure that
//! names what was wrong.
//!
//! Handlers are plain tower services ([`HandlerWithoutStateExt::into_service`], or [`Handler::with_state`]), so they are
//! tested with `oneshot` and no broker:
//!
//! ```
//! use serde::Deserialize;
//! use tower::ServiceExt;
//! use tower_mqtt::{handler::HandlerWithoutStateExt, Data, Envelope, Outcome, Request};
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

use tower::Service;

pub use crate::extract::Data;
use crate::{
    envelope::Envelope,
    extract::{FromMessage, FromMessageParts},
    outcome::{IntoOutcome, Outcome},
    request::Request,
};

/// The boxed future of a handler.
pub type BoxFuture = Pin<Box<dyn Future<Output = Outcome> + Send + 'static>>;

/// What a handler that fails returns, so that `?` works on any error:
/// `async fn f(..) -> HandlerResult { store.put(x)?; Ok(()) }`.
///
/// ```
/// use tower_mqtt::{handler::HandlerResult, Data};
///
/// #[derive(serde::Deserialize)]
/// struct Count { n: String }
///
/// async fn parse(Data(count): Data<Count>) -> HandlerResult {
///     let n: u32 = count.n.parse()?;
///     println!("{n}");
///     Ok(())
/// }
/// ```
pub type HandlerResult<T = ()> = Result<T, crate::BoxError>;

/// An async function that can handle messages; see the [module docs](self).
///
/// `M` only tells the implementations apart (the function's argument types); it
/// is inferred. `S` is the router's state ([`Router::with_state`](crate::Router::with_state)).
pub trait Handler<M, S = ()>: Clone + Send + Sync + Sized + 'static {
    /// Handles one message.
    fn call(self, req: Request<Envelope>, state: S) -> BoxFuture;

    /// Turns the handler into a [`tower::Service`] that gives it `state`.
    fn with_state(self, state: S) -> HandlerService<Self, M, S> {
        HandlerService {
            handler: self,
            state,
            _marker: PhantomData,
        }
    }
}

/// A [`tower::Service`] from a handler that take no
/// state.
///
/// ```
/// use tower::ServiceExt;
/// use tower_mqtt::{handler::HandlerWithoutStateExt, Envelope, Outcome, Request};
///
/// async fn noop(_req: Request<Envelope>) {}
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let env = Envelope::new("t", serde_json::json!({})).unwrap();
/// let req = Request::builder("a").body(env).unwrap();
/// assert!(matches!(noop.into_service().oneshot(req).await.unwrap(), Outcome::Handled));
/// # }
/// ```
pub trait HandlerWithoutStateExt<M>: Handler<M, ()> {
    /// Turns the handler into a [`tower::Service`].
    fn into_service(self) -> HandlerService<Self, M, ()> {
        self.with_state(())
    }
}

impl<H: Handler<M, ()>, M> HandlerWithoutStateExt<M> for H {}

impl<F, Fut, R, S> Handler<((),), S> for F
where
    F: FnOnce() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = R> + Send + 'static,
    R: IntoOutcome,
{
    fn call(self, _req: Request<Envelope>, _state: S) -> BoxFuture {
        Box::pin(async move { self().await.into_outcome() })
    }
}

macro_rules! handler_for_arguments {
    ([$($part:ident),*], $last:ident) => {
        #[allow(non_snake_case, unused_variables)]
        impl<F, Fut, R, S, M, $($part,)* $last> Handler<(M, $($part,)* $last,), S> for F
        where
            F: FnOnce($($part,)* $last) -> Fut + Clone + Send + Sync + 'static,
            Fut: Future<Output = R> + Send + 'static,
            R: IntoOutcome,
            $($part: FromMessageParts<S> + Send + 'static,)*
            $last: FromMessage<S, M> + Send + 'static,
        {
            fn call(self, req: Request<Envelope>, state: S) -> BoxFuture {
                // Extraction is synchronous: the envelope is already decoded.
                let extracted = (|| {
                    $(let $part = $part::from_message_parts(&req, &state)?;)*
                    let $last = $last::from_message(req, &state)?;
                    Ok::<_, crate::HandlerError>(($($part,)* $last,))
                })();
                match extracted {
                    Ok(($($part,)* $last,)) => {
                        Box::pin(async move { self($($part,)* $last).await.into_outcome() })
                    }
                    Err(err) => Box::pin(std::future::ready(Outcome::Failed(err))),
                }
            }
        }
    };
}

handler_for_arguments!([], T1);
handler_for_arguments!([T1], T2);
handler_for_arguments!([T1, T2], T3);
handler_for_arguments!([T1, T2, T3], T4);
handler_for_arguments!([T1, T2, T3, T4], T5);
handler_for_arguments!([T1, T2, T3, T4, T5], T6);
handler_for_arguments!([T1, T2, T3, T4, T5, T6], T7);
handler_for_arguments!([T1, T2, T3, T4, T5, T6, T7], T8);

/// A [`Handler`] as a [`tower::Service`]; built by [`Handler::with_state`] or [`HandlerWithoutStateExt::into_service`].
///
/// Always ready; never fails (failures are an [`Outcome`]).
pub struct HandlerService<H, M, S = ()> {
    handler: H,
    state: S,
    _marker: PhantomData<fn() -> M>,
}

impl<H: Clone, M, S: Clone> Clone for HandlerService<H, M, S> {
    fn clone(&self) -> Self {
        Self {
            handler: self.handler.clone(),
            state: self.state.clone(),
            _marker: PhantomData,
        }
    }
}

impl<H, M, S> fmt::Debug for HandlerService<H, M, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerService")
            .field("handler", &std::any::type_name::<H>())
            .finish()
    }
}

impl<H, M, S> Service<Request<Envelope>> for HandlerService<H, M, S>
where
    H: Handler<M, S>,
    S: Clone,
{
    type Response = Outcome;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Envelope>) -> Self::Future {
        ResponseFuture {
            inner: self.handler.clone().call(req, self.state.clone()),
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
        let handler = move |Data(_chunk): Data<Chunk>, _req: Request<Envelope>| {
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
