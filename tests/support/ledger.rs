//! How many times each numbered message was handled: the count a test asserts "lost"
//! and "handled twice" on.
//!
//! Messages carry their number as `data.seq` of a fleet envelope ([`Ledger::envelope`]);
//! the route's handler is [`Ledger::handler`], which records each run. Without the
//! dedup layer (`MQTT_DEDUPE_TTL=0`) every run of a handler is counted, so a message
//! the runtime ran twice shows up here instead of being hidden by dedup.
//!
//! ```ignore
//! let ledger = Ledger::new("matrix.seq");
//! let router = Router::new().route("t", ledger.handler());
//! // ... publish ledger.envelope(0..100) ...
//! assert!(ledger.wait_unique(100, WAIT).await);
//! let tally = ledger.tally(0..100);
//! assert!(tally.lost.is_empty() && tally.twice.is_empty(), "{tally:?}");
//! ```

use std::collections::BTreeMap;
use std::future::Ready;
use std::ops::Range;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::watch;
use tower_mqtt::{Envelope, Request};

/// Handling counts by sequence number, shared by clones.
#[derive(Clone, Debug)]
pub(crate) struct Ledger {
    event_type: &'static str,
    counts: Arc<Mutex<BTreeMap<u64, u32>>>,
    /// Handler runs so far, to wake waiters.
    runs: Arc<watch::Sender<u64>>,
}

/// What [`Ledger::tally`] found over a range of sequence numbers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Tally {
    /// Sequence numbers never handled.
    pub(crate) lost: Vec<u64>,
    /// Sequence numbers handled more than once, with their counts.
    pub(crate) twice: Vec<(u64, u32)>,
    /// Sequence numbers handled at least once.
    pub(crate) handled: usize,
}

impl Ledger {
    /// A ledger of envelopes of type `event_type`; others are ignored.
    pub(crate) fn new(event_type: &'static str) -> Ledger {
        Ledger {
            event_type,
            counts: Arc::default(),
            runs: Arc::new(watch::Sender::new(0)),
        }
    }

    /// The envelope for message `seq`, as published bytes.
    pub(crate) fn envelope(&self, seq: u64) -> Vec<u8> {
        Envelope::new(self.event_type, serde_json::json!({ "seq": seq }))
            .expect("a valid envelope")
            .to_vec()
    }

    /// A route handler that records every envelope of this ledger's type it runs for.
    pub(crate) fn handler(
        &self,
    ) -> impl Fn(Request<Envelope>) -> Ready<()> + Clone + Send + Sync + 'static {
        let ledger = self.clone();
        move |req: Request<Envelope>| {
            ledger.record(req.body());
            std::future::ready(())
        }
    }

    /// Records one run for `envelope`, if it is of this ledger's type and numbered.
    pub(crate) fn record(&self, envelope: &Envelope) {
        if envelope.event_type() != self.event_type {
            return;
        }
        if let Some(seq) = envelope
            .data()
            .get("seq")
            .and_then(serde_json::Value::as_u64)
        {
            self.record_seq(seq);
        }
    }

    /// Records one run for message `seq`.
    pub(crate) fn record_seq(&self, seq: u64) {
        *self.lock().entry(seq).or_default() += 1;
        self.runs.send_modify(|runs| *runs += 1);
    }

    /// How many times `seq` was handled.
    pub(crate) fn count(&self, seq: u64) -> u32 {
        self.lock().get(&seq).copied().unwrap_or_default()
    }

    /// Every handled sequence number with its count.
    pub(crate) fn counts(&self) -> BTreeMap<u64, u32> {
        self.lock().clone()
    }

    /// Waits until `n` distinct sequence numbers were handled; `false` if `timeout`
    /// passes first.
    pub(crate) async fn wait_unique(&self, n: usize, timeout: Duration) -> bool {
        self.wait_until(timeout, |counts| counts.len() >= n).await
    }

    /// Waits until every sequence number in `seqs` was handled; `false` if `timeout`
    /// passes first.
    pub(crate) async fn wait_all(
        &self,
        seqs: impl IntoIterator<Item = u64>,
        timeout: Duration,
    ) -> bool {
        let seqs: Vec<u64> = seqs.into_iter().collect();
        self.wait_until(timeout, |counts| {
            seqs.iter().all(|seq| counts.contains_key(seq))
        })
        .await
    }

    /// Waits until `done` holds for the counts, checked after every handler run.
    async fn wait_until(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&BTreeMap<u64, u32>) -> bool,
    ) -> bool {
        let mut runs = self.runs.subscribe();
        let reached = tokio::time::timeout(timeout, runs.wait_for(|_| done(&self.lock())))
            .await
            .is_ok();
        reached
    }

    /// Lost and handled-twice sequence numbers among `range`.
    pub(crate) fn tally(&self, range: Range<u64>) -> Tally {
        let counts = self.lock();
        let mut tally = Tally::default();
        for seq in range {
            match counts.get(&seq).copied().unwrap_or_default() {
                0 => tally.lost.push(seq),
                1 => tally.handled += 1,
                more => {
                    tally.handled += 1;
                    tally.twice.push((seq, more));
                }
            }
        }
        tally
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, u32>> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
