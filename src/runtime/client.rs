//! [`Client`]: one supervised connection, and [`Serve`], the way to run a
//! router on it.

use std::{
    fmt,
    future::{Future, IntoFuture},
    pin::Pin,
    sync::{atomic::Ordering, Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use rumqttc::{AsyncClient, EventLoop, LastWill};
use tokio::{
    sync::{mpsc, watch, Notify},
    time::Instant,
};
use tower::{util::BoxCloneSyncService, Layer, Service, ServiceExt};
use tracing::{info, warn};

use super::{
    ack_writer::{self, AckGate},
    delivery::Deliveries,
    dispatch::{AckPacket, Counters, Dispatcher, Limits, QueueDefaults},
    heartbeat::Heartbeat,
    outbox::{Outbox, OutboxLimits},
    poll::{OnConnect, PollLoop},
    running::{
        wait_shutdown, ConnectionState, Readiness, Running, RuntimeCounters, ShutdownHandle,
        ShutdownReport, Stats, StatsView,
    },
    sink::Sink,
    wire,
};
use crate::{
    config::{Config, ConfigError},
    envelope::Envelope,
    health::{self, Health},
    outcome::{BoxError, IntoOutcome, Outcome},
    publisher::{Outbound, Publisher, RawSink},
    request::{QoS, Request},
    router::Router,
};

/// The default limit of handlers running at once.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 64;
/// The default time running handlers get to finish at shutdown.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for the final health and the DISCONNECT.
pub(super) const GOODBYE_TIMEOUT: Duration = Duration::from_secs(3);

/// One supervised MQTT connection; see the [module docs](super).
///
/// Most services never name it: [`serve`](crate::serve) makes one. Make it
/// yourself when something needs its [`Publisher`] before the router exists
/// (a handler's state, say), then [`Client::serve`] the router.
pub struct Client {
    config: Config,
    mqtt: AsyncClient,
    eventloop: EventLoop,
    deliveries: Arc<Deliveries>,
    outbox: Arc<Outbox>,
    sink: Sink,
    publisher: Publisher,
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
    /// A client for `config`. Nothing connects until it serves; publishes made
    /// before then wait for the connection.
    ///
    /// ```
    /// use tower_mqtt::{config::Config, Client};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), tower_mqtt::BoxError> {
    /// let client = Client::new(Config::new("mqtt://localhost:1883")?)?;
    /// let publisher = client.publisher(); // for a handler's state
    /// # let _ = publisher;
    /// # Ok(()) }
    /// ```
    pub fn new(config: Config) -> Result<Self, ConfigError> {
        let mut options = config.mqtt_options()?;
        options.set_manual_acks(true);
        if config.enable_health {
            let will = Health::offline()
                .envelope(config.health_name())
                .with_source(&config.source_name);
            options.set_last_will(LastWill::new(
                health::health_topic(config.health_name()),
                will.to_vec(),
                rumqttc::QoS::AtLeastOnce,
                true,
            ));
        }
        let (client, mut eventloop) = AsyncClient::new(options, config.request_channel_capacity);
        // rumqttc leaves Nagle's algorithm on: a reply published right after
        // another then waited ~40 ms for the delayed ACK (measured: every
        // second reply of a request/reply burst took 42-47 ms instead of 0.6).
        let mut network = eventloop.network_options();
        network.set_tcp_nodelay(true);
        eventloop.set_network_options(network);
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
        let sink = Sink::new(outbox.clone(), config.max_packet_size);
        let stack = config.outbound_stack().service(sink.clone());
        let publisher = Publisher::new(
            Outbound::new(stack.map_err(Into::into)),
            RawSink::new(sink.clone().map_err(Into::into)),
            &config.source_name,
            config.health_name(),
        );
        let (shutdown_tx, _) = watch::channel(false);
        Ok(Self {
            config,
            mqtt: client,
            eventloop,
            deliveries,
            outbox,
            sink,
            publisher,
            state: watch::channel(ConnectionState::Connecting).0,
            shutdown: ShutdownHandle::new(shutdown_tx),
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

    /// Puts `layer` around the outbound stack, for everything published:
    /// handlers, health, dead letters.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_mqtt::{config::Config, Client};
    ///
    /// # fn main() -> Result<(), tower_mqtt::BoxError> {
    /// let client = Client::new(Config::new("mqtt://localhost")?)?
    ///     .publish_layer(tower::timeout::TimeoutLayer::new(Duration::from_secs(5)));
    /// # let _ = client; Ok(()) }
    /// ```
    #[must_use]
    pub fn publish_layer<L>(mut self, layer: L) -> Self
    where
        L: Layer<Outbound>,
        L::Service: Service<Request<Envelope>, Response = ()> + Clone + Send + Sync + 'static,
        <L::Service as Service<Request<Envelope>>>::Error: Into<BoxError>,
        <L::Service as Service<Request<Envelope>>>::Future: Send + 'static,
    {
        self.publisher = self.publisher.layered(layer);
        self
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

    /// Serves `router` on this client, behind the standard inbound stack the
    /// configuration asks for; see [`Serve`].
    pub fn serve(self, router: Router) -> Serve {
        Serve::new(Ok(self), router)
    }

    /// Starts serving `router` wrapped in `layer`, an inbound stack of your
    /// own from raw requests (`Request<Bytes>`), and returns at once. Most
    /// services want [`Client::serve`], which builds the standard stack.
    pub fn spawn<L>(self, router: Router, layer: L) -> Running
    where
        L: Layer<Router>,
        L::Service: Service<Request<Bytes>, Response = Outcome> + Clone + Send + 'static,
        <L::Service as Service<Request<Bytes>>>::Error: Into<BoxError>,
        <L::Service as Service<Request<Bytes>>>::Future: Send + 'static,
    {
        let service = layer.layer(router.clone());
        self.start(router, service, Vec::new())
    }

    fn start<S>(self, router: Router, service: S, on_connect: Vec<OnConnect>) -> Running
    where
        S: Service<Request<Bytes>, Response = Outcome> + Clone + Send + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        let handle = self.shutdown_handle();
        let state = self.state.subscribe();
        let runtime_counters = Arc::new(RuntimeCounters::default());
        let counters = Arc::new(Counters::default());
        let publisher = self.publisher.clone();
        let view = StatsView {
            counters: counters.clone(),
            runtime: runtime_counters.clone(),
        };
        let ready = Arc::new(watch::channel(Readiness::Pending).0);
        let ready_rx = ready.subscribe();
        let task = tokio::spawn(self.run(Run {
            ready,
            router,
            service,
            counters,
            runtime_counters,
            on_connect,
        }));
        Running::new(task, ready_rx, handle, state, publisher, view)
    }

    #[allow(clippy::too_many_lines)] // one place that shows the whole lifecycle
    async fn run<S>(self, run: Run<S>) -> ShutdownReport
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
            sink,
            publisher,
            state,
            shutdown,
            max_in_flight,
            drain_timeout,
        } = self;
        let Run {
            ready,
            router,
            service,
            counters,
            runtime_counters,
            on_connect,
        } = run;
        let state = Arc::new(state);

        // Acknowledgements leave through one task, so their order holds; it
        // may wait for room in the request channel, which the poll loop must
        // never do.
        let (ack_tx, ack_rx) = mpsc::unbounded_channel::<(u64, AckPacket)>();
        let dispatcher = Dispatcher::new(
            router.clone(),
            service,
            Limits {
                max_in_flight,
                max_pending: config.max_pending,
                max_pending_bytes: config.max_pending_bytes,
                max_message_size: config.max_packet_size,
                ack_order: config.ack_order,
                queues: QueueDefaults {
                    capacity: config.queue_capacity,
                    overflow: config.queue_overflow,
                },
            },
            counters.clone(),
            ack_tx,
        )
        .with_publisher(publisher.clone());
        // The goodbye leaves through the same task, after every
        // acknowledgement released before it.
        let goodbye = Arc::new(Notify::new());
        let ack_gate = Arc::new(AckGate::default());
        let ack_task = ack_writer::spawn(client.clone(), ack_gate.clone(), ack_rx, goodbye.clone());

        let reading_paused = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let publishes_read = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let heartbeat = config.enable_heartbeat.then(|| Heartbeat {
            topic: health::heartbeat_topic(&config.client_id),
            interval: config.heartbeat_interval,
            last_echo: Arc::new(Mutex::new(Instant::now())),
            force_reconnect: Arc::new(Notify::new()),
            reading_paused: reading_paused.clone(),
            publishes_read: publishes_read.clone(),
        });
        let mut filters = wire::subscriptions(&router);
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
            ack_gate,
            deliveries: deliveries.clone(),
            outbox: outbox.clone(),
            publisher: publisher.clone(),
            on_connect,
            state: state.clone(),
            counters: runtime_counters,
            reading_paused,
            publishes_read,
            heartbeat: heartbeat.clone(),
            stopping: stopping.clone(),
        };
        let poll_task = tokio::spawn(poll.run());
        let drain_task = tokio::spawn(outbox.clone().drain());
        let heartbeat_task = heartbeat.map(|hb| tokio::spawn(hb.run(sink, state.subscribe())));

        wait_shutdown(shutdown.subscribe()).await;
        info!("shutting down: draining handlers");
        let drained = dispatcher.drain(Instant::now() + drain_timeout).await;
        if let Some(task) = heartbeat_task {
            task.abort();
            let _ = task.await;
        }

        let mut health_published = false;
        if config.enable_health && state.borrow().is_connected() {
            health_published = matches!(
                tokio::time::timeout(GOODBYE_TIMEOUT, publisher.report_health(Health::shutdown()))
                    .await,
                Ok(Ok(()))
            );
        }

        stopping.store(true, Ordering::SeqCst);
        goodbye.notify_one();
        let mut poll_task = poll_task;
        // The goodbye waits for the acknowledgements ahead of it, then for the
        // broker to close the connection: a timeout each.
        let disconnected_cleanly =
            match tokio::time::timeout(2 * GOODBYE_TIMEOUT, &mut poll_task).await {
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
            // Filled in by `Running::join`, which holds the counters.
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

/// What a run needs besides the client.
struct Run<S> {
    ready: Arc<watch::Sender<Readiness>>,
    router: Router,
    service: S,
    counters: Arc<Counters>,
    runtime_counters: Arc<RuntimeCounters>,
    on_connect: Vec<OnConnect>,
}

/// The inbound service, type-erased: raw requests in, outcomes out.
type Inbound = BoxCloneSyncService<Request<Bytes>, Outcome, BoxError>;
/// The router with the user's layers, type-erased.
type Routed = BoxCloneSyncService<Request<Envelope>, Outcome, BoxError>;
type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
/// Builds the inbound service around the routed one.
type MakeInbound = Box<dyn FnOnce(Routed, &Config) -> Inbound + Send>;

/// Serves a router; see [`serve`](crate::serve). Await it to run until the
/// graceful-shutdown signal (forever without one), or [`Serve::spawn`] it.
#[must_use = "nothing is served until it is awaited or spawned"]
pub struct Serve {
    client: Result<Client, ConfigError>,
    router: Router,
    layers: Vec<Box<dyn FnOnce(Routed) -> Routed + Send>>,
    inbound: Option<MakeInbound>,
    shutdown: Option<BoxFuture<()>>,
    on_connect: Vec<OnConnect>,
}

impl fmt::Debug for Serve {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Serve")
            .field("router", &self.router)
            .field("layers", &self.layers.len())
            .field("graceful_shutdown", &self.shutdown.is_some())
            .finish_non_exhaustive()
    }
}

impl Serve {
    pub(crate) fn new(client: Result<Client, ConfigError>, router: Router) -> Self {
        Self {
            client,
            router,
            layers: Vec::new(),
            inbound: None,
            shutdown: None,
            on_connect: Vec::new(),
        }
    }

    /// Wraps the router in `layer`, inside the standard inbound stack: the
    /// layer sees decoded, deduplicated requests in their span, as tower's
    /// `ConcurrencyLimit`, `RateLimit` or a batching layer want them. Layers
    /// added later wrap those added before.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use tower_mqtt::{config::Config, Router};
    ///
    /// # async fn run(router: Router) -> Result<(), tower_mqtt::BoxError> {
    /// tower_mqtt::serve(Config::from_env()?, router)
    ///     .layer(tower::timeout::TimeoutLayer::new(Duration::from_secs(5)))
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn layer<L>(mut self, layer: L) -> Self
    where
        L: Layer<Routed> + Send + 'static,
        L::Service: Service<Request<Envelope>, Response = Outcome> + Clone + Send + Sync + 'static,
        <L::Service as Service<Request<Envelope>>>::Error: Into<BoxError>,
        <L::Service as Service<Request<Envelope>>>::Future: Send + 'static,
    {
        self.layers.push(Box::new(move |inner| {
            Routed::new(layer.layer(inner).map_err(Into::into))
        }));
        self
    }

    /// Replaces the standard inbound stack with `stack`, a layer from the
    /// routed service (`Request<Envelope>`) to raw requests (`Request<Bytes>`),
    /// for a service that wants its own decode or dedup.
    ///
    /// ```no_run
    /// use tower::ServiceBuilder;
    /// use tower_mqtt::{config::Config, layers::{DecodeLayer, EventRegistry}, Router};
    ///
    /// # async fn run(router: Router) -> Result<(), tower_mqtt::BoxError> {
    /// let decode_only = ServiceBuilder::new().layer(DecodeLayer::new(EventRegistry::fleet()));
    /// tower_mqtt::serve(Config::from_env()?, router).inbound_stack(decode_only).await?;
    /// # Ok(()) }
    /// ```
    pub fn inbound_stack<L>(mut self, stack: L) -> Self
    where
        L: Layer<Routed> + Send + 'static,
        L::Service: Service<Request<Bytes>, Response = Outcome> + Clone + Send + Sync + 'static,
        <L::Service as Service<Request<Bytes>>>::Error: Into<BoxError>,
        <L::Service as Service<Request<Bytes>>>::Future: Send + 'static,
    {
        self.inbound = Some(Box::new(move |routed, _config| {
            Inbound::new(stack.layer(routed).map_err(Into::into))
        }));
        self
    }

    /// Sets the limit of handlers running at once (default
    /// [`DEFAULT_MAX_IN_FLIGHT`]); as [`Client::max_in_flight`].
    ///
    /// ```no_run
    /// # async fn run(config: tower_mqtt::config::Config, router: tower_mqtt::Router) -> Result<(), tower_mqtt::BoxError> {
    /// // Eight handlers at most, each one a model call.
    /// tower_mqtt::serve(config, router).max_in_flight(8).await?;
    /// # Ok(()) }
    /// ```
    pub fn max_in_flight(mut self, limit: usize) -> Self {
        self.client = self.client.map(|client| client.max_in_flight(limit));
        self
    }

    /// Sets how long running handlers get to finish at shutdown (default
    /// [`DEFAULT_DRAIN_TIMEOUT`]); as [`Client::drain_timeout`]. A handler
    /// still running then is abandoned and its message not acknowledged, so a
    /// persistent session delivers it again.
    ///
    /// ```no_run
    /// use std::time::Duration;
    ///
    /// # async fn run(config: tower_mqtt::config::Config, router: tower_mqtt::Router) -> Result<(), tower_mqtt::BoxError> {
    /// tower_mqtt::serve(config, router)
    ///     .drain_timeout(Duration::from_secs(30))
    ///     .with_graceful_shutdown(tower_mqtt::shutdown_signal())
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.client = self.client.map(|client| client.drain_timeout(timeout));
        self
    }

    /// Shuts down gracefully when `signal` completes: stop taking messages,
    /// let running handlers finish, publish the final health, disconnect.
    /// [`shutdown_signal`](crate::shutdown_signal) is SIGINT or SIGTERM.
    ///
    /// ```no_run
    /// # async fn run(config: tower_mqtt::config::Config, router: tower_mqtt::Router) -> Result<(), tower_mqtt::BoxError> {
    /// tower_mqtt::serve(config, router)
    ///     .with_graceful_shutdown(tower_mqtt::shutdown_signal())
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn with_graceful_shutdown<F>(mut self, signal: F) -> Self
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.shutdown = Some(Box::pin(signal));
        self
    }

    /// Runs `hook` after every successful connect and subscribe (the first
    /// and each reconnect), with the publisher: to re-publish retained state
    /// the broker may have lost, or to announce the service.
    ///
    /// The hook returns `()` or a `Result`; a failure is logged at WARN.
    ///
    /// ```no_run
    /// # async fn run(config: tower_mqtt::config::Config, router: tower_mqtt::Router) -> Result<(), tower_mqtt::BoxError> {
    /// tower_mqtt::serve(config, router)
    ///     .on_connect(|publisher| async move {
    ///         let character = serde_json::json!({"name": "TARS", "humor": 75});
    ///         publisher
    ///             .publish("system/character/current", character)
    ///             .retain(true)
    ///             .await
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn on_connect<F, Fut>(mut self, hook: F) -> Self
    where
        F: Fn(Publisher) -> Fut + Send + Sync + 'static,
        Fut: Future + Send + 'static,
        Fut::Output: IntoOutcome,
    {
        self.on_connect.push(Arc::new(move |publisher| {
            let run = hook(publisher);
            Box::pin(async move {
                if let Outcome::Failed(err) = run.await.into_outcome() {
                    warn!(error = %err, "the on-connect hook failed");
                }
            })
        }));
        self
    }

    /// Starts serving in the background and returns a handle at once: ready,
    /// state, stats, publisher, shutdown.
    pub fn spawn(self) -> Result<Running, ConfigError> {
        let Serve {
            client,
            router,
            layers,
            inbound,
            shutdown,
            on_connect,
        } = self;
        let client = client?;
        let mut routed = Routed::new(router.clone().map_err(BoxError::from));
        for layer in layers {
            routed = layer(routed);
        }
        let service = if let Some(stack) = inbound {
            stack(routed, client.config())
        } else {
            let stack = client.config().inbound_stack();
            Inbound::new(stack.layer(routed).map_err(Into::into))
        };
        let running = client.start(router, service, on_connect);
        if let Some(signal) = shutdown {
            let handle = running.shutdown_handle();
            tokio::spawn(async move {
                signal.await;
                info!("shutdown signal received");
                handle.shutdown();
            });
        }
        Ok(running)
    }
}

impl IntoFuture for Serve {
    type Output = Result<ShutdownReport, ConfigError>;
    type IntoFuture = BoxFuture<Self::Output>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let running = self.spawn()?;
            let report = running.join().await;
            if !report.disconnected_cleanly {
                warn!("shut down without a clean DISCONNECT");
            }
            Ok(report)
        })
    }
}
