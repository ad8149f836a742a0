//! From the poll loop to the handlers: per-route bounded queues, per-topic
//! order, a global in-flight limit.
//!
//! The poll loop hands each message to [`Dispatcher::push`] and goes back to
//! the network; handlers run on their own tasks. Each route has a queue with its
//! own capacity and overflow policy. Within an ordered route, a topic's messages
//! run one after another, in arrival order; different topics run side by side,
//! up to the global in-flight limit.
//!
//! tower's `ConcurrencyLimit` cannot do this job: the limit has to hold across
//! all routes and topics, and a router does not drive each route's readiness.

use std::{
    collections::{HashSet, VecDeque},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use std::panic::AssertUnwindSafe;

use bytes::Bytes;
use futures_util::FutureExt;
use tokio::{sync::Notify, task::JoinSet, time::Instant};
use tower::{Service, ServiceExt};
use tracing::{debug, error, warn};

use super::ack::{AckSequencer, AckToken};
use crate::{
    outcome::{BoxError, Outcome},
    request::Request,
    router::Router,
    subscription::{Overflow, Subscription, DEFAULT_QUEUE_CAPACITY},
    topic::TopicName,
};

/// One received message on its way to the handlers.
pub(crate) struct Job {
    pub(crate) request: Request<Bytes>,
    pub(crate) ack: Option<AckToken>,
}

struct Queue {
    capacity: usize,
    overflow: Overflow,
    ordered: bool,
    jobs: VecDeque<Job>,
    busy_topics: HashSet<TopicName>,
    /// Whether the queue is over capacity with QoS 1/2 messages (logged once
    /// per episode).
    over: bool,
}

impl Queue {
    fn new(sub: Option<&Subscription>) -> Self {
        Self {
            capacity: sub.map_or(DEFAULT_QUEUE_CAPACITY, Subscription::get_capacity),
            overflow: sub.map_or(Overflow::Block, Subscription::get_overflow),
            ordered: sub.is_none_or(Subscription::is_ordered),
            jobs: VecDeque::new(),
            busy_topics: HashSet::new(),
            over: false,
        }
    }

    /// The first job that may start now: any job when unordered, else the first
    /// whose topic has nothing running.
    fn take_runnable(&mut self) -> Option<Job> {
        let index = if self.ordered {
            self.jobs
                .iter()
                .position(|job| !self.busy_topics.contains(job.request.topic()))?
        } else if self.jobs.is_empty() {
            return None;
        } else {
            0
        };
        let job = self.jobs.remove(index)?;
        if self.ordered {
            self.busy_topics.insert(job.request.topic().clone());
        }
        Some(job)
    }
}

struct State {
    queues: Vec<Queue>,
    in_flight: usize,
    accepting: bool,
    tasks: JoinSet<()>,
}

/// Counters of what the dispatcher did; read them with
/// [`Stats::snapshot`](crate::runtime::Stats::snapshot).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) received: AtomicU64,
    pub(crate) handled: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) duplicates: AtomicU64,
    pub(crate) unrouted: AtomicU64,
    pub(crate) dropped_oldest: AtomicU64,
    pub(crate) dropped_new: AtomicU64,
}

struct Shared<S> {
    router: Router,
    /// Behind a lock only so `Shared` is `Sync` for any `Send` service; it is
    /// held just long enough to clone.
    service: Mutex<S>,
    max_in_flight: usize,
    acks: Arc<AckSequencer>,
    counters: Arc<Counters>,
    state: Mutex<State>,
    /// Signalled whenever a queue gains room or a handler finishes.
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

impl<S> Dispatcher<S>
where
    S: Service<Request<Bytes>, Response = Outcome> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    pub(crate) fn new(
        router: Router,
        service: S,
        max_in_flight: usize,
        acks: Arc<AckSequencer>,
        counters: Arc<Counters>,
    ) -> Self {
        // One queue per route, in the router's order, and one for messages no
        // route matches (they go to the fallback).
        let mut queues: Vec<Queue> = router.routes().map(|sub| Queue::new(Some(sub))).collect();
        queues.push(Queue::new(None));
        Self {
            shared: Arc::new(Shared {
                router,
                service: Mutex::new(service),
                max_in_flight: max_in_flight.max(1),
                acks,
                counters,
                state: Mutex::new(State {
                    queues,
                    in_flight: 0,
                    accepting: true,
                    tasks: JoinSet::new(),
                }),
                progress: Notify::new(),
            }),
        }
    }

    fn queue_index(&self, topic: &TopicName) -> usize {
        let routes = &self.shared.router;
        routes
            .routes()
            .position(|sub| sub.filter().matches(topic))
            .unwrap_or_else(|| routes.routes().count())
    }

    /// Queues a message, or drops it by the route's overflow policy. Never
    /// waits: the poll loop calls this, and every publish and acknowledgement
    /// of the handlers goes through the poll loop, so waiting here for a
    /// handler to make room would be a circular wait.
    ///
    /// [`Overflow::Block`] keeps every QoS 1/2 message, even past the capacity:
    /// they are acknowledged only after handling, so the broker's in-flight
    /// window (mosquitto's `max_inflight_messages`, 20 by default) stops the
    /// broker sending more. That is the backpressure, and it bounds the queue.
    /// QoS 0 messages have no such window; past the capacity they are dropped
    /// as with [`Overflow::DropNew`].
    pub(crate) fn push(&self, job: Job) {
        self.shared
            .counters
            .received
            .fetch_add(1, Ordering::Relaxed);
        let index = self.queue_index(job.request.topic());
        let mut state = self.shared.state.lock().expect("dispatcher poisoned");
        if !state.accepting {
            // Shutting down: leave it unacknowledged, so a persistent session
            // gets it again.
            return;
        }
        let queue = &mut state.queues[index];
        if queue.jobs.len() >= queue.capacity {
            match queue.overflow {
                Overflow::Block if job.ack.is_some() => {
                    if !queue.over {
                        queue.over = true;
                        warn!(
                            topic = %job.request.topic(),
                            capacity = queue.capacity,
                            "queue full; holding acknowledgements so the broker stops sending"
                        );
                    }
                }
                Overflow::Block | Overflow::DropNew => {
                    warn!(topic = %job.request.topic(), "queue full; dropped the new message");
                    drop(state);
                    self.drop_job(job, &self.shared.counters.dropped_new);
                    return;
                }
                Overflow::DropOldest => {
                    if let Some(oldest) = queue.jobs.pop_front() {
                        warn!(topic = %oldest.request.topic(), "queue full; dropped the oldest message");
                        self.drop_job(oldest, &self.shared.counters.dropped_oldest);
                    }
                }
            }
        } else {
            queue.over = false;
        }
        state.queues[index].jobs.push_back(job);
        self.pump(&mut state);
    }

    /// A dropped message is acknowledged: dropping is the policy's decision,
    /// and an unacknowledged message would hold up every later ack.
    fn drop_job(&self, job: Job, counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
        if let Some(token) = job.ack {
            self.shared.acks.complete(token);
        }
    }

    /// Starts every job that may start now.
    fn pump(&self, state: &mut State) {
        // Reap finished tasks so the set does not grow.
        while state.tasks.try_join_next().is_some() {}
        let queue_count = state.queues.len();
        let mut started = true;
        // Round-robin over the queues so one busy route cannot starve the others.
        while started && state.in_flight < self.shared.max_in_flight {
            started = false;
            for index in 0..queue_count {
                if state.in_flight >= self.shared.max_in_flight {
                    break;
                }
                if let Some(job) = state.queues[index].take_runnable() {
                    state.in_flight += 1;
                    started = true;
                    let this = self.clone();
                    state.tasks.spawn(async move { this.run(index, job).await });
                }
            }
        }
    }

    async fn run(&self, index: usize, job: Job) {
        let topic = job.request.topic().clone();
        let service = self
            .shared
            .service
            .lock()
            .expect("service poisoned")
            .clone();
        // The stack is the user's: a panic in it must not leak this job's
        // in-flight slot, its topic's turn or its acknowledgement.
        let outcome = match AssertUnwindSafe(service.oneshot(job.request))
            .catch_unwind()
            .await
        {
            Ok(outcome) => outcome.map_err(Into::into),
            Err(panic) => Err(BoxError::from(
                crate::router::Panicked::from_payload(&*panic).to_string(),
            )),
        };
        let counters = &self.shared.counters;
        match outcome {
            Ok(Outcome::Handled) => {
                counters.handled.fetch_add(1, Ordering::Relaxed);
                debug!(%topic, "handled");
            }
            Ok(Outcome::Duplicate) => {
                counters.duplicates.fetch_add(1, Ordering::Relaxed);
                debug!(%topic, "duplicate; acknowledged without handling");
            }
            Ok(Outcome::Unrouted) => {
                counters.unrouted.fetch_add(1, Ordering::Relaxed);
                warn!(%topic, "no route for the message; acknowledged");
            }
            Ok(Outcome::Failed(err)) => {
                counters.failed.fetch_add(1, Ordering::Relaxed);
                debug!(%topic, error = %err, "failed; acknowledged");
            }
            Err(err) => {
                counters.failed.fetch_add(1, Ordering::Relaxed);

                error!(%topic, error = %err, "the service failed; acknowledged");
            }
        }
        if let Some(token) = job.ack {
            self.shared.acks.complete(token);
        }
        let mut state = self.shared.state.lock().expect("dispatcher poisoned");
        state.in_flight -= 1;
        state.queues[index].busy_topics.remove(&topic);
        self.pump(&mut state);
        drop(state);
        self.shared.progress.notify_waiters();
    }

    /// Stops taking messages, abandons the queued ones (unacknowledged) and
    /// lets running handlers finish until `deadline`; the rest are aborted.
    pub(crate) async fn drain(&self, deadline: Instant) -> Drained {
        let (running, queued) = {
            let mut state = self.shared.state.lock().expect("dispatcher poisoned");
            state.accepting = false;
            let queued: usize = state
                .queues
                .iter_mut()
                .map(|q| std::mem::take(&mut q.jobs).len())
                .sum();
            (state.in_flight, queued)
        };
        self.shared.progress.notify_waiters();
        loop {
            let progress = self.shared.progress.notified();
            tokio::pin!(progress);
            progress.as_mut().enable();
            let in_flight = self
                .shared
                .state
                .lock()
                .expect("dispatcher poisoned")
                .in_flight;
            if in_flight == 0 {
                return Drained {
                    finished: running,
                    abandoned: queued,
                };
            }
            if tokio::time::timeout_at(deadline, progress).await.is_err() {
                let mut state = self.shared.state.lock().expect("dispatcher poisoned");
                let left = state.in_flight;
                state.tasks.abort_all();
                return Drained {
                    finished: running - left,
                    abandoned: queued + left,
                };
            }
        }
    }
}
