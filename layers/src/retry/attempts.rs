//! What both retry policies share: the attempts of one request, the backoff
//! between them and the budget they draw on.
//!
//! A policy of either direction holds an [`Attempts`] and adds only what is
//! its own: which results are worth another attempt, and how it logs. tower's
//! `Retry` clones the policy for each request, so each request counts its own
//! attempts and makes its own backoff, while the budget is shared.

use std::{fmt, time::Duration};

use tokio::time::Sleep;
use tower::{
    retry::{
        backoff::{
            Backoff, ExponentialBackoff, ExponentialBackoffMaker, InvalidBackoff, MakeBackoff,
        },
        budget::Budget,
    },
    util::rng::HasherRng,
};

use super::{budget::SharedBudget, DEFAULT_JITTER, DEFAULT_MAX_BACKOFF, DEFAULT_MIN_BACKOFF};

/// See the [module docs](self).
#[derive(Clone)]
pub(crate) struct Attempts {
    max: u32,
    /// The attempt running, counted from 1.
    current: u32,
    min_backoff: Duration,
    max_backoff: Duration,
    jitter: f64,
    budget: SharedBudget,
    /// Made at the first retry, with a random generator of its own.
    backoff: Option<ExponentialBackoff>,
}

/// What follows the result of an attempt that failed with `error`, if any.
pub(crate) enum Next<E> {
    /// Nothing to try again: a success, or a failure another attempt cannot fix.
    Done,
    /// Worth another attempt, but attempt number `attempt` was the last allowed.
    LastAttempt { attempt: u32, error: E },
    /// Worth another attempt, but the budget has no retry left.
    OverBudget { attempt: u32, error: E },
    /// Attempt number `attempt` failed; try again once `backoff` has elapsed.
    Retry {
        attempt: u32,
        error: E,
        backoff: Sleep,
    },
}

impl Attempts {
    /// At most `max` attempts (0 counts as 1), with the default backoff,
    /// jitter and a budget of its own.
    pub(crate) fn new(max: u32) -> Self {
        Self {
            max: max.max(1),
            current: 1,
            min_backoff: DEFAULT_MIN_BACKOFF,
            max_backoff: DEFAULT_MAX_BACKOFF,
            jitter: DEFAULT_JITTER,
            budget: SharedBudget::default(),
            backoff: None,
        }
    }

    #[track_caller]
    pub(crate) fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.min_backoff = min;
        self.max_backoff = max;
        self.validate();
        self
    }

    #[track_caller]
    pub(crate) fn jitter(mut self, ratio: f64) -> Self {
        self.jitter = ratio;
        self.validate();
        self
    }

    pub(crate) fn budget(mut self, budget: impl Budget + Send + Sync + 'static) -> Self {
        self.budget = SharedBudget::new(budget);
        self
    }

    pub(crate) fn max(&self) -> u32 {
        self.max
    }

    /// Decides what follows a result: `retryable` is the error when it is
    /// worth another attempt, `None` for a success or a final failure. Call it
    /// with every result of the request.
    pub(crate) fn next<E>(&mut self, retryable: Option<E>) -> Next<E> {
        let attempt = self.current;
        if attempt == 1 {
            // The budget grows with requests, not with retries: one deposit
            // each, whatever becomes of it.
            self.budget.deposit();
        }
        let Some(error) = retryable else {
            return Next::Done;
        };
        if attempt >= self.max {
            return Next::LastAttempt { attempt, error };
        }
        if !self.budget.withdraw() {
            return Next::OverBudget { attempt, error };
        }
        self.current += 1;
        let backoff = match &mut self.backoff {
            Some(backoff) => backoff,
            None => self.backoff.insert(
                self.backoff_maker()
                    .expect("validated when configured")
                    .make_backoff(),
            ),
        };
        Next::Retry {
            attempt,
            error,
            backoff: backoff.next_backoff(),
        }
    }

    /// A copy of `req` for the next attempt, when there can be one: with a
    /// single attempt nothing is cloned.
    pub(crate) fn clone_request<R: Clone>(&self, req: &R) -> Option<R> {
        (self.max > 1).then(|| req.clone())
    }

    #[track_caller]
    fn validate(&self) {
        if let Err(err) = self.backoff_maker() {
            panic!(
                "{err}: min {:?}, max {:?}, jitter {}",
                self.min_backoff, self.max_backoff, self.jitter
            );
        }
    }

    fn backoff_maker(&self) -> Result<ExponentialBackoffMaker, InvalidBackoff> {
        // A fresh generator (a fresh `RandomState`) for each request: one
        // cloned from a shared maker would give every request the same jitter,
        // and requests failing together would retry in lockstep.
        ExponentialBackoffMaker::new(
            self.min_backoff,
            self.max_backoff,
            self.jitter,
            HasherRng::new(),
        )
    }
}

impl fmt::Debug for Attempts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Attempts")
            .field("max_attempts", &self.max)
            .field("attempt", &self.current)
            .field("min_backoff", &self.min_backoff)
            .field("max_backoff", &self.max_backoff)
            .field("jitter", &self.jitter)
            .field("budget", &self.budget)
            .finish_non_exhaustive()
    }
}
