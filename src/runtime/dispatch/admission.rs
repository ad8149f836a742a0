//! Admission: what becomes of a message the poll loop hands over. It joins a
//! message held from an earlier connection, is queued, dropped by its route's
//! overflow policy or by the limits, withheld, or acknowledged and skipped
//! (too large, or an invalid topic). Never waits.

use std::hash::BuildHasher;

use bytes::Bytes;
use tower::Service;
use tracing::{debug, error, warn};

use super::{
    acks::{AckPacket, LineId, Rejoin, CONNECTION_LINE},
    counters::Dropped,
    lanes::Job,
    Dispatcher, OverLimit, State, Warning,
};
use crate::{
    outcome::{BoxError, Outcome},
    request::{HandledBefore, Request},
    runtime::wire::Received,
    subscription::{Ack, AckOrder, Overflow},
    topic::TopicName,
};

/// A QoS 1/2 message's acknowledgement and fingerprint.
#[derive(Clone, Copy)]
struct Acked {
    packet: AckPacket,
    fingerprint: u64,
}

impl<S> Dispatcher<S>
where
    S: Service<Request<Bytes>, Response = Outcome> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    /// Takes a message from the broker. Never waits: the poll loop calls
    /// this, and every publish and acknowledgement of the handlers goes
    /// through the poll loop, so waiting here for a handler to make room would
    /// be a circular wait.
    pub(crate) fn push(&self, publish: &Received, over_limit: OverLimit) {
        let counters = &self.shared.counters;
        let metrics = &self.shared.metrics;
        let limits = &self.shared.limits;
        let ack = AckPacket::of(publish).map(|packet| Acked {
            packet,
            fingerprint: self
                .shared
                .hasher
                .hash_one((publish.topic.as_str(), &publish.payload[..])),
        });
        let bytes = publish.payload.len();
        let written = self.acks_written();
        let mut state = self.lock();
        let state = &mut *state;
        if !state.accepting {
            // Shutting down: leave it unacknowledged, so a persistent session
            // gets it again.
            counters.received(metrics, None);
            return;
        }
        let mut handled_before = false;
        if let Some(acked) = ack {
            if state.acks.carrying() && self.rejoin(state, publish, acked, written) {
                return;
            }
            if state.withholding {
                counters.received(metrics, None);
                counters.withheld(metrics);
                return;
            }
            handled_before = state.acks.handled_before(acked.packet, acked.fingerprint);
        }
        let Some(mut request) = self.admissible(state, publish, ack, written) else {
            return;
        };
        let lane_id = self.lane_for(state, request.topic());
        let route_index = state.lanes[lane_id].route;
        counters.received(metrics, Some(route_index));
        let past_limit = state.pending() >= limits.max_pending
            || state.pending_bytes + bytes > limits.max_pending_bytes;
        if past_limit
            && !self.admit_past_limit(
                state,
                ack.is_some(),
                over_limit,
                &publish.topic,
                route_index,
            )
        {
            state.forget_if_idle(lane_id);
            return;
        }
        if let Some(publisher) = &self.shared.publisher {
            request.extensions_mut().insert(publisher.clone());
        }
        if handled_before {
            request.extensions_mut().insert(HandledBefore);
        }
        if !self.make_room(state, lane_id, ack, request.topic(), written) {
            return;
        }
        let line = state.lanes[lane_id].line;
        let ticket = ack.and_then(|acked| {
            let ticket = state.acks.take(acked.packet, acked.fingerprint, line);
            if state.routes[route_index].ack == Ack::OnReceipt {
                state.acks.handled(ticket, written);
                None
            } else {
                Some(ticket)
            }
        });
        let route = &mut state.routes[route_index];
        route.queued += 1;
        if route.queued == route.capacity && route.overflow == Overflow::Block {
            state.blocking_routes += 1;
        }
        let ordered = route.ordered;
        state.queued += 1;
        state.pending_bytes += bytes;
        state.lanes[lane_id].jobs.push_back(Job {
            request,
            ticket,
            bytes,
            route: route_index,
        });
        if !ordered {
            state.unordered_queued += 1;
        }
        self.note_load(state);
        self.schedule(state, lane_id);
        if !ordered {
            self.spawn_workers(state);
        }
    }

    /// The request for a message small enough and with a valid topic; the
    /// others are acknowledged (in their turn) and skipped.
    fn admissible(
        &self,
        state: &mut State,
        publish: &Received,
        ack: Option<Acked>,
        written: u64,
    ) -> Option<Request<Bytes>> {
        let counters = &self.shared.counters;
        let metrics = &self.shared.metrics;
        let limit = self.shared.limits.max_message_size;
        let bytes = publish.payload.len();
        if bytes > limit {
            counters.received(metrics, None);
            counters.dropped(metrics, None, Dropped::Oversized);
            if let Some(suppressed) = self.shared.warnings.admit(Warning::Oversized as usize) {
                error!(
                    topic = %publish.topic,
                    size = bytes,
                    limit,
                    suppressed,
                    "message larger than the limit; acknowledged and dropped"
                );
            }
            state.ack_now(ack, CONNECTION_LINE, written);
            return None;
        }
        match publish.request() {
            Ok(request) => Some(request),
            Err(err) => {
                counters.received(metrics, None);
                counters.dropped(metrics, None, Dropped::InvalidTopic);
                if let Some(suppressed) = self.shared.warnings.admit(Warning::InvalidTopic as usize)
                {
                    warn!(topic = %publish.topic, error = %err, suppressed, "invalid topic; acknowledged and skipped");
                }
                state.ack_now(ack, CONNECTION_LINE, written);
                None
            }
        }
    }

    /// A delivery that may be a message held from an earlier connection:
    /// whether it was (and so is dealt with).
    fn rejoin(&self, state: &mut State, publish: &Received, acked: Acked, written: u64) -> bool {
        let (counters, metrics) = (&self.shared.counters, &self.shared.metrics);
        // Under `AckOrder::Topic` the redelivery waits in its topic's line.
        let lane = if self.shared.limits.ack_order == AckOrder::Topic {
            TopicName::new(&publish.topic)
                .ok()
                .map(|topic| self.lane_for(state, &topic))
        } else {
            None
        };
        let ack_line = lane.map_or(CONNECTION_LINE, |lane| state.lanes[lane].line);
        let outcome = state.acks.rejoin(
            acked.packet,
            acked.fingerprint,
            ack_line,
            state.withholding,
            written,
        );
        if let Some(lane) = lane {
            state.forget_if_idle(lane);
        }
        match outcome {
            Rejoin::Joined => {
                counters.received(metrics, None);
                counters.redelivered(metrics);
                debug!(topic = %publish.topic, pkid = acked.packet.pkid, "delivered again while held; joined the held copy");
                self.note_load(state);
                true
            }
            Rejoin::Withheld => {
                counters.received(metrics, None);
                counters.withheld(metrics);
                true
            }
            Rejoin::New => false,
        }
    }

    /// A message past the pending limits: whether it is queued all the same
    /// (see [`OverLimit`]).
    fn admit_past_limit(
        &self,
        state: &mut State,
        acknowledged: bool,
        over_limit: OverLimit,
        topic: &str,
        route: usize,
    ) -> bool {
        let (counters, metrics) = (&self.shared.counters, &self.shared.metrics);
        match (acknowledged, over_limit) {
            (false, _) => {
                counters.dropped(metrics, Some(route), Dropped::OverLimit);
                debug!(topic = %topic, "pending limit reached; dropped a QoS 0 message");
                false
            }
            (true, OverLimit::Withhold) => {
                if !state.withholding {
                    warn!(
                        pending = state.pending(),
                        "pending limit reached while reading; withholding QoS 1/2 messages until the next connection"
                    );
                }
                state.withholding = true;
                counters.withheld(metrics);
                false
            }
            (true, OverLimit::Keep) => {
                counters.kept_over_limit(metrics);
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
        ack: Option<Acked>,
        topic: &TopicName,
        written: u64,
    ) -> bool {
        let (counters, metrics) = (&self.shared.counters, &self.shared.metrics);
        let route_index = state.lanes[lane_id].route;
        let route = &state.routes[route_index];
        if route.queued < route.capacity {
            return true;
        }
        let line = state.lanes[lane_id].line;
        match route.overflow {
            Overflow::Block if ack.is_some() => {
                // Kept: the poll loop has stopped reading, and this one was
                // already read.
                true
            }
            Overflow::DropOldest => {
                if let Some(oldest) = state.lanes[lane_id].jobs.pop_front() {
                    counters.dropped(metrics, Some(route_index), Dropped::Oldest);
                    self.warn_dropped(topic, "queue full; dropped the oldest message on the topic");
                    state.queued -= 1;
                    state.pending_bytes -= oldest.bytes;
                    state.routes[route_index].queued -= 1;
                    if !state.routes[route_index].ordered {
                        state.unordered_queued -= 1;
                    }
                    if let Some(ticket) = oldest.ticket {
                        state.acks.handled(ticket, written);
                    }
                    true
                } else {
                    counters.dropped(metrics, Some(route_index), Dropped::New);
                    self.warn_dropped(
                        topic,
                        "queue full with other topics; dropped the new message",
                    );
                    state.ack_now(ack, line, written);
                    state.forget_if_idle(lane_id);
                    false
                }
            }
            _ => {
                counters.dropped(metrics, Some(route_index), Dropped::New);
                self.warn_dropped(topic, "queue full; dropped the new message");
                state.ack_now(ack, line, written);
                state.forget_if_idle(lane_id);
                false
            }
        }
    }

    /// A WARN for a dropped message, within the rate limit.
    fn warn_dropped(&self, topic: &TopicName, what: &'static str) {
        if let Some(suppressed) = self.shared.warnings.admit(Warning::Dropped as usize) {
            warn!(%topic, suppressed, "{what}");
        }
    }
}

impl State {
    /// Acknowledges a message that is not queued (dropped or invalid), in its
    /// turn of `line`.
    fn ack_now(&mut self, ack: Option<Acked>, line: LineId, written: u64) {
        if let Some(acked) = ack {
            let ticket = self.acks.take(acked.packet, acked.fingerprint, line);
            self.acks.handled(ticket, written);
        }
    }
}
