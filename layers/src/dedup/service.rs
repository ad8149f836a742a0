//! The middleware: [`DedupLayer`], [`Dedup`] and its [`ResponseFuture`].

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
    time::Duration,
};

use pin_project_lite::pin_project;
use tower::{Layer, Service};
use tower_mqtt_core::{Envelope, HandledBefore, Outcome, Request};

use super::{
    key::DedupKey,
    store::{Claim, Store},
    DEFAULT_MAX_ENTRIES, DEFAULT_TTL,
};
use crate::decode::RawPayload;

/// Makes [`Dedup`] services that share one cache; see the
/// [module docs](super).
///
/// Cloning the layer shares the cache too.
///
/// ```
/// use tower::ServiceBuilder;
/// use tower_mqtt::Router;
/// use tower_mqtt::layers::dedup::{DedupLayer, DEFAULT_MAX_ENTRIES, DEFAULT_TTL};
///
/// let layer = DedupLayer::new();
/// assert_eq!((layer.ttl(), layer.max_entries()), (DEFAULT_TTL, DEFAULT_MAX_ENTRIES));
/// let svc = ServiceBuilder::new().layer(layer).service(Router::<()>::new());
/// ```
#[derive(Clone)]
#[must_use]
pub struct DedupLayer {
    /// `None` when dedup is off.
    pub(super) store: Option<Arc<Store>>,
    ttl: Duration,
    max_entries: u64,
}

impl DedupLayer {
    /// A new cache with the defaults: [`DEFAULT_TTL`], [`DEFAULT_MAX_ENTRIES`].
    pub fn new() -> Self {
        Self::with_limits(DEFAULT_TTL, DEFAULT_MAX_ENTRIES)
    }

    /// A new cache that remembers a message for `ttl`, and at most
    /// `max_entries` messages (the oldest go first). The runtime
    /// configuration's dedup settings go here.
    ///
    /// A `ttl` of zero remembers nothing: dedup is [off](Self::disabled), as
    /// the fleet's `MQTT_DEDUPE_TTL=0` means.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_mqtt::layers::dedup::DedupLayer;
    ///
    /// let layer = DedupLayer::with_limits(Duration::from_secs(60), 10_000);
    /// assert_eq!(layer.ttl(), Duration::from_secs(60));
    /// assert_eq!(layer.max_entries(), 10_000);
    /// assert!(!DedupLayer::with_limits(Duration::ZERO, 10_000).is_enabled());
    /// ```
    pub fn with_limits(ttl: Duration, max_entries: u64) -> Self {
        Self {
            store: (!ttl.is_zero()).then(|| Store::new(ttl, max_entries)),
            ttl,
            max_entries,
        }
    }

    /// A layer that lets every message through: dedup turned off.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_mqtt::layers::dedup::DedupLayer;
    ///
    /// let off = DedupLayer::disabled();
    /// assert!(!off.is_enabled());
    /// assert_eq!(off.ttl(), Duration::ZERO);
    /// ```
    pub fn disabled() -> Self {
        Self::with_limits(Duration::ZERO, DEFAULT_MAX_ENTRIES)
    }

    /// Whether messages are deduplicated (the TTL is not zero).
    pub fn is_enabled(&self) -> bool {
        self.store.is_some()
    }

    /// How long a handled message is remembered; zero when dedup is off.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// How many handled messages are remembered at most.
    pub fn max_entries(&self) -> u64 {
        self.max_entries
    }
}

impl Default for DedupLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for DedupLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DedupLayer")
            .field("enabled", &self.is_enabled())
            .field("ttl", &self.ttl)
            .field("max_entries", &self.max_entries)
            .finish_non_exhaustive()
    }
}

impl<S> Layer<S> for DedupLayer {
    type Service = Dedup<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Dedup {
            inner,
            layer: self.clone(),
        }
    }
}

/// Answers copies of handled envelopes with [`Outcome::Duplicate`]; see the
/// [module docs](super).
///
/// ```
/// use std::time::Duration;
/// use tower_mqtt::Router;
/// use tower_mqtt::layers::Dedup;
///
/// let svc = Dedup::with_limits(Router::<()>::new(), Duration::from_secs(60), 4096);
/// let router: &Router = svc.get_ref();
/// ```
#[derive(Clone)]
#[must_use]
pub struct Dedup<S> {
    inner: S,
    layer: DedupLayer,
}

impl<S> Dedup<S> {
    /// Wraps `inner` with a new cache with the default limits.
    pub fn new(inner: S) -> Self {
        DedupLayer::new().layer(inner)
    }

    /// Wraps `inner` with a new cache with these limits; see
    /// [`DedupLayer::with_limits`].
    pub fn with_limits(inner: S, ttl: Duration, max_entries: u64) -> Self {
        DedupLayer::with_limits(ttl, max_entries).layer(inner)
    }

    /// A [`DedupLayer`] with the default limits.
    pub fn layer() -> DedupLayer {
        DedupLayer::new()
    }

    tower_mqtt_core::define_inner_service_accessors!();
}

impl<S: fmt::Debug> fmt::Debug for Dedup<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dedup")
            .field("inner", &self.inner)
            .field("layer", &self.layer)
            .finish()
    }
}

impl<S> Service<Request<Envelope>> for Dedup<S>
where
    S: Service<Request<Envelope>, Response = Outcome>,
{
    type Response = Outcome;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Envelope>) -> Self::Future {
        let claim = match &self.layer.store {
            Some(_) if is_handled_before(&req) => {
                let env = req.body();
                tracing::debug!(
                    topic = %req.topic(),
                    event_type = env.event_type(),
                    id = env.id(),
                    "delivered again after its acknowledgement was lost",
                );
                return ResponseFuture {
                    kind: Kind::Duplicate,
                };
            }
            Some(store) if req.extensions().get::<RawPayload>().is_none() => {
                match store.claim(DedupKey::new(req.body())) {
                    Ok(claim) => Some(claim),
                    Err(key) => {
                        let env = req.body();
                        tracing::debug!(
                            %key,
                            topic = %req.topic(),
                            event_type = env.event_type(),
                            id = env.id(),
                            seq = env.seq(),
                            "duplicate message",
                        );
                        return ResponseFuture {
                            kind: Kind::Duplicate,
                        };
                    }
                }
            }
            _ => None,
        };
        ResponseFuture {
            kind: Kind::Inner {
                future: self.inner.call(req),
                claim,
            },
        }
    }
}

/// A delivery the runtime knows was handled and acknowledged on an earlier
/// connection ([`HandledBefore`]), unless it is a raw payload, which the fleet
/// never treats as a duplicate.
fn is_handled_before(req: &Request<Envelope>) -> bool {
    let extensions = req.extensions();
    extensions.get::<HandledBefore>().is_some() && extensions.get::<RawPayload>().is_none()
}

pin_project! {
    /// The future of [`Dedup`].
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        kind: Kind<F>,
    }
}

pin_project! {
    #[project = KindProj]
    #[derive(Debug)]
    enum Kind<F> {
        Duplicate,
        Inner {
            #[pin]
            future: F,
            claim: Option<Claim>,
        },
    }
}

impl<F, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Outcome, E>>,
{
    type Output = Result<Outcome, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Duplicate => Poll::Ready(Ok(Outcome::Duplicate)),
            KindProj::Inner { future, claim } => {
                let result = ready!(future.poll(cx));
                let handled = matches!(&result, Ok(outcome) if !outcome.is_failed());
                if let Some(mut claim) = claim.take() {
                    if handled {
                        claim.keep();
                    }
                }
                Poll::Ready(result)
            }
        }
    }
}
