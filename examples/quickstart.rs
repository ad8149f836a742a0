//! A small service on the inbound stack that talks to itself.
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

use serde::Deserialize;
use serde_json::json;
use tokio::sync::mpsc;
use tower_mqtt::{
    config::Config, embedded::EmbeddedBroker, extract::Wildcard, BoxError, Data, Envelope, QoS,
    Request, Router, State, Subscription,
};

#[derive(Deserialize)]
struct Say {
    text: String,
}

#[derive(Deserialize)]
struct Chunk {
    seq: u32,
    delta: String,
}

/// Where handlers report what they saw; `main` prints it.
type Seen = State<mpsc::UnboundedSender<String>>;

async fn say(State(seen): Seen, Data(say): Data<Say>) {
    let _ = seen.send(format!("tts/say        -> say {:?}", say.text));
}

async fn frame(State(seen): Seen, Wildcard(camera): Wildcard<String>, req: Request<Envelope>) {
    let id = req.body().id();
    let _ = seen.send(format!("camera/+/frame -> frame from {camera:?}, id {id}"));
}

async fn chunk(State(seen): Seen, Data(chunk): Data<Chunk>) {
    let _ = seen.send(format!(
        "llm/stream     -> chunk {} {:?}",
        chunk.seq, chunk.delta
    ));
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

    // Without MQTT_URL, an in-process broker stands in; with it, MQTT_URL
    // (like every MQTT_* variable) overrides what the code says.
    let no_url = std::env::var("MQTT_URL").map_or(true, |url| url.trim().is_empty());
    let embedded = if no_url {
        Some(EmbeddedBroker::start()?)
    } else {
        None
    };
    if let Some(broker) = &embedded {
        println!(
            "no MQTT_URL: started an embedded broker at {}",
            broker.url()
        );
    }
    let url = embedded
        .as_ref()
        .map_or("mqtt://localhost:1883".to_owned(), EmbeddedBroker::url);
    let config = Config::new(&url)?
        .with_source_name("quickstart")
        .with_env()?;

    let (seen_tx, mut seen) = mpsc::unbounded_channel::<String>();
    let router = Router::new()
        .route("tts/say", say)
        .route("camera/+/frame", frame)
        .route(Subscription::new("llm/stream").qos(QoS::AtMostOnce), chunk)
        .with_state(seen_tx);
    let broker = config.broker.to_string();
    let running = tower_mqtt::serve(config, router).spawn()?;
    tokio::time::timeout(Duration::from_secs(10), running.ready()).await??;
    println!("connected to {broker}");

    let out = running.publisher();
    out.publish("tts/say", json!({"text": "hello, fleet"}))
        .await?;
    out.publish("camera/front/frame", json!({"w": 640, "h": 480}))
        .await?;
    // A stream: chunks share the request's id and carry `data.seq`.
    let request = Request::builder("llm/request")
        .body(Envelope::new("llm.request", json!({"text": "say hi"}))?)?;
    for (seq, delta) in ["Hel", "lo", "!"].into_iter().enumerate() {
        out.publish("llm/stream", json!({"seq": seq, "delta": delta}))
            .qos(QoS::AtMostOnce)
            .reply_to(&request)
            .await?;
    }
    // The same envelope twice: the dedup layer recognises the second.
    let twice = Envelope::new("tts.say", json!({"text": "only once"}))?;
    // A whole envelope is sent with `send`; `publish` would wrap it as data.
    out.send(Request::builder("tts/say").body(twice.clone())?)
        .await?;
    out.send(Request::builder("tts/say").body(twice)?).await?;

    for _ in 0..6 {
        let line = tokio::time::timeout(Duration::from_secs(10), seen.recv())
            .await?
            .ok_or("handlers stopped")?;
        println!("{line}");
    }

    // The second copy is recognised, not handled: wait until it has been.
    tokio::time::timeout(Duration::from_secs(10), async {
        while running.stats().duplicates == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await?;

    let report = running.shutdown().await;
    let stats = report.stats;
    println!(
        "shut down: received {}, handled {}, duplicates {}, failed {}; clean disconnect: {}",
        stats.received, stats.handled, stats.duplicates, stats.failed, report.disconnected_cleanly
    );
    Ok(())
}
