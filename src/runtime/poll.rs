//! The poll loop: drives rumqttc's event loop, one connection after another,
//! and never waits for a handler.
//!
//! It connects with backoff, subscribes on every CONNACK, hands publishes to
//! the dispatcher, stops reading while the dispatcher is full (writing PINGREQs
//! meanwhile), judges the connection's liveness itself (see the dispatcher's
//! module docs for why), and settles what belonged to a connection when it
//! ends.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use tokio::{
    sync::{watch, Notify},
    time::Instant,
};
use tower::{
    retry::backoff::{Backoff, ExponentialBackoff, ExponentialBackoffMaker, MakeBackoff},
    util::rng::HasherRng,
    Service,
};
use tracing::{debug, error, info, warn, Instrument};

use super::{
    ack_writer::AckGate,
    delivery::Deliveries,
    dispatch::{Dispatcher, OverLimit},
    heartbeat::Heartbeat,
    outbox::Outbox,
    running::{ConnectionState, Readiness, RefusedSubscription, RuntimeCounters},
    wire::{Connection, Event, Filter, Handle, PollError},
};
use crate::{
    config::Config,
    health::Health,
    outcome::{BoxError, Outcome},
    publisher::Publisher,
    request::{QoS, Request},
};

/// How long shutdown waits for each part of the goodbye: the final health,
/// the DISCONNECT, the broker closing the connection.
pub(super) const GOODBYE_TIMEOUT: Duration = Duration::from_secs(3);

/// A connection that stays up this long resets the reconnect backoff.
const STABLE_CONNECTION: Duration = Duration::from_secs(10);

/// Delays between connection attempts: tower's exponential backoff, from the
/// minimum doubling up to the maximum, each delay with up to as much again of
/// random jitter (capped at the maximum).
///
/// rumqttc reconnects on the very next poll after an error, with no delay at
/// all; a fleet that lost its broker at once would hammer it the moment it
/// returned. The jitter spreads even the first attempts over [min, 2 min], and
/// each client keeps the phase its early delays gave it.
struct Reconnect {
    make: ExponentialBackoffMaker<HasherRng>,
    backoff: ExponentialBackoff,
}

impl Reconnect {
    fn new(config: &Config) -> Self {
        // Configuration checked that 0 < min <= max.
        let mut make = ExponentialBackoffMaker::new(
            config.reconnect_min_delay,
            config.reconnect_max_delay,
            1.0,
            HasherRng::new(),
        )
        .expect("reconnect delays are validated");
        let backoff = make.make_backoff();
        Self { make, backoff }
    }

    /// The wait before the next attempt.
    fn next(&mut self) -> tokio::time::Sleep {
        self.backoff.next_backoff()
    }

    /// Starts over after a connection that stayed up.
    fn reset(&mut self) {
        self.backoff = self.make.make_backoff();
    }
}

/// A hook run after every connect and subscribe.
pub(super) type OnConnect =
    Arc<dyn Fn(Publisher) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// Drives one connection after another; see the [module docs](self).
pub(super) struct PollLoop<S> {
    /// Whether subscriptions are in place on the current connection.
    pub(super) ready: Arc<watch::Sender<Readiness>>,
    pub(super) connection: Connection,
    pub(super) client: Handle,
    pub(super) config: Config,
    pub(super) filters: Vec<Filter>,
    pub(super) dispatcher: Dispatcher<S>,
    pub(super) ack_gate: Arc<AckGate>,
    pub(super) deliveries: Arc<Deliveries>,
    pub(super) outbox: Arc<Outbox>,
    pub(super) publisher: Publisher,
    pub(super) on_connect: Vec<OnConnect>,
    /// Run once, after the first subscribe.
    pub(super) on_start: Vec<OnConnect>,
    /// Whether the first subscribe has happened.
    pub(super) started: bool,
    pub(super) state: Arc<watch::Sender<ConnectionState>>,
    pub(super) counters: Arc<RuntimeCounters>,
    pub(super) reading_paused: Arc<AtomicBool>,
    /// Publishes read, for the heartbeat's watchdog.
    pub(super) publishes_read: Arc<AtomicU64>,
    pub(super) heartbeat: Option<Heartbeat>,
    pub(super) stopping: Arc<AtomicBool>,
}

enum Step {
    Event(Event),
    Failed(Failure),
    /// Reconnect at once, without a backoff: withheld messages wait in the
    /// broker's session.
    Recover,
}

/// Why a connection (or an attempt) failed.
enum Failure {
    /// The broker refused the connection in its CONNACK.
    Refused(String),
    /// Anything else: network, protocol, a stalled connection.
    Lost(String),
}

/// Whether anything came from the broker since the last PINGREQ; see
/// [`PollLoop::run`].
#[derive(Default)]
struct Liveness {
    read: bool,
    paused: bool,
}

/// How often a paused poll loop checks whether a publish of the handlers now
/// needs it to read (for its acknowledgement).
const PAUSE_CHECK: Duration = Duration::from_millis(20);

impl<S> PollLoop<S>
where
    S: Service<Request<Bytes>, Response = Outcome> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    /// Drives the connection until DISCONNECT is sent; returns whether it was.
    ///
    /// rumqttc fails a connection when the PINGRESP to its previous PINGREQ
    /// has not been read one keep-alive later. Behind a backlog the PINGRESP
    /// waits unread behind thousands of PUBLISH packets, so a busy client
    /// would drop its own healthy connection. The loop clears rumqttc's flag
    /// before every poll and judges liveness itself: when rumqttc sends its
    /// next PINGREQ, the connection is dead only if nothing at all was read
    /// since the previous one while reading was not paused.
    #[allow(clippy::too_many_lines)]
    pub(super) async fn run(mut self) -> bool {
        let mut backoff = Reconnect::new(&self.config);
        let mut connected_at: Option<Instant> = None;
        let force = self
            .heartbeat
            .as_ref()
            .map_or_else(|| Arc::new(Notify::new()), |hb| hb.force_reconnect.clone());
        // A clean session cannot deliver a withheld message again.
        let over_limit = if self.config.clean_session {
            OverLimit::Keep
        } else {
            OverLimit::Withhold
        };
        let expects_pubrel = self.filters.iter().any(|f| f.qos == QoS::ExactlyOnce);
        info!(broker = %self.config.broker, client_id = %self.config.client_id, "connecting");
        // rumqttc stops taking requests while an outgoing packet id collides
        // and waits for an ack that may never come (the livelock seen after
        // broker restarts): give it one keepalive, then start over.
        let mut collided_since: Option<Instant> = None;
        let mut liveness = Liveness::default();
        // MQTT 5 while paused: rumqttc's keep-alive timer is due, and the
        // client is polled until it has written its PINGREQ.
        let mut awaiting_ping = false;
        let mut last_refusal: Option<String> = None;
        // Credentials fetched before each connect, failures described (config/connect.rs).
        let mut attempts = self.config.connection_attempts();
        loop {
            collided_since = match (self.connection.collided(), collided_since) {
                (false, _) => None,
                (true, None) => Some(Instant::now()),
                (true, since) => since,
            };
            let stuck =
                collided_since.is_some_and(|since| since.elapsed() > self.config.keep_alive);
            let connected = self.connection.is_connected();
            if connected
                && self.dispatcher.is_withholding()
                && self.dispatcher.load().pending == 0
                && self.dispatcher.acks_written() >= self.dispatcher.released_on_connection()
            {
                self.goodbye().await;
                awaiting_ping = false;
                self.finish_connection(Step::Recover, &mut connected_at, &mut backoff)
                    .await;
                continue;
            }
            if connected
                && !stuck
                && !awaiting_ping
                && self.dispatcher.is_full()
                && self.deliveries.unconfirmed() == 0
            {
                awaiting_ping = self.pause().await;
                liveness.paused = true;
                continue;
            }
            let step = if stuck {
                collided_since = None;
                self.abandon();
                Step::Failed(Failure::Lost(
                    "outgoing publishes stuck on a packet id collision".to_owned(),
                ))
            } else if let Err(reason) = self.connection.prepare(&mut attempts) {
                Step::Failed(Failure::Lost(reason)) // no password: a failed attempt
            } else {
                // The loop owns the keep-alive check (see above).
                self.connection.clear_ping_check();
                tokio::select! {
                    // Abandoning `poll` mid-way is only done when the connection is
                    // abandoned too, so its cancel safety does not matter here.
                    () = force.notified() => {
                        self.abandon();
                        Step::Failed(Failure::Lost("no heartbeat came back (connection stalled)".to_owned()))
                    }
                    event = self.connection.poll() => match event {
                        Ok(event) => Step::Event(event),
                        Err(PollError::Refused(reason)) => Step::Failed(Failure::Refused(reason)),
                        Err(PollError::Lost(lost)) => Step::Failed(Failure::Lost(lost.describe(&mut attempts))), // TLS reasons
                    },
                }
            };
            let step = match step {
                Step::Event(ref event) if event.is_read() => {
                    liveness.read = true;
                    step
                }
                Step::Event(Event::PingWritten) => {
                    awaiting_ping = false;
                    let alive = liveness.read || liveness.paused;
                    liveness = Liveness::default();
                    if alive {
                        continue;
                    }
                    self.abandon();
                    Step::Failed(Failure::Lost(format!(
                        "nothing came from the broker for a whole keep-alive ({} s): \
                         the previous PINGREQ went unanswered",
                        self.config.keep_alive.as_secs()
                    )))
                }
                step => step,
            };
            match step {
                Step::Event(Event::Connected { session_present }) => {
                    self.counters.connected();
                    connected_at = Some(Instant::now());
                    collided_since = None;
                    last_refusal = None;
                    attempts.connected(); // a later failure is reported anew
                    self.dispatcher.connected(session_present);
                    if session_present && expects_pubrel {
                        self.connection.expect_pubrels();
                    }
                    self.deliveries.connected(session_present);
                    self.outbox.connected();
                    self.state
                        .send_replace(ConnectionState::Connected { session_present });
                    info!(session_present, "connected");
                    // A resumed session may lack some filters; subscribing is
                    // idempotent, so always subscribe. Ready comes with the SUBACK.
                    if self.filters.is_empty() {
                        self.subscribed(Vec::new());
                    } else {
                        self.subscribe();
                    }
                    if let Some(hb) = &self.heartbeat {
                        *hb.last_echo.lock().expect("heartbeat poisoned") = Instant::now();
                    }
                }
                Step::Event(Event::Publish(publish)) => {
                    self.publishes_read.fetch_add(1, Ordering::Relaxed);
                    if let Some(hb) = &self.heartbeat {
                        if publish.topic == hb.topic {
                            *hb.last_echo.lock().expect("heartbeat poisoned") = Instant::now();
                            continue;
                        }
                    }
                    self.dispatcher.push(&publish, over_limit);
                }
                Step::Event(Event::Confirmed(pkid)) => {
                    self.deliveries.confirmed(pkid);
                }
                Step::Event(Event::Refused { pkid, code, reason }) => {
                    warn!(pkid, code, %reason, "the broker refused a publish");
                    self.counters.publish_refused();
                    self.deliveries.refused(pkid, code, reason);
                }
                Step::Event(Event::Subscribed(answers)) => {
                    let refused = self
                        .filters
                        .iter()
                        .zip(answers)
                        .filter_map(|(filter, refusal)| {
                            refusal.map(|reason| RefusedSubscription {
                                filter: filter.path.clone(),
                                reason,
                            })
                        })
                        .collect();
                    self.subscribed(refused);
                }
                Step::Event(Event::PublishWritten(pkid)) => {
                    self.deliveries.written(pkid);
                }
                Step::Event(Event::AckWritten) => {
                    self.dispatcher.ack_written();
                }
                Step::Event(Event::DisconnectWritten) => {
                    let settle = self.settle_events();
                    if !self.connection.await_close(GOODBYE_TIMEOUT, settle).await {
                        warn!("the broker did not close the connection after DISCONNECT");
                    }
                    info!("disconnected cleanly");
                    return true;
                }
                Step::Event(_) => {}
                step @ (Step::Failed(_) | Step::Recover) => {
                    awaiting_ping = false;
                    if !self
                        .end(step, &mut connected_at, &mut backoff, &mut last_refusal)
                        .await
                    {
                        return false;
                    }
                    liveness = Liveness::default();
                }
            }
        }
    }

    /// Ends a connection (or a failed attempt): logs a refusal when it is new
    /// or different, then settles and waits. Returns false when shutdown
    /// began.
    async fn end(
        &mut self,
        step: Step,
        connected_at: &mut Option<Instant>,
        backoff: &mut Reconnect,
        last_refusal: &mut Option<String>,
    ) -> bool {
        if self.stopping.load(Ordering::SeqCst) {
            return false;
        }
        if let Step::Failed(Failure::Refused(reason)) = &step {
            if last_refusal.as_deref() != Some(reason.as_str()) {
                error!(broker = %self.config.broker, %reason, "the broker refused the connection");
                *last_refusal = Some(reason.clone());
            }
        }
        self.finish_connection(step, connected_at, backoff).await
    }

    /// Drops the connection without a word to the broker.
    fn abandon(&mut self) {
        self.connection.abandon();
    }

    /// Stops reading from the broker until the dispatcher has room again (or
    /// a publish of the handlers needs an acknowledgement read). Writing goes
    /// on meanwhile where it must: a PINGREQ every half keep-alive, so the
    /// broker does not drop the connection while handlers are slow.
    ///
    /// On MQTT 5 the PINGREQ cannot be written past rumqttc: the pause ends
    /// when its keep-alive timer is due, and returns true: the loop then polls
    /// until the PINGREQ is written (reading what comes meanwhile, at most a
    /// batch or two of ten packets) and pauses again.
    async fn pause(&mut self) -> bool {
        self.counters.paused();
        self.reading_paused.store(true, Ordering::Relaxed);
        let load = self.dispatcher.load();
        debug!(
            pending = load.pending,
            pending_bytes = load.pending_bytes,
            "pending limit reached; reading paused"
        );
        let mut ping = tokio::time::interval(self.config.keep_alive / 2);
        ping.tick().await;
        let ping_due = self.connection.ping_due();
        let poll_for_ping = tokio::time::sleep_until(
            ping_due.unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400)),
        );
        tokio::pin!(poll_for_ping);
        let mut must_ping = false;
        let dispatcher = self.dispatcher.clone();
        let room = dispatcher.room();
        tokio::pin!(room);
        loop {
            tokio::select! {
                () = &mut room => break,
                () = &mut poll_for_ping, if ping_due.is_some() => {
                    must_ping = true;
                    break;
                }
                _ = ping.tick(), if ping_due.is_none() => {
                    if !self.connection.ping(self.config.keep_alive).await {
                        break;
                    }
                }
                () = tokio::time::sleep(PAUSE_CHECK) => {
                    if self.deliveries.unconfirmed() > 0 || self.stopping.load(Ordering::SeqCst) {
                        break;
                    }
                }
            }
        }
        self.reading_paused.store(false, Ordering::Relaxed);
        debug!("reading resumed");
        must_ping
    }

    /// What events read while the connection is being closed settle: our
    /// publishes' confirmations and acknowledgements written. Messages are
    /// left unacknowledged (the session delivers them again).
    fn settle_events(&self) -> impl FnMut(Event) {
        let deliveries = self.deliveries.clone();
        let dispatcher = self.dispatcher.clone();
        move |event| match event {
            Event::Confirmed(pkid) => deliveries.confirmed(pkid),
            Event::Refused { pkid, code, reason } => deliveries.refused(pkid, code, reason),
            Event::PublishWritten(pkid) => deliveries.written(pkid),
            Event::AckWritten => dispatcher.ack_written(),
            _ => {}
        }
    }

    /// Gives the connection up on purpose, to take withheld messages back.
    async fn goodbye(&mut self) {
        info!("taking withheld messages back: reconnecting");
        let settle = self.settle_events();
        self.connection.disconnect(GOODBYE_TIMEOUT, settle).await;
    }

    /// The connection is gone (`Failed`) or given up on purpose (`Recover`):
    /// settle what belonged to it, wait the backoff, and let the next poll
    /// connect. Returns false when shutdown began meanwhile.
    async fn finish_connection(
        &mut self,
        step: Step,
        connected_at: &mut Option<Instant>,
        backoff: &mut Reconnect,
    ) -> bool {
        if connected_at
            .take()
            .is_some_and(|at| at.elapsed() >= STABLE_CONNECTION)
        {
            backoff.reset();
        }
        // Acknowledgements still on their way belong to the old connection:
        // close the gate first, so that none follows, then clear those that
        // reached the connection's channel.
        self.ack_gate.close_connection();
        let dispatcher = &self.dispatcher;
        self.connection
            .forget_connection(&self.deliveries, || dispatcher.ack_written());
        // What was not acknowledged on the wire is carried to the next
        // connection.
        self.dispatcher.connection_lost();
        // With a clean session the broker forgets everything; unconfirmed
        // publishes are taken back to be sent again.
        let pending_unassigned = self
            .connection
            .carry_publishes(&self.outbox, self.config.clean_session);
        self.deliveries.disconnected(pending_unassigned);
        self.ready.send_replace(Readiness::Pending);
        let (reason, delay) = match step {
            Step::Recover => {
                self.counters.recovered();
                ("taking withheld messages back".to_owned(), None)
            }
            Step::Failed(failure) => {
                self.counters.failed(matches!(failure, Failure::Refused(_)));
                let wait = backoff.next();
                let delay = wait.deadline().saturating_duration_since(Instant::now());
                let reason = match failure {
                    Failure::Refused(reason) => {
                        debug!(%reason, retry_in_ms = delay.as_millis(), "refused; retrying");
                        format!("refused: {reason}")
                    }
                    Failure::Lost(reason) => {
                        warn!(%reason, retry_in_ms = delay.as_millis(), "connection lost; reconnecting");
                        reason
                    }
                };
                (reason, Some(wait))
            }
            Step::Event(_) => unreachable!("only failures end a connection"),
        };
        let retry_in = delay.as_ref().map_or(Duration::ZERO, |wait| {
            wait.deadline().saturating_duration_since(Instant::now())
        });
        self.state
            .send_replace(ConnectionState::Disconnected { reason, retry_in });
        if let Some(wait) = delay {
            wait.await;
        }
        if self.stopping.load(Ordering::SeqCst) {
            return false;
        }
        self.state.send_replace(ConnectionState::Connecting);
        info!(broker = %self.config.broker, "reconnecting");
        true
    }

    /// Subscribes on its own task: the request channel may be full, and the
    /// poll loop must not wait for it.
    fn subscribe(&self) {
        let client = self.client.clone();
        let filters = self.filters.clone();
        for filter in &self.filters {
            info!(filter = %filter.path, qos = u8::from(filter.qos), "subscribing");
        }
        tokio::spawn(
            async move {
                if let Err(err) = client.subscribe(&filters).await {
                    error!(error = %err, "could not subscribe");
                }
            }
            .in_current_span(),
        );
    }

    /// The broker answered the subscriptions of this connection. With none
    /// refused the client is ready, announces it in its health and runs the
    /// on-connect hooks; a refusal is an ERROR per filter, a counter, a health
    /// report of `ok=false` and a `ready()` that fails.
    fn subscribed(&mut self, refused: Vec<RefusedSubscription>) {
        if refused.is_empty() {
            debug!(filters = self.filters.len(), "subscribed");
            self.ready.send_replace(Readiness::Ready);
            if self.config.enable_health {
                self.report_health(Health::ready());
            }
            if !self.started {
                self.started = true;
                for hook in &self.on_start {
                    tokio::spawn(hook(self.publisher.clone()));
                }
            }
            for hook in &self.on_connect {
                tokio::spawn(hook(self.publisher.clone()));
            }
            return;
        }
        for refusal in &refused {
            error!(filter = %refusal.filter, reason = %refusal.reason, "the broker refused a subscription");
        }
        self.counters.subscriptions_refused(refused.len() as u64);
        if self.config.enable_health {
            let filters: Vec<&str> = refused.iter().map(|r| r.filter.as_str()).collect();
            self.report_health(Health::new(
                false,
                "subscribe_refused",
                Some(format!(
                    "the broker refused the subscriptions {}",
                    filters.join(", ")
                )),
            ));
        }
        self.ready.send_replace(Readiness::Refused(refused));
    }

    fn report_health(&self, health: Health) {
        let publisher = self.publisher.clone();
        tokio::spawn(
            async move {
                if let Err(err) = publisher.report_health(health).await {
                    warn!(error = %err, "could not publish health");
                }
            }
            .in_current_span(),
        );
    }
}
