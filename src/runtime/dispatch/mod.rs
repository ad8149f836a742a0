//! From the poll loop to the handlers: one FIFO per topic, a ready queue of
//! topics with work, a pool of workers, a memory bound of our own, and
//! acknowledgements in the order the protocol demands.
//!
//! - **Constant work per message** ([`lanes`]). A message is hashed once (its
//!   topic, with a fast hasher) to find its topic's lane; the lane remembers
//!   its route, so a route's filter is matched only when a topic is first
//!   seen. A lane with work waits in the ready queue; a worker ([`workers`])
//!   takes the lane at the head, runs one message, and puts the lane back at
//!   the tail while it has more. Nothing scans the waiting messages.
//! - **Order.** An ordered route (the default) runs a topic's messages one
//!   after another; different topics run side by side, up to the in-flight
//!   limit.
//! - **Acknowledgement in receive order** ([`acks`]). PUBACK and PUBREC leave
//!   in the order the messages arrived on the connection, as [MQTT-4.6.0-2/3]
//!   require and rumqttd enforces; handling stays concurrent, only the
//!   acknowledgements wait their turn. A slow handler therefore holds back the
//!   acknowledgements (not the handling) of what came after it, and the
//!   pending bound below caps how much waits. [`AckOrder::Topic`] (opt-in,
//!   outside the rule) lines acknowledgements up per topic instead; a route
//!   that must not hold anything back can acknowledge on receipt
//!   ([`Ack::OnReceipt`]).
//! - **Handled once across reconnects** ([`acks`]). A message still held when
//!   its connection ends (queued, running, or handled but not yet
//!   acknowledged on the wire) keeps its ticket; when the persistent session
//!   delivers it again under the same packet id, the redelivery joins that
//!   ticket instead of running a second time. The old copy is not dropped in
//!   favour of the new one: with a clean session, or a broker that lost the
//!   session, nothing would come back.
//! - **A bound we own** ([`admission`]). Every message counts as pending from
//!   the moment it is queued until its acknowledgement leaves (QoS 0: until it
//!   is handled), across reconnects too: the old connection's queued copies
//!   still count, and their redeliveries add nothing. When pending messages or
//!   their bytes reach the limits, or an [`Overflow::Block`] route is at its
//!   capacity, [`Dispatcher::is_full`] tells the poll loop to stop reading
//!   until the load falls below three quarters of the limit. TCP then makes
//!   the broker wait: no broker has to honour a window for the bound to hold
//!   (mosquitto 2.0.11's in-flight window does not, once acknowledgements
//!   flow). Messages that arrive past the limit anyway (only while the poll
//!   loop must read so that handlers' own publishes can be confirmed) are
//!   handled by [`OverLimit`]: QoS 0 is dropped and counted; QoS 1/2 is
//!   withheld (neither kept nor acknowledged, nor is anything after it on
//!   that connection, so receive order holds) and taken back by a deliberate
//!   reconnect, or kept with a clean session that could not deliver it again.
//!
//! **Why pausing does not cost the connection.** A paused or slowly reading
//! client leaves the broker's PINGRESP behind thousands of unread PUBLISH
//! packets: rumqttc's own check ("last pingreq isn't acked" one keep-alive
//! later) then kills a healthy connection, and a persistent session delivers
//! everything held all over again (3,000 messages once ran 7,933 times under a
//! 5 s keep-alive). So the poll loop owns the check: the broker is alive if
//! *any* packet was read in the keep-alive interval before a PINGREQ, and a
//! paused interval proves nothing either way. Meanwhile the poll loop writes
//! its own PINGREQ every half keep-alive while paused, so the broker's side
//! (1.5 keep-alives of silence) never fires either. The floor is rumqttc's:
//! keep-alives below 1 s panic there, and configuration refuses them.
//!
//! tower's `ConcurrencyLimit` cannot do this job: the limit has to hold across
//! all routes and topics, and a router does not drive each route's readiness.
//!
//! [`AckOrder::Topic`]: crate::AckOrder::Topic
//! [`Ack::OnReceipt`]: crate::Ack::OnReceipt

mod acks;
mod admission;
mod counters;
mod lanes;
mod workers;

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
};

use hashbrown::{DefaultHashBuilder, HashTable};
use slab::Slab;
use tokio::{sync::Notify, task::JoinSet, time::Instant};
use tower::Service;

use tower_mqtt_core::log_limit::LogLimit;

pub(crate) use self::{acks::AckPacket, counters::Counters};
use self::{
    acks::Acks,
    counters::Metrics,
    lanes::{Lane, RouteQueue},
};
use crate::{
    outcome::{BoxError, Outcome},
    publisher::Publisher,
    request::Request,
    router::Router,
    subscription::{AckOrder, Overflow, DEFAULT_QUEUE_CAPACITY},
};

/// Limits of what the dispatcher holds; see the [module docs](self).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// Handlers running at once.
    pub(crate) max_in_flight: usize,
    /// Messages pending (queued, running, or waiting for their turn to be
    /// acknowledged).
    pub(crate) max_pending: usize,
    /// Payload bytes of queued and running messages.
    pub(crate) max_pending_bytes: usize,
    /// Largest payload handed to the handlers; larger ones are acknowledged
    /// and dropped.
    pub(crate) max_message_size: usize,
    pub(crate) ack_order: AckOrder,
    pub(crate) queues: QueueDefaults,
}

/// A route's queue settings where the route sets none.
#[derive(Clone, Copy, Debug)]
pub(crate) struct QueueDefaults {
    pub(crate) capacity: usize,
    pub(crate) overflow: Overflow,
}

impl Default for QueueDefaults {
    fn default() -> Self {
        Self {
            capacity: DEFAULT_QUEUE_CAPACITY,
            overflow: Overflow::Block,
        }
    }
}

/// What a QoS 1/2 message that arrives past the limit becomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OverLimit {
    /// Not kept and not acknowledged; every later QoS 1/2 message of this
    /// connection too, so that acknowledgements stay in receive order and the
    /// broker delivers them again, in order, on the next connection.
    Withhold,
    /// Kept past the limit: the session could not deliver it again.
    Keep,
}

/// How much the dispatcher holds right now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Load {
    pub(crate) queued: usize,
    pub(crate) running: usize,
    pub(crate) pending: usize,
    pub(crate) pending_bytes: usize,
}

/// What became of the messages still waiting or running at shutdown.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Drained {
    pub(crate) finished: usize,
    pub(crate) abandoned: usize,
}

/// Everything behind the dispatcher's lock.
struct State {
    lanes: Slab<Lane>,
    /// Lane ids by topic hash.
    by_topic: HashTable<usize>,
    ready: VecDeque<usize>,
    routes: Vec<RouteQueue>,
    acks: Acks,
    queued: usize,
    running: usize,
    pending_bytes: usize,
    /// Block routes at their capacity.
    blocking_routes: usize,
    /// Messages queued on unordered routes, which may run side by side.
    unordered_queued: usize,
    /// Withholding QoS 1/2 messages until the next connection.
    withholding: bool,
    workers: usize,
    accepting: bool,
    tasks: JoinSet<()>,
}

impl State {
    fn pending(&self) -> usize {
        self.queued + self.running + self.acks.waiting()
    }

    /// Whether the load is below the mark where a paused poll loop reads
    /// again.
    fn has_room(&self, limits: &Limits) -> bool {
        self.pending() <= resume_mark(limits.max_pending)
            && self.pending_bytes <= resume_mark(limits.max_pending_bytes)
            && self.blocking_routes == 0
    }
}

/// What the dispatcher warns about, each with its own rate limit.
#[derive(Clone, Copy)]
enum Warning {
    Dropped,
    Oversized,
    InvalidTopic,
}

struct Shared<S> {
    router: Router,
    /// Input can trigger these lines: a flood must not flood the log.
    warnings: LogLimit<3>,
    /// Put into every request, for handlers that publish.
    publisher: Option<Publisher>,
    /// Behind a lock only so `Shared` is `Sync` for any `Send` service; it is
    /// held just long enough to clone.
    service: Mutex<S>,
    limits: Limits,
    hasher: DefaultHashBuilder,
    counters: Arc<Counters>,
    metrics: Metrics,
    /// Acknowledgements of this connection that rumqttc has written, counted
    /// by the poll loop; the rest are carried if the connection ends.
    acks_written: AtomicU64,
    state: Mutex<State>,
    /// Signalled when the load falls below the resume mark.
    room: Notify,
    /// Signalled whenever a handler finishes.
    progress: Notify,
}

/// See the [module docs](self).
pub(crate) struct Dispatcher<S> {
    shared: Arc<Shared<S>>,
}

impl<S> Clone for Dispatcher<S> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

/// The mark below which a paused poll loop reads again: three quarters of a
/// limit, so that a full dispatcher does not flap between reading one message
/// and pausing.
fn resume_mark(limit: usize) -> usize {
    limit - limit / 4
}

impl<S> Dispatcher<S>
where
    S: Service<Request<bytes::Bytes>, Response = Outcome> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    /// A dispatcher for `router`'s routes, running `service` (the router in
    /// its stack); released acknowledgements go to `released` with their
    /// connection epoch.
    pub(crate) fn new(
        router: Router,
        service: S,
        limits: Limits,
        counters: Arc<Counters>,
        released: tokio::sync::mpsc::UnboundedSender<(u64, AckPacket)>,
    ) -> Self {
        // One queue per route, in the router's order, and one for messages no
        // route matches (they go to the fallback).
        let mut queues: Vec<RouteQueue> = router
            .routes()
            .map(|sub| RouteQueue::new(Some(sub), limits.queues))
            .collect();
        queues.push(RouteQueue::new(None, limits.queues));
        let limits = Limits {
            max_in_flight: limits.max_in_flight.max(1),
            max_pending: limits.max_pending.max(1),
            max_pending_bytes: limits.max_pending_bytes.max(1),
            ..limits
        };
        let metrics = Metrics::new(&router);
        Self {
            shared: Arc::new(Shared {
                router,
                warnings: LogLimit::default(),
                publisher: None,
                service: Mutex::new(service),
                limits,
                hasher: DefaultHashBuilder::default(),
                counters,
                metrics,
                acks_written: AtomicU64::new(0),
                state: Mutex::new(State {
                    lanes: Slab::new(),
                    by_topic: HashTable::new(),
                    ready: VecDeque::new(),
                    routes: queues,
                    acks: Acks::new(released, limits.max_pending),
                    queued: 0,
                    running: 0,
                    pending_bytes: 0,
                    blocking_routes: 0,
                    unordered_queued: 0,
                    withholding: false,
                    workers: 0,
                    accepting: true,
                    tasks: JoinSet::new(),
                }),
                room: Notify::new(),
                progress: Notify::new(),
            }),
        }
    }

    /// Puts `publisher` into every request, where handlers take it.
    pub(crate) fn with_publisher(mut self, publisher: Publisher) -> Self {
        Arc::get_mut(&mut self.shared)
            .expect("set before the dispatcher is shared")
            .publisher = Some(publisher);
        self
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().expect("dispatcher poisoned")
    }

    /// Whether the poll loop should stop reading: see the [module docs](self).
    pub(crate) fn is_full(&self) -> bool {
        let state = self.lock();
        let limits = &self.shared.limits;
        state.pending() >= limits.max_pending
            || state.pending_bytes >= limits.max_pending_bytes
            || state.blocking_routes > 0
    }

    /// Resolves once the load is below the resume mark.
    pub(crate) async fn room(&self) {
        loop {
            let room = self.shared.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            if self.lock().has_room(&self.shared.limits) {
                return;
            }
            room.await;
        }
    }

    /// Whether QoS 1/2 messages are being withheld on this connection.
    pub(crate) fn is_withholding(&self) -> bool {
        self.lock().withholding
    }

    /// How much is held now.
    pub(crate) fn load(&self) -> Load {
        let state = self.lock();
        Load {
            queued: state.queued,
            running: state.running,
            pending: state.pending(),
            pending_bytes: state.pending_bytes,
        }
    }

    /// How many acknowledgements were released on this connection.
    pub(crate) fn released_on_connection(&self) -> u64 {
        self.lock().acks.released()
    }

    /// The poll loop saw rumqttc write one of this connection's
    /// acknowledgements (`Outgoing::PubAck` or `Outgoing::PubRec`).
    pub(crate) fn ack_written(&self) {
        self.shared.acks_written.fetch_add(1, Ordering::Relaxed);
    }

    /// Acknowledgements of this connection written so far.
    pub(crate) fn acks_written(&self) -> u64 {
        self.shared.acks_written.load(Ordering::Relaxed)
    }

    /// The connection ended: what was not acknowledged on the wire is carried
    /// to the next one (see [`acks`]), and withholding ends. Call after every
    /// acknowledgement rumqttc wrote has been reported.
    pub(crate) fn connection_lost(&self) {
        let mut state = self.lock();
        let state = &mut *state;
        let written = self.shared.acks_written.swap(0, Ordering::Relaxed);
        state.acks.connection_lost(written);
        state.withholding = false;
        let idle: Vec<usize> = state
            .lanes
            .iter()
            .filter(|(_, lane)| !lane.scheduled && lane.idle(&state.acks))
            .map(|(id, _)| id)
            .collect();
        for id in idle {
            state.forget_if_idle(id);
        }
        self.note_load(state);
        self.shared.room.notify_waiters();
    }

    /// CONNACK: whether the broker resumed the session decides whether the
    /// carried messages will come again.
    pub(crate) fn connected(&self, session_present: bool) {
        self.lock().acks.connected(session_present);
    }

    /// Stops taking messages, abandons the queued ones (unacknowledged) and
    /// lets running handlers finish until `deadline`; the rest are aborted.
    pub(crate) async fn drain(&self, deadline: Instant) -> Drained {
        let (running, queued) = {
            let mut state = self.lock();
            let state = &mut *state;
            state.accepting = false;
            let mut queued = 0;
            for (_, lane) in &mut state.lanes {
                queued += lane.jobs.len();
                state.pending_bytes -= lane.jobs.drain(..).map(|job| job.bytes).sum::<usize>();
            }
            state.ready.clear();
            for route in &mut state.routes {
                route.queued = 0;
            }
            state.queued = 0;
            state.blocking_routes = 0;
            state.unordered_queued = 0;
            self.note_load(state);
            (state.running, queued)
        };
        self.shared.room.notify_waiters();
        loop {
            let progress = self.shared.progress.notified();
            tokio::pin!(progress);
            progress.as_mut().enable();
            let in_flight = self.lock().running;
            if in_flight == 0 {
                return Drained {
                    finished: running,
                    abandoned: queued,
                };
            }
            if tokio::time::timeout_at(deadline, progress).await.is_err() {
                let mut state = self.lock();
                let left = state.running;
                state.tasks.abort_all();
                return Drained {
                    finished: running - left,
                    abandoned: queued + left,
                };
            }
        }
    }
}

#[cfg(test)]
mod tests;
