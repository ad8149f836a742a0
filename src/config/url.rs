//! `MQTT_URL`: the broker's address and the credentials, and how they are
//! printed without the password.

use std::{fmt, net::Ipv6Addr};

use percent_encoding::percent_decode_str;

use super::{
    expect, invalid, var, ConfigError, Tls, MAX_MQTT_STRING, MQTTS_PORT, MQTT_PORT, WSS_PORT,
    WS_PORT,
};

/// Where the broker is: host, port, TLS settings and, for MQTT over WebSockets, the
/// HTTP path.
///
/// `Display` prints the URL without credentials: `mqtt://host:port`, `mqtts://host:port`,
/// `ws://host:port/path` or `wss://host:port/path` (IPv6 hosts in brackets).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct BrokerAddr {
    /// Host name or IP address; an IPv6 address is kept without brackets.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// `Some` for a TLS connection (`mqtts://` or `wss://`).
    pub tls: Option<Tls>,
    /// `Some(path)` for MQTT over WebSockets (`ws://` or `wss://`), such as `/mqtt`;
    /// `None` for MQTT over TCP. Needs the `websocket` feature.
    pub websocket_path: Option<String>,
}

impl BrokerAddr {
    /// Whether the connection uses TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Whether MQTT goes over WebSockets (`ws://` or `wss://`).
    ///
    /// ```
    /// # #[cfg(feature = "websocket")] {
    /// let config = tower_mqtt::config::Config::new("wss://broker.example/mqtt")?;
    /// assert!(config.broker.is_websocket() && config.broker.is_tls());
    /// assert_eq!(config.broker.to_string(), "wss://broker.example:443/mqtt");
    /// # }
    /// # Ok::<(), tower_mqtt::config::ConfigError>(())
    /// ```
    pub fn is_websocket(&self) -> bool {
        self.websocket_path.is_some()
    }
}

impl fmt::Display for BrokerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = match (self.is_websocket(), self.is_tls()) {
            (false, false) => "mqtt",
            (false, true) => "mqtts",
            (true, false) => "ws",
            (true, true) => "wss",
        };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)?;
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)?;
        }
        f.write_str(self.websocket_path.as_deref().unwrap_or(""))
    }
}

/// User name and optional password for the broker.
///
/// `Debug` shows the user name and `***` for the password.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Credentials {
    /// The user name; never empty.
    pub username: String,
    /// The password, if any. MQTT (and rumqttc) send no password field for an empty one,
    /// so an empty password from the URL is stored as `None`.
    pub password: Option<Password>,
}

impl Credentials {
    /// Credentials with a user name and an optional password.
    pub fn new(username: impl Into<String>, password: Option<Password>) -> Self {
        Credentials {
            username: username.into(),
            password,
        }
    }
}

/// A password that prints as `***` in `Debug` and `Display`.
///
/// The text is only reachable through [`Password::expose`], so it does not end up in a
/// log line by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(pub(super) String);

impl Password {
    /// Wraps a password.
    pub fn new(password: impl Into<String>) -> Self {
        Password(password.into())
    }

    /// The password itself, for handing to the MQTT client.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Password {
    fn from(password: String) -> Self {
        Password(password)
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

pub(super) fn host_ok(host: &str) -> bool {
    host.parse::<Ipv6Addr>().is_ok()
        || (!host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')))
}

/// Parses `MQTT_URL`: `scheme://[user[:password]@]host[:port][/]`.
pub(super) fn parse_url(raw: &str) -> Result<(BrokerAddr, Option<Credentials>), ConfigError> {
    let error = |expected| invalid(var::URL, redact_url(raw), expected);

    let Some((scheme, rest)) = raw.split_once("://") else {
        return Err(error(expect::URL));
    };
    let (tls, websocket, default_port) = parse_scheme(scheme).map_err(error)?;

    // The authority ends at the first '/', '?' or '#' (RFC 3986).
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    if tail.contains('@') {
        // Most likely a password with an unencoded '/', '?' or '#'.
        return Err(error(expect::RESERVED_IN_USERINFO));
    }
    if tail.contains('?') {
        return Err(error(expect::QUERY));
    }
    if tail.contains('#') {
        return Err(error(expect::FRAGMENT));
    }
    let websocket_path = websocket_path(tail, websocket).map_err(error)?;

    // The last '@' ends the user information, so an unencoded '@' in a password works.
    let (userinfo, host_port) = match authority.rfind('@') {
        Some(at) => (Some(&authority[..at]), &authority[at + 1..]),
        None => (None, authority),
    };
    let credentials = match userinfo {
        None => None,
        Some(userinfo) => {
            let (user, password) = match userinfo.split_once(':') {
                Some((user, password)) => (user, Some(password)),
                None => (userinfo, None),
            };
            let decode = |text: &str| {
                percent_decode_str(text)
                    .decode_utf8()
                    .map(std::borrow::Cow::into_owned)
                    .map_err(|_| error(expect::USERINFO_UTF8))
            };
            let username = decode(user)?;
            if username.is_empty() {
                return Err(error(expect::USER));
            }
            let password = password.map(decode).transpose()?;
            let password_len = password.as_ref().map_or(0, String::len);
            if username.len() > MAX_MQTT_STRING || password_len > MAX_MQTT_STRING {
                return Err(error(expect::USERINFO_LEN));
            }
            let password = password.filter(|p| !p.is_empty()).map(Password);
            Some(Credentials { username, password })
        }
    };

    let (host, port) = if let Some(bracketed) = host_port.strip_prefix('[') {
        let Some((address, after)) = bracketed.split_once(']') else {
            return Err(error(expect::IPV6));
        };
        if address.parse::<Ipv6Addr>().is_err() {
            return Err(error(expect::IPV6));
        }
        let port = match after {
            "" => None,
            after => Some(after.strip_prefix(':').ok_or_else(|| error(expect::IPV6))?),
        };
        (address, port)
    } else {
        let (host, port) = match host_port.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (host_port, None),
        };
        if port.is_some_and(|port| port.contains(':')) {
            return Err(error(expect::IPV6));
        }
        if host.is_empty() {
            return Err(error(expect::HOST));
        }
        if !host_ok(host) {
            return Err(error(expect::HOST_CHARS));
        }
        (host, port)
    };
    let port = match port {
        None => default_port,
        Some(port) => {
            if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
                return Err(error(expect::PORT));
            }
            match port.parse::<u16>() {
                Ok(port) if port != 0 => port,
                _ => return Err(error(expect::PORT)),
            }
        }
    };

    let broker = BrokerAddr {
        host: host.to_owned(),
        port,
        tls,
        websocket_path,
    };
    Ok((broker, credentials))
}

/// TLS, WebSocket and the default port of a scheme.
fn parse_scheme(scheme: &str) -> Result<(Option<Tls>, bool, u16), &'static str> {
    let parts = match scheme.to_ascii_lowercase().as_str() {
        "mqtt" | "tcp" => (None, false, MQTT_PORT),
        "mqtts" | "ssl" | "tls" => (Some(Tls::default()), false, MQTTS_PORT),
        "ws" => (None, true, WS_PORT),
        "wss" => (Some(Tls::default()), true, WSS_PORT),
        _ => return Err(expect::SCHEME),
    };
    if parts.1 && cfg!(not(feature = "websocket")) {
        return Err(expect::WEBSOCKET_FEATURE);
    }
    Ok(parts)
}

/// The path after the host: the HTTP path of a WebSocket upgrade, sent as it is
/// written, or nothing for MQTT over TCP. Errors are the expected form.
fn websocket_path(tail: &str, websocket: bool) -> Result<Option<String>, &'static str> {
    if !websocket {
        return match tail {
            "" | "/" => Ok(None),
            _ => Err(expect::PATH),
        };
    }
    if !tail.chars().all(|c| c.is_ascii_graphic()) {
        return Err(expect::WEBSOCKET_PATH);
    }
    Ok(Some(if tail.is_empty() { "/" } else { tail }.to_owned()))
}

/// `raw` with everything between the user name's ':' and the last '@' replaced by `***`.
///
/// Works on text that failed to parse too: it relies only on the last '@', so a
/// password holding '/', '?', '#' or '@' is still hidden.
pub(super) fn redact_url(raw: &str) -> String {
    let after_scheme = raw.find("://").and_then(|i| {
        let scheme = &raw[..i];
        let is_scheme = !scheme.is_empty()
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
        is_scheme.then_some(i + 3)
    });
    let (prefix, rest) = raw.split_at(after_scheme.unwrap_or(0));
    let Some(at) = rest.rfind('@') else {
        return raw.to_owned();
    };
    let userinfo = &rest[..at];
    match userinfo.find(':') {
        Some(colon) => format!("{prefix}{}:***{}", &userinfo[..colon], &rest[at..]),
        None => raw.to_owned(),
    }
}
