#![allow(
    clippy::items_after_statements,
    clippy::unnecessary_wraps,
    clippy::type_complexity
)]

use super::*;
use crate::{correlation_span::CorrelationSpanLayer, test_util::capture};
use serde_json::json;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::{sync::Arc, time::Duration};
use tower::ServiceBuilder;
use tower::ServiceExt;
use tower_test::mock;
use tracing::Level;

const ID: &str = "3f1c9b1e8a2d4c6f9e0b7a5d4c3b2a19";

fn msg() -> Request<Envelope> {
    let env = Envelope::new("tts.say", json!({"text": "hi"}))
        .unwrap()
        .with_id(ID);
    Request::builder("tts/say").body(env).unwrap()
}

#[tokio::test]
async fn errors_become_failed_outcomes_logged_once_inside_the_span() {
    let (logs, _guard) = capture();
    let svc = ServiceBuilder::new()
        .layer(CorrelationSpanLayer::new())
        .layer(IsolationLayer::new())
        .service(tower::service_fn(|_: Request<Envelope>| async {
            Err::<Outcome, _>(std::io::Error::other("db down"))
        }));
    let outcome = svc.oneshot(msg()).await.unwrap();
    let err = outcome.error().unwrap();
    assert_eq!(err.to_string(), "db down");
    assert!(err.is_retryable());
    let errors = logs.at(Level::ERROR);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].message(), "message failed");
    assert_eq!(errors[0].fields["error"], "db down");
    assert_eq!(errors[0].fields["topic"], "tts/say");
    assert_eq!(
        errors[0].span("mqtt.message").unwrap()["correlation_id"],
        ID
    );
}

#[tokio::test]
async fn failed_outcomes_are_logged_and_keep_their_classification() {
    let (logs, _guard) = capture();
    let svc = Isolation::new(tower::service_fn(|_: Request<Envelope>| async {
        Ok::<_, Infallible>(Outcome::Failed(HandlerError::permanent("unknown command")))
    }));
    let outcome = svc.oneshot(msg()).await.unwrap();
    assert!(!outcome.error().unwrap().is_retryable());
    let errors = logs.at(Level::ERROR);
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].fields["retryable"], "false");

    // A permanent error boxed by a layer in between is recovered.
    let svc = Isolation::new(tower::service_fn(|_: Request<Envelope>| async {
        Err::<Outcome, BoxError>(HandlerError::permanent("bad").into())
    }));
    assert!(!svc
        .oneshot(msg())
        .await
        .unwrap()
        .error()
        .unwrap()
        .is_retryable());
}

#[tokio::test]
async fn successes_are_not_logged_as_errors() {
    let (logs, _guard) = capture();
    let svc = Isolation::new(tower::service_fn(|_: Request<Envelope>| async {
        Ok::<_, Infallible>(())
    }));
    assert!(matches!(
        svc.oneshot(msg()).await.unwrap(),
        Outcome::Handled
    ));
    assert!(logs.at(Level::ERROR).is_empty());
}

#[derive(Clone)]
struct Panics {
    in_ready: Arc<AtomicUsize>,
    in_call: Arc<AtomicUsize>,
}

impl Service<Request<Envelope>> for Panics {
    type Response = Outcome;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Outcome, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        assert!(
            self.in_ready.fetch_sub(1, Ordering::SeqCst) != 1,
            "poll_ready blew up"
        );
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Envelope>) -> Self::Future {
        assert!(
            self.in_call.fetch_sub(1, Ordering::SeqCst) != 1,
            "call blew up"
        );
        Box::pin(async move {
            assert!(!req.body().data().contains_key("boom"), "future blew up");
            Ok(Outcome::Handled)
        })
    }
}

#[tokio::test]
async fn panics_anywhere_fail_one_message_only() {
    let (logs, _guard) = capture();
    let panics = Panics {
        in_ready: Arc::new(AtomicUsize::new(0)),
        in_call: Arc::new(AtomicUsize::new(0)),
    };
    let mut svc = Isolation::new(panics.clone());
    async fn send_one(svc: &mut Isolation<Panics>, req: Request<Envelope>) -> Outcome {
        svc.ready().await.unwrap().call(req).await.unwrap()
    }

    panics.in_ready.store(1, Ordering::SeqCst);
    let outcome = send_one(&mut svc, msg()).await;
    assert_eq!(
        outcome.error().unwrap().to_string(),
        "handler panicked: poll_ready blew up"
    );
    assert!(matches!(send_one(&mut svc, msg()).await, Outcome::Handled));

    panics.in_call.store(1, Ordering::SeqCst);
    let outcome = send_one(&mut svc, msg()).await;
    assert_eq!(
        outcome.error().unwrap().to_string(),
        "handler panicked: call blew up"
    );
    assert!(matches!(send_one(&mut svc, msg()).await, Outcome::Handled));

    let mut boom = msg();
    boom.body_mut().data_mut().insert("boom".into(), json!(1));
    let outcome = send_one(&mut svc, boom).await;
    assert_eq!(
        outcome.error().unwrap().to_string(),
        "handler panicked: future blew up"
    );
    assert!(outcome.error().unwrap().is_retryable());
    assert!(matches!(send_one(&mut svc, msg()).await, Outcome::Handled));

    assert_eq!(logs.at(Level::ERROR).len(), 3);
}

#[tokio::test]
async fn a_readiness_error_fails_the_next_message_only() {
    let (mock, mut handle) = mock::pair::<Request<Envelope>, Outcome>();
    let mut svc = Isolation::new(mock);
    handle.send_error(std::io::Error::other("not ready"));
    let outcome = svc.ready().await.unwrap().call(msg()).await.unwrap();
    assert_eq!(outcome.error().unwrap().to_string(), "not ready");

    handle.allow(1);
    let call = svc.ready().await.unwrap().call(msg());
    let (_, respond) = handle.next_request().await.unwrap();
    respond.send_response(Outcome::Handled);
    assert!(matches!(call.await.unwrap(), Outcome::Handled));
}

#[tokio::test(start_paused = true)]
async fn a_timeout_in_between_is_a_retryable_failure() {
    // Isolation -> ConcurrencyLimit -> Timeout -> a handler that hangs.
    let svc = ServiceBuilder::new()
        .layer(IsolationLayer::new())
        .concurrency_limit(1)
        .timeout(Duration::from_secs(30))
        .service(tower::service_fn(|_: Request<Envelope>| async {
            std::future::pending::<Result<Outcome, Infallible>>().await
        }));
    let outcome = svc.oneshot(msg()).await.unwrap();
    let err = outcome.error().unwrap();
    assert!(crate::timeout::is_timeout(err));
    assert!(err.is_retryable());
}
