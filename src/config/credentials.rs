//! The user name and password: from `MQTT_URL`, `MQTT_USERNAME`,
//! `MQTT_PASSWORD`, `MQTT_PASSWORD_FILE` or code, and a password read again
//! at every connect.
//!
//! Each of the two has one place in the environment: a user name in
//! `MQTT_URL` and in `MQTT_USERNAME`, or a password in two of `MQTT_URL`,
//! `MQTT_PASSWORD` and `MQTT_PASSWORD_FILE`, is an error rather than a
//! silent choice, since a deployment that sets both rarely knows which one
//! wins. What the environment sets replaces what code set.

use std::{fmt, path::PathBuf, sync::Arc};

use super::{
    env::Vars, expect, invalid, var, Config, ConfigError, Credentials, Password, MAX_MQTT_STRING,
};
use crate::BoxError;

/// A function that returns the password for the next connect.
pub type PasswordFn = Arc<dyn Fn() -> Result<Password, BoxError> + Send + Sync>;

/// Where the password comes from when it is fetched again at every connect.
///
/// Set with [`Config::with_password_file`] (`MQTT_PASSWORD_FILE`) or
/// [`Config::with_password_fn`]. It replaces the password of
/// [`Config::credentials`]; the user name still comes from there.
#[derive(Clone)]
#[non_exhaustive]
pub enum PasswordSource {
    /// A file read before every connect, so a rotated secret or a renewed
    /// token is used without a restart. One trailing line break is not part of
    /// the password.
    File(PathBuf),
    /// A function called before every connect, such as one that signs a
    /// short-lived token.
    Fn(PasswordFn),
}

impl fmt::Debug for PasswordSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PasswordSource::File(path) => f.debug_tuple("File").field(path).finish(),
            PasswordSource::Fn(_) => f.write_str("Fn(..)"),
        }
    }
}

impl PasswordSource {
    /// The password as it is now. Errors name the variable and the file, never
    /// what the file holds.
    ///
    /// ```
    /// use tower_mqtt::config::PasswordSource;
    ///
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("password");
    /// std::fs::write(&path, "s3cret\n")?;
    /// let source = PasswordSource::File(path);
    /// assert_eq!(source.read()?.expose(), "s3cret");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn read(&self) -> Result<Password, ConfigError> {
        let (var, source_name) = match self {
            PasswordSource::File(path) => (
                var::PASSWORD_FILE,
                format!("{:?}", path.display().to_string()),
            ),
            PasswordSource::Fn(_) => (var::PASSWORD, "the password function".to_owned()),
        };
        let unavailable = |reason: String| ConfigError::PasswordUnavailable {
            var,
            source_name: source_name.clone(),
            reason,
        };
        let password = match self {
            PasswordSource::File(path) => {
                let bytes = std::fs::read(path).map_err(|error| unavailable(error.to_string()))?;
                let text = String::from_utf8(bytes)
                    .map_err(|_| unavailable("the file is not UTF-8 text".to_owned()))?;
                let text = text
                    .strip_suffix('\n')
                    .map_or(text.as_str(), |t| t.strip_suffix('\r').unwrap_or(t));
                Password::new(text)
            }
            // The function's error is its own text; it is shown as it is.
            PasswordSource::Fn(function) => {
                function().map_err(|error| unavailable(error.to_string()))?
            }
        };
        if password.expose().is_empty() {
            // Likely a file caught while it is rewritten; connecting without the
            // password would only be refused.
            return Err(unavailable("it is empty".to_owned()));
        }
        if password.expose().len() > MAX_MQTT_STRING {
            return Err(unavailable(format!(
                "it is longer than MQTT allows ({MAX_MQTT_STRING} bytes)"
            )));
        }
        Ok(password)
    }
}

impl Config {
    /// Reads the password from `path` before every connect (`MQTT_PASSWORD_FILE`),
    /// so a rotated secret, such as a Kubernetes secret mounted as a file, is used
    /// without a restart. A user name is still needed, from the URL or
    /// [`with_credentials`](Self::with_credentials).
    ///
    /// The file is read first when the connection is configured, where a missing
    /// or empty file is an error. Later, a read that fails is logged at ERROR,
    /// naming the variable and the file, and counts as a failed connect: the
    /// client tries again after the reconnect delay.
    ///
    /// ```
    /// use tower_mqtt::config::{Config, PasswordSource};
    ///
    /// let config = Config::new("mqtts://svc@broker.example")?
    ///     .with_password_file("/run/secrets/mqtt-password");
    /// assert!(matches!(config.password_source, Some(PasswordSource::File(_))));
    /// # Ok::<(), tower_mqtt::config::ConfigError>(())
    /// ```
    #[must_use]
    pub fn with_password_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.set_password_source(PasswordSource::File(path.into()));
        self
    }

    /// Calls `password` before every connect for the password to send, such as a
    /// short-lived token (a JWT) signed for this connection.
    ///
    /// It runs on the connection's task, so it must be quick: sign locally, or
    /// keep a token refreshed elsewhere and return the latest. An error is logged
    /// at ERROR and counts as a failed connect, retried after the reconnect delay.
    ///
    /// ```
    /// use tower_mqtt::config::{Config, Credentials, Password};
    ///
    /// let config = Config::new("mqtts://broker.example")?
    ///     .with_credentials(Credentials::new("device-17", None))
    ///     .with_password_fn(|| Ok(Password::new(format!("token-{}", 42))));
    /// # let _ = config;
    /// # Ok::<(), tower_mqtt::config::ConfigError>(())
    /// ```
    #[must_use]
    pub fn with_password_fn<F>(mut self, password: F) -> Self
    where
        F: Fn() -> Result<Password, BoxError> + Send + Sync + 'static,
    {
        self.set_password_source(PasswordSource::Fn(Arc::new(password)));
        self
    }

    fn set_password_source(&mut self, source: PasswordSource) {
        if let Some(credentials) = &mut self.credentials {
            credentials.password = None;
        }
        self.password_source = Some(source);
    }

    /// The password to send now: from its source if there is one, else the one
    /// of [`credentials`](Self::credentials).
    pub(super) fn current_password(&self) -> Result<Option<Password>, ConfigError> {
        match &self.password_source {
            Some(source) => source.read().map(Some),
            None => Ok(self
                .credentials
                .as_ref()
                .and_then(|credentials| credentials.password.clone())),
        }
    }

    /// A password source needs a user name to go with it.
    pub(super) fn validate_credentials(&self) -> Result<(), ConfigError> {
        if let Some(source) = &self.password_source {
            if self.credentials.is_none() {
                let (var, value) = match source {
                    PasswordSource::File(path) => (var::PASSWORD_FILE, path.display().to_string()),
                    PasswordSource::Fn(_) => (var::PASSWORD, "***".to_owned()),
                };
                return Err(invalid(var, value, expect::USER_FOR_PASSWORD));
            }
        }
        Ok(())
    }
}

/// Puts `MQTT_USERNAME`, `MQTT_PASSWORD` and `MQTT_PASSWORD_FILE` on `config`;
/// `url_set` tells whether `config.credentials` came from `MQTT_URL` in the
/// same environment.
pub(super) fn apply_credentials<F: Fn(&str) -> Option<String>>(
    config: &mut Config,
    vars: &Vars<F>,
    url_set: bool,
    url: &str,
) -> Result<(), ConfigError> {
    let username = vars.get(var::USERNAME);
    // Taken as it is: a password may begin or end with a space.
    let password = (vars.0)(var::PASSWORD).filter(|p| !p.is_empty());
    let password_file = vars.get(var::PASSWORD_FILE);

    let url_credentials = config.credentials.as_ref().filter(|_| url_set);
    let conflict = |var: &'static str, value: String, other_var: &'static str, other_value| {
        ConfigError::Conflict {
            var,
            value,
            other_var,
            other_value,
            expected: expect::ONE_PLACE,
        }
    };
    if let (Some(user), Some(_)) = (&username, url_credentials) {
        return Err(conflict(
            var::USERNAME,
            user.clone(),
            var::URL,
            url.to_owned(),
        ));
    }
    let url_password = url_credentials.is_some_and(|c| c.password.is_some());
    match (&password, &password_file) {
        (Some(_), Some(file)) => {
            return Err(conflict(
                var::PASSWORD,
                "***".to_owned(),
                var::PASSWORD_FILE,
                file.clone(),
            ))
        }
        (Some(_), None) if url_password => {
            return Err(conflict(
                var::PASSWORD,
                "***".to_owned(),
                var::URL,
                url.to_owned(),
            ))
        }
        (None, Some(file)) if url_password => {
            return Err(conflict(
                var::PASSWORD_FILE,
                file.clone(),
                var::URL,
                url.to_owned(),
            ))
        }
        _ => {}
    }

    if let Some(user) = username {
        if user.len() > MAX_MQTT_STRING {
            return Err(invalid(var::USERNAME, user, expect::USERINFO_LEN));
        }
        match &mut config.credentials {
            Some(credentials) => credentials.username = user,
            None => config.credentials = Some(Credentials::new(user, None)),
        }
    }
    if let Some(password) = password {
        if password.len() > MAX_MQTT_STRING {
            return Err(invalid(
                var::PASSWORD,
                "***".to_owned(),
                expect::USERINFO_LEN,
            ));
        }
        let Some(credentials) = &mut config.credentials else {
            return Err(invalid(
                var::PASSWORD,
                "***".to_owned(),
                expect::USER_FOR_PASSWORD,
            ));
        };
        credentials.password = Some(Password::new(password));
        config.password_source = None;
    }
    if let Some(file) = password_file {
        if config.credentials.is_none() {
            return Err(invalid(var::PASSWORD_FILE, file, expect::USER_FOR_PASSWORD));
        }
        config.set_password_source(PasswordSource::File(PathBuf::from(file)));
    }
    Ok(())
}
