//! What a running client reports: its state, its counters, its shutdown.

use std::{
    fmt,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::{sync::watch, task::JoinHandle};
use tracing::error;

use super::{dispatch::Counters, sink::PublishCounts};
use crate::publisher::Publisher;

/// Where the connection stands; watch it with [`Running::state`].
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

/// Where the subscriptions of the current connection stand.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Readiness {
    /// Not connected, or the SUBACK has not come yet.
    Pending,
    /// Every subscription is in place.
    Ready,
    /// The broker refused some.
    Refused(Vec<RefusedSubscription>),
}

/// A subscription the broker refused.
///
/// ```
/// let refused = tower_mqtt::runtime::RefusedSubscription::new("secret/#", "not authorized");
/// assert_eq!(refused.to_string(), "secret/#: not authorized");
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RefusedSubscription {
    /// The topic filter.
    pub filter: String,
    /// Why, as the broker said it.
    pub reason: String,
}

impl RefusedSubscription {
    /// A refusal of `filter` for `reason`.
    pub fn new(filter: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            filter: filter.into(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for RefusedSubscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.filter, self.reason)
    }
}

/// Why [`Running::ready`] failed.
///
/// ```
/// use tower_mqtt::runtime::{ReadyError, RefusedSubscription};
///
/// let error = ReadyError::Refused(vec![RefusedSubscription::new("secret/#", "not authorized")]);
/// assert_eq!(error.to_string(), "the broker refused subscriptions: secret/#: not authorized");
/// ```
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReadyError {
    /// The broker refused subscriptions; the others are in place, and the
    /// client subscribes again on every reconnect.
    #[error("the broker refused subscriptions: {}", list(.0))]
    Refused(Vec<RefusedSubscription>),
    /// The client shut down before its subscriptions were in place.
    #[error("the client shut down before its subscriptions were in place")]
    Closed,
}

fn list(refused: &[RefusedSubscription]) -> String {
    refused
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
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
    /// Handled ([`Outcome::Handled`](crate::Outcome::Handled)).
    pub handled: u64,
    /// Failed ([`Outcome::Failed`](crate::Outcome::Failed) or an error of the service).
    pub failed: u64,
    /// Recognised as duplicates by the dedup layer.
    pub duplicates: u64,
    /// Delivered again by the broker while still held from an earlier
    /// connection (queued, running, or handled but not yet acknowledged): the
    /// redelivery joined the held copy and did not run a second time.
    pub redelivered: u64,
    /// Messages held from earlier connections that the broker has not
    /// delivered again yet.
    pub carried: u64,
    /// Matched no route and no fallback.
    pub unrouted: u64,
    /// Dropped by [`Overflow::DropOldest`](crate::Overflow::DropOldest).
    pub dropped_oldest: u64,
    /// Dropped by [`Overflow::DropNew`](crate::Overflow::DropNew), or by
    /// [`Overflow::Block`](crate::Overflow::Block) after waiting too long.
    pub dropped_new: u64,
    /// Messages that could not be decoded into an envelope, by reason
    /// (each also counted in `failed`).
    pub decode_failures: DecodeFailures,
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
    /// Connection attempts the broker refused in its CONNACK (bad
    /// credentials, not authorized, ...); each also counts in
    /// `connection_failures`.
    pub connection_refusals: u64,
    /// Subscriptions the broker refused in a SUBACK.
    pub subscriptions_refused: u64,
    /// Publishes the broker refused (MQTT 5: a PUBACK or PUBREC reason code
    /// of 0x80 or above); each failed its future with the reason.
    pub publishes_refused: u64,
    /// Publish attempts handed to the connection (a retried publish counts
    /// once per attempt).
    pub publishes_sent: u64,
    /// Publishes the broker confirmed (PUBACK, PUBCOMP; QoS 0 once written).
    pub publishes_confirmed: u64,
    /// Publishes dropped after their last attempt or over the retry budget
    /// (each logged at ERROR).
    pub publishes_dropped: u64,
}

/// Messages that could not be decoded, by the reason the decode layer gives
/// (`DecodeError::reason`).
///
/// ```
/// let failures = tower_mqtt::runtime::DecodeFailures::default();
/// assert_eq!(failures.total(), 0);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DecodeFailures {
    /// An empty payload.
    pub empty: u64,
    /// Not UTF-8.
    pub not_utf8: u64,
    /// Not JSON.
    pub not_json: u64,
    /// JSON, but not an object.
    pub not_an_object: u64,
    /// An object of envelope keys that is not a valid envelope.
    pub invalid_envelope: u64,
}

impl DecodeFailures {
    /// All of them.
    pub fn total(&self) -> u64 {
        self.empty + self.not_utf8 + self.not_json + self.not_an_object + self.invalid_envelope
    }
}

/// The runtime's own counters, beside the dispatcher's.
#[derive(Debug, Default)]
pub(super) struct RuntimeCounters {
    connections: AtomicU64,
    connection_failures: AtomicU64,
    connection_refusals: AtomicU64,
    subscriptions_refused: AtomicU64,
    publishes_refused: AtomicU64,
    read_pauses: AtomicU64,
    recoveries: AtomicU64,
    metrics: ConnectionMetrics,
}

/// The connection's metric handles ([`crate::metrics`]), registered when the
/// client starts serving.
#[derive(Debug)]
struct ConnectionMetrics {
    connected: metrics::Gauge,
    connections: metrics::Counter,
    lost: metrics::Counter,
    refused: metrics::Counter,
    recoveries: metrics::Counter,
    subscriptions_refused: metrics::Counter,
    publishes_refused: metrics::Counter,
}

impl Default for ConnectionMetrics {
    fn default() -> Self {
        use crate::metrics as names;
        let failures = |reason: &'static str| metrics::counter!(names::CONNECTION_FAILURES, names::SYSTEM => "mqtt", names::REASON => reason);
        Self {
            connected: metrics::gauge!(names::CONNECTED, names::SYSTEM => "mqtt"),
            connections: metrics::counter!(names::CONNECTIONS, names::SYSTEM => "mqtt"),
            lost: failures("lost"),
            refused: failures("refused"),
            recoveries: metrics::counter!(names::RECOVERIES, names::SYSTEM => "mqtt"),
            subscriptions_refused: metrics::counter!(
                names::SUBSCRIPTIONS_REFUSED,
                names::SYSTEM => "mqtt"
            ),
            publishes_refused: metrics::counter!(
                names::PUBLISHES_REFUSED,
                names::SYSTEM => "mqtt"
            ),
        }
    }
}

/// What the connection counts, each once in `Stats` and once in the metrics.
impl RuntimeCounters {
    pub(super) fn connected(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
        self.metrics.connections.increment(1);
        self.metrics.connected.set(1.0);
    }

    /// A connection (or an attempt) failed; `refused` by the broker's CONNACK.
    pub(super) fn failed(&self, refused: bool) {
        self.connection_failures.fetch_add(1, Ordering::Relaxed);
        self.metrics.connected.set(0.0);
        if refused {
            self.connection_refusals.fetch_add(1, Ordering::Relaxed);
            self.metrics.refused.increment(1);
        } else {
            self.metrics.lost.increment(1);
        }
    }

    pub(super) fn recovered(&self) {
        self.recoveries.fetch_add(1, Ordering::Relaxed);
        self.metrics.recoveries.increment(1);
        self.metrics.connected.set(0.0);
    }

    pub(super) fn subscriptions_refused(&self, count: u64) {
        self.subscriptions_refused
            .fetch_add(count, Ordering::Relaxed);
        self.metrics.subscriptions_refused.increment(count);
    }

    pub(super) fn publish_refused(&self) {
        self.publishes_refused.fetch_add(1, Ordering::Relaxed);
        self.metrics.publishes_refused.increment(1);
    }

    pub(super) fn paused(&self) {
        self.read_pauses.fetch_add(1, Ordering::Relaxed);
    }

    /// Shut down: no longer connected.
    pub(super) fn closed(&self) {
        self.metrics.connected.set(0.0);
    }
}

impl Stats {
    fn read(view: &StatsView) -> Self {
        let (counters, runtime) = (&*view.counters, &*view.runtime);
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Self {
            publishes_sent: get(&view.publishes.sent),
            publishes_confirmed: get(&view.publishes.confirmed),
            publishes_dropped: view.outbound.dropped(),
            received: get(&counters.received),
            handled: get(&counters.handled),
            failed: get(&counters.failed),
            duplicates: get(&counters.duplicates),
            redelivered: get(&counters.redelivered),
            carried: get(&counters.carried),
            unrouted: get(&counters.unrouted),
            dropped_oldest: get(&counters.dropped_oldest),
            dropped_new: get(&counters.dropped_new),
            dropped_over_limit: get(&counters.dropped_over_limit),
            decode_failures: DecodeFailures {
                empty: get(&counters.decode_failures.empty),
                not_utf8: get(&counters.decode_failures.not_utf8),
                not_json: get(&counters.decode_failures.not_json),
                not_an_object: get(&counters.decode_failures.not_an_object),
                invalid_envelope: get(&counters.decode_failures.invalid_envelope),
            },
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
            connection_refusals: get(&runtime.connection_refusals),
            subscriptions_refused: get(&runtime.subscriptions_refused),
            publishes_refused: get(&runtime.publishes_refused),
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

/// Asks a running [`Client`](super::Client) to shut down; cheap to clone.
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
    pub(super) fn new(tx: watch::Sender<bool>) -> Self {
        Self { tx: Arc::new(tx) }
    }

    pub(super) fn subscribe(&self) -> watch::Receiver<bool> {
        self.tx.subscribe()
    }

    /// Starts the shutdown; idempotent.
    pub fn shutdown(&self) {
        self.tx.send_replace(true);
    }

    /// Whether shutdown was asked for.
    pub fn is_shutdown(&self) -> bool {
        *self.tx.borrow()
    }
}

#[derive(Clone)]
pub(super) struct StatsView {
    pub(super) counters: Arc<Counters>,
    pub(super) runtime: Arc<RuntimeCounters>,
    pub(super) publishes: Arc<PublishCounts>,
    /// Its dropped count is the runtime's; behind an `Arc` to keep
    /// [`Running`] small.
    pub(super) outbound: Arc<crate::layers::OutboundStack>,
}

/// A client serving in the background: ready, state, stats, publisher and
/// shutdown. Made by [`Serve::spawn`](super::Serve::spawn).
///
/// ```no_run
/// # async fn run(config: tower_mqtt::config::Config, router: tower_mqtt::Router) -> Result<(), tower_mqtt::BoxError> {
/// let running = tower_mqtt::serve(config, router).spawn()?;
/// running.ready().await?; // subscribed
/// println!("{:?}", running.stats());
/// let report = running.shutdown().await;
/// assert!(report.disconnected_cleanly);
/// # Ok(()) }
/// ```
pub struct Running {
    task: JoinHandle<ShutdownReport>,
    ready: watch::Receiver<Readiness>,
    handle: ShutdownHandle,
    state: watch::Receiver<ConnectionState>,
    publisher: Publisher,
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
    pub(super) fn new(
        task: JoinHandle<ShutdownReport>,
        ready: watch::Receiver<Readiness>,
        handle: ShutdownHandle,
        state: watch::Receiver<ConnectionState>,
        publisher: Publisher,
        view: StatsView,
    ) -> Self {
        Self {
            task,
            ready,
            handle,
            state,
            publisher,
            stats: view,
        }
    }

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
                report.stats = Stats::read(&self.stats);
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

    /// Waits until the client is connected and the broker has answered its
    /// subscriptions: from then on, messages on the router's topics reach
    /// the handlers. Fails when the broker refused any of them (they are
    /// logged at ERROR, counted in [`Stats::subscriptions_refused`] and
    /// reported in the health), or when the client shut down first.
    ///
    /// ```no_run
    /// # async fn run(config: tower_mqtt::config::Config, router: tower_mqtt::Router) -> Result<(), tower_mqtt::BoxError> {
    /// let running = tower_mqtt::serve(config, router).spawn()?;
    /// if let Err(refused) = running.ready().await {
    ///     eprintln!("not serving everything: {refused}");
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn ready(&self) -> Result<(), ReadyError> {
        let mut ready = self.ready.clone();
        let outcome = ready
            .wait_for(|ready| *ready != Readiness::Pending)
            .await
            .map(|ready| ready.clone());
        match outcome {
            Ok(Readiness::Refused(refused)) => Err(ReadyError::Refused(refused)),
            Ok(_) => Ok(()),
            Err(_) => Err(ReadyError::Closed),
        }
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

    /// The counters so far.
    pub fn stats(&self) -> Stats {
        Stats::read(&self.stats)
    }
}

pub(super) async fn wait_shutdown(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM: the usual signal for
/// [`Serve::with_graceful_shutdown`](super::Serve::with_graceful_shutdown).
///
/// ```no_run
/// # async fn run(config: tower_mqtt::config::Config, router: tower_mqtt::Router) -> Result<(), tower_mqtt::BoxError> {
/// tower_mqtt::serve(config, router)
///     .with_graceful_shutdown(tower_mqtt::shutdown_signal())
///     .await?;
/// # Ok(()) }
/// ```
pub async fn shutdown_signal() {
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
