#![allow(
    clippy::items_after_statements,
    clippy::unnecessary_wraps,
    clippy::type_complexity
)]

use super::*;
use std::{
    convert::Infallible,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
};
use tokio::time::Instant;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_mqtt_core::{BoxError, HandlerError};

fn msg() -> Request<Envelope> {
    let env = Envelope::new("t", serde_json::json!({"n": 1})).unwrap();
    Request::builder("a/b").body(env).unwrap()
}

/// A handler answering the `n`th call with `script(n)`, recording when.
fn scripted(
    script: fn(usize) -> Result<Outcome, BoxError>,
) -> (
    Arc<Mutex<Vec<Instant>>>,
    impl Service<Request<Envelope>, Response = Outcome, Error = BoxError, Future: Send> + Clone,
) {
    let calls = Arc::new(Mutex::new(Vec::new()));
    let record = calls.clone();
    let svc = tower::service_fn(move |req: Request<Envelope>| {
        assert_eq!(req.body().data()["n"], 1, "each attempt gets the request");
        let n = {
            let mut calls = record.lock().unwrap();
            calls.push(Instant::now());
            calls.len() - 1
        };
        async move { script(n) }
    });
    (calls, svc)
}

fn retryable() -> Result<Outcome, BoxError> {
    Ok(Outcome::Failed(HandlerError::new("busy")))
}

#[tokio::test(start_paused = true)]
async fn retryable_failures_are_retried_until_handled() {
    let (calls, handler) = scripted(|n| {
        if n < 2 {
            retryable()
        } else {
            Ok(Outcome::Handled)
        }
    });
    let svc = MessageRetryLayer::new(3).layer(handler);
    assert!(matches!(
        svc.oneshot(msg()).await.unwrap(),
        Outcome::Handled
    ));
    assert_eq!(calls.lock().unwrap().len(), 3);
}

#[tokio::test(start_paused = true)]
async fn attempts_are_limited_and_the_last_failure_is_returned() {
    let (calls, handler) =
        scripted(|n| Ok(Outcome::Failed(HandlerError::new(format!("busy {n}")))));
    let svc = MessageRetryLayer::new(3).layer(handler);
    let outcome = svc.oneshot(msg()).await.unwrap();
    assert_eq!(outcome.error().unwrap().to_string(), "busy 2");
    assert_eq!(calls.lock().unwrap().len(), 3);
}

#[tokio::test(start_paused = true)]
async fn errors_of_the_inner_service_are_retried() {
    let (calls, handler) = scripted(|n| {
        if n == 0 {
            Err("connection reset".into())
        } else {
            Ok(Outcome::Handled)
        }
    });
    let svc = MessageRetryLayer::new(2).layer(handler);
    assert!(matches!(
        svc.oneshot(msg()).await.unwrap(),
        Outcome::Handled
    ));
    assert_eq!(calls.lock().unwrap().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn final_outcomes_are_not_retried() {
    for script in [
        (|_| Ok(Outcome::Failed(HandlerError::permanent("bad input")))) as fn(usize) -> _,
        |_| Ok(Outcome::Handled),
        |_| Ok(Outcome::Duplicate),
        |_| Ok(Outcome::Unrouted),
    ] {
        let (calls, handler) = scripted(script);
        MessageRetryLayer::new(5)
            .layer(handler)
            .oneshot(msg())
            .await
            .unwrap();
        assert_eq!(calls.lock().unwrap().len(), 1);
    }
}

#[tokio::test(start_paused = true)]
async fn backoff_doubles_up_to_the_maximum() {
    let (calls, handler) = scripted(|_| retryable());
    let svc = MessageRetryLayer::new(5)
        .backoff(Duration::from_millis(100), Duration::from_millis(300))
        .jitter(0.0)
        .layer(handler);
    svc.oneshot(msg()).await.unwrap();
    let calls = calls.lock().unwrap();
    let gaps: Vec<Duration> = calls.windows(2).map(|w| w[1] - w[0]).collect();
    assert_eq!(
        gaps,
        [100, 200, 300, 300].map(Duration::from_millis),
        "100 ms, doubled, capped at 300 ms"
    );
}

#[tokio::test(start_paused = true)]
async fn jitter_is_bounded_and_differs_between_messages() {
    // (tower computes the jitter of the whole seconds and of the fraction
    // of a backoff separately, truncating each: a backoff of exactly 1 s
    // gets none. Sub-second backoffs show it.)
    let layer = MessageRetryLayer::new(2)
        .backoff(Duration::from_millis(100), Duration::from_secs(10))
        .jitter(1.0);
    let mut first_gaps = Vec::new();
    for _ in 0..4 {
        let (calls, handler) = scripted(|_| retryable());
        layer.layer(handler).oneshot(msg()).await.unwrap();
        let calls = calls.lock().unwrap();
        let gap = calls[1] - calls[0];
        assert!(
            gap >= Duration::from_millis(100) && gap <= Duration::from_millis(200),
            "{gap:?}"
        );
        first_gaps.push(gap);
    }
    first_gaps.dedup();
    assert!(
        first_gaps.len() > 1,
        "every message got the same jitter: {first_gaps:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn an_empty_budget_stops_retries() {
    let (calls, handler) = scripted(|_| retryable());
    let svc = MessageRetryLayer::new(5)
        .budget(RetryBudget::new(Duration::from_secs(1), 0, 0.0))
        .layer(handler);
    assert!(svc.oneshot(msg()).await.unwrap().is_failed());
    assert_eq!(calls.lock().unwrap().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_budget_is_shared_by_services_of_one_layer() {
    // A reserve of 1 retry a second over 1 s, nothing earned by successes.
    let layer = MessageRetryLayer::new(2).budget(RetryBudget::new(Duration::from_secs(1), 1, 0.0));
    let (calls, handler) = scripted(|_| retryable());
    layer.layer(handler.clone()).oneshot(msg()).await.unwrap();
    layer.layer(handler).oneshot(msg()).await.unwrap();
    // The first message used the one retry; the second got none.
    assert_eq!(calls.lock().unwrap().len(), 3);
}

#[tokio::test(start_paused = true)]
async fn any_tower_budget_can_be_given() {
    use tower::retry::budget::TpsBudget;
    let layer = MessageRetryLayer::new(2).budget(TpsBudget::new(Duration::from_secs(1), 1, 0.0));
    let (calls, handler) = scripted(|_| retryable());
    layer.layer(handler.clone()).oneshot(msg()).await.unwrap();
    layer.layer(handler).oneshot(msg()).await.unwrap();
    assert_eq!(calls.lock().unwrap().len(), 3);
}

#[tokio::test(start_paused = true)]
async fn the_default_budget_allows_a_fifth_of_the_messages_plus_ten_a_second() {
    // Over a 10 s window: a reserve of 100, and 20 per 100 messages.
    let (calls, handler) = scripted(|_| retryable());
    let svc = MessageRetryLayer::new(2)
        .backoff(Duration::from_millis(1), Duration::from_millis(1))
        .layer(handler);
    for _ in 0..150 {
        svc.clone().oneshot(msg()).await.unwrap();
    }
    // 150 first attempts; retries for 100 + 150 / 5 = 130 of them.
    assert_eq!(calls.lock().unwrap().len(), 150 + 130);
}

#[tokio::test]
async fn a_single_attempt_clones_nothing_and_retries_nothing() {
    let (calls, handler) = scripted(|_| retryable());
    let layer = MessageRetryLayer::new(1);
    let mut policy = layer.policy().clone();
    assert!(Policy::<_, Outcome, BoxError>::clone_request(&mut policy, &msg()).is_none());
    assert!(layer
        .layer(handler)
        .oneshot(msg())
        .await
        .unwrap()
        .is_failed());
    assert_eq!(calls.lock().unwrap().len(), 1);
    assert_eq!(MessageRetryPolicy::new(0).max_attempts(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_timed_out_attempt_is_retried_with_a_fresh_timeout() {
    // Retry -> Timeout -> a handler that hangs on its first attempt.
    let attempts = Arc::new(AtomicUsize::new(0));
    let counter = attempts.clone();
    let svc = ServiceBuilder::new()
        .layer(MessageRetryLayer::new(2))
        .timeout(Duration::from_secs(30))
        .service(tower::service_fn(move |_: Request<Envelope>| {
            let first = counter.fetch_add(1, Ordering::SeqCst) == 0;
            async move {
                if first {
                    std::future::pending::<()>().await;
                }
                Ok::<_, Infallible>(Outcome::Handled)
            }
        }));
    let started = Instant::now();
    assert!(matches!(
        svc.oneshot(msg()).await.unwrap(),
        Outcome::Handled
    ));
    assert_eq!(attempts.load(Ordering::SeqCst), 2);
    assert!(started.elapsed() >= Duration::from_secs(30));
}

#[test]
#[should_panic(expected = "maximum must not be less than minimum")]
fn an_inverted_backoff_fails_at_build_time() {
    let _ = MessageRetryLayer::new(3).backoff(Duration::from_secs(2), Duration::from_secs(1));
}

#[test]
#[should_panic(expected = "jitter must not be negative")]
fn a_negative_jitter_fails_at_build_time() {
    let _ = MessageRetryLayer::new(3).jitter(-1.0);
}
