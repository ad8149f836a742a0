//! The standard inbound stack: [`StandardStack`].
//!
//! One builder composes the inbound middleware in the order the runtime
//! expects, around a service of [`Request<Envelope>`](tower_mqtt_core::Request) (usually a
//! [`Router`](tower_mqtt_core::Router)):
//!
//! ```text
//! Request<Bytes>
//!   -> Decode            bytes to envelope; decode errors end here
//!   -> Dedup             copies of handled envelopes end here
//!   -> CorrelationSpan   span + correlation id for everything below
//!   -> Isolation         errors, panics, timeouts become Outcome::Failed
//!   -> Retry             retryable failures tried again, with backoff
//!   -> Timeout           each attempt bounded (30 s)
//!   -> your service      Request<Envelope> -> Outcome
//! ```
//!
//! Why this order:
//!
//! - **Decode outermost**, so a payload that cannot be decoded fails at once,
//!   permanently, and is never retried: no layer below ever sees it.
//! - **Dedup outside retry**, so a redelivery that arrives while the message is
//!   being retried is absorbed as a duplicate instead of running the handler a
//!   second time in parallel; and the dedup key is released only when the last
//!   attempt has failed, so a later redelivery of a failed message runs again.
//! - **The span outside isolation**, so the error isolation logs is inside the
//!   message's span, with its correlation id, topic and type. Dedup logs at
//!   `DEBUG` only. A payload that cannot be decoded has no envelope to make
//!   that span from: decode logs its `WARN` (rate-limited, with topic, size and
//!   reason) inside an `mqtt.message` span of its own, with the topic and
//!   flags, so both kinds of line are found under one span name.
//! - **Isolation outside retry**, so it sees the final error, after the last
//!   attempt: a failed message is logged and dead-lettered once, not once per
//!   attempt.
//! - **Timeout inside retry**, so each attempt has its own time, and a timed-out
//!   attempt is retried (see [`timeout`](crate::timeout) for why timeouts are
//!   retryable).
//!
//! The result is a `Service<Request<Bytes>, Response = Outcome, Error =
//! Infallible>`: `Clone`, `Send`, `'static`, with a `Send` future, which is what
//! the runtime drives. Every failure is an [`Outcome`](tower_mqtt_core::Outcome), never an error.
//!
//! ```
//! use bytes::Bytes;
//! use std::time::Duration;
//! use tower::{service_fn, BoxError, ServiceExt};
//! use tower_mqtt::{correlation, Data, Envelope, Outcome, Request, Router};
//! use tower_mqtt_layers::{dead_letter::DeadLetter, retry::MessageRetryLayer, EventRegistry, StandardStack};
//!
//! #[derive(serde::Deserialize)]
//! struct Say { text: String }
//!
//! async fn say(Data(say): Data<Say>) -> Result<(), BoxError> {
//!     assert!(correlation::current().is_some());
//!     println!("saying {}", say.text);
//!     Ok(())
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! // Where failed messages go: in a service, the runtime's publisher.
//! let publisher = service_fn(|_: Request<Envelope>| async { Ok::<_, BoxError>(()) });
//!
//! let svc = StandardStack::new()
//!     .registry(EventRegistry::fleet())
//!     .dedup_ttl(Duration::from_secs(30))
//!     .dedup_max_entries(2048)
//!     .retry(MessageRetryLayer::new(3).backoff(Duration::from_millis(100), Duration::from_secs(5)))
//!     .timeout(Duration::from_secs(30))
//!     .dead_letter(DeadLetter::new(publisher).source("tts-worker"))
//!     .service(Router::new().route("tts/say", say));
//!
//! let bytes = Envelope::new("tts.say", serde_json::json!({"text": "hello"})).unwrap().to_bytes();
//! let msg = Request::builder("tts/say").body(bytes).unwrap();
//! assert!(matches!(svc.clone().oneshot(msg.clone()).await.unwrap(), Outcome::Handled));
//! assert!(matches!(svc.clone().oneshot(msg).await.unwrap(), Outcome::Duplicate));
//!
//! let garbage = Request::builder("tts/say").body(Bytes::from_static(b"\x00")).unwrap();
//! assert!(svc.oneshot(garbage).await.unwrap().is_failed());
//! # }
//! ```

use std::time::Duration;

use tower::{Layer, ServiceBuilder};
use tracing::Level;

use crate::{
    correlation_span::{CorrelationSpan, CorrelationSpanLayer, DefaultMakeSpan},
    dead_letter::{DeadLetterPolicy, NoDeadLetters},
    decode::{Decode, DecodeLayer},
    dedup::{Dedup, DedupLayer},
    isolation::{Isolation, IsolationLayer},
    registry::EventRegistry,
    retry::{MessageRetry, MessageRetryLayer},
    timeout::{Timeout, TimeoutLayer, DEFAULT_TIMEOUT},
};

/// The most attempts a message gets in the standard stack unless configured
/// otherwise: 3.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;

/// The service [`StandardStack`] makes around `S`.
pub type StandardService<S, D = NoDeadLetters> =
    Decode<Dedup<CorrelationSpan<Isolation<MessageRetry<Timeout<S>>, D>>>>;

/// Builds the standard inbound stack; see the [module docs](self).
///
/// Defaults: an empty [`EventRegistry`] (raw payloads take their topic as
/// type), dedup for 30 s and 2048 entries (off with a TTL of zero, or
/// [`without_dedup`](Self::without_dedup)), spans at `INFO`, no dead letters,
/// [`DEFAULT_MAX_ATTEMPTS`] attempts with the default backoff and budget, and a
/// 30 s timeout per attempt.
///
/// It is also a [`Layer`]: every service it makes shares one dedup cache and
/// one retry budget.
///
/// ```
/// use tower::ServiceBuilder;
/// use tower_mqtt::Router;
/// use tower_mqtt_layers::{EventRegistry, StandardStack};
///
/// let svc = ServiceBuilder::new()
///     .layer(StandardStack::new().registry(EventRegistry::fleet()))
///     .service(Router::new());
/// ```
#[derive(Clone, Debug)]
#[must_use]
pub struct StandardStack<D = NoDeadLetters> {
    decode: DecodeLayer,
    dedup: DedupLayer,
    span: DefaultMakeSpan,
    dead_letters: D,
    retry: MessageRetryLayer,
    timeout: Duration,
}

impl StandardStack {
    /// The stack with its defaults.
    pub fn new() -> Self {
        Self {
            decode: DecodeLayer::default(),
            dedup: DedupLayer::new(),
            span: DefaultMakeSpan::new(),
            dead_letters: NoDeadLetters,
            retry: MessageRetryLayer::new(DEFAULT_MAX_ATTEMPTS),
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

impl Default for StandardStack {
    fn default() -> Self {
        Self::new()
    }
}

impl<D> StandardStack<D> {
    /// The event registry for the types of raw JSON payloads.
    pub fn registry(mut self, registry: EventRegistry) -> Self {
        self.decode = self.decode.with_registry(registry);
        self
    }

    /// The type of raw payloads on topics the registry does not know; see
    /// [`DecodeLayer::default_type`].
    pub fn default_type(mut self, event_type: impl Into<String>) -> Self {
        self.decode = self.decode.default_type(event_type);
        self
    }

    /// How long a handled message is remembered (default 30 s). Starts a new
    /// dedup cache.
    ///
    /// Zero turns dedup off, as the fleet's `MQTT_DEDUPE_TTL=0` does: the
    /// setting can be passed through as it is configured. See
    /// [`without_dedup`](Self::without_dedup).
    pub fn dedup_ttl(mut self, ttl: Duration) -> Self {
        self.dedup = DedupLayer::with_limits(ttl, self.dedup.max_entries());
        self
    }

    /// How many handled messages are remembered at most (default 2048). Starts
    /// a new dedup cache.
    pub fn dedup_max_entries(mut self, max_entries: u64) -> Self {
        self.dedup = DedupLayer::with_limits(self.dedup.ttl(), max_entries);
        self
    }

    /// Lets every message through, copies included: no dedup cache is kept.
    /// The same as [`dedup_ttl(Duration::ZERO)`](Self::dedup_ttl).
    ///
    /// For services whose handlers are idempotent, or that deduplicate on
    /// their own. The `Dedup` layer stays in the stack's type, as a pass-through.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use tower::ServiceExt;
    /// use tower_mqtt::{Envelope, Outcome, Request, Router};
    /// use tower_mqtt_layers::StandardStack;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let router = Router::new().route("tts/say", |_: Request<Envelope>| async {});
    /// let svc = StandardStack::new().without_dedup().service(router);
    /// let bytes = Envelope::new("tts.say", serde_json::json!({})).unwrap().to_bytes();
    /// let msg = Request::builder("tts/say").body(bytes).unwrap();
    /// assert!(matches!(svc.clone().oneshot(msg.clone()).await.unwrap(), Outcome::Handled));
    /// assert!(matches!(svc.oneshot(msg).await.unwrap(), Outcome::Handled));
    /// # }
    /// ```
    pub fn without_dedup(mut self) -> Self {
        self.dedup = DedupLayer::with_limits(Duration::ZERO, self.dedup.max_entries());
        self
    }

    /// Uses `dedup`, and its cache, for deduplication: stacks given the same
    /// layer share what they have seen.
    pub fn dedup(mut self, dedup: DedupLayer) -> Self {
        self.dedup = dedup;
        self
    }

    /// The level of the `mqtt.message` span (default `INFO`).
    pub fn span_level(mut self, level: Level) -> Self {
        self.span = self.span.level(level);
        self
    }

    /// The retries: attempts, backoff, budget.
    pub fn retry(mut self, retry: MessageRetryLayer) -> Self {
        self.retry = retry;
        self
    }

    /// The time each attempt may take (default 30 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Where failed messages go besides the log, usually a
    /// [`DeadLetter`](crate::dead_letter::DeadLetter).
    pub fn dead_letter<D2: DeadLetterPolicy>(self, dead_letters: D2) -> StandardStack<D2> {
        StandardStack {
            decode: self.decode,
            dedup: self.dedup,
            span: self.span,
            dead_letters,
            retry: self.retry,
            timeout: self.timeout,
        }
    }

    /// Wraps `inner` in the stack.
    pub fn service<S>(&self, inner: S) -> StandardService<S, D>
    where
        D: DeadLetterPolicy,
    {
        self.layer(inner)
    }
}

impl<S, D: DeadLetterPolicy> Layer<S> for StandardStack<D> {
    type Service = StandardService<S, D>;

    fn layer(&self, inner: S) -> Self::Service {
        ServiceBuilder::new()
            .layer(self.decode.clone())
            .layer(self.dedup.clone())
            .layer(CorrelationSpanLayer::new().make_span(self.span))
            .layer(IsolationLayer::new().dead_letter(self.dead_letters.clone()))
            .layer(self.retry.clone())
            .layer(TimeoutLayer::new(self.timeout))
            .service(inner)
    }
}

#[cfg(test)]
#[allow(
    clippy::items_after_statements,
    clippy::unnecessary_wraps,
    clippy::type_complexity
)]
mod tests {
    use super::*;
    use crate::{
        dead_letter::DeadLetter, decode::DecodeError, test_util::capture, timeout::is_timeout,
    };
    use bytes::Bytes;
    use serde_json::json;
    use std::{
        convert::Infallible,
        sync::{
            atomic::{AtomicUsize, Ordering},
            Arc, Mutex,
        },
    };
    use tokio::sync::mpsc;
    use tower::{BoxError, Service, ServiceExt};
    use tower_mqtt_core::{
        correlation, correlation::CorrelationId, Data, Envelope, Outcome, Request, Router,
    };

    const ID: &str = "3f1c9b1e8a2d4c6f9e0b7a5d4c3b2a19";

    fn envelope(topic: &str, event_type: &str, data: serde_json::Value) -> Request<Bytes> {
        let env = Envelope::new(event_type, data).unwrap().with_id(ID);
        Request::builder(topic).body(env.to_bytes()).unwrap()
    }

    fn raw(topic: &str, payload: &'static [u8]) -> Request<Bytes> {
        Request::builder(topic)
            .body(Bytes::from_static(payload))
            .unwrap()
    }

    fn counter() -> (Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let count = Arc::new(AtomicUsize::new(0));
        (count.clone(), count)
    }

    #[derive(serde::Deserialize)]
    struct Say {
        text: String,
    }

    /// A router with a good route, a panicking one, a failing one and a slow one;
    /// it records what the good route saw.
    fn router(
        seen: Arc<Mutex<Vec<(String, String, Option<String>, Option<String>)>>>,
        said: Arc<AtomicUsize>,
        panics: Arc<AtomicUsize>,
        failures: Arc<AtomicUsize>,
    ) -> Router {
        Router::new()
            .route(
                "tts/say",
                move |req: Request<Envelope>, Data(say): Data<Say>| {
                    let (seen, said) = (seen.clone(), said.clone());
                    async move {
                        said.fetch_add(1, Ordering::SeqCst);
                        seen.lock().unwrap().push((
                            say.text,
                            req.body().event_type().to_owned(),
                            req.extensions()
                                .get::<CorrelationId>()
                                .map(ToString::to_string),
                            correlation::current().map(|id| id.to_string()),
                        ));
                    }
                },
            )
            .route("crash/now", move |_req: Request<Envelope>| {
                let panics = panics.clone();
                async move {
                    panics.fetch_add(1, Ordering::SeqCst);
                    handler_bug();
                }
            })
            .route("fail/once", move |_req: Request<Envelope>| {
                let failures = failures.clone();
                async move {
                    if failures.fetch_add(1, Ordering::SeqCst) < 3 {
                        Err::<(), _>("storage unavailable")
                    } else {
                        Ok(())
                    }
                }
            })
            .route("slow/down", |_req: Request<Envelope>| async {
                std::future::pending::<()>().await;
            })
    }

    fn handler_bug() {
        panic!("handler bug");
    }

    type Seen = Arc<Mutex<Vec<(String, String, Option<String>, Option<String>)>>>;

    struct Fixture {
        seen: Seen,
        said: Arc<AtomicUsize>,
        panics: Arc<AtomicUsize>,
        failures: Arc<AtomicUsize>,
        router: Router,
    }

    fn fixture() -> Fixture {
        let seen = Seen::default();
        let (said, said_in) = counter();
        let (panics, panics_in) = counter();
        let (failures, failures_in) = counter();
        let router = router(seen.clone(), said_in, panics_in, failures_in);
        Fixture {
            seen,
            said,
            panics,
            failures,
            router,
        }
    }

    fn assert_runtime_ready<S>(_: &S)
    where
        S: Service<Request<Bytes>, Response = Outcome, Error = Infallible> + Clone + Send + 'static,
        S::Future: Send + 'static,
    {
    }

    #[tokio::test(start_paused = true)]
    async fn good_duplicate_malformed_and_panicking_messages() {
        let f = fixture();
        let svc = StandardStack::new()
            .registry(EventRegistry::fleet())
            .retry(
                MessageRetryLayer::new(3)
                    .backoff(Duration::from_millis(10), Duration::from_millis(100)),
            )
            .service(f.router.clone());
        assert_runtime_ready(&svc);

        // Good.
        let good = envelope("tts/say", "tts.say", json!({"text": "hello"}));
        let outcome = svc.clone().oneshot(good.clone()).await.unwrap();
        assert!(matches!(outcome, Outcome::Handled), "{outcome:?}");
        assert_eq!(
            f.seen.lock().unwrap()[0],
            (
                "hello".into(),
                "tts.say".into(),
                Some(ID.into()),
                Some(ID.into())
            )
        );

        // Duplicate: the handler does not run again.
        let outcome = svc.clone().oneshot(good).await.unwrap();
        assert!(matches!(outcome, Outcome::Duplicate), "{outcome:?}");
        assert_eq!(f.said.load(Ordering::SeqCst), 1);

        // Malformed: a permanent decode failure, never retried, handler untouched.
        for payload in [
            &b"not json"[..],
            b"[1,2]",
            b"\xff\xfe",
            br#"{"type":"tts.say","data":[]}"#,
        ] {
            let req = Request::builder("tts/say")
                .body(Bytes::copy_from_slice(payload))
                .unwrap();
            let outcome = svc.clone().oneshot(req).await.unwrap();
            let err = outcome.error().expect("a failure");
            assert!(!err.is_retryable());
            assert!(err.get_ref().is::<DecodeError>());
        }
        assert_eq!(f.said.load(Ordering::SeqCst), 1);

        // Panicking: a failure, and the service goes on. The router reports a
        // panic as retryable, so it is tried the configured 3 times.
        let crash = envelope("crash/now", "crash.now", json!({}));
        let outcome = svc.clone().oneshot(crash).await.unwrap();
        let err = outcome.error().expect("a failure");
        assert!(
            err.to_string().contains("handler panicked: handler bug"),
            "{err}"
        );
        assert_eq!(f.panics.load(Ordering::SeqCst), 3);

        // Raw JSON on a registered topic takes the registry's type.
        let outcome = svc
            .clone()
            .oneshot(raw("tts/say", br#"{"text":"raw"}"#))
            .await
            .unwrap();
        assert!(matches!(outcome, Outcome::Handled));
        // ... and is never a duplicate.
        let outcome = svc
            .clone()
            .oneshot(raw("tts/say", br#"{"text":"raw"}"#))
            .await
            .unwrap();
        assert!(matches!(outcome, Outcome::Handled));
        assert_eq!(f.said.load(Ordering::SeqCst), 3);
        assert_eq!(f.seen.lock().unwrap()[2].1, "tts.say");

        // Unrouted.
        let outcome = svc
            .oneshot(envelope("no/route", "x", json!({})))
            .await
            .unwrap();
        assert!(matches!(outcome, Outcome::Unrouted));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_is_retried_logged_once_and_dead_lettered_once() {
        let (logs, _guard) = capture();
        let f = fixture();
        let (tx, mut letters) = mpsc::unbounded_channel();
        let sink = tower::service_fn(move |letter: Request<Envelope>| {
            tx.send(letter).unwrap();
            async { Ok::<_, BoxError>(()) }
        });
        let svc = StandardStack::new()
            .dead_letter(DeadLetter::new(sink))
            .service(f.router.clone());
        assert_runtime_ready(&svc);

        let msg = envelope("fail/once", "fail.once", json!({"n": 1}));
        let outcome = svc.clone().oneshot(msg.clone()).await.unwrap();
        assert_eq!(outcome.error().unwrap().to_string(), "storage unavailable");
        assert_eq!(f.failures.load(Ordering::SeqCst), 3);

        let errors = logs.at(Level::ERROR);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(
            errors[0].span("mqtt.message").unwrap()["correlation_id"],
            ID
        );
        assert_eq!(logs.at(Level::WARN).len(), 2, "one warning per retry");

        let letter = letters.recv().await.unwrap();
        assert_eq!(letter.topic(), "mqtt/dead_letter");
        assert_eq!(letter.body().data()["topic"], "fail/once");
        tokio::task::yield_now().await;
        assert!(letters.try_recv().is_err(), "one dead letter per message");

        // The failure released the dedup key: a redelivery runs (and now works).
        let outcome = svc.oneshot(msg).await.unwrap();
        assert!(matches!(outcome, Outcome::Handled), "{outcome:?}");
        assert_eq!(f.failures.load(Ordering::SeqCst), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hanging_handler_times_out_per_attempt() {
        let f = fixture();
        let svc = StandardStack::new()
            .timeout(Duration::from_secs(5))
            .retry(
                MessageRetryLayer::new(2)
                    .backoff(Duration::from_secs(1), Duration::from_secs(1))
                    .jitter(0.0),
            )
            .service(f.router.clone());
        let started = tokio::time::Instant::now();
        let outcome = svc
            .oneshot(envelope("slow/down", "slow.down", json!({})))
            .await
            .unwrap();
        assert!(is_timeout(outcome.error().unwrap()));
        assert_eq!(started.elapsed(), Duration::from_secs(5 + 1 + 5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_redelivery_during_retries_is_a_duplicate() {
        let f = fixture();
        let svc = StandardStack::new()
            .retry(
                MessageRetryLayer::new(5)
                    .backoff(Duration::from_secs(1), Duration::from_secs(1))
                    .jitter(0.0),
            )
            .service(f.router.clone());
        let msg = envelope("fail/once", "fail.once", json!({}));
        let first = tokio::spawn(svc.clone().oneshot(msg.clone()));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        // The first is between attempts: its redelivery is absorbed.
        let outcome = svc.clone().oneshot(msg).await.unwrap();
        assert!(matches!(outcome, Outcome::Duplicate));
        assert!(matches!(first.await.unwrap().unwrap(), Outcome::Handled));
        assert_eq!(f.failures.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn stream_chunks_sharing_an_id_all_reach_the_handler() {
        let (count, counted) = counter();
        let router = Router::new().route("llm/stream", move |_req: Request<Envelope>| {
            let counted = counted.clone();
            async move {
                counted.fetch_add(1, Ordering::SeqCst);
            }
        });
        let svc = StandardStack::new().service(router);
        for seq in 0..10 {
            let chunk = envelope(
                "llm/stream",
                "llm.stream",
                json!({"seq": seq, "delta": "x"}),
            );
            assert!(matches!(
                svc.clone().oneshot(chunk).await.unwrap(),
                Outcome::Handled
            ));
        }
        assert_eq!(count.load(Ordering::SeqCst), 10);
    }

    #[tokio::test]
    async fn settings_reach_the_layers() {
        let stack = StandardStack::new()
            .dedup_ttl(Duration::from_secs(7))
            .dedup_max_entries(9)
            .default_type("raw.json")
            .registry(EventRegistry::fleet())
            .span_level(Level::DEBUG);
        assert_eq!(stack.dedup.ttl(), Duration::from_secs(7));
        assert_eq!(stack.dedup.max_entries(), 9);
        assert!(!stack.decode.registry().is_empty());

        let (tx, mut rx) = mpsc::unbounded_channel();
        let svc = stack.service(tower::service_fn(move |req: Request<Envelope>| {
            tx.send(req.body().event_type().to_owned()).unwrap();
            async { Ok::<_, Infallible>(Outcome::Handled) }
        }));
        svc.clone().oneshot(raw("x/y", b"{}")).await.unwrap();
        svc.oneshot(raw("tts/say", b"{}")).await.unwrap();
        assert_eq!(rx.recv().await.unwrap(), "raw.json");
        assert_eq!(rx.recv().await.unwrap(), "tts.say");
    }

    #[tokio::test]
    async fn the_stack_is_a_layer_sharing_one_cache() {
        let (count, counted) = counter();
        let handler = tower::service_fn(move |_req: Request<Envelope>| {
            counted.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, Infallible>(Outcome::Handled) }
        });
        let stack = StandardStack::new();
        let a = ServiceBuilder::new()
            .layer(stack.clone())
            .service(handler.clone());
        let b = stack.layer(handler);
        let msg = envelope("a", "t", json!({}));
        assert!(matches!(
            a.oneshot(msg.clone()).await.unwrap(),
            Outcome::Handled
        ));
        assert!(matches!(b.oneshot(msg).await.unwrap(), Outcome::Duplicate));
        assert_eq!(count.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn dedup_can_be_turned_off() {
        for stack in [
            StandardStack::new().without_dedup(),
            StandardStack::new().dedup_ttl(Duration::ZERO),
            StandardStack::new()
                .dedup_ttl(Duration::ZERO)
                .dedup_max_entries(10),
        ] {
            assert!(!stack.dedup.is_enabled());
            let (count, counted) = counter();
            let svc = stack.service(tower::service_fn(move |_req: Request<Envelope>| {
                counted.fetch_add(1, Ordering::SeqCst);
                async { Ok::<_, Infallible>(Outcome::Handled) }
            }));
            let msg = envelope("a", "t", json!({}));
            for _ in 0..3 {
                let outcome = svc.clone().oneshot(msg.clone()).await.unwrap();
                assert!(matches!(outcome, Outcome::Handled));
            }
            assert_eq!(count.load(Ordering::SeqCst), 3);
        }
        // A TTL again turns it back on.
        let stack = StandardStack::new()
            .without_dedup()
            .dedup_ttl(Duration::from_secs(1));
        assert!(stack.dedup.is_enabled());
    }
}
