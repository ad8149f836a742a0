//! Configuration of the broker connection, read from the environment.
//!
//! [`Config::from_env`] reads the variables below from the process environment;
//! [`Config::from_lookup`] reads them through a closure, so tests (and services that keep
//! their settings elsewhere) never touch the process environment. Values are trimmed, and
//! an empty value counts as unset. Every value is checked before anything connects: a bad
//! one is a [`ConfigError`] naming the variable, the value and the expected form.
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `MQTT_URL` | the broker: `mqtt://[user[:password]@]host[:port]`, `mqtts://…`, or over WebSockets `ws://…[/path]` and `wss://…[/path]` (feature `websocket`) | required |
//! | `MQTT_USERNAME` | user name, when it is not in `MQTT_URL` | none |
//! | `MQTT_PASSWORD` | password, when it is not in `MQTT_URL` (taken as it is, not trimmed) | none |
//! | `MQTT_PASSWORD_FILE` | file holding the password, read again before every connect (one trailing line break dropped) | none |
//! | `MQTT_CA_FILE` | PEM file of CA certificates trusted besides the system roots (TLS only) | none |
//! | `MQTT_CLIENT_CERT_FILE` | PEM file of the client certificate chain, for brokers that require one (mTLS; TLS only) | none |
//! | `MQTT_CLIENT_KEY_FILE` | PEM file of its private key: PKCS#8, PKCS#1 RSA or SEC1 EC (set with `MQTT_CLIENT_CERT_FILE`) | none |
//! | `MQTT_TLS_ALPN` | application protocols offered in the TLS handshake, comma-separated, such as `x-amzn-mqtt-ca` | none |
//! | `MQTT_CLIENT_ID` | MQTT client id; must be unique per running instance | `<source name>-<8 random hex digits>` |
//! | `MQTT_SOURCE_NAME` | the name of this service | `tower-mqtt` |
//! | `MQTT_KEEPALIVE` | keep-alive, whole seconds from 1 (5 with MQTT 5) to 65535 | `60` |
//! | `MQTT_ENABLE_HEALTH` | publish retained health on `system/health/<service>` | `false` |
//! | `MQTT_ENABLE_HEARTBEAT` | publish heartbeats on `system/keepalive/<client id>` | `false` |
//! | `MQTT_HEARTBEAT_INTERVAL` | seconds between heartbeats | `5` |
//! | `MQTT_DEDUPE_TTL` | seconds a delivery is remembered for deduplication; `0` turns dedup off | `30` |
//! | `MQTT_DEDUPE_MAX_ENTRIES` | deliveries remembered for deduplication | `2048` |
//! | `MQTT_RECONNECT_MIN_DELAY` | first delay before reconnecting, seconds | `0.5` |
//! | `MQTT_RECONNECT_MAX_DELAY` | longest delay before reconnecting, seconds, at least the minimum | `5` |
//! | `MQTT_CLEAN_SESSION` | ask the broker for a clean session | `true` |
//! | `MQTT_PROTOCOL` | the MQTT version: `3.1.1` or `5` (see [`Protocol`]) | `3.1.1` |
//! | `MQTT_SESSION_EXPIRY` | MQTT 5 with `MQTT_CLEAN_SESSION=false`: whole seconds from 1 the broker keeps the session after a disconnect, up to 4294967295 (never expires) | never expires |
//! | `MQTT_MAX_PACKET_SIZE` | largest packet sent, and largest message handed to a handler, bytes | `1048576` (1 MiB) |
//! | `MQTT_MAX_INCOMING_PACKET_SIZE` | largest packet read from the broker, bytes; a larger one drops the connection | `268435455` (the protocol's limit) |
//! | `MQTT_MAX_PENDING` | messages held at once (queued, running, or waiting for their acknowledgement's turn) before the client stops reading | `4096` |
//! | `MQTT_MAX_PENDING_BYTES` | payload bytes of queued and running messages before the client stops reading | `67108864` (64 MiB) |
//! | `MQTT_ACK_ORDER` | acknowledgement order: `connection` (receive order, as MQTT requires) or `topic` (per topic, outside the specification; see [`AckOrder`]) | `connection` |
//! | `MQTT_HEALTH_NAME` | the name health is published under, `system/health/<name>` | the source name |
//! | `MQTT_QUEUE_SIZE` | a route's queue capacity, unless the route sets its own | `256` |
//! | `MQTT_QUEUE_OVERFLOW` | a full route queue: `block`, `drop_oldest` or `drop_new`, unless the route sets its own | `block` |
//! | `MQTT_HANDLER_TIMEOUT` | seconds a handler may run in the inbound stack | `30` |
//! | `MQTT_REQUEST_CHANNEL_CAPACITY` | capacity of rumqttc's request channel | `1024` |
//! | `MQTT_OFFLINE_BUFFER` | publishes kept while disconnected | `1000` |
//! | `MQTT_OFFLINE_MAX_AGE` | seconds a publish may wait while disconnected | `60` |
//! | `MQTT_OFFLINE_OVERFLOW` | a full offline buffer: `reject` the new publish or `drop_oldest` | `reject` |
//! | `MQTT_PUBLISH_RETRIES` | attempts a publish gets, the first included (1: no retry), before it is dropped, logged and counted | `3` |
//! | `MQTT_PUBLISH_RETRY_BACKOFF` | seconds before a publish's first retry; it doubles each retry, up to 5 s or this if longer | `0.1` |
//!
//! Seconds may be fractional (`0.5`) and must be greater than 0 and at most 86400.
//! Booleans are `true`/`false`, `1`/`0`, `yes`/`no` or `on`/`off`, in any case.
//!
//! The URL schemes are `mqtt://` (port 1883 by default) and `mqtts://` (TLS, port 8883 by
//! default); `tcp://` is accepted for `mqtt://`, and `ssl://` and `tls://` for `mqtts://`.
//! With the `websocket` feature, `ws://` (port 80) and `wss://` (TLS, port 443) carry MQTT
//! over WebSockets, with the URL's path (`/` if none; `/mqtt` for most brokers) in the
//! upgrade request. TLS settings apply to `wss://` as to `mqtts://`.
//! User name and password are percent-decoded, so a password containing `/`, `?` or `#`
//! is written `%2F`, `%3F`, `%23`. IPv6 addresses go in brackets: `mqtt://[::1]:1883`.
//! A query string, or a path other than `/` on `mqtt://` and `mqtts://`, is an error:
//! every other setting has its own variable.
//!
//! # Credentials
//!
//! The user name comes from `MQTT_URL` or `MQTT_USERNAME`, the password from `MQTT_URL`,
//! `MQTT_PASSWORD` or `MQTT_PASSWORD_FILE`. Each has one place in the environment: a
//! user name in both `MQTT_URL` and `MQTT_USERNAME`, or a password in two places, is an
//! error naming both, since a deployment that sets two rarely knows which one wins. So
//! `MQTT_URL=mqtts://svc@broker` with `MQTT_PASSWORD_FILE` is fine, and so is a URL
//! without user info with `MQTT_USERNAME` and `MQTT_PASSWORD`. What the environment sets
//! replaces what code set ([`Config::with_env`]). `MQTT_PASSWORD_FILE` and
//! [`Config::with_password_fn`] are read before every connect, so a rotated secret or a
//! short-lived token is used without a restart.
//!
//! The password is kept in a [`Password`], whose `Debug` and `Display` print `***`; it
//! never appears in the `Debug` output of [`Config`], in any [`ConfigError`], in the
//! connection state nor in any log line, at any level.
//!
//! # TLS
//!
//! One crypto provider is compiled in, *ring*. [`Tls`] holds the settings of a TLS URL;
//! [`Config::with_rustls_config`] takes a complete [`rustls::ClientConfig`] for anything
//! the variables do not cover. A failed handshake (an unknown CA, a certificate for
//! another host, a client certificate the broker refuses) is logged at ERROR with the
//! broker and rustls' reason the first time and whenever the reason changes, is shown by
//! the connection state, and is retried with the reconnect backoff like any other
//! failure.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use tower_mqtt::config::Config;
//!
//! let env = |name: &str| match name {
//!     "MQTT_URL" => Some("mqtt://llm:s3cr%2Ft@broker.local:1884".to_owned()),
//!     "MQTT_SOURCE_NAME" => Some("llm-worker".to_owned()),
//!     "MQTT_KEEPALIVE" => Some("30".to_owned()),
//!     _ => None,
//! };
//! let config = Config::from_lookup(env)?;
//!
//! assert_eq!(config.broker.to_string(), "mqtt://broker.local:1884");
//! assert_eq!(config.keep_alive, Duration::from_secs(30));
//! assert!(config.client_id.starts_with("llm-worker-"));
//! let credentials = config.credentials.as_ref().unwrap();
//! assert_eq!(credentials.password.as_ref().unwrap().expose(), "s3cr/t");
//! assert!(!format!("{config:?}").contains("s3cr"));
//!
//! // Checked before anything connects: `serve` and `Client::new` do the same.
//! config.validate()?;
//! # Ok::<(), tower_mqtt::config::ConfigError>(())
//! ```
//!
//! Falling back to another broker (such as the embedded one) when `MQTT_URL` is unset,
//! while still reading every other variable:
//!
//! ```
//! use tower_mqtt::config::Config;
//!
//! let env = |name: &str| (name == "MQTT_SOURCE_NAME").then(|| "stt".to_owned());
//! let config = match Config::from_lookup(env) {
//!     Err(error) if error.is_missing_url() => {
//!         let fallback = "mqtt://127.0.0.1:1883"; // e.g. `EmbeddedBroker::url()`
//!         Config::from_lookup(|name| match name {
//!             "MQTT_URL" => Some(fallback.to_owned()),
//!             _ => env(name),
//!         })?
//!     }
//!     other => other?,
//! };
//! assert_eq!(config.source_name, "stt");
//! # Ok::<(), tower_mqtt::config::ConfigError>(())
//! ```

mod connect;
pub(crate) use self::connect::{ConnectionAttempts, FailureKind};
mod credentials;
mod env;
mod error;
mod offline;
mod protocol;
pub use self::protocol::{Protocol, UnknownProtocol};
mod stacks;
mod tls;
mod url;
mod validate;

use std::time::Duration;

use crate::subscription::{AckOrder, Overflow};

pub use self::{
    credentials::{PasswordFn, PasswordSource},
    error::ConfigError,
    offline::OfflineOverflow,
    tls::{ClientAuth, Tls},
    url::{BrokerAddr, Credentials, Password},
};
use self::{
    env::{
        channel_capacity_ok, generate_client_id, keep_alive_ok, name_ok, packet_size_ok, seconds,
        seconds_ok,
    },
    error::invalid,
    tls::tls_client_config,
    url::{host_ok, parse_url},
};
/// The rustls crate this crate is built with, for
/// [`Config::with_rustls_config`]: its `ClientConfig` is the standard type for a
/// TLS client configuration, and using it from here keeps the versions in step.
pub use tokio_rustls::rustls;

/// Names of the environment variables.
mod var {
    pub(super) const URL: &str = "MQTT_URL";
    pub(super) const CA_FILE: &str = "MQTT_CA_FILE";
    pub(super) const USERNAME: &str = "MQTT_USERNAME";
    pub(super) const PASSWORD: &str = "MQTT_PASSWORD";
    pub(super) const PASSWORD_FILE: &str = "MQTT_PASSWORD_FILE";
    pub(super) const CLIENT_CERT_FILE: &str = "MQTT_CLIENT_CERT_FILE";
    pub(super) const CLIENT_KEY_FILE: &str = "MQTT_CLIENT_KEY_FILE";
    pub(super) const TLS_ALPN: &str = "MQTT_TLS_ALPN";
    pub(super) const CLIENT_ID: &str = "MQTT_CLIENT_ID";
    pub(super) const SOURCE_NAME: &str = "MQTT_SOURCE_NAME";
    pub(super) const KEEPALIVE: &str = "MQTT_KEEPALIVE";
    pub(super) const ENABLE_HEALTH: &str = "MQTT_ENABLE_HEALTH";
    pub(super) const ENABLE_HEARTBEAT: &str = "MQTT_ENABLE_HEARTBEAT";
    pub(super) const HEARTBEAT_INTERVAL: &str = "MQTT_HEARTBEAT_INTERVAL";
    pub(super) const DEDUPE_TTL: &str = "MQTT_DEDUPE_TTL";
    pub(super) const DEDUPE_MAX_ENTRIES: &str = "MQTT_DEDUPE_MAX_ENTRIES";
    pub(super) const RECONNECT_MIN_DELAY: &str = "MQTT_RECONNECT_MIN_DELAY";
    pub(super) const RECONNECT_MAX_DELAY: &str = "MQTT_RECONNECT_MAX_DELAY";
    pub(super) const CLEAN_SESSION: &str = "MQTT_CLEAN_SESSION";
    pub(super) const PROTOCOL: &str = "MQTT_PROTOCOL";
    pub(super) const SESSION_EXPIRY: &str = "MQTT_SESSION_EXPIRY";
    pub(super) const MAX_PACKET_SIZE: &str = "MQTT_MAX_PACKET_SIZE";
    pub(super) const REQUEST_CHANNEL_CAPACITY: &str = "MQTT_REQUEST_CHANNEL_CAPACITY";
    pub(super) const OFFLINE_BUFFER: &str = "MQTT_OFFLINE_BUFFER";
    pub(super) const OFFLINE_MAX_AGE: &str = "MQTT_OFFLINE_MAX_AGE";
    pub(super) const OFFLINE_OVERFLOW: &str = "MQTT_OFFLINE_OVERFLOW";
    pub(super) const MAX_INCOMING_PACKET_SIZE: &str = "MQTT_MAX_INCOMING_PACKET_SIZE";
    pub(super) const MAX_PENDING: &str = "MQTT_MAX_PENDING";
    pub(super) const MAX_PENDING_BYTES: &str = "MQTT_MAX_PENDING_BYTES";
    pub(super) const ACK_ORDER: &str = "MQTT_ACK_ORDER";
    pub(super) const HEALTH_NAME: &str = "MQTT_HEALTH_NAME";
    pub(super) const QUEUE_SIZE: &str = "MQTT_QUEUE_SIZE";
    pub(super) const QUEUE_OVERFLOW: &str = "MQTT_QUEUE_OVERFLOW";
    pub(super) const HANDLER_TIMEOUT: &str = "MQTT_HANDLER_TIMEOUT";
    pub(super) const PUBLISH_RETRIES: &str = "MQTT_PUBLISH_RETRIES";
    pub(super) const PUBLISH_RETRY_BACKOFF: &str = "MQTT_PUBLISH_RETRY_BACKOFF";
}

/// What each variable must look like; quoted in errors.
mod expect {
    pub(super) const OFFLINE_OVERFLOW: &str = "reject or drop_oldest";
    pub(super) const ACK_ORDER: &str = "connection or topic";
    pub(super) const QUEUE_OVERFLOW: &str = "block, drop_oldest or drop_new";
    pub(super) const DEDUPE_TTL: &str = "0 (dedup off) or a number of seconds greater than 0 and \
                                         at most 86400, such as 30 or 0.5";
    pub(super) const URL: &str = "a broker URL such as mqtt://host:1883, mqtts://host:8883 \
                                  or mqtt://user:password@host:1883";
    pub(super) const SCHEME: &str = "a URL starting with mqtt://, mqtts://, ws:// or wss:// \
                                     (tcp://, ssl:// and tls:// are accepted aliases)";
    pub(super) const WEBSOCKET_FEATURE: &str = "mqtt:// or mqtts://: ws:// and wss:// need \
                                                tower-mqtt's `websocket` cargo feature";
    pub(super) const WEBSOCKET_PATH: &str = "a WebSocket path of printable ASCII without \
                                             spaces (percent-encode others), such as /mqtt";
    pub(super) const CERT_FILE: &str = "a PEM file of the client certificate chain, the \
                                        client's own certificate first";
    pub(super) const KEY_FILE: &str = "a PEM file of the client certificate's private key: \
                                       PKCS#8, PKCS#1 RSA or SEC1 EC, unencrypted";
    pub(super) const KEY_MATCHES_CERT: &str = "the private key of the first certificate in \
                                               MQTT_CLIENT_CERT_FILE (this key does not \
                                               match it)";
    pub(super) const KEY_WITH_CERT: &str = "the PEM file of the private key, since \
                                            MQTT_CLIENT_CERT_FILE is set";
    pub(super) const CERT_WITH_KEY: &str = "the PEM file of the client certificate chain, \
                                            since MQTT_CLIENT_KEY_FILE is set";
    pub(super) const ALPN: &str = "protocol names separated by commas, each of 1 to 255 \
                                   printable ASCII characters, such as x-amzn-mqtt-ca";
    pub(super) const CUSTOM_TLS: &str = "unset: a complete rustls ClientConfig was given \
                                         (Config::with_rustls_config) and is used as it is";
    pub(super) const ONE_PLACE: &str = "each of the user name and the password in one place \
                                        only: the user name in MQTT_URL or MQTT_USERNAME, the \
                                        password in MQTT_URL, MQTT_PASSWORD or \
                                        MQTT_PASSWORD_FILE";
    pub(super) const USER_FOR_PASSWORD: &str = "a user name as well (MQTT_USERNAME or user@ in \
                                                MQTT_URL): MQTT sends a password only with a \
                                                user name";
    pub(super) const HOST: &str = "a host name or IP address after '//' (and after '@' when \
                                   a user name is given), such as mqtt://broker.local:1883";
    pub(super) const HOST_CHARS: &str = "a host name or IPv4 address made of letters, digits, \
                                         '-', '.' and '_', or an IPv6 address in brackets";
    pub(super) const IPV6: &str = "an IPv6 address in brackets, optionally followed by ':' and \
                                   a port, such as mqtt://[::1]:1883";
    pub(super) const PORT: &str = "a port number between 1 and 65535 after ':'";
    pub(super) const PATH: &str = "no path after the host (a trailing '/' is allowed); \
                                   other settings have their own MQTT_* variables";
    pub(super) const QUERY: &str = "no query string ('?...'); settings such as the client id \
                                    come from their own MQTT_* variables";
    pub(super) const FRAGMENT: &str = "no fragment ('#...') after the host";
    pub(super) const RESERVED_IN_USERINFO: &str = "a user name and password with '/', '?', '#' \
                                                   percent-encoded as %2F, %3F, %23";
    pub(super) const USER: &str = "a non-empty user name before ':' or '@', such as \
                                   mqtt://user:password@host";
    pub(super) const USERINFO_UTF8: &str = "a user name and password that are valid UTF-8 \
                                            once percent-decoded";
    pub(super) const USERINFO_LEN: &str = "a user name and password of at most 65535 bytes each";
    pub(super) const NAME: &str = "a non-empty name of at most 65535 bytes without '/', '+', \
                                   '#' or control characters (it is used as a topic level)";
    pub(super) const KEEPALIVE: &str = "an integer number of seconds between 1 and 65535";
    pub(super) const KEEPALIVE_V5: &str = "an integer number of seconds between 5 and 65535 \
                                           with MQTT_PROTOCOL=5 (the MQTT 5 client's minimum)";
    pub(super) const PROTOCOL: &str = "3.1.1 or 5";
    pub(super) const SESSION_EXPIRY: &str = "an integer number of seconds between 1 and \
                                             4294967295 (the session never expires); a \
                                             session that ends at every disconnect is \
                                             MQTT_CLEAN_SESSION=true";
    pub(super) const SESSION_EXPIRY_V5: &str = "unset: a session expiry is an MQTT 5 setting \
                                                (MQTT_PROTOCOL=5)";
    pub(super) const SESSION_EXPIRY_CLEAN: &str = "unset, or MQTT_CLEAN_SESSION=false: a clean \
                                                   session is discarded at every connect";
    pub(super) const SECONDS: &str = "a number of seconds greater than 0 and at most 86400, \
                                      such as 5 or 0.5";
    pub(super) const BOOL: &str = "a boolean: true, false, 1, 0, yes, no, on or off";
    pub(super) const POSITIVE: &str = "a positive integer";
    pub(super) const ATTEMPTS: &str = "a whole number of attempts from 1 (no retry) to 100";
    pub(super) const PACKET_SIZE: &str = "an integer number of bytes between 1024 and \
                                          268435455 (the MQTT maximum)";
    pub(super) const CHANNEL_CAPACITY: &str = "an integer between 1 and 1048576";
    pub(super) const RECONNECT_ORDER: &str = "MQTT_RECONNECT_MIN_DELAY to be at most \
                                              MQTT_RECONNECT_MAX_DELAY";
}

const DEFAULT_SOURCE_NAME: &str = "tower-mqtt";
const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(60);
const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);
// The stacks' own defaults, so that a default configuration builds exactly
// `InboundStack::new()` and `OutboundStack::new(source)`.
const DEFAULT_DEDUPE_TTL: Duration = tower_mqtt_layers::dedup::DEFAULT_TTL;
const DEFAULT_DEDUPE_MAX_ENTRIES: u64 = tower_mqtt_layers::dedup::DEFAULT_MAX_ENTRIES;
const DEFAULT_RECONNECT_MIN_DELAY: Duration = Duration::from_millis(500);
const DEFAULT_RECONNECT_MAX_DELAY: Duration = Duration::from_secs(5);
const DEFAULT_MAX_PACKET_SIZE: usize =
    tower_mqtt_layers::outbound::size_guard::DEFAULT_MAX_PACKET_SIZE;
const DEFAULT_REQUEST_CHANNEL_CAPACITY: usize = 1024;
const DEFAULT_MAX_PENDING: usize = 4096;
const DEFAULT_HANDLER_TIMEOUT: Duration = tower_mqtt_layers::timeout::DEFAULT_TIMEOUT;
const DEFAULT_MAX_PENDING_BYTES: usize = 64 * 1024 * 1024;

const MQTT_PORT: u16 = 1883;
const MQTTS_PORT: u16 = 8883;
const WS_PORT: u16 = 80;
const WSS_PORT: u16 = 443;
/// Longest duration accepted for any seconds variable: one day.
const MAX_SECONDS: Duration = Duration::from_secs(86_400);
/// Longest string MQTT can encode (a two-byte length prefix).
const MAX_MQTT_STRING: usize = 65_535;
/// Largest remaining length MQTT 3.1.1 can encode.
const MAX_MQTT_PACKET: usize = 268_435_455;
const MIN_PACKET_SIZE: usize = 1024;
const MAX_REQUEST_CHANNEL_CAPACITY: usize = 1 << 20;

/// Settings of the broker connection and of the runtime around it.
///
/// Built by [`Config::from_env`], [`Config::from_lookup`] or [`Config::new`] and adjusted
/// with the `with_*` setters. The setters do not validate; [`Config::validate`] does,
/// and [`Client::new`](crate::Client::new) and [`serve`](crate::serve) call it, so a
/// bad value is reported before anything connects. `Debug` never shows the password.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Config {
    /// The broker to connect to (`MQTT_URL`), with its TLS settings (`MQTT_CA_FILE`,
    /// `MQTT_CLIENT_CERT_FILE`, `MQTT_CLIENT_KEY_FILE`, `MQTT_TLS_ALPN`).
    pub broker: BrokerAddr,
    /// User name and password: from the URL's `user:password@`, `MQTT_USERNAME` and
    /// `MQTT_PASSWORD`, or code.
    pub credentials: Option<Credentials>,
    /// Where the password is fetched from before every connect (`MQTT_PASSWORD_FILE`,
    /// [`with_password_file`](Self::with_password_file),
    /// [`with_password_fn`](Self::with_password_fn)); it replaces the password of
    /// [`credentials`](Self::credentials).
    pub password_source: Option<PasswordSource>,
    /// MQTT client id (`MQTT_CLIENT_ID`). By default `<source_name>-<8 random lowercase
    /// hex digits>`, so that several instances of one service can run at once.
    pub client_id: String,
    /// The name of this service (`MQTT_SOURCE_NAME`), default `tower-mqtt`.
    pub source_name: String,
    /// Keep-alive interval (`MQTT_KEEPALIVE`), whole seconds from 1 to 65535, default 60 s.
    pub keep_alive: Duration,
    /// Publish retained health messages (`MQTT_ENABLE_HEALTH`), default `false`.
    pub enable_health: bool,
    /// Publish heartbeats (`MQTT_ENABLE_HEARTBEAT`), default `false`.
    pub enable_heartbeat: bool,
    /// Interval between heartbeats (`MQTT_HEARTBEAT_INTERVAL`), default 5 s.
    pub heartbeat_interval: Duration,
    /// How long a delivery is remembered for deduplication (`MQTT_DEDUPE_TTL`), default 30 s.
    pub dedupe_ttl: Duration,
    /// How many deliveries are remembered for deduplication (`MQTT_DEDUPE_MAX_ENTRIES`),
    /// default 2048.
    pub dedupe_max_entries: u64,
    /// First delay before reconnecting (`MQTT_RECONNECT_MIN_DELAY`), default 0.5 s.
    pub reconnect_min_delay: Duration,
    /// Longest delay before reconnecting (`MQTT_RECONNECT_MAX_DELAY`), default 5 s; at
    /// least [`reconnect_min_delay`](Self::reconnect_min_delay).
    pub reconnect_max_delay: Duration,
    /// Ask the broker for a clean session (`MQTT_CLEAN_SESSION`), default `true`.
    ///
    /// On MQTT 5 it is Clean Start at every connect; `false` keeps the session
    /// for [`session_expiry`](Self::session_expiry) after a disconnect.
    pub clean_session: bool,
    /// The MQTT version spoken (`MQTT_PROTOCOL`), default [`Protocol::V311`].
    pub protocol: Protocol,
    /// MQTT 5, with [`clean_session`](Self::clean_session) `false`: how long
    /// the broker keeps the session after a disconnect (`MQTT_SESSION_EXPIRY`,
    /// whole seconds). `None`, the default, is "never expires" (the Session
    /// Expiry Interval 0xFFFFFFFF), which is what a persistent session means
    /// on MQTT 3.1.1. A clean session expires at once (interval 0).
    pub session_expiry: Option<Duration>,
    /// Largest packet sent or received, in bytes (`MQTT_MAX_PACKET_SIZE`), default 1 MiB.
    /// (rumqttc's own default is 10 KiB, which rejects ordinary payloads.)
    pub max_packet_size: usize,
    /// Capacity of the queue of packets waiting to be written to the broker
    /// (`MQTT_REQUEST_CHANNEL_CAPACITY`), default 1024: publishes, acknowledgements
    /// and subscriptions. When it is full, publishing waits.
    pub request_channel_capacity: usize,
    /// Largest packet read from the broker, in bytes (`MQTT_MAX_INCOMING_PACKET_SIZE`),
    /// default the protocol's limit (256 MiB).
    ///
    /// rumqttc drops the connection on a packet above this, and the broker sends it
    /// again on the next connection, forever. At the protocol's limit that cannot
    /// happen: a message above [`max_packet_size`](Self::max_packet_size) is read,
    /// reported once at ERROR with its topic and size, acknowledged and dropped. The
    /// price is that one such message is held in memory while it is read; lower this
    /// to bound that, accepting that a larger message then wedges the connection.
    pub max_incoming_packet_size: usize,
    /// Messages held at once (`MQTT_MAX_PENDING`), default 4096: queued, running, or
    /// handled and waiting for their acknowledgement's turn. At the limit the client
    /// stops reading from the broker until a quarter of them are done.
    pub max_pending: usize,
    /// Payload bytes of queued and running messages (`MQTT_MAX_PENDING_BYTES`), default
    /// 64 MiB; works like [`max_pending`](Self::max_pending).
    pub max_pending_bytes: usize,
    /// The order acknowledgements leave in (`MQTT_ACK_ORDER`), default
    /// [`AckOrder::Connection`]: receive order, as the protocol requires.
    pub ack_order: AckOrder,
    /// Publishes kept while disconnected (`MQTT_OFFLINE_BUFFER`), default 1000.
    pub offline_buffer: usize,
    /// How long a publish may wait while disconnected (`MQTT_OFFLINE_MAX_AGE`),
    /// default 60 s.
    pub offline_max_age: Duration,
    /// What a full offline buffer does (`MQTT_OFFLINE_OVERFLOW`), default reject.
    pub offline_overflow: OfflineOverflow,
    /// The name health is published under, `system/health/<name>`
    /// (`MQTT_HEALTH_NAME`), when it differs from the source name; see
    /// [`health_name`](Self::health_name).
    pub health_name: Option<String>,
    /// A route's queue capacity unless it sets its own (`MQTT_QUEUE_SIZE`),
    /// default 256.
    pub queue_capacity: usize,
    /// What a route's full queue does unless it sets its own
    /// (`MQTT_QUEUE_OVERFLOW`: `block`, `drop_oldest` or `drop_new`), default
    /// block.
    pub queue_overflow: Overflow,
    /// How long a handler may run before it fails, in the inbound stack
    /// (`MQTT_HANDLER_TIMEOUT`), default 30 s.
    pub handler_timeout: Duration,
    /// Attempts a publish gets, the first included (`MQTT_PUBLISH_RETRIES`),
    /// default 3; after the last one it is dropped, logged and counted.
    pub publish_attempts: u32,
    /// The wait before a publish's first retry (`MQTT_PUBLISH_RETRY_BACKOFF`),
    /// default 100 ms; it doubles each retry, up to 5 s or this if longer.
    pub publish_retry_backoff: Duration,
    /// Whether `client_id` was generated from `source_name` (and follows it).
    client_id_origin: ClientIdOrigin,
}

impl Config {
    /// A configuration for the broker at `url` (the `MQTT_URL` syntax) with every other
    /// setting at its default and a freshly generated client id.
    ///
    /// Errors name `MQTT_URL`, since `url` has its syntax.
    pub fn new(url: &str) -> Result<Config, ConfigError> {
        let (broker, credentials) = parse_url(url.trim())?;
        Ok(Config {
            broker,
            credentials,
            password_source: None,
            client_id: generate_client_id(DEFAULT_SOURCE_NAME),
            source_name: DEFAULT_SOURCE_NAME.to_owned(),
            keep_alive: DEFAULT_KEEP_ALIVE,
            enable_health: false,
            enable_heartbeat: false,
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            dedupe_ttl: DEFAULT_DEDUPE_TTL,
            dedupe_max_entries: DEFAULT_DEDUPE_MAX_ENTRIES,
            reconnect_min_delay: DEFAULT_RECONNECT_MIN_DELAY,
            reconnect_max_delay: DEFAULT_RECONNECT_MAX_DELAY,
            clean_session: true,
            protocol: Protocol::V311,
            session_expiry: None,
            max_packet_size: DEFAULT_MAX_PACKET_SIZE,
            request_channel_capacity: DEFAULT_REQUEST_CHANNEL_CAPACITY,
            max_incoming_packet_size: MAX_MQTT_PACKET,
            max_pending: DEFAULT_MAX_PENDING,
            max_pending_bytes: DEFAULT_MAX_PENDING_BYTES,
            ack_order: AckOrder::Connection,
            offline_buffer: 1000,
            offline_max_age: Duration::from_secs(60),
            offline_overflow: OfflineOverflow::Reject,
            health_name: None,
            queue_capacity: crate::subscription::DEFAULT_QUEUE_CAPACITY,
            queue_overflow: Overflow::Block,
            handler_timeout: DEFAULT_HANDLER_TIMEOUT,
            publish_attempts: tower_mqtt_layers::outbound::retry::DEFAULT_PUBLISH_ATTEMPTS,
            publish_retry_backoff: tower_mqtt_layers::retry::DEFAULT_MIN_BACKOFF,
            client_id_origin: ClientIdOrigin::Generated,
        })
    }

    /// Sets the client id; it no longer follows [`with_source_name`](Self::with_source_name).
    #[must_use]
    pub fn with_client_id(mut self, client_id: impl Into<String>) -> Self {
        self.client_id = client_id.into();
        self.client_id_origin = ClientIdOrigin::Explicit;
        self
    }

    /// Sets the service name. A generated client id is generated again from the new
    /// name; one set with [`with_client_id`](Self::with_client_id) is kept.
    #[must_use]
    pub fn with_source_name(mut self, source_name: impl Into<String>) -> Self {
        self.source_name = source_name.into();
        if self.client_id_origin == ClientIdOrigin::Generated {
            self.client_id = generate_client_id(&self.source_name);
        }
        self
    }

    /// Sets the user name and password; a password source set before is dropped.
    #[must_use]
    pub fn with_credentials(mut self, credentials: Credentials) -> Self {
        if credentials.password.is_some() {
            self.password_source = None;
        }
        self.credentials = Some(credentials);
        self
    }

    /// Sets the keep-alive interval (whole seconds from 1 to 65535, checked by
    /// [`validate`](Self::validate)).
    #[must_use]
    pub fn with_keep_alive(mut self, keep_alive: Duration) -> Self {
        self.keep_alive = keep_alive;
        self
    }

    /// Sets whether the broker is asked for a clean session.
    #[must_use]
    pub fn with_clean_session(mut self, clean_session: bool) -> Self {
        self.clean_session = clean_session;
        self
    }

    /// Sets the MQTT version (`MQTT_PROTOCOL`).
    ///
    /// ```
    /// use tower_mqtt::config::{Config, Protocol};
    ///
    /// let config = Config::new("mqtt://localhost").unwrap().with_protocol(Protocol::V5);
    /// assert_eq!(config.protocol, Protocol::V5);
    /// ```
    #[must_use]
    pub fn with_protocol(mut self, protocol: Protocol) -> Self {
        self.protocol = protocol;
        self
    }

    /// Sets how long an MQTT 5 broker keeps the session after a disconnect
    /// (`MQTT_SESSION_EXPIRY`); it needs [`with_clean_session(false)`](Self::with_clean_session).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_mqtt::config::{Config, Protocol};
    ///
    /// let config = Config::new("mqtt://localhost").unwrap()
    ///     .with_protocol(Protocol::V5)
    ///     .with_clean_session(false)
    ///     .with_session_expiry(Duration::from_secs(3600));
    /// assert!(config.validate().is_ok());
    /// assert!(config.with_clean_session(true).validate().is_err());
    /// ```
    #[must_use]
    pub fn with_session_expiry(mut self, expiry: Duration) -> Self {
        self.session_expiry = Some(expiry);
        self
    }

    /// Turns retained health messages on or off.
    #[must_use]
    pub fn with_health(mut self, enable: bool) -> Self {
        self.enable_health = enable;
        self
    }

    /// Turns heartbeats on or off.
    #[must_use]
    pub fn with_heartbeat(mut self, enable: bool) -> Self {
        self.enable_heartbeat = enable;
        self
    }

    /// Sets the interval between heartbeats.
    #[must_use]
    pub fn with_heartbeat_interval(mut self, interval: Duration) -> Self {
        self.heartbeat_interval = interval;
        self
    }

    /// Sets how long and how many deliveries are remembered for deduplication.
    #[must_use]
    pub fn with_dedupe(mut self, ttl: Duration, max_entries: u64) -> Self {
        self.dedupe_ttl = ttl;
        self.dedupe_max_entries = max_entries;
        self
    }

    /// Sets the first and the longest delay before reconnecting.
    ///
    /// Like every setter this does not fail: [`validate`](Self::validate) reports
    /// `min > max`, naming `MQTT_RECONNECT_MIN_DELAY` and `MQTT_RECONNECT_MAX_DELAY`.
    #[must_use]
    pub fn with_reconnect_delays(mut self, min: Duration, max: Duration) -> Self {
        self.reconnect_min_delay = min;
        self.reconnect_max_delay = max;
        self
    }

    /// Sets the largest packet sent or received, in bytes.
    #[must_use]
    pub fn with_max_packet_size(mut self, bytes: usize) -> Self {
        self.max_packet_size = bytes;
        self
    }

    /// Sets the largest packet read from the broker; see
    /// [`max_incoming_packet_size`](Self::max_incoming_packet_size).
    ///
    /// ```
    /// let config = tower_mqtt::config::Config::new("mqtt://localhost")?
    ///     .with_max_incoming_packet_size(16 * 1024 * 1024);
    /// assert_eq!(config.max_incoming_packet_size, 16 * 1024 * 1024);
    /// # Ok::<(), tower_mqtt::config::ConfigError>(())
    /// ```
    #[must_use]
    pub fn with_max_incoming_packet_size(mut self, bytes: usize) -> Self {
        self.max_incoming_packet_size = bytes;
        self
    }

    /// Sets the pending limits: messages, and payload bytes; see
    /// [`max_pending`](Self::max_pending).
    ///
    /// ```
    /// let config = tower_mqtt::config::Config::new("mqtt://localhost")?
    ///     .with_max_pending(1000, 8 * 1024 * 1024);
    /// assert_eq!((config.max_pending, config.max_pending_bytes), (1000, 8 * 1024 * 1024));
    /// # Ok::<(), tower_mqtt::config::ConfigError>(())
    /// ```
    #[must_use]
    pub fn with_max_pending(mut self, messages: usize, bytes: usize) -> Self {
        self.max_pending = messages;
        self.max_pending_bytes = bytes;
        self
    }

    /// Sets the acknowledgement order; [`AckOrder::Topic`] is outside the
    /// specification (see its docs).
    ///
    /// ```
    /// use tower_mqtt::{config::Config, AckOrder};
    ///
    /// let config = Config::new("mqtt://localhost")?.with_ack_order(AckOrder::Topic);
    /// assert_eq!(config.ack_order, AckOrder::Topic);
    /// # Ok::<(), tower_mqtt::config::ConfigError>(())
    /// ```
    #[must_use]
    pub fn with_ack_order(mut self, order: AckOrder) -> Self {
        self.ack_order = order;
        self
    }

    /// Sets the name health is published under, `system/health/<name>`, when
    /// it differs from the source name.
    ///
    /// ```
    /// let config = tower_mqtt::config::Config::new("mqtt://localhost")?
    ///     .with_source_name("memory-worker")
    ///     .with_health_name("memory");
    /// assert_eq!(config.health_name(), "memory");
    /// # Ok::<(), tower_mqtt::config::ConfigError>(())
    /// ```
    #[must_use]
    pub fn with_health_name(mut self, name: impl Into<String>) -> Self {
        self.health_name = Some(name.into());
        self
    }

    /// The name health is published under: the health name if set, else the
    /// source name.
    pub fn health_name(&self) -> &str {
        self.health_name.as_deref().unwrap_or(&self.source_name)
    }

    /// Whether dedup is on: `MQTT_DEDUPE_TTL=0` turns it off.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let config = tower_mqtt::config::Config::new("mqtt://localhost")?;
    /// assert!(config.dedup_enabled());
    /// assert!(!config.with_dedupe(Duration::ZERO, 2048).dedup_enabled());
    /// # Ok::<(), tower_mqtt::config::ConfigError>(())
    /// ```
    pub fn dedup_enabled(&self) -> bool {
        !self.dedupe_ttl.is_zero()
    }

    /// Sets the defaults of every route's queue: capacity and overflow
    /// policy, for routes that do not set their own.
    ///
    /// ```
    /// use tower_mqtt::{config::Config, Overflow};
    ///
    /// let config = Config::new("mqtt://localhost")?.with_queue(64, Overflow::DropOldest);
    /// assert_eq!((config.queue_capacity, config.queue_overflow), (64, Overflow::DropOldest));
    /// # Ok::<(), tower_mqtt::config::ConfigError>(())
    /// ```
    #[must_use]
    pub fn with_queue(mut self, capacity: usize, overflow: Overflow) -> Self {
        self.queue_capacity = capacity;
        self.queue_overflow = overflow;
        self
    }

    /// Sets how long a handler may run in the inbound stack.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let config = tower_mqtt::config::Config::new("mqtt://localhost")?
    ///     .with_handler_timeout(Duration::from_secs(120));
    /// assert_eq!(config.handler_timeout, Duration::from_secs(120));
    /// # Ok::<(), tower_mqtt::config::ConfigError>(())
    /// ```
    #[must_use]
    pub fn with_handler_timeout(mut self, timeout: Duration) -> Self {
        self.handler_timeout = timeout;
        self
    }

    /// Sets how many attempts a publish gets (the first included; 1 means no
    /// retry) and the wait before its first retry, for every publish of the
    /// runtime: handlers', health, dead letters.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_mqtt::config::Config;
    ///
    /// let config = Config::new("mqtt://localhost")?
    ///     .with_publish_retries(5, Duration::from_millis(250));
    /// assert_eq!(config.publish_attempts, 5);
    /// # Ok::<(), tower_mqtt::config::ConfigError>(())
    /// ```
    #[must_use]
    pub fn with_publish_retries(mut self, attempts: u32, first_backoff: Duration) -> Self {
        self.publish_attempts = attempts;
        self.publish_retry_backoff = first_backoff;
        self
    }

    /// Sets the capacity of rumqttc's request channel.
    #[must_use]
    pub fn with_request_channel_capacity(mut self, capacity: usize) -> Self {
        self.request_channel_capacity = capacity;
        self
    }
}

/// Where [`Config::client_id`] came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ClientIdOrigin {
    /// Generated from the source name; regenerated when the source name changes.
    Generated,
    /// Set by `MQTT_CLIENT_ID` or [`Config::with_client_id`].
    Explicit,
}

#[cfg(test)]
mod tests;
