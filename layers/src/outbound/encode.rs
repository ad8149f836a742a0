//! Envelopes to wire bytes: exactly the five keys, with this service's source.
//! The outbound mirror of [`decode`](crate::decode).
//!
//! An envelope that kept the default source (`"router"`, the fleet's Python
//! default) is stamped with this service's name; one that names its own
//! source keeps it.
//!
//! The encoded request carries the envelope's id as its
//! [correlation id](Request::correlation_id), so that the layers below and the runtime, which see only bytes,
//! log every attempt, retry and drop with it (FR-008).
//!
//! ```
//! use bytes::Bytes;
//! use tower::{service_fn, Layer, ServiceExt};
//! use tower_mqtt::{Envelope, Request};
//! use tower_mqtt::layers::outbound::EncodeLayer;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let sink = service_fn(|req: Request<Bytes>| async move {
//!     Ok::<_, std::convert::Infallible>(req.into_body())
//! });
//! let svc = EncodeLayer::new("stt-worker").layer(sink);
//! let env = Envelope::new("stt.final", serde_json::json!({"text": "hi"})).unwrap();
//! let bytes = svc.oneshot(Request::builder("stt/final").body(env).unwrap()).await.unwrap();
//! let wire: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
//! assert_eq!(wire["source"], "stt-worker");
//! assert_eq!(wire.as_object().unwrap().len(), 5);
//! # }
//! ```

use std::{
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use tower::{Layer, Service};
use tower_mqtt_core::{correlation::CorrelationId, envelope::DEFAULT_SOURCE, Envelope, Request};

/// Makes [`Encode`] services; see the [module docs](self).
#[derive(Clone, Debug)]
pub struct EncodeLayer {
    source: Arc<str>,
}

impl EncodeLayer {
    /// Encodes envelopes; those that kept the default source get `source`.
    ///
    /// ```
    /// use tower_mqtt::layers::outbound::EncodeLayer;
    ///
    /// let layer = EncodeLayer::new("stt-worker");
    /// # let _ = layer;
    /// ```
    pub fn new(source: impl AsRef<str>) -> Self {
        Self {
            source: source.as_ref().into(),
        }
    }
}

impl<S> Layer<S> for EncodeLayer {
    type Service = Encode<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Encode {
            inner,
            source: self.source.clone(),
        }
    }
}

/// Encodes envelopes to JSON bytes; see the [module docs](self).
#[derive(Clone, Debug)]
pub struct Encode<S> {
    inner: S,
    source: Arc<str>,
}

impl<S> Encode<S> {
    /// Encodes for `inner`, stamping `source` on envelopes with the default one.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use tower_mqtt::layers::outbound::Encode;
    ///
    /// # let sink = tower::service_fn(|_: tower_mqtt::Request<Bytes>| async { Ok::<_, tower_mqtt::BoxError>(()) });
    /// let svc = Encode::new(sink, "stt-worker");
    /// let sink = svc.into_inner();
    /// ```
    pub fn new(inner: S, source: impl AsRef<str>) -> Self {
        Self {
            inner,
            source: source.as_ref().into(),
        }
    }

    /// An [`EncodeLayer`].
    ///
    /// ```
    /// use tower_mqtt::layers::outbound::Encode;
    ///
    /// let layer = Encode::<()>::layer("stt-worker");
    /// # let _ = layer;
    /// ```
    pub fn layer(source: impl AsRef<str>) -> EncodeLayer {
        EncodeLayer::new(source)
    }

    tower_mqtt_core::define_inner_service_accessors!();
}

impl<S> Service<Request<Envelope>> for Encode<S>
where
    S: Service<Request<Bytes>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Envelope>) -> Self::Future {
        let source = &self.source;
        let id = CorrelationId::of(req.body());
        let mut encoded = req.map(|envelope| {
            if envelope.source() == DEFAULT_SOURCE {
                envelope.with_source(&**source).to_bytes()
            } else {
                envelope.to_bytes()
            }
        });
        encoded.set_correlation_id(id);
        self.inner.call(encoded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{service_fn, ServiceExt};

    #[tokio::test]
    async fn keeps_an_explicit_source() {
        let sink = service_fn(|req: Request<Bytes>| async move {
            Ok::<_, std::convert::Infallible>(req.into_body())
        });
        let svc = EncodeLayer::new("me").layer(sink);
        let env = Envelope::new("a.b", serde_json::json!({}))
            .unwrap()
            .with_source("them");
        let bytes = svc
            .oneshot(Request::builder("a/b").body(env.clone()).unwrap())
            .await
            .unwrap();
        assert_eq!(Envelope::from_slice(&bytes).unwrap(), env);
    }

    #[tokio::test]
    async fn the_encoded_request_carries_the_envelope_id() {
        let sink = service_fn(|req: Request<Bytes>| async move {
            Ok::<_, std::convert::Infallible>(req.correlation_id().cloned())
        });
        let svc = EncodeLayer::new("me").layer(sink);
        let env = Envelope::new("a.b", serde_json::json!({})).unwrap();
        let id = svc
            .oneshot(Request::builder("a/b").body(env.clone()).unwrap())
            .await
            .unwrap();
        assert_eq!(id.unwrap().as_str(), env.id());
    }
}
