//! The publishers under test in the publish scenario: confirmed QoS 1
//! messages to a topic nobody subscribes to, each counted when the broker's
//! PUBACK for it has arrived.
//!
//! - [`PublisherKind::Raw`]: the rumqttc feeder every consumer gets;
//! - [`PublisherKind::Publisher`]: tower-mqtt's `Publisher::publish`, 100 at
//!   a time, each awaiting its own confirmation (as `benches/publish.rs`),
//!   given the data and wrapping it in an envelope;
//! - [`PublisherKind::Stack`]: `Publisher::send` with an envelope built
//!   beforehand; both go through the outbound stack (correlate, encode, size
//!   guard, retry, confirmation).
//!
//! Each side builds a fresh envelope per message (an id, a timestamp, the
//! `seq` and the pad), as a service does.

use std::time::Duration;

use futures_util::{stream, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::time::timeout;
use tower_mqtt::{
    config::{Config, Protocol},
    BoxError, Client, Envelope, QoS, Request, Router,
};

use crate::{
    broker::HOST,
    child::{failed, ChildReport, ChildSpec, Status, CONNECT_LIMIT, STOP_LIMIT},
    feed::Feeder,
    load::{now_epoch, EVENT_TYPE, PAD, PUBLISH_TOPIC},
    measure::{cpu_seconds, peak_rss_kb},
};

/// Publishes awaiting confirmation at once on the tower-mqtt sides.
const IN_FLIGHT: usize = 100;

/// Which publisher runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum PublisherKind {
    /// rumqttc, counting PUBACKs on its event loop.
    Raw,
    /// `Publisher::publish`.
    Publisher,
    /// The outbound stack in front of the `Publisher`.
    Stack,
}

impl PublisherKind {
    /// Every publisher, raw first.
    pub(crate) const ALL: [Self; 3] = [Self::Raw, Self::Publisher, Self::Stack];

    /// The name in the table.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Raw => "raw rumqttc",
            Self::Publisher => "tower-mqtt Publisher",
            Self::Stack => "tower-mqtt send (request)",
        }
    }
}

/// Publishes `spec.messages` confirmed messages and reports.
pub(crate) async fn run(spec: &ChildSpec, kind: PublisherKind) -> Option<ChildReport> {
    let limit = Duration::from_secs_f64(spec.deadline_s);
    Some(match kind {
        PublisherKind::Raw => raw(spec, limit).await,
        PublisherKind::Publisher | PublisherKind::Stack => tower(spec, kind, limit).await,
    })
}

async fn raw(spec: &ChildSpec, limit: Duration) -> ChildReport {
    if spec.protocol != Protocol::V311 {
        return failed(format!(
            "the raw publisher speaks 3.1.1, not {}",
            spec.protocol
        ));
    }
    let mut feeder = match Feeder::connect(spec.port, &spec.client_id).await {
        Ok(feeder) => feeder,
        Err(err) => return failed(err),
    };
    let cpu_start = cpu_seconds();
    let fed = feeder
        .run(
            PUBLISH_TOPIC,
            rumqttc::QoS::AtLeastOnce,
            spec.messages,
            None,
            limit,
        )
        .await;
    let cpu_s = cpu_seconds() - cpu_start;
    feeder.close().await;
    match fed {
        Ok(fed) => ChildReport {
            received: fed.sent,
            unique: fed.sent,
            start_epoch: fed.first_epoch,
            end_epoch: Some(fed.last_epoch),
            cpu_s,
            peak_rss_kb: peak_rss_kb(),
            ..ChildReport::default()
        },
        Err(err) => failed(err),
    }
}

async fn tower(spec: &ChildSpec, kind: PublisherKind, limit: Duration) -> ChildReport {
    let config = match Config::new(&format!("mqtt://{HOST}:{}", spec.port)) {
        Ok(config) => config
            .with_protocol(spec.protocol)
            .with_client_id(spec.client_id.clone())
            .with_health(false)
            .with_heartbeat(false),
        Err(err) => return failed(err.to_string()),
    };
    let client = match Client::new(config) {
        Ok(client) => client,
        Err(err) => return failed(err.to_string()),
    };
    let running = client.serve(Router::new()).spawn().unwrap();
    if timeout(CONNECT_LIMIT, running.connected()).await.is_err() {
        return failed("not connected in time");
    }
    let publisher = running.publisher();
    let cpu_start = cpu_seconds();
    let start_epoch = now_epoch();
    let mut confirmed = 0;
    let mut error = None;
    let publishing = stream::iter(0..spec.messages)
        .map(|seq| {
            let publisher = publisher.clone();
            async move {
                let data = json!({"seq": seq, "pad": PAD});
                match kind {
                    PublisherKind::Publisher => {
                        publisher
                            .publish(PUBLISH_TOPIC, data)
                            .event_type(EVENT_TYPE)
                            .await
                    }
                    PublisherKind::Raw | PublisherKind::Stack => {
                        let req = Request::builder(PUBLISH_TOPIC)
                            .qos(QoS::AtLeastOnce)
                            .body(Envelope::new(EVENT_TYPE, data)?)?;
                        publisher.send(req).await
                    }
                }
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .for_each(|result: Result<(), BoxError>| {
            match result {
                Ok(()) => confirmed += 1,
                Err(err) => {
                    error.get_or_insert_with(|| err.to_string());
                }
            }
            std::future::ready(())
        });
    let finished = timeout(limit, publishing).await.is_ok();
    let end_epoch = now_epoch();
    let cpu_s = cpu_seconds() - cpu_start;
    let _ = timeout(STOP_LIMIT, running.shutdown()).await;
    let status = match (finished, error) {
        (_, Some(err)) => Status::Error(err),
        (false, None) => Status::Timeout,
        (true, None) => Status::Ok,
    };
    ChildReport {
        status,
        received: confirmed,
        unique: confirmed,
        start_epoch,
        end_epoch: Some(end_epoch),
        cpu_s,
        peak_rss_kb: peak_rss_kb(),
        ..ChildReport::default()
    }
}
