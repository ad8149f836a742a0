//! The poll loop: drives rumqttc's event loop, one connection after another,
//! and never waits for a handler.
//!
//! It connects with backoff, subscribes on every CONNACK, hands publishes to
//! the dispatcher, stops reading while the dispatcher is full (writing PINGREQs
//! meanwhile), and settles what belonged to a connection when it ends.

use std::{
    future::Future,
    pin::Pin,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use bytes::Bytes;
use rumqttc::{AsyncClient, Event, EventLoop, Outgoing, Packet, SubscribeReasonCode};
use tokio::{
    sync::{watch, Notify},
    time::Instant,
};
use tower::Service;
use tracing::{debug, error, info, warn};

use super::{
    backoff::Backoff,
    client::GOODBYE_TIMEOUT,
    delivery::Deliveries,
    dispatch::{Dispatcher, OverLimit},
    heartbeat::Heartbeat,
    outbox::Outbox,
    running::{ConnectionState, RuntimeCounters},
    wire,
};
use crate::{
    config::Config,
    health::Health,
    outcome::{BoxError, Outcome},
    publisher::Publisher,
    request::{QoS, Request},
};

/// A connection that stays up this long resets the reconnect backoff.
const STABLE_CONNECTION: Duration = Duration::from_secs(10);

/// A hook run after every connect and subscribe.
pub(super) type OnConnect =
    Arc<dyn Fn(Publisher) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// Drives one connection after another; see the [module docs](self).
pub(super) struct PollLoop<S> {
    /// True once subscriptions are in place on the current connection.
    pub(super) ready: Arc<watch::Sender<bool>>,
    pub(super) eventloop: EventLoop,
    pub(super) client: AsyncClient,
    pub(super) config: Config,
    pub(super) filters: Vec<(String, QoS)>,
    pub(super) dispatcher: Dispatcher<S>,
    pub(super) deliveries: Arc<Deliveries>,
    pub(super) outbox: Arc<Outbox>,
    pub(super) publisher: Publisher,
    pub(super) on_connect: Vec<OnConnect>,
    pub(super) state: Arc<watch::Sender<ConnectionState>>,
    pub(super) counters: Arc<RuntimeCounters>,
    pub(super) reading_paused: Arc<std::sync::atomic::AtomicBool>,
    pub(super) heartbeat: Option<Heartbeat>,
    pub(super) stopping: Arc<std::sync::atomic::AtomicBool>,
}

enum Step {
    Event(Event),
    Failed(String),
    /// Reconnect at once, without a backoff: withheld messages wait in the
    /// broker's session.
    Recover,
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
    #[allow(clippy::too_many_lines)]
    pub(super) async fn run(mut self) -> bool {
        let mut backoff = Backoff::new(
            self.config.reconnect_min_delay,
            self.config.reconnect_max_delay,
        );
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
        info!(broker = %self.config.broker, client_id = %self.config.client_id, "connecting");
        // rumqttc stops taking requests while an outgoing packet id collides
        // and waits for an ack that may never come (the livelock seen after
        // broker restarts): give it one keepalive, then start over.
        let mut collided_since: Option<Instant> = None;
        // Acknowledgements written on this connection, against those the
        // dispatcher released: a recovery waits until both agree.
        let mut acks_written: u64 = 0;
        // Credentials fetched before each connect, failures described (config/connect.rs).
        let mut attempts = self.config.connection_attempts();
        loop {
            collided_since = match (&self.eventloop.state.collision, collided_since) {
                (None, _) => None,
                (Some(_), None) => Some(Instant::now()),
                (Some(_), since) => since,
            };
            let stuck =
                collided_since.is_some_and(|since| since.elapsed() > self.config.keep_alive);
            let connected = self.eventloop.network.is_some();
            if connected
                && self.dispatcher.is_withholding()
                && self.dispatcher.load().pending == 0
                && acks_written >= self.dispatcher.released_on_connection()
            {
                self.goodbye().await;
                self.finish_connection(Step::Recover, &mut connected_at, &mut backoff)
                    .await;
                continue;
            }
            if connected
                && !stuck
                && self.dispatcher.is_full()
                && self.deliveries.unconfirmed() == 0
            {
                self.pause().await;
                continue;
            }
            let step = if stuck {
                collided_since = None;
                self.eventloop.clean();
                self.eventloop.network = None;
                Step::Failed("outgoing publishes stuck on a packet id collision".to_owned())
            } else if let Err(reason) = attempts.prepare(&mut self.eventloop) {
                Step::Failed(reason) // the password could not be read: a failed attempt
            } else {
                tokio::select! {
                    // Abandoning `poll` mid-way is only done when the connection is
                    // abandoned too, so its cancel safety does not matter here.
                    () = force.notified() => {
                        self.eventloop.clean();
                        self.eventloop.network = None;
                        Step::Failed("no heartbeat came back (connection stalled)".to_owned())
                    }
                    event = self.eventloop.poll() => match event {
                        Ok(event) => Step::Event(event),
                        Err(err) => Step::Failed(attempts.failed(&err)), // with the TLS reason
                    },
                }
            };
            match step {
                Step::Event(Event::Incoming(Packet::ConnAck(ack))) => {
                    self.counters.connections.fetch_add(1, Ordering::Relaxed);
                    connected_at = Some(Instant::now());
                    collided_since = None;
                    acks_written = 0;
                    attempts.connected(); // a later failure is reported anew
                    self.dispatcher.new_connection();
                    self.deliveries.connected(ack.session_present);
                    self.outbox.connected();
                    self.state.send_replace(ConnectionState::Connected {
                        session_present: ack.session_present,
                    });
                    info!(session_present = ack.session_present, "connected");
                    // A resumed session may lack some filters; subscribing is
                    // idempotent, so always subscribe. Ready comes with the SUBACK.
                    if self.filters.is_empty() {
                        self.subscribed();
                    } else {
                        self.subscribe();
                    }
                    if let Some(hb) = &self.heartbeat {
                        *hb.last_echo.lock().expect("heartbeat poisoned") = Instant::now();
                    }
                    if self.config.enable_health {
                        self.publish_ready();
                    }
                }
                Step::Event(Event::Incoming(Packet::Publish(publish))) => {
                    if let Some(hb) = &self.heartbeat {
                        if publish.topic == hb.topic {
                            *hb.last_echo.lock().expect("heartbeat poisoned") = Instant::now();
                            continue;
                        }
                    }
                    self.dispatcher.push(&publish, over_limit);
                }
                Step::Event(Event::Incoming(Packet::PubAck(ack))) => {
                    self.deliveries.confirmed(ack.pkid);
                }
                Step::Event(Event::Incoming(Packet::PubComp(comp))) => {
                    self.deliveries.confirmed(comp.pkid);
                }
                Step::Event(Event::Incoming(Packet::SubAck(suback))) => {
                    let refused = suback
                        .return_codes
                        .iter()
                        .filter(|code| matches!(code, SubscribeReasonCode::Failure))
                        .count();
                    if refused > 0 {
                        error!(refused, "the broker refused subscriptions");
                    } else {
                        debug!(filters = suback.return_codes.len(), "subscribed");
                    }
                    self.subscribed();
                }
                Step::Event(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    self.deliveries.written(pkid);
                }
                Step::Event(Event::Outgoing(Outgoing::PubAck(_) | Outgoing::PubRec(_))) => {
                    acks_written += 1;
                }
                Step::Event(Event::Outgoing(Outgoing::Disconnect)) => {
                    if !wire::await_close(&mut self.eventloop, GOODBYE_TIMEOUT).await {
                        warn!("the broker did not close the connection after DISCONNECT");
                    }
                    info!("disconnected cleanly");
                    return true;
                }
                Step::Event(_) => {}
                step @ (Step::Failed(_) | Step::Recover) => {
                    if self.stopping.load(Ordering::SeqCst) {
                        return false;
                    }
                    if !self
                        .finish_connection(step, &mut connected_at, &mut backoff)
                        .await
                    {
                        return false;
                    }
                }
            }
        }
    }

    /// Stops reading from the broker until the dispatcher has room again (or
    /// a publish of the handlers needs an acknowledgement read). Writing goes
    /// on meanwhile where it must: a PINGREQ every half keep-alive, so the
    /// broker does not drop the connection while handlers are slow.
    async fn pause(&mut self) {
        self.counters.read_pauses.fetch_add(1, Ordering::Relaxed);
        self.reading_paused.store(true, Ordering::Relaxed);
        let load = self.dispatcher.load();
        debug!(
            pending = load.pending,
            pending_bytes = load.pending_bytes,
            "pending limit reached; reading paused"
        );
        let mut ping = tokio::time::interval(self.config.keep_alive / 2);
        ping.tick().await;
        let dispatcher = self.dispatcher.clone();
        let room = dispatcher.room();
        tokio::pin!(room);
        loop {
            tokio::select! {
                () = &mut room => break,
                _ = ping.tick() => {
                    if !wire::ping(&mut self.eventloop, self.config.keep_alive).await {
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
    }

    /// Gives the connection up on purpose, to take withheld messages back.
    async fn goodbye(&mut self) {
        info!("taking withheld messages back: reconnecting");
        wire::disconnect(&mut self.eventloop, GOODBYE_TIMEOUT).await;
    }

    /// The connection is gone (`Failed`) or given up on purpose (`Recover`):
    /// settle what belonged to it, wait the backoff, and let the next poll
    /// connect. Returns false when shutdown began meanwhile.
    async fn finish_connection(
        &mut self,
        step: Step,
        connected_at: &mut Option<Instant>,
        backoff: &mut Backoff,
    ) -> bool {
        if connected_at
            .take()
            .is_some_and(|at| at.elapsed() >= STABLE_CONNECTION)
        {
            backoff.reset();
        }
        // Acknowledgements still on their way belong to the old
        // connection; its packet ids mean nothing to the next one.
        self.dispatcher.new_connection();
        wire::salvage_events(&mut self.eventloop, &self.deliveries);
        wire::release_collision(&mut self.eventloop);
        // With a clean session the broker forgets everything; take
        // rumqttc's unconfirmed publishes back to send them again.
        let reclaim = self
            .config
            .clean_session
            .then_some(&mut self.eventloop.pending);
        self.outbox.disconnected(reclaim);
        let pending_unassigned = self
            .eventloop
            .pending
            .iter()
            .filter(|req| matches!(req, rumqttc::Request::Publish(p) if p.pkid == 0))
            .count();
        self.deliveries.disconnected(pending_unassigned);
        self.ready.send_replace(false);
        let (reason, delay) = match step {
            Step::Recover => {
                self.counters.recoveries.fetch_add(1, Ordering::Relaxed);
                ("taking withheld messages back".to_owned(), Duration::ZERO)
            }
            Step::Failed(reason) => {
                self.counters
                    .connection_failures
                    .fetch_add(1, Ordering::Relaxed);
                let delay = backoff.next_delay();
                warn!(%reason, retry_in_ms = delay.as_millis(), "connection lost; reconnecting");
                (reason, delay)
            }
            Step::Event(_) => unreachable!("only failures end a connection"),
        };
        self.state.send_replace(ConnectionState::Disconnected {
            reason,
            retry_in: delay,
        });
        tokio::time::sleep(delay).await;
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
        let filters: Vec<rumqttc::SubscribeFilter> = self
            .filters
            .iter()
            .map(|(filter, qos)| rumqttc::SubscribeFilter::new(filter.clone(), wire::to_wire(*qos)))
            .collect();
        for (filter, qos) in &self.filters {
            info!(%filter, qos = u8::from(*qos), "subscribing");
        }
        tokio::spawn(async move {
            if let Err(err) = client.subscribe_many(filters).await {
                error!(error = %err, "could not subscribe");
            }
        });
    }

    /// Subscriptions are in place on this connection: ready, and the
    /// on-connect hooks run.
    fn subscribed(&self) {
        self.ready.send_replace(true);
        for hook in &self.on_connect {
            tokio::spawn(hook(self.publisher.clone()));
        }
    }

    fn publish_ready(&self) {
        let publisher = self.publisher.clone();
        tokio::spawn(async move {
            if let Err(err) = publisher.report_health(Health::ready()).await {
                warn!(error = %err, "could not publish health");
            }
        });
    }
}
