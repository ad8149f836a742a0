//! `examples/metrics.rs` as Prometheus sees it: the example runs as a process
//! against mosquitto, takes 100 messages and one undecodable payload, and its
//! `/metrics` page counts them.

mod support;

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{Ipv4Addr, TcpListener, TcpStream},
    process::Stdio,
    time::Duration,
};

use serde_json::json;
use support::TestBroker;
use tokio::io::{AsyncBufReadExt, BufReader};
use tower_mqtt::Envelope;

const WAIT: Duration = Duration::from_secs(30);

/// A free loopback port (released before the example binds it).
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

/// One plain HTTP GET of `/metrics`.
fn scrape(port: u16) -> std::io::Result<String> {
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}

/// The samples of the Prometheus text format: `name{labels}` and value.
fn samples(page: &str) -> HashMap<String, f64> {
    page.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// The sum of every series of `metric` whose labels contain `label`.
fn sum(samples: &HashMap<String, f64>, metric: &str, label: &str) -> f64 {
    samples
        .iter()
        .filter(|(series, _)| {
            (series.starts_with(&format!("{metric}{{")) || series.as_str() == metric)
                && series.contains(label)
        })
        .map(|(_, value)| value)
        .sum()
}

/// Scrapes until `done` holds for the samples, at most `limit`.
async fn scrape_until(
    port: u16,
    limit: Duration,
    done: impl Fn(&HashMap<String, f64>) -> bool,
) -> Option<HashMap<String, f64>> {
    tokio::time::timeout(limit, async {
        loop {
            if let Ok(page) = scrape(port) {
                let samples = samples(&page);
                if done(&samples) {
                    return samples;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .ok()
}

/// A counter's value as the integer it is.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // counts, far below 2^52
fn count(value: f64) -> u64 {
    value.round() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::too_many_lines)] // one scenario, read top to bottom
async fn prometheus_scrapes_handled_messages_and_decode_failures() {
    let broker = TestBroker::start().await;
    let port = free_port();
    let mut example = tokio::process::Command::new(support::example_binary("metrics"))
        .env("MQTT_URL", broker.url())
        .env("METRICS_ADDR", format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run the metrics example");
    let mut lines = BufReader::new(example.stdout.take().unwrap()).lines();
    let printed = tokio::time::timeout(WAIT, async {
        let mut printed = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            let serving = line.starts_with("serving on");
            printed.push(line);
            if serving {
                break;
            }
        }
        printed
    })
    .await
    .expect("the example starts");
    assert!(
        printed
            .iter()
            .any(|line| line == &format!("metrics on http://127.0.0.1:{port}/metrics")),
        "the address is printed at start: {printed:?}"
    );
    // Subscribed once a job published now is counted.
    let subscribed = tokio::time::timeout(WAIT, async {
        loop {
            let job = Envelope::new("jobs.run", json!({})).unwrap().to_vec();
            support::publish_raw(
                &broker.url(),
                "jobs/run",
                job,
                support::QoS::AtLeastOnce,
                false,
            )
            .await;
            let counted = scrape_until(port, Duration::from_millis(300), |samples| {
                sum(samples, "messaging_client_handled_messages", "jobs/run") >= 1.0
            })
            .await;
            if counted.is_some() {
                return;
            }
        }
    })
    .await;
    assert!(
        subscribed.is_ok(),
        "the example subscribed: {:?}",
        scrape(port)
    );

    let readings = (0..100).map(|i| {
        let reading = Envelope::new("sensors.temperature", json!({ "celsius": 20 + i % 5 }))
            .unwrap()
            .to_vec();
        (format!("sensors/room{}/temperature", i % 7), reading)
    });
    support::publish_each(&broker.url(), readings).await;
    support::publish_raw(
        &broker.url(),
        "sensors/room1/temperature",
        b"{not json".to_vec(),
        support::QoS::AtLeastOnce,
        false,
    )
    .await;

    let route = "messaging_destination_template=\"sensors/+/temperature\"";
    let samples = scrape_until(port, WAIT, |samples| {
        sum(samples, "messaging_client_handled_messages", route) >= 100.0
            && sum(samples, "messaging_client_decode_failures", route) >= 1.0
    })
    .await
    .unwrap_or_else(|| panic!("the counters reach 100 and 1: {:?}", scrape(port)));
    assert_eq!(
        count(sum(&samples, "messaging_client_handled_messages", route)),
        100
    );
    assert_eq!(
        count(sum(&samples, "messaging_client_consumed_messages", route)),
        101
    );
    assert_eq!(
        count(sum(
            &samples,
            "messaging_client_decode_failures",
            "reason=\"not_json\""
        )),
        1
    );
    assert_eq!(
        count(sum(&samples, "messaging_client_failed_messages", route)),
        1
    );
    assert_eq!(count(sum(&samples, "messaging_client_connections", "")), 1);
    let topics: Vec<&String> = samples
        .keys()
        .filter(|series| series.contains("room"))
        .collect();
    assert!(
        topics.is_empty(),
        "no concrete topic as a label: {topics:?}"
    );

    example.start_kill().expect("stop the example");
    let _ = example.wait().await;
}
