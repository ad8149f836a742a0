//! What is wrong with a configuration, naming the variable.

use std::{io, path::PathBuf};

use super::var;

/// Why a configuration was rejected.
///
/// Every variant names the variable, the rejected value (a URL with its password
/// replaced by `***`) and the expected form, e.g.
/// `MQTT_KEEPALIVE="abc" is invalid: expected an integer number of seconds between 1 and 65535`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A required variable is not set; only `MQTT_URL` is required.
    #[error("{var} is not set: expected {expected}")]
    Missing {
        /// The variable.
        var: &'static str,
        /// What it should contain.
        expected: &'static str,
    },
    /// A variable's value cannot be used.
    #[error("{var}={value:?} is invalid: expected {expected}")]
    Invalid {
        /// The variable.
        var: &'static str,
        /// The value, with any password replaced by `***`.
        value: String,
        /// What it should contain.
        expected: &'static str,
    },
    /// Two variables are valid alone but contradict each other.
    #[error("{var}={value:?} conflicts with {other_var}={other_value:?}: expected {expected}")]
    Conflict {
        /// The first variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// The second variable.
        other_var: &'static str,
        /// Its value.
        other_value: String,
        /// The rule they break.
        expected: &'static str,
    },
    /// The CA file cannot be read.
    #[error(
        "{var}={path:?} cannot be read ({source}): expected the path of a readable PEM file \
         of CA certificates"
    )]
    CaFileUnreadable {
        /// The variable (`MQTT_CA_FILE`).
        var: &'static str,
        /// The file.
        path: PathBuf,
        /// Why it cannot be read.
        source: io::Error,
    },
    /// The CA file was read but holds no usable certificate.
    #[error("{var}={path:?} is invalid ({reason}): expected a PEM file of CA certificates")]
    CaFileInvalid {
        /// The variable (`MQTT_CA_FILE`).
        var: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with its content.
        reason: String,
    },
    /// A TLS connection was asked for but no CA certificate would be trusted: the system
    /// store is empty or unreadable and no CA file is set.
    #[error(
        "{var} is not set and the system certificate store has no usable certificate, so \
         the TLS connection to {broker} could trust no server: expected {var} to name a \
         PEM file of CA certificates"
    )]
    NoTrustAnchors {
        /// The variable that would fix it (`MQTT_CA_FILE`).
        var: &'static str,
        /// The broker, without credentials.
        broker: String,
    },
    /// A file named by a variable cannot be read (a client certificate or key).
    #[error("{var}={path:?} cannot be read ({source}): expected {expected}")]
    FileUnreadable {
        /// The variable (`MQTT_CLIENT_CERT_FILE`, `MQTT_CLIENT_KEY_FILE`).
        var: &'static str,
        /// The file.
        path: PathBuf,
        /// Why it cannot be read.
        source: io::Error,
        /// What it should contain.
        expected: &'static str,
    },
    /// A file named by a variable was read but its content cannot be used.
    #[error("{var}={path:?} is invalid ({reason}): expected {expected}")]
    FileInvalid {
        /// The variable (`MQTT_CLIENT_CERT_FILE`, `MQTT_CLIENT_KEY_FILE`).
        var: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with its content (never the content itself).
        reason: String,
        /// What it should contain.
        expected: &'static str,
    },
    /// The password could not be had from its source: the file of
    /// `MQTT_PASSWORD_FILE`, or the function given to
    /// [`Config::with_password_fn`](super::Config::with_password_fn).
    /// The message never holds the password.
    #[error("{var}: the password could not be read from {source_name} ({reason})")]
    PasswordUnavailable {
        /// `MQTT_PASSWORD_FILE`, or `MQTT_PASSWORD` for a function.
        var: &'static str,
        /// The file, quoted, or `the password function`.
        source_name: String,
        /// Why not.
        reason: String,
    },
    /// rustls rejected the TLS client configuration.
    #[error("{var}={value:?} cannot be used: the TLS setup failed ({reason})")]
    Tls {
        /// The variable (`MQTT_URL`).
        var: &'static str,
        /// The broker, without credentials.
        value: String,
        /// rustls' explanation.
        reason: String,
    },
}

impl ConfigError {
    /// The variable this error is about (the first one for a [`Conflict`](Self::Conflict)).
    pub fn var(&self) -> &'static str {
        match self {
            ConfigError::Missing { var, .. }
            | ConfigError::Invalid { var, .. }
            | ConfigError::Conflict { var, .. }
            | ConfigError::CaFileUnreadable { var, .. }
            | ConfigError::CaFileInvalid { var, .. }
            | ConfigError::NoTrustAnchors { var, .. }
            | ConfigError::FileUnreadable { var, .. }
            | ConfigError::FileInvalid { var, .. }
            | ConfigError::PasswordUnavailable { var, .. }
            | ConfigError::Tls { var, .. } => var,
        }
    }

    /// Whether the error is that `MQTT_URL` is unset: the cue to fall back to another
    /// broker, such as the embedded one.
    pub fn is_missing_url(&self) -> bool {
        matches!(self, ConfigError::Missing { var, .. } if *var == var::URL)
    }
}

pub(super) fn invalid(var: &'static str, value: String, expected: &'static str) -> ConfigError {
    ConfigError::Invalid {
        var,
        value,
        expected,
    }
}
