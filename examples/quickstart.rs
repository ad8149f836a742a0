//! A small service on the standard stack that talks to itself.
//!
//! Without `MQTT_URL` it starts an in-process broker; with it, it uses that
//! broker. It routes three topics, publishes a few envelopes to itself, prints
//! what each handler saw, shuts down gracefully and exits 0.
//!
//! ```sh
//! cargo run --example quickstart
//! MQTT_URL=mqtt://localhost:1883 cargo run --example quickstart
//! ```

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::mpsc;
use tower_mqtt::{
    config::Config, embedded::EmbeddedBroker, BoxError, Client, Data, Envelope, QoS, Request,
    Router, Subscription, TopicParams,
};

#[derive(Serialize, Deserialize)]
struct Say {
    text: String,
}

#[derive(Serialize, Deserialize)]
struct Chunk {
    seq: u32,
    delta: String,
}

/// Three routes; each handler reports what it saw to `seen_tx`.
fn router(seen_tx: mpsc::UnboundedSender<String>) -> Router {
    let on_say = {
        let seen = seen_tx.clone();
        move |Data(say): Data<Say>| {
            let _ = seen.send(format!("tts/say        -> say {:?}", say.text));
            std::future::ready(())
        }
    };
    let on_frame = {
        let seen = seen_tx.clone();
        move |req: Request<Envelope>| {
            let camera = req
                .extensions()
                .get::<TopicParams>()
                .and_then(|p| p.get(0))
                .unwrap_or("?")
                .to_owned();
            let _ = seen.send(format!(
                "camera/+/frame -> frame from camera {camera:?}, id {}",
                req.body().id()
            ));
            std::future::ready(())
        }
    };
    let on_chunk = move |Data(chunk): Data<Chunk>| {
        let _ = seen_tx.send(format!(
            "llm/stream     -> chunk {} {:?}",
            chunk.seq, chunk.delta
        ));
        std::future::ready(())
    };

    Router::new()
        .route("tts/say", on_say)
        .route("camera/+/frame", on_frame)
        .route(
            Subscription::new("llm/stream").qos(QoS::AtMostOnce),
            on_chunk,
        )
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("quickstart failed: {err}");
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

    // Without MQTT_URL, an in-process broker stands in.
    let embedded;
    let url = match std::env::var("MQTT_URL") {
        Ok(url) if !url.trim().is_empty() => url,
        _ => {
            embedded = EmbeddedBroker::start()?;
            println!(
                "no MQTT_URL: started an embedded broker at {}",
                embedded.url()
            );
            embedded.url()
        }
    };
    let config = Config::from_lookup(|var| match var {
        "MQTT_URL" => Some(url.clone()),
        "MQTT_SOURCE_NAME" => std::env::var(var).ok().or(Some("quickstart".into())),
        _ => std::env::var(var).ok(),
    })?;

    // Each handler reports what it saw; main prints it.
    let (seen_tx, mut seen) = mpsc::unbounded_channel::<String>();
    let running = Client::new(config.clone())?.spawn(router(seen_tx), config.inbound_stack());
    tokio::time::timeout(Duration::from_secs(10), running.ready()).await?;
    println!("connected to {} as {}", config.broker, config.client_id);

    let publisher = running.publisher();
    publisher
        .publish(
            "tts/say",
            Envelope::new(
                "tts.say",
                Say {
                    text: "hello, fleet".into(),
                },
            )?,
        )
        .await?;
    publisher
        .publish(
            "camera/front/frame",
            Envelope::new("camera.frame", json!({"w": 640, "h": 480}))?,
        )
        .await?;
    // A stream: chunks share the request's id and carry `data.seq`.
    let request = Envelope::new("llm.request", json!({"text": "say hi"}))?;
    for (seq, delta) in ["Hel", "lo", "!"].into_iter().enumerate() {
        let chunk = Envelope::reply_to(
            &request,
            "llm.stream",
            Chunk {
                seq: u32::try_from(seq)?,
                delta: delta.into(),
            },
        )?;
        let req = Request::builder("llm/stream")
            .qos(QoS::AtMostOnce)
            .body(chunk)?;
        publisher.send(req).await?;
    }
    // The same envelope again: the dedup layer recognises it.
    let twice = Envelope::new(
        "tts.say",
        Say {
            text: "only once".into(),
        },
    )?;
    publisher.publish("tts/say", twice.clone()).await?;
    publisher.publish("tts/say", twice).await?;

    let expected = 6;
    for _ in 0..expected {
        let line = tokio::time::timeout(Duration::from_secs(10), seen.recv())
            .await?
            .ok_or("handlers stopped")?;
        println!("{line}");
    }

    let report = running.shutdown().await;
    println!(
        "shut down: received {}, handled {}, duplicates {}, failed {}; clean disconnect: {}",
        report.stats.received,
        report.stats.handled,
        report.stats.duplicates,
        report.stats.failed,
        report.disconnected_cleanly
    );
    Ok(())
}
