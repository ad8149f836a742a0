//! Dropping messages already handled: [`Dedup`].
//!
//! MQTT at QoS 1 delivers at least once: after a reconnect the broker resends
//! what it had not seen acknowledged, a retained message comes again with every
//! subscription, and overlapping subscriptions can bring two copies. [`Dedup`]
//! remembers each envelope it let through, for a time-to-live (default 30 s) and
//! up to a number of entries (default 2048, least recently used evicted first),
//! and answers a copy with [`Outcome::Duplicate`] without calling the inner
//! service.
//!
//! # The key
//!
//! An envelope is identified the way the fleet does it ([`DedupKey`]):
//! `type|id|seq=N` when `data.seq` is an integer, else `type|id|<hash>` with a
//! hash of `data` in canonical form (keys sorted at every level, whatever order
//! they arrived in). Keying on the id alone would drop every stream chunk after
//! the first, since the chunks of one stream share their id.
//!
//! Requests marked [`RawPayload`] (plain JSON objects wrapped by
//! [`Decode`](crate::decode::Decode)) are never duplicates: their id was made up
//! on arrival, so two copies cannot be told apart from two messages.
//!
//! # Concurrent copies and failures
//!
//! The key is claimed atomically before the inner service is called, so of two
//! copies arriving together exactly one reaches the handler; the other is a
//! duplicate at once, even while the first is still running.
//!
//! If handling **fails** (the inner service answers [`Outcome::Failed`] or an
//! error, or its future is dropped before it finishes), the claim is released:
//! a redelivery of the message is handled again instead of being dropped as a
//! duplicate of a message that was never handled. A copy that arrived while the
//! failed attempt was still running was already answered as a duplicate; that is
//! the price of never running one message twice at once. Put retries *inside*
//! `Dedup`, so the claim is released only when the last attempt has failed.
//!
//! ```
//! use tower::{service_fn, BoxError, Layer, ServiceExt};
//! use tower_mqtt::{Envelope, Outcome, Request};
//! use tower_mqtt_layers::dedup::DedupLayer;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let handler = service_fn(|_: Request<Envelope>| async { Ok::<_, BoxError>(Outcome::Handled) });
//! let svc = DedupLayer::new().layer(handler);
//!
//! let chunk = |seq: i64| {
//!     let env = Envelope::new("llm.stream", serde_json::json!({"seq": seq}))
//!         .unwrap()
//!         .with_id("3f1c9b1e8a2d4c6f9e0b7a5d4c3b2a19");
//!     Request::builder("llm/stream").body(env).unwrap()
//! };
//! assert!(matches!(svc.clone().oneshot(chunk(0)).await.unwrap(), Outcome::Handled));
//! assert!(matches!(svc.clone().oneshot(chunk(1)).await.unwrap(), Outcome::Handled));
//! assert!(matches!(svc.oneshot(chunk(0)).await.unwrap(), Outcome::Duplicate));
//! # }
//! ```
//!
//! The time-to-live is measured with [`tokio::time::Instant`] (so it follows a
//! paused test clock) and also given to the cache, which evicts expired entries
//! on its own clock.

use std::{
    collections::hash_map::DefaultHasher,
    fmt,
    future::Future,
    hash::{Hash, Hasher},
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{ready, Context, Poll},
    time::Duration,
};

use moka::{ops::compute::Op, policy::EvictionPolicy, sync::Cache};
use pin_project_lite::pin_project;
use serde_json::{Map, Value};
use tokio::time::Instant;
use tower::{Layer, Service};
use tower_mqtt_core::{Envelope, Outcome, Request};

use crate::decode::RawPayload;

/// How long a handled message is remembered by default: 30 s.
pub const DEFAULT_TTL: Duration = Duration::from_secs(30);

/// How many handled messages are remembered at most by default: 2048.
pub const DEFAULT_MAX_ENTRIES: u64 = 2048;

/// What identifies an envelope for deduplication; see the [module docs](self).
///
/// Displays as the fleet writes it: `type|id|seq=N` or `type|id|<hash>`. Cheap
/// to clone.
///
/// ```
/// use serde_json::json;
/// use tower_mqtt::Envelope;
/// use tower_mqtt_layers::dedup::DedupKey;
///
/// let chunk = Envelope::new("llm.stream", json!({"seq": 3, "delta": "lo"})).unwrap().with_id("ab12");
/// assert_eq!(DedupKey::new(&chunk).to_string(), "llm.stream|ab12|seq=3");
///
/// // Without an integer seq, the data decides; key order does not matter.
/// let a = Envelope::from_slice(br#"{"id":"ab12","type":"t","data":{"x":1,"y":[true,null]}}"#).unwrap();
/// let b = Envelope::from_slice(br#"{"id":"ab12","type":"t","data":{"y":[true,null],"x":1}}"#).unwrap();
/// assert_eq!(DedupKey::new(&a), DedupKey::new(&b));
/// assert!(DedupKey::new(&a).to_string().starts_with("t|ab12|"));
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct DedupKey {
    /// The type and the id, one after the other: one allocation per key.
    type_and_id: Arc<str>,
    type_len: usize,
    part: Part,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Part {
    Seq(i64),
    Data(u64),
}

impl DedupKey {
    /// The key of `envelope`.
    pub fn new(envelope: &Envelope) -> Self {
        let (event_type, id) = (envelope.event_type(), envelope.id());
        let mut type_and_id = String::with_capacity(event_type.len() + id.len());
        type_and_id.push_str(event_type);
        type_and_id.push_str(id);
        let part = match envelope.seq() {
            Some(seq) => Part::Seq(seq),
            None => Part::Data(canonical_hash(envelope.data())),
        };
        Self {
            type_and_id: type_and_id.into(),
            type_len: event_type.len(),
            part,
        }
    }

    /// The event type.
    pub fn event_type(&self) -> &str {
        &self.type_and_id[..self.type_len]
    }

    /// The envelope id.
    pub fn id(&self) -> &str {
        &self.type_and_id[self.type_len..]
    }

    /// `data.seq`, when the key is made from it.
    pub fn seq(&self) -> Option<i64> {
        match self.part {
            Part::Seq(seq) => Some(seq),
            Part::Data(_) => None,
        }
    }
}

impl fmt::Display for DedupKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}|{}|", self.event_type(), self.id())?;
        match self.part {
            Part::Seq(seq) => write!(f, "seq={seq}"),
            Part::Data(hash) => write!(f, "{hash:016x}"),
        }
    }
}

impl fmt::Debug for DedupKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("DedupKey")
            .field(&format_args!("{self}"))
            .finish()
    }
}

/// A hash of `data` in canonical form: keys sorted at every level.
///
/// Walking the value hashes the same thing as printing it with sorted keys and
/// hashing the text, without building the text. `serde_json`'s map keeps keys
/// sorted unless its `preserve_order` feature is on somewhere in the build; the
/// entries are sorted here whenever they are not.
fn canonical_hash(data: &Map<String, Value>) -> u64 {
    let mut hasher = DefaultHasher::new();
    hash_object(data.iter(), data.len(), &mut hasher);
    hasher.finish()
}

fn hash_object<'a, I>(entries: I, len: usize, hasher: &mut DefaultHasher)
where
    I: Iterator<Item = (&'a String, &'a Value)> + Clone,
{
    hasher.write_u8(b'{');
    hasher.write_usize(len);
    let mut previous: Option<&String> = None;
    let sorted = entries.clone().all(|(key, _)| {
        let in_order = !matches!(previous, Some(previous) if previous >= key);
        previous = Some(key);
        in_order
    });
    if sorted {
        for (key, value) in entries {
            key.hash(hasher);
            hash_value(value, hasher);
        }
    } else {
        let mut entries: Vec<_> = entries.collect();
        entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
        for (key, value) in entries {
            key.hash(hasher);
            hash_value(value, hasher);
        }
    }
}

fn hash_value(value: &Value, hasher: &mut DefaultHasher) {
    match value {
        Value::Null => hasher.write_u8(b'n'),
        Value::Bool(b) => {
            hasher.write_u8(b'b');
            b.hash(hasher);
        }
        Value::Number(n) => {
            hasher.write_u8(b'0');
            n.hash(hasher);
        }
        Value::String(s) => {
            hasher.write_u8(b'"');
            s.hash(hasher);
        }
        Value::Array(items) => {
            hasher.write_u8(b'[');
            hasher.write_usize(items.len());
            for item in items {
                hash_value(item, hasher);
            }
        }
        Value::Object(object) => hash_object(object.iter(), object.len(), hasher),
    }
}

/// A claim on a key: who made it (so only they release it) and when.
#[derive(Clone, Copy, Debug)]
struct Claimed {
    token: u64,
    at: Instant,
}

static NEXT_TOKEN: AtomicU64 = AtomicU64::new(0);

/// The keys seen, shared by every clone of a layer and its services.
struct Seen {
    cache: Cache<DedupKey, Claimed>,
    ttl: Duration,
    max_entries: u64,
}

impl Seen {
    fn new(ttl: Duration, max_entries: u64) -> Arc<Self> {
        let cache = Cache::builder()
            .max_capacity(max_entries)
            .time_to_live(ttl)
            // Plain LRU: the default TinyLFU admission would refuse new keys once
            // full, and a refused key is a duplicate that goes unnoticed.
            .eviction_policy(EvictionPolicy::lru())
            .build();
        Arc::new(Self {
            cache,
            ttl,
            max_entries,
        })
    }

    /// Claims `key`; gives it back if it is already claimed.
    fn claim(self: &Arc<Self>, key: DedupKey) -> Result<Claim, DedupKey> {
        let token = NEXT_TOKEN.fetch_add(1, Ordering::Relaxed);
        let ttl = self.ttl;
        let entry = self.cache.entry(key.clone()).or_insert_with_if(
            || Claimed {
                token,
                at: Instant::now(),
            },
            |claimed| claimed.at.elapsed() >= ttl,
        );
        if entry.is_fresh() {
            Ok(Claim {
                seen: self.clone(),
                key: Some(key),
                token,
            })
        } else {
            Err(key)
        }
    }

    /// Forgets `key`, unless someone else claimed it since (after the TTL).
    fn release(&self, key: DedupKey, token: u64) {
        self.cache.entry(key).and_compute_with(|entry| match entry {
            Some(entry) if entry.value().token == token => Op::Remove,
            _ => Op::Nop,
        });
    }
}

/// A claimed key; released when dropped unless [kept](Claim::keep).
struct Claim {
    seen: Arc<Seen>,
    key: Option<DedupKey>,
    token: u64,
}

impl Claim {
    fn keep(&mut self) {
        self.key = None;
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            tracing::debug!(%key, "releasing the dedup key of a message that was not handled");
            self.seen.release(key, self.token);
        }
    }
}

impl fmt::Debug for Claim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Claim")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

/// Makes [`Dedup`] services that share one cache; see the [module docs](self).
///
/// Cloning the layer shares the cache too.
///
/// ```
/// use tower::ServiceBuilder;
/// use tower_mqtt::Router;
/// use tower_mqtt_layers::dedup::{DedupLayer, DEFAULT_MAX_ENTRIES, DEFAULT_TTL};
///
/// let layer = DedupLayer::new();
/// assert_eq!((layer.ttl(), layer.max_entries()), (DEFAULT_TTL, DEFAULT_MAX_ENTRIES));
/// let svc = ServiceBuilder::new().layer(layer).service(Router::<()>::new());
/// ```
#[derive(Clone)]
#[must_use]
pub struct DedupLayer {
    seen: Arc<Seen>,
}

impl DedupLayer {
    /// A new cache with the defaults: [`DEFAULT_TTL`], [`DEFAULT_MAX_ENTRIES`].
    pub fn new() -> Self {
        Self::with_limits(DEFAULT_TTL, DEFAULT_MAX_ENTRIES)
    }

    /// A new cache that remembers a message for `ttl`, and at most
    /// `max_entries` messages (the least recently seen go first). The runtime
    /// configuration's dedup settings go here.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_mqtt_layers::dedup::DedupLayer;
    ///
    /// let layer = DedupLayer::with_limits(Duration::from_secs(60), 10_000);
    /// assert_eq!(layer.ttl(), Duration::from_secs(60));
    /// assert_eq!(layer.max_entries(), 10_000);
    /// ```
    pub fn with_limits(ttl: Duration, max_entries: u64) -> Self {
        Self {
            seen: Seen::new(ttl, max_entries),
        }
    }

    /// How long a handled message is remembered.
    pub fn ttl(&self) -> Duration {
        self.seen.ttl
    }

    /// How many handled messages are remembered at most.
    pub fn max_entries(&self) -> u64 {
        self.seen.max_entries
    }
}

impl Default for DedupLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for DedupLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DedupLayer")
            .field("ttl", &self.seen.ttl)
            .field("max_entries", &self.seen.max_entries)
            .finish()
    }
}

impl<S> Layer<S> for DedupLayer {
    type Service = Dedup<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Dedup {
            inner,
            seen: self.seen.clone(),
        }
    }
}

/// Answers copies of handled envelopes with [`Outcome::Duplicate`]; see the
/// [module docs](self).
///
/// ```
/// use std::time::Duration;
/// use tower_mqtt::Router;
/// use tower_mqtt_layers::Dedup;
///
/// let svc = Dedup::with_limits(Router::<()>::new(), Duration::from_secs(60), 4096);
/// ```
#[derive(Clone)]
#[must_use]
pub struct Dedup<S> {
    inner: S,
    seen: Arc<Seen>,
}

impl<S> Dedup<S> {
    /// Wraps `inner` with a new cache with the default limits.
    pub fn new(inner: S) -> Self {
        DedupLayer::new().layer(inner)
    }

    /// Wraps `inner` with a new cache with these limits; see
    /// [`DedupLayer::with_limits`].
    pub fn with_limits(inner: S, ttl: Duration, max_entries: u64) -> Self {
        DedupLayer::with_limits(ttl, max_entries).layer(inner)
    }

    /// A [`DedupLayer`] with the default limits.
    pub fn layer() -> DedupLayer {
        DedupLayer::new()
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes `self` and returns the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: fmt::Debug> fmt::Debug for Dedup<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dedup")
            .field("inner", &self.inner)
            .field("ttl", &self.seen.ttl)
            .field("max_entries", &self.seen.max_entries)
            .finish()
    }
}

impl<S> Service<Request<Envelope>> for Dedup<S>
where
    S: Service<Request<Envelope>, Response = Outcome>,
{
    type Response = Outcome;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Envelope>) -> Self::Future {
        let claim = if req.extensions().get::<RawPayload>().is_some() {
            None
        } else {
            match self.seen.claim(DedupKey::new(req.body())) {
                Ok(claim) => Some(claim),
                Err(key) => {
                    tracing::debug!(%key, topic = %req.topic(), "duplicate message");
                    return ResponseFuture {
                        kind: Kind::Duplicate,
                    };
                }
            }
        };
        ResponseFuture {
            kind: Kind::Inner {
                future: self.inner.call(req),
                claim,
            },
        }
    }
}

pin_project! {
    /// The future of [`Dedup`].
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        kind: Kind<F>,
    }
}

pin_project! {
    #[project = KindProj]
    #[derive(Debug)]
    enum Kind<F> {
        Duplicate,
        Inner {
            #[pin]
            future: F,
            claim: Option<Claim>,
        },
    }
}

impl<F, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Outcome, E>>,
{
    type Output = Result<Outcome, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Duplicate => Poll::Ready(Ok(Outcome::Duplicate)),
            KindProj::Inner { future, claim } => {
                let result = ready!(future.poll(cx));
                let handled = matches!(&result, Ok(outcome) if !outcome.is_failed());
                if let Some(mut claim) = claim.take() {
                    if handled {
                        claim.keep();
                    }
                }
                Poll::Ready(result)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::{
        convert::Infallible,
        sync::atomic::{AtomicUsize, Ordering},
    };
    use tower::{ServiceBuilder, ServiceExt};
    use tower_mqtt_core::HandlerError;
    use tower_test::mock;

    const ID: &str = "3f1c9b1e8a2d4c6f9e0b7a5d4c3b2a19";

    fn msg(event_type: &str, data: Value) -> Request<Envelope> {
        let env = Envelope::new(event_type, data).unwrap().with_id(ID);
        Request::builder("a/b").body(env).unwrap()
    }

    /// A handler that counts its calls and answers with `outcome()`.
    fn counting(
        outcome: fn() -> Outcome,
    ) -> (
        Arc<AtomicUsize>,
        impl Service<Request<Envelope>, Response = Outcome, Error = Infallible, Future: Send> + Clone,
    ) {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let svc = tower::service_fn(move |_req: Request<Envelope>| {
            counter.fetch_add(1, Ordering::SeqCst);
            async move { Ok::<_, Infallible>(outcome()) }
        });
        (calls, svc)
    }

    async fn send<S>(svc: &S, req: Request<Envelope>) -> Outcome
    where
        S: Service<Request<Envelope>, Response = Outcome, Error = Infallible> + Clone,
    {
        svc.clone().oneshot(req).await.unwrap()
    }

    #[tokio::test]
    async fn a_copy_is_a_duplicate_and_skips_the_handler() {
        let (calls, handler) = counting(|| Outcome::Handled);
        let svc = DedupLayer::new().layer(handler);
        let first = send(&svc, msg("t", json!({"x": 1}))).await;
        let second = send(&svc, msg("t", json!({"x": 1}))).await;
        assert!(matches!(first, Outcome::Handled));
        assert!(matches!(second, Outcome::Duplicate));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn stream_chunks_sharing_an_id_all_get_through() {
        let (calls, handler) = counting(|| Outcome::Handled);
        let svc = Dedup::new(handler);
        for seq in 0..5 {
            let outcome = send(&svc, msg("llm.stream", json!({"seq": seq, "delta": "x"}))).await;
            assert!(matches!(outcome, Outcome::Handled), "chunk {seq}");
        }
        // A chunk is identified by its seq alone: a resent chunk 2 is a duplicate
        // even if its delta differs.
        let again = send(&svc, msg("llm.stream", json!({"seq": 2, "delta": "y"}))).await;
        assert!(matches!(again, Outcome::Duplicate));
        assert_eq!(calls.load(Ordering::SeqCst), 5);
    }

    #[tokio::test]
    async fn without_an_integer_seq_the_data_decides() {
        let (calls, handler) = counting(|| Outcome::Handled);
        let svc = Dedup::new(handler);
        for data in [
            json!({"text": "a"}),
            json!({"text": "b"}),
            json!({"seq": "1"}),
            json!({"seq": 1.5}),
            json!({"seq": 1}),
        ] {
            assert!(matches!(send(&svc, msg("t", data)).await, Outcome::Handled));
        }
        // Another type with the same id and data is another message.
        assert!(matches!(
            send(&svc, msg("u", json!({"text": "a"}))).await,
            Outcome::Handled
        ));
        assert!(matches!(
            send(&svc, msg("t", json!({"seq": 1.5}))).await,
            Outcome::Duplicate
        ));
        assert_eq!(calls.load(Ordering::SeqCst), 6);
    }

    #[test]
    fn keys_display_like_the_fleet() {
        let key = DedupKey::new(msg("llm.stream", json!({"seq": 7})).body());
        assert_eq!(key.to_string(), format!("llm.stream|{ID}|seq=7"));
        assert_eq!(
            (key.event_type(), key.id(), key.seq()),
            ("llm.stream", ID, Some(7))
        );
        let key = DedupKey::new(msg("t", json!({"a": 1})).body());
        let text = key.to_string();
        let hash = text.strip_prefix(&format!("t|{ID}|")).unwrap();
        assert_eq!(hash.len(), 16);
        assert_eq!(key.seq(), None);
        assert!(format!("{key:?}").contains(&text));
    }

    #[test]
    fn type_and_id_are_not_confused_at_their_border() {
        let a = Envelope::from_map("ab", Map::new()).with_id("c");
        let b = Envelope::from_map("a", Map::new()).with_id("bc");
        assert_ne!(DedupKey::new(&a), DedupKey::new(&b));
    }

    #[test]
    fn canonical_hash_ignores_key_order_at_every_level() {
        let a: Map<String, Value> =
            serde_json::from_str(r#"{"b":{"y":1,"x":[{"q":1,"p":2}]},"a":null}"#).unwrap();
        let b: Map<String, Value> =
            serde_json::from_str(r#"{"a":null,"b":{"x":[{"p":2,"q":1}],"y":1}}"#).unwrap();
        assert_eq!(canonical_hash(&a), canonical_hash(&b));

        // The sorting fallback, for maps that keep insertion order.
        let (k1, k2) = ("a".to_owned(), "b".to_owned());
        let (v1, v2) = (json!(1), json!([true]));
        let hash = |entries: &[(&String, &Value)]| {
            let mut hasher = DefaultHasher::new();
            hash_object(entries.iter().copied(), entries.len(), &mut hasher);
            hasher.finish()
        };
        assert_eq!(
            hash(&[(&k2, &v2), (&k1, &v1)]),
            hash(&[(&k1, &v1), (&k2, &v2)])
        );
        assert_ne!(
            hash(&[(&k1, &v2), (&k2, &v1)]),
            hash(&[(&k1, &v1), (&k2, &v2)])
        );
    }

    #[test]
    fn canonical_hash_tells_values_apart() {
        let hashes: Vec<u64> = [
            json!({}),
            json!({"a": null}),
            json!({"a": false}),
            json!({"a": 0}),
            json!({"a": "0"}),
            json!({"a": []}),
            json!({"a": {}}),
            json!({"a": [null]}),
            json!({"a": [[]]}),
            json!({"a": ["x", "y"]}),
            json!({"a": ["xy"]}),
            json!({"a": 1.0}),
            json!({"a": 1}),
            json!({"ab": 1}),
        ]
        .iter()
        .map(|v| canonical_hash(v.as_object().unwrap()))
        .collect();
        let mut unique = hashes.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), hashes.len());
    }

    #[tokio::test]
    async fn raw_payloads_are_never_duplicates() {
        let (calls, handler) = counting(|| Outcome::Handled);
        let svc = Dedup::new(handler);
        for _ in 0..3 {
            let mut req = msg("t", json!({"x": 1}));
            req.extensions_mut()
                .insert(RawPayload::new(bytes::Bytes::from_static(br#"{"x":1}"#)));
            assert!(matches!(send(&svc, req).await, Outcome::Handled));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn of_two_concurrent_copies_exactly_one_reaches_the_handler() {
        let (mock, mut handle) = mock::pair::<Request<Envelope>, Outcome>();
        let svc = DedupLayer::new().layer(mock);
        handle.allow(2);
        let first = tokio::spawn(svc.clone().oneshot(msg("t", json!({"x": 1}))));
        let (_req, respond) = handle.next_request().await.unwrap();
        // The first is still running: the copy is answered at once.
        let second = svc
            .clone()
            .oneshot(msg("t", json!({"x": 1})))
            .await
            .unwrap();
        assert!(matches!(second, Outcome::Duplicate));
        respond.send_response(Outcome::Handled);
        assert!(matches!(first.await.unwrap().unwrap(), Outcome::Handled));
        assert!(futures_util::FutureExt::now_or_never(handle.next_request()).is_none());
    }

    #[test]
    fn concurrent_claims_on_threads_admit_one() {
        let seen = Seen::new(DEFAULT_TTL, DEFAULT_MAX_ENTRIES);
        let key = DedupKey::new(msg("t", json!({"x": 1})).body());
        let barrier = Arc::new(std::sync::Barrier::new(8));
        let admitted: usize = (0..8)
            .map(|_| {
                let (seen, key, barrier) = (seen.clone(), key.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    seen.claim(key).map(|mut claim| claim.keep()).is_ok()
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|thread| usize::from(thread.join().unwrap()))
            .sum();
        assert_eq!(admitted, 1);
    }

    #[tokio::test]
    async fn a_failed_message_is_handled_again_on_redelivery() {
        let (calls, handler) = counting(|| Outcome::Failed(HandlerError::new("db down")));
        let svc = Dedup::new(handler);
        for _ in 0..2 {
            assert!(send(&svc, msg("t", json!({"x": 1}))).await.is_failed());
        }
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_error_or_a_dropped_future_releases_the_key() {
        let (mock, mut handle) = mock::pair::<Request<Envelope>, Outcome>();
        let svc = Dedup::new(mock);
        // Four calls: a duplicate too waits for the inner service's readiness.
        handle.allow(4);

        let call = svc.clone().oneshot(msg("t", json!({"x": 1})));
        let (result, ()) = tokio::join!(call, async {
            let (_, respond) = handle.next_request().await.unwrap();
            respond.send_error(std::io::Error::other("boom"));
        });
        assert!(result.is_err());

        // Redelivered, and this time the caller gives up (a timeout, a shutdown).
        let mut call = Box::pin(svc.clone().oneshot(msg("t", json!({"x": 1}))));
        let pending =
            std::future::poll_fn(|cx| Poll::Ready(call.as_mut().poll(cx).is_pending())).await;
        assert!(pending);
        let (_, _respond) = handle.next_request().await.unwrap();
        drop(call);

        // Redelivered again: handled.
        let call = svc.clone().oneshot(msg("t", json!({"x": 1})));
        let (result, ()) = tokio::join!(call, async {
            let (_, respond) = handle.next_request().await.unwrap();
            respond.send_response(Outcome::Handled);
        });
        assert!(matches!(result.unwrap(), Outcome::Handled));
        assert!(matches!(
            svc.oneshot(msg("t", json!({"x": 1}))).await.unwrap(),
            Outcome::Duplicate
        ));
    }

    #[tokio::test]
    async fn unrouted_and_duplicate_outcomes_keep_the_key() {
        let (calls, handler) = counting(|| Outcome::Unrouted);
        let svc = Dedup::new(handler);
        assert!(matches!(
            send(&svc, msg("t", json!({}))).await,
            Outcome::Unrouted
        ));
        assert!(matches!(
            send(&svc, msg("t", json!({}))).await,
            Outcome::Duplicate
        ));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_copy_after_the_ttl_is_handled_again() {
        let (calls, handler) = counting(|| Outcome::Handled);
        let svc = Dedup::with_limits(handler, Duration::from_secs(30), 16);
        assert!(matches!(
            send(&svc, msg("t", json!({}))).await,
            Outcome::Handled
        ));
        tokio::time::advance(Duration::from_secs(29)).await;
        assert!(matches!(
            send(&svc, msg("t", json!({}))).await,
            Outcome::Duplicate
        ));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(matches!(
            send(&svc, msg("t", json!({}))).await,
            Outcome::Handled
        ));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_failure_does_not_release_a_newer_claim() {
        let (mock, mut handle) = mock::pair::<Request<Envelope>, Outcome>();
        let svc = Dedup::new(mock);
        handle.allow(3);
        let old = tokio::spawn(svc.clone().oneshot(msg("t", json!({}))));
        let (_, respond_old) = handle.next_request().await.unwrap();
        tokio::time::advance(DEFAULT_TTL).await;
        let new = tokio::spawn(svc.clone().oneshot(msg("t", json!({}))));
        let (_, respond_new) = handle.next_request().await.unwrap();

        respond_old.send_response(Outcome::Failed(HandlerError::new("slow and failed")));
        assert!(old.await.unwrap().unwrap().is_failed());
        // The newer attempt still holds the key.
        assert!(matches!(
            svc.clone().oneshot(msg("t", json!({}))).await.unwrap(),
            Outcome::Duplicate
        ));
        respond_new.send_response(Outcome::Handled);
        assert!(matches!(new.await.unwrap().unwrap(), Outcome::Handled));
    }

    #[test]
    fn limits_reach_the_cache() {
        let layer = DedupLayer::new();
        let policy = layer.seen.cache.policy();
        assert_eq!(policy.time_to_live(), Some(DEFAULT_TTL));
        assert_eq!(policy.max_capacity(), Some(DEFAULT_MAX_ENTRIES));
        let layer = DedupLayer::with_limits(Duration::from_secs(5), 10);
        let policy = layer.seen.cache.policy();
        assert_eq!(policy.time_to_live(), Some(Duration::from_secs(5)));
        assert_eq!(policy.max_capacity(), Some(10));
        assert!(format!("{layer:?}").contains("max_entries: 10"));
    }

    #[tokio::test]
    async fn the_oldest_keys_are_evicted_beyond_max_entries() {
        let (calls, handler) = counting(|| Outcome::Handled);
        let layer = DedupLayer::with_limits(DEFAULT_TTL, 4);
        let svc = layer.layer(handler);
        for n in 0..8 {
            send(&svc, msg("t", json!({"n": n}))).await;
            layer.seen.cache.run_pending_tasks();
        }
        assert!(layer.seen.cache.entry_count() <= 4);
        // The newest is remembered, the oldest is not.
        assert!(matches!(
            send(&svc, msg("t", json!({"n": 7}))).await,
            Outcome::Duplicate
        ));
        assert!(matches!(
            send(&svc, msg("t", json!({"n": 0}))).await,
            Outcome::Handled
        ));
        assert_eq!(calls.load(Ordering::SeqCst), 9);
    }

    #[tokio::test(start_paused = true)]
    async fn a_timed_out_handler_releases_the_key() {
        // Dedup -> tower's Timeout -> handler: the timeout's error is a failure.
        let slow = Arc::new(AtomicUsize::new(0));
        let counter = slow.clone();
        let svc = ServiceBuilder::new()
            .layer(DedupLayer::new())
            .timeout(Duration::from_secs(1))
            .service(tower::service_fn(move |_req: Request<Envelope>| {
                let first = counter.fetch_add(1, Ordering::SeqCst) == 0;
                async move {
                    if first {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                    }
                    Ok::<_, Infallible>(Outcome::Handled)
                }
            }));
        let err = svc.clone().oneshot(msg("t", json!({}))).await.unwrap_err();
        assert!(err.is::<tower::timeout::error::Elapsed>());
        let outcome = svc.clone().oneshot(msg("t", json!({}))).await.unwrap();
        assert!(matches!(outcome, Outcome::Handled));
        assert_eq!(slow.load(Ordering::SeqCst), 2);
    }
}
