//! The retry budget both retry policies draw on.
//!
//! Kept to one small type so that how the budget is kept (and how often it
//! reads the clock, which is most of its cost per request) can change here
//! alone, without touching either policy.

use std::{fmt, sync::Arc};

use tower::retry::budget::{Budget, TpsBudget};

/// A [`TpsBudget`] shared by every clone: one per layer, so that all the
/// services a layer makes draw on the same budget.
#[derive(Clone, Default)]
pub(crate) struct RetryBudget(Arc<TpsBudget>);

impl RetryBudget {
    pub(crate) fn new(budget: TpsBudget) -> Self {
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

impl fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
