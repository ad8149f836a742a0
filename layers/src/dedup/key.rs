//! The fleet's dedup key, as a 128-bit fingerprint: [`DedupKey`].

use std::{
    fmt,
    hash::{BuildHasher, Hash, Hasher},
    sync::OnceLock,
};

use foldhash::quality::{FoldHasher, RandomState};

use serde_json::{Map, Value};
use tower_mqtt_core::Envelope;

/// What identifies an envelope for deduplication; see the
/// [module docs](super).
///
/// The fleet keys a message as `type|id|seq=N` when `data.seq` is an integer,
/// else as `type|id|<hash of data>` with `data` in canonical form (keys sorted
/// at every level, whatever order they arrived in). A `DedupKey` is a keyed
/// 128-bit hash of exactly those parts: 16 bytes, `Copy`, built without
/// allocating. The hash keys are random per process, so keys cannot be
/// crafted to collide and are not comparable across processes.
///
/// ```
/// use serde_json::json;
/// use tower_mqtt::Envelope;
/// use tower_mqtt::layers::dedup::DedupKey;
///
/// // Stream chunks share their id; the seq tells them apart.
/// let chunk = |seq: i64| Envelope::new("llm.stream", json!({"seq": seq, "delta": "lo"})).unwrap().with_id("ab12");
/// assert_ne!(DedupKey::new(&chunk(3)), DedupKey::new(&chunk(4)));
/// assert_eq!(DedupKey::new(&chunk(3)), DedupKey::new(&chunk(3).with_ts(0.0)));
///
/// // Without an integer seq, the data decides; key order does not matter.
/// let a = Envelope::from_slice(br#"{"id":"ab12","type":"t","data":{"x":1,"y":[true,null]}}"#).unwrap();
/// let b = Envelope::from_slice(br#"{"id":"ab12","type":"t","data":{"y":[true,null],"x":1}}"#).unwrap();
/// assert_eq!(DedupKey::new(&a), DedupKey::new(&b));
/// assert_eq!(DedupKey::new(&a).to_string().len(), 32);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DedupKey(u128);

impl DedupKey {
    /// The key of `envelope`.
    pub fn new(envelope: &Envelope) -> Self {
        let mut hasher = Fingerprint::new();
        // Lengths first, so that the type and the id cannot trade bytes at
        // their border (`ab|c` and `a|bc`).
        hasher.write_usize(envelope.event_type().len());
        hasher.write(envelope.event_type().as_bytes());
        hasher.write_usize(envelope.id().len());
        hasher.write(envelope.id().as_bytes());
        if let Some(seq) = envelope.seq() {
            hasher.write_u8(b's');
            hasher.write_i64(seq);
        } else {
            hasher.write_u8(b'd');
            hash_object(envelope.data(), &mut hasher);
        }
        Self(hasher.finish128())
    }

    /// Which of `shards` this key falls in.
    pub(crate) fn shard(self, shards: usize) -> usize {
        // The top bits: the cache's hasher takes the low ones.
        #[allow(clippy::cast_possible_truncation)]
        let top = (self.0 >> 96) as usize;
        top % shards
    }
}

impl fmt::Display for DedupKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for DedupKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("DedupKey")
            .field(&format_args!("{self}"))
            .finish()
    }
}

/// Two hash streams with independent random seeds, read as one 128-bit hash.
///
/// foldhash rather than the standard library's `SipHash`: the key is built for
/// every message, and two `SipHash` passes over the data cost about as much as
/// decoding it.
pub(crate) struct Fingerprint<H = FoldHasher> {
    high: H,
    low: H,
}

impl Fingerprint {
    fn new() -> Self {
        static KEYS: OnceLock<(RandomState, RandomState)> = OnceLock::new();
        let (high, low) = KEYS.get_or_init(|| (RandomState::default(), RandomState::default()));
        let mut low = low.build_hasher();
        // A domain byte keeps the two streams apart, whatever their seeds.
        low.write_u8(0xa5);
        Self {
            high: high.build_hasher(),
            low,
        }
    }

    fn finish128(&self) -> u128 {
        (u128::from(self.high.finish()) << 64) | u128::from(self.low.finish())
    }
}

impl<H: Hasher> Hasher for Fingerprint<H> {
    fn finish(&self) -> u64 {
        self.high.finish() ^ self.low.finish()
    }

    fn write(&mut self, bytes: &[u8]) {
        self.high.write(bytes);
        self.low.write(bytes);
    }
}

/// Hashes `data` in canonical form: keys sorted at every level.
///
/// Walking the value hashes the same thing as printing it with sorted keys and
/// hashing the text, without building the text. `serde_json`'s map keeps keys
/// sorted unless its `preserve_order` feature is on somewhere in the build; the
/// entries are sorted here whenever they are not.
pub(crate) fn hash_object<H: Hasher>(object: &Map<String, Value>, hasher: &mut H) {
    hash_entries(object.iter(), object.len(), hasher);
}

pub(crate) fn hash_entries<'a, I, H>(entries: I, len: usize, hasher: &mut H)
where
    I: Iterator<Item = (&'a String, &'a Value)> + Clone,
    H: Hasher,
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

fn hash_value<H: Hasher>(value: &Value, hasher: &mut H) {
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
        Value::Object(object) => hash_object(object, hasher),
    }
}
