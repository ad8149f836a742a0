//! Topic routing: [`Router`].
//!
//! A router maps topic filters to handlers. A message goes to **every** route
//! whose filter matches its topic, as MQTT delivers a message to every matching
//! subscription; each route runs isolated from the others (an error or a panic in
//! one is that route's failure only). When no route matches, the fallback runs.
//!
//! ```
//! use tower::ServiceExt;
//! use tower_mqtt::{Data, Envelope, Outcome, QoS, Request, Router, Subscription, TopicParams};
//!
//! async fn on_frame(req: Request<Envelope>) {
//!     let camera = req.extensions().get::<TopicParams>().unwrap().get(0).unwrap();
//!     assert_eq!(camera, "front");
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let router = Router::new()
//!     .route("camera/+/frame", on_frame)
//!     .route(Subscription::new("llm/stream").qos(QoS::AtMostOnce), |_: Request<Envelope>| async {})
//!     .fallback(|req: Request<Envelope>| async move { println!("unexpected {}", req.topic()) });
//!
//! let frame = Request::builder("camera/front/frame")
//!     .body(Envelope::new("camera.frame", serde_json::json!({})).unwrap())
//!     .unwrap();
//! let outcome = router.clone().oneshot(frame).await.unwrap();
//! assert!(matches!(outcome, Outcome::Handled));
//!
//! // The runtime subscribes to exactly these:
//! let filters: Vec<_> = router.subscriptions().into_iter().map(|(f, q)| (f.to_string(), q)).collect();
//! assert_eq!(filters, [("camera/+/frame".to_owned(), QoS::AtLeastOnce), ("llm/stream".to_owned(), QoS::AtMostOnce)]);
//! # }
//! ```
//!
//! # Overlapping routes
//!
//! When one route's filter covers another's (`sensors/#` and `sensors/+/temp`),
//! [`Router::subscriptions`] subscribes only to the wider one, with the higher of
//! the two QoS levels, so the broker sends one copy of each message and the router
//! hands it to both routes. Filters that only partly overlap (`a/+/c` and `a/b/+`)
//! cannot be merged: brokers may then deliver one copy per subscription, and each
//! copy reaches both routes. Put a dedup layer in the stack (tower-mqtt-layers'
//! `Dedup`) to absorb the second copy of an envelope.
//!
//! # Retries and several routes
//!
//! Middleware around the router sees one outcome for all the routes a message
//! reached. When some of them failed, the failure ([`RoutesFailed`]) names
//! them, and the standard retry runs only those again ([`RemainingRoutes`]).
//! To give one route a retry or timeout of its own, use [`Router::layer`].

use std::{
    any::Any,
    collections::HashMap,
    convert::Infallible,
    fmt,
    future::Future,
    panic::AssertUnwindSafe,
    pin::Pin,
    sync::{Arc, OnceLock},
    task::{Context, Poll},
};

use futures_util::{future::join_all, FutureExt};
use tower::{util::BoxCloneSyncService, Layer, Service, ServiceExt};

use crate::{
    envelope::Envelope,
    handler::Handler,
    outcome::{BoxError, HandlerError, IntoOutcome, Outcome},
    request::{QoS, Request},
    subscription::{IntoSubscription, Subscription},
    topic::{TopicFilter, TopicName, TopicParams},
};

/// The type every route is stored as.
pub type RouteService = BoxCloneSyncService<Request<Envelope>, Outcome, Infallible>;

/// Makes a route's service once the state is known.
type MakeRoute<S> = Arc<dyn Fn(S) -> RouteService + Send + Sync>;

/// A route's service, or how to make it from the state.
enum Endpoint<S> {
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
    fn handler<H, M>(handler: H) -> Self
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

    fn layer<L>(self, layer: L) -> Self
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

    fn with_state<S2>(self, state: &S) -> Endpoint<S2> {
        match self {
            Self::Ready(service) => Endpoint::Ready(service),
            Self::NeedsState(make) => Endpoint::Ready(make(state.clone())),
        }
    }
}

impl Endpoint<()> {
    fn service(&self) -> RouteService {
        match self {
            Self::Ready(service) => service.clone(),
            Self::NeedsState(make) => make(()),
        }
    }
}

struct Route<S> {
    subscription: Subscription,
    endpoint: Option<Endpoint<S>>,
}

impl<S> Clone for Route<S> {
    fn clone(&self) -> Self {
        Self {
            subscription: self.subscription.clone(),
            endpoint: self.endpoint.clone(),
        }
    }
}

struct Inner<S> {
    routes: Vec<Route<S>>,
    fallback: Option<Endpoint<S>>,
    /// Built at the first lookup; a change makes a new `Inner` without one.
    index: OnceLock<RouteIndex>,
}

impl<S> Clone for Inner<S> {
    fn clone(&self) -> Self {
        Self {
            routes: self.routes.clone(),
            fallback: self.fallback.clone(),
            index: OnceLock::new(),
        }
    }
}

impl<S> Inner<S> {
    fn index(&self) -> &RouteIndex {
        self.index.get_or_init(|| {
            RouteIndex::new(self.routes.iter().map(|route| route.subscription.filter()))
        })
    }

    /// The positions of the routes whose filters match `topic`, in the order
    /// the routes were added.
    fn matching(&self, topic: &TopicName) -> impl Iterator<Item = usize> + '_ {
        let topic = topic.clone();
        self.index()
            .candidates(&topic)
            .into_iter()
            .filter(move |&i| self.routes[i].subscription.filter().matches(&topic))
    }
}

/// Routes by the first level of their filter, so a message is matched only
/// against routes that can match it: those whose first level is its own,
/// and those that start with a wildcard.
#[derive(Debug, Default)]
struct RouteIndex {
    by_first_level: HashMap<Box<str>, Vec<usize>>,
    wildcard_first: Vec<usize>,
}

impl RouteIndex {
    fn new<'a>(filters: impl Iterator<Item = &'a TopicFilter>) -> Self {
        let mut index = Self::default();
        for (i, filter) in filters.enumerate() {
            let first = filter.pattern().split('/').next().unwrap_or_default();
            if first == "+" || first == "#" {
                index.wildcard_first.push(i);
            } else {
                index
                    .by_first_level
                    .entry(first.into())
                    .or_default()
                    .push(i);
            }
        }
        index
    }

    fn candidates(&self, topic: &TopicName) -> Vec<usize> {
        let first = topic.as_str().split('/').next().unwrap_or_default();
        let literal = self
            .by_first_level
            .get(first)
            .map_or(&[][..], Vec::as_slice);
        if self.wildcard_first.is_empty() {
            return literal.to_vec();
        }
        let mut all = [literal, &self.wildcard_first].concat();
        all.sort_unstable();
        all
    }
}

/// Routes messages to handlers by topic; see the [module docs](self).
///
/// Cheap to clone (an `Arc` inside), always ready, never fails: a failure is an
/// [`Outcome::Failed`].
///
/// `S` is the state its handlers take with [`State`](crate::extract::State):
/// a `Router<S>` becomes a service once [`Router::with_state`] gives it one;
/// a `Router<()>` (the default) is one already.
#[must_use]
pub struct Router<S = ()> {
    inner: Arc<Inner<S>>,
}

impl<S> Clone for Router<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<S: Clone + Send + Sync + 'static> Default for Router<S> {
    fn default() -> Self {
        Self::new()
    }
}

impl<S> fmt::Debug for Router<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Router")
            .field(
                "routes",
                &self
                    .inner
                    .routes
                    .iter()
                    .map(|route| route.subscription.filter().as_str())
                    .collect::<Vec<_>>(),
            )
            .field("fallback", &self.inner.fallback.is_some())
            .finish()
    }
}

impl<S: Clone + Send + Sync + 'static> Router<S> {
    /// An empty router.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                routes: Vec::new(),
                fallback: None,
                index: OnceLock::new(),
            }),
        }
    }

    fn inner_mut(&mut self) -> &mut Inner<S> {
        Arc::make_mut(&mut self.inner)
    }

    /// Adds a route: messages on topics matching `subscription` (a filter string
    /// or a [`Subscription`]) go to `handler`.
    ///
    /// # Panics
    ///
    /// When the filter is invalid; the message names the route.
    ///
    /// ```should_panic
    /// use tower_mqtt::{Envelope, Request, Router};
    ///
    /// // panics: invalid route "sport/tennis#": ...
    /// Router::<()>::new().route("sport/tennis#", |_: Request<Envelope>| async {});
    /// ```
    #[track_caller]
    pub fn route<H, M>(mut self, subscription: impl IntoSubscription, handler: H) -> Self
    where
        H: Handler<M, S>,
        M: 'static,
    {
        let subscription = subscription.into_subscription();
        self.inner_mut().routes.push(Route {
            subscription,
            endpoint: Some(Endpoint::handler(handler)),
        });
        self
    }

    /// Adds a route served by any [`tower::Service`] whose response is
    /// [`IntoOutcome`]. Its errors (from `poll_ready` or the call) become
    /// [`Outcome::Failed`].
    ///
    /// ```
    /// use tower::service_fn;
    /// use tower_mqtt::{BoxError, Envelope, Request, Router};
    ///
    /// let svc = service_fn(|req: Request<Envelope>| async move {
    ///     println!("{}", req.body().event_type());
    ///     Ok::<_, BoxError>(())
    /// });
    /// let router: Router = Router::new().route_service("system/health/+", svc);
    /// ```
    #[track_caller]
    pub fn route_service<T>(mut self, subscription: impl IntoSubscription, service: T) -> Self
    where
        T: Service<Request<Envelope>> + Clone + Send + Sync + 'static,
        T::Response: IntoOutcome,
        T::Error: Into<BoxError>,
        T::Future: Send + 'static,
    {
        let subscription = subscription.into_subscription();
        self.inner_mut().routes.push(Route {
            subscription,
            endpoint: Some(Endpoint::Ready(into_route(service))),
        });
        self
    }

    /// Subscribes to `subscription` without a route of its own: its messages go
    /// to routes whose filters match, else to the fallback.
    #[track_caller]
    pub fn subscribe(mut self, subscription: impl IntoSubscription) -> Self {
        let subscription = subscription.into_subscription();
        self.inner_mut().routes.push(Route {
            subscription,
            endpoint: None,
        });
        self
    }

    /// Sets the handler for messages that no route matches. Without one, such a
    /// message is [`Outcome::Unrouted`].
    pub fn fallback<H, M>(mut self, handler: H) -> Self
    where
        H: Handler<M, S>,
        M: 'static,
    {
        self.inner_mut().fallback = Some(Endpoint::handler(handler));
        self
    }

    /// Sets any [`tower::Service`] as the fallback.
    pub fn fallback_service<T>(mut self, service: T) -> Self
    where
        T: Service<Request<Envelope>> + Clone + Send + Sync + 'static,
        T::Response: IntoOutcome,
        T::Error: Into<BoxError>,
        T::Future: Send + 'static,
    {
        self.inner_mut().fallback = Some(Endpoint::Ready(into_route(service)));
        self
    }

    /// Wraps every route added so far, and the fallback, in `layer`: per-route
    /// middleware, such as a retry that reruns only the route that failed.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower::timeout::TimeoutLayer;
    /// use tower_mqtt::{Envelope, Request, Router};
    ///
    /// let router: Router = Router::new()
    ///     .route("tts/say", |_: Request<Envelope>| async {})
    ///     .layer(TimeoutLayer::new(Duration::from_secs(5)));
    /// ```
    pub fn layer<L>(mut self, layer: L) -> Self
    where
        L: Layer<RouteService> + Clone + Send + Sync + 'static,
        L::Service: Service<Request<Envelope>> + Clone + Send + Sync + 'static,
        <L::Service as Service<Request<Envelope>>>::Response: IntoOutcome,
        <L::Service as Service<Request<Envelope>>>::Error: Into<BoxError>,
        <L::Service as Service<Request<Envelope>>>::Future: Send + 'static,
    {
        let inner = self.inner_mut();
        for route in &mut inner.routes {
            route.endpoint = route.endpoint.take().map(|e| e.layer(layer.clone()));
        }
        inner.fallback = inner.fallback.take().map(|e| e.layer(layer));
        self
    }

    /// Gives the handlers their state, which they take with
    /// [`State`](crate::extract::State): the router becomes a service.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use tower_mqtt::{extract::State, Data, Router};
    ///
    /// #[derive(Default)]
    /// struct Memory { notes: std::sync::Mutex<Vec<String>> }
    ///
    /// async fn remember(State(memory): State<Arc<Memory>>, Data(text): Data<String>) {
    ///     memory.notes.lock().unwrap().push(text);
    /// }
    ///
    /// let router: Router = Router::new()
    ///     .route("stt/final", remember)
    ///     .with_state(Arc::new(Memory::default()));
    /// ```
    pub fn with_state<S2>(self, state: S) -> Router<S2> {
        let inner = Arc::unwrap_or_clone(self.inner);
        Router {
            inner: Arc::new(Inner {
                routes: inner
                    .routes
                    .into_iter()
                    .map(|route| Route {
                        subscription: route.subscription,
                        endpoint: route.endpoint.map(|e| e.with_state(&state)),
                    })
                    .collect(),
                fallback: inner.fallback.map(|e| e.with_state(&state)),
                index: OnceLock::new(),
            }),
        }
    }

    /// The routes' subscriptions, in the order they were added.
    pub fn routes(&self) -> impl Iterator<Item = &Subscription> {
        self.inner.routes.iter().map(|route| &route.subscription)
    }

    /// The first route (in the order added) whose filter matches `topic`: the
    /// runtime queues the message by that route's settings.
    pub fn subscription_for(&self, topic: &TopicName) -> Option<&Subscription> {
        let first = self.inner.matching(topic).next()?;
        Some(&self.inner.routes[first].subscription)
    }

    /// The routes whose filters match `topic`, in the order they were added:
    /// those a message on `topic` reaches.
    ///
    /// ```
    /// use tower_mqtt::{Router, TopicName};
    ///
    /// let router: Router = Router::new().subscribe("a/+").subscribe("b/#").subscribe("#");
    /// let topic = TopicName::new("a/x").unwrap();
    /// let filters: Vec<_> = router.matching(&topic).map(|s| s.filter().as_str()).collect();
    /// assert_eq!(filters, ["a/+", "#"]);
    /// ```
    pub fn matching<'a>(
        &'a self,
        topic: &TopicName,
    ) -> impl Iterator<Item = &'a Subscription> + 'a {
        self.inner
            .matching(topic)
            .map(|i| &self.inner.routes[i].subscription)
    }

    /// The filters to subscribe to, each with its QoS: one per route, except that
    /// a filter covered by another is left out and its QoS given to the wider one
    /// (see the [module docs](self)). Shared subscriptions are kept as they are.
    pub fn subscriptions(&self) -> Vec<(TopicFilter, QoS)> {
        let subs: Vec<&Subscription> = self.routes().collect();
        let mut out: Vec<(TopicFilter, QoS)> = Vec::new();
        for (i, sub) in subs.iter().enumerate() {
            let filter = sub.filter();
            let shared = filter.share_group().is_some();
            // Covered by another (non-shared) filter: strictly wider, or the same
            // filter added earlier.
            let covered = !shared
                && subs.iter().enumerate().any(|(j, other)| {
                    let other = other.filter();
                    j != i
                        && other.share_group().is_none()
                        && other.covers(filter)
                        && (!filter.covers(other) || j < i)
                });
            if covered {
                continue;
            }
            let qos = subs
                .iter()
                .filter(|other| {
                    if shared {
                        other.filter() == filter
                    } else {
                        other.filter().share_group().is_none() && filter.covers(other.filter())
                    }
                })
                .map(|other| other.get_qos())
                .max()
                .unwrap_or(sub.get_qos());
            if !out.iter().any(|(f, _)| f == filter) {
                out.push((filter.clone(), qos));
            }
        }
        out
    }
}

/// Adapts any service to a [`RouteService`]: responses become outcomes, errors
/// become [`Outcome::Failed`], and a panic becomes a failure of this route only.
fn into_route<S>(service: S) -> RouteService
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

/// Several routes failed on one message.
#[derive(Debug, thiserror::Error)]
#[error("{}", failures.iter().map(|(filter, err)| format!("route {filter}: {err}")).collect::<Vec<_>>().join("; "))]
pub struct RoutesFailed {
    failures: Vec<(TopicFilter, HandlerError)>,
}

impl RoutesFailed {
    /// Each failed route's filter with its error.
    pub fn failures(&self) -> &[(TopicFilter, HandlerError)] {
        &self.failures
    }

    /// The failed routes, for the next attempt: see [`RemainingRoutes`].
    pub fn remaining(&self) -> RemainingRoutes {
        RemainingRoutes(
            self.failures
                .iter()
                .map(|(filter, _)| filter.clone())
                .collect(),
        )
    }
}

/// The routes a message still has to reach, as a request extension: when one
/// of several matching routes fails, a retry puts this on the next attempt so
/// that only the failed routes run again (`MessageRetryLayer` does).
///
/// ```
/// use tower::ServiceExt;
/// use tower_mqtt::{router::RemainingRoutes, Envelope, Outcome, Request, Router, TopicFilter};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// async fn ok(_: Request<Envelope>) {}
/// let router = Router::new().route("a/#", ok).route("a/b", ok);
/// let env = Envelope::new("t", serde_json::json!({})).unwrap();
/// let mut req = Request::builder("a/b").body(env).unwrap();
/// // Only `a/b` runs: `a/#` already handled the message.
/// req.extensions_mut().insert(RemainingRoutes::new([TopicFilter::new("a/b").unwrap()]));
/// assert!(matches!(router.oneshot(req).await.unwrap(), Outcome::Handled));
/// # }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemainingRoutes(Arc<[TopicFilter]>);

impl RemainingRoutes {
    /// The routes with these filters.
    pub fn new(filters: impl IntoIterator<Item = TopicFilter>) -> Self {
        Self(filters.into_iter().collect())
    }

    /// Whether the route with `filter` still has to run.
    pub fn contains(&self, filter: &TopicFilter) -> bool {
        self.0.contains(filter)
    }
}

/// The future of [`Router`]'s `call`.
pub type RouterFuture = Pin<Box<dyn Future<Output = Result<Outcome, Infallible>> + Send>>;

impl Service<Request<Envelope>> for Router<()> {
    type Response = Outcome;
    type Error = Infallible;
    type Future = RouterFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Envelope>) -> Self::Future {
        let remaining = req.extensions().get::<RemainingRoutes>();
        let routes = &self.inner.routes;
        let mut matched: Vec<(TopicFilter, RouteService, TopicParams)> = self
            .inner
            .index()
            .candidates(req.topic())
            .into_iter()
            .filter_map(|i| {
                let route = &routes[i];
                let endpoint = route.endpoint.as_ref()?;
                let filter = route.subscription.filter();
                if remaining.is_some_and(|only| !only.contains(filter)) {
                    return None;
                }
                let params = filter.captures(req.topic())?;
                Some((filter.clone(), endpoint.service(), params))
            })
            .collect();

        match matched.len() {
            0 => match self.inner.fallback.as_ref().map(Endpoint::service) {
                Some(fallback) => Box::pin(fallback.oneshot(req)),
                None => Box::pin(async { Ok(Outcome::Unrouted) }),
            },
            1 => {
                let (_, service, params) = matched.pop().expect("one route");
                let mut req = req;
                req.extensions_mut().insert(params);
                Box::pin(service.oneshot(req))
            }
            _ => {
                let runs = matched.into_iter().map(|(filter, service, params)| {
                    let mut req = req.clone();
                    req.extensions_mut().insert(params);
                    service.oneshot(req).map(move |outcome| {
                        (filter, outcome.unwrap_or_else(|never| match never {}))
                    })
                });
                let all = join_all(runs);
                Box::pin(async move { Ok(combine(all.await)) })
            }
        }
    }
}

/// One outcome for a message that reached several routes: handled when every
/// route handled it; otherwise failed, retryable only if every failure is.
fn combine(outcomes: Vec<(TopicFilter, Outcome)>) -> Outcome {
    let failures: Vec<(TopicFilter, HandlerError)> = outcomes
        .into_iter()
        .filter_map(|(filter, outcome)| match outcome {
            Outcome::Failed(err) => Some((filter, err)),
            _ => None,
        })
        .collect();
    if failures.is_empty() {
        return Outcome::Handled;
    }
    let retryable = failures.iter().all(|(_, err)| err.is_retryable());
    let err = RoutesFailed { failures };
    Outcome::Failed(if retryable {
        HandlerError::new(err)
    } else {
        HandlerError::permanent(err)
    })
}

#[cfg(test)]
#[path = "router_tests.rs"]
mod tests;
