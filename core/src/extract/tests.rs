use std::sync::{Arc, Mutex};

use serde_json::json;
use tower::ServiceExt;

use super::*;
use crate::{Outcome, Router};

fn msg(topic: &str, data: serde_json::Value) -> Request<Envelope> {
    Request::builder(topic)
        .body(Envelope::new("test.event", data).unwrap())
        .unwrap()
}

type Log = Arc<Mutex<Vec<String>>>;

#[derive(serde::Deserialize)]
struct Text {
    text: String,
}

async fn run(router: Router, req: Request<Envelope>) -> Outcome {
    router.oneshot(req).await.unwrap()
}

#[tokio::test]
async fn extractors_combine_in_any_order_with_the_message_last() {
    async fn handler(
        State(log): State<Log>,
        Wildcards((room, n)): Wildcards<(String, u32)>,
        qos: QoS,
        Data(Text { text }): Data<Text>,
        req: Request<Envelope>,
    ) {
        log.lock().unwrap().push(format!(
            "{room} {n} {} {text} {}",
            u8::from(qos),
            req.topic()
        ));
    }
    let log = Log::default();
    let router = Router::new()
        .route("rooms/+/sensors/+", handler)
        .with_state(log.clone());
    let outcome = run(router, msg("rooms/hall/sensors/7", json!({"text": "hi"}))).await;
    assert!(matches!(outcome, Outcome::Handled), "{outcome:?}");
    assert_eq!(*log.lock().unwrap(), ["hall 7 1 hi rooms/hall/sensors/7"]);
}

#[tokio::test]
async fn a_part_of_the_state_is_taken_with_from_ref() {
    #[derive(Clone)]
    struct App {
        log: Log,
    }
    impl FromRef<App> for Log {
        fn from_ref(app: &App) -> Self {
            app.log.clone()
        }
    }
    async fn handler(State(log): State<Log>, envelope: Envelope) {
        log.lock().unwrap().push(envelope.event_type().to_owned());
    }
    let log = Log::default();
    let router = Router::new()
        .route("a", handler)
        .with_state(App { log: log.clone() });
    assert!(matches!(
        run(router, msg("a", json!({}))).await,
        Outcome::Handled
    ));
    assert_eq!(*log.lock().unwrap(), ["test.event"]);
}

#[tokio::test]
async fn a_failed_extractor_is_a_permanent_failure_that_names_it() {
    async fn wants_number(Wildcard(n): Wildcard<u32>) {
        let _ = n;
    }
    async fn wants_extension(Extension(n): Extension<u64>) {
        let _ = n;
    }
    let router = Router::new()
        .route("n/+", wants_number)
        .route("ext", wants_extension);
    let outcome = run(router.clone(), msg("n/seven", json!({}))).await;
    let err = outcome.error().expect("a failure");
    assert!(!err.is_retryable());
    assert!(err.to_string().contains("\"seven\""), "{err}");
    let outcome = run(router, msg("ext", json!({}))).await;
    assert!(outcome.error().unwrap().to_string().contains("u64"));
}

#[tokio::test]
async fn wildcard_counts_must_match() {
    async fn one(Wildcard(_v): Wildcard<String>) {}
    let router = Router::new().route("a/+/b/+", one);
    let outcome = run(router, msg("a/x/b/y", json!({}))).await;
    assert!(outcome.error().unwrap().to_string().contains("exactly one"));
}

#[tokio::test]
async fn handlers_without_arguments_and_with_results() {
    async fn none() {}
    async fn fails(Data(Text { text }): Data<Text>) -> crate::handler::HandlerResult {
        let _n: u32 = text.parse()?;
        Ok(())
    }
    let router = Router::new().route("none", none).route("fails", fails);
    assert!(matches!(
        run(router.clone(), msg("none", json!({}))).await,
        Outcome::Handled
    ));
    let outcome = run(router, msg("fails", json!({"text": "x"}))).await;
    assert!(outcome.error().unwrap().is_retryable());
}

#[tokio::test]
async fn topic_name_and_params_are_extractors() {
    async fn handler(State(log): State<Log>, topic: TopicName, params: TopicParams) {
        log.lock()
            .unwrap()
            .push(format!("{topic} {}", params.get(0).unwrap_or_default()));
    }
    let log = Log::default();
    let router = Router::new()
        .route("cam/#", handler)
        .with_state(log.clone());
    run(router, msg("cam/front/frame", json!({}))).await;
    assert_eq!(*log.lock().unwrap(), ["cam/front/frame front/frame"]);
}

#[tokio::test]
async fn the_correlation_id_is_the_one_set_else_the_envelope_id() {
    async fn handler(State(log): State<Log>, id: CorrelationId) {
        log.lock().unwrap().push(id.to_string());
    }
    let log = Log::default();
    let router = Router::new().route("a", handler).with_state(log.clone());
    let unset = msg("a", json!({}));
    let envelope_id = unset.body().id().to_owned();
    run(router.clone(), unset).await;
    let mut set = msg("a", json!({}));
    set.set_correlation_id(CorrelationId::new("c-7"));
    run(router, set).await;
    assert_eq!(*log.lock().unwrap(), [envelope_id, "c-7".to_owned()]);
}

#[tokio::test]
async fn fields_asked_for_as_extensions_fail_with_directions() {
    let router = Router::new()
        .route("params", |_: Extension<TopicParams>| async {})
        .route("id", |_: Extension<CorrelationId>| async {})
        .route("other", |_: Extension<u8>| async {});
    for (topic, says) in [
        ("params", "take `TopicParams` as a handler argument"),
        ("id", "take `CorrelationId` as a handler argument"),
        ("other", "no u8 in the extensions of the message on other"),
    ] {
        let mut req = msg(topic, json!({}));
        req.set_correlation_id(CorrelationId::new("c-1"));
        let outcome = run(router.clone(), req).await;
        let err = outcome.error().unwrap();
        assert!(!err.is_retryable());
        assert!(err.to_string().contains(says), "{err}");
        if topic == "other" {
            assert!(!err.to_string().contains("handler argument"), "{err}");
        }
    }
}

#[tokio::test]
async fn properties_are_the_requests_and_empty_without_them() {
    async fn handler(State(log): State<Log>, props: Properties) {
        let tenants: Vec<_> = props.user_property_values("tenant").collect();
        log.lock().unwrap().push(format!(
            "{} {:?} {:?}",
            tenants.join(","),
            props.response_topic,
            props.correlation_data
        ));
    }
    let log = Log::default();
    let router = Router::new().route("a", handler).with_state(log.clone());
    let mut with = msg("a", json!({}));
    let props = with.properties_mut();
    props
        .add_user_property("tenant", "acme")
        .add_user_property("other", "x")
        .add_user_property("tenant", "globex");
    props.response_topic = Some("replies/a".into());
    props.correlation_data = Some(bytes::Bytes::from_static(b"c-1"));
    assert!(matches!(run(router.clone(), with).await, Outcome::Handled));
    assert!(matches!(
        run(router, msg("a", json!({}))).await,
        Outcome::Handled
    ));
    assert_eq!(
        *log.lock().unwrap(),
        [
            "acme,globex Some(\"replies/a\") Some(b\"c-1\")",
            " None None"
        ]
    );
}
