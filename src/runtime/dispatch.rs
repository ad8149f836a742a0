//! From the poll loop to the handlers: one FIFO per topic, a ready queue of
//! topics with work, a pool of workers, and a memory bound of our own.
//!
//! - **Constant work per message.** A message is hashed once (its topic, with
//!   a fast hasher) to find its topic's lane; the lane remembers its route, so
//!   the route's filter is matched only when a topic is first seen. A lane with
//!   work waits in the ready queue; a worker takes the lane at the head, runs
//!   one message, and puts the lane back at the tail while it has more. Nothing
//!   scans the waiting messages.
//! - **Order and no head-of-line blocking.** An ordered route (the default)
//!   runs a topic's messages one after another; different topics run side by
//!   side, up to the in-flight limit. Acknowledgements are ordered per topic
//!   by default (see [`AckOrder`]), so a handler held on topic A delays
//!   neither the handling nor the acknowledgement of topic B.
//! - **A bound we own.** Every message counts as pending from the moment it
//!   is queued until its acknowledgement leaves (QoS 0: until it is handled).
//!   When pending messages or their bytes reach the limits, or a
//!   [`Overflow::Block`] route reaches its capacity, [`Dispatcher::is_full`]
//!   tells the poll loop to stop reading the socket until the pending count
//!   falls below three quarters of the limit (TCP then makes the broker
//!   wait). Messages that still arrive past the limit (only while the poll
//!   loop must read to let handlers' own publishes be confirmed) are handled
//!   by [`OverLimit`]: QoS 0 is dropped and counted; QoS 1/2 is withheld
//!   (neither kept nor acknowledged, so a persistent session delivers it
//!   again) or, with a clean session that could not deliver it again, kept.
//!
//! tower's `ConcurrencyLimit` cannot do this job: the limit has to hold across
//! all routes and topics, and a router does not drive each route's readiness.
//!
//! [`AckOrder`]: crate::AckOrder

use std::{
    collections::VecDeque,
    hash::BuildHasher,
    panic::AssertUnwindSafe,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
};

use bytes::Bytes;
use futures_util::FutureExt;
use hashbrown::{hash_table::Entry, DefaultHashBuilder, HashTable};
use slab::Slab;
use tokio::{sync::Notify, task::JoinSet, time::Instant};
use tower::{Service, ServiceExt};
use tracing::{debug, error, warn};

use tower_mqtt_core::log_limit::LogLimit;
use tower_mqtt_layers::DecodeError;

use super::ack::{AckLine, AckPacket};
use crate::{
    outcome::{BoxError, Outcome},
    publisher::Publisher,
    request::Request,
    router::Router,
    subscription::{Ack, AckOrder, Overflow, Subscription, DEFAULT_QUEUE_CAPACITY},
    topic::TopicName,
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
    /// connection too, so that per-topic order holds when the broker delivers
    /// them again on the next connection.
    Withhold,
    /// Kept past the limit: the session could not deliver it again.
    Keep,
}

/// Counters of what the dispatcher did; read them through
/// [`Stats`](crate::runtime::Stats).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) received: AtomicU64,
    pub(crate) handled: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) duplicates: AtomicU64,
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
    fn count(&self, error: &DecodeError) {
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

/// How much the dispatcher holds right now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Load {
    pub(crate) queued: usize,
    pub(crate) running: usize,
    pub(crate) pending: usize,
    pub(crate) pending_bytes: usize,
}

/// One received message on its way to the handlers.
struct Job {
    request: Request<Bytes>,
    ack: Option<AckToken>,
    bytes: usize,
}

/// Where a message stands in its acknowledgement line.
#[derive(Clone, Copy, Debug)]
struct AckToken {
    epoch: u64,
    seq: u64,
}

/// A route's settings and how many of its messages are queued.
struct RouteQueue {
    capacity: usize,
    overflow: Overflow,
    ordered: bool,
    ack: Ack,
    queued: usize,
}

impl RouteQueue {
    /// The queue of route `sub` (`None`: the fallback's), with the
    /// service's defaults for what the route did not set.
    fn new(sub: Option<&Subscription>, defaults: QueueDefaults) -> Self {
        Self {
            capacity: sub
                .and_then(Subscription::capacity_setting)
                .unwrap_or(defaults.capacity)
                .max(1),
            overflow: sub
                .and_then(Subscription::overflow_setting)
                .unwrap_or(defaults.overflow),
            ordered: sub.is_none_or(Subscription::is_ordered),
            ack: sub.map_or(Ack::AfterHandling, Subscription::get_ack),
            queued: 0,
        }
    }
}

/// One topic's messages, in arrival order.
struct Lane {
    topic: TopicName,
    hash: u64,
    route: usize,
    jobs: VecDeque<Job>,
    running: usize,
    /// In the ready queue.
    scheduled: bool,
    /// This topic's acknowledgements ([`AckOrder::Topic`]).
    acks: AckLine,
}

impl Lane {
    fn runnable(&self, ordered: bool) -> bool {
        !self.jobs.is_empty() && (!ordered || self.running == 0)
    }

    fn idle(&self) -> bool {
        self.jobs.is_empty() && self.running == 0 && self.acks.is_empty()
    }
}

struct State {
    lanes: Slab<Lane>,
    /// Lane ids by topic.
    by_topic: HashTable<usize>,
    ready: VecDeque<usize>,
    routes: Vec<RouteQueue>,
    /// The connection's acknowledgements ([`AckOrder::Global`]).
    global_acks: AckLine,
    epoch: u64,
    queued: usize,
    running: usize,
    /// Finished messages whose acknowledgement waits for an earlier one.
    unreleased: usize,
    pending_bytes: usize,
    /// Block routes at their capacity.
    blocking_routes: usize,
    /// Messages queued on unordered routes, which may run side by side.
    unordered_queued: usize,
    /// Withholding QoS 1/2 messages until the next connection.
    withholding: bool,
    /// Acknowledgements released on this connection.
    released_on_connection: u64,
    workers: usize,
    accepting: bool,
    tasks: JoinSet<()>,
}

impl State {
    fn pending(&self) -> usize {
        self.queued + self.running + self.unreleased
    }

    /// Drops a lane that holds nothing, so topics seen once do not pile up.
    fn forget_if_idle(&mut self, lane_id: usize) {
        let lane = &self.lanes[lane_id];
        if !lane.idle() || lane.scheduled {
            return;
        }
        let hash = lane.hash;
        if let Ok(entry) = self.by_topic.find_entry(hash, |&id| id == lane_id) {
            entry.remove();
        }
        self.lanes.remove(lane_id);
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
    released: tokio::sync::mpsc::UnboundedSender<(u64, AckPacket)>,
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

/// What became of the messages still waiting or running at shutdown.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Drained {
    pub(crate) finished: usize,
    pub(crate) abandoned: usize,
}

/// The mark below which a paused poll loop reads again: three quarters of a
/// limit, so that a full dispatcher does not flap between reading one message
/// and pausing.
fn resume_mark(limit: usize) -> usize {
    limit - limit / 4
}

impl<S> Dispatcher<S>
where
    S: Service<Request<Bytes>, Response = Outcome> + Clone + Send + 'static,
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
        Self {
            shared: Arc::new(Shared {
                router,
                warnings: LogLimit::default(),
                publisher: None,
                service: Mutex::new(service),
                limits,
                hasher: DefaultHashBuilder::default(),
                counters,
                released,
                state: Mutex::new(State {
                    lanes: Slab::new(),
                    by_topic: HashTable::new(),
                    ready: VecDeque::new(),
                    routes: queues,
                    global_acks: AckLine::default(),
                    epoch: 0,
                    queued: 0,
                    running: 0,
                    unreleased: 0,
                    pending_bytes: 0,
                    blocking_routes: 0,
                    unordered_queued: 0,
                    withholding: false,
                    released_on_connection: 0,
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

    /// Takes a message from the broker: queues it, drops it by its route's
    /// overflow policy or by the limits, or withholds it. Never waits: the
    /// poll loop calls this, and every publish and acknowledgement of the
    /// handlers goes through the poll loop, so waiting here for a handler to
    /// make room would be a circular wait.
    pub(crate) fn push(&self, publish: &rumqttc::Publish, over_limit: OverLimit) {
        let counters = &self.shared.counters;
        counters.received.fetch_add(1, Ordering::Relaxed);
        let limits = &self.shared.limits;
        let ack = AckPacket::of(publish);
        let bytes = publish.payload.len();
        let mut state = self.lock();
        if !state.accepting {
            // Shutting down: leave it unacknowledged, so a persistent session
            // gets it again.
            return;
        }
        if state.withholding && ack.is_some() {
            counters.withheld.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if bytes > limits.max_message_size {
            counters.oversized.fetch_add(1, Ordering::Relaxed);
            if let Some(suppressed) = self.shared.warnings.admit(Warning::Oversized as usize) {
                error!(
                    topic = %publish.topic,
                    size = bytes,
                    limit = limits.max_message_size,
                    suppressed,
                    "message larger than the limit; acknowledged and dropped"
                );
            }
            self.ack_now(&mut state, ack);
            return;
        }
        let mut request = match super::wire::request(publish) {
            Ok(request) => request,
            Err(err) => {
                counters.invalid_topic.fetch_add(1, Ordering::Relaxed);
                if let Some(suppressed) = self.shared.warnings.admit(Warning::InvalidTopic as usize)
                {
                    warn!(topic = %publish.topic, error = %err, suppressed, "invalid topic; acknowledged and skipped");
                }
                self.ack_now(&mut state, ack);
                return;
            }
        };
        let past_limit = state.pending() >= limits.max_pending
            || state.pending_bytes + bytes > limits.max_pending_bytes;
        if past_limit && !self.admit_past_limit(&mut state, ack, over_limit, &publish.topic) {
            return;
        }
        if let Some(publisher) = &self.shared.publisher {
            request.extensions_mut().insert(publisher.clone());
        }
        let lane_id = self.lane_for(&mut state, request.topic());
        let route_index = state.lanes[lane_id].route;
        if !self.make_room(&mut state, lane_id, ack, request.topic()) {
            return;
        }
        let state = &mut *state;
        let ack_policy = state.routes[route_index].ack;
        let token = ack.and_then(|packet| {
            let line = match limits.ack_order {
                AckOrder::Global => &mut state.global_acks,
                _ => &mut state.lanes[lane_id].acks,
            };
            let token = AckToken {
                epoch: state.epoch,
                seq: line.push(packet),
            };
            if ack_policy == Ack::OnReceipt {
                // Counted as unreleased until `release` lets it go.
                state.unreleased += 1;
                self.release(state, lane_id, token);
                None
            } else {
                Some(token)
            }
        });
        let route = &mut state.routes[route_index];
        route.queued += 1;
        if route.queued == route.capacity && route.overflow == Overflow::Block {
            state.blocking_routes += 1;
        }
        state.queued += 1;
        state.pending_bytes += bytes;
        state.lanes[lane_id].jobs.push_back(Job {
            request,
            ack: token,
            bytes,
        });
        self.note_load(state);
        if state.routes[route_index].ordered {
            self.schedule(state, lane_id);
        } else {
            state.unordered_queued += 1;
            self.schedule(state, lane_id);
            self.spawn_workers(state);
        }
    }

    /// A message past the pending limits: whether it is queued all the same
    /// (see [`OverLimit`]).
    fn admit_past_limit(
        &self,
        state: &mut State,
        ack: Option<AckPacket>,
        over_limit: OverLimit,
        topic: &str,
    ) -> bool {
        let counters = &self.shared.counters;
        match (ack, over_limit) {
            (None, _) => {
                counters.dropped_over_limit.fetch_add(1, Ordering::Relaxed);
                debug!(topic = %topic, "pending limit reached; dropped a QoS 0 message");
                false
            }
            (Some(_), OverLimit::Withhold) => {
                if !state.withholding {
                    warn!(
                        pending = state.pending(),
                        "pending limit reached while reading; withholding QoS 1/2 messages until the next connection"
                    );
                }
                state.withholding = true;
                counters.withheld.fetch_add(1, Ordering::Relaxed);
                false
            }
            (Some(_), OverLimit::Keep) => {
                counters.kept_over_limit.fetch_add(1, Ordering::Relaxed);
                true
            }
        }
    }

    /// Applies the route's overflow policy when its queue is full; whether
    /// the new message may join the queue.
    fn make_room(
        &self,
        state: &mut State,
        lane_id: usize,
        ack: Option<AckPacket>,
        topic: &TopicName,
    ) -> bool {
        let counters = &self.shared.counters;
        let route_index = state.lanes[lane_id].route;
        let route = &state.routes[route_index];
        if route.queued >= route.capacity {
            match route.overflow {
                Overflow::Block if ack.is_some() => {
                    // Kept: the poll loop has stopped reading, and this one
                    // was already read.
                }
                Overflow::DropOldest => {
                    if let Some(oldest) = state.lanes[lane_id].jobs.pop_front() {
                        counters.dropped_oldest.fetch_add(1, Ordering::Relaxed);
                        self.warn_dropped(
                            topic,
                            "queue full; dropped the oldest message on the topic",
                        );
                        state.queued -= 1;
                        state.pending_bytes -= oldest.bytes;
                        state.routes[route_index].queued -= 1;
                        if !state.routes[route_index].ordered {
                            state.unordered_queued -= 1;
                        }
                        if let Some(token) = oldest.ack {
                            state.unreleased += 1;
                            self.release(state, lane_id, token);
                        }
                    } else {
                        counters.dropped_new.fetch_add(1, Ordering::Relaxed);
                        self.warn_dropped(
                            topic,
                            "queue full with other topics; dropped the new message",
                        );
                        self.ack_now(state, ack);
                        state.forget_if_idle(lane_id);
                        return false;
                    }
                }
                _ => {
                    counters.dropped_new.fetch_add(1, Ordering::Relaxed);
                    self.warn_dropped(topic, "queue full; dropped the new message");
                    self.ack_now(state, ack);
                    state.forget_if_idle(lane_id);
                    return false;
                }
            }
        }
        true
    }

    /// A WARN for a dropped message, within the rate limit.
    fn warn_dropped(&self, topic: &TopicName, what: &'static str) {
        if let Some(suppressed) = self.shared.warnings.admit(Warning::Dropped as usize) {
            warn!(%topic, suppressed, "{what}");
        }
    }

    /// The lane of `topic`, made when the topic is new; the topic is hashed
    /// once.
    fn lane_for(&self, state: &mut State, topic: &TopicName) -> usize {
        let hash = self.shared.hasher.hash_one(topic.as_str());
        let State {
            lanes, by_topic, ..
        } = state;
        match by_topic.entry(hash, |&id| lanes[id].topic == *topic, |&id| lanes[id].hash) {
            Entry::Occupied(entry) => *entry.get(),
            Entry::Vacant(entry) => {
                let router = &self.shared.router;
                let route = router
                    .routes()
                    .position(|sub| sub.filter().matches(topic))
                    .unwrap_or_else(|| router.routes().count());
                let id = lanes.insert(Lane {
                    topic: topic.clone(),
                    hash,
                    route,
                    jobs: VecDeque::new(),
                    running: 0,
                    scheduled: false,
                    acks: AckLine::default(),
                });
                entry.insert(id);
                id
            }
        }
    }

    /// Acknowledges a message that is not queued (dropped or invalid), in its
    /// turn of the line.
    fn ack_now(&self, state: &mut State, ack: Option<AckPacket>) {
        let Some(packet) = ack else { return };
        if self.shared.limits.ack_order == AckOrder::Global {
            let seq = state.global_acks.push(packet);
            state.unreleased += 1;
            let epoch = state.epoch;
            self.release(state, usize::MAX, AckToken { epoch, seq });
        } else {
            // The message never joined its topic's line, and nothing of its
            // topic waits in front of it that a redelivery would reorder.
            state.released_on_connection += 1;
            let _ = self.shared.released.send((state.epoch, packet));
        }
    }

    /// Marks a message's acknowledgement ready and sends every one now at
    /// the head of its line. The caller has counted the message as
    /// unreleased.
    fn release(&self, state: &mut State, lane_id: usize, token: AckToken) {
        if token.epoch != state.epoch {
            // Its connection is gone, and with it the line.
            state.unreleased -= 1;
            return;
        }
        let released = &self.shared.released;
        let epoch = state.epoch;
        let line = match self.shared.limits.ack_order {
            AckOrder::Global => &mut state.global_acks,
            _ => &mut state.lanes[lane_id].acks,
        };
        let count = line.complete(token.seq, |packet| {
            // The receiver lives as long as the runtime; after shutdown there
            // is nothing left to acknowledge to.
            let _ = released.send((epoch, packet));
        });
        state.unreleased -= count;
        state.released_on_connection += count as u64;
    }

    /// Publishes the load to the counters, for `Stats`.
    fn note_load(&self, state: &State) {
        let counters = &self.shared.counters;
        let pending = state.pending() as u64;
        let bytes = state.pending_bytes as u64;
        counters.pending.store(pending, Ordering::Relaxed);
        counters.pending_bytes.store(bytes, Ordering::Relaxed);
        counters.peak_pending.fetch_max(pending, Ordering::Relaxed);
        counters
            .peak_pending_bytes
            .fetch_max(bytes, Ordering::Relaxed);
    }

    /// Puts a lane with startable work in the ready queue, and starts a
    /// worker when the ready lanes outnumber the workers about to take one.
    fn schedule(&self, state: &mut State, lane_id: usize) {
        let lane = &mut state.lanes[lane_id];
        let ordered = state.routes[lane.route].ordered;
        if lane.scheduled || !lane.runnable(ordered) {
            return;
        }
        lane.scheduled = true;
        state.ready.push_back(lane_id);
        self.spawn_workers(state);
    }

    /// Starts workers while the work that could start now outnumbers the
    /// workers about to take some: a ready lane is one message, an unordered
    /// lane as many as it holds.
    fn spawn_workers(&self, state: &mut State) {
        let startable = state.ready.len() + state.unordered_queued;
        while state.workers - state.running < startable
            && state.workers < self.shared.limits.max_in_flight
        {
            state.workers += 1;
            // Reap finished workers so the set does not grow.
            while state.tasks.try_join_next().is_some() {}
            let this = self.clone();
            state.tasks.spawn(this.work());
        }
    }

    /// A worker: runs messages from the ready queue until it is empty.
    async fn work(self) {
        let mut service = self
            .shared
            .service
            .lock()
            .expect("service poisoned")
            .clone();
        while let Some((lane_id, job)) = self.next_job() {
            let outcome = Self::handle(&mut service, job.request).await;
            self.count(outcome);
            self.finish(lane_id, job.ack, job.bytes);
        }
    }

    /// The next message to run, or `None` (and one worker less) when no lane
    /// is ready.
    fn next_job(&self) -> Option<(usize, Job)> {
        let mut state = self.lock();
        let state = &mut *state;
        let Some(lane_id) = state.ready.pop_front() else {
            state.workers -= 1;
            return None;
        };
        let lane = &mut state.lanes[lane_id];
        let job = lane.jobs.pop_front().expect("a ready lane has work");
        lane.running += 1;
        let route = &mut state.routes[lane.route];
        if route.queued == route.capacity && route.overflow == Overflow::Block {
            state.blocking_routes -= 1;
        }
        route.queued -= 1;
        if !route.ordered {
            state.unordered_queued -= 1;
        }
        state.queued -= 1;
        state.running += 1;
        // An unordered lane stays ready while it has work; an ordered one
        // comes back when this message is done.
        if !route.ordered && !lane.jobs.is_empty() {
            state.ready.push_back(lane_id);
        } else {
            lane.scheduled = false;
        }
        Some((lane_id, job))
    }

    async fn handle(service: &mut S, request: Request<Bytes>) -> Result<Outcome, BoxError> {
        // The stack is the user's: a panic in it must not leak this job's
        // in-flight slot, its topic's turn or its acknowledgement.
        let run = async {
            let ready = service.ready().await.map_err(Into::into)?;
            ready.call(request).await.map_err(Into::into)
        };
        match AssertUnwindSafe(run).catch_unwind().await {
            Ok(outcome) => outcome,
            Err(panic) => Err(BoxError::from(
                crate::router::Panicked::from_payload(&*panic).to_string(),
            )),
        }
    }

    fn count(&self, outcome: Result<Outcome, BoxError>) {
        let counters = &self.shared.counters;
        match outcome {
            Ok(Outcome::Duplicate) => {
                counters.duplicates.fetch_add(1, Ordering::Relaxed);
                debug!("duplicate; acknowledged without handling");
            }
            Ok(Outcome::Unrouted) => {
                counters.unrouted.fetch_add(1, Ordering::Relaxed);
                warn!("no route for the message; acknowledged");
            }
            Ok(Outcome::Failed(err)) => {
                counters.failed.fetch_add(1, Ordering::Relaxed);
                if let Some(decode) = err.get_ref().downcast_ref::<DecodeError>() {
                    counters.decode_failures.count(decode);
                }
                debug!(error = %err, "failed; acknowledged");
            }
            Err(err) => {
                counters.failed.fetch_add(1, Ordering::Relaxed);
                error!(error = %err, "the service failed; acknowledged");
            }
            // Handled, or an outcome added after this was written.
            Ok(_) => {
                counters.handled.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn finish(&self, lane_id: usize, ack: Option<AckToken>, bytes: usize) {
        let mut state = self.lock();
        let state = &mut *state;
        state.running -= 1;
        state.pending_bytes -= bytes;
        state.lanes[lane_id].running -= 1;
        if let Some(token) = ack {
            state.unreleased += 1;
            self.release(state, lane_id, token);
        }
        self.schedule(state, lane_id);
        state.forget_if_idle(lane_id);
        self.note_load(state);
        let limits = &self.shared.limits;
        if state.pending() <= resume_mark(limits.max_pending)
            && state.pending_bytes <= resume_mark(limits.max_pending_bytes)
            && state.blocking_routes == 0
        {
            self.shared.room.notify_waiters();
        }
        self.shared.progress.notify_waiters();
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
            {
                let state = self.lock();
                let limits = &self.shared.limits;
                if state.pending() <= resume_mark(limits.max_pending)
                    && state.pending_bytes <= resume_mark(limits.max_pending_bytes)
                    && state.blocking_routes == 0
                {
                    return;
                }
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
        self.lock().released_on_connection
    }

    /// The current connection's epoch: acknowledgements released under an
    /// older one are not sent.
    pub(crate) fn epoch(&self) -> u64 {
        self.lock().epoch
    }

    /// A new connection: the acknowledgement lines of the old one are
    /// forgotten (their packet ids mean nothing now; a persistent session
    /// delivers those messages again), and withholding ends.
    pub(crate) fn new_connection(&self) {
        let mut state = self.lock();
        let state = &mut *state;
        state.epoch += 1;
        state.withholding = false;
        state.released_on_connection = 0;
        let mut forgotten = state.global_acks.clear();
        let mut idle = Vec::new();
        for (id, lane) in &mut state.lanes {
            forgotten += lane.acks.clear();
            if lane.idle() && !lane.scheduled {
                idle.push(id);
            }
        }
        state.unreleased -= forgotten;
        for id in idle {
            state.forget_if_idle(id);
        }
        self.note_load(state);
        self.shared.room.notify_waiters();
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
#[path = "dispatch_tests.rs"]
mod tests;
