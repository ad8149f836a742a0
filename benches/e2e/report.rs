//! Medians, ratios to raw, the printed table and `target/bench/e2e.json`.

use std::{fs, path::PathBuf};

use serde::Serialize;
use tower_mqtt::config::Protocol;

use crate::{
    measure::{median, to_f64},
    run::{fmt_opt, Sample, Scenario, Settings},
};

/// One line of the table: the medians of one case.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Row {
    /// The scenario's name.
    pub(crate) scenario: String,
    /// The MQTT version of the side under test.
    #[serde(serialize_with = "crate::child::protocol_text::serialize")]
    pub(crate) protocol: Protocol,
    /// The side's name.
    pub(crate) side: String,
    /// Runs that ended `ok`, and runs made.
    pub(crate) runs_ok: usize,
    /// Runs made.
    pub(crate) runs: usize,
    /// Median delivered messages per second.
    pub(crate) msgs_per_s: Option<f64>,
    /// `msgs_per_s` over the raw side's, same scenario.
    pub(crate) throughput_vs_raw: Option<f64>,
    /// Median CPU µs per message.
    pub(crate) cpu_us_per_msg: Option<f64>,
    /// `cpu_us_per_msg` over the raw side's.
    pub(crate) cpu_vs_raw: Option<f64>,
    /// Median peak RSS, MiB.
    pub(crate) peak_rss_mb: Option<f64>,
    /// Median distinct messages delivered.
    pub(crate) delivered: Option<f64>,
    /// Messages sent (the median over runs).
    pub(crate) sent: Option<f64>,
    /// Most messages handled twice in any run.
    pub(crate) twice: u64,
    /// Median p50 latency, µs.
    pub(crate) p50_us: Option<f64>,
    /// Median p99 latency, µs.
    pub(crate) p99_us: Option<f64>,
    /// `ok`, or how the runs that were not ok ended.
    pub(crate) status: String,
}

/// The medians of one case's samples: over the runs that ended `ok`, or over
/// all runs when none did (then the figures show how far it got).
fn row(scenario: Scenario, side: &str, samples: &[&Sample]) -> Row {
    let ok: Vec<&Sample> = samples.iter().copied().filter(|s| s.is_ok()).collect();
    let basis = if ok.is_empty() { samples } else { &ok[..] };
    let med = |f: fn(&Sample) -> Option<f64>| median(basis.iter().filter_map(|s| f(s)));
    let mut failures: Vec<String> = samples
        .iter()
        .filter(|s| !s.is_ok())
        .map(|s| s.status.clone())
        .collect();
    failures.dedup();
    let status = if failures.is_empty() {
        "ok".to_owned()
    } else {
        format!("{}/{} ok; {}", ok.len(), samples.len(), failures.join("; "))
    };
    Row {
        scenario: scenario.name(),
        protocol: scenario.protocol,
        side: side.to_owned(),
        runs_ok: ok.len(),
        runs: samples.len(),
        msgs_per_s: med(|s| Some(s.msgs_per_s)),
        throughput_vs_raw: None,
        cpu_us_per_msg: med(|s| s.cpu_us_per_msg),
        cpu_vs_raw: None,
        peak_rss_mb: med(|s| s.peak_rss_mb),
        delivered: med(|s| Some(to_f64(s.delivered))),
        sent: med(|s| Some(to_f64(s.sent))),
        twice: samples.iter().map(|s| s.twice).max().unwrap_or(0),
        p50_us: med(|s| s.p50_us),
        p99_us: med(|s| s.p99_us),
        status,
    }
}

/// The rows of every scenario, with ratios to the raw side of each.
pub(crate) fn rows(results: &[(Scenario, Vec<Sample>)]) -> Vec<Row> {
    let mut rows = Vec::new();
    for &(scenario, ref samples) in results {
        let mut scenario_rows: Vec<Row> = scenario
            .sides()
            .iter()
            .map(|side| {
                let of_side: Vec<&Sample> =
                    samples.iter().filter(|s| s.side == side.label()).collect();
                row(scenario, side.label(), &of_side)
            })
            .filter(|row| row.runs > 0)
            .collect();
        let raw = scenario_rows
            .first()
            .map(|raw| (raw.msgs_per_s, raw.cpu_us_per_msg));
        if let Some((raw_rate, raw_cpu)) = raw {
            let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
                (Some(a), Some(b)) if b > 0.0 => Some(a / b),
                _ => None,
            };
            for row in &mut scenario_rows {
                row.throughput_vs_raw = ratio(row.msgs_per_s, raw_rate);
                row.cpu_vs_raw = ratio(row.cpu_us_per_msg, raw_cpu);
            }
        }
        rows.extend(scenario_rows);
    }
    rows
}

/// The machine and broker the figures come from.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Machine {
    /// CPUs available to the process.
    pub(crate) cpus: usize,
    /// `model name` from `/proc/cpuinfo`.
    pub(crate) cpu_model: String,
    /// The kernel release.
    pub(crate) kernel: String,
    /// The broker's version line.
    pub(crate) broker: String,
}

/// Everything the harness writes to `target/bench/e2e.json`.
#[derive(Debug, Serialize)]
pub(crate) struct Summary<'a> {
    /// Where it ran.
    pub(crate) machine: Machine,
    /// What ran.
    pub(crate) settings: &'a Settings,
    /// Seconds the whole harness took.
    pub(crate) total_s: f64,
    /// The medians, as printed.
    pub(crate) rows: Vec<Row>,
    /// Every run.
    pub(crate) samples: Vec<Sample>,
}

impl Summary<'_> {
    /// Prints the table to stdout.
    pub(crate) fn print(&self) {
        let m = &self.machine;
        let s = self.settings;
        println!();
        println!(
            "tower-mqtt end to end vs raw rumqttc: {} on 127.0.0.1; {} CPUs ({}), kernel {}",
            m.broker, m.cpus, m.cpu_model, m.kernel
        );
        println!(
            "medians of up to {} interleaved runs; {} messages per steady/publish case, \
             latency at {:.0} msg/s for {} messages; consumer CPU and RSS from its own process",
            s.runs, s.messages, s.latency_rate, s.latency_messages
        );
        println!();
        // As wide as the longest scenario name, and never narrower than the
        // 3.1.1 names alone make it.
        let width = self
            .rows
            .iter()
            .map(|row| row.scenario.chars().count())
            .fold(19, usize::max);
        println!(
            "| {:<width$} | {:<26} | {:>8} | {:>6} | {:>10} | {:>6} | {:>7} | {:>15} | {:>5} | {:>7} | {:>7} | {:<4} | status",
            "scenario", "side", "msgs/s", "x raw", "CPU µs/msg", "x raw", "RSS MB",
            "delivered/sent", "twice", "p50 µs", "p99 µs", "runs"
        );
        println!(
            "|{:-<dash$}|{:-<28}|{:->10}|{:->8}|{:->12}|{:->8}|{:->9}|{:->17}|{:->7}|{:->9}|{:->9}|{:-<6}|--------",
            "", "", "", "", "", "", "", "", "", "", "", "",
            dash = width + 2
        );
        for row in &self.rows {
            let delivered = match (row.delivered, row.sent) {
                (Some(d), Some(sent)) => format!("{d:.0}/{sent:.0}"),
                _ => "-".to_owned(),
            };
            println!(
                "| {:<width$} | {:<26} | {:>8} | {:>6} | {:>10} | {:>6} | {:>7} | {:>15} | {:>5} | {:>7} | {:>7} | {:<4} | {}",
                row.scenario,
                row.side,
                fmt_opt(row.msgs_per_s, 0),
                fmt_opt(row.throughput_vs_raw, 2),
                fmt_opt(row.cpu_us_per_msg, 1),
                fmt_opt(row.cpu_vs_raw, 2),
                fmt_opt(row.peak_rss_mb, 1),
                delivered,
                row.twice,
                fmt_opt(row.p50_us, 0),
                fmt_opt(row.p99_us, 0),
                format!("{}/{}", row.runs_ok, row.runs),
                row.status
            );
        }
        if self.rows.iter().any(|row| row.protocol == Protocol::V5) {
            println!();
            println!(
                "v5 rows: the consumer speaks MQTT 5 (raw: rumqttc::v5, the same loop and \
                 decode; tower-mqtt: Protocol::V5); the load's publisher speaks 3.1.1 throughout"
            );
        }
        println!();
        println!("took {:.0} s", self.total_s);
    }

    /// Writes the summary as JSON to `<workspace>/target/bench/e2e.json`;
    /// returns the path.
    pub(crate) fn write_json(&self) -> Result<PathBuf, String> {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("target")
            .join("bench");
        fs::create_dir_all(&dir).map_err(|err| format!("create {}: {err}", dir.display()))?;
        let path = dir.join("e2e.json");
        let json = serde_json::to_string_pretty(self).map_err(|err| err.to_string())?;
        fs::write(&path, json + "\n").map_err(|err| format!("write {}: {err}", path.display()))?;
        Ok(path)
    }
}
