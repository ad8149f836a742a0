#![allow(clippy::type_complexity)]

use super::*;
use crate::{isolation::IsolationLayer, test_util::capture};
use serde_json::json;
use std::convert::Infallible;
use tokio::sync::mpsc;
use tower::Layer;
use tower_mqtt_core::Outcome;
use tower_test::mock;
use tracing::Level;

const ID: &str = "3f1c9b1e8a2d4c6f9e0b7a5d4c3b2a19";

fn msg() -> Request<Envelope> {
    let env = Envelope::new("tts.say", json!({"text": "hi"}))
        .unwrap()
        .with_id(ID);
    Request::builder("tts/say").body(env).unwrap()
}

/// A sink that hands dead letters to a channel.
fn channel_sink() -> (
    impl Service<Request<Envelope>, Response = (), Error = BoxError, Future: Send>
        + Clone
        + Send
        + 'static,
    mpsc::UnboundedReceiver<Request<Envelope>>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let sink = tower::service_fn(move |letter: Request<Envelope>| {
        let sent = tx.send(letter).map_err(|_| BoxError::from("closed"));
        async move { sent }
    });
    (sink, rx)
}

#[tokio::test]
async fn failed_envelopes_are_dead_lettered() {
    let (sink, mut letters) = channel_sink();
    let svc = IsolationLayer::new()
        .dead_letter(DeadLetter::new(sink).source("tts-worker"))
        .layer(tower::service_fn(|_: Request<Envelope>| async {
            Err::<Outcome, _>("speaker unplugged")
        }));
    let outcome = svc.oneshot(msg()).await.unwrap();
    assert!(outcome.is_failed());

    let letter = letters.recv().await.unwrap();
    assert_eq!(letter.topic(), DEFAULT_DEAD_LETTER_TOPIC);
    assert_eq!(letter.qos(), tower_mqtt_core::QoS::AtLeastOnce);
    let env = letter.body();
    assert_eq!(env.event_type(), DEAD_LETTER_TYPE);
    assert_eq!(env.id(), ID);
    assert_eq!(env.source(), "tts-worker");
    let data = Value::Object(env.data().clone());
    assert_eq!(data["topic"], "tts/say");
    assert_eq!(data["error"], "speaker unplugged");
    assert_eq!(data["payload"]["id"], ID);
    assert_eq!(data["payload"]["type"], "tts.say");
    assert_eq!(data["payload"]["data"], json!({"text": "hi"}));
    // The letter is itself a valid envelope on the wire.
    let decoded = Envelope::from_slice(&env.to_vec()).unwrap();
    assert_eq!((decoded.id(), decoded.event_type()), (ID, DEAD_LETTER_TYPE));
    assert_eq!(decoded.data()["payload"]["data"], json!({"text": "hi"}));
}

#[tokio::test]
async fn raw_payloads_are_dead_lettered_as_text() {
    let (sink, mut letters) = channel_sink();
    let svc = IsolationLayer::new()
        .dead_letter(DeadLetter::new(sink).topic("ops/dead"))
        .layer(tower::service_fn(|_: Request<Envelope>| async {
            Err::<Outcome, _>("nope")
        }));
    let mut req = msg();
    req.extensions_mut()
        .insert(RawPayload::new(Bytes::from_static(br#"{"text": "hi"}"#)));
    svc.oneshot(req).await.unwrap();
    let letter = letters.recv().await.unwrap();
    assert_eq!(letter.topic(), "ops/dead");
    assert_eq!(letter.body().data()["payload"], r#"{"text": "hi"}"#);
}

#[tokio::test]
async fn successes_are_not_dead_lettered() {
    let (sink, mut letters) = channel_sink();
    let svc = IsolationLayer::new()
        .dead_letter(DeadLetter::new(sink))
        .layer(tower::service_fn(|_: Request<Envelope>| async {
            Ok::<_, Infallible>(Outcome::Duplicate)
        }));
    assert!(matches!(
        svc.oneshot(msg()).await.unwrap(),
        Outcome::Duplicate
    ));
    tokio::task::yield_now().await;
    assert!(letters.try_recv().is_err());
}

#[tokio::test(start_paused = true)]
async fn a_stuck_or_failing_sink_delays_nothing_and_is_logged() {
    let (logs, _guard) = capture();
    let (stuck, mut sink_handle) = mock::pair::<Request<Envelope>, ()>();
    sink_handle.allow(1);
    let svc = IsolationLayer::new()
        .dead_letter(DeadLetter::new(stuck).timeout(Duration::from_secs(2)))
        .layer(tower::service_fn(|_: Request<Envelope>| async {
            Err::<Outcome, _>("nope")
        }));
    let started = tokio::time::Instant::now();
    assert!(svc.oneshot(msg()).await.unwrap().is_failed());
    assert_eq!(started.elapsed(), Duration::ZERO);
    let (letter, _never_answered) = sink_handle.next_request().await.unwrap();
    assert_eq!(letter.body().event_type(), DEAD_LETTER_TYPE);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let errors = logs.at(Level::ERROR);
    assert!(
        errors
            .iter()
            .any(|e| e.message() == "dead-lettering timed out"),
        "{errors:?}"
    );

    let failing = tower::service_fn(|_: Request<Envelope>| async {
        Err::<(), BoxError>("broker gone".into())
    });
    let svc = IsolationLayer::new()
        .dead_letter(DeadLetter::new(failing))
        .layer(tower::service_fn(|_: Request<Envelope>| async {
            Err::<Outcome, _>("nope")
        }));
    assert!(svc.oneshot(msg()).await.unwrap().is_failed());
    tokio::task::yield_now().await;
    let errors = logs.at(Level::ERROR);
    let failed = errors
        .iter()
        .find(|e| e.message() == "cannot dead-letter")
        .expect("the sink's error is logged");
    assert_eq!(failed.fields["error"], "broker gone");
}

#[tokio::test]
async fn the_letter_carries_the_failed_messages_correlation_id_and_scope() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let sink = tower::service_fn(move |letter: Request<Envelope>| {
        assert_eq!(letter.correlation_id().unwrap().as_str(), ID);
        tx.send(correlation::current()).unwrap();
        async { Ok::<_, BoxError>(()) }
    });
    let svc = IsolationLayer::new()
        .dead_letter(DeadLetter::new(sink))
        .layer(tower::service_fn(|_: Request<Envelope>| async {
            Err::<Outcome, _>("nope")
        }));
    svc.oneshot(msg()).await.unwrap();
    assert_eq!(rx.recv().await.unwrap().unwrap().as_str(), ID);
}

#[test]
fn without_a_runtime_dead_letters_are_logged_and_dropped() {
    let (logs, _guard) = capture();
    let (sink, mut letters) = channel_sink();
    let mut policy = DeadLetter::new(sink);
    let kept = policy.keep(&msg());
    policy.dead_letter(kept, &HandlerError::new("x"));
    assert!(letters.try_recv().is_err(), "nothing was sent");
    let errors = logs.at(Level::ERROR);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(
        errors[0].message(),
        "cannot dead-letter outside a tokio runtime"
    );
    assert_eq!(errors[0].fields["topic"], "mqtt/dead_letter");
}

#[test]
#[should_panic(expected = "invalid dead-letter topic \"dead/+\"")]
fn an_invalid_dead_letter_topic_fails_at_build_time() {
    let (sink, _letters) = channel_sink();
    let _ = DeadLetter::new(sink).topic("dead/+");
}
