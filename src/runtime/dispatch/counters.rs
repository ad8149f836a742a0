//! What the dispatcher counts; read through [`Stats`](crate::runtime::Stats).

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use tower::Service;

use tower_mqtt_layers::DecodeError;

use super::{Dispatcher, State};
use crate::{
    outcome::{BoxError, Outcome},
    request::Request,
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

impl DecodeCounters {
    pub(super) fn count(&self, error: &DecodeError) {
        let counter = match error.reason() {
            "empty" => &self.empty,
            "not_utf8" => &self.not_utf8,
            "not_json" => &self.not_json,
            "not_an_object" => &self.not_an_object,
            _ => &self.invalid_envelope,
        };
        counter.fetch_add(1, Ordering::Relaxed);
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
        counters.peak_pending.fetch_max(pending, Ordering::Relaxed);
        counters
            .peak_pending_bytes
            .fetch_max(bytes, Ordering::Relaxed);
        counters
            .carried
            .store(state.acks.carried() as u64, Ordering::Relaxed);
    }
}
