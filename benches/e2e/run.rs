//! The parent: settings, scenarios, and one case at a time against the
//! harness's broker.
//!
//! A case is one scenario with one consumer (or publisher), in its own child
//! process. A scenario is a workload over one MQTT version: the consumer
//! workloads run once per version in `E2E_PROTOCOLS`, each against the raw
//! rumqttc consumer of the same version. Each scenario runs its cases
//! interleaved, raw first (raw, decode, standard, raw, decode, standard, ...),
//! so that drift in the machine's load hits every side alike. A case that does not end `ok`, or whose run takes
//! more than a third of the case timeout, is not run again: its first run is
//! its figure, and the whole harness stays within its time budget.

use std::{
    env,
    time::{Duration, Instant},
};

use serde::{Serialize, Serializer};
use tower_mqtt::config::Protocol;

use crate::{
    broker::Broker,
    child::{ChildReport, ChildSpec, Mode, Role, Status, READY},
    consumer::Consumer,
    feed::{discard_session, Feeder},
    load::TOPIC,
    measure::to_f64,
    process::ChildProcess,
    publisher::PublisherKind,
};

/// How long a consumer may take to connect and subscribe.
const READY_LIMIT: Duration = Duration::from_secs(30);
/// How much longer than its own deadline the parent waits for a child's report
/// (it reports at its deadline; this covers a child that is stuck).
const GRACE: Duration = Duration::from_secs(20);

/// What to run, from the environment; see the crate docs.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Settings {
    /// A smoke run (`E2E_QUICK=1`, or run without `--bench`).
    pub(crate) quick: bool,
    /// Messages per steady and publish case (`E2E_MESSAGES`).
    pub(crate) messages: u64,
    /// Runs of each case (`E2E_RUNS`).
    pub(crate) runs: usize,
    /// Backlog sizes (`E2E_BACKLOG_SIZES`, comma-separated).
    pub(crate) backlog_sizes: Vec<u64>,
    /// Messages of the memory case, each remembered by dedup
    /// (`E2E_MEMORY_ENTRIES`).
    pub(crate) memory_entries: u64,
    /// Publisher rate of the latency cases, msg/s (`E2E_LATENCY_RATE`).
    pub(crate) latency_rate: f64,
    /// Messages per latency case: the rate times `E2E_LATENCY_SECS`.
    pub(crate) latency_messages: u64,
    /// Seconds a case may take (`E2E_CASE_TIMEOUT`).
    pub(crate) case_timeout_s: f64,
    /// Scenario families to run (`E2E_SCENARIOS`: steady, latency, publish,
    /// memory, backlog); all when unset.
    pub(crate) scenarios: Vec<String>,
    /// MQTT versions the consumers speak (`E2E_PROTOCOLS`: `3.1.1`, `5`);
    /// both when unset.
    #[serde(serialize_with = "protocol_names")]
    pub(crate) protocols: Vec<Protocol>,
}

fn protocol_names<S: Serializer>(protocols: &[Protocol], out: S) -> Result<S::Ok, S::Error> {
    out.collect_seq(protocols.iter().map(ToString::to_string))
}

impl Settings {
    /// Reads the settings; `bench` says whether `cargo bench` started us
    /// (it passes `--bench`; `cargo test --benches` does not, and gets a
    /// smoke run).
    pub(crate) fn from_env(bench: bool) -> Self {
        let quick = !bench || env::var("E2E_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
        let number = |name: &str, default: f64| {
            env::var(name)
                .ok()
                .and_then(|v| v.trim().replace('_', "").parse::<f64>().ok())
                .filter(|v| v.is_finite() && *v > 0.0)
                .unwrap_or(default)
        };
        let count = |name: &str, default: u64| {
            env::var(name)
                .ok()
                .and_then(|v| v.trim().replace('_', "").parse::<u64>().ok())
                .filter(|v| *v > 0)
                .unwrap_or(default)
        };
        let latency_rate = number("E2E_LATENCY_RATE", 10_000.0);
        let latency_secs = number("E2E_LATENCY_SECS", if quick { 0.2 } else { 2.0 });
        let backlog_sizes = env::var("E2E_BACKLOG_SIZES")
            .ok()
            .map(|list| {
                list.split(',')
                    .filter_map(|n| n.trim().replace('_', "").parse().ok())
                    .filter(|n| *n > 0)
                    .collect::<Vec<u64>>()
            })
            .filter(|sizes| !sizes.is_empty())
            .unwrap_or_else(|| {
                if quick {
                    vec![2_000]
                } else {
                    vec![5_000, 50_000, 200_000]
                }
            });
        let scenarios = env::var("E2E_SCENARIOS")
            .ok()
            .map(|list| {
                list.split(',')
                    .map(|s| s.trim().to_ascii_lowercase())
                    .filter(|s| !s.is_empty())
                    .collect::<Vec<_>>()
            })
            .filter(|list| !list.is_empty())
            .unwrap_or_else(|| {
                ["steady", "latency", "publish", "memory", "backlog"]
                    .map(str::to_owned)
                    .to_vec()
            });
        // A version that does not parse stops the run: silently dropping it
        // would leave its rows out of the table.
        let protocols = env::var("E2E_PROTOCOLS")
            .ok()
            .map(|list| {
                list.split(',')
                    .map(str::trim)
                    .filter(|v| !v.is_empty())
                    .map(str::parse::<Protocol>)
                    .collect::<Result<Vec<_>, _>>()
                    .unwrap_or_else(|err| {
                        eprintln!("e2e: E2E_PROTOCOLS: {err}");
                        std::process::exit(2);
                    })
            })
            .filter(|list| !list.is_empty())
            .unwrap_or_else(|| vec![Protocol::V311, Protocol::V5]);
        Self {
            quick,
            messages: count("E2E_MESSAGES", if quick { 1_000 } else { 10_000 }),
            runs: usize::try_from(count("E2E_RUNS", if quick { 1 } else { 3 })).unwrap_or(1),
            backlog_sizes,
            memory_entries: count("E2E_MEMORY_ENTRIES", if quick { 5_000 } else { 100_000 }),
            latency_rate,
            latency_messages: crate::measure::to_index((latency_rate * latency_secs).round()).max(1)
                as u64,
            case_timeout_s: number("E2E_CASE_TIMEOUT", 120.0),
            scenarios,
            protocols,
        }
    }

    fn case_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.case_timeout_s)
    }

    /// The scenarios to run, in order: the short ones first, each workload
    /// over every version in turn. Publishing runs over MQTT 3.1.1 only: its
    /// raw side is the 3.1.1 publisher every consumer gets.
    pub(crate) fn scenario_list(&self) -> Vec<Scenario> {
        let mut workloads = Vec::new();
        let wants = |family: &str| self.scenarios.iter().any(|s| s == family);
        if wants("steady") {
            workloads.extend([Workload::Steady(1), Workload::Steady(0)]);
        }
        if wants("latency") {
            workloads.extend([Workload::Latency(1), Workload::Latency(0)]);
        }
        if wants("publish") {
            workloads.push(Workload::Publish);
        }
        if wants("memory") {
            workloads.push(Workload::Memory(self.memory_entries));
        }
        if wants("backlog") {
            workloads.extend(self.backlog_sizes.iter().map(|&n| Workload::Backlog(n)));
        }
        let mut list = Vec::new();
        for workload in workloads {
            for &protocol in &self.protocols {
                if workload == Workload::Publish && protocol != Protocol::V311 {
                    continue;
                }
                list.push(Scenario { workload, protocol });
            }
        }
        list
    }
}

/// A workload over one MQTT version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Scenario {
    /// What is measured.
    pub(crate) workload: Workload,
    /// The MQTT version of the consumer (or publisher) under test.
    pub(crate) protocol: Protocol,
}

impl Scenario {
    /// The name in the table: the workload's, with ` v5` for MQTT 5.
    pub(crate) fn name(self) -> String {
        match self.protocol {
            Protocol::V311 => self.workload.name(),
            protocol => format!("{} v{protocol}", self.workload.name()),
        }
    }

    /// The sides that run in this scenario, raw first.
    pub(crate) fn sides(self) -> Vec<Side> {
        self.workload.sides()
    }
}

/// What a case measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Workload {
    /// Consumer subscribed first, then the publisher at full speed (QoS).
    Steady(u8),
    /// Consumer subscribed first, publisher paced at the latency rate (QoS).
    Latency(u8),
    /// A QoS 1 backlog of this many messages waiting in a persistent session.
    Backlog(u64),
    /// Confirmed QoS 1 publishing.
    Publish,
    /// Steady QoS 1 with this many messages, every one of them remembered by
    /// the standard stack's dedup (its capacity and TTL raised to hold them
    /// all): the peak RSS with that many entries.
    Memory(u64),
}

impl Workload {
    /// The name in the table.
    pub(crate) fn name(self) -> String {
        match self {
            Self::Steady(qos) => format!("steady QoS {qos}"),
            Self::Latency(qos) => format!("latency QoS {qos}"),
            Self::Backlog(n) => format!("backlog {n}"),
            Self::Publish => "publish QoS 1".to_owned(),
            Self::Memory(n) => format!("memory {n} dedup"),
        }
    }

    /// The sides that run in this scenario, raw first.
    pub(crate) fn sides(self) -> Vec<Side> {
        match self {
            Self::Publish => PublisherKind::ALL.map(Side::Publisher).to_vec(),
            // Steady throughput also with a metrics recorder installed: what
            // observing a service costs.
            Self::Steady(_) => Consumer::ALL
                .into_iter()
                .chain([Consumer::Metered])
                .map(Side::Consumer)
                .collect(),
            _ => Consumer::ALL.map(Side::Consumer).to_vec(),
        }
    }
}

/// One side of a comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Side {
    /// A consumer.
    Consumer(Consumer),
    /// A publisher.
    Publisher(PublisherKind),
}

impl Side {
    /// The name in the table.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Consumer(consumer) => consumer.label(),
            Self::Publisher(publisher) => publisher.label(),
        }
    }
}

/// One run of one case, as measured.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Sample {
    /// The scenario's name.
    pub(crate) scenario: String,
    /// The MQTT version of the side under test.
    #[serde(serialize_with = "crate::child::protocol_text::serialize")]
    pub(crate) protocol: Protocol,
    /// The side's name.
    pub(crate) side: String,
    /// Which run (1-based).
    pub(crate) run: usize,
    /// `ok`, `timeout: <delivered>/<sent> after <s> s`, `stalled: ...`,
    /// `error: ...`.
    pub(crate) status: String,
    /// Messages the publisher sent (or was to send).
    pub(crate) sent: u64,
    /// Distinct messages handled (or confirmed).
    pub(crate) delivered: u64,
    /// Messages handled more than once.
    pub(crate) twice: u64,
    /// Delivered messages per second of the measured interval.
    pub(crate) msgs_per_s: f64,
    /// Child CPU time per delivered message, µs.
    pub(crate) cpu_us_per_msg: Option<f64>,
    /// Child peak RSS, MiB.
    pub(crate) peak_rss_mb: Option<f64>,
    /// Median of `now - ts`, µs.
    pub(crate) p50_us: Option<f64>,
    /// 99th percentile of `now - ts`, µs.
    pub(crate) p99_us: Option<f64>,
    /// Wall time of the whole case, s.
    pub(crate) wall_s: f64,
}

impl Sample {
    /// Whether the run ended `ok`.
    pub(crate) fn is_ok(&self) -> bool {
        self.status == "ok"
    }
}

/// A child's report with what the parent knows: how many were sent and when
/// the measured interval began.
struct Measured {
    sent: u64,
    start_epoch: f64,
    report: ChildReport,
}

/// Runs every scenario; returns the samples of each.
pub(crate) async fn run_all(
    settings: &Settings,
    broker: &mut Broker,
) -> Vec<(Scenario, Vec<Sample>)> {
    let started = Instant::now();
    let mut results = Vec::new();
    for scenario in settings.scenario_list() {
        let sides = scenario.sides();
        let mut repeat = vec![true; sides.len()];
        let mut samples = Vec::new();
        for run in 1..=settings.runs {
            for (index, &side) in sides.iter().enumerate() {
                if !repeat[index] {
                    continue;
                }
                if !broker.is_running() {
                    eprintln!("e2e: mosquitto has exited; stopping\n{}", broker.log());
                    results.push((scenario, samples));
                    return results;
                }
                let sample = run_case(settings, broker.port(), scenario, side, run).await;
                eprintln!(
                    "[{:>6.1}s] {:<15} {:<26} run {run}: {}",
                    started.elapsed().as_secs_f64(),
                    scenario.name(),
                    side.label(),
                    progress(&sample)
                );
                if !sample.is_ok() || sample.wall_s > settings.case_timeout_s / 3.0 {
                    repeat[index] = false;
                }
                samples.push(sample);
            }
        }
        results.push((scenario, samples));
    }
    results
}

fn progress(sample: &Sample) -> String {
    format!(
        "{:.0} msg/s, {} µs CPU/msg, {} MB, {}/{} delivered, {} twice, p50 {} µs, p99 {} µs, {:.1} s, {}",
        sample.msgs_per_s,
        fmt_opt(sample.cpu_us_per_msg, 1),
        fmt_opt(sample.peak_rss_mb, 1),
        sample.delivered,
        sample.sent,
        sample.twice,
        fmt_opt(sample.p50_us, 0),
        fmt_opt(sample.p99_us, 0),
        sample.wall_s,
        sample.status
    )
}

/// `value` with `decimals`, or `-`.
pub(crate) fn fmt_opt(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.decimals$}"))
}

async fn run_case(
    settings: &Settings,
    port: u16,
    scenario: Scenario,
    side: Side,
    run: usize,
) -> Sample {
    let started = Instant::now();
    let target = Target {
        port,
        protocol: scenario.protocol,
    };
    let measured = match (scenario.workload, side) {
        (Workload::Steady(qos), Side::Consumer(consumer)) => {
            let spec = live_spec(settings, target, consumer, qos, settings.messages, false);
            live(settings, &spec, None).await
        }
        (Workload::Memory(entries), Side::Consumer(consumer)) => {
            let spec = ChildSpec {
                dedupe_entries: Some(entries),
                ..live_spec(settings, target, consumer, 1, entries, false)
            };
            live(settings, &spec, None).await
        }
        (Workload::Latency(qos), Side::Consumer(consumer)) => {
            let messages = settings.latency_messages;
            let spec = live_spec(settings, target, consumer, qos, messages, true);
            live(settings, &spec, Some(settings.latency_rate)).await
        }
        (Workload::Backlog(backlog_size), Side::Consumer(consumer)) => {
            backlog(settings, target, consumer, backlog_size).await
        }
        (Workload::Publish, Side::Publisher(publisher)) => {
            publish(settings, target, publisher).await
        }
        _ => Err("no such case".to_owned()),
    };
    let wall_s = started.elapsed().as_secs_f64();
    let (protocol, scenario, side) = (scenario.protocol, scenario.name(), side.label().to_owned());
    match measured {
        Ok(Measured {
            sent,
            start_epoch,
            report,
        }) => {
            let seconds = report.end_epoch.map(|end| end - start_epoch);
            let delivered = to_f64(report.unique);
            Sample {
                scenario,
                protocol,
                side,
                run,
                status: match report.status {
                    Status::Ok => "ok".to_owned(),
                    Status::Timeout => format!(
                        "timeout: {}/{sent} after {:.0} s",
                        report.unique, settings.case_timeout_s
                    ),
                    Status::Stalled => format!("stalled: {}/{sent}", report.unique),
                    Status::Error(err) => format!("error: {err}"),
                },
                sent,
                delivered: report.unique,
                twice: report.twice,
                msgs_per_s: seconds.filter(|s| *s > 0.0).map_or(0.0, |s| delivered / s),
                cpu_us_per_msg: (report.unique > 0).then(|| report.cpu_s * 1e6 / delivered),
                peak_rss_mb: (report.peak_rss_kb > 0).then(|| to_f64(report.peak_rss_kb) / 1024.0),
                p50_us: report.p50_us,
                p99_us: report.p99_us,
                wall_s,
            }
        }
        Err(err) => Sample {
            scenario,
            protocol,
            side,
            run,
            status: format!("error: {err}"),
            sent: 0,
            delivered: 0,
            twice: 0,
            msgs_per_s: 0.0,
            cpu_us_per_msg: None,
            peak_rss_mb: None,
            p50_us: None,
            p99_us: None,
            wall_s,
        },
    }
}

/// A client id no other case uses.
fn unique_id(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}-{}", &id[..12])
}

fn rumqttc_qos(qos: u8) -> rumqttc::QoS {
    if qos == 0 {
        rumqttc::QoS::AtMostOnce
    } else {
        rumqttc::QoS::AtLeastOnce
    }
}

/// Where a child connects, and which MQTT version it speaks.
#[derive(Clone, Copy, Debug)]
struct Target {
    /// The broker's port on 127.0.0.1.
    port: u16,
    /// The MQTT version.
    protocol: Protocol,
}

/// A consumer that subscribes first and is fed while it runs.
fn live_spec(
    settings: &Settings,
    target: Target,
    consumer: Consumer,
    qos: u8,
    messages: u64,
    latency: bool,
) -> ChildSpec {
    ChildSpec {
        role: Role::Consume {
            consumer,
            mode: Mode::Live,
        },
        port: target.port,
        protocol: target.protocol,
        qos,
        client_id: unique_id("e2e-sub"),
        messages,
        latency,
        deadline_s: settings.case_timeout_s,
        dedupe_entries: None,
    }
}

/// Starts the consumer `spec` describes, then publishes its messages at
/// `rate` (or full speed). Timed from the first publish to the last new
/// message handled.
async fn live(
    settings: &Settings,
    spec: &ChildSpec,
    rate: Option<f64>,
) -> Result<Measured, String> {
    let (port, qos, messages) = (spec.port, spec.qos, spec.messages);
    let mut feeder = Feeder::connect(port, &unique_id("e2e-pub")).await?;
    let mut child = ChildProcess::spawn(spec)?;
    let outcome = async {
        let line = child.line(READY_LIMIT).await?;
        if line != READY {
            return Err(format!("child did not get ready: {line}"));
        }
        let fed = feeder
            .run(
                TOPIC,
                rumqttc_qos(qos),
                messages,
                rate,
                settings.case_timeout(),
            )
            .await?;
        child.tell(&format!("SENT {}", fed.sent)).await?;
        let report = child.report(settings.case_timeout() + GRACE).await?;
        Ok(Measured {
            sent: fed.sent,
            start_epoch: fed.first_epoch,
            report,
        })
    }
    .await;
    child.finish().await;
    feeder.close().await;
    outcome
}

/// A persistent session that was away while `size` QoS 1 messages were
/// published, then drains them. Timed from reconnecting to the last new
/// message handled.
async fn backlog(
    settings: &Settings,
    target: Target,
    consumer: Consumer,
    size: u64,
) -> Result<Measured, String> {
    let port = target.port;
    let mut spec = ChildSpec {
        role: Role::Consume {
            consumer,
            mode: Mode::Prime,
        },
        port,
        protocol: target.protocol,
        qos: 1,
        client_id: unique_id("e2e-backlog"),
        messages: size,
        latency: false,
        deadline_s: settings.case_timeout_s,
        dedupe_entries: None,
    };
    let outcome = async {
        let mut child = ChildProcess::spawn(&spec)?;
        let primed = child.report(READY_LIMIT).await;
        child.finish().await;
        if let Status::Error(err) = primed?.status {
            return Err(format!("priming the session: {err}"));
        }

        let mut feeder = Feeder::connect(port, &unique_id("e2e-pub")).await?;
        let fed = feeder
            .run(
                TOPIC,
                rumqttc::QoS::AtLeastOnce,
                size,
                None,
                settings.case_timeout(),
            )
            .await;
        feeder.close().await;
        let fed = fed?;

        spec.role = Role::Consume {
            consumer,
            mode: Mode::Drain,
        };
        let mut child = ChildProcess::spawn(&spec)?;
        let report = child.report(settings.case_timeout() + GRACE).await;
        child.finish().await;
        let report = report?;
        Ok(Measured {
            sent: fed.sent,
            start_epoch: report.start_epoch,
            report,
        })
    }
    .await;
    // Whatever is left of the backlog must not weigh on the next case.
    let _ = discard_session(port, &spec.client_id).await;
    outcome
}

/// `settings.messages` confirmed QoS 1 publishes from the child.
async fn publish(
    settings: &Settings,
    target: Target,
    publisher: PublisherKind,
) -> Result<Measured, String> {
    let spec = ChildSpec {
        role: Role::Publish { publisher },
        port: target.port,
        protocol: target.protocol,
        qos: 1,
        client_id: unique_id("e2e-publish"),
        messages: settings.messages,
        latency: false,
        deadline_s: settings.case_timeout_s,
        dedupe_entries: None,
    };
    let mut child = ChildProcess::spawn(&spec)?;
    let report = child.report(settings.case_timeout() + GRACE).await;
    child.finish().await;
    let report = report?;
    Ok(Measured {
        sent: settings.messages,
        start_epoch: report.start_epoch,
        report,
    })
}
