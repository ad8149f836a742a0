//! What a route is: [`RouteService`], the one type every route is stored as,
//! the adapter that turns any service or handler into one, and [`Panicked`],
//! the failure a panicking handler becomes.

use std::{any::Any, convert::Infallible, future::Future, panic::AssertUnwindSafe, sync::Arc};

use futures_util::FutureExt;
use tower::{util::BoxCloneSyncService, Layer, Service, ServiceExt};

use crate::{
    envelope::Envelope,
    handler::Handler,
    outcome::{BoxError, HandlerError, IntoOutcome, Outcome},
    request::Request,
    subscription::Subscription,
};

/// The type every route is stored as.
pub type RouteService = BoxCloneSyncService<Request<Envelope>, Outcome, Infallible>;

/// Makes a route's service once the state is known.
type MakeRoute<S> = Arc<dyn Fn(S) -> RouteService + Send + Sync>;

/// A route's service, or how to make it from the state.
pub(super) enum Endpoint<S> {
    Ready(RouteService),
    NeedsState(MakeRoute<S>),
}

impl<S> Clone for Endpoint<S> {
    fn clone(&self) -> Self {
        match self {
            Self::Ready(service) => Self::Ready(service.clone()),
            Self::NeedsState(make) => Self::NeedsState(make.clone()),
        }
    }
}

impl<S: Clone + Send + Sync + 'static> Endpoint<S> {
    /// The endpoint of a handler: ready at once when the state is `()`, which
    /// needs no `with_state`.
    pub(super) fn handler<H, M>(handler: H) -> Self
    where
        H: Handler<M, S>,
        M: 'static,
    {
        match (&() as &dyn Any).downcast_ref::<S>() {
            Some(unit) => Self::Ready(into_route(handler.with_state(unit.clone()))),
            None => Self::NeedsState(Arc::new(move |state| {
                into_route(handler.clone().with_state(state))
            })),
        }
    }

    pub(super) fn layer<L>(self, layer: L) -> Self
    where
        L: Layer<RouteService> + Clone + Send + Sync + 'static,
        L::Service: Service<Request<Envelope>> + Clone + Send + Sync + 'static,
        <L::Service as Service<Request<Envelope>>>::Response: IntoOutcome,
        <L::Service as Service<Request<Envelope>>>::Error: Into<BoxError>,
        <L::Service as Service<Request<Envelope>>>::Future: Send + 'static,
    {
        match self {
            Self::Ready(service) => Self::Ready(into_route(layer.layer(service))),
            Self::NeedsState(make) => {
                Self::NeedsState(Arc::new(move |state| into_route(layer.layer(make(state)))))
            }
        }
    }

    pub(super) fn with_state<S2>(self, state: &S) -> Endpoint<S2> {
        match self {
            Self::Ready(service) => Endpoint::Ready(service),
            Self::NeedsState(make) => Endpoint::Ready(make(state.clone())),
        }
    }
}

impl Endpoint<()> {
    pub(super) fn service(&self) -> RouteService {
        match self {
            Self::Ready(service) => service.clone(),
            Self::NeedsState(make) => make(()),
        }
    }
}

/// A route: its subscription, and its service unless it only subscribes.
pub(super) struct Route<S> {
    pub(super) subscription: Subscription,
    pub(super) endpoint: Option<Endpoint<S>>,
}

impl<S> Clone for Route<S> {
    fn clone(&self) -> Self {
        Self {
            subscription: self.subscription.clone(),
            endpoint: self.endpoint.clone(),
        }
    }
}

/// Adapts any service to a [`RouteService`]: responses become outcomes, errors
/// become [`Outcome::Failed`], and a panic becomes a failure of this route only.
pub(super) fn into_route<S>(service: S) -> RouteService
where
    S: Service<Request<Envelope>> + Clone + Send + Sync + 'static,
    S::Response: IntoOutcome,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    BoxCloneSyncService::new(service_fn_route(service))
}

fn service_fn_route<S>(
    service: S,
) -> impl Service<
    Request<Envelope>,
    Response = Outcome,
    Error = Infallible,
    Future = impl Future<Output = Result<Outcome, Infallible>> + Send,
> + Clone
       + Send
       + Sync
where
    S: Service<Request<Envelope>> + Clone + Send + Sync + 'static,
    S::Response: IntoOutcome,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    tower::service_fn(move |req: Request<Envelope>| {
        let service = service.clone();
        // `oneshot` drives readiness before calling; both run inside the
        // catch, so a panic in `poll_ready`, `call` or the future is contained.
        let run = AssertUnwindSafe(service.oneshot(req)).catch_unwind();
        async move {
            Ok(match run.await {
                Ok(Ok(response)) => response.into_outcome(),
                Ok(Err(err)) => Outcome::Failed(HandlerError::from_boxed(err.into())),
                Err(panic) => Outcome::Failed(HandlerError::new(Panicked::from_payload(&*panic))),
            })
        }
    })
}

/// A handler panicked; the message says what it panicked with.
#[derive(Debug, Clone, thiserror::Error)]
#[error("handler panicked: {message}")]
pub struct Panicked {
    message: String,
}

impl Panicked {
    /// Describes a panic payload, as caught by `catch_unwind`.
    ///
    /// ```
    /// let payload = std::panic::catch_unwind(|| panic!("bad frame")).unwrap_err();
    /// let err = tower_mqtt::router::Panicked::from_payload(&*payload);
    /// assert_eq!(err.to_string(), "handler panicked: bad frame");
    /// ```
    pub fn from_payload(payload: &(dyn std::any::Any + Send)) -> Self {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a non-string payload".to_owned());
        Self { message }
    }

    /// What the handler panicked with.
    pub fn message(&self) -> &str {
        &self.message
    }
}
