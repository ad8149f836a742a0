//! Workers: at most `max_in_flight` tasks, each running message after message
//! from the ready queue, with no spawn per message.

use std::{
    panic::AssertUnwindSafe,
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures_util::FutureExt;
use tower::{Service, ServiceExt};
use tracing::{debug, error, warn};

use super::{acks::TicketId, counters::ErrorType, lanes::Job, Dispatcher};
use crate::{
    outcome::{BoxError, Outcome},
    request::Request,
    subscription::Overflow,
    topic::TopicName,
};

impl<S> Dispatcher<S>
where
    S: Service<Request<Bytes>, Response = Outcome> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    /// A worker: runs messages from the ready queue until it is empty.
    pub(super) async fn work(self) {
        let mut service = self
            .shared
            .service
            .lock()
            .expect("service poisoned")
            .clone();
        while let Some((lane_id, job)) = self.next_job() {
            // Kept for the log lines about the outcome; an `Arc` clone.
            let topic = job.request.topic().clone();
            let started = Instant::now();
            let outcome = Self::handle(&mut service, job.request).await;
            self.count(outcome, &topic, job.route, started.elapsed());
            self.finish(lane_id, job.ticket, job.bytes);
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

    fn count(
        &self,
        outcome: Result<Outcome, BoxError>,
        topic: &TopicName,
        route: usize,
        took: Duration,
    ) {
        let (counters, metrics, route) = (&self.shared.counters, &self.shared.metrics, Some(route));
        match outcome {
            Ok(Outcome::Duplicate) => {
                counters.duplicate(metrics, route);
                debug!(%topic, "duplicate; acknowledged without handling");
            }
            Ok(Outcome::Unrouted) => {
                counters.unrouted(metrics, route);
                warn!(%topic, "no route for the message; acknowledged");
            }
            Ok(Outcome::Failed(err)) => {
                counters.failed(metrics, route, ErrorType::of(&err), took);
                debug!(%topic, error = %err, "failed; acknowledged");
            }
            Err(err) => {
                counters.failed(metrics, route, ErrorType::Service, took);
                error!(%topic, error = %err, "the service failed; acknowledged");
            }
            // Handled, or an outcome added after this was written.
            Ok(_) => {
                counters.handled(metrics, route, took);
            }
        }
    }

    fn finish(&self, lane_id: usize, ticket: Option<TicketId>, bytes: usize) {
        let written = self.acks_written();
        let mut state = self.lock();
        let state = &mut *state;
        state.running -= 1;
        state.pending_bytes -= bytes;
        state.lanes[lane_id].running -= 1;
        if let Some(ticket) = ticket {
            state.acks.handled(ticket, written);
        }
        self.schedule(state, lane_id);
        state.forget_if_idle(lane_id);
        self.note_load(state);
        if state.has_room(&self.shared.limits) {
            self.shared.room.notify_waiters();
        }
        self.shared.progress.notify_waiters();
    }
}
