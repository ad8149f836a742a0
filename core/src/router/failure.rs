//! When some of the routes a message reached fail: [`RoutesFailed`], the one
//! failure that names them, and [`RemainingRoutes`], the routes a retry runs
//! again.

use std::sync::Arc;

use crate::{
    outcome::{HandlerError, Outcome},
    topic::TopicFilter,
};

/// Several routes failed on one message.
#[derive(Debug, thiserror::Error)]
#[error("{}", failures.iter().map(|(filter, err)| format!("route {filter}: {err}")).collect::<Vec<_>>().join("; "))]
pub struct RoutesFailed {
    failures: Vec<(TopicFilter, HandlerError)>,
}

impl RoutesFailed {
    /// Each failed route's filter with its error.
    pub fn failures(&self) -> &[(TopicFilter, HandlerError)] {
        &self.failures
    }

    /// The failed routes, for the next attempt: see [`RemainingRoutes`].
    pub fn remaining(&self) -> RemainingRoutes {
        RemainingRoutes(
            self.failures
                .iter()
                .map(|(filter, _)| filter.clone())
                .collect(),
        )
    }
}

/// The routes a message still has to reach, as a request extension: when one
/// of several matching routes fails, a retry puts this on the next attempt so
/// that only the failed routes run again (`MessageRetryLayer` does).
///
/// ```
/// use tower::ServiceExt;
/// use tower_mqtt::{router::RemainingRoutes, Envelope, Outcome, Request, Router, TopicFilter};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// async fn ok(_: Request<Envelope>) {}
/// let router = Router::new().route("a/#", ok).route("a/b", ok);
/// let env = Envelope::new("t", serde_json::json!({})).unwrap();
/// let mut req = Request::builder("a/b").body(env).unwrap();
/// // Only `a/b` runs: `a/#` already handled the message.
/// req.extensions_mut().insert(RemainingRoutes::new([TopicFilter::new("a/b").unwrap()]));
/// assert!(matches!(router.oneshot(req).await.unwrap(), Outcome::Handled));
/// # }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemainingRoutes(Arc<[TopicFilter]>);

impl RemainingRoutes {
    /// The routes with these filters.
    pub fn new(filters: impl IntoIterator<Item = TopicFilter>) -> Self {
        Self(filters.into_iter().collect())
    }

    /// Whether the route with `filter` still has to run.
    pub fn contains(&self, filter: &TopicFilter) -> bool {
        self.0.contains(filter)
    }
}

/// One outcome for a message that reached several routes: handled when every
/// route handled it; otherwise failed, retryable only if every failure is.
pub(super) fn combine(outcomes: Vec<(TopicFilter, Outcome)>) -> Outcome {
    let failures: Vec<(TopicFilter, HandlerError)> = outcomes
        .into_iter()
        .filter_map(|(filter, outcome)| match outcome {
            Outcome::Failed(err) => Some((filter, err)),
            _ => None,
        })
        .collect();
    if failures.is_empty() {
        return Outcome::Handled;
    }
    let retryable = failures.iter().all(|(_, err)| err.is_retryable());
    let err = RoutesFailed { failures };
    Outcome::Failed(if retryable {
        HandlerError::new(err)
    } else {
        HandlerError::permanent(err)
    })
}
