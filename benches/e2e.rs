//! End to end against a real broker: tower-mqtt consumers and publishers
//! against raw rumqttc, on the same messages, in the same run.
//!
//! ```sh
//! cargo bench --bench e2e                  # the full run, about 20 minutes on 2 cores
//! E2E_QUICK=1 cargo bench --bench e2e      # a smoke run, about two minutes
//! E2E_PROTOCOLS=3.1.1 cargo bench --bench e2e   # MQTT 3.1.1 only, half the time
//! ```
//!
//! The harness starts its own mosquitto on a free loopback port (found on
//! `PATH` or in `/usr/sbin`; a generated config with no limit on queued
//! messages and no persistence), and runs every consumer and publisher under
//! test in a child process (this binary again, `E2E_CHILD` set), so the CPU
//! time (`/proc/self/task/*/schedstat`, checked against `/proc/self/stat`)
//! and the peak RSS (`VmHWM`) it reports are its own. The sides compared:
//!
//! - consumers: raw rumqttc with manual acks and a `serde_json` envelope
//!   decode; a tower-mqtt service whose inbound stack only decodes; a
//!   tower-mqtt service on `Config::inbound_stack` (decode, dedup, span,
//!   isolation, retry, timeout). One route (or loop) on `bench/#` records
//!   each message; health and heartbeat are off;
//! - publishers: raw rumqttc, tower-mqtt's `Publisher`, and the outbound
//!   stack, at confirmed QoS 1.
//!
//! Every consumer scenario runs once per MQTT version in `E2E_PROTOCOLS`
//! (`3.1.1,5`, the default): over MQTT 5 the raw consumer is the same loop
//! and decode on `rumqttc::v5`, announcing the Receive Maximum tower-mqtt
//! announces, and the tower-mqtt consumers run on `Protocol::V5`; each is
//! compared with the raw consumer of its own version, and its rows are
//! named with ` v5`. The publisher that feeds them speaks 3.1.1 either way,
//! so only the consumer's protocol changes. The publish scenario runs over
//! 3.1.1 only.
//!
//! Every consumer gets the same rumqttc publisher (in the parent) and the same
//! ~200-byte fleet envelopes with unique ids and `data.seq`, on `bench/load`.
//! The scenarios:
//!
//! - **steady** (QoS 1 and QoS 0): the consumer subscribes, then the publisher
//!   sends `E2E_MESSAGES` as fast as the broker takes them (QoS 1: at most 100
//!   unconfirmed). Throughput is messages handled over the time from the first
//!   publish to the last message handled;
//! - **latency** (QoS 1 and QoS 0): the publisher paced at `E2E_LATENCY_RATE`
//!   (10,000 msg/s) for `E2E_LATENCY_SECS` (2 s); p50 and p99 of `now - ts`;
//! - **publish**: `E2E_MESSAGES` confirmed QoS 1 publishes per side;
//! - **memory**: steady QoS 1 with `E2E_MEMORY_ENTRIES` (100,000) messages,
//!   the standard stack's dedup sized and timed to remember every one: its
//!   peak RSS with that many entries, against the same load without dedup;
//! - **backlog** (QoS 1): the consumer connects with a persistent session,
//!   subscribes and disconnects; `E2E_BACKLOG_SIZES` messages (5,000, 50,000,
//!   200,000) are published while it is away; it reconnects and drains them.
//!   Throughput is from reconnecting to the last message handled; `twice`
//!   counts messages handled more than once.
//!
//! Each case runs `E2E_RUNS` times (3), interleaved raw, decode, standard
//! (and, in the steady scenarios, the standard stack with a Prometheus
//! recorder installed); the table shows medians, and the ratio of each row to the raw row of its
//! scenario. Every wait has a limit: a case that takes longer than
//! `E2E_CASE_TIMEOUT` seconds (120) is reported as `timeout` with the count it
//! reached, and a case that fails or takes more than a third of that is not
//! repeated. `E2E_SCENARIOS=steady,latency,publish,memory,backlog` picks families,
//! `E2E_PROTOCOLS=3.1.1,5` the MQTT versions.
//! The same figures, and every run, go to `target/bench/e2e.json`.
//!
//! `E2E_QUICK=1` (also the default without `--bench`, as under
//! `cargo test --benches`) runs 1,000 messages, one run, a 2,000 backlog.
//!
//! Seconds move with whatever else the machine runs; instructions do not.
//! `E2E_CHILD_WRAPPER` runs every child under a command, so
//!
//! ```sh
//! E2E_CHILD_WRAPPER="valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p" \
//!     E2E_SCENARIOS=steady E2E_RUNS=1 E2E_MESSAGES=5000 cargo bench --bench e2e
//! ```
//!
//! leaves one profile per child (in the table's order) whose `summary:` line,
//! divided by the messages, is the instructions per message of that side;
//! `callgrind_annotate` shows where they go. The throughput columns of such a
//! run mean nothing (valgrind runs one thread at a time).

#[path = "e2e/broker.rs"]
mod broker;
#[path = "e2e/child.rs"]
mod child;
#[path = "e2e/consumer.rs"]
mod consumer;
#[path = "e2e/feed.rs"]
mod feed;
#[path = "e2e/load.rs"]
mod load;
#[path = "e2e/measure.rs"]
mod measure;
#[path = "e2e/process.rs"]
mod process;
#[path = "e2e/publisher.rs"]
mod publisher;
#[path = "e2e/report.rs"]
mod report;
#[path = "e2e/run.rs"]
mod run;

use std::time::Instant;

fn main() {
    if let Ok(spec) = std::env::var(child::ENV) {
        child::run(&spec);
    }
    // `cargo bench` passes `--bench`; other arguments are ignored.
    let bench = std::env::args().any(|arg| arg == "--bench");
    let settings = run::Settings::from_env(bench);
    load::check_payload();
    let mut broker = broker::Broker::start().unwrap_or_else(|err| {
        eprintln!("e2e: {err}");
        std::process::exit(1);
    });
    let (cpus, cpu_model) = measure::machine();
    let machine = report::Machine {
        cpus,
        cpu_model,
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or_else(|_| "unknown".to_owned(), |k| k.trim().to_owned()),
        broker: broker.version().to_owned(),
    };
    eprintln!(
        "e2e: {} on {}; {} runs; scenarios {:?}",
        machine.broker,
        broker.url(),
        settings.runs,
        settings.scenarios
    );
    let started = Instant::now();
    let results = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(run::run_all(&settings, &mut broker));
    let summary = report::Summary {
        machine,
        settings: &settings,
        total_s: started.elapsed().as_secs_f64(),
        rows: report::rows(&results),
        samples: results
            .into_iter()
            .flat_map(|(_, samples)| samples)
            .collect(),
    };
    summary.print();
    match summary.write_json() {
        Ok(path) => println!("figures: {}", path.display()),
        Err(err) => {
            eprintln!("e2e: {err}");
            std::process::exit(1);
        }
    }
}
