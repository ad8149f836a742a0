use super::*;
use crate::outcome::HandlerError;
use serde_json::json;
use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Mutex,
};

fn msg(topic: &str) -> Request<Envelope> {
    Request::builder(topic)
        .body(Envelope::new("test.event", json!({"n": 1})).unwrap())
        .unwrap()
}

#[allow(clippy::type_complexity)]
fn counter() -> (
    Arc<AtomicUsize>,
    impl Fn(Request<Envelope>) -> std::future::Ready<()> + Clone + Send + Sync + 'static,
) {
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    let handler = move |_req: Request<Envelope>| {
        c.fetch_add(1, Ordering::SeqCst);
        std::future::ready(())
    };
    (count, handler)
}

#[tokio::test]
async fn routes_to_every_matching_route() {
    let (a, ha) = counter();
    let (b, hb) = counter();
    let (c, hc) = counter();
    let router = Router::new()
        .route("sensors/+/temp", ha)
        .route("sensors/#", hb)
        .route("other", hc);
    let outcome = router.oneshot(msg("sensors/kitchen/temp")).await.unwrap();
    assert!(matches!(outcome, Outcome::Handled));
    assert_eq!(
        (
            a.load(Ordering::SeqCst),
            b.load(Ordering::SeqCst),
            c.load(Ordering::SeqCst)
        ),
        (1, 1, 0)
    );
}

#[tokio::test]
async fn fallback_runs_only_when_nothing_matches() {
    let (route_calls, route_handler) = counter();
    let (fallback_calls, fallback_handler) = counter();
    let router = Router::new()
        .route("a/b", route_handler)
        .fallback(fallback_handler);
    router.clone().oneshot(msg("a/b")).await.unwrap();
    router.clone().oneshot(msg("a/c")).await.unwrap();
    assert_eq!(route_calls.load(Ordering::SeqCst), 1);
    assert_eq!(fallback_calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn no_match_without_fallback_is_unrouted() {
    let (_, h) = counter();
    let outcome = Router::new().route("a", h).oneshot(msg("b")).await.unwrap();
    assert!(matches!(outcome, Outcome::Unrouted));
}

#[tokio::test]
async fn wildcard_values_reach_the_handler() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let router = Router::new().route("camera/+/frame/#", move |req: Request<Envelope>| {
        let s = s.clone();
        async move {
            let params = req.topic_params().unwrap();
            s.lock().unwrap().extend(params.iter().map(str::to_owned));
        }
    });
    router.oneshot(msg("camera/7/frame/raw/0")).await.unwrap();
    assert_eq!(*seen.lock().unwrap(), ["7", "raw/0"]);
}

#[tokio::test]
async fn a_panicking_route_does_not_stop_the_others() {
    let (ok, h) = counter();
    let router = Router::new()
        .route("a/+", |req: Request<Envelope>| async move {
            assert!(req.topic() != "a/b", "bad handler");
        })
        .route("a/b", h);
    let outcome = router.oneshot(msg("a/b")).await.unwrap();
    assert_eq!(ok.load(Ordering::SeqCst), 1);
    let err = outcome.error().expect("the panic is a failure");
    assert!(
        err.to_string().contains("route a/+: handler panicked"),
        "{err}"
    );
}

#[tokio::test]
async fn errors_of_any_service_become_failures() {
    #[derive(Clone)]
    struct NeverReady;
    impl Service<Request<Envelope>> for NeverReady {
        type Response = ();
        type Error = std::io::Error;
        type Future = std::future::Ready<Result<(), std::io::Error>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Err(std::io::Error::other("not ready")))
        }
        fn call(&mut self, _: Request<Envelope>) -> Self::Future {
            unreachable!("never ready")
        }
    }
    let outcome = Router::new()
        .route_service("a", NeverReady)
        .oneshot(msg("a"))
        .await
        .unwrap();
    assert_eq!(outcome.error().unwrap().to_string(), "not ready");
}

#[tokio::test]
async fn failures_combine_and_keep_permanence() {
    let router = Router::new()
        .route("a/+", |_req: Request<Envelope>| async {
            Err::<(), _>(HandlerError::permanent("bad"))
        })
        .route("a/#", |_req: Request<Envelope>| async {
            Err::<(), _>("transient")
        });
    let outcome = router.oneshot(msg("a/b")).await.unwrap();
    let err = outcome.error().unwrap();
    assert!(!err.is_retryable());
    let failed = err.get_ref().downcast_ref::<RoutesFailed>().unwrap();
    assert_eq!(failed.failures().len(), 2);
}

#[test]
#[should_panic(expected = "invalid route \"a/#/b\"")]
fn invalid_filters_fail_at_build_time() {
    let (_, h) = counter();
    let _: Router = Router::new().route("a/#/b", h);
}

#[test]
fn subscriptions_merge_covered_filters() {
    let noop = |_: Request<Envelope>| async {};
    let router: Router = Router::new()
        .route(
            Subscription::new("sensors/+/temp").qos(QoS::ExactlyOnce),
            noop,
        )
        .route(Subscription::new("sensors/#").qos(QoS::AtMostOnce), noop)
        .route("llm/request", noop)
        .route(Subscription::new("llm/request").qos(QoS::AtMostOnce), noop)
        .route("$share/g/jobs/+", noop)
        .route("jobs/#", noop)
        .route("a/+/c", noop)
        .route("a/b/+", noop);
    let subs: Vec<(String, QoS)> = router
        .subscriptions()
        .into_iter()
        .map(|(f, q)| (f.to_string(), q))
        .collect();
    assert_eq!(
        subs,
        [
            ("sensors/#".to_owned(), QoS::ExactlyOnce),
            ("llm/request".to_owned(), QoS::AtLeastOnce),
            ("$share/g/jobs/+".to_owned(), QoS::AtLeastOnce),
            ("jobs/#".to_owned(), QoS::AtLeastOnce),
            ("a/+/c".to_owned(), QoS::AtLeastOnce),
            ("a/b/+".to_owned(), QoS::AtLeastOnce),
        ]
    );
}

#[tokio::test]
async fn layer_wraps_each_route() {
    use tower::timeout::TimeoutLayer;
    let router = Router::new()
        .route("slow", |_req: Request<Envelope>| async {
            tokio::time::sleep(std::time::Duration::from_secs(60)).await;
        })
        .layer(TimeoutLayer::new(std::time::Duration::from_millis(10)));
    let outcome = router.oneshot(msg("slow")).await.unwrap();
    assert!(outcome.error().unwrap().to_string().contains("timed out"));
}

#[test]
fn router_is_send_sync_and_cheap_to_clone() {
    fn assert_send_sync<T: Send + Sync + Clone>() {}
    assert_send_sync::<Router>();
}

#[test]
fn the_index_finds_exactly_what_matching_every_route_finds() {
    let filters = [
        "a/+",
        "#",
        "+/b",
        "a/#",
        "$share/g/a/b",
        "b",
        "+",
        "$SYS/#",
        "a/b/c",
        "+/+/c",
    ];
    let mut router: Router = Router::new();
    for filter in filters {
        router = router.subscribe(filter);
    }
    for topic in ["a/b", "b", "$SYS/x", "a", "c/b", "a/b/c", "x/y/c", "a/"] {
        let topic = TopicName::new(topic).unwrap();
        let indexed: Vec<&str> = router
            .matching(&topic)
            .map(|s| s.filter().as_str())
            .collect();
        let naive: Vec<&str> = router
            .routes()
            .filter(|s| s.filter().matches(&topic))
            .map(|s| s.filter().as_str())
            .collect();
        assert_eq!(indexed, naive, "{topic}");
    }
}
