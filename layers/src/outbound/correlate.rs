//! Correlation propagation: replies and stream chunks take the id of the
//! message being handled. The outbound mirror of
//! [`correlation_span`](crate::correlation_span).
//!
//! The fleet correlates by id: a reply reuses the request's id. A publish marked
//! with [`Reply`] gets the id of the message whose handler is running on this
//! task ([`correlation::current`], set by the inbound
//! [`CorrelationSpanLayer`](crate::CorrelationSpanLayer)).
//! [`CorrelateLayer::always`] correlates every publish made while a message is
//! handled.
//!
//! It comes first in the [outbound stack](crate::OutboundStack),
//! while the publish is still an envelope whose id can be replaced.
//!
//! ```
//! use tower::{service_fn, Layer, ServiceExt};
//! use tower_mqtt::{correlation::{self, CorrelationId}, Envelope, Request};
//! use tower_mqtt::layers::outbound::{CorrelateLayer, Reply};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let sink = service_fn(|req: Request<Envelope>| async move {
//!     Ok::<_, std::convert::Infallible>(req.body().id().to_owned())
//! });
//! let svc = CorrelateLayer::new().layer(sink);
//! let reply = Request::builder("memory/results")
//!     .extension(Reply)
//!     .body(Envelope::new("memory.results", serde_json::json!({})).unwrap())
//!     .unwrap();
//! let id = correlation::scope(CorrelationId::new("abc"), svc.oneshot(reply)).await.unwrap();
//! assert_eq!(id, "abc");
//! # }
//! ```

use std::task::{Context, Poll};

use tower::{Layer, Service};
use tower_mqtt_core::{correlation, Envelope, Request};

/// Marks an outgoing request as a reply (or stream chunk) to correlate.
///
/// tower-mqtt's `publisher.publish(..).reply_to(&req)` sets the id itself;
/// the mark is for an envelope sent whole with `publisher.send(..)`:
///
/// ```
/// use tower_mqtt::{layers::outbound::Reply, Envelope, Request};
///
/// let results = Envelope::new("memory.results", serde_json::json!({"k": 0})).unwrap();
/// let reply = Request::builder("memory/results").extension(Reply).body(results).unwrap();
/// // publisher.send(reply).await? inside the handler of memory/query
/// # let _ = reply;
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reply;

/// Makes [`Correlate`] services; see the [module docs](self).
#[derive(Clone, Copy, Debug, Default)]
pub struct CorrelateLayer {
    always: bool,
}

impl CorrelateLayer {
    /// Correlates publishes marked with [`Reply`].
    ///
    /// ```
    /// use tower::ServiceBuilder;
    /// use tower_mqtt::layers::outbound::CorrelateLayer;
    ///
    /// # let sink = tower::service_fn(|_: tower_mqtt::Request<tower_mqtt::Envelope>| async { Ok::<_, tower_mqtt::BoxError>(()) });
    /// let svc = ServiceBuilder::new().layer(CorrelateLayer::new()).service(sink);
    /// ```
    pub const fn new() -> Self {
        Self { always: false }
    }

    /// Correlates every publish made while a message is handled.
    ///
    /// ```
    /// use tower_mqtt::layers::outbound::CorrelateLayer;
    ///
    /// let layer = CorrelateLayer::always();
    /// # let _ = layer;
    /// ```
    pub const fn always() -> Self {
        Self { always: true }
    }
}

impl<S> Layer<S> for CorrelateLayer {
    type Service = Correlate<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Correlate {
            inner,
            always: self.always,
        }
    }
}

/// Sets the envelope id of replies; see the [module docs](self).
#[derive(Clone, Debug)]
pub struct Correlate<S> {
    inner: S,
    always: bool,
}

impl<S> Correlate<S> {
    /// Correlates `inner`'s publishes marked with [`Reply`].
    ///
    /// ```
    /// use tower_mqtt::layers::outbound::Correlate;
    ///
    /// # let sink = tower::service_fn(|_: tower_mqtt::Request<tower_mqtt::Envelope>| async { Ok::<_, tower_mqtt::BoxError>(()) });
    /// let svc = Correlate::new(sink);
    /// let sink = svc.into_inner();
    /// ```
    pub const fn new(inner: S) -> Self {
        Self {
            inner,
            always: false,
        }
    }

    /// A [`CorrelateLayer`] correlating marked publishes.
    ///
    /// ```
    /// use tower_mqtt::layers::outbound::Correlate;
    ///
    /// let layer = Correlate::<()>::layer();
    /// # let _ = layer;
    /// ```
    pub const fn layer() -> CorrelateLayer {
        CorrelateLayer::new()
    }

    tower_mqtt_core::define_inner_service_accessors!();
}

impl<S> Service<Request<Envelope>> for Correlate<S>
where
    S: Service<Request<Envelope>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Envelope>) -> Self::Future {
        let wanted = self.always || req.extensions().get::<Reply>().is_some();
        let req = match correlation::current() {
            Some(id) if wanted => req.map(|envelope| envelope.with_id(id.as_str())),
            _ => req,
        };
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{service_fn, ServiceExt};
    use tower_mqtt_core::correlation::CorrelationId;

    fn sink(
    ) -> impl Service<Request<Envelope>, Response = String, Error = std::convert::Infallible> + Clone
    {
        service_fn(|req: Request<Envelope>| async move { Ok(req.body().id().to_owned()) })
    }

    fn request(reply: bool) -> (Request<Envelope>, String) {
        let env = Envelope::new("x.y", serde_json::json!({})).unwrap();
        let id = env.id().to_owned();
        let mut req = Request::builder("x/y").body(env).unwrap();
        if reply {
            req.extensions_mut().insert(Reply);
        }
        (req, id)
    }

    #[tokio::test]
    async fn only_marked_publishes_by_default() {
        let svc = CorrelateLayer::new().layer(sink());
        let (marked, _) = request(true);
        let (plain, own_id) = request(false);
        let scope = CorrelationId::new("req-1");
        let got = correlation::scope(scope.clone(), svc.clone().oneshot(marked))
            .await
            .unwrap();
        assert_eq!(got, "req-1");
        let got = correlation::scope(scope, svc.oneshot(plain)).await.unwrap();
        assert_eq!(got, own_id);
    }

    #[tokio::test]
    async fn always_correlates_inside_a_handler_and_not_outside() {
        let svc = CorrelateLayer::always().layer(sink());
        let (req, _) = request(false);
        let got = correlation::scope(CorrelationId::new("req-2"), svc.clone().oneshot(req))
            .await
            .unwrap();
        assert_eq!(got, "req-2");
        let (req, own_id) = request(true);
        assert_eq!(
            svc.oneshot(req).await.unwrap(),
            own_id,
            "no message, no correlation"
        );
    }
}
