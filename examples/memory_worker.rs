//! The fleet's memory worker, whole MQTT surface: it remembers what was heard
//! and said, answers queries, and keeps the character.
//!
//! - `stt/final`, `tts/say` (`{"text"}`): remembered.
//! - `memory/query` (`{"text", "top_k"?}`): answered on `memory/results`
//!   (QoS 1, `memory.results`, the request's id) with
//!   `{"query", "results": [{"document", "score"}], "k"}`.
//! - `character/get`: answered on `character/result` (QoS 0, the request's id).
//! - `character/update` (`{"trait", "value"}`): changes a trait and re-publishes
//!   the retained `system/character/current`, which is also published after
//!   every connect.
//! - Health is retained on `system/health/memory` (ready, shutdown, Last Will);
//!   malformed input is logged and survived; SIGTERM exits 0 after a graceful
//!   shutdown.
//!
//! ```sh
//! cargo run --example memory_worker                                 # embedded broker
//! MQTT_URL=mqtt://localhost:1883 cargo run --example memory_worker
//! ```

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tower_mqtt::{
    config::Config, embedded::EmbeddedBroker, handler::HandlerResult, BoxError, Data, Envelope,
    Publisher, QoS, Request, Router, State,
};

// ---- The MQTT surface: what the topics carry, the handlers, the service ----

#[derive(Deserialize)]
struct Text {
    text: String,
}

#[derive(Deserialize)]
struct Query {
    text: String,
    top_k: Option<usize>,
}

#[derive(Deserialize)]
struct TraitUpdate {
    r#trait: String,
    value: Value,
}

type Memory = State<Arc<Store>>;

async fn remember(State(store): Memory, Data(heard): Data<Text>) {
    store.remember(heard.text);
}

async fn query(
    State(store): Memory,
    out: Publisher,
    Data(q): Data<Query>,
    req: Request<Envelope>,
) -> HandlerResult {
    let k = q.top_k.unwrap_or(5);
    let data = json!({"query": q.text, "results": store.search(&q.text, k), "k": k});
    out.publish("memory/results", data).reply_to(&req).await
}

async fn character(State(store): Memory, out: Publisher, req: Request<Envelope>) -> HandlerResult {
    let data = store.character();
    out.publish("character/result", data)
        .qos(QoS::AtMostOnce)
        .reply_to(&req)
        .await
}

async fn update(State(store): Memory, out: Publisher, Data(c): Data<TraitUpdate>) -> HandlerResult {
    store.set_trait(c.r#trait, c.value);
    publish_character(out, store).await
}

async fn publish_character(out: Publisher, store: Arc<Store>) -> HandlerResult {
    out.publish("system/character/current", store.character())
        .retain(true)
        .await
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let (url, _broker) = setup()?;
    let store = Arc::new(Store::new());
    let router = Router::new()
        .route("stt/final", remember)
        .route("tts/say", remember)
        .route("memory/query", query)
        .route("character/get", character)
        .route("character/update", update)
        .with_state(store.clone());
    let config = Config::new(&url)?
        .with_source_name("memory-worker")
        .with_health_name("memory")
        .with_health(true)
        .with_env()?;
    tower_mqtt::serve(config, router)
        .on_connect(move |out| publish_character(out, store.clone()))
        .with_graceful_shutdown(tower_mqtt::shutdown_signal())
        .await?;
    Ok(())
}

// ---- Running the example: logs, and a broker when MQTT_URL is not set ----

fn setup() -> Result<(String, Option<EmbeddedBroker>), BoxError> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,rumqttd=off".into());
    tracing_subscriber::fmt().with_env_filter(filter).init();
    match std::env::var("MQTT_URL") {
        Ok(url) if !url.trim().is_empty() => Ok((url, None)),
        _ => {
            let broker = EmbeddedBroker::start()?;
            println!(
                "no MQTT_URL: started an embedded broker at {}",
                broker.url()
            );
            Ok((broker.url(), Some(broker)))
        }
    }
}

// ---- The domain: a document store and the character (no MQTT) ---------

/// A document found by a query, with its score.
#[derive(Serialize)]
struct Hit {
    document: String,
    score: f64,
}

/// What the worker remembers, and the character it keeps.
struct Store {
    documents: Mutex<Vec<String>>,
    character: Mutex<Map<String, Value>>,
}

impl Store {
    fn new() -> Self {
        let character = json!({"name": "TARS", "humor": 75, "honesty": 90});
        Self {
            documents: Mutex::default(),
            character: Mutex::new(character.as_object().cloned().unwrap_or_default()),
        }
    }

    fn remember(&self, text: String) {
        if !text.trim().is_empty() {
            self.documents.lock().expect("store").push(text);
        }
    }

    /// The `k` documents sharing most words with `query`, best first; the
    /// score is the share of the query's words found.
    fn search(&self, query: &str, k: usize) -> Vec<Hit> {
        let words: Vec<String> = query.split_whitespace().map(str::to_lowercase).collect();
        let documents = self.documents.lock().expect("store");
        let mut scored: Vec<(String, f64)> = documents
            .iter()
            .map(|document| {
                let lower = document.to_lowercase();
                let found = words.iter().filter(|w| lower.contains(w.as_str())).count();
                #[allow(clippy::cast_precision_loss)] // word counts are small
                let score = found as f64 / words.len().max(1) as f64;
                (document.clone(), score)
            })
            .filter(|(_, score)| *score > 0.0)
            .collect();
        scored.sort_by(|a, b| b.1.total_cmp(&a.1));
        scored.truncate(k);
        scored
            .into_iter()
            .map(|(document, score)| Hit { document, score })
            .collect()
    }

    fn character(&self) -> Value {
        Value::Object(self.character.lock().expect("character").clone())
    }

    fn set_trait(&self, name: String, value: Value) {
        self.character
            .lock()
            .expect("character")
            .insert(name, value);
    }
}
