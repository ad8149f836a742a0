//! The load every consumer gets, and what a consumer records of it.
//!
//! A message is a fleet envelope of about 200 bytes on [`TOPIC`]:
//! `{"id": <uuid4 hex>, "type": "bench.load", "ts": <epoch secs>, "source":
//! "bench", "data": {"seq": N, "pad": "..."}}`. `seq` numbers the messages of a
//! case from 0, so a consumer can tell a first delivery from a second one; `ts`
//! is stamped when the publisher hands the message to its client, so a consumer
//! can tell how long it took to arrive.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::{Map, Value};

/// The topic the publisher sends to.
pub(crate) const TOPIC: &str = "bench/load";
/// The filter every consumer subscribes to.
pub(crate) const FILTER: &str = "bench/#";
/// The topic the publish scenario sends to; nobody subscribes to it.
pub(crate) const PUBLISH_TOPIC: &str = "e2e/publish";
/// The event type of every message.
pub(crate) const EVENT_TYPE: &str = "bench.load";
/// Filler that brings a message to about 200 bytes.
pub(crate) const PAD: &str = "the quick brown fox jumps over the lazy dog, then naps in the sun";

/// Seconds since the Unix epoch, as the fleet's `time.time()`.
pub(crate) fn now_epoch() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |elapsed| elapsed.as_secs_f64())
}

/// The payload of message `seq`, with a fresh id and the current time.
pub(crate) fn payload(seq: u64) -> Vec<u8> {
    let id = uuid::Uuid::new_v4().simple();
    // `f64`'s `Display` never uses an exponent, so this is a JSON number.
    let ts = now_epoch();
    format!(
        r#"{{"id":"{id}","type":"{EVENT_TYPE}","ts":{ts},"source":"bench","data":{{"seq":{seq},"pad":"{PAD}"}}}}"#
    )
    .into_bytes()
}

/// The envelope as a raw consumer decodes it: exactly the five keys, as the
/// fleet's strict model does.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WireEnvelope {
    /// uuid4 hex.
    pub(crate) id: String,
    /// The event type.
    #[serde(rename = "type")]
    pub(crate) event_type: String,
    /// Epoch seconds when it was published.
    pub(crate) ts: f64,
    /// The emitting service.
    pub(crate) source: String,
    /// The payload object.
    pub(crate) data: Map<String, Value>,
}

impl WireEnvelope {
    /// `data.seq`, when it is a non-negative integer.
    pub(crate) fn seq(&self) -> Option<u64> {
        self.data.get("seq").and_then(Value::as_u64)
    }
}

/// What a consumer saw: deliveries per `seq`, when the last new one arrived,
/// and, when asked, the latency of each.
#[derive(Debug)]
pub(crate) struct Recorder {
    /// Deliveries of each `seq` in `0..expected`, saturating at 255.
    seen: Vec<u8>,
    /// Messages received, including repeats and strays.
    pub(crate) received: u64,
    /// Distinct `seq` values received.
    pub(crate) unique: u64,
    /// `seq` values received more than once.
    pub(crate) twice: u64,
    /// Epoch seconds when the first message arrived.
    pub(crate) first_epoch: Option<f64>,
    /// Epoch seconds when the last new `seq` arrived.
    pub(crate) last_new_epoch: Option<f64>,
    /// `now - ts` of every message, in microseconds, when latency is measured.
    latencies_us: Option<Vec<f64>>,
    /// Why the consumer stopped early, if it did.
    pub(crate) error: Option<String>,
}

impl Recorder {
    /// A recorder for `seq` values `0..expected`.
    pub(crate) fn new(expected: u64, latency: bool) -> Self {
        let expected = usize::try_from(expected).expect("fits in memory");
        Self {
            seen: vec![0; expected],
            received: 0,
            unique: 0,
            twice: 0,
            first_epoch: None,
            last_new_epoch: None,
            latencies_us: latency.then(|| Vec::with_capacity(expected)),
            error: None,
        }
    }

    /// Records one delivery of message `seq`, published at `ts`.
    pub(crate) fn record(&mut self, seq: Option<u64>, ts: f64) {
        let now = now_epoch();
        self.received += 1;
        self.first_epoch.get_or_insert(now);
        if let Some(latencies) = &mut self.latencies_us {
            latencies.push((now - ts) * 1e6);
        }
        let Some(count) = seq
            .and_then(|seq| usize::try_from(seq).ok())
            .and_then(|seq| self.seen.get_mut(seq))
        else {
            return;
        };
        match *count {
            0 => {
                self.unique += 1;
                self.last_new_epoch = Some(now);
            }
            1 => self.twice += 1,
            _ => {}
        }
        *count = count.saturating_add(1);
    }

    /// The 50th and 99th percentile latency in microseconds, if measured.
    pub(crate) fn percentiles(&mut self) -> Option<(f64, f64)> {
        let latencies = self.latencies_us.as_mut()?;
        if latencies.is_empty() {
            return None;
        }
        latencies.sort_by(f64::total_cmp);
        Some((percentile(latencies, 0.50), percentile(latencies, 0.99)))
    }
}

/// The `q` quantile (0..=1) of sorted, non-empty `values`: the smallest value
/// with at least `q` of them at or below it.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    let rank = (q * crate::measure::to_f64(sorted.len() as u64)).ceil();
    let index = crate::measure::to_index(rank).saturating_sub(1);
    sorted[index.min(sorted.len() - 1)]
}

/// Checks that the load is what the docs say: about 200 bytes, a strict
/// envelope to both decoders, `seq` readable.
///
/// # Panics
///
/// When it is not; a harness measuring the wrong message is worse than none.
pub(crate) fn check_payload() {
    let bytes = payload(12_345);
    assert!((190..=230).contains(&bytes.len()), "{}", bytes.len());
    let env: WireEnvelope = serde_json::from_slice(&bytes).expect("a strict envelope");
    assert_eq!(env.seq(), Some(12_345));
    assert_eq!((env.id.len(), env.event_type.as_str()), (32, EVENT_TYPE));
    let env = tower_mqtt::Envelope::from_slice(&bytes).expect("a tower-mqtt envelope");
    assert_eq!(env.seq(), Some(12_345));
}
