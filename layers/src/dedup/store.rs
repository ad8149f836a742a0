//! The keys seen: [`Store`] and the [`Claim`] on a key.
//!
//! Every message that passes the layer is a new key, so the store is an
//! insert-heavy set of 16-byte keys with a time-to-live and a bound. It keeps
//! them in two generations of plain hash tables per shard: new keys go into
//! the young table; when it is full, or older than the time-to-live, the old
//! table is dropped whole and the young one takes its place. Lookups check
//! both. That costs a hash-table insert per message and 32 bytes per key plus
//! the table's slack, where a general cache (moka was measured) spends about
//! 1.5 µs and 370 bytes per entry on recency lists, timer wheels and
//! admission it has no use for here: no key is ever read twice unless it is a
//! duplicate.
//!
//! What that promises:
//! - a key is a duplicate for exactly the time-to-live after its claim (each
//!   entry carries its claim time), unless the bound pushed it out first;
//! - at most `max_entries` keys are held (two when it is one), and the newest
//!   half of them (per shard) are always among them;
//! - expired keys go without a scan: a young table older than the
//!   time-to-live is rotated out on the next claim, so nothing outlives two
//!   time-to-lives.

use std::{
    collections::HashMap,
    fmt,
    hash::{BuildHasherDefault, Hasher},
    mem,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use tokio::time::Instant;

use super::key::DedupKey;

/// The most locks the keys are spread over.
const MAX_SHARDS: usize = 16;
/// The fewest keys a shard is sized for: small stores get fewer shards, so
/// that their bound stays close to exact.
const MIN_SHARD_ENTRIES: u64 = 128;

/// A claimed key: when it was claimed, in nanoseconds since the store was
/// made. That also tells one claim of the key from another, so that only the
/// claimant releases it: a key is claimed again only once its entry has
/// expired, which takes time.
#[derive(Clone, Copy, Debug)]
struct Entry {
    at: u64,
}

type Table = HashMap<DedupKey, Entry, BuildHasherDefault<KeyHasher>>;

/// One lock's worth of keys, in two generations.
#[derive(Default)]
struct Shard {
    young: Table,
    old: Table,
    /// When `young` began taking keys, in nanoseconds since the store was made.
    young_since: u64,
}

impl Shard {
    /// Whether `key` is claimed and live; an expired entry of the old table
    /// is dropped, so that it cannot shadow a new claim. A new key costs two
    /// lookups.
    fn is_live(&mut self, key: &DedupKey, now: u64, ttl: u64) -> bool {
        let live = |entry: &Entry| now.saturating_sub(entry.at) < ttl;
        if let Some(entry) = self.young.get(key) {
            return live(entry);
        }
        match self.old.get(key) {
            Some(entry) if live(entry) => true,
            Some(_) => {
                self.old.remove(key);
                false
            }
            None => false,
        }
    }

    /// Makes room for one key in `young`: rotates when it is full or older
    /// than the time-to-live.
    fn make_room(&mut self, now: u64, ttl: u64, young_limit: usize) {
        if self.young.len() >= young_limit || now.saturating_sub(self.young_since) >= ttl {
            // The old table's allocation is reused: no regrowth per rotation.
            self.old.clear();
            mem::swap(&mut self.young, &mut self.old);
            self.young_since = now;
        }
    }
}

/// The keys seen, shared by every clone of a layer and its services; see the
/// [module docs](self).
///
/// Every change to a key (claim, release) happens under its shard's lock, so
/// of two claims on one key exactly one finds it absent.
pub(crate) struct Store {
    shards: Box<[Mutex<Shard>]>,
    /// Keys per shard's young table.
    young_limit: usize,
    ttl: Duration,
    ttl_nanos: u64,
    max_entries: u64,
    born: Instant,
}

impl Store {
    pub(crate) fn new(ttl: Duration, max_entries: u64) -> Arc<Self> {
        let max_entries = max_entries.max(1);
        let shards = usize::try_from(max_entries / MIN_SHARD_ENTRIES)
            .unwrap_or(MAX_SHARDS)
            .clamp(1, MAX_SHARDS);
        // Two generations share a shard's part of the bound.
        let per_shard = max_entries / shards as u64;
        let young_limit = usize::try_from(per_shard / 2).unwrap_or(usize::MAX).max(1);
        Arc::new(Self {
            shards: (0..shards).map(|_| Mutex::default()).collect(),
            young_limit,
            ttl,
            ttl_nanos: u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX),
            max_entries,
            born: Instant::now(),
        })
    }

    fn now(&self) -> u64 {
        u64::try_from(self.born.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn shard(&self, key: DedupKey) -> MutexGuard<'_, Shard> {
        // The tables hold plain data and every change is one call: a poisoned
        // lock holds nothing half-done.
        self.shards[key.shard(self.shards.len())]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Claims `key`; gives it back if it is already claimed.
    pub(crate) fn claim(self: &Arc<Self>, key: DedupKey) -> Result<Claim, DedupKey> {
        let now = self.now();
        let mut shard = self.shard(key);
        if shard.is_live(&key, now, self.ttl_nanos) {
            return Err(key);
        }
        shard.make_room(now, self.ttl_nanos, self.young_limit);
        shard.young.insert(key, Entry { at: now });
        drop(shard);
        Ok(Claim {
            store: self.clone(),
            key: Some(key),
            at: now,
        })
    }

    /// Forgets `key`, unless someone else claimed it since (after the TTL).
    fn release(&self, key: DedupKey, at: u64) {
        let mut guard = self.shard(key);
        let shard = &mut *guard;
        for table in [&mut shard.young, &mut shard.old] {
            if table.get(&key).is_some_and(|entry| entry.at == at) {
                table.remove(&key);
            }
        }
    }

    /// How long a key is remembered.
    #[cfg(test)]
    pub(crate) fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The most keys held at once.
    #[cfg(test)]
    pub(crate) fn max_entries(&self) -> u64 {
        self.max_entries
    }

    /// Keys held now, expired ones not yet dropped included.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| {
                let shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
                shard.young.len() + shard.old.len()
            })
            .sum()
    }
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("ttl", &self.ttl)
            .field("max_entries", &self.max_entries)
            .field("shards", &self.shards.len())
            .finish_non_exhaustive()
    }
}

/// A claimed key; released when dropped unless [kept](Claim::keep).
pub(crate) struct Claim {
    store: Arc<Store>,
    key: Option<DedupKey>,
    /// When it was claimed: which claim of the key this is.
    at: u64,
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
            self.store.release(key, self.at);
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

/// Hands the tables the low 64 bits of a [`DedupKey`], which is already a
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
