//! A service whose metrics Prometheus scrapes.
//!
//! It installs `metrics-exporter-prometheus` as the recorder of the `metrics`
//! facade, serving `/metrics` on `METRICS_ADDR` (default `127.0.0.1:9464`),
//! then serves two routes. Every message and connection is counted per route
//! (`tower_mqtt::metrics` lists the names; `docs/OBSERVABILITY.md` has their
//! labels and alert rules). Without `MQTT_URL` it starts an in-process broker.
//! It runs until SIGINT or SIGTERM.
//!
//! ```sh
//! cargo run --example metrics
//! curl -s http://127.0.0.1:9464/metrics | grep messaging_
//! ```

use std::net::SocketAddr;

use metrics_exporter_prometheus::PrometheusBuilder;
use serde::Deserialize;
use tower_mqtt::{
    config::Config, embedded::EmbeddedBroker, extract::Wildcard, BoxError, Data, Router,
};

#[derive(Deserialize)]
struct Reading {
    celsius: f64,
}

async fn temperature(Wildcard(room): Wildcard<String>, Data(reading): Data<Reading>) {
    tracing::debug!(%room, celsius = reading.celsius, "temperature");
}

async fn job(Data(_job): Data<serde_json::Value>) {}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("metrics example failed: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), BoxError> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,tower_mqtt=info,rumqttd=off".into()),
        )
        .init();

    let addr: SocketAddr = std::env::var("METRICS_ADDR")
        .ok()
        .filter(|addr| !addr.trim().is_empty())
        .map_or(Ok(([127, 0, 0, 1], 9464).into()), |addr| {
            addr.trim().parse()
        })
        .map_err(|err| format!("METRICS_ADDR: {err}"))?;
    // Before serving: the service registers its metrics when it starts.
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .map_err(|err| format!("cannot serve metrics on {addr}: {err}"))?;
    println!("metrics on http://{addr}/metrics");

    let embedded = match std::env::var("MQTT_URL") {
        Ok(url) if !url.trim().is_empty() => None,
        _ => Some(EmbeddedBroker::start()?),
    };
    let default_url = embedded
        .as_ref()
        .map_or("mqtt://localhost:1883".to_owned(), EmbeddedBroker::url);
    let config = Config::new(&default_url)?
        .with_source_name("metrics-example")
        .with_env()?;
    println!("serving on {}", config.broker);

    let router = Router::new()
        .route("sensors/+/temperature", temperature)
        .route("jobs/run", job);
    tower_mqtt::serve(config, router)
        .with_graceful_shutdown(tower_mqtt::shutdown_signal())
        .await?;
    Ok(())
}
