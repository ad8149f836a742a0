//! [`Serve`]: the one way to run a router, built by [`serve`](crate::serve).

use std::{
    fmt,
    future::{Future, IntoFuture},
    pin::Pin,
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use tower::{util::BoxCloneSyncService, Layer, Service, ServiceExt};
use tracing::{info, warn};

use super::{
    client::Client,
    poll::OnConnect,
    running::{Running, ShutdownReport},
    supervisor::{self, Settings},
};
use crate::{
    config::{Config, ConfigError},
    envelope::Envelope,
    outcome::{BoxError, IntoOutcome, Outcome},
    publisher::Publisher,
    request::Request,
    router::Router,
};

/// The default limit of handlers running at once.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 64;
/// The default time running handlers get to finish at shutdown.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

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
    settings: Settings,
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
            settings: Settings {
                max_in_flight: DEFAULT_MAX_IN_FLIGHT,
                drain_timeout: DEFAULT_DRAIN_TIMEOUT,
                on_connect: Vec::new(),
                on_start: Vec::new(),
            },
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
    /// [`DEFAULT_MAX_IN_FLIGHT`]).
    ///
    /// ```no_run
    /// # async fn run(config: tower_mqtt::config::Config, router: tower_mqtt::Router) -> Result<(), tower_mqtt::BoxError> {
    /// // Eight handlers at most, each one a model call.
    /// tower_mqtt::serve(config, router).max_in_flight(8).await?;
    /// # Ok(()) }
    /// ```
    pub fn max_in_flight(mut self, limit: usize) -> Self {
        self.settings.max_in_flight = limit.max(1);
        self
    }

    /// Sets how long running handlers get to finish at shutdown (default
    /// [`DEFAULT_DRAIN_TIMEOUT`]). A handler
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
        self.settings.drain_timeout = timeout;
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
        self.settings.on_connect.push(hook_of(hook, "on-connect"));
        self
    }

    /// Runs `hook` once, after the first successful connect and subscribe,
    /// with the publisher: to announce the service or publish its initial
    /// retained state. [`on_connect`](Self::on_connect) runs after every
    /// reconnect as well.
    ///
    /// The hook returns `()` or a `Result`; a failure is logged at WARN.
    ///
    /// ```no_run
    /// # async fn run(config: tower_mqtt::config::Config, router: tower_mqtt::Router) -> Result<(), tower_mqtt::BoxError> {
    /// tower_mqtt::serve(config, router)
    ///     .on_start(|publisher| async move {
    ///         publisher.publish("system/started", serde_json::json!({"service": "stt"})).await
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn on_start<F, Fut>(mut self, hook: F) -> Self
    where
        F: Fn(Publisher) -> Fut + Send + Sync + 'static,
        Fut: Future + Send + 'static,
        Fut::Output: IntoOutcome,
    {
        self.settings.on_start.push(hook_of(hook, "start"));
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
            settings,
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
        let running = supervisor::start(client, router, service, settings);
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

/// A hook as the supervisor runs it: a failure is logged, never propagated.
fn hook_of<F, Fut>(hook: F, what: &'static str) -> OnConnect
where
    F: Fn(Publisher) -> Fut + Send + Sync + 'static,
    Fut: Future + Send + 'static,
    Fut::Output: IntoOutcome,
{
    Arc::new(move |publisher| {
        let run = hook(publisher);
        Box::pin(async move {
            if let Outcome::Failed(err) = run.await.into_outcome() {
                warn!(error = %err, "the {what} hook failed");
            }
        })
    })
}
