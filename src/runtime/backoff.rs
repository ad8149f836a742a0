//! Reconnect delays: exponential, capped, with full jitter.
//!
//! rumqttc reconnects on the very next `poll()` after an error, with no delay at
//! all. A fleet of services that all lose the broker at once would then hammer
//! it the moment it returns; a random delay between the minimum and an
//! exponentially growing cap spreads them out.

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
            attempt: 0,
        }
    }

    /// The delay before the next attempt: uniform between the minimum and
    /// `min * 2^(attempt + 1)`, capped at the maximum.
    pub(crate) fn next_delay(&mut self) -> Duration {
        // 2^(attempt + 1): even the first attempt spreads over [min, 2 min],
        // so clients that lost the same broker do not all return at once.
        let factor = 2f64.powi(i32::try_from(self.attempt.min(30)).unwrap_or(30) + 1);
        let cap = (self.min.as_secs_f64() * factor).min(self.max.as_secs_f64());
        self.attempt = self.attempt.saturating_add(1);
        let low = self.min.as_secs_f64();
        if cap <= low {
            return self.min;
        }
        Duration::from_secs_f64(rand::rng().random_range(low..=cap))
    }

    /// Starts over after a connection that stayed up.
    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_stay_within_bounds_and_grow() {
        let (min, max) = (Duration::from_millis(500), Duration::from_secs(5));
        let mut backoff = Backoff::new(min, max);
        let first = backoff.next_delay();
        assert!(first >= min && first <= min * 2, "{first:?}");
        let mut seen_max = Duration::ZERO;
        for _ in 0..200 {
            let delay = backoff.next_delay();
            assert!(delay >= min && delay <= max, "{delay:?}");
            seen_max = seen_max.max(delay);
        }
        assert!(
            seen_max > Duration::from_secs(3),
            "grows towards the cap: {seen_max:?}"
        );
        backoff.reset();
        assert!(backoff.next_delay() <= min * 2);
    }

    #[test]
    fn jitter_spreads_delays() {
        let mut a = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        for _ in 0..5 {
            a.next_delay();
        }
        let delays: std::collections::HashSet<u128> =
            (0..20).map(|_| a.next_delay().as_micros()).collect();
        assert!(delays.len() > 10, "delays should differ: {delays:?}");
    }
}
