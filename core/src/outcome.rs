//! What became of a message: [`Outcome`], and how handler results turn into one,
//! [`IntoOutcome`].
//!
//! The runtime maps every outcome to a log line and an acknowledgement, the way
//! axum maps a handler's return value to a response with `IntoResponse`. A handler
//! can return `()`, an `Outcome`, or a `Result` of either with any error type that
//! converts into a [`BoxError`].
//!
//! ```
//! use tower_mqtt::{HandlerError, IntoOutcome, Outcome};
//!
//! assert!(matches!(().into_outcome(), Outcome::Handled));
//!
//! let failed: Result<(), std::io::Error> = Err(std::io::Error::other("disk full"));
//! let Outcome::Failed(err) = failed.into_outcome() else { panic!() };
//! assert!(err.is_retryable());
//!
//! // Say "don't retry" for errors that another attempt cannot fix.
//! let bad: Result<(), HandlerError> = Err(HandlerError::permanent("unknown command"));
//! let Outcome::Failed(err) = bad.into_outcome() else { panic!() };
//! assert!(!err.is_retryable());
//! ```

use std::fmt;

/// A type-erased error, as tower uses it.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What became of one message, after everything that handled it.
///
/// How the runtime acknowledges each (QoS 1 and 2 are acknowledged once the
/// outcome is known, in the order the messages arrived):
///
/// | outcome | acknowledged | logged by the runtime |
/// |---|---|---|
/// | `Handled` | yes | debug |
/// | `Duplicate` | yes, without running the handler | debug |
/// | `Unrouted` | yes | warn |
/// | `Failed` | yes, after retries are exhausted, so one bad message cannot block the topic | debug (the isolation layer logs the error once, inside the message's span) |
///
/// A message dropped by a route's overflow policy is acknowledged too, and
/// counted; a message still queued or running at shutdown is not, so a
/// persistent session delivers it again.
#[derive(Debug)]
#[non_exhaustive]
pub enum Outcome {
    /// A handler processed the message.
    Handled,
    /// The message was recognised as one already processed and skipped.
    Duplicate,
    /// No route matched the topic and there is no fallback.
    Unrouted,
    /// Processing failed: a handler error, a panic, a timeout or a decode error.
    Failed(HandlerError),
}

impl Outcome {
    /// Whether this is [`Outcome::Failed`].
    pub fn is_failed(&self) -> bool {
        matches!(self, Self::Failed(_))
    }

    /// The error, when this is [`Outcome::Failed`].
    pub fn error(&self) -> Option<&HandlerError> {
        match self {
            Self::Failed(err) => Some(err),
            _ => None,
        }
    }

    /// A short name for logs and metrics: `handled`, `duplicate`, `unrouted` or
    /// `failed`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Handled => "handled",
            Self::Duplicate => "duplicate",
            Self::Unrouted => "unrouted",
            Self::Failed(_) => "failed",
        }
    }
}

/// Why a message could not be handled, and whether trying again could help.
///
/// Errors are retryable unless built with [`HandlerError::permanent`]; retry
/// middleware asks [`HandlerError::is_retryable`].
///
/// ```
/// use tower_mqtt::{BoxError, HandlerError};
///
/// let err = HandlerError::new(std::io::Error::other("broker busy"));
/// assert!(err.is_retryable());
/// assert_eq!(err.to_string(), "broker busy");
///
/// // A handler can return `HandlerError` inside any boxed error; it is recovered.
/// let boxed: BoxError = HandlerError::permanent("bad input").into();
/// assert!(!HandlerError::from_boxed(boxed).is_retryable());
/// ```
pub struct HandlerError {
    source: BoxError,
    retryable: bool,
}

impl HandlerError {
    /// A retryable error.
    pub fn new(source: impl Into<BoxError>) -> Self {
        Self::from_boxed(source.into())
    }

    /// An error that another attempt cannot fix (bad input, an unknown command):
    /// retry middleware gives up on it at once.
    pub fn permanent(source: impl Into<BoxError>) -> Self {
        let mut err = Self::new(source);
        err.retryable = false;
        err
    }

    /// Wraps a boxed error, recovering a `HandlerError` (and its retry
    /// classification) if that is what was boxed.
    pub fn from_boxed(source: BoxError) -> Self {
        match source.downcast::<HandlerError>() {
            Ok(err) => *err,
            Err(source) => Self {
                source,
                retryable: true,
            },
        }
    }

    /// Whether another attempt might succeed.
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }

    /// The underlying error.
    pub fn get_ref(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.source
    }

    /// The underlying error, by value.
    pub fn into_inner(self) -> BoxError {
        self.source
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError")
            .field("source", &self.source)
            .field("retryable", &self.retryable)
            .finish()
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.source, f)
    }
}

impl std::error::Error for HandlerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.source()
    }
}

/// Turns a handler's return value into an [`Outcome`]; see the
/// [module docs](self).
pub trait IntoOutcome {
    /// Performs the conversion.
    fn into_outcome(self) -> Outcome;
}

impl IntoOutcome for Outcome {
    fn into_outcome(self) -> Outcome {
        self
    }
}

impl IntoOutcome for () {
    fn into_outcome(self) -> Outcome {
        Outcome::Handled
    }
}

impl<T, E> IntoOutcome for Result<T, E>
where
    T: IntoOutcome,
    E: Into<BoxError>,
{
    fn into_outcome(self) -> Outcome {
        match self {
            Ok(value) => value.into_outcome(),
            Err(err) => Outcome::Failed(HandlerError::from_boxed(err.into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_map_to_outcomes() {
        assert!(matches!(
            Ok::<(), BoxError>(()).into_outcome(),
            Outcome::Handled
        ));
        assert!(matches!(
            Ok::<_, BoxError>(Outcome::Duplicate).into_outcome(),
            Outcome::Duplicate
        ));
        let outcome = Err::<(), _>("boom").into_outcome();
        assert_eq!(outcome.as_str(), "failed");
        assert_eq!(outcome.error().unwrap().to_string(), "boom");
        assert!(outcome.error().unwrap().is_retryable());
    }

    #[test]
    fn permanence_survives_boxing() {
        let outcome =
            Err::<(), BoxError>(HandlerError::permanent("no such command").into()).into_outcome();
        let err = outcome.error().unwrap();
        assert!(!err.is_retryable());
        assert_eq!(err.to_string(), "no such command");
    }
}
