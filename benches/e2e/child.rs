//! The process under test: one consumer or one publisher, alone in its
//! process, so that the CPU time and the peak RSS it reports are its own.
//!
//! The parent runs this same binary again with [`ENV`] set to a JSON
//! [`ChildSpec`]. The conversation is one line at a time:
//!
//! - a live consumer connects, subscribes and prints `READY`; the parent
//!   publishes and then writes `SENT <n>` to its stdin;
//! - every child ends by printing one JSON [`ChildReport`] line.
//!
//! A child stops when it has every message, when nothing new has arrived for a
//! while after the parent said how many it sent, or at its deadline, and says
//! which in [`Status`].

use std::{
    io::{BufRead, Write},
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{sync::watch, time::Instant};
use tower_mqtt::config::Protocol;

use crate::{
    consumer::{self, Consumer},
    load::Recorder,
    measure,
    publisher::{self, PublisherKind},
};

/// The environment variable that makes this binary a child.
pub(crate) const ENV: &str = "E2E_CHILD";
/// What a live consumer prints once it is subscribed.
pub(crate) const READY: &str = "READY";

/// How long without a new message, after the publisher has finished, ends a
/// live case.
pub(crate) const LIVE_IDLE: Duration = Duration::from_secs(3);
/// How long without a new message ends a drain.
pub(crate) const DRAIN_IDLE: Duration = Duration::from_secs(15);
/// How often a consumer checks whether it is done.
const CHECK_EVERY: Duration = Duration::from_millis(10);
/// How long connecting and subscribing may take.
pub(crate) const CONNECT_LIMIT: Duration = Duration::from_secs(15);
/// How long a consumer may take to shut down after reporting.
pub(crate) const STOP_LIMIT: Duration = Duration::from_secs(5);

/// How a consumer meets its messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Mode {
    /// Subscribed before the publisher starts; messages arrive as published.
    Live,
    /// Connects with a persistent session, subscribes and disconnects cleanly,
    /// so the broker keeps what is published next.
    Prime,
    /// Reconnects to the persistent session and drains what it holds.
    Drain,
}

/// What the child is.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Role {
    /// A consumer of the load.
    Consume {
        /// Which consumer.
        consumer: Consumer,
        /// How it meets the load.
        mode: Mode,
    },
    /// A publisher of confirmed QoS 1 messages.
    Publish {
        /// Which publisher.
        publisher: PublisherKind,
    },
}

/// Everything a child needs to know, passed as JSON in [`ENV`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct ChildSpec {
    /// What to be.
    pub(crate) role: Role,
    /// The broker's port on 127.0.0.1.
    pub(crate) port: u16,
    /// The MQTT version the consumer (or publisher) speaks.
    #[serde(with = "protocol_text")]
    pub(crate) protocol: Protocol,
    /// The QoS to subscribe with (0 or 1).
    pub(crate) qos: u8,
    /// The MQTT client id.
    pub(crate) client_id: String,
    /// Messages in the case (`seq` runs over `0..messages`).
    pub(crate) messages: u64,
    /// Whether to record `now - ts` of every message.
    pub(crate) latency: bool,
    /// Seconds the measured part may take before the case is a timeout.
    pub(crate) deadline_s: f64,
    /// Deliveries the standard stack's dedup remembers, when not the
    /// default (the memory case).
    pub(crate) dedupe_entries: Option<u64>,
}

/// [`Protocol`] as its text (`3.1.1`, `5`), which it parses back from.
pub(crate) mod protocol_text {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};
    use tower_mqtt::config::Protocol;

    #[allow(clippy::trivially_copy_pass_by_ref)] // serde's `with` passes a reference
    pub(crate) fn serialize<S: Serializer>(protocol: &Protocol, out: S) -> Result<S::Ok, S::Error> {
        out.collect_str(protocol)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(input: D) -> Result<Protocol, D::Error> {
        String::deserialize(input)?
            .parse()
            .map_err(D::Error::custom)
    }
}

/// How a case ended.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Status {
    /// Every message arrived, or (QoS 0) the publisher finished and nothing
    /// more came.
    #[default]
    Ok,
    /// The deadline passed first.
    Timeout,
    /// QoS 1 messages are missing and nothing has arrived for a while.
    Stalled,
    /// Something failed; the text says what.
    Error(String),
}

/// The one JSON line a child prints at the end.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct ChildReport {
    /// How it ended.
    pub(crate) status: Status,
    /// Messages received (consumers) or confirmed (publishers), repeats included.
    pub(crate) received: u64,
    /// Distinct messages received or confirmed.
    pub(crate) unique: u64,
    /// Messages received more than once.
    pub(crate) twice: u64,
    /// Epoch seconds when the measured part began: before connecting for a
    /// drain, before the first publish for a publisher, when subscribed for a
    /// live consumer.
    pub(crate) start_epoch: f64,
    /// Epoch seconds of the last new message or confirmation.
    pub(crate) end_epoch: Option<f64>,
    /// CPU seconds of this process over the measured part.
    pub(crate) cpu_s: f64,
    /// Peak RSS of this process, kB.
    pub(crate) peak_rss_kb: u64,
    /// Median latency, µs, when measured.
    pub(crate) p50_us: Option<f64>,
    /// 99th percentile latency, µs, when measured.
    pub(crate) p99_us: Option<f64>,
}

/// Runs the child described by `spec_json` and exits the process.
pub(crate) fn run(spec_json: &str) -> ! {
    let report = match serde_json::from_str::<ChildSpec>(spec_json) {
        Ok(spec) => {
            // A service's usual runtime: one worker per core.
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .expect("a tokio runtime");
            let report = runtime.block_on(async {
                match spec.role {
                    Role::Consume { consumer, mode } => consumer::run(&spec, consumer, mode).await,
                    Role::Publish { publisher } => publisher::run(&spec, publisher).await,
                }
            });
            runtime.shutdown_timeout(Duration::from_secs(1));
            report
        }
        Err(err) => Some(failed(format!("bad {ENV}: {err}"))),
    };
    // The report was printed already unless the child failed before it could.
    if let Some(report) = report {
        emit(&report);
    }
    std::process::exit(0)
}

/// Prints `line` to stdout and flushes it.
pub(crate) fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Prints the report line.
pub(crate) fn emit(report: &ChildReport) {
    say(&serde_json::to_string(report).expect("a report serializes"));
}

/// A report that only says what failed.
pub(crate) fn failed(err: impl Into<String>) -> ChildReport {
    ChildReport {
        status: Status::Error(err.into()),
        peak_rss_kb: measure::peak_rss_kb(),
        ..ChildReport::default()
    }
}

/// The number of messages the parent says it sent, once it says so.
pub(crate) fn sent_from_stdin() -> watch::Receiver<Option<u64>> {
    let (tx, rx) = watch::channel(None);
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { return };
            if let Some(sent) = line
                .strip_prefix("SENT ")
                .and_then(|n| n.trim().parse().ok())
            {
                tx.send_replace(Some(sent));
            }
        }
    });
    rx
}

/// Waits until the recorder holds every message the case needs, nothing new
/// has come for `idle` after the total is known, or `deadline` passes.
///
/// `total` is the number of messages to expect, once known; `lossy` says that
/// missing messages after the idle time are not a failure (QoS 0).
pub(crate) async fn wait_done(
    recorder: &Mutex<Recorder>,
    mut total: watch::Receiver<Option<u64>>,
    idle: Duration,
    lossy: bool,
    deadline: Instant,
) -> Status {
    let mut unique_seen = 0;
    let mut progress_at = Instant::now();
    let mut known_at: Option<Instant> = None;
    loop {
        let (unique, error) = {
            let rec = recorder.lock().expect("recorder poisoned");
            (rec.unique, rec.error.clone())
        };
        if let Some(err) = error {
            return Status::Error(err);
        }
        let now = Instant::now();
        if unique > unique_seen {
            unique_seen = unique;
            progress_at = now;
        }
        let target = *total.borrow_and_update();
        if let Some(target) = target {
            let known = *known_at.get_or_insert(now);
            if unique >= target {
                return Status::Ok;
            }
            if now.duration_since(progress_at.max(known)) > idle {
                return if lossy { Status::Ok } else { Status::Stalled };
            }
        }
        if now > deadline {
            return Status::Timeout;
        }
        tokio::time::sleep(CHECK_EVERY).await;
    }
}

/// Fills a report from the recorder and this process's counters.
pub(crate) fn report_from(
    status: Status,
    recorder: &Arc<Mutex<Recorder>>,
    start_epoch: f64,
    cpu_s: f64,
) -> ChildReport {
    let mut rec = recorder.lock().expect("recorder poisoned");
    let percentiles = rec.percentiles();
    ChildReport {
        status,
        received: rec.received,
        unique: rec.unique,
        twice: rec.twice,
        start_epoch,
        end_epoch: rec.last_new_epoch,
        cpu_s,
        peak_rss_kb: measure::peak_rss_kb(),
        p50_us: percentiles.map(|(p50, _)| p50),
        p99_us: percentiles.map(|(_, p99)| p99),
    }
}

/// The deadline of a case that starts now.
pub(crate) fn deadline(spec: &ChildSpec) -> Instant {
    Instant::now() + Duration::from_secs_f64(spec.deadline_s)
}
