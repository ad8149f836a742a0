//! The retry budget both retry policies draw on: [`RetryBudget`], and the
//! handle the policies share it by.
//!
//! Written here instead of using tower's [`TpsBudget`] because of one
//! measurement: `TpsBudget` locks a mutex and reads the clock on every
//! deposit, that is on every message, and on the 2-core development machine
//! that is 59 to 68 ns a deposit (`parts/budget_deposit_tps` in
//! `benches/inbound.rs`) against 11 to 12 ns for this one's atomic add
//! (`parts/budget_deposit`). The rule is tower's; only when the clock is read
//! differs (see [`RetryBudget`]).

use std::{
    fmt,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, PoisonError,
    },
    time::Duration,
};

use tokio::time::Instant;
use tower::retry::budget::Budget;
#[cfg(doc)]
use tower::retry::budget::TpsBudget;

/// The window is kept as this many parts, each of a tenth of it, as
/// `TpsBudget` keeps it.
const SLOTS: usize = 10;

/// A [`RetryBudget`] reads the clock on every this many deposits, and counts
/// at most this many requests fewer than were made over its window.
///
/// ```
/// assert_eq!(tower_mqtt::layers::retry::DEPOSITS_PER_CLOCK_READ, 32);
/// ```
pub const DEPOSITS_PER_CLOCK_READ: u64 = 32;

/// The retry budget: retries may add a ratio of the requests made over a
/// window, plus a reserve of retries a second, so that a broken dependency
/// does not turn every message into several.
///
/// Retries may add `retry_ratio` times the requests made over the last
/// `window`, plus `min_per_sec` retries a second of it: by default 20 % over
/// 10 s plus 10 a second. That is the rule of tower's [`TpsBudget`], with
/// its defaults; like it, the window moves on in tenths.
///
/// What differs is the clock. A deposit (one per request) is one atomic add;
/// the clock is read on every [`DEPOSITS_PER_CLOCK_READ`]th deposit and on
/// every withdrawal (a retry about to be made), and that is when the window
/// moves on. Requests made since the clock was last read are counted from
/// that reading, as if made then, so they may leave the window early, never
/// late: the budget counts at most `DEPOSITS_PER_CLOCK_READ` (32) requests
/// fewer than were made over the window, never more. At the default ratio
/// that is at most 7 retries fewer, on top of a reserve of 100.
///
/// The budget is one per layer: every service a retry layer makes, and every
/// clone, draws on the same one. Any other tower [`Budget`] (`TpsBudget`
/// included) can be given to a retry layer instead.
///
/// ```
/// use std::time::Duration;
/// use tower::retry::budget::Budget;
/// use tower_mqtt::layers::retry::RetryBudget;
///
/// // No reserve: only what requests earn, one retry per two requests.
/// let budget = RetryBudget::new(Duration::from_secs(10), 0, 0.5);
/// assert!(!budget.withdraw());
/// budget.deposit();
/// budget.deposit();
/// assert!(budget.withdraw());
/// assert!(!budget.withdraw());
/// ```
pub struct RetryBudget {
    /// Every deposit ever made; the one thing a deposit touches.
    deposits: AtomicU64,
    ledger: Mutex<Ledger>,
    slot_length: Duration,
    /// Retries the reserve allows over the window.
    reserve: f64,
    retry_ratio: f64,
    window: Duration,
    min_per_sec: u32,
}

/// The window, in [`SLOTS`] parts.
#[derive(Debug)]
struct Ledger {
    slots: [Slot; SLOTS],
    /// The part of the window that is current.
    current: usize,
    /// When the current part began.
    current_since: Instant,
}

#[derive(Clone, Copy, Debug, Default)]
struct Slot {
    /// The count of deposits when this part of the window began: every
    /// deposit before it counts as made before.
    deposits_before: u64,
    /// Retries withdrawn during it.
    retries: u64,
}

impl RetryBudget {
    /// Retries may add `retry_ratio` times the requests of the last `window`
    /// (0.2 is 20 %), plus `min_per_sec` retries a second.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_mqtt::layers::{retry::RetryBudget, MessageRetryLayer};
    ///
    /// // Retries may add 10 % over 30 s, plus 1 a second.
    /// let retry = MessageRetryLayer::new(3).budget(RetryBudget::new(Duration::from_secs(30), 1, 0.1));
    /// ```
    ///
    /// # Panics
    ///
    /// With the limits of `TpsBudget::new`: when `window` is under 1 s or over
    /// 60 s, or `retry_ratio` is negative, NaN or over 1000.
    #[track_caller]
    pub fn new(window: Duration, min_per_sec: u32, retry_ratio: f32) -> Self {
        assert!(
            (Duration::from_secs(1)..=Duration::from_secs(60)).contains(&window),
            "a retry budget's window must be 1 to 60 s, not {window:?}"
        );
        assert!(
            (0.0..=1000.0).contains(&retry_ratio),
            "a retry budget's ratio must be 0 to 1000, not {retry_ratio}"
        );
        Self {
            deposits: AtomicU64::new(0),
            ledger: Mutex::new(Ledger {
                slots: [Slot::default(); SLOTS],
                current: 0,
                current_since: Instant::now(),
            }),
            slot_length: window / u32::try_from(SLOTS).expect("a small constant"),
            reserve: f64::from(min_per_sec) * window.as_secs_f64(),
            retry_ratio: f64::from(retry_ratio),
            window,
            min_per_sec,
        }
    }

    /// The retries the budget would allow now.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_mqtt::layers::retry::RetryBudget;
    ///
    /// // A reserve of 1 retry a second over 10 s.
    /// assert_eq!(RetryBudget::new(Duration::from_secs(10), 1, 0.0).available(), 10);
    /// ```
    pub fn available(&self) -> u64 {
        let ledger = self.ledger();
        let (earned, spent) = ledger.balance(self.deposits.load(Ordering::Relaxed));
        self.allowed(earned).saturating_sub(spent)
    }

    /// What `earned` deposits and the reserve allow, whole retries.
    fn allowed(&self, earned: u64) -> u64 {
        // Precision is lost only beyond 2^52 requests in one window.
        #[allow(
            clippy::cast_precision_loss,
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss
        )]
        {
            (self.reserve + self.retry_ratio * earned as f64).floor() as u64
        }
    }

    /// The ledger, moved on to now.
    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        // The ledger holds counts only, changed in one call: a poisoned lock
        // holds nothing half-done.
        let mut ledger = self.ledger.lock().unwrap_or_else(PoisonError::into_inner);
        ledger.move_on(
            Instant::now(),
            self.slot_length,
            self.deposits.load(Ordering::Relaxed),
        );
        ledger
    }
}

impl Ledger {
    /// Starts the parts of the window that began by `now`; the deposits so
    /// far all belong to the parts before.
    fn move_on(&mut self, now: Instant, slot_length: Duration, deposits: u64) {
        let elapsed = now.saturating_duration_since(self.current_since);
        let started = elapsed.as_nanos() / slot_length.as_nanos().max(1);
        if started == 0 {
            return;
        }
        for _ in 0..started.min(SLOTS as u128) {
            self.current = (self.current + 1) % SLOTS;
            self.slots[self.current] = Slot {
                deposits_before: deposits,
                retries: 0,
            };
        }
        let started = u32::try_from(started).unwrap_or(u32::MAX);
        self.current_since = self
            .current_since
            .checked_add(slot_length.saturating_mul(started))
            .filter(|&since| since <= now)
            .unwrap_or(now);
    }

    /// The deposits and the retries of the window.
    fn balance(&self, deposits: u64) -> (u64, u64) {
        let oldest = self.slots[(self.current + 1) % SLOTS];
        let earned = deposits.saturating_sub(oldest.deposits_before);
        let spent = self.slots.iter().map(|slot| slot.retries).sum();
        (earned, spent)
    }
}

impl Budget for RetryBudget {
    fn deposit(&self) {
        let before = self.deposits.fetch_add(1, Ordering::Relaxed);
        if before % DEPOSITS_PER_CLOCK_READ == DEPOSITS_PER_CLOCK_READ - 1 {
            drop(self.ledger());
        }
    }

    fn withdraw(&self) -> bool {
        let mut ledger = self.ledger();
        let (earned, spent) = ledger.balance(self.deposits.load(Ordering::Relaxed));
        if spent >= self.allowed(earned) {
            return false;
        }
        let current = ledger.current;
        ledger.slots[current].retries += 1;
        true
    }
}

impl Default for RetryBudget {
    /// 20 % over 10 s plus 10 retries a second, as `TpsBudget::default()`.
    fn default() -> Self {
        Self::new(Duration::from_secs(10), 10, 0.2)
    }
}

impl fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryBudget")
            .field("window", &self.window)
            .field("min_per_sec", &self.min_per_sec)
            .field("retry_ratio", &self.retry_ratio)
            .field("available", &self.available())
            .finish_non_exhaustive()
    }
}

/// The budget of one layer, shared by every clone of its policy and so by
/// every service it makes.
#[derive(Clone)]
pub(crate) struct SharedBudget(Arc<dyn Budget + Send + Sync>);

impl SharedBudget {
    pub(crate) fn new(budget: impl Budget + Send + Sync + 'static) -> Self {
        Self(Arc::new(budget))
    }

    /// A request was made: retries may grow with the load.
    pub(crate) fn deposit(&self) {
        self.0.deposit();
    }

    /// Takes one retry from the budget; `false` when none is left.
    pub(crate) fn withdraw(&self) -> bool {
        self.0.withdraw()
    }
}

impl Default for SharedBudget {
    fn default() -> Self {
        Self::new(RetryBudget::default())
    }
}

impl fmt::Debug for SharedBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SharedBudget")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deposit(budget: &RetryBudget, n: u64) {
        for _ in 0..n {
            budget.deposit();
        }
    }

    fn withdraw_all(budget: &RetryBudget) -> u64 {
        let mut taken = 0;
        while budget.withdraw() {
            taken += 1;
        }
        taken
    }

    #[tokio::test(start_paused = true)]
    async fn the_reserve_is_per_second_of_the_window() {
        let budget = RetryBudget::new(Duration::from_secs(2), 3, 0.0);
        assert_eq!(budget.available(), 6);
        assert_eq!(withdraw_all(&budget), 6);
        // Retries leave the window as requests do.
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(withdraw_all(&budget), 6);
    }

    #[tokio::test(start_paused = true)]
    async fn requests_earn_their_ratio_for_one_window() {
        let budget = RetryBudget::new(Duration::from_secs(10), 0, 0.2);
        deposit(&budget, 100);
        assert_eq!(budget.available(), 20);
        assert_eq!(withdraw_all(&budget), 20);
        // Nine seconds later the hundred still count, and so do the retries
        // taken on them.
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(budget.available(), 0);
        deposit(&budget, 10);
        assert_eq!(withdraw_all(&budget), 2);
        // A window after the hundred, only the ten count, and their two
        // retries are spent.
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert_eq!(budget.available(), 0);
        // A window later still, nothing is left; ten more earn two.
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(budget.available(), 0);
        deposit(&budget, 10);
        assert_eq!(budget.available(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn requests_since_the_last_clock_read_may_leave_early_never_late() {
        let budget = RetryBudget::new(Duration::from_secs(10), 0, 1.0);
        tokio::time::advance(Duration::from_secs(6)).await;
        // Too few to read the clock: counted as made at 0 s, when it was
        // last read.
        deposit(&budget, DEPOSITS_PER_CLOCK_READ - 1);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(budget.available(), 0, "made at 6 s, gone at 11 s");
        // Made after a reading (the call above), they count a whole window.
        deposit(&budget, 5);
        tokio::time::advance(Duration::from_millis(9900)).await;
        assert_eq!(budget.available(), 5);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(budget.available(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn every_so_many_deposits_read_the_clock() {
        let per_read = DEPOSITS_PER_CLOCK_READ;
        let budget = RetryBudget::new(Duration::from_secs(10), 0, 1.0);
        deposit(&budget, per_read);
        tokio::time::advance(Duration::from_secs(6)).await;
        // The last of these reads the clock; all of them count as made
        // before it, at 0 s.
        deposit(&budget, per_read);
        // These count from 6 s.
        deposit(&budget, per_read);
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(budget.available(), per_read);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(budget.available(), 0);
    }

    #[test]
    #[should_panic(expected = "window must be 1 to 60 s")]
    fn a_window_out_of_range_fails_at_build_time() {
        let _ = RetryBudget::new(Duration::from_millis(500), 1, 0.1);
    }

    #[test]
    #[should_panic(expected = "ratio must be 0 to 1000")]
    fn a_negative_ratio_fails_at_build_time() {
        let _ = RetryBudget::new(Duration::from_secs(1), 1, -0.1);
    }
}
