use std::sync::{Arc, Mutex};

use serde_json::json;
use tower::{service_fn, ServiceExt};

use super::*;

fn msg(n: u64) -> Request<Envelope> {
    Request::builder("sensors/a/reading")
        .body(Envelope::new("sensor.reading", json!({ "n": n })).unwrap())
        .unwrap()
}

type Batches = Arc<Mutex<Vec<Vec<u64>>>>;

/// A batch service that records the `n`s of each batch it gets.
fn recorder() -> (
    Batches,
    impl Service<Batch, Response = (), Error = BoxError, Future: Send> + Clone + Send + 'static,
) {
    let batches: Batches = Arc::default();
    let log = batches.clone();
    let svc = service_fn(move |batch: Batch| {
        let ns = batch
            .iter()
            .map(|req| req.body().data()["n"].as_u64().unwrap())
            .collect();
        log.lock().unwrap().push(ns);
        std::future::ready(Ok::<_, BoxError>(()))
    });
    (batches, svc)
}

#[tokio::test(start_paused = true)]
async fn batches_are_at_most_max_messages_and_the_rest_goes_after_max_wait() {
    let (batches, svc) = recorder();
    let batching = BatchLayer::new(4, Duration::from_millis(50)).layer(svc);
    let calls: Vec<_> = (0..10).map(|n| batching.clone().oneshot(msg(n))).collect();
    let outcomes = futures_util::future::join_all(calls).await;
    assert!(outcomes
        .into_iter()
        .all(|o| matches!(o, Ok(Outcome::Handled))));
    assert_eq!(
        *batches.lock().unwrap(),
        [vec![0, 1, 2, 3], vec![4, 5, 6, 7], vec![8, 9]]
    );
}

#[tokio::test(start_paused = true)]
async fn a_lone_message_waits_at_most_max_wait() {
    let (batches, svc) = recorder();
    let batching = BatchLayer::new(100, Duration::from_millis(50)).layer(svc);
    let start = tokio::time::Instant::now();
    let outcome = batching.oneshot(msg(7)).await.unwrap();
    assert!(matches!(outcome, Outcome::Handled));
    assert_eq!(start.elapsed(), Duration::from_millis(50));
    assert_eq!(*batches.lock().unwrap(), [vec![7]]);
}

#[tokio::test(start_paused = true)]
async fn a_failed_batch_fails_each_message_and_keeps_retryability() {
    for (permanent, retryable) in [(false, true), (true, false)] {
        let svc = service_fn(move |_batch: Batch| async move {
            Err::<(), _>(if permanent {
                HandlerError::permanent("store rejected the batch")
            } else {
                HandlerError::new("store unavailable")
            })
        });
        let batching = BatchLayer::new(2, Duration::from_millis(10)).layer(svc);
        let (a, b) = tokio::join!(
            batching.clone().oneshot(msg(1)),
            batching.clone().oneshot(msg(2))
        );
        for outcome in [a.unwrap(), b.unwrap()] {
            let err = outcome.error().expect("failed");
            assert_eq!(err.is_retryable(), retryable);
            assert!(err.to_string().contains("its batch failed"), "{err}");
        }
    }
}
