//! Rejects a publish the broker would refuse, before anything is sent: the
//! whole packet ([`packet_size`]) against the packet limit, as the runtime's
//! sink and the broker count it. The error is
//! [`PublishError::TooLarge`], the one the sink reports for the same reason.
//!
//! It sits outside the retry in the [outbound stack](crate::OutboundStack):
//! another attempt cannot shrink a payload.
//!
//! ```
//! use bytes::Bytes;
//! use tower::{service_fn, Layer, ServiceExt};
//! use tower_mqtt::{layers::outbound::{PublishError, SizeGuardLayer}, BoxError, Request};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let sink = service_fn(|_: Request<Bytes>| async { Ok::<_, BoxError>(()) });
//! let svc = SizeGuardLayer::new(16).layer(sink);
//! let req = Request::builder("a").body(Bytes::from(vec![0u8; 64])).unwrap();
//! let err = svc.oneshot(req).await.unwrap_err();
//! assert!(matches!(err.downcast_ref(), Some(PublishError::TooLarge { max: 16, .. })));
//! # }
//! ```

use std::{
    fmt,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use pin_project_lite::pin_project;
use tower::{Layer, Service};
use tower_mqtt_core::{BoxError, Request};

use super::PublishError;

/// The packet limit unless configured otherwise: 1 MiB, the runtime's
/// default `MQTT_MAX_PACKET_SIZE`.
pub const DEFAULT_MAX_PACKET_SIZE: usize = 1 << 20;

/// Bytes of a PUBLISH packet on the wire for `topic` and a payload of
/// `payload` bytes, counted the way the broker counts its packet limit:
/// fixed header (at most 5 bytes), topic length and topic, packet id.
///
/// ```
/// use tower_mqtt::layers::outbound::packet_size;
///
/// assert_eq!(packet_size("a/b", 10), 5 + 2 + 3 + 2 + 10);
/// ```
pub const fn packet_size(topic: &str, payload: usize) -> usize {
    5 + 2 + topic.len() + 2 + payload
}

/// Makes [`SizeGuard`] services; see the [module docs](self).
#[derive(Clone, Copy, Debug)]
pub struct SizeGuardLayer {
    max: usize,
}

impl SizeGuardLayer {
    /// Packets larger than `max` bytes are rejected.
    ///
    /// ```
    /// use tower_mqtt::layers::outbound::SizeGuardLayer;
    ///
    /// let layer = SizeGuardLayer::new(256 * 1024);
    /// # let _ = layer;
    /// ```
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
    ///
    /// ```
    /// use bytes::Bytes;
    /// use tower_mqtt::layers::outbound::SizeGuard;
    ///
    /// # let sink = tower::service_fn(|_: tower_mqtt::Request<Bytes>| async { Ok::<_, tower_mqtt::BoxError>(()) });
    /// let svc = SizeGuard::new(sink, 1024);
    /// let sink = svc.into_inner();
    /// ```
    pub const fn new(inner: S, max: usize) -> Self {
        Self { inner, max }
    }

    /// A [`SizeGuardLayer`].
    ///
    /// ```
    /// use tower_mqtt::layers::outbound::SizeGuard;
    ///
    /// let layer = SizeGuard::<()>::layer(1024);
    /// # let _ = layer;
    /// ```
    pub const fn layer(max: usize) -> SizeGuardLayer {
        SizeGuardLayer::new(max)
    }

    tower_mqtt_core::define_inner_service_accessors!();
}

pin_project! {
    /// The future of [`SizeGuard`]: the inner service's, or the refusal.
    pub struct ResponseFuture<F> {
        #[pin]
        future: Option<F>,
        error: Option<PublishError>,
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("refused", &self.error)
            .finish_non_exhaustive()
    }
}

impl<F, T, E> Future for ResponseFuture<F>
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
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        let size = packet_size(req.topic().as_str(), req.body().len());
        if size > self.max {
            // Rare: the handle is looked up here rather than kept, which keeps
            // the guard `Copy` and its constructor `const`.
            metrics::counter!(
                tower_mqtt_core::metrics::PUBLISH_TOO_LARGE,
                tower_mqtt_core::metrics::SYSTEM => "mqtt"
            )
            .increment(1);
            return ResponseFuture {
                future: None,
                error: Some(PublishError::TooLarge {
                    topic: req.topic().to_string(),
                    size,
                    max: self.max,
                }),
            };
        }
        ResponseFuture {
            future: Some(self.inner.call(req)),
            error: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{service_fn, ServiceExt};

    #[tokio::test]
    async fn the_limit_itself_passes_and_one_byte_more_does_not() {
        let sink = service_fn(|_: Request<Bytes>| async { Ok::<_, BoxError>(()) });
        let max = packet_size("a/b", 100);
        let svc = SizeGuard::new(sink, max);
        let at_limit = Request::builder("a/b")
            .body(Bytes::from(vec![0; 100]))
            .unwrap();
        svc.oneshot(at_limit).await.unwrap();
        let over = Request::builder("a/b")
            .body(Bytes::from(vec![0; 101]))
            .unwrap();
        let err = svc.oneshot(over).await.unwrap_err();
        match err.downcast_ref::<PublishError>() {
            Some(PublishError::TooLarge {
                topic,
                size,
                max: limit,
            }) => {
                assert_eq!((topic.as_str(), *size, *limit), ("a/b", max + 1, max));
            }
            other => panic!("not the size guard's error: {other:?}"),
        }
    }
}
