//! The way out: publishes go to the client directly while connected, and wait
//! in a bounded, ordered buffer while not.
//!
//! - While connected and nothing is buffered, a publish enters rumqttc's request
//!   channel at once (it only ever *tries*; a full channel means buffering).
//! - While disconnected, publishes wait here, at most `max_messages` of them and
//!   each at most `max_age`. A full buffer rejects the new publish
//!   ([`DeliveryError::BufferFull`]) or evicts the oldest
//!   ([`DeliveryError::Evicted`]), as configured; a publish older than
//!   `max_age` fails with [`DeliveryError::Expired`].
//! - On reconnect a drain task sends the buffer in order; later publishes queue
//!   behind it, so order holds.
//! - With a clean session, publishes that rumqttc held when the connection
//!   failed (written but unacknowledged, or still in its channel) are taken
//!   back to the front of the buffer and sent again after the reconnect:
//!   at-least-once across reconnects. (With a persistent session rumqttc
//!   replays them itself.)

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use bytes::Bytes;
use tokio::{sync::Notify, time::Instant};
use tracing::{debug, warn};

use super::{
    delivery::{Deliveries, Waiter},
    wire::{Handle, TrySendError},
};
use crate::{
    config::OfflineOverflow, properties::Properties, publisher::DeliveryError, request::QoS,
};

/// Bounds of the offline buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct OutboxLimits {
    pub(crate) max_messages: usize,
    pub(crate) max_age: Duration,
    pub(crate) overflow: OfflineOverflow,
}

pub(crate) struct Outgoing {
    pub(crate) topic: String,
    pub(crate) qos: QoS,
    pub(crate) retain: bool,
    pub(crate) payload: Bytes,
    /// MQTT 5 properties, `None` when there are none (and on MQTT 3.1.1,
    /// which sends none).
    pub(crate) properties: Option<Arc<Properties>>,
}

struct Entry {
    message: Outgoing,
    waiter: Waiter,
    queued_at: Instant,
}

struct State {
    connected: bool,
    closed: bool,
    queue: VecDeque<Entry>,
}

pub(crate) struct Outbox {
    client: Handle,
    deliveries: Arc<Deliveries>,
    limits: OutboxLimits,
    state: Mutex<State>,
    wake: Notify,
    metrics: OutboxMetrics,
}

/// The offline buffer's depth and losses, through the `metrics` facade.
struct OutboxMetrics {
    depth: metrics::Gauge,
    rejected: metrics::Counter,
    evicted: metrics::Counter,
    expired: metrics::Counter,
}

impl OutboxMetrics {
    fn new() -> Self {
        use crate::metrics as names;
        let dropped = |reason: &'static str| metrics::counter!(names::OFFLINE_DROPPED, names::SYSTEM => "mqtt", names::REASON => reason);
        Self {
            depth: metrics::gauge!(names::OFFLINE_MESSAGES, names::SYSTEM => "mqtt"),
            rejected: dropped("rejected"),
            evicted: dropped("evicted"),
            expired: dropped("expired"),
        }
    }

    #[allow(clippy::cast_precision_loss)] // a buffer length, far below 2^52
    fn note(&self, state: &State) {
        self.depth.set(state.queue.len() as f64);
    }
}

impl Outbox {
    pub(crate) fn new(client: Handle, deliveries: Arc<Deliveries>, limits: OutboxLimits) -> Self {
        Self {
            client,
            deliveries,
            limits,
            state: Mutex::new(State {
                connected: false,
                closed: false,
                queue: VecDeque::new(),
            }),
            wake: Notify::new(),
            metrics: OutboxMetrics::new(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Puts the message into the client's channel; false when the channel is
    /// full. A message the broker's packet limit does not admit fails its
    /// waiter (and counts as sent: there is nothing to retry).
    fn try_send(&self, message: &Outgoing, waiter: &mut Waiter) -> bool {
        match self
            .deliveries
            .with_place(waiter, || self.client.try_publish(message))
        {
            Ok(()) => true,
            Err(TrySendError::Full) => false,
            Err(TrySendError::TooLarge { size, max }) => {
                warn!(topic = %message.topic, size, max, "publish over the broker's packet limit; not sent");
                fail(
                    waiter.take(),
                    DeliveryError::TooLargeForBroker { size, max },
                );
                true
            }
        }
    }

    /// Sends or buffers `message`; `waiter` learns the outcome.
    pub(crate) fn send(&self, message: Outgoing, waiter: Waiter) -> Result<(), DeliveryError> {
        let mut state = self.state();
        if state.closed {
            return Err(DeliveryError::Closed);
        }
        let mut waiter = waiter;
        if state.connected && state.queue.is_empty() && self.try_send(&message, &mut waiter) {
            return Ok(());
        }
        if state.queue.len() >= self.limits.max_messages {
            match self.limits.overflow {
                OfflineOverflow::Reject => {
                    self.metrics.rejected.increment(1);
                    return Err(DeliveryError::BufferFull {
                        limit: self.limits.max_messages,
                    });
                }
                OfflineOverflow::DropOldest => {
                    if let Some(oldest) = state.queue.pop_front() {
                        warn!(topic = %oldest.message.topic, "offline buffer full; evicted the oldest publish");
                        self.metrics.evicted.increment(1);
                        fail(oldest.waiter, DeliveryError::Evicted);
                    }
                }
            }
        }
        state.queue.push_back(Entry {
            message,
            waiter,
            queued_at: Instant::now(),
        });
        self.metrics.note(&state);
        drop(state);
        self.wake.notify_one();
        Ok(())
    }

    /// CONNACK: start draining.
    pub(crate) fn connected(&self) {
        self.state().connected = true;
        self.wake.notify_one();
    }

    /// The connection failed. With a clean session, `reclaimed` are the
    /// publishes rumqttc held, as (packet id, message) in its order: they go
    /// back to the front of the buffer (see the module docs).
    pub(crate) fn disconnected(&self, reclaimed: Option<Vec<(u16, Outgoing)>>) {
        let mut state = self.state();
        state.connected = false;
        let Some(reclaimed) = reclaimed.filter(|r| !r.is_empty()) else {
            return;
        };
        let waiters = self
            .deliveries
            .reclaim(reclaimed.iter().map(|(pkid, _)| *pkid));
        debug!(
            count = reclaimed.len(),
            "taking back unconfirmed publishes to send again"
        );
        let now = Instant::now();
        for ((_, message), waiter) in reclaimed.into_iter().zip(waiters).rev() {
            state.queue.push_front(Entry {
                message,
                waiter,
                queued_at: now,
            });
        }
        self.metrics.note(&state);
    }

    /// The runtime stopped: fail whatever waits.
    pub(crate) fn close(&self) {
        let mut state = self.state();
        state.closed = true;
        for entry in state.queue.drain(..) {
            fail(entry.waiter, DeliveryError::Closed);
        }
        self.metrics.note(&state);
        drop(state);
        self.wake.notify_one();
    }

    /// Moves buffered publishes into the client while connected and expires
    /// old ones; runs until [`Outbox::close`].
    pub(crate) async fn drain(self: Arc<Self>) {
        // Often enough to expire on time and to retry a full channel soon.
        let tick =
            (self.limits.max_age / 4).clamp(Duration::from_millis(5), Duration::from_millis(250));
        loop {
            let wake = self.wake.notified();
            let full = {
                let mut state = self.state();
                if state.closed {
                    return;
                }
                let now = Instant::now();
                let max_age = self.limits.max_age;
                while state
                    .queue
                    .front()
                    .is_some_and(|entry| now.duration_since(entry.queued_at) > max_age)
                {
                    let entry = state.queue.pop_front().expect("front exists");
                    warn!(topic = %entry.message.topic, "publish waited longer than the offline limit; dropped");
                    self.metrics.expired.increment(1);
                    fail(entry.waiter, DeliveryError::Expired { max_age });
                }
                let mut full = false;
                while state.connected {
                    let Some(mut entry) = state.queue.pop_front() else {
                        break;
                    };
                    if !self.try_send(&entry.message, &mut entry.waiter) {
                        state.queue.push_front(entry);
                        full = true;
                        break;
                    }
                }
                self.metrics.note(&state);
                full
            };
            let pause = if full { Duration::from_millis(2) } else { tick };
            let _ = tokio::time::timeout(pause, wake).await;
        }
    }
}

fn fail(waiter: Waiter, err: DeliveryError) {
    if let Some(tx) = waiter {
        let _ = tx.send(Err(err));
    }
}
