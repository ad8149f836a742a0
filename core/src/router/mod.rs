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
//! async fn on_frame(params: TopicParams, req: Request<Envelope>) {
//!     assert_eq!(params.get(0), Some("front"));
//!     assert_eq!(req.topic_params(), Some(&params));
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

mod failure;
mod index;
mod route;

pub use failure::{RemainingRoutes, RoutesFailed};
pub use route::{Panicked, RouteService};

use std::{
    convert::Infallible,
    fmt,
    future::Future,
    pin::Pin,
    sync::{Arc, OnceLock},
    task::{Context, Poll},
};

use futures_util::{future::join_all, FutureExt};
use tower::{Layer, Service, ServiceExt};

use crate::{
    envelope::Envelope,
    handler::Handler,
    outcome::{BoxError, IntoOutcome, Outcome},
    request::{QoS, Request},
    subscription::{IntoSubscription, SubscribeOptions, Subscription},
    topic::{TopicFilter, TopicName},
};

use self::{
    failure::combine,
    index::RouteIndex,
    route::{into_route, Endpoint, Route},
};

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
            .filter(move |&i| self.routes[i].subscription.filter().matches(&topic))
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
        self.subscriptions_with_options()
            .into_iter()
            .map(|(filter, qos, _)| (filter, qos))
            .collect()
    }

    /// [`subscriptions`](Self::subscriptions) with each filter's MQTT 5
    /// [options](SubscribeOptions): a filter is left out for a wider one only
    /// when their options are the same.
    ///
    /// ```
    /// use tower_mqtt::{QoS, Router, Subscription};
    ///
    /// let router: Router = Router::new()
    ///     .route("chat/#", |_: tower_mqtt::Envelope| async {})
    ///     .route(Subscription::new("chat/mine").no_local(), |_: tower_mqtt::Envelope| async {});
    /// let subs = router.subscriptions_with_options();
    /// assert_eq!(subs.len(), 2, "different options: both filters");
    /// assert!(subs[1].2.no_local);
    /// ```
    pub fn subscriptions_with_options(&self) -> Vec<(TopicFilter, QoS, SubscribeOptions)> {
        let subs: Vec<&Subscription> = self.routes().collect();
        let mut out: Vec<(TopicFilter, QoS, SubscribeOptions)> = Vec::new();
        for (i, sub) in subs.iter().enumerate() {
            let filter = sub.filter();
            let options = sub.get_options();
            let shared = filter.share_group().is_some();
            let merges = |other: &Subscription| {
                other.filter().share_group().is_none() && other.get_options() == options
            };
            // Covered by another (non-shared) filter with the same options:
            // strictly wider, or the same filter added earlier.
            let covered = !shared
                && subs.iter().enumerate().any(|(j, other)| {
                    j != i
                        && merges(other)
                        && other.filter().covers(filter)
                        && (!filter.covers(other.filter()) || j < i)
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
                        merges(other) && filter.covers(other.filter())
                    }
                })
                .map(|other| other.get_qos())
                .max()
                .unwrap_or(sub.get_qos());
            if !out.iter().any(|(f, _, o)| f == filter && *o == options) {
                out.push((filter.clone(), qos, options));
            }
        }
        out
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
        let mut matches = self.inner.index().candidates(req.topic()).filter_map(|i| {
            let route = &routes[i];
            let endpoint = route.endpoint.as_ref()?;
            let filter = route.subscription.filter();
            if remaining.is_some_and(|only| !only.contains(filter)) {
                return None;
            }
            let params = filter.captures(req.topic())?;
            Some((filter, endpoint, params))
        });
        // One route is the common case: it gets the request itself, and
        // nothing is collected.
        let Some(first) = matches.next() else {
            return match self.inner.fallback.as_ref().map(Endpoint::service) {
                Some(fallback) => Box::pin(fallback.oneshot(req)),
                None => Box::pin(async { Ok(Outcome::Unrouted) }),
            };
        };
        let Some(second) = matches.next() else {
            let (_, endpoint, params) = first;
            let service = endpoint.service();
            let mut req = req;
            req.set_topic_params(params);
            return Box::pin(service.oneshot(req));
        };
        let runs = [first, second]
            .into_iter()
            .chain(matches)
            .map(|(filter, endpoint, params)| {
                let filter = filter.clone();
                let mut req = req.clone();
                req.set_topic_params(params);
                endpoint
                    .service()
                    .oneshot(req)
                    .map(move |outcome| (filter, outcome.unwrap_or_else(|never| match never {})))
            });
        let all = join_all(runs);
        Box::pin(async move { Ok(combine(all.await)) })
    }
}

#[cfg(test)]
mod tests;
