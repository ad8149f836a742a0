//! What the dispatcher counts: [`Stats`](crate::runtime::Stats), and the
//! same events per route through the `metrics` facade ([`crate::metrics`]).
//!
//! Each route's metric handles are registered once, when the dispatcher is
//! made, so a message costs an increment on a handle, not a lookup by name
//! and labels; with no recorder installed the handles do nothing.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use bytes::Bytes;
use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};
use tower::Service;

use tower_mqtt_layers::DecodeError;

use super::{Dispatcher, State};
use crate::{
    metrics as names,
    outcome::{BoxError, HandlerError, Outcome},
    request::Request,
    router::{Panicked, Router},
};

/// Counters of what the dispatcher did.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) received: AtomicU64,
    pub(crate) handled: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) duplicates: AtomicU64,
    /// Deliveries that joined a message still held from an earlier connection.
    pub(crate) redelivered: AtomicU64,
    pub(crate) unrouted: AtomicU64,
    pub(crate) dropped_oldest: AtomicU64,
    pub(crate) dropped_new: AtomicU64,
    pub(crate) dropped_over_limit: AtomicU64,
    pub(crate) withheld: AtomicU64,
    pub(crate) kept_over_limit: AtomicU64,
    pub(crate) oversized: AtomicU64,
    pub(crate) invalid_topic: AtomicU64,
    pub(crate) decode_failures: DecodeCounters,
    pub(crate) pending: AtomicU64,
    pub(crate) pending_bytes: AtomicU64,
    pub(crate) peak_pending: AtomicU64,
    pub(crate) peak_pending_bytes: AtomicU64,
    /// Messages carried from earlier connections, not yet delivered again.
    pub(crate) carried: AtomicU64,
}

/// Messages that could not be decoded, by reason.
#[derive(Debug, Default)]
pub(crate) struct DecodeCounters {
    pub(crate) empty: AtomicU64,
    pub(crate) not_utf8: AtomicU64,
    pub(crate) not_json: AtomicU64,
    pub(crate) not_an_object: AtomicU64,
    pub(crate) invalid_envelope: AtomicU64,
}

/// The decode reasons, in the order of [`DecodeCounters`]' fields.
const DECODE_REASONS: [&str; 5] = [
    "empty",
    "not_utf8",
    "not_json",
    "not_an_object",
    "invalid_envelope",
];

/// The index of a decode error's reason in [`DECODE_REASONS`].
fn decode_reason(error: &DecodeError) -> usize {
    DECODE_REASONS
        .iter()
        .position(|reason| *reason == error.reason())
        .unwrap_or(DECODE_REASONS.len() - 1)
}

impl DecodeCounters {
    fn by_reason(&self, reason: usize) -> &AtomicU64 {
        match reason {
            0 => &self.empty,
            1 => &self.not_utf8,
            2 => &self.not_json,
            3 => &self.not_an_object,
            _ => &self.invalid_envelope,
        }
    }
}

/// Why a message failed, as the [`ERROR_TYPE`](names::ERROR_TYPE) label says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ErrorType {
    /// Not a decodable envelope; carries the reason's index.
    Decode(usize),
    /// A timeout layer gave up on it.
    Timeout,
    /// The handler panicked.
    Panic,
    /// The handler (or a layer) failed.
    Handler,
    /// The inbound service itself returned an error.
    Service,
}

impl ErrorType {
    const LABELS: [&'static str; 5] = ["decode", "timeout", "panic", "handler", "service"];

    /// The class of a failed outcome's error.
    pub(super) fn of(error: &HandlerError) -> Self {
        let inner = error.get_ref();
        if let Some(decode) = inner.downcast_ref::<DecodeError>() {
            Self::Decode(decode_reason(decode))
        } else if inner.is::<tower::timeout::error::Elapsed>() {
            Self::Timeout
        } else if inner.is::<Panicked>() {
            Self::Panic
        } else {
            Self::Handler
        }
    }

    fn index(self) -> usize {
        match self {
            Self::Decode(_) => 0,
            Self::Timeout => 1,
            Self::Panic => 2,
            Self::Handler => 3,
            Self::Service => 4,
        }
    }
}

/// Why a message was dropped, as the [`REASON`](names::REASON) label says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Dropped {
    Oldest,
    New,
    OverLimit,
    Oversized,
    InvalidTopic,
}

impl Dropped {
    const LABELS: [&'static str; 5] = [
        "drop_oldest",
        "drop_new",
        "over_limit",
        "oversized",
        "invalid_topic",
    ];
}

/// One route's metric handles.
pub(super) struct RouteMetrics {
    consumed: Counter,
    handled: Counter,
    failed: [Counter; 5],
    duplicates: Counter,
    redelivered: Counter,
    unrouted: Counter,
    dropped: [Counter; 5],
    decode: [Counter; 5],
    duration: Histogram,
}

impl RouteMetrics {
    fn new(route: &str) -> Self {
        let labelled = |name: &'static str| counter!(name, names::SYSTEM => "mqtt", names::ROUTE => route.to_owned());
        let by = |name: &'static str, key: &'static str, values: [&'static str; 5]| {
            values.map(|value| {
                counter!(name, names::SYSTEM => "mqtt", names::ROUTE => route.to_owned(), key => value)
            })
        };
        Self {
            consumed: labelled(names::CONSUMED_MESSAGES),
            handled: labelled(names::HANDLED_MESSAGES),
            failed: by(names::FAILED_MESSAGES, names::ERROR_TYPE, ErrorType::LABELS),
            duplicates: labelled(names::DUPLICATE_MESSAGES),
            redelivered: labelled(names::REDELIVERED_MESSAGES),
            unrouted: labelled(names::UNROUTED_MESSAGES),
            dropped: by(names::DROPPED_MESSAGES, names::REASON, Dropped::LABELS),
            decode: by(names::DECODE_FAILURES, names::REASON, DECODE_REASONS),
            duration: histogram!(
                names::PROCESS_DURATION,
                names::SYSTEM => "mqtt",
                names::ROUTE => route.to_owned()
            ),
        }
    }
}

/// Every metric handle of a dispatcher.
pub(super) struct Metrics {
    /// By route index, in the router's order, then the fallback's.
    routes: Vec<RouteMetrics>,
    /// Messages no route took.
    none: RouteMetrics,
    withheld: Counter,
    kept_over_limit: Counter,
    pending: Gauge,
    pending_bytes: Gauge,
}

/// The route a message counts under: an index into the routes, or none.
pub(super) type RouteIndex = Option<usize>;

impl Metrics {
    /// The handles of `router`'s routes and its fallback.
    pub(super) fn new(router: &Router) -> Self {
        let mut by_route: Vec<RouteMetrics> = router
            .routes()
            .map(|sub| RouteMetrics::new(sub.filter().as_str()))
            .collect();
        by_route.push(RouteMetrics::new("(fallback)"));
        let plain = |name: &'static str| counter!(name, names::SYSTEM => "mqtt");
        Self {
            routes: by_route,
            none: RouteMetrics::new("(none)"),
            withheld: plain(names::WITHHELD_MESSAGES),
            kept_over_limit: plain(names::KEPT_OVER_LIMIT),
            pending: gauge!(names::PENDING_MESSAGES, names::SYSTEM => "mqtt"),
            pending_bytes: gauge!(names::PENDING_BYTES, names::SYSTEM => "mqtt"),
        }
    }

    fn route(&self, route: RouteIndex) -> &RouteMetrics {
        route.map_or(&self.none, |index| &self.routes[index])
    }
}

/// What the dispatcher counts, each once in `Stats` and once per route.
impl Counters {
    pub(super) fn received(&self, metrics: &Metrics, route: RouteIndex) {
        self.received.fetch_add(1, Ordering::Relaxed);
        metrics.route(route).consumed.increment(1);
    }

    pub(super) fn handled(&self, metrics: &Metrics, route: RouteIndex, took: Duration) {
        self.handled.fetch_add(1, Ordering::Relaxed);
        let route = metrics.route(route);
        route.handled.increment(1);
        route.duration.record(took);
    }

    pub(super) fn failed(
        &self,
        metrics: &Metrics,
        route: RouteIndex,
        why: ErrorType,
        took: Duration,
    ) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let route = metrics.route(route);
        route.failed[why.index()].increment(1);
        route.duration.record(took);
        if let ErrorType::Decode(reason) = why {
            self.decode_failures
                .by_reason(reason)
                .fetch_add(1, Ordering::Relaxed);
            route.decode[reason].increment(1);
        }
    }

    pub(super) fn duplicate(&self, metrics: &Metrics, route: RouteIndex) {
        self.duplicates.fetch_add(1, Ordering::Relaxed);
        metrics.route(route).duplicates.increment(1);
    }

    pub(super) fn redelivered(&self, metrics: &Metrics) {
        self.redelivered.fetch_add(1, Ordering::Relaxed);
        metrics.none.redelivered.increment(1);
    }

    pub(super) fn unrouted(&self, metrics: &Metrics, route: RouteIndex) {
        self.unrouted.fetch_add(1, Ordering::Relaxed);
        metrics.route(route).unrouted.increment(1);
    }

    pub(super) fn dropped(&self, metrics: &Metrics, route: RouteIndex, why: Dropped) {
        let counter = match why {
            Dropped::Oldest => &self.dropped_oldest,
            Dropped::New => &self.dropped_new,
            Dropped::OverLimit => &self.dropped_over_limit,
            Dropped::Oversized => &self.oversized,
            Dropped::InvalidTopic => &self.invalid_topic,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        metrics.route(route).dropped[why as usize].increment(1);
    }

    pub(super) fn withheld(&self, metrics: &Metrics) {
        self.withheld.fetch_add(1, Ordering::Relaxed);
        metrics.withheld.increment(1);
    }

    pub(super) fn kept_over_limit(&self, metrics: &Metrics) {
        self.kept_over_limit.fetch_add(1, Ordering::Relaxed);
        metrics.kept_over_limit.increment(1);
    }
}

impl<S> Dispatcher<S>
where
    S: Service<Request<Bytes>, Response = Outcome> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    /// Publishes the load to the counters, for `Stats`.
    pub(super) fn note_load(&self, state: &State) {
        let counters = &self.shared.counters;
        let pending = state.pending() as u64;
        let bytes = state.pending_bytes as u64;
        counters.pending.store(pending, Ordering::Relaxed);
        counters.pending_bytes.store(bytes, Ordering::Relaxed);
        #[allow(clippy::cast_precision_loss)] // far below 2^52
        {
            self.shared.metrics.pending.set(pending as f64);
            self.shared.metrics.pending_bytes.set(bytes as f64);
        }
        counters.peak_pending.fetch_max(pending, Ordering::Relaxed);
        counters
            .peak_pending_bytes
            .fetch_max(bytes, Ordering::Relaxed);
        counters
            .carried
            .store(state.acks.carried() as u64, Ordering::Relaxed);
    }
}
