//! What acknowledging in receive order costs, against a real mosquitto.
//!
//! ```sh
//! cargo bench --bench ack_order            # about a minute
//! ```
//!
//! One service has two routes: `slow/job`, whose handler takes 500 ms, and
//! `fast/event`, whose handler does nothing. A publisher keeps the slow route
//! busy (a message every 500 ms) while it sends fast messages as fast as the
//! broker takes them (QoS 1, at most 100 unconfirmed), for `ACK_ORDER_SECS`
//! seconds (5). The figure is the fast route's throughput over that time,
//! for:
//!
//! - **receive order** (`AckOrder::Connection`, the default): every
//!   acknowledgement waits for the slow message received before it;
//! - **per topic** (`AckOrder::Topic`, outside the specification): a slow
//!   topic holds back only its own acknowledgements;
//! - **receive order, slow route on receipt** (`Ack::OnReceipt` on
//!   `slow/job`): within the specification, the slow route acknowledges when
//!   its message is queued, so it holds nothing back (a crash then loses that
//!   one job instead of running it again).
//!
//! Each case runs `ACK_ORDER_RUNS` times (3), interleaved; the table shows
//! medians and the ratio to per-topic order. The broker is the harness's own
//! mosquitto with its default in-flight window (20 messages).

// The e2e harness's broker; this bench needs only part of it.
#[allow(dead_code)]
#[path = "e2e/broker.rs"]
mod broker;

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use rumqttc::{AsyncClient, MqttOptions, QoS as WireQoS};
use tower_mqtt::{config::Config, Ack, AckOrder, Envelope, Request, Router, Subscription};

/// One way to run the service.
#[derive(Clone, Copy, Debug)]
enum Mode {
    ReceiveOrder,
    PerTopic,
    SlowOnReceipt,
}

impl Mode {
    const ALL: [Mode; 3] = [Mode::ReceiveOrder, Mode::PerTopic, Mode::SlowOnReceipt];

    fn label(self) -> &'static str {
        match self {
            Mode::ReceiveOrder => "receive order (default)",
            Mode::PerTopic => "per topic (opt-in, outside the spec)",
            Mode::SlowOnReceipt => "receive order, slow route OnReceipt",
        }
    }
}

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|v| *v > 0)
        .unwrap_or(default)
}

/// What one case measured.
#[derive(Clone, Copy, Debug)]
struct Figures {
    /// Fast messages handled per second.
    fast_per_s: f64,
    /// Slow jobs finished in the case (at most one per 500 ms).
    slow_done: u64,
    /// The most messages held at once.
    peak_pending: u64,
}

/// Runs one case.
async fn case(url: &str, mode: Mode, seconds: u64) -> Figures {
    let fast = Arc::new(AtomicU64::new(0));
    let slow_route = match mode {
        Mode::SlowOnReceipt => Subscription::new("slow/job").ack(Ack::OnReceipt),
        _ => Subscription::new("slow/job"),
    };
    let counter = fast.clone();
    let router = Router::new()
        .route(slow_route, |_: Request<Envelope>| async {
            tokio::time::sleep(Duration::from_millis(500)).await;
        })
        .route("fast/event", move |_: Request<Envelope>| {
            counter.fetch_add(1, Ordering::Relaxed);
            std::future::ready(())
        });
    let order = match mode {
        Mode::PerTopic => AckOrder::Topic,
        _ => AckOrder::Connection,
    };
    let config = Config::new(url)
        .expect("broker URL")
        .with_client_id(format!("ack-order-{}", uuid::Uuid::new_v4().simple()))
        .with_ack_order(order);
    let running = tower_mqtt::serve(config, router).spawn().expect("serve");
    tokio::time::timeout(Duration::from_secs(10), running.ready())
        .await
        .expect("ready in time")
        .expect("subscribed");

    // Two publishers, so the flood of fast messages cannot delay the slow ones.
    let (client, fast_poll) = feeder(url);
    let (slow_client, slow_poll) = feeder(url);
    let stop = Arc::new(AtomicBool::new(false));
    let slow_feed = {
        let (client, stop) = (slow_client, stop.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let job = Envelope::new("slow.job", serde_json::json!({})).unwrap();
                let _ = client
                    .publish("slow/job", WireQoS::AtLeastOnce, false, job.to_vec())
                    .await;
            }
        })
    };
    let started = Instant::now();
    let fast_feed = {
        let (client, stop) = (client.clone(), stop.clone());
        tokio::spawn(async move {
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let event = Envelope::new("fast.event", serde_json::json!({ "seq": seq })).unwrap();
                let _ = client
                    .publish("fast/event", WireQoS::AtLeastOnce, false, event.to_vec())
                    .await;
                seq += 1;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let handled = fast.load(Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let stats = running.stats();
    let figures = Figures {
        fast_per_s: count(handled) / elapsed,
        slow_done: stats.handled - handled,
        peak_pending: stats.peak_pending,
    };
    stop.store(true, Ordering::Relaxed);
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = fast_feed.await;
        let _ = slow_feed.await;
    })
    .await;
    fast_poll.abort();
    slow_poll.abort();
    let _ = tokio::time::timeout(Duration::from_secs(15), running.shutdown()).await;
    figures
}

/// A plain rumqttc publisher and the task that drives it.
fn feeder(url: &str) -> (AsyncClient, tokio::task::JoinHandle<()>) {
    let id = format!("ack-order-feed-{}", uuid::Uuid::new_v4().simple());
    let options = MqttOptions::new(id, broker::HOST, port_of(url));
    let (client, mut eventloop) = AsyncClient::new(options, 256);
    let poll = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    (client, poll)
}

fn port_of(url: &str) -> u16 {
    url.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("a port")
}

/// A count as a float; counts here stay far below 2^32.
fn count(n: u64) -> f64 {
    f64::from(u32::try_from(n).unwrap_or(u32::MAX))
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if !std::env::args().any(|arg| arg == "--bench") {
        // `cargo test --benches` runs benches as smoke tests; this one needs
        // a minute and a broker.
        println!("ack_order: run with `cargo bench --bench ack_order`");
        return;
    }
    let broker = match broker::Broker::start() {
        Ok(broker) => broker,
        Err(err) => {
            eprintln!("ack_order: {err}");
            std::process::exit(1);
        }
    };
    let runs = setting("ACK_ORDER_RUNS", 3);
    let seconds = setting("ACK_ORDER_SECS", 5);
    let mut runs_of: Vec<Vec<Figures>> = vec![Vec::new(); Mode::ALL.len()];
    for run in 1..=runs {
        for (index, mode) in Mode::ALL.into_iter().enumerate() {
            let figures = case(&broker.url(), mode, seconds).await;
            eprintln!(
                "run {run}: {:<40} {:>9.0} fast msg/s, {} slow jobs done, peak pending {}",
                mode.label(),
                figures.fast_per_s,
                figures.slow_done,
                figures.peak_pending
            );
            runs_of[index].push(figures);
        }
    }
    let medians: Vec<(f64, f64)> = runs_of
        .iter()
        .map(|runs| {
            let mut fast: Vec<f64> = runs.iter().map(|f| f.fast_per_s).collect();
            let mut slow: Vec<f64> = runs.iter().map(|f| count(f.slow_done)).collect();
            (median(&mut fast), median(&mut slow))
        })
        .collect();
    let per_topic = medians[1].0;
    println!(
        "\nFast-route throughput beside a 500 ms route ({}; median of {runs} runs of {seconds} s)\n",
        broker.version()
    );
    println!("| acknowledgement order | fast msg/s | vs per topic | slow jobs done |");
    println!("|---|---|---|---|");
    for (mode, (fast, slow)) in Mode::ALL.into_iter().zip(&medians) {
        println!(
            "| {} | {fast:.0} | {:.2}x | {slow:.0} of {} |",
            mode.label(),
            fast / per_topic,
            seconds * 2
        );
    }
}
