//! [`Client`]: one MQTT connection with its publisher, before it serves.
//!
//! Most services never name it: [`serve`](crate::serve) makes one. It exists
//! for the service whose state needs the [`Publisher`] before the router is
//! built: make the client, take its publisher, build the router, then
//! [`Client::serve`] it.

use std::sync::Arc;

use tokio::sync::watch;
use tower::{Layer, Service, ServiceExt};

use super::{
    delivery::Deliveries,
    outbox::{Outbox, OutboxLimits},
    running::{ConnectionState, ShutdownHandle},
    serve::Serve,
    sink::Sink,
    wire::{self, Connection, Handle},
};
use crate::{
    config::{Config, ConfigError},
    envelope::Envelope,
    health::{self, Health},
    outcome::BoxError,
    publisher::{Outbound, Publisher, RawSink},
    request::Request,
    router::Router,
};

/// One supervised MQTT connection; see the [module docs](super).
///
/// Most services never name it: [`serve`](crate::serve) makes one. Make it
/// yourself when something needs its [`Publisher`] before the router exists
/// (a handler's state, say), then [`Client::serve`] the router.
pub struct Client {
    pub(super) config: Config,
    pub(super) mqtt: Handle,
    pub(super) connection: Connection,
    pub(super) deliveries: Arc<Deliveries>,
    pub(super) outbox: Arc<Outbox>,
    pub(super) sink: Sink,
    /// The outbound stack every publisher of this client runs (its clones
    /// share the count of dropped publishes).
    pub(super) outbound: crate::layers::OutboundStack,
    pub(super) publisher: Publisher,
    pub(super) state: watch::Sender<ConnectionState>,
    pub(super) shutdown: ShutdownHandle,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("config", &self.config)
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
        let will = config.enable_health.then(|| {
            let will = Health::offline()
                .envelope(config.health_name())
                .with_source(&config.source_name);
            (health::health_topic(config.health_name()), will.to_vec())
        });
        let (client, connection) = wire::connect(&config, will)?;
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
        let outbound = config.outbound_stack();
        let stack = outbound.service(sink.clone());
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
            connection,
            deliveries,
            outbox,
            sink,
            outbound,
            publisher,
            state: watch::channel(ConnectionState::Connecting).0,
            shutdown: ShutdownHandle::new(shutdown_tx),
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

    /// Serves `router` on this client, behind the standard inbound stack the
    /// configuration asks for; see [`Serve`].
    pub fn serve(self, router: Router) -> Serve {
        Serve::new(Ok(self), router)
    }
}
