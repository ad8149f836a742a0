//! Confirmed QoS 1 publish throughput: tower-mqtt's `Publisher` against raw
//! rumqttc, in the same run, against the same broker.
//!
//! ```sh
//! cargo bench --bench publish            # 5 rounds of 5000 messages each
//! PUBLISH_BENCH_MESSAGES=20000 cargo bench --bench publish
//! ```
//!
//! Both sides publish the same ~200-byte envelope at QoS 1 and count a message
//! only when the broker's PUBACK for it has arrived. The raw side is the
//! leanest correct rumqttc loop: one task feeds `AsyncClient::publish`, the
//! event loop counts PUBACKs. The tower-mqtt sides keep 100 publishes in flight
//! (rumqttc's default in-flight window), each awaiting its own confirmation:
//! once through `Publisher::publish`, once through the outbound stack
//! (correlate, encode, size guard, retry, timeout). The table shows the median
//! of each and the ratio to raw rumqttc.

#[path = "../tests/support/mod.rs"]
#[allow(clippy::all, clippy::pedantic, unreachable_pub)]
mod support;

use std::time::{Duration, Instant};

use futures_util::{stream, StreamExt};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::json;
use tower_mqtt::{config::Config, Client, Envelope, Request, Router};

const ROUNDS: usize = 5;
const IN_FLIGHT: usize = 100;

fn payload() -> Envelope {
    Envelope::new(
        "bench.publish",
        json!({"text": "the quick brown fox jumps over the lazy dog", "seq": 1, "confidence": 0.93, "lang": "en"}),
    )
    .expect("an object")
}

async fn raw_rumqttc(port: u16, messages: usize) -> Duration {
    let mut options = MqttOptions::new(support::unique_id("raw"), "127.0.0.1", port);
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(options, 1024);
    let bytes = payload().to_vec();
    // Connect first so both sides are timed from a live connection.
    loop {
        if let Event::Incoming(Packet::ConnAck(_)) = eventloop.poll().await.expect("connect") {
            break;
        }
    }
    let start = Instant::now();
    let feeder = tokio::spawn(async move {
        for _ in 0..messages {
            client
                .publish("bench/raw", QoS::AtLeastOnce, false, bytes.clone())
                .await
                .expect("publish");
        }
        client
    });
    let mut acked = 0;
    while acked < messages {
        if let Event::Incoming(Packet::PubAck(_)) = eventloop.poll().await.expect("poll") {
            acked += 1;
        }
    }
    let elapsed = start.elapsed();
    let client = feeder.await.expect("feeder");
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
    elapsed
}

/// Which way the tower-mqtt side publishes.
#[derive(Clone, Copy)]
enum Path {
    /// `Publisher::publish`, the builder (through the outbound stack).
    Publisher,
    /// `Publisher::send` with a ready request (through the same stack).
    Stack,
}

async fn tower_mqtt_publisher(url: &str, messages: usize, path: Path) -> Duration {
    let config = Config::new(url)
        .expect("url")
        .with_client_id(support::unique_id("tower"));
    let client = Client::new(config.clone()).expect("client");
    let running = client.serve(Router::new()).spawn().unwrap();
    running.connected().await;
    let publisher = running.publisher();
    let envelope = payload();
    // The builder is given the data and wraps it, as a handler uses it; the
    // bytes on the wire are the same size as the ready envelope's.
    let data = std::sync::Arc::new(envelope.data().clone());
    let start = Instant::now();
    stream::iter(0..messages)
        .map(|_| {
            let (publisher, envelope, data) = (publisher.clone(), envelope.clone(), data.clone());
            async move {
                match path {
                    Path::Publisher => {
                        publisher
                            .publish("bench/tower", &*data)
                            .event_type("bench.publish")
                            .await
                    }
                    Path::Stack => {
                        let req = Request::builder("bench/tower").body(envelope)?;
                        publisher.send(req).await
                    }
                }
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .for_each(|result: Result<(), tower_mqtt::BoxError>| {
            result.expect("confirmed");
            std::future::ready(())
        })
        .await;
    let elapsed = start.elapsed();
    running.shutdown().await;
    elapsed
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[allow(clippy::cast_precision_loss)]
fn rate(messages: usize, elapsed: Duration) -> f64 {
    messages as f64 / elapsed.as_secs_f64()
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing
    // and only wants to know that this builds and runs.
    let quick = !std::env::args().any(|arg| arg == "--bench");
    let messages = std::env::var("PUBLISH_BENCH_MESSAGES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(if quick { 200 } else { 5000 });
    let rounds = if quick { 1 } else { ROUNDS };
    let broker = support::TestBroker::start().await;
    let (mut raw, mut direct, mut stacked) = (Vec::new(), Vec::new(), Vec::new());
    // Interleaved so drift in the machine's load hits every side alike.
    for _ in 0..rounds {
        raw.push(rate(messages, raw_rumqttc(broker.port(), messages).await));
        let url = broker.url();
        direct.push(rate(
            messages,
            tower_mqtt_publisher(&url, messages, Path::Publisher).await,
        ));
        stacked.push(rate(
            messages,
            tower_mqtt_publisher(&url, messages, Path::Stack).await,
        ));
    }
    let (raw, direct, stacked) = (median(raw), median(direct), median(stacked));
    println!();
    println!(
        "confirmed QoS 1 publishes, {messages} per round, median of {rounds} rounds, broker: {}",
        broker.kind()
    );
    println!("| client                      | msgs/s   | ratio |");
    println!("|-----------------------------|----------|-------|");
    println!("| raw rumqttc                 | {raw:>8.0} | 1.00  |");
    println!(
        "| tower-mqtt publish builder  | {direct:>8.0} | {:.2}  |",
        direct / raw
    );
    println!(
        "| tower-mqtt send (request)   | {stacked:>8.0} | {:.2}  |",
        stacked / raw
    );
}
