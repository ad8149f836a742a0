//! The supervisor: starts every task a serving client runs (the poll loop,
//! the acknowledgement writer, the dispatcher, the outbox drain, the
//! heartbeat) and, at shutdown, stops them in the order that loses nothing:
//! drain the handlers, publish the final health, let the acknowledgements
//! out, then DISCONNECT.

use std::{
    sync::{atomic::Ordering, Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use tokio::{
    sync::{mpsc, watch, Notify},
    time::Instant,
};
use tower::Service;
use tracing::{info, Instrument};

use super::{
    ack_writer::{self, AckGate},
    client::Client,
    dispatch::{AckPacket, Counters, Dispatcher, Limits, QueueDefaults},
    heartbeat::Heartbeat,
    poll::{OnConnect, PollLoop, GOODBYE_TIMEOUT},
    running::{
        wait_shutdown, ConnectionState, Readiness, Running, RuntimeCounters, ShutdownReport, Stats,
        StatsView,
    },
    wire,
};
use crate::{
    health::{self, Health},
    outcome::{BoxError, Outcome},
    request::{QoS, Request},
    router::Router,
};

/// How a client serves, besides its router and stack.
pub(super) struct Settings {
    pub(super) max_in_flight: usize,
    pub(super) drain_timeout: Duration,
    /// Run after every connect and subscribe.
    pub(super) on_connect: Vec<OnConnect>,
    /// Run once, after the first connect and subscribe.
    pub(super) on_start: Vec<OnConnect>,
}

/// What a run needs besides the client.
struct Run<S> {
    ready: Arc<watch::Sender<Readiness>>,
    router: Router,
    service: S,
    counters: Arc<Counters>,
    runtime_counters: Arc<RuntimeCounters>,
    settings: Settings,
}

/// Starts serving `router` through `service` (the router in its inbound
/// stack) on `client`, and returns the handle at once.
pub(super) fn start<S>(client: Client, router: Router, service: S, settings: Settings) -> Running
where
    S: Service<Request<Bytes>, Response = Outcome> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    let handle = client.shutdown_handle();
    let state = client.state.subscribe();
    let runtime_counters = Arc::new(RuntimeCounters::default());
    let counters = Arc::new(Counters::default());
    let publisher = client.publisher();
    let view = StatsView {
        counters: counters.clone(),
        runtime: runtime_counters.clone(),
        publishes: client.sink.counts(),
        outbound: Arc::new(client.outbound.clone()),
    };
    let ready = Arc::new(watch::channel(Readiness::Pending).0);
    let ready_rx = ready.subscribe();
    // Every line the connection's tasks log carries the client id and the
    // broker (never its credentials).
    let span = tracing::info_span!(
        "mqtt.client",
        client_id = %client.config.client_id,
        broker = %client.config.broker
    );
    let task = tokio::spawn(
        run(
            client,
            Run {
                ready,
                router,
                service,
                counters,
                runtime_counters,
                settings,
            },
        )
        .instrument(span),
    );
    Running::new(task, ready_rx, handle, state, publisher, view)
}

#[allow(clippy::too_many_lines)] // one place that shows the whole lifecycle
async fn run<S>(client: Client, run: Run<S>) -> ShutdownReport
where
    S: Service<Request<Bytes>, Response = Outcome> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    let Client {
        config,
        mqtt: client,
        connection,
        deliveries,
        outbox,
        sink,
        publisher,
        state,
        shutdown,
        outbound: _,
    } = client;
    let Run {
        ready,
        router,
        service,
        counters,
        runtime_counters,
        settings,
    } = run;
    let Settings {
        max_in_flight,
        drain_timeout,
        on_connect,
        on_start,
    } = settings;
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
        filters.push(wire::Filter::new(hb.topic.clone(), QoS::AtMostOnce));
    }

    let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poll = PollLoop {
        ready: ready.clone(),
        connection,
        client: client.clone(),
        config: config.clone(),
        filters,
        dispatcher: dispatcher.clone(),
        ack_gate,
        deliveries: deliveries.clone(),
        outbox: outbox.clone(),
        publisher: publisher.clone(),
        on_connect,
        on_start,
        started: false,
        state: state.clone(),
        counters: runtime_counters.clone(),
        reading_paused,
        publishes_read,
        heartbeat: heartbeat.clone(),
        stopping: stopping.clone(),
    };
    let poll_task = tokio::spawn(poll.run().in_current_span());
    let drain_task = tokio::spawn(outbox.clone().drain().in_current_span());
    let heartbeat_task =
        heartbeat.map(|hb| tokio::spawn(hb.run(sink, state.subscribe()).in_current_span()));

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
    let disconnected_cleanly = match tokio::time::timeout(2 * GOODBYE_TIMEOUT, &mut poll_task).await
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
    runtime_counters.closed();

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
