//! Lanes: one FIFO of messages per topic, found by one hash of the topic, and
//! the ready queue of lanes with work to start.

use std::{collections::VecDeque, hash::BuildHasher};

use bytes::Bytes;
use hashbrown::hash_table::Entry;
use tower::Service;

use super::{
    acks::{Acks, LineId, TicketId, CONNECTION_LINE},
    Dispatcher, QueueDefaults, State,
};
use crate::{
    outcome::{BoxError, Outcome},
    request::Request,
    subscription::{Ack, AckOrder, Overflow, Subscription},
    topic::TopicName,
};

/// One received message on its way to the handlers.
pub(super) struct Job {
    pub(super) request: Request<Bytes>,
    /// Its acknowledgement's ticket; `None` for QoS 0 and for messages
    /// acknowledged on receipt.
    pub(super) ticket: Option<TicketId>,
    pub(super) bytes: usize,
    /// The route it counts under.
    pub(super) route: usize,
}

/// A route's settings and how many of its messages are queued.
pub(super) struct RouteQueue {
    pub(super) capacity: usize,
    pub(super) overflow: Overflow,
    pub(super) ordered: bool,
    pub(super) ack: Ack,
    pub(super) queued: usize,
}

impl RouteQueue {
    /// The queue of route `sub` (`None`: the fallback's), with the service's
    /// defaults for what the route did not set.
    pub(super) fn new(sub: Option<&Subscription>, defaults: QueueDefaults) -> Self {
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
pub(super) struct Lane {
    pub(super) topic: TopicName,
    pub(super) hash: u64,
    pub(super) route: usize,
    pub(super) jobs: VecDeque<Job>,
    pub(super) running: usize,
    /// In the ready queue.
    pub(super) scheduled: bool,
    /// The line its acknowledgements wait in: the connection's, or its own
    /// under [`AckOrder::Topic`].
    pub(super) line: LineId,
}

impl Lane {
    pub(super) fn runnable(&self, ordered: bool) -> bool {
        !self.jobs.is_empty() && (!ordered || self.running == 0)
    }

    pub(super) fn idle(&self, acks: &Acks) -> bool {
        self.jobs.is_empty()
            && self.running == 0
            && (self.line == CONNECTION_LINE || acks.line_is_empty(self.line))
    }
}

impl<S> Dispatcher<S>
where
    S: Service<Request<Bytes>, Response = Outcome> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    /// The lane of `topic`, made when the topic is new; the topic is hashed
    /// once.
    pub(super) fn lane_for(&self, state: &mut State, topic: &TopicName) -> usize {
        let hash = self.shared.hasher.hash_one(topic.as_str());
        let State {
            lanes,
            by_topic,
            acks,
            ..
        } = state;
        match by_topic.entry(hash, |&id| lanes[id].topic == *topic, |&id| lanes[id].hash) {
            Entry::Occupied(entry) => *entry.get(),
            Entry::Vacant(entry) => {
                let router = &self.shared.router;
                let route = router
                    .routes()
                    .position(|sub| sub.filter().matches(topic))
                    .unwrap_or_else(|| router.routes().count());
                let line = match self.shared.limits.ack_order {
                    AckOrder::Topic => acks.new_line(),
                    _ => CONNECTION_LINE,
                };
                let id = lanes.insert(Lane {
                    topic: topic.clone(),
                    hash,
                    route,
                    jobs: VecDeque::new(),
                    running: 0,
                    scheduled: false,
                    line,
                });
                entry.insert(id);
                id
            }
        }
    }

    /// Puts a lane with startable work in the ready queue, and starts a
    /// worker when the ready lanes outnumber the workers about to take one.
    pub(super) fn schedule(&self, state: &mut State, lane_id: usize) {
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
    pub(super) fn spawn_workers(&self, state: &mut State) {
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
}

impl State {
    /// Drops a lane that holds nothing, so topics seen once do not pile up.
    pub(super) fn forget_if_idle(&mut self, lane_id: usize) {
        let lane = &self.lanes[lane_id];
        if !lane.idle(&self.acks) || lane.scheduled {
            return;
        }
        let hash = lane.hash;
        if let Ok(entry) = self.by_topic.find_entry(hash, |&id| id == lane_id) {
            entry.remove();
        }
        let lane = self.lanes.remove(lane_id);
        self.acks.free_line(lane.line);
    }
}
