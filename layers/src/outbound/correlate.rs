//! Correlation propagation: replies and stream chunks take the id of the
//! message being handled, and every publish carries the trace it belongs to.
//! The outbound mirror of [`correlation_span`](crate::correlation_span).
//!
//! The fleet correlates by id: a reply reuses the request's id. A publish marked
//! with [`Reply`] gets the id of the message whose handler is running on this
//! task ([`correlation::current`], set by the inbound
//! [`CorrelationSpanLayer`](crate::CorrelationSpanLayer)).
//! [`CorrelateLayer::always`] correlates every publish made while a message is
//! handled.
//!
//! Every publish, marked or not, also carries a W3C trace context in its
//! `traceparent` and `tracestate` user properties (sent over MQTT 5): the
//! trace of the message being handled ([`trace_context::current`]) with a
//! span id of the publish's own, or a new trace when no message is being
//! handled; a publish that already has a `traceparent` keeps it. See
//! [`trace_context`] for the rules. Each publish runs in
//! a span, `mqtt.publish`, with OpenTelemetry's messaging attributes for a
//! producer (`messaging.system = "mqtt"`, `messaging.destination.name`,
//! `messaging.operation.name = "publish"`, `messaging.operation.type =
//! "send"`, `otel.kind = "producer"`) and the publish's `trace_id` and
//! `span_id`, entered while the layers below it run, so their logs (a retry, a
//! drop) carry the topic and the trace.
//!
//! It comes first in the [outbound stack](crate::OutboundStack),
//! while the publish is still an envelope whose id can be replaced, and so
//! that its span covers every attempt.
//!
//! ```
//! use tower::{service_fn, Layer, ServiceExt};
//! use tower_mqtt::{correlation::{self, CorrelationId}, Envelope, Request};
//! use tower_mqtt::layers::outbound::{CorrelateLayer, Reply};
//! use tower_mqtt::layers::trace_context::{self, TraceContext};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let sink = service_fn(|req: Request<Envelope>| async move {
//!     let traceparent = req.properties().user_property("traceparent").unwrap().to_owned();
//!     Ok::<_, std::convert::Infallible>((req.body().id().to_owned(), traceparent))
//! });
//! let svc = CorrelateLayer::new().layer(sink);
//! let reply = Request::builder("memory/results")
//!     .extension(Reply)
//!     .body(Envelope::new("memory.results", serde_json::json!({})).unwrap())
//!     .unwrap();
//! // What the inbound layer sets while the request "abc" is handled.
//! let trace = TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
//! let handling = correlation::scope(CorrelationId::new("abc"), trace_context::scope(trace, svc.oneshot(reply)));
//! let (id, traceparent) = handling.await.unwrap();
//! assert_eq!(id, "abc");
//! assert!(traceparent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
//! assert!(!traceparent.contains("00f067aa0ba902b7"), "a span of its own");
//! # }
//! ```

use std::{
    fmt,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use pin_project_lite::pin_project;
use tower::{Layer, Service};
use tower_mqtt_core::{correlation, Envelope, Request};
use tracing::{field::Empty, Span};

use crate::trace_context::{self, TraceContext, TRACEPARENT};

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
#[derive(Clone, Copy, Debug)]
pub struct CorrelateLayer {
    always: bool,
    carry: bool,
}

impl Default for CorrelateLayer {
    fn default() -> Self {
        Self::new()
    }
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
        Self {
            always: false,
            carry: true,
        }
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
        Self {
            always: true,
            carry: true,
        }
    }

    /// Whether the publish's trace context goes into its `traceparent` and
    /// `tracestate` user properties (the default), or is only recorded on its
    /// span: for a connection that sends no properties (MQTT 3.1.1), where
    /// writing them is work thrown away (measured: about 1,900 instructions
    /// per publish, mostly the properties' allocations).
    ///
    /// ```
    /// use tower_mqtt::layers::outbound::CorrelateLayer;
    ///
    /// let layer = CorrelateLayer::new().carry_trace_context(false);
    /// # let _ = layer;
    /// ```
    #[must_use]
    pub const fn carry_trace_context(mut self, carry: bool) -> Self {
        self.carry = carry;
        self
    }
}

impl<S> Layer<S> for CorrelateLayer {
    type Service = Correlate<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Correlate {
            inner,
            always: self.always,
            carry: self.carry,
        }
    }
}

/// Sets the envelope id of replies and the trace context of every publish;
/// see the [module docs](self).
#[derive(Clone, Debug)]
pub struct Correlate<S> {
    inner: S,
    always: bool,
    carry: bool,
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
            carry: true,
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
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Envelope>) -> Self::Future {
        let wanted = self.always || req.extensions().get::<Reply>().is_some();
        let mut req = match correlation::current() {
            Some(id) if wanted => req.map(|envelope| envelope.with_id(id.as_str())),
            _ => req,
        };
        let span = tracing::info_span!(
            "mqtt.publish",
            messaging.system = "mqtt",
            messaging.destination.name = %req.topic(),
            messaging.operation.name = "publish",
            messaging.operation.type = "send",
            otel.kind = "producer",
            trace_id = Empty,
            span_id = Empty,
        );
        if let Some(given) = req.properties().user_property(TRACEPARENT) {
            // The caller's own context, kept; logged if it is one.
            if let Some(given) = TraceContext::parse(given) {
                trace_context::record(&span, &given);
            }
        } else {
            let own = trace_context::for_publish(&span);
            if self.carry {
                own.inject(req.properties_mut());
            }
        }
        let future = {
            let _entered = span.enter();
            self.inner.call(req)
        };
        ResponseFuture {
            inner: future,
            span,
        }
    }
}

pin_project! {
    /// The future of [`Correlate`]: the inner future, polled inside the
    /// publish's span.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        span: Span,
    }
}

impl<F: Future> Future for ResponseFuture<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let _entered = this.span.enter();
        this.inner.poll(cx)
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("span", &self.span)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{service_fn, ServiceExt};
    use tower_mqtt_core::correlation::CorrelationId;

    fn traceparent_of(
    ) -> impl Service<Request<Envelope>, Response = Option<String>, Error = std::convert::Infallible>
           + Clone {
        service_fn(|req: Request<Envelope>| async move {
            Ok(req
                .properties()
                .user_property(TRACEPARENT)
                .map(str::to_owned))
        })
    }

    #[tokio::test]
    async fn a_context_not_carried_leaves_the_properties_alone() {
        let publish = || {
            let env = Envelope::new("a.b", serde_json::json!({})).unwrap();
            Request::builder("a/b").body(env).unwrap()
        };
        let carried = CorrelateLayer::new().layer(traceparent_of());
        assert!(carried.oneshot(publish()).await.unwrap().is_some());
        let kept = CorrelateLayer::always()
            .carry_trace_context(false)
            .layer(service_fn(|req: Request<Envelope>| async move {
                Ok::<_, std::convert::Infallible>(req.properties().is_empty())
            }));
        assert!(kept.oneshot(publish()).await.unwrap(), "no properties made");
    }

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

    #[tokio::test]
    async fn every_publish_carries_a_child_of_the_current_trace() {
        let svc = CorrelateLayer::new().layer(traceparent_of());
        let handling =
            TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        let (plain, _) = request(false);
        let sent = trace_context::scope(handling.clone(), svc.clone().oneshot(plain))
            .await
            .unwrap()
            .expect("not only replies");
        let sent = TraceContext::parse(&sent).unwrap();
        assert_eq!(sent.trace_id(), handling.trace_id());
        assert_ne!(sent.span_id(), handling.span_id());

        let (outside, _) = request(false);
        let sent = svc.oneshot(outside).await.unwrap().unwrap();
        assert_ne!(
            TraceContext::parse(&sent).unwrap().trace_id(),
            handling.trace_id(),
            "outside a message, a new trace"
        );
    }

    #[tokio::test]
    async fn a_traceparent_already_set_is_kept() {
        let svc = CorrelateLayer::new().layer(traceparent_of());
        let (mut req, _) = request(false);
        req.properties_mut().add_user_property(TRACEPARENT, "mine");
        assert_eq!(svc.oneshot(req).await.unwrap().as_deref(), Some("mine"));
    }
}
