//! The correlation id of the message being handled.
//!
//! The fleet correlates by envelope id: a reply or stream chunk reuses the id of
//! the request it answers. While a message is handled, its id is available two
//! ways:
//!
//! - as the request's [`correlation_id`](crate::Request::correlation_id), and
//!   as a handler argument ([`CorrelationId`] is an extractor), explicit and
//!   easy to pass to a spawned task;
//! - as the task-local [`current`], set around the handler's future by
//!   [`scope`], so a publish deep inside the handler can correlate without the id
//!   being threaded through every call.
//!
//! The correlation layer of `tower-mqtt-layers` does both; the publisher reads
//! [`current`] when asked to correlate.
//!
//! ```
//! use tower_mqtt::correlation::{self, CorrelationId};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! assert_eq!(correlation::current(), None);
//! let id = CorrelationId::new("3f1c9b1e8a2d4c6f9e0b7a5d4c3b2a19");
//! correlation::scope(id.clone(), async move {
//!     assert_eq!(correlation::current(), Some(id));
//! })
//! .await;
//! # }
//! ```

use std::{fmt, future::Future, sync::Arc};

use crate::envelope::Envelope;

/// The id that ties a request to its replies: the request envelope's `id`.
///
/// Cheap to clone.
///
/// ```
/// use tower_mqtt::correlation::CorrelationId;
///
/// let id = CorrelationId::new("abc");
/// assert_eq!(id.as_str(), "abc");
/// assert_eq!(id.to_string(), "abc");
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct CorrelationId(Arc<str>);

impl CorrelationId {
    /// Wraps an id.
    pub fn new(id: impl AsRef<str>) -> Self {
        Self(id.as_ref().into())
    }

    /// The id of `envelope`, sharing its string: no copy.
    ///
    /// ```
    /// use tower_mqtt::{correlation::CorrelationId, Envelope};
    ///
    /// let env = Envelope::from_map("llm.request", Default::default()).with_id("3f1c9b1e");
    /// assert_eq!(CorrelationId::of(&env).as_str(), "3f1c9b1e");
    /// ```
    pub fn of(envelope: &Envelope) -> Self {
        Self(envelope.shared_id().clone())
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for CorrelationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for CorrelationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

tokio::task_local! {
    static CURRENT: CorrelationId;
}

/// Runs `future` with `id` as the [`current`] correlation id.
///
/// The id is visible to everything the future polls on this task; a task
/// spawned from it does not inherit it (pass the [`CorrelationId`] along).
pub fn scope<F: Future>(id: CorrelationId, future: F) -> Scoped<F> {
    CURRENT.scope(id, future)
}

/// The future [`scope`] returns: nameable, so middleware can hold it without
/// boxing.
pub type Scoped<F> = tokio::task::futures::TaskLocalFuture<CorrelationId, F>;

/// The correlation id of the message being handled on this task, if any.
pub fn current() -> Option<CorrelationId> {
    CURRENT.try_with(Clone::clone).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn scopes_nest_and_end() {
        let outer = CorrelationId::new("outer");
        scope(outer.clone(), async {
            assert_eq!(current().as_ref(), Some(&outer));
            scope(CorrelationId::new("inner"), async {
                assert_eq!(current().unwrap().as_str(), "inner");
            })
            .await;
            assert_eq!(current().as_ref(), Some(&outer));
        })
        .await;
        assert_eq!(current(), None);
    }

    #[tokio::test]
    async fn spawned_tasks_do_not_inherit() {
        scope(CorrelationId::new("x"), async {
            let seen = tokio::spawn(async { current() }).await.unwrap();
            assert_eq!(seen, None);
        })
        .await;
    }
}
