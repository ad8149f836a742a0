//! Rejects a publish the broker would refuse, before anything is sent: the
//! whole packet ([`packet_size`]) against the packet limit, as the runtime's
//! sink and the broker count it.
//!
//! ```
//! use bytes::Bytes;
//! use tower::{service_fn, Layer, ServiceExt};
//! use tower_mqtt::{BoxError, Request};
//! use tower_mqtt::outbound::{SizeGuardLayer, TooLarge};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let sink = service_fn(|_: Request<Bytes>| async { Ok::<_, BoxError>(()) });
//! let svc = SizeGuardLayer::new(16).layer(sink);
//! let req = Request::builder("a").body(Bytes::from(vec![0u8; 64])).unwrap();
//! let err = svc.oneshot(req).await.unwrap_err();
//! assert!(err.downcast_ref::<TooLarge>().is_some());
//! # }
//! ```

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use crate::{BoxError, Request};
use bytes::Bytes;
use pin_project_lite::pin_project;
use tower::{Layer, Service};

/// Bytes of a PUBLISH packet on the wire for `topic` and a payload of
/// `payload` bytes, counted the way the broker counts its packet limit:
/// fixed header (at most 5 bytes), topic length and topic, packet id.
///
/// ```
/// assert_eq!(tower_mqtt::outbound::packet_size("a/b", 10), 5 + 2 + 3 + 2 + 10);
/// ```
pub const fn packet_size(topic: &str, payload: usize) -> usize {
    5 + 2 + topic.len() + 2 + payload
}

/// A publish over the size limit; nothing was sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("publish to {topic} carries {size} bytes, over the limit of {max} bytes; nothing was sent")]
pub struct TooLarge {
    /// The topic.
    pub topic: String,
    /// The size of the packet, as [`packet_size`] counts it.
    pub size: usize,
    /// The limit.
    pub max: usize,
}

/// Makes [`SizeGuard`] services; see the [module docs](self).
#[derive(Clone, Copy, Debug)]
pub struct SizeGuardLayer {
    max: usize,
}

impl SizeGuardLayer {
    /// Packets larger than `max` bytes are rejected.
    pub const fn new(max: usize) -> Self {
        Self { max }
    }
}

impl<S> Layer<S> for SizeGuardLayer {
    type Service = SizeGuard<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SizeGuard {
            inner,
            max: self.max,
        }
    }
}

/// Rejects oversized payloads; see the [module docs](self).
#[derive(Clone, Copy, Debug)]
pub struct SizeGuard<S> {
    inner: S,
    max: usize,
}

impl<S> SizeGuard<S> {
    /// Guards `inner` with a limit of `max` bytes.
    pub const fn new(inner: S, max: usize) -> Self {
        Self { inner, max }
    }

    /// A [`SizeGuardLayer`].
    pub const fn layer(max: usize) -> SizeGuardLayer {
        SizeGuardLayer::new(max)
    }

    tower_mqtt_core::define_inner_service_accessors!();
}

pin_project! {
    /// The future of [`SizeGuard`].
    pub struct GuardFuture<F> {
        #[pin]
        future: Option<F>,
        error: Option<TooLarge>,
    }
}

impl<F, T, E> Future for GuardFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.future.as_pin_mut() {
            Some(future) => future.poll(cx).map_err(Into::into),
            None => Poll::Ready(Err(this
                .error
                .take()
                .expect("polled after completion")
                .into())),
        }
    }
}

impl<S> Service<Request<Bytes>> for SizeGuard<S>
where
    S: Service<Request<Bytes>>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = GuardFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        let size = packet_size(req.topic().as_str(), req.body().len());
        if size > self.max {
            return GuardFuture {
                future: None,
                error: Some(TooLarge {
                    topic: req.topic().to_string(),
                    size,
                    max: self.max,
                }),
            };
        }
        GuardFuture {
            future: Some(self.inner.call(req)),
            error: None,
        }
    }
}
