//! The part every service runs: connect, subscribe, dispatch, acknowledge,
//! reconnect, report health, shut down.
//!
//! [`Client`] supervises one rumqttc connection:
//!
//! - **Reconnection** with exponential backoff and full jitter between
//!   `reconnect_min_delay` and `reconnect_max_delay`, reset once a connection
//!   has stayed up; every CONNACK subscribes again to the router's filters,
//!   even when the broker resumes a session. The state is observable with [`Client::state`].
//! - **Dispatch** on its own tasks: the poll loop never waits for a handler.
//!   Each topic has a FIFO; a topic's messages run in arrival order, topics
//!   side by side, at most [`Client::max_in_flight`] at once. Each route has
//!   a capacity with an [`Overflow`](crate::Overflow) policy.
//! - **A memory bound of its own**: at most `max_pending` messages and
//!   `max_pending_bytes` payload bytes are held (queued, running, or waiting
//!   for their acknowledgement's turn). At the limit the poll loop stops
//!   reading from the broker, so TCP makes the broker wait, and keeps the
//!   connection alive with PINGREQs; it reads again below three quarters of
//!   the limit. While a handler's own QoS 1/2 publish awaits its PUBACK the
//!   poll loop must read on: QoS 0 past the limit is then dropped, and QoS
//!   1/2 is withheld (not kept, not acknowledged) and taken back by a
//!   deliberate reconnect once the held messages are done, which a persistent
//!   session makes lossless; a clean session, which could not deliver them
//!   again, keeps them instead. [`Stats`] counts every case.
//! - **Acknowledgement after handling**: QoS 1 and 2 messages are acknowledged
//!   when their outcome is known (see [`Outcome`]), in arrival order within
//!   each topic (or across the connection: [`AckOrder`](crate::AckOrder)),
//!   so a slow handler holds back only its own topic. A route can ask for
//!   acknowledgement on receipt instead ([`Ack`](crate::Ack)). With
//!   `clean_session = false`, a message whose handler never finished (the
//!   process died) is delivered again.
//! - **Health and heartbeat** when enabled in the [`Config`]: retained health
//!   on connect and shutdown and as the Last Will; a heartbeat that the client
//!   also subscribes to, so a heartbeat that does not come back within three
//!   intervals forces a reconnect ("connected but nothing moves").
//! - **Graceful shutdown** on SIGINT/SIGTERM ([`Client::serve`]) or a
//!   [`ShutdownHandle`]: stop taking messages, let running handlers finish until
//!   the drain timeout, publish the final health, send DISCONNECT (so the Will
//!   is not published), join every task, and report.
//!
//! ```no_run
//! use tower_mqtt::{config::Config, Client, Data, Router};
//! use tower_mqtt_layers::StandardStack;
//!
//! #[derive(serde::Deserialize)]
//! struct Say { text: String }
//!
//! async fn say(Data(say): Data<Say>) { println!("{}", say.text) }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), tower_mqtt::BoxError> {
//!     let config = Config::from_env()?;
//!     let router = Router::new().route("tts/say", say);
//!     let layer = config.inbound_stack();
//!     Client::new(config)?.serve(router, layer).await;
//!     Ok(())
//! }
//! ```
//!
//! [`Outcome`]: crate::Outcome

mod ack;
mod backoff;
pub(crate) mod delivery;
mod dispatch;
pub(crate) mod outbox;
pub(crate) mod wire;

use std::{
    fmt,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use bytes::Bytes;
use rumqttc::{AsyncClient, Event, EventLoop, LastWill, Outgoing, Packet, SubscribeReasonCode};
use tokio::{
    sync::{mpsc, watch, Notify},
    task::JoinHandle,
    time::Instant,
};
use tower::{Layer, Service, ServiceExt};
use tracing::{debug, error, info, warn};

pub use self::delivery::DeliveryError;
use self::{
    ack::AckPacket,
    backoff::Backoff,
    delivery::Deliveries,
    dispatch::{Counters, Dispatcher, Limits, OverLimit},
    outbox::{Outbox, OutboxLimits},
};
use crate::{
    config::{Config, ConfigError},
    envelope::Envelope,
    health::{self, Health},
    outcome::{BoxError, Outcome},
    publisher::Publisher,
    request::{QoS, Request},
    router::Router,
};

/// Publishing as a type-erased service: what [`Client::publish_layer`] makes
/// of the [`Publisher`], and what the runtime publishes health through.
pub type Outbound = tower::util::BoxCloneSyncService<Request<Envelope>, (), BoxError>;

fn plain_outbound(publisher: Publisher) -> Outbound {
    Outbound::new(ServiceExt::<Request<Envelope>>::map_err(
        publisher,
        BoxError::from,
    ))
}

/// The default limit of handlers running at once.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 64;
/// The default time running handlers get to finish at shutdown.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection that stays up this long resets the reconnect backoff.
const STABLE_CONNECTION: Duration = Duration::from_secs(10);
/// How long shutdown waits for the final health and the DISCONNECT.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(3);

/// Where the connection stands; watch it with [`Client::state`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectionState {
    /// Connecting (first connection or after a delay).
    Connecting,
    /// Connected; `session_present` tells whether the broker resumed a session.
    Connected {
        /// Whether the broker resumed a persistent session.
        session_present: bool,
    },
    /// The connection was lost; a new attempt follows after `retry_in`.
    Disconnected {
        /// Why the connection was lost.
        reason: String,
        /// The delay before the next attempt.
        retry_in: Duration,
    },
    /// Shut down; no more attempts.
    Closed,
}

impl ConnectionState {
    /// Whether this is [`ConnectionState::Connected`].
    pub fn is_connected(&self) -> bool {
        matches!(self, Self::Connected { .. })
    }
}

/// Counts of what the runtime did with incoming messages.
///
/// ```
/// let stats = tower_mqtt::runtime::Stats::default();
/// assert_eq!(stats.received, 0);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Messages received from the broker.
    pub received: u64,
    /// Handled ([`Outcome::Handled`]).
    pub handled: u64,
    /// Failed ([`Outcome::Failed`] or an error of the service).
    pub failed: u64,
    /// Recognised as duplicates.
    pub duplicates: u64,
    /// Matched no route and no fallback.
    pub unrouted: u64,
    /// Dropped by [`Overflow::DropOldest`](crate::Overflow::DropOldest).
    pub dropped_oldest: u64,
    /// Dropped by [`Overflow::DropNew`](crate::Overflow::DropNew), or by
    /// [`Overflow::Block`](crate::Overflow::Block) after waiting too long.
    pub dropped_new: u64,
    /// QoS 0 messages dropped because the pending limits were reached.
    pub dropped_over_limit: u64,
    /// QoS 1/2 messages read past the pending limits and withheld: neither
    /// kept nor acknowledged, so that the persistent session delivers them
    /// again after the deliberate reconnect counted in `recoveries`.
    pub withheld: u64,
    /// QoS 1/2 messages read past the pending limits and kept, because a
    /// clean session could not deliver them again.
    pub kept_over_limit: u64,
    /// Messages larger than `max_packet_size`: acknowledged and dropped.
    pub oversized: u64,
    /// Messages whose topic was not a valid topic name: acknowledged and
    /// dropped.
    pub invalid_topic: u64,
    /// Messages held now: queued, running, or handled and waiting for their
    /// acknowledgement's turn. Bounded by `max_pending`.
    pub pending: u64,
    /// The most messages held at once so far.
    pub peak_pending: u64,
    /// Payload bytes of queued and running messages now.
    pub pending_bytes: u64,
    /// The most payload bytes held at once so far.
    pub peak_pending_bytes: u64,
    /// Times the client stopped reading from the broker because the pending
    /// limits were reached.
    pub read_pauses: u64,
    /// Deliberate reconnects that took withheld messages back from the
    /// broker.
    pub recoveries: u64,
    /// Connections made (the first one and every reconnect).
    pub connections: u64,
    /// Connection attempts and connections that failed.
    pub connection_failures: u64,
}

/// The runtime's own counters, beside the dispatcher's.
#[derive(Debug, Default)]
struct RuntimeCounters {
    connections: AtomicU64,
    connection_failures: AtomicU64,
    read_pauses: AtomicU64,
    recoveries: AtomicU64,
}

impl Stats {
    fn read(counters: &Counters, runtime: &RuntimeCounters) -> Self {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Self {
            received: get(&counters.received),
            handled: get(&counters.handled),
            failed: get(&counters.failed),
            duplicates: get(&counters.duplicates),
            unrouted: get(&counters.unrouted),
            dropped_oldest: get(&counters.dropped_oldest),
            dropped_new: get(&counters.dropped_new),
            dropped_over_limit: get(&counters.dropped_over_limit),
            withheld: get(&counters.withheld),
            kept_over_limit: get(&counters.kept_over_limit),
            oversized: get(&counters.oversized),
            invalid_topic: get(&counters.invalid_topic),
            pending: get(&counters.pending),
            peak_pending: get(&counters.peak_pending),
            pending_bytes: get(&counters.pending_bytes),
            peak_pending_bytes: get(&counters.peak_pending_bytes),
            read_pauses: get(&runtime.read_pauses),
            recoveries: get(&runtime.recoveries),
            connections: get(&runtime.connections),
            connection_failures: get(&runtime.connection_failures),
        }
    }
}

/// What shutdown did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Handlers that were running at shutdown and finished in time.
    pub finished: usize,
    /// Messages queued but not started, plus handlers still running at the
    /// drain deadline (aborted). None of them was acknowledged.
    pub abandoned: usize,
    /// Whether the final health report was confirmed by the broker.
    pub health_published: bool,
    /// Whether DISCONNECT was sent (so the broker does not publish the Will).
    pub disconnected_cleanly: bool,
    /// The counters at the end.
    pub stats: Stats,
}

/// Asks a running [`Client`] to shut down; cheap to clone.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), tower_mqtt::BoxError> {
/// let client = tower_mqtt::Client::new(tower_mqtt::config::Config::new("mqtt://127.0.0.1:1")?)?;
/// let handle = client.shutdown_handle();
/// handle.shutdown();
/// assert!(handle.is_shutdown());
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct ShutdownHandle {
    tx: Arc<watch::Sender<bool>>,
}

impl ShutdownHandle {
    /// Starts the shutdown; idempotent.
    pub fn shutdown(&self) {
        self.tx.send_replace(true);
    }

    /// Whether shutdown was asked for.
    pub fn is_shutdown(&self) -> bool {
        *self.tx.borrow()
    }
}

/// One supervised MQTT connection; see the [module docs](self).
pub struct Client {
    config: Config,
    mqtt: AsyncClient,
    eventloop: EventLoop,
    deliveries: Arc<Deliveries>,
    outbox: Arc<Outbox>,
    publisher: Publisher,
    outbound: Outbound,
    state: watch::Sender<ConnectionState>,
    shutdown: ShutdownHandle,
    max_in_flight: usize,
    drain_timeout: Duration,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("config", &self.config)
            .field("max_in_flight", &self.max_in_flight)
            .field("drain_timeout", &self.drain_timeout)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client for `config`. Nothing connects until [`Client::serve`] or
    /// [`Client::spawn`]; publishes made before then wait for the connection.
    pub fn new(config: Config) -> Result<Self, ConfigError> {
        let mut options = config.mqtt_options()?;
        options.set_manual_acks(true);
        if config.enable_health {
            let will = Health::offline().envelope(&config.source_name);
            options.set_last_will(LastWill::new(
                health::health_topic(&config.source_name),
                will.to_vec(),
                rumqttc::QoS::AtLeastOnce,
                true,
            ));
        }
        let (client, eventloop) = AsyncClient::new(options, config.request_channel_capacity);
        let deliveries = Arc::new(Deliveries::default());
        let outbox = Arc::new(Outbox::new(
            client.clone(),
            deliveries.clone(),
            OutboxLimits {
                max_messages: config.offline_buffer,
                max_age: config.offline_max_age,
                overflow: config.offline_overflow,
            },
        ));
        let publisher = Publisher::new(outbox.clone(), &config.source_name, config.max_packet_size);
        let (shutdown_tx, _) = watch::channel(false);
        Ok(Self {
            config,
            mqtt: client,
            eventloop,
            deliveries,
            outbox,
            outbound: plain_outbound(publisher.clone()),
            publisher,
            state: watch::channel(ConnectionState::Connecting).0,
            shutdown: ShutdownHandle {
                tx: Arc::new(shutdown_tx),
            },
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
        })
    }

    /// A handle to publish with, from any task.
    pub fn publisher(&self) -> Publisher {
        self.publisher.clone()
    }

    /// The connection state, as it changes.
    pub fn state(&self) -> watch::Receiver<ConnectionState> {
        self.state.subscribe()
    }

    /// Puts `layer` (usually `tower_mqtt_layers::outbound::OutboundStack`)
    /// in front of the [`Publisher`] for [`Client::outbound`] and for the
    /// runtime's own health reports.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_mqtt::{config::Config, Client};
    ///
    /// # fn main() -> Result<(), tower_mqtt::BoxError> {
    /// let client = Client::new(Config::new("mqtt://localhost")?)?
    ///     .publish_layer(tower::timeout::TimeoutLayer::new(Duration::from_secs(5)));
    /// let outbound = client.outbound(); // a Service<Request<Envelope>>
    /// # let _ = outbound; Ok(()) }
    /// ```
    #[must_use]
    pub fn publish_layer<L>(mut self, layer: L) -> Self
    where
        L: Layer<Publisher>,
        L::Service: Service<Request<Envelope>, Response = ()> + Clone + Send + Sync + 'static,
        <L::Service as Service<Request<Envelope>>>::Error: Into<BoxError>,
        <L::Service as Service<Request<Envelope>>>::Future: Send + 'static,
    {
        let service = layer.layer(self.publisher.clone());
        self.outbound = Outbound::new(ServiceExt::<Request<Envelope>>::map_err(
            service,
            Into::into,
        ));
        self
    }

    /// Publishing through the layer given to [`Client::publish_layer`] (the
    /// plain [`Publisher`] without one): for handlers, and as the dead-letter
    /// sink of the inbound stack.
    pub fn outbound(&self) -> Outbound {
        self.outbound.clone()
    }

    /// A handle that shuts the client down.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.shutdown.clone()
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Sets the limit of handlers running at once (default
    /// [`DEFAULT_MAX_IN_FLIGHT`]).
    #[must_use]
    pub fn max_in_flight(mut self, limit: usize) -> Self {
        self.max_in_flight = limit.max(1);
        self
    }

    /// Sets how long running handlers get to finish at shutdown (default
    /// [`DEFAULT_DRAIN_TIMEOUT`]).
    #[must_use]
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// Serves `router` wrapped in `layer` until SIGINT, SIGTERM or a
    /// [`ShutdownHandle`]; then shuts down gracefully.
    ///
    /// `layer` turns the router into a service of raw requests, usually
    /// `tower_mqtt_layers::StandardStack` (decode, dedup, span, isolation,
    /// retry, timeout).
    pub async fn serve<L>(self, router: Router, layer: L) -> ShutdownReport
    where
        L: Layer<Router>,
        L::Service: Service<Request<Bytes>, Response = Outcome> + Clone + Send + 'static,
        <L::Service as Service<Request<Bytes>>>::Error: Into<BoxError>,
        <L::Service as Service<Request<Bytes>>>::Future: Send + 'static,
    {
        let handle = self.shutdown_handle();
        let running = self.spawn(router, layer);
        tokio::select! {
            () = shutdown_signal() => {
                info!("shutdown signal received");
                handle.shutdown();
            }
            () = wait_shutdown(handle.tx.subscribe()) => {}
        }
        running.join().await
    }

    /// Starts serving in the background and returns at once; see
    /// [`Client::serve`]. Signals are not watched: stop it with
    /// [`Running::shutdown`].
    pub fn spawn<L>(self, router: Router, layer: L) -> Running
    where
        L: Layer<Router>,
        L::Service: Service<Request<Bytes>, Response = Outcome> + Clone + Send + 'static,
        <L::Service as Service<Request<Bytes>>>::Error: Into<BoxError>,
        <L::Service as Service<Request<Bytes>>>::Future: Send + 'static,
    {
        let service = layer.layer(router.clone());
        let handle = self.shutdown_handle();
        let state = self.state.subscribe();
        let runtime_counters = Arc::new(RuntimeCounters::default());
        let counters = Arc::new(Counters::default());
        let publisher = self.publisher.clone();
        let outbound = self.outbound.clone();
        let stats_view = StatsView {
            counters: counters.clone(),
            runtime: runtime_counters.clone(),
        };
        let ready = Arc::new(watch::channel(false).0);
        let ready_rx = ready.subscribe();
        let task = tokio::spawn(self.run(ready, router, service, counters, runtime_counters));
        Running {
            task,
            ready: ready_rx,
            handle,
            state,
            publisher,
            outbound,
            stats: stats_view,
        }
    }

    #[allow(clippy::too_many_lines)] // one place that shows the whole lifecycle
    async fn run<S>(
        self,
        ready: Arc<watch::Sender<bool>>,
        router: Router,
        service: S,
        counters: Arc<Counters>,
        runtime_counters: Arc<RuntimeCounters>,
    ) -> ShutdownReport
    where
        S: Service<Request<Bytes>, Response = Outcome> + Clone + Send + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        let Client {
            config,
            mqtt: client,
            eventloop,
            deliveries,
            outbox,
            publisher,
            outbound,
            state,
            shutdown,
            max_in_flight,
            drain_timeout,
        } = self;
        let state = Arc::new(state);

        // Acknowledgements leave through one task, so their order holds; it
        // may wait for room in the request channel, which the poll loop must
        // never do.
        let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<(u64, AckPacket)>();
        let dispatcher = Dispatcher::new(
            router.clone(),
            service,
            Limits {
                max_in_flight,
                max_pending: config.max_pending,
                max_pending_bytes: config.max_pending_bytes,
                max_message_size: config.max_packet_size,
                ack_order: config.ack_order,
            },
            counters.clone(),
            ack_tx,
        );
        let ack_client = client.clone();
        let ack_dispatcher = dispatcher.clone();
        let ack_task = tokio::spawn(async move {
            while let Some((epoch, packet)) = ack_rx.recv().await {
                // An ack of the previous connection would acknowledge a
                // different message on this one.
                if epoch != ack_dispatcher.epoch() {
                    continue;
                }
                if ack_client.ack(&packet.to_publish()).await.is_err() {
                    break;
                }
            }
        });

        let reading_paused = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let heartbeat = config.enable_heartbeat.then(|| Heartbeat {
            topic: health::heartbeat_topic(&config.client_id),
            interval: config.heartbeat_interval,
            last_echo: Arc::new(Mutex::new(Instant::now())),
            force_reconnect: Arc::new(Notify::new()),
            reading_paused: reading_paused.clone(),
        });
        let mut filters: Vec<(String, QoS)> = router
            .subscriptions()
            .into_iter()
            .map(|(filter, qos)| {
                // rumqttc forgets which QoS 2 deliveries await PUBREL when a
                // connection drops, then treats the broker's resent PUBREL in a
                // resumed session as an error and reconnects, forever. QoS 1
                // with dedup gives the same guarantee without that loop.
                let qos = if qos == QoS::ExactlyOnce && !config.clean_session {
                    warn!(%filter, "QoS 2 with a persistent session is subscribed at QoS 1");
                    QoS::AtLeastOnce
                } else {
                    qos
                };
                (filter.as_str().to_owned(), qos)
            })
            .collect();
        if let Some(hb) = &heartbeat {
            filters.push((hb.topic.clone(), QoS::AtMostOnce));
        }

        let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let poll = PollLoop {
            ready: ready.clone(),
            eventloop,
            client: client.clone(),
            config: config.clone(),
            filters,
            dispatcher: dispatcher.clone(),
            deliveries: deliveries.clone(),
            outbox: outbox.clone(),
            outbound: outbound.clone(),
            state: state.clone(),
            counters: runtime_counters,
            reading_paused,
            heartbeat: heartbeat.clone(),
            stopping: stopping.clone(),
        };
        let poll_task = tokio::spawn(poll.run());
        let drain_task = tokio::spawn(outbox.clone().drain());
        let heartbeat_task =
            heartbeat.map(|hb| tokio::spawn(hb.run(publisher.clone(), state.subscribe())));

        wait_shutdown(shutdown.tx.subscribe()).await;
        info!("shutting down: draining handlers");
        let drained = dispatcher.drain(Instant::now() + drain_timeout).await;
        if let Some(task) = heartbeat_task {
            task.abort();
            let _ = task.await;
        }

        let mut health_published = false;
        if config.enable_health && state.borrow().is_connected() {
            let req = Request::builder(health::health_topic(&config.source_name))
                .qos(QoS::AtLeastOnce)
                .retain(true)
                .body(Health::shutdown().envelope(&config.source_name));
            if let Ok(req) = req {
                health_published = matches!(
                    tokio::time::timeout(GOODBYE_TIMEOUT, outbound.clone().oneshot(req)).await,
                    Ok(Ok(()))
                );
            }
        }

        stopping.store(true, Ordering::SeqCst);
        let _ = client.try_disconnect();
        let mut poll_task = poll_task;
        let disconnected_cleanly = match tokio::time::timeout(GOODBYE_TIMEOUT, &mut poll_task).await
        {
            Ok(Ok(clean)) => clean,
            Ok(Err(_)) => false,
            Err(_) => {
                poll_task.abort();
                false
            }
        };
        outbox.close();
        let _ = drain_task.await;
        deliveries.close();
        drop(dispatcher);
        // The ack channel closes once the dispatcher and poll loop are gone.
        ack_task.abort();
        let _ = ack_task.await;
        state.send_replace(ConnectionState::Closed);

        let report = ShutdownReport {
            finished: drained.finished,
            abandoned: drained.abandoned,
            health_published,
            disconnected_cleanly,
            // Filled in by `Running::join`, which also holds the connection count.
            stats: Stats::default(),
        };
        info!(
            finished = report.finished,
            abandoned = report.abandoned,
            disconnected_cleanly,
            "shut down"
        );
        report
    }
}

#[derive(Clone)]
struct StatsView {
    counters: Arc<Counters>,
    runtime: Arc<RuntimeCounters>,
}

/// A client serving in the background; see [`Client::spawn`].
pub struct Running {
    task: JoinHandle<ShutdownReport>,
    ready: watch::Receiver<bool>,
    handle: ShutdownHandle,
    state: watch::Receiver<ConnectionState>,
    publisher: Publisher,
    outbound: Outbound,
    stats: StatsView,
}

impl fmt::Debug for Running {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Running")
            .field("state", &*self.state.borrow())
            .finish_non_exhaustive()
    }
}

impl Running {
    /// Shuts down gracefully and waits for the report; idempotent with other
    /// shutdown requests.
    pub async fn shutdown(self) -> ShutdownReport {
        self.handle.shutdown();
        self.join().await
    }

    /// Waits until the client has shut down (by a [`ShutdownHandle`]).
    pub async fn join(self) -> ShutdownReport {
        match self.task.await {
            Ok(mut report) => {
                report.stats = Stats::read(&self.stats.counters, &self.stats.runtime);
                report
            }
            Err(err) => {
                error!(error = %err, "the runtime task failed");
                ShutdownReport::default()
            }
        }
    }

    /// A handle that shuts the client down.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.handle.clone()
    }

    /// The connection state, as it changes.
    pub fn state(&self) -> watch::Receiver<ConnectionState> {
        self.state.clone()
    }

    /// Waits until the client is connected and the broker has acknowledged
    /// its subscriptions: from then on, messages on the router's topics reach
    /// the handlers.
    pub async fn ready(&self) {
        let mut ready = self.ready.clone();
        let _ = ready.wait_for(|ready| *ready).await;
    }

    /// Waits until the client is connected.
    pub async fn connected(&self) {
        let mut state = self.state.clone();
        let _ = state.wait_for(ConnectionState::is_connected).await;
    }

    /// A handle to publish with.
    pub fn publisher(&self) -> Publisher {
        self.publisher.clone()
    }

    /// Publishing through the client's publish layer; see
    /// [`Client::outbound`].
    pub fn outbound(&self) -> Outbound {
        self.outbound.clone()
    }

    /// The counters so far.
    pub fn stats(&self) -> Stats {
        Stats::read(&self.stats.counters, &self.stats.runtime)
    }
}

async fn wait_shutdown(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

#[derive(Clone)]
struct Heartbeat {
    topic: String,
    interval: Duration,
    last_echo: Arc<Mutex<Instant>>,
    force_reconnect: Arc<Notify>,
    /// Set while the poll loop has stopped reading: no echo can come back
    /// then, and that is not a stall.
    reading_paused: Arc<std::sync::atomic::AtomicBool>,
}

impl Heartbeat {
    /// Publishes a heartbeat every interval while connected; when none has
    /// come back for three intervals, asks the poll loop to reconnect.
    async fn run(self, publisher: Publisher, mut state: watch::Receiver<ConnectionState>) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if self.reading_paused.load(Ordering::Relaxed) {
                *self.last_echo.lock().expect("heartbeat poisoned") = Instant::now();
                continue;
            }
            if !state.borrow_and_update().is_connected() {
                // Waiting for the connection is not a stall.
                let _ = state.wait_for(ConnectionState::is_connected).await;
                *self.last_echo.lock().expect("heartbeat poisoned") = Instant::now();
                continue;
            }
            let Ok(req) = Request::builder(self.topic.as_str())
                .qos(QoS::AtMostOnce)
                .body(Bytes::from(health::heartbeat_payload()))
            else {
                return;
            };
            let sent = tokio::time::timeout(self.interval, publisher.send(req)).await;
            if !matches!(sent, Ok(Ok(()))) {
                debug!("heartbeat not written");
            }
            let silent = self.last_echo.lock().expect("heartbeat poisoned").elapsed();
            if silent > self.interval * 3 {
                warn!(
                    silent_ms = silent.as_millis(),
                    "no heartbeat came back for three intervals; reconnecting"
                );
                *self.last_echo.lock().expect("heartbeat poisoned") = Instant::now();
                // Only a poll loop waiting on this connection hears it; a
                // stored permit could cut the next, healthy one.
                self.force_reconnect.notify_waiters();
            }
        }
    }
}

struct PollLoop<S> {
    /// True once subscriptions are in place on the current connection.
    ready: Arc<watch::Sender<bool>>,
    eventloop: EventLoop,
    client: AsyncClient,
    config: Config,
    filters: Vec<(String, QoS)>,
    dispatcher: Dispatcher<S>,
    deliveries: Arc<Deliveries>,
    outbox: Arc<Outbox>,
    outbound: Outbound,
    state: Arc<watch::Sender<ConnectionState>>,
    counters: Arc<RuntimeCounters>,
    reading_paused: Arc<std::sync::atomic::AtomicBool>,
    heartbeat: Option<Heartbeat>,
    stopping: Arc<std::sync::atomic::AtomicBool>,
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
    async fn run(mut self) -> bool {
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
                        Err(err) => Step::Failed(err.to_string()),
                    },
                }
            };
            match step {
                Step::Event(Event::Incoming(Packet::ConnAck(ack))) => {
                    self.counters.connections.fetch_add(1, Ordering::Relaxed);
                    connected_at = Some(Instant::now());
                    collided_since = None;
                    acks_written = 0;
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
                        self.ready.send_replace(true);
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
                    self.ready.send_replace(true);
                }
                Step::Event(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    self.deliveries.written(pkid);
                }
                Step::Event(Event::Outgoing(Outgoing::PubAck(_) | Outgoing::PubRec(_))) => {
                    acks_written += 1;
                }
                Step::Event(Event::Outgoing(Outgoing::Disconnect)) => {
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
                    if !self.ping().await {
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

    /// Writes a PINGREQ past rumqttc, which is not being polled; its PINGRESP
    /// is read when reading resumes. Returns false when the write failed (the
    /// next poll then finds the broken connection).
    async fn ping(&mut self) -> bool {
        let Some(network) = self.eventloop.network.as_mut() else {
            return false;
        };
        let write = async {
            network.write(Packet::PingReq).await?;
            network.flush().await
        };
        matches!(
            tokio::time::timeout(self.config.keep_alive, write).await,
            Ok(Ok(()))
        )
    }

    /// Sends DISCONNECT, so the broker keeps the session and does not publish
    /// the Last Will for a reconnect of our own choosing.
    async fn goodbye(&mut self) {
        info!(
            withheld = self.dispatcher.load().pending,
            "taking withheld messages back: reconnecting"
        );
        if let Some(network) = self.eventloop.network.as_mut() {
            let write = async {
                network.write(Packet::Disconnect).await?;
                network.flush().await
            };
            let _ = tokio::time::timeout(GOODBYE_TIMEOUT, write).await;
        }
        self.eventloop.clean();
        self.eventloop.network = None;
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
        self.salvage_events();
        self.release_collision();
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

    /// Reads the events rumqttc buffered before the connection failed (it
    /// records an outgoing publish before writing it, and reads packets in
    /// batches): a publish it reported written and acks that arrived still
    /// count, or the confirmation FIFO would drift by one. Incoming publishes
    /// are left unacknowledged; the broker sends them again if it can.
    fn salvage_events(&mut self) {
        for event in self.eventloop.state.events.drain(..) {
            match event {
                Event::Outgoing(Outgoing::Publish(pkid)) => self.deliveries.written(pkid),
                Event::Incoming(Packet::PubAck(ack)) => self.deliveries.confirmed(ack.pkid),
                Event::Incoming(Packet::PubComp(comp)) => self.deliveries.confirmed(comp.pkid),
                _ => {}
            }
        }
    }

    /// rumqttc keeps a publish that collided on a packet id outside its pending
    /// list, and keeps refusing requests while it holds one, even across
    /// reconnects. Put it back where it belongs: before the publishes that came
    /// after it, as the oldest one without a packet id.
    fn release_collision(&mut self) {
        let Some(mut publish) = self.eventloop.state.collision.take() else {
            return;
        };
        publish.pkid = 0;
        let pending = &mut self.eventloop.pending;
        let at = pending
            .iter()
            .position(|req| matches!(req, rumqttc::Request::Publish(p) if p.pkid == 0))
            .unwrap_or(pending.len());
        pending.insert(at, rumqttc::Request::Publish(publish));
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

    fn publish_ready(&self) {
        let outbound = self.outbound.clone();
        let service = self.config.source_name.clone();
        tokio::spawn(async move {
            let req = Request::builder(health::health_topic(&service))
                .qos(QoS::AtLeastOnce)
                .retain(true)
                .body(Health::ready().envelope(&service));
            if let Ok(req) = req {
                if let Err(err) = outbound.oneshot(req).await {
                    warn!(error = %err, "could not publish health");
                }
            }
        });
    }
}
