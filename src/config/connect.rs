//! What the poll loop asks of the configuration around each connection
//! attempt: a fresh password before it, and after a failure, a reason a person
//! can act on.
//!
//! rumqttc reports a refused certificate as `TLS: I/O: invalid peer
//! certificate: UnknownIssuer`, or, when the broker refuses ours after the
//! handshake, as a bare `I/O: received fatal alert`. The rustls error is
//! found wherever it is wrapped and put first, with the broker and what to
//! check. Failures that a retry does not fix (TLS, a WebSocket upgrade
//! refused, a password that cannot be read) are logged at ERROR the first
//! time and whenever the reason changes; every failure still goes through the
//! poll loop's reconnect delay. A broker's CONNACK refusal (a bad password)
//! is the poll loop's own (`wire::describe_refusal`).

use std::{error::Error as StdError, io};

use tokio_rustls::rustls::{self, AlertDescription, CertificateError};
use tracing::error;

use super::{Config, PasswordSource};

/// One connection's attempts, from the poll loop's point of view.
pub(crate) struct ConnectionAttempts {
    broker: String,
    /// The user name and where its password comes from, when it is fetched at
    /// every connect.
    login: Option<(String, PasswordSource)>,
    /// Whether a client certificate is configured, for the hint on a refusal.
    client_auth: bool,
    /// The reason of the last failure since the last success.
    last_failure: Option<String>,
}

impl Config {
    /// The state the poll loop keeps across connection attempts.
    pub(crate) fn connection_attempts(&self) -> ConnectionAttempts {
        let login = self
            .password_source
            .clone()
            .zip(self.credentials.as_ref().map(|c| c.username.clone()))
            .map(|(source, user)| (user, source));
        ConnectionAttempts {
            broker: self.broker.to_string(),
            login,
            client_auth: self
                .broker
                .tls
                .as_ref()
                .is_some_and(|tls| tls.client_auth.is_some() || tls.client_config.is_some()),
            last_failure: None,
        }
    }
}

impl ConnectionAttempts {
    /// Before rumqttc connects (it does when it has no connection): puts the
    /// current password into its options. An error is the reason this attempt
    /// failed; the password is never part of it.
    pub(crate) fn prepare(&mut self, set_login: impl FnOnce(String, &str)) -> Result<(), String> {
        let Some((user, source)) = &self.login else {
            return Ok(());
        };
        match source.read() {
            Ok(password) => {
                set_login(user.clone(), password.expose());
                Ok(())
            }
            Err(error) => {
                Err(self.report(format!("cannot connect to {}: {error}", self.broker), true))
            }
        }
    }

    /// The reason a connection attempt or a connection failed, for the
    /// connection state and the logs.
    pub(crate) fn failed(&mut self, error: &(dyn StdError + 'static), kind: FailureKind) -> String {
        let (reason, lasting) = self.describe(error, kind);
        self.report(reason, lasting)
    }

    /// A connection was accepted: the next failure is news again.
    pub(crate) fn connected(&mut self) {
        self.last_failure = None;
    }

    fn report(&mut self, reason: String, lasting: bool) -> String {
        if lasting && self.last_failure.as_deref() != Some(reason.as_str()) {
            error!(broker = %self.broker, %reason, "cannot connect to the broker");
        }
        self.last_failure = Some(reason.clone());
        reason
    }

    /// The reason, and whether it is one that retrying alone will not fix.
    fn describe(&self, error: &(dyn StdError + 'static), kind: FailureKind) -> (String, bool) {
        let broker = &self.broker;
        if let Some(tls) = find_rustls_error(error) {
            let hint = self
                .hint(tls)
                .map(|h| format!(" ({h})"))
                .unwrap_or_default();
            return (format!("TLS with {broker} failed: {tls}{hint}"), true);
        }
        match kind {
            FailureKind::Tls => (format!("TLS with {broker} failed: {error}"), true),
            #[cfg(feature = "websocket")]
            FailureKind::WebSocket if !is_io(error) => (
                format!("WebSocket connection to {broker} failed: {error}"),
                true,
            ),
            _ => (error.to_string(), false),
        }
    }

    /// What to check, for the TLS failures a configuration causes.
    fn hint(&self, error: &rustls::Error) -> Option<String> {
        Some(match error {
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
                "the broker's certificate is not signed by a CA this client trusts: the \
                 system roots and MQTT_CA_FILE"
                    .to_owned()
            }
            rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            ) => "the broker's certificate is not for the host name in MQTT_URL".to_owned(),
            rustls::Error::AlertReceived(AlertDescription::CertificateRequired)
                if !self.client_auth =>
            {
                "the broker requires a client certificate: MQTT_CLIENT_CERT_FILE and \
                 MQTT_CLIENT_KEY_FILE"
                    .to_owned()
            }
            rustls::Error::AlertReceived(
                AlertDescription::BadCertificate
                | AlertDescription::UnknownCA
                | AlertDescription::CertificateUnknown
                | AlertDescription::CertificateRequired
                | AlertDescription::CertificateExpired
                | AlertDescription::CertificateRevoked
                | AlertDescription::UnsupportedCertificate
                | AlertDescription::AccessDenied,
            ) => "the broker refused the client certificate of MQTT_CLIENT_CERT_FILE".to_owned(),
            rustls::Error::AlertReceived(AlertDescription::NoApplicationProtocol) => {
                "the broker accepts none of the protocols in MQTT_TLS_ALPN".to_owned()
            }
            _ => return None,
        })
    }
}

/// What part of connecting failed, as the client underneath tells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FailureKind {
    /// The TLS handshake or its configuration.
    Tls,
    /// The WebSocket upgrade or its URL.
    #[cfg_attr(not(feature = "websocket"), allow(dead_code))]
    WebSocket,
    /// Anything else: I/O, protocol.
    Other,
}

impl FailureKind {
    /// What part of connecting a failure of rumqttc's MQTT 3.1.1 client is.
    pub(crate) fn of_v4(error: &rumqttc::ConnectionError) -> Self {
        use rumqttc::ConnectionError as E;
        match error {
            E::Tls(_) => Self::Tls,
            #[cfg(feature = "websocket")]
            E::Websocket(_) | E::WsConnect(_) | E::ResponseValidation(_) | E::InvalidUrl(_) => {
                Self::WebSocket
            }
            _ => Self::Other,
        }
    }
}

/// Whether the failure is I/O underneath (a refused or reset TCP connection),
/// which a retry may well fix.
#[cfg(feature = "websocket")]
fn is_io(error: &(dyn StdError + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(current) = next {
        if current.is::<io::Error>() {
            return true;
        }
        next = current.source();
    }
    false
}

/// The rustls error under `error`, however deeply wrapped. `io::Error` hides
/// the error it carries from `source()`, so it is opened explicitly.
fn find_rustls_error<'a>(error: &'a (dyn StdError + 'static)) -> Option<&'a rustls::Error> {
    let mut next = Some(error);
    while let Some(current) = next {
        if let Some(tls) = current.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        next = match current
            .downcast_ref::<io::Error>()
            .and_then(io::Error::get_ref)
        {
            Some(inner) => Some(inner as &(dyn StdError + 'static)),
            None => current.source(),
        };
    }
    None
}
