//! The keys seen, in a moka cache: [`Store`] and the [`Claim`] on a key.

use std::{
    fmt,
    hash::{BuildHasherDefault, Hasher},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, PoisonError,
    },
    time::Duration,
};

use moka::{policy::EvictionPolicy, sync::Cache};
use tokio::time::Instant;

use super::key::DedupKey;

/// A claim on a key: who made it (so only they release it) and when.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Claimed {
    token: u64,
    at: Instant,
}

static NEXT_TOKEN: AtomicU64 = AtomicU64::new(0);

/// How many locks the keys are spread over.
const SHARDS: usize = 64;

/// The keys seen, shared by every clone of a layer and its services.
///
/// A claim is a plain `insert` into the cache, made atomic by a lock per
/// shard of keys: every change to a key (claim, release) happens under its
/// shard's lock, so of two claims on one key exactly one finds it absent. The
/// cache's own atomic entry API would do the same without the locks, at about
/// twice the cost per new key.
pub(crate) struct Store {
    pub(crate) cache: Cache<DedupKey, Claimed, BuildHasherDefault<KeyHasher>>,
    locks: [Mutex<()>; SHARDS],
    ttl: Duration,
}

impl Store {
    pub(crate) fn new(ttl: Duration, max_entries: u64) -> Arc<Self> {
        let cache = Cache::builder()
            .max_capacity(max_entries)
            .time_to_live(ttl)
            // Plain LRU: the default TinyLFU admission would refuse new keys once
            // full, and a refused key is a duplicate that goes unnoticed.
            .eviction_policy(EvictionPolicy::lru())
            // A key is already a keyed hash: hashing it again is wasted work.
            .build_with_hasher(BuildHasherDefault::default());
        Arc::new(Self {
            cache,
            locks: std::array::from_fn(|_| Mutex::new(())),
            ttl,
        })
    }

    fn lock(&self, key: DedupKey) -> std::sync::MutexGuard<'_, ()> {
        // Nothing is guarded but the order of changes: a poisoned lock is fine.
        self.locks[key.shard(SHARDS)]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Claims `key`; gives it back if it is already claimed.
    pub(crate) fn claim(self: &Arc<Self>, key: DedupKey) -> Result<Claim, DedupKey> {
        let _locked = self.lock(key);
        // `contains_key` first: unlike `get`, a miss costs no bookkeeping.
        if self.cache.contains_key(&key) {
            if let Some(claimed) = self.cache.get(&key) {
                if claimed.at.elapsed() < self.ttl {
                    return Err(key);
                }
            }
        }
        let token = NEXT_TOKEN.fetch_add(1, Ordering::Relaxed);
        self.cache.insert(
            key,
            Claimed {
                token,
                at: Instant::now(),
            },
        );
        Ok(Claim {
            store: self.clone(),
            key: Some(key),
            token,
        })
    }

    /// Forgets `key`, unless someone else claimed it since (after the TTL).
    fn release(&self, key: DedupKey, token: u64) {
        let _locked = self.lock(key);
        if self
            .cache
            .get(&key)
            .is_some_and(|claimed| claimed.token == token)
        {
            self.cache.invalidate(&key);
        }
    }
}

/// A claimed key; released when dropped unless [kept](Claim::keep).
pub(crate) struct Claim {
    store: Arc<Store>,
    key: Option<DedupKey>,
    token: u64,
}

impl Claim {
    /// Keeps the key claimed: the message was handled.
    pub(crate) fn keep(&mut self) {
        self.key = None;
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            tracing::debug!(%key, "releasing the dedup key of a message that was not handled");
            self.store.release(key, self.token);
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

/// Hands the cache the low 64 bits of a [`DedupKey`], which is already a
/// keyed hash.
#[derive(Default)]
pub(crate) struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Not reached for `DedupKey`, which writes one `u128`; mixed in anyway
        // so that the hasher stays correct for any input.
        for &byte in bytes {
            self.0 = (self.0.rotate_left(5) ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn write_u128(&mut self, n: u128) {
        #[allow(clippy::cast_possible_truncation)]
        {
            self.0 ^= n as u64;
        }
    }
}
