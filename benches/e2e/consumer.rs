//! The consumers under test, all subscribed to `bench/#` and recording
//! every message in the same [`Recorder`]:
//!
//! - [`Consumer::Raw`]: the leanest correct rumqttc loop: manual acks, each
//!   payload decoded with `serde_json` into a strict five-key envelope, then
//!   acknowledged, in the order received. Over MQTT 5 the same loop on
//!   `rumqttc::v5`, announcing the Receive Maximum tower-mqtt announces;
//! - [`Consumer::Decode`]: a tower-mqtt [`Client`] whose inbound stack only
//!   decodes (`DecodeLayer`), one route on `bench/#`, over the case's MQTT
//!   version (`Config::with_protocol`);
//! - [`Consumer::Standard`]: the same on `Config::inbound_stack` (decode,
//!   dedup, span, isolation, retry, timeout);
//! - [`Consumer::Metered`]: the standard stack with a Prometheus recorder
//!   installed (steady scenarios only).
//!
//! Health and heartbeat are off, so every consumer handles the load and
//! nothing else.

use std::{
    collections::VecDeque,
    hint::black_box,
    sync::{Arc, Mutex},
    time::Duration,
};

use rumqttc::{v5, AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, Publish};
use serde::{Deserialize, Serialize};
use tokio::{sync::watch, task::JoinHandle, time::timeout};
use tower_mqtt::layers::{decode::DecodeLayer, EventRegistry};
use tower_mqtt::{
    config::{Config, Protocol},
    Envelope, Request, Router, Running, Subscription,
};

use crate::{
    broker::HOST,
    child::{
        deadline, emit, failed, report_from, say, sent_from_stdin, wait_done, ChildReport,
        ChildSpec, Mode, CONNECT_LIMIT, DRAIN_IDLE, LIVE_IDLE, READY, STOP_LIMIT,
    },
    load::{now_epoch, Recorder, WireEnvelope, FILTER},
    measure::cpu_seconds,
};

/// Which consumer runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Consumer {
    /// rumqttc with manual acks and a `serde_json` decode.
    Raw,
    /// tower-mqtt with only the decode layer.
    Decode,
    /// tower-mqtt on the standard stack.
    Standard,
    /// The standard stack with `metrics-exporter-prometheus` installed as the
    /// metrics recorder and rendered every second, as a scraped service runs.
    Metered,
}

impl Consumer {
    /// Every consumer, raw first: the order each scenario runs them in.
    pub(crate) const ALL: [Self; 3] = [Self::Raw, Self::Decode, Self::Standard];

    /// The name in the table.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Raw => "raw rumqttc + serde",
            Self::Decode => "tower-mqtt decode only",
            Self::Standard => "tower-mqtt InboundStack",
            Self::Metered => "InboundStack + Prometheus",
        }
    }
}

/// Runs `consumer` in `mode`; returns the report unless it printed it already.
pub(crate) async fn run(spec: &ChildSpec, consumer: Consumer, mode: Mode) -> Option<ChildReport> {
    let recorder = Arc::new(Mutex::new(Recorder::new(spec.messages, spec.latency)));
    match mode {
        Mode::Prime => {
            let handle = match Handle::start(consumer, spec, false, &recorder) {
                Ok(handle) => handle,
                Err(err) => return Some(failed(err)),
            };
            let subscribed = timeout(CONNECT_LIMIT, handle.ready()).await.is_ok();
            handle.stop().await;
            Some(if subscribed {
                ChildReport::default()
            } else {
                failed("not subscribed in time")
            })
        }
        Mode::Live => {
            let sent = sent_from_stdin();
            let handle = match Handle::start(consumer, spec, true, &recorder) {
                Ok(handle) => handle,
                Err(err) => return Some(failed(err)),
            };
            if timeout(CONNECT_LIMIT, handle.ready()).await.is_err() {
                return Some(failed("not subscribed in time"));
            }
            let (cpu_start, start_epoch) = (cpu_seconds(), now_epoch());
            say(READY);
            let lossy = spec.qos == 0;
            let status = wait_done(&recorder, sent, LIVE_IDLE, lossy, deadline(spec)).await;
            let cpu = cpu_seconds() - cpu_start;
            emit(&report_from(status, &recorder, start_epoch, cpu));
            let _ = timeout(STOP_LIMIT, handle.stop()).await;
            None
        }
        Mode::Drain => {
            let (cpu_start, start_epoch) = (cpu_seconds(), now_epoch());
            let handle = match Handle::start(consumer, spec, false, &recorder) {
                Ok(handle) => handle,
                Err(err) => return Some(failed(err)),
            };
            let (_total_tx, total) = watch::channel(Some(spec.messages));
            let status = wait_done(&recorder, total, DRAIN_IDLE, false, deadline(spec)).await;
            let cpu = cpu_seconds() - cpu_start;
            emit(&report_from(status, &recorder, start_epoch, cpu));
            let _ = timeout(STOP_LIMIT, handle.stop()).await;
            None
        }
    }
}

/// Installs the Prometheus recorder once per process, with a thread that
/// renders the exposition every second as a scrape would (rendering also
/// folds the histograms' samples, which would otherwise pile up).
fn install_prometheus() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
            .install_recorder()
            .expect("the only recorder of this process");
        std::thread::spawn(move || loop {
            std::thread::sleep(std::time::Duration::from_secs(1));
            std::hint::black_box(handle.render());
        });
    });
}

/// A started consumer.
enum Handle {
    /// The rumqttc loop on its own task.
    Raw {
        client: RawClient,
        task: JoinHandle<()>,
        ready: watch::Receiver<bool>,
    },
    /// A tower-mqtt client serving in the background.
    Tower(Running),
}

/// The raw loop's client, for the DISCONNECT that ends it.
enum RawClient {
    V311(AsyncClient),
    V5(v5::AsyncClient),
}

impl Handle {
    /// Starts `consumer` as `spec.client_id`, asking for a clean session or
    /// not; every message goes to `recorder`.
    fn start(
        consumer: Consumer,
        spec: &ChildSpec,
        clean_session: bool,
        recorder: &Arc<Mutex<Recorder>>,
    ) -> Result<Self, String> {
        let config = Config::new(&format!("mqtt://{HOST}:{}", spec.port))
            .map_err(|err| err.to_string())?
            .with_protocol(spec.protocol);
        if consumer == Consumer::Raw {
            let (ready_tx, ready) = watch::channel(false);
            let recorder = recorder.clone();
            let (client, task) = if spec.protocol == Protocol::V5 {
                // What tower-mqtt announces, so that the broker sends both
                // sides as much at once.
                let receive_maximum = u16::try_from(config.max_pending).unwrap_or(u16::MAX);
                let options = raw_v5_options(spec, clean_session, receive_maximum);
                let (client, eventloop) = v5::AsyncClient::new(options, 1024);
                let qos = if spec.qos == 0 {
                    v5::mqttbytes::QoS::AtMostOnce
                } else {
                    v5::mqttbytes::QoS::AtLeastOnce
                };
                let task = raw_v5_loop(client.clone(), eventloop, qos, recorder, ready_tx);
                (RawClient::V5(client), tokio::spawn(task))
            } else {
                let (client, eventloop) = AsyncClient::new(raw_options(spec, clean_session), 1024);
                let qos = if spec.qos == 0 {
                    rumqttc::QoS::AtMostOnce
                } else {
                    rumqttc::QoS::AtLeastOnce
                };
                let task = raw_loop(client.clone(), eventloop, qos, recorder, ready_tx);
                (RawClient::V311(client), tokio::spawn(task))
            };
            return Ok(Self::Raw {
                client,
                task,
                ready,
            });
        }
        let mut config = config
            .with_client_id(spec.client_id.clone())
            .with_health(false)
            .with_heartbeat(false)
            .with_clean_session(clean_session);
        if let Some(entries) = spec.dedupe_entries {
            // Long enough that no entry expires during the case.
            config = config.with_dedupe(Duration::from_secs(3600), entries);
        }
        let qos = if spec.qos == 0 {
            tower_mqtt::QoS::AtMostOnce
        } else {
            tower_mqtt::QoS::AtLeastOnce
        };
        let rec = recorder.clone();
        let router = Router::new().route(
            Subscription::new(FILTER).qos(qos),
            move |req: Request<Envelope>| {
                let rec = rec.clone();
                async move {
                    let env = req.body();
                    let seq = env.seq().and_then(|seq| u64::try_from(seq).ok());
                    rec.lock().expect("recorder poisoned").record(seq, env.ts());
                }
            },
        );
        if consumer == Consumer::Metered {
            install_prometheus();
        }
        let serve = tower_mqtt::serve(config.clone(), router);
        let serve = match consumer {
            Consumer::Decode => serve.inbound_stack(DecodeLayer::new(EventRegistry::fleet())),
            Consumer::Raw | Consumer::Standard | Consumer::Metered => serve,
        };
        Ok(Self::Tower(serve.spawn().map_err(|err| err.to_string())?))
    }

    /// Waits until the consumer is connected and subscribed.
    async fn ready(&self) {
        match self {
            Self::Raw { ready, .. } => {
                let _ = ready.clone().wait_for(|ready| *ready).await;
            }
            Self::Tower(running) => running.ready().await.expect("subscribed"),
        }
    }

    /// Disconnects cleanly (the broker keeps a persistent session).
    async fn stop(self) {
        match self {
            Self::Raw { client, task, .. } => {
                match client {
                    RawClient::V311(client) => drop(client.try_disconnect()),
                    RawClient::V5(client) => drop(client.try_disconnect()),
                }
                let _ = timeout(STOP_LIMIT, task).await;
            }
            Self::Tower(running) => {
                let _ = timeout(STOP_LIMIT, running.shutdown()).await;
            }
        }
    }
}

/// The raw consumer's options: manual acks and a 1 MiB packet limit, rumqttc's
/// defaults otherwise.
fn raw_options(spec: &ChildSpec, clean_session: bool) -> MqttOptions {
    let mut options = MqttOptions::new(spec.client_id.clone(), HOST, spec.port);
    options
        .set_manual_acks(true)
        .set_clean_session(clean_session)
        .set_max_packet_size(1 << 20, 1 << 20)
        .set_keep_alive(Duration::from_secs(60));
    options
}

/// The raw consumer's MQTT 5 options: those of the 3.1.1 one, and what
/// tower-mqtt's MQTT 5 CONNECT also says.
///
/// mosquitto keeps as many QoS 1 messages unacknowledged to a client as its
/// Receive Maximum (20, as to every 3.1.1 client, when it announces none),
/// and an MQTT 5 session without an expiry ends with its connection.
fn raw_v5_options(spec: &ChildSpec, clean_start: bool, receive_maximum: u16) -> v5::MqttOptions {
    let mut options = v5::MqttOptions::new(spec.client_id.clone(), HOST, spec.port);
    options
        .set_manual_acks(true)
        .set_clean_start(clean_start)
        .set_session_expiry_interval(Some(if clean_start { 0 } else { u32::MAX }))
        .set_receive_maximum(Some(receive_maximum))
        .set_max_packet_size(Some(1 << 20))
        // rumqttc's 3.1.1 window; the MQTT 5 default allocates a table of
        // 65,535 in-flight publishes.
        .set_outgoing_inflight_upper_limit(100)
        .set_keep_alive(Duration::from_secs(60));
    options
}

/// The raw consumer: poll, decode, record, acknowledge in order.
///
/// Acks go out with `try_ack`, never an awaited `ack`: awaiting the request
/// channel from the task that polls the event loop can deadlock. An ack that
/// does not fit waits in `unacked`, and later ones queue behind it, so PUBACKs
/// keep the order of the PUBLISH packets.
async fn raw_loop(
    client: AsyncClient,
    mut eventloop: EventLoop,
    qos: rumqttc::QoS,
    recorder: Arc<Mutex<Recorder>>,
    ready: watch::Sender<bool>,
) {
    let mut unacked: VecDeque<Publish> = VecDeque::new();
    loop {
        while let Some(publish) = unacked.front() {
            if client.try_ack(publish).is_err() {
                break;
            }
            unacked.pop_front();
        }
        let event = match eventloop.poll().await {
            Ok(event) => event,
            Err(err) => return stop_with(&recorder, format!("connection: {err}")),
        };
        match event {
            Event::Incoming(Packet::ConnAck(ack)) => {
                if ack.session_present {
                    ready.send_replace(true);
                } else if let Err(err) = client.try_subscribe(FILTER, qos) {
                    return stop_with(&recorder, format!("subscribe: {err}"));
                }
            }
            Event::Incoming(Packet::SubAck(_)) => {
                ready.send_replace(true);
            }
            Event::Incoming(Packet::Publish(publish)) => {
                handle_payload(&publish.payload, &recorder);
                if !unacked.is_empty() || client.try_ack(&publish).is_err() {
                    unacked.push_back(publish);
                }
            }
            Event::Outgoing(Outgoing::Disconnect) => return,
            _ => {}
        }
    }
}

/// [`raw_loop`] on rumqttc's MQTT 5 client: the same steps, on its types.
async fn raw_v5_loop(
    client: v5::AsyncClient,
    mut eventloop: v5::EventLoop,
    qos: v5::mqttbytes::QoS,
    recorder: Arc<Mutex<Recorder>>,
    ready: watch::Sender<bool>,
) {
    use v5::{mqttbytes::v5::Packet, Event};

    let mut unacked: VecDeque<v5::mqttbytes::v5::Publish> = VecDeque::new();
    loop {
        while let Some(publish) = unacked.front() {
            if client.try_ack(publish).is_err() {
                break;
            }
            unacked.pop_front();
        }
        let event = match eventloop.poll().await {
            Ok(event) => event,
            Err(err) => return stop_with(&recorder, format!("connection: {err}")),
        };
        match event {
            Event::Incoming(Packet::ConnAck(ack)) => {
                if ack.session_present {
                    ready.send_replace(true);
                } else if let Err(err) = client.try_subscribe(FILTER, qos) {
                    return stop_with(&recorder, format!("subscribe: {err}"));
                }
            }
            Event::Incoming(Packet::SubAck(_)) => {
                ready.send_replace(true);
            }
            Event::Incoming(Packet::Publish(publish)) => {
                handle_payload(&publish.payload, &recorder);
                if !unacked.is_empty() || client.try_ack(&publish).is_err() {
                    unacked.push_back(publish);
                }
            }
            Event::Outgoing(Outgoing::Disconnect) => return,
            _ => {}
        }
    }
}

/// The raw loops' handling: decode the envelope strictly, touch its fields,
/// record it.
fn handle_payload(payload: &[u8], recorder: &Mutex<Recorder>) {
    if let Ok(env) = serde_json::from_slice::<WireEnvelope>(payload) {
        black_box((&env.id, &env.event_type, &env.source));
        let seq = env.seq();
        recorder
            .lock()
            .expect("recorder poisoned")
            .record(seq, env.ts);
    }
}

/// Ends a raw loop: the first error is the case's.
fn stop_with(recorder: &Mutex<Recorder>, err: String) {
    let mut rec = recorder.lock().expect("recorder poisoned");
    rec.error.get_or_insert(err);
}
