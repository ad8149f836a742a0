//! Rate limits for log lines that input can trigger: [`LogLimit`].
//!
//! A flood of bad messages must not become a flood of log lines. A
//! [`LogLimit`] lets through at most a number of lines per second for each
//! reason, counts the lines it holds back, and hands that count to the next
//! line it lets through, so that nothing disappears without a trace.

use std::{
    sync::{Mutex, PoisonError},
    time::Duration,
};

use tokio::time::Instant;

/// The window a limit counts over.
const WINDOW: Duration = Duration::from_secs(1);

/// Lines per second and reason unless configured otherwise.
pub const DEFAULT_PER_SECOND: u32 = 10;

/// At most `per_second` lines per second for each of `N` reasons.
///
/// ```
/// use tower_mqtt_core::log_limit::LogLimit;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let limit = LogLimit::<1>::new(2);
/// assert_eq!(limit.admit(0), Some(0));
/// assert_eq!(limit.admit(0), Some(0));
/// assert_eq!(limit.admit(0), None); // held back, and counted
/// # }
/// ```
#[derive(Debug)]
pub struct LogLimit<const N: usize> {
    per_second: u32,
    windows: Mutex<[Window; N]>,
}

impl<const N: usize> Default for LogLimit<N> {
    fn default() -> Self {
        Self::new(DEFAULT_PER_SECOND)
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Window {
    started: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

impl<const N: usize> LogLimit<N> {
    /// A limit of `per_second` lines per second for each reason.
    pub fn new(per_second: u32) -> Self {
        Self {
            per_second,
            windows: Mutex::new([Window::default(); N]),
        }
    }

    /// Whether a line for `reason` may be logged now; if so, how many lines
    /// for it were held back since the last one logged.
    ///
    /// # Panics
    ///
    /// When `reason` is not below `N`.
    pub fn admit(&self, reason: usize) -> Option<u64> {
        let mut windows = self.windows.lock().unwrap_or_else(PoisonError::into_inner);
        let window = &mut windows[reason];
        let now = Instant::now();
        if window.started.is_none_or(|started| now - started >= WINDOW) {
            window.started = Some(now);
            window.logged = 0;
        }
        if window.logged < self.per_second {
            window.logged += 1;
            Some(std::mem::take(&mut window.suppressed))
        } else {
            window.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn at_most_n_per_second_per_reason_then_the_count() {
        let limit = LogLimit::<2>::new(3);
        let admitted: Vec<_> = (0..10).map(|_| limit.admit(0)).collect();
        assert_eq!(admitted[..3], [Some(0); 3]);
        assert!(admitted[3..].iter().all(Option::is_none));
        // Another reason has its own budget.
        assert_eq!(limit.admit(1), Some(0));

        tokio::time::advance(Duration::from_millis(999)).await;
        assert_eq!(limit.admit(0), None);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(limit.admit(0), Some(8), "seven held back, then one more");
        assert_eq!(limit.admit(0), Some(0));
    }
}
