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
//! | `MQTT_URL` | the broker: `mqtt://[user[:password]@]host[:port]` or `mqtts://…` | required |
//! | `MQTT_CA_FILE` | PEM file of CA certificates trusted besides the system roots (`mqtts` only) | none |
//! | `MQTT_CLIENT_ID` | MQTT client id; must be unique per running instance | `<source name>-<8 random hex digits>` |
//! | `MQTT_SOURCE_NAME` | the name of this service | `tower-mqtt` |
//! | `MQTT_KEEPALIVE` | keep-alive, whole seconds from 1 to 65535 | `60` |
//! | `MQTT_ENABLE_HEALTH` | publish retained health on `system/health/<service>` | `false` |
//! | `MQTT_ENABLE_HEARTBEAT` | publish heartbeats on `system/keepalive/<client id>` | `false` |
//! | `MQTT_HEARTBEAT_INTERVAL` | seconds between heartbeats | `5` |
//! | `MQTT_DEDUPE_TTL` | seconds a delivery is remembered for deduplication; `0` turns dedup off | `30` |
//! | `MQTT_DEDUPE_MAX_ENTRIES` | deliveries remembered for deduplication | `2048` |
//! | `MQTT_RECONNECT_MIN_DELAY` | first delay before reconnecting, seconds | `0.5` |
//! | `MQTT_RECONNECT_MAX_DELAY` | longest delay before reconnecting, seconds, at least the minimum | `5` |
//! | `MQTT_CLEAN_SESSION` | ask the broker for a clean session | `true` |
//! | `MQTT_MAX_PACKET_SIZE` | largest packet sent, and largest message handed to a handler, bytes | `1048576` (1 MiB) |
//! | `MQTT_MAX_INCOMING_PACKET_SIZE` | largest packet read from the broker, bytes; a larger one drops the connection | `268435455` (the protocol's limit) |
//! | `MQTT_MAX_PENDING` | messages held at once (queued, running, or waiting for their acknowledgement's turn) before the client stops reading | `4096` |
//! | `MQTT_MAX_PENDING_BYTES` | payload bytes of queued and running messages before the client stops reading | `67108864` (64 MiB) |
//! | `MQTT_ACK_ORDER` | acknowledgement order: `topic` (per topic) or `global` (the whole connection) | `topic` |
//! | `MQTT_HEALTH_NAME` | the name health is published under, `system/health/<name>` | the source name |
//! | `MQTT_QUEUE_SIZE` | a route's queue capacity, unless the route sets its own | `256` |
//! | `MQTT_QUEUE_OVERFLOW` | a full route queue: `block`, `drop_oldest` or `drop_new`, unless the route sets its own | `block` |
//! | `MQTT_HANDLER_TIMEOUT` | seconds a handler may run in the standard stack | `30` |
//! | `MQTT_REQUEST_CHANNEL_CAPACITY` | capacity of rumqttc's request channel | `1024` |
//! | `MQTT_OFFLINE_BUFFER` | publishes kept while disconnected | `1000` |
//! | `MQTT_OFFLINE_MAX_AGE` | seconds a publish may wait while disconnected | `60` |
//! | `MQTT_OFFLINE_OVERFLOW` | a full offline buffer: `reject` the new publish or `drop_oldest` | `reject` |
//!
//! Seconds may be fractional (`0.5`) and must be greater than 0 and at most 86400.
//! Booleans are `true`/`false`, `1`/`0`, `yes`/`no` or `on`/`off`, in any case.
//!
//! The URL schemes are `mqtt://` (port 1883 by default) and `mqtts://` (TLS, port 8883 by
//! default); `tcp://` is accepted for `mqtt://`, and `ssl://` and `tls://` for `mqtts://`.
//! User name and password are percent-decoded, so a password containing `/`, `?` or `#`
//! is written `%2F`, `%3F`, `%23`. IPv6 addresses go in brackets: `mqtt://[::1]:1883`.
//! A query string or a path other than `/` is an error: every other setting has its own
//! variable.
//!
//! The password is kept in a [`Password`], whose `Debug` and `Display` print `***`; it
//! never appears in the `Debug` output of [`Config`] nor in any [`ConfigError`].
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
//! // Options for `rumqttc::AsyncClient::new`, validated so that rumqttc cannot panic.
//! let options = config.mqtt_options()?;
//! assert_eq!(options.broker_address(), ("broker.local".to_owned(), 1884));
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

use std::fmt;
use std::io;
use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use percent_encoding::percent_decode_str;
use rumqttc::{MqttOptions, TlsConfiguration, Transport};

use crate::publisher::OfflineOverflow;
use crate::subscription::{AckOrder, Overflow};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};

/// Names of the environment variables.
mod var {
    pub(super) const URL: &str = "MQTT_URL";
    pub(super) const CA_FILE: &str = "MQTT_CA_FILE";
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
}

/// What each variable must look like; quoted in errors.
mod expect {
    pub(super) const OFFLINE_OVERFLOW: &str = "reject or drop_oldest";
    pub(super) const ACK_ORDER: &str = "topic or global";
    pub(super) const QUEUE_OVERFLOW: &str = "block, drop_oldest or drop_new";
    pub(super) const DEDUPE_TTL: &str = "0 (dedup off) or a number of seconds greater than 0 and \
                                         at most 86400, such as 30 or 0.5";
    pub(super) const URL: &str = "a broker URL such as mqtt://host:1883, mqtts://host:8883 \
                                  or mqtt://user:password@host:1883";
    pub(super) const SCHEME: &str = "a URL starting with mqtt:// or mqtts:// \
                                     (tcp://, ssl:// and tls:// are accepted aliases)";
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
    pub(super) const SECONDS: &str = "a number of seconds greater than 0 and at most 86400, \
                                      such as 5 or 0.5";
    pub(super) const BOOL: &str = "a boolean: true, false, 1, 0, yes, no, on or off";
    pub(super) const POSITIVE: &str = "a positive integer";
    pub(super) const PACKET_SIZE: &str = "an integer number of bytes between 1024 and \
                                          268435455 (the MQTT maximum)";
    pub(super) const CHANNEL_CAPACITY: &str = "an integer between 1 and 1048576";
    pub(super) const RECONNECT_ORDER: &str = "MQTT_RECONNECT_MIN_DELAY to be at most \
                                              MQTT_RECONNECT_MAX_DELAY";
}

const DEFAULT_SOURCE_NAME: &str = "tower-mqtt";
const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(60);
const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);
const DEFAULT_DEDUPE_TTL: Duration = Duration::from_secs(30);
const DEFAULT_DEDUPE_MAX_ENTRIES: u64 = 2048;
const DEFAULT_RECONNECT_MIN_DELAY: Duration = Duration::from_millis(500);
const DEFAULT_RECONNECT_MAX_DELAY: Duration = Duration::from_secs(5);
const DEFAULT_MAX_PACKET_SIZE: usize = 1024 * 1024;
const DEFAULT_REQUEST_CHANNEL_CAPACITY: usize = 1024;
const DEFAULT_MAX_PENDING: usize = 4096;
const DEFAULT_HANDLER_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_MAX_PENDING_BYTES: usize = 64 * 1024 * 1024;

const MQTT_PORT: u16 = 1883;
const MQTTS_PORT: u16 = 8883;
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
/// and [`Config::mqtt_options`] calls it, so a bad value is reported before anything
/// connects. `Debug` never shows the password.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Config {
    /// The broker to connect to (`MQTT_URL`, `MQTT_CA_FILE`).
    pub broker: BrokerAddr,
    /// User name and password from the URL's `user:password@`, if any.
    pub credentials: Option<Credentials>,
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
    pub clean_session: bool,
    /// Largest packet sent or received, in bytes (`MQTT_MAX_PACKET_SIZE`), default 1 MiB.
    /// (rumqttc's own default is 10 KiB, which rejects ordinary payloads.)
    pub max_packet_size: usize,
    /// Capacity of rumqttc's request channel (`MQTT_REQUEST_CHANNEL_CAPACITY`), default
    /// 1024. Pass it to `rumqttc::AsyncClient::new`: rumqttc 0.25 ignores the copy kept
    /// in `MqttOptions`.
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
    /// How acknowledgements of different topics are ordered (`MQTT_ACK_ORDER`),
    /// default [`AckOrder::Topic`].
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
    /// How long a handler may run before it fails, in the standard stack
    /// (`MQTT_HANDLER_TIMEOUT`), default 30 s.
    pub handler_timeout: Duration,
    /// Whether `client_id` was generated from `source_name` (and follows it).
    client_id_origin: ClientIdOrigin,
}

impl Config {
    /// Reads the configuration from the process environment.
    ///
    /// Fails with [`ConfigError::Missing`] when `MQTT_URL` is unset (see
    /// [`ConfigError::is_missing_url`]); a value that is not valid Unicode is read lossily
    /// and then rejected by the check of that variable.
    pub fn from_env() -> Result<Config, ConfigError> {
        Self::from_lookup(|name| {
            std::env::var_os(name).map(|value| value.to_string_lossy().into_owned())
        })
    }

    /// Reads the configuration through `lookup`, which returns the value of a variable
    /// or `None` when it is unset.
    ///
    /// `MQTT_URL` is required; every other variable has a default (see the
    /// [module docs](self)). The result has been [validated](Config::validate).
    pub fn from_lookup<F: Fn(&str) -> Option<String>>(lookup: F) -> Result<Config, ConfigError> {
        let vars = Vars(lookup);
        let url = vars.get(var::URL).ok_or(ConfigError::Missing {
            var: var::URL,
            expected: expect::URL,
        })?;
        Self::apply(Config::new(&url)?, &vars)
    }

    /// This configuration with every `MQTT_*` variable that is set in the
    /// process environment on top (`MQTT_URL` too): the service's defaults in
    /// code, the deployment's in the environment, in one expression.
    ///
    /// ```no_run
    /// use tower_mqtt::config::Config;
    ///
    /// # fn main() -> Result<(), tower_mqtt::config::ConfigError> {
    /// let config = Config::new("mqtt://localhost:1883")?
    ///     .with_source_name("memory-worker")
    ///     .with_health_name("memory")
    ///     .with_health(true)
    ///     .with_env()?; // MQTT_URL, MQTT_ENABLE_HEALTH, ... win
    /// # Ok(()) }
    /// ```
    pub fn with_env(self) -> Result<Config, ConfigError> {
        self.with_lookup(|name| {
            std::env::var_os(name).map(|value| value.to_string_lossy().into_owned())
        })
    }

    /// [`with_env`](Self::with_env) with the variables read through `lookup`.
    ///
    /// ```
    /// use tower_mqtt::config::Config;
    ///
    /// let config = Config::new("mqtt://localhost:1883")?
    ///     .with_source_name("memory-worker")
    ///     .with_lookup(|var| (var == "MQTT_SOURCE_NAME").then(|| "memory-canary".to_owned()))?;
    /// assert_eq!(config.source_name, "memory-canary");
    /// assert_eq!(config.broker.port, 1883);
    /// # Ok::<(), tower_mqtt::config::ConfigError>(())
    /// ```
    pub fn with_lookup<F: Fn(&str) -> Option<String>>(
        mut self,
        lookup: F,
    ) -> Result<Config, ConfigError> {
        let vars = Vars(lookup);
        if let Some(url) = vars.get(var::URL) {
            let (broker, credentials) = parse_url(url.trim())?;
            self.broker = broker;
            self.credentials = credentials;
        }
        Self::apply(self, &vars)
    }

    /// Puts the variables that are set on top of `config`, and validates.
    #[allow(clippy::too_many_lines)] // one field per variable, nothing else
    fn apply<F: Fn(&str) -> Option<String>>(
        mut config: Config,
        vars: &Vars<F>,
    ) -> Result<Config, ConfigError> {
        if let Some(ca_file) = vars.get(var::CA_FILE) {
            if let Some(tls) = &mut config.broker.tls {
                tls.ca_file = Some(PathBuf::from(ca_file));
            } else {
                tracing::warn!(
                    ca_file,
                    broker = %config.broker,
                    "MQTT_CA_FILE is ignored: MQTT_URL does not use TLS (mqtts://)"
                );
            }
        }
        if let Some(name) = vars.parse(var::SOURCE_NAME, expect::NAME, parse_name)? {
            config = config.with_source_name(name);
        }
        if let Some(id) = vars.parse(var::CLIENT_ID, expect::NAME, parse_name)? {
            config = config.with_client_id(id);
        }
        let base = config;
        let config = Config {
            keep_alive: vars
                .parse(var::KEEPALIVE, expect::KEEPALIVE, parse_keep_alive)?
                .unwrap_or(base.keep_alive),
            enable_health: vars.flag(var::ENABLE_HEALTH)?.unwrap_or(base.enable_health),
            enable_heartbeat: vars
                .flag(var::ENABLE_HEARTBEAT)?
                .unwrap_or(base.enable_heartbeat),
            heartbeat_interval: vars
                .seconds(var::HEARTBEAT_INTERVAL)?
                .unwrap_or(base.heartbeat_interval),
            dedupe_ttl: vars
                .parse(var::DEDUPE_TTL, expect::DEDUPE_TTL, parse_dedupe_ttl)?
                .unwrap_or(base.dedupe_ttl),
            health_name: vars
                .parse(var::HEALTH_NAME, expect::NAME, parse_name)?
                .or(base.health_name.clone()),
            queue_capacity: vars
                .parse(var::QUEUE_SIZE, expect::POSITIVE, |raw| {
                    parse_usize(raw).filter(|n| *n > 0)
                })?
                .unwrap_or(base.queue_capacity),
            queue_overflow: vars
                .parse(var::QUEUE_OVERFLOW, expect::QUEUE_OVERFLOW, |raw| {
                    raw.to_ascii_lowercase().parse().ok()
                })?
                .unwrap_or(base.queue_overflow),
            handler_timeout: vars
                .seconds(var::HANDLER_TIMEOUT)?
                .unwrap_or(base.handler_timeout),
            dedupe_max_entries: vars
                .parse(var::DEDUPE_MAX_ENTRIES, expect::POSITIVE, parse_positive)?
                .unwrap_or(base.dedupe_max_entries),
            reconnect_min_delay: vars
                .seconds(var::RECONNECT_MIN_DELAY)?
                .unwrap_or(base.reconnect_min_delay),
            reconnect_max_delay: vars
                .seconds(var::RECONNECT_MAX_DELAY)?
                .unwrap_or(base.reconnect_max_delay),
            clean_session: vars.flag(var::CLEAN_SESSION)?.unwrap_or(base.clean_session),
            max_packet_size: vars
                .parse(var::MAX_PACKET_SIZE, expect::PACKET_SIZE, |raw| {
                    parse_usize(raw).filter(|n| packet_size_ok(*n))
                })?
                .unwrap_or(base.max_packet_size),
            request_channel_capacity: vars
                .parse(
                    var::REQUEST_CHANNEL_CAPACITY,
                    expect::CHANNEL_CAPACITY,
                    |raw| parse_usize(raw).filter(|n| channel_capacity_ok(*n)),
                )?
                .unwrap_or(base.request_channel_capacity),
            offline_buffer: vars
                .parse(var::OFFLINE_BUFFER, expect::POSITIVE, parse_usize)?
                .unwrap_or(base.offline_buffer),
            offline_max_age: vars
                .seconds(var::OFFLINE_MAX_AGE)?
                .unwrap_or(base.offline_max_age),
            offline_overflow: vars
                .parse(
                    var::OFFLINE_OVERFLOW,
                    expect::OFFLINE_OVERFLOW,
                    |raw| match raw.to_ascii_lowercase().as_str() {
                        "reject" => Some(OfflineOverflow::Reject),
                        "drop_oldest" => Some(OfflineOverflow::DropOldest),
                        _ => None,
                    },
                )?
                .unwrap_or(base.offline_overflow),
            max_incoming_packet_size: vars
                .parse(var::MAX_INCOMING_PACKET_SIZE, expect::PACKET_SIZE, |raw| {
                    parse_usize(raw).filter(|n| packet_size_ok(*n))
                })?
                .unwrap_or(base.max_incoming_packet_size),
            max_pending: vars
                .parse(var::MAX_PENDING, expect::POSITIVE, parse_usize)?
                .unwrap_or(base.max_pending),
            max_pending_bytes: vars
                .parse(var::MAX_PENDING_BYTES, expect::POSITIVE, parse_usize)?
                .unwrap_or(base.max_pending_bytes),
            ack_order: vars
                .parse(var::ACK_ORDER, expect::ACK_ORDER, |raw| raw.parse().ok())?
                .unwrap_or(base.ack_order),
            ..base
        };
        config.validate()?;
        Ok(config)
    }

    /// A configuration for the broker at `url` (the `MQTT_URL` syntax) with every other
    /// setting at its default and a freshly generated client id.
    ///
    /// Errors name `MQTT_URL`, since `url` has its syntax.
    pub fn new(url: &str) -> Result<Config, ConfigError> {
        let (broker, credentials) = parse_url(url.trim())?;
        Ok(Config {
            broker,
            credentials,
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
            max_packet_size: DEFAULT_MAX_PACKET_SIZE,
            request_channel_capacity: DEFAULT_REQUEST_CHANNEL_CAPACITY,
            max_incoming_packet_size: MAX_MQTT_PACKET,
            max_pending: DEFAULT_MAX_PENDING,
            max_pending_bytes: DEFAULT_MAX_PENDING_BYTES,
            ack_order: AckOrder::Topic,
            offline_buffer: 1000,
            offline_max_age: Duration::from_secs(60),
            offline_overflow: OfflineOverflow::Reject,
            health_name: None,
            queue_capacity: crate::subscription::DEFAULT_QUEUE_CAPACITY,
            queue_overflow: Overflow::Block,
            handler_timeout: DEFAULT_HANDLER_TIMEOUT,
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

    /// Sets the user name and password.
    #[must_use]
    pub fn with_credentials(mut self, credentials: Credentials) -> Self {
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

    /// Sets the acknowledgement order.
    ///
    /// ```
    /// use tower_mqtt::{config::Config, AckOrder};
    ///
    /// let config = Config::new("mqtt://localhost")?.with_ack_order(AckOrder::Global);
    /// assert_eq!(config.ack_order, AckOrder::Global);
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

    /// Sets how long a handler may run in the standard stack.
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

    /// Sets the capacity of rumqttc's request channel.
    #[must_use]
    pub fn with_request_channel_capacity(mut self, capacity: usize) -> Self {
        self.request_channel_capacity = capacity;
        self
    }

    /// The checks of the read and pending limits, the queues and the names
    /// added beside the fleet's variables.
    fn validate_limits(&self) -> Result<(), ConfigError> {
        if !self.dedupe_ttl.is_zero() && !seconds_ok(self.dedupe_ttl) {
            let value = seconds(self.dedupe_ttl);
            return Err(invalid(var::DEDUPE_TTL, value, expect::DEDUPE_TTL));
        }
        if !seconds_ok(self.handler_timeout) {
            let value = seconds(self.handler_timeout);
            return Err(invalid(var::HANDLER_TIMEOUT, value, expect::SECONDS));
        }
        if self.queue_capacity == 0 {
            return Err(invalid(var::QUEUE_SIZE, "0".to_owned(), expect::POSITIVE));
        }
        if let Some(name) = &self.health_name {
            if !name_ok(name) {
                return Err(invalid(var::HEALTH_NAME, name.clone(), expect::NAME));
            }
        }
        if !packet_size_ok(self.max_incoming_packet_size) {
            let value = self.max_incoming_packet_size.to_string();
            return Err(invalid(
                var::MAX_INCOMING_PACKET_SIZE,
                value,
                expect::PACKET_SIZE,
            ));
        }
        if self.max_pending == 0 {
            return Err(invalid(var::MAX_PENDING, "0".to_owned(), expect::POSITIVE));
        }
        if self.max_pending_bytes == 0 {
            return Err(invalid(
                var::MAX_PENDING_BYTES,
                "0".to_owned(),
                expect::POSITIVE,
            ));
        }
        Ok(())
    }

    /// The standard inbound stack as this configuration asks for it: dedup TTL
    /// and size from `MQTT_DEDUPE_TTL` and `MQTT_DEDUPE_MAX_ENTRIES`, and the
    /// fleet's event registry for raw payloads.
    ///
    /// ```
    /// let config = tower_mqtt::config::Config::new("mqtt://localhost:1883")?;
    /// let stack = config.inbound_stack();
    /// # let _ = stack;
    /// # Ok::<(), tower_mqtt::config::ConfigError>(())
    /// ```
    pub fn inbound_stack(&self) -> tower_mqtt_layers::StandardStack {
        tower_mqtt_layers::StandardStack::new()
            .registry(tower_mqtt_layers::EventRegistry::fleet())
            .dedup_ttl(self.dedupe_ttl)
            .dedup_max_entries(self.dedupe_max_entries)
            .timeout(self.handler_timeout)
    }

    /// Checks every setting, as [`from_lookup`](Self::from_lookup) does for the
    /// environment. Errors name the variable that sets the faulty field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !host_ok(&self.broker.host) {
            return Err(invalid(
                var::URL,
                self.broker.to_string(),
                expect::HOST_CHARS,
            ));
        }
        if self.broker.port == 0 {
            return Err(invalid(var::URL, self.broker.to_string(), expect::PORT));
        }
        if let Some(credentials) = &self.credentials {
            if credentials.username.is_empty() {
                return Err(invalid(var::URL, self.broker.to_string(), expect::USER));
            }
            let password_len = credentials.password.as_ref().map_or(0, |p| p.0.len());
            if credentials.username.len() > MAX_MQTT_STRING || password_len > MAX_MQTT_STRING {
                return Err(invalid(
                    var::URL,
                    self.broker.to_string(),
                    expect::USERINFO_LEN,
                ));
            }
        }
        if !name_ok(&self.source_name) {
            return Err(invalid(
                var::SOURCE_NAME,
                self.source_name.clone(),
                expect::NAME,
            ));
        }
        if !name_ok(&self.client_id) {
            return Err(invalid(
                var::CLIENT_ID,
                self.client_id.clone(),
                expect::NAME,
            ));
        }
        if !keep_alive_ok(self.keep_alive) {
            return Err(invalid(
                var::KEEPALIVE,
                seconds(self.keep_alive),
                expect::KEEPALIVE,
            ));
        }
        for (name, value) in [
            (var::HEARTBEAT_INTERVAL, self.heartbeat_interval),
            (var::RECONNECT_MIN_DELAY, self.reconnect_min_delay),
            (var::RECONNECT_MAX_DELAY, self.reconnect_max_delay),
        ] {
            if !seconds_ok(value) {
                return Err(invalid(name, seconds(value), expect::SECONDS));
            }
        }
        if self.reconnect_min_delay > self.reconnect_max_delay {
            return Err(ConfigError::Conflict {
                var: var::RECONNECT_MIN_DELAY,
                value: seconds(self.reconnect_min_delay),
                other_var: var::RECONNECT_MAX_DELAY,
                other_value: seconds(self.reconnect_max_delay),
                expected: expect::RECONNECT_ORDER,
            });
        }
        if self.dedupe_max_entries == 0 {
            return Err(invalid(
                var::DEDUPE_MAX_ENTRIES,
                "0".to_owned(),
                expect::POSITIVE,
            ));
        }
        if !packet_size_ok(self.max_packet_size) {
            let value = self.max_packet_size.to_string();
            return Err(invalid(var::MAX_PACKET_SIZE, value, expect::PACKET_SIZE));
        }
        if self.offline_buffer == 0 {
            return Err(invalid(
                var::OFFLINE_BUFFER,
                "0".to_owned(),
                expect::POSITIVE,
            ));
        }
        if !seconds_ok(self.offline_max_age) {
            let value = seconds(self.offline_max_age);
            return Err(invalid(var::OFFLINE_MAX_AGE, value, expect::SECONDS));
        }
        self.validate_limits()?;
        if !channel_capacity_ok(self.request_channel_capacity) {
            let value = self.request_channel_capacity.to_string();
            return Err(invalid(
                var::REQUEST_CHANNEL_CAPACITY,
                value,
                expect::CHANNEL_CAPACITY,
            ));
        }
        Ok(())
    }

    /// Options for `rumqttc::AsyncClient::new(options, config.request_channel_capacity)`.
    ///
    /// Sets the client id, broker host and port, credentials, keep-alive, clean session,
    /// the packet size limit (incoming and outgoing), the request channel capacity and,
    /// for `mqtts://`, a TLS transport that trusts the system's root certificates plus
    /// those of `MQTT_CA_FILE`. Manual acks, in-flight limits and the last will are left
    /// to the caller.
    ///
    /// The configuration is [validated](Self::validate) first, so the rumqttc setters
    /// that panic on bad input (`set_keep_alive` below one second, `set_clean_session(false)`
    /// with an empty client id) are never reached with one. Reading the CA file and the
    /// system certificate store happens here, so their errors appear here.
    pub fn mqtt_options(&self) -> Result<MqttOptions, ConfigError> {
        self.validate()?;
        let mut options = MqttOptions::new(
            self.client_id.clone(),
            self.broker.host.clone(),
            self.broker.port,
        );
        options
            .set_keep_alive(self.keep_alive)
            .set_clean_session(self.clean_session)
            .set_max_packet_size(self.max_incoming_packet_size, self.max_packet_size)
            .set_request_channel_capacity(self.request_channel_capacity);
        if let Some(credentials) = &self.credentials {
            let password = credentials.password.as_ref().map_or("", Password::expose);
            options.set_credentials(credentials.username.clone(), password);
        }
        if let Some(tls) = &self.broker.tls {
            let client_config = tls_client_config(&self.broker, tls)?;
            options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                Arc::new(client_config),
            )));
        }
        Ok(options)
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

/// Where the broker is: host, port and, for `mqtts://`, TLS settings.
///
/// `Display` prints `mqtt://host:port` or `mqtts://host:port` (IPv6 hosts in brackets)
/// and never includes credentials.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct BrokerAddr {
    /// Host name or IP address; an IPv6 address is kept without brackets.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// `Some` for a TLS connection (`mqtts://`).
    pub tls: Option<Tls>,
}

impl BrokerAddr {
    /// Whether the connection uses TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }
}

impl fmt::Display for BrokerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.is_tls() { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

/// TLS settings of a `mqtts://` connection.
///
/// The system's root certificates are always trusted; `ca_file` adds the certificates
/// of a PEM file (`MQTT_CA_FILE`), such as a private CA's.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Tls {
    /// PEM file of CA certificates trusted besides the system roots.
    pub ca_file: Option<PathBuf>,
}

impl Tls {
    /// TLS that trusts the system roots and, if given, the certificates in `ca_file`.
    pub fn new(ca_file: Option<PathBuf>) -> Self {
        Tls { ca_file }
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
pub struct Password(String);

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
            | ConfigError::Tls { var, .. } => var,
        }
    }

    /// Whether the error is that `MQTT_URL` is unset: the cue to fall back to another
    /// broker, such as the embedded one.
    pub fn is_missing_url(&self) -> bool {
        matches!(self, ConfigError::Missing { var, .. } if *var == var::URL)
    }
}

fn invalid(var: &'static str, value: String, expected: &'static str) -> ConfigError {
    ConfigError::Invalid {
        var,
        value,
        expected,
    }
}

/// The variables, read through a lookup closure.
struct Vars<F>(F);

impl<F: Fn(&str) -> Option<String>> Vars<F> {
    /// The trimmed value of `name`; `None` when unset or empty.
    fn get(&self, name: &str) -> Option<String> {
        (self.0)(name)
            .map(|value| value.trim().to_owned())
            .filter(|value| !value.is_empty())
    }

    /// The value of `name` parsed by `parse`, which returns `None` for a bad value.
    fn parse<T>(
        &self,
        name: &'static str,
        expected: &'static str,
        parse: impl FnOnce(&str) -> Option<T>,
    ) -> Result<Option<T>, ConfigError> {
        match self.get(name) {
            None => Ok(None),
            Some(raw) => match parse(&raw) {
                Some(value) => Ok(Some(value)),
                None => Err(invalid(name, raw, expected)),
            },
        }
    }

    fn flag(&self, name: &'static str) -> Result<Option<bool>, ConfigError> {
        self.parse(name, expect::BOOL, parse_bool)
    }

    fn seconds(&self, name: &'static str) -> Result<Option<Duration>, ConfigError> {
        self.parse(name, expect::SECONDS, parse_seconds)
    }
}

fn generate_client_id(source_name: &str) -> String {
    format!("{source_name}-{:08x}", rand::random::<u32>())
}

fn parse_name(raw: &str) -> Option<String> {
    name_ok(raw).then(|| raw.to_owned())
}

/// Client ids and service names become topic levels (`system/keepalive/<client id>`,
/// `system/health/<service>`), so they may not contain topic separators or wildcards.
fn name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_MQTT_STRING
        && !name
            .chars()
            .any(|c| matches!(c, '/' | '+' | '#') || c.is_control())
}

fn parse_bool(raw: &str) -> Option<bool> {
    match raw.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" => Some(false),
        _ => None,
    }
}

fn parse_keep_alive(raw: &str) -> Option<Duration> {
    let secs: u64 = raw.parse().ok()?;
    Some(Duration::from_secs(secs)).filter(|d| keep_alive_ok(*d))
}

/// MQTT carries the keep-alive as a `u16` of seconds, and rumqttc panics below one
/// second and truncates (`as u16`) above 65535.
fn keep_alive_ok(keep_alive: Duration) -> bool {
    keep_alive.subsec_nanos() == 0 && (1..=u64::from(u16::MAX)).contains(&keep_alive.as_secs())
}

fn parse_seconds(raw: &str) -> Option<Duration> {
    let secs: f64 = raw.parse().ok()?;
    // Rejects negative, NaN, infinite and overflowing values.
    Duration::try_from_secs_f64(secs)
        .ok()
        .filter(|d| seconds_ok(*d))
}

/// `MQTT_DEDUPE_TTL=0` is the fleet's way to turn dedup off.
fn parse_dedupe_ttl(raw: &str) -> Option<Duration> {
    if raw.parse::<f64>().ok() == Some(0.0) {
        return Some(Duration::ZERO);
    }
    parse_seconds(raw)
}

fn seconds_ok(duration: Duration) -> bool {
    !duration.is_zero() && duration <= MAX_SECONDS
}

/// A duration written as the seconds variables are (`0.5`, `30`).
fn seconds(duration: Duration) -> String {
    duration.as_secs_f64().to_string()
}

fn parse_positive(raw: &str) -> Option<u64> {
    raw.parse().ok().filter(|n| *n > 0)
}

fn parse_usize(raw: &str) -> Option<usize> {
    raw.parse().ok()
}

fn packet_size_ok(bytes: usize) -> bool {
    (MIN_PACKET_SIZE..=MAX_MQTT_PACKET).contains(&bytes)
}

fn channel_capacity_ok(capacity: usize) -> bool {
    (1..=MAX_REQUEST_CHANNEL_CAPACITY).contains(&capacity)
}

fn host_ok(host: &str) -> bool {
    host.parse::<Ipv6Addr>().is_ok()
        || (!host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')))
}

/// Parses `MQTT_URL`: `scheme://[user[:password]@]host[:port][/]`.
fn parse_url(raw: &str) -> Result<(BrokerAddr, Option<Credentials>), ConfigError> {
    let error = |expected| invalid(var::URL, redact_url(raw), expected);

    let Some((scheme, rest)) = raw.split_once("://") else {
        return Err(error(expect::URL));
    };
    let (tls, default_port) = match scheme.to_ascii_lowercase().as_str() {
        "mqtt" | "tcp" => (None, MQTT_PORT),
        "mqtts" | "ssl" | "tls" => (Some(Tls::default()), MQTTS_PORT),
        _ => return Err(error(expect::SCHEME)),
    };

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
    if !tail.is_empty() && tail != "/" {
        return Err(error(expect::PATH));
    }

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
    };
    Ok((broker, credentials))
}

/// `raw` with everything between the user name's ':' and the last '@' replaced by `***`.
///
/// Works on text that failed to parse too: it relies only on the last '@', so a
/// password holding '/', '?', '#' or '@' is still hidden.
fn redact_url(raw: &str) -> String {
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

/// The rustls client configuration of a TLS connection: system roots plus the CA file.
fn tls_client_config(broker: &BrokerAddr, tls: &Tls) -> Result<ClientConfig, ConfigError> {
    let mut roots = RootCertStore::empty();

    let native = rustls_native_certs::load_native_certs();
    for error in &native.errors {
        tracing::warn!(%error, "a system root certificate could not be loaded");
    }
    let (_added, ignored) = roots.add_parsable_certificates(native.certs);
    if ignored > 0 {
        tracing::debug!(
            ignored,
            "system root certificates rustls cannot use were skipped"
        );
    }

    if let Some(path) = &tls.ca_file {
        add_ca_file(&mut roots, path)?;
    }
    if roots.is_empty() {
        return Err(ConfigError::NoTrustAnchors {
            var: var::CA_FILE,
            broker: broker.to_string(),
        });
    }

    // rumqttc's default features turn on rustls' aws-lc-rs provider and this crate turns
    // on ring; with both compiled in, `ClientConfig::builder()` cannot choose and panics,
    // so the provider is named explicitly.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| ConfigError::Tls {
            var: var::URL,
            value: broker.to_string(),
            reason: error.to_string(),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

fn add_ca_file(roots: &mut RootCertStore, path: &Path) -> Result<(), ConfigError> {
    let file_invalid = |reason: String| ConfigError::CaFileInvalid {
        var: var::CA_FILE,
        path: path.to_owned(),
        reason,
    };
    let pem = std::fs::read(path).map_err(|source| ConfigError::CaFileUnreadable {
        var: var::CA_FILE,
        path: path.to_owned(),
        source,
    })?;
    let mut count = 0_usize;
    for certificate in rustls_pemfile::certs(&mut pem.as_slice()) {
        let certificate =
            certificate.map_err(|error| file_invalid(format!("malformed PEM: {error}")))?;
        roots.add(certificate).map_err(|error| {
            file_invalid(format!(
                "certificate {} is not a usable CA certificate: {error}",
                count + 1
            ))
        })?;
        count += 1;
    }
    if count == 0 {
        return Err(file_invalid(
            "no '-----BEGIN CERTIFICATE-----' block found".to_owned(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A CA certificate valid from 2020 to 2120, made for these tests.
    const TEST_CA_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBbjCCARSgAwIBAgICEAAwCgYIKoZIzj0EAwIwHTEbMBkGA1UEAwwSdG93ZXIt
bXF0dCB0ZXN0IENBMCAXDTIwMDEwMTAwMDAwMFoYDzIxMjAwMTAxMDAwMDAwWjAd
MRswGQYDVQQDDBJ0b3dlci1tcXR0IHRlc3QgQ0EwWTATBgcqhkjOPQIBBggqhkjO
PQMBBwNCAAQ7VKjU0bdipa2RIXngLe1cPE+oud0J9KTaOkPBwWaqxfazEfhY6fun
TmuMt+3xIHBUohFzSk+aTFT0Wgr8F/ZPo0IwQDAPBgNVHRMBAf8EBTADAQH/MA4G
A1UdDwEB/wQEAwIBBjAdBgNVHQ4EFgQUaSiIsxIYq7VB7883nlZ2RsspF4swCgYI
KoZIzj0EAwIDSAAwRQIhAN8qCpT4gcuyY6y1ZLzXi4e5LGDwpM3y47HAhMEj8/sm
AiAQDJ/W8tJlAqC5r2ArBvpigD57XdhF1W59YSzT8+iF7g==
-----END CERTIFICATE-----
";

    /// A server certificate for 127.0.0.1 and localhost, signed by `TEST_CA_PEM`.
    const TEST_SERVER_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBszCCAVmgAwIBAgICEAEwCgYIKoZIzj0EAwIwHTEbMBkGA1UEAwwSdG93ZXIt
bXF0dCB0ZXN0IENBMCAXDTIwMDEwMTAwMDAwMFoYDzIxMjAwMTAxMDAwMDAwWjAU
MRIwEAYDVQQDDAlsb2NhbGhvc3QwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAAQn
bjyI44qyNNwgVnR4kgLCkQXgno+aqks9u1Y+c9BgpjniPzSfCbxCdYPgoikijKG+
kw0UTi18C90r92kxraKto4GPMIGMMBoGA1UdEQQTMBGHBH8AAAGCCWxvY2FsaG9z
dDAJBgNVHRMEAjAAMA4GA1UdDwEB/wQEAwIHgDATBgNVHSUEDDAKBggrBgEFBQcD
ATAfBgNVHSMEGDAWgBRpKIizEhirtUHvzzeeVnZGyykXizAdBgNVHQ4EFgQUNESU
RK1GOBLNzxBZMMaggcx8Xz8wCgYIKoZIzj0EAwIDSAAwRQIgAqku7QvkkRVeCET2
+hxNYg2uXHo11mvzZjd/3b+lGjICIQDA6ycEJ/5RlQQ1Qy1AnTR0XiilT1337Xn3
WfzSUAyBLA==
-----END CERTIFICATE-----
";

    /// The private key of `TEST_SERVER_PEM` (a throwaway test key).
    const TEST_SERVER_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgzstjpfxsmrgEwLIK
QFds2pxi4CDH/sNi+jhZV4TTlkWhRANCAAQnbjyI44qyNNwgVnR4kgLCkQXgno+a
qks9u1Y+c9BgpjniPzSfCbxCdYPgoikijKG+kw0UTi18C90r92kxraKt
-----END PRIVATE KEY-----
";

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| map.get(name).cloned()
    }

    fn with_url(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut all = vec![("MQTT_URL", "mqtt://broker:1883")];
        all.extend_from_slice(vars);
        Config::from_lookup(env(&all))
    }

    #[test]
    fn code_defaults_then_the_environment_on_top() {
        let base = Config::new("mqtt://code-default:1883")
            .unwrap()
            .with_source_name("memory-worker")
            .with_health_name("memory")
            .with_health(true);
        let config = base
            .clone()
            .with_lookup(env(&[
                ("MQTT_ENABLE_HEALTH", "false"),
                ("MQTT_DEDUPE_TTL", "0"),
            ]))
            .unwrap();
        assert_eq!(
            config.broker.host, "code-default",
            "unset variables keep the code's"
        );
        assert_eq!(config.source_name, "memory-worker");
        assert_eq!(config.health_name(), "memory");
        assert!(!config.enable_health, "the environment wins");
        assert!(!config.dedup_enabled());
        let config = base
            .with_lookup(env(&[
                ("MQTT_URL", "mqtt://deployed:1884"),
                ("MQTT_HEALTH_NAME", "memory-b"),
                ("MQTT_QUEUE_SIZE", "32"),
                ("MQTT_QUEUE_OVERFLOW", "drop_oldest"),
                ("MQTT_HANDLER_TIMEOUT", "120"),
            ]))
            .unwrap();
        assert_eq!(
            (config.broker.host.as_str(), config.broker.port),
            ("deployed", 1884)
        );
        assert_eq!(config.health_name(), "memory-b");
        assert_eq!(config.queue_capacity, 32);
        assert_eq!(config.queue_overflow, Overflow::DropOldest);
        assert_eq!(config.handler_timeout, Duration::from_secs(120));
        for (var, raw) in [
            ("MQTT_QUEUE_SIZE", "0"),
            ("MQTT_QUEUE_OVERFLOW", "spill"),
            ("MQTT_HANDLER_TIMEOUT", "0"),
            ("MQTT_HEALTH_NAME", "a/b"),
            ("MQTT_DEDUPE_TTL", "-1"),
            ("MQTT_URL", "http://x"),
        ] {
            let error = Config::new("mqtt://h")
                .unwrap()
                .with_lookup(env(&[(var, raw)]))
                .unwrap_err();
            assert_eq!(error.var(), var, "{var}={raw}");
        }
    }

    #[test]
    fn pending_limits_ack_order_and_incoming_size_come_from_the_environment() {
        let config = with_url(&[]).unwrap();
        assert_eq!(config.max_pending, 4096);
        assert_eq!(config.max_pending_bytes, 64 * 1024 * 1024);
        assert_eq!(config.ack_order, AckOrder::Topic);
        assert_eq!(config.max_incoming_packet_size, MAX_MQTT_PACKET);
        let config = with_url(&[
            ("MQTT_MAX_PENDING", "100"),
            ("MQTT_MAX_PENDING_BYTES", "65536"),
            ("MQTT_ACK_ORDER", "Global"),
            ("MQTT_MAX_INCOMING_PACKET_SIZE", "2097152"),
        ])
        .unwrap();
        assert_eq!(config.max_pending, 100);
        assert_eq!(config.max_pending_bytes, 65536);
        assert_eq!(config.ack_order, AckOrder::Global);
        assert_eq!(config.max_incoming_packet_size, 2_097_152);
        for (var, raw) in [
            ("MQTT_MAX_PENDING", "0"),
            ("MQTT_MAX_PENDING", "many"),
            ("MQTT_MAX_PENDING_BYTES", "-1"),
            ("MQTT_ACK_ORDER", "fifo"),
            ("MQTT_MAX_INCOMING_PACKET_SIZE", "10"),
        ] {
            let error = with_url(&[(var, raw)]).unwrap_err();
            assert_eq!(error.var(), var, "{var}={raw}");
        }
    }

    fn url_error(url: &str) -> ConfigError {
        Config::new(url).expect_err(url)
    }

    fn expected_of(error: &ConfigError) -> &'static str {
        match error {
            ConfigError::Invalid { expected, .. } => expected,
            other => panic!("not an Invalid error: {other:?}"),
        }
    }

    fn assert_generated_id(id: &str, source: &str) {
        let suffix = id
            .strip_prefix(source)
            .and_then(|rest| rest.strip_prefix('-'))
            .unwrap_or_else(|| panic!("{id:?} does not start with {source:?}-"));
        assert_eq!(suffix.len(), 8, "{id}");
        assert!(
            suffix.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f')),
            "{id}"
        );
    }

    #[test]
    fn defaults() {
        let config = with_url(&[]).unwrap();
        assert_eq!(config.broker.host, "broker");
        assert_eq!(config.broker.port, 1883);
        assert_eq!(config.broker.tls, None);
        assert!(config.credentials.is_none());
        assert_eq!(config.source_name, "tower-mqtt");
        assert_generated_id(&config.client_id, "tower-mqtt");
        assert_eq!(config.keep_alive, Duration::from_secs(60));
        assert!(!config.enable_health);
        assert!(!config.enable_heartbeat);
        assert_eq!(config.heartbeat_interval, Duration::from_secs(5));
        assert_eq!(config.dedupe_ttl, Duration::from_secs(30));
        assert_eq!(config.dedupe_max_entries, 2048);
        assert_eq!(config.reconnect_min_delay, Duration::from_millis(500));
        assert_eq!(config.reconnect_max_delay, Duration::from_secs(5));
        assert!(config.clean_session);
        assert_eq!(config.max_packet_size, 1_048_576);
        assert_eq!(config.request_channel_capacity, 1024);
    }

    #[test]
    fn new_has_the_same_defaults_as_the_environment() {
        let a = Config::new("mqtt://broker:1883").unwrap();
        let b = with_url(&[]).unwrap();
        // Everything but the random client id matches.
        let a = a.with_client_id("x");
        let b = b.with_client_id("x");
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
    }

    #[test]
    fn every_variable_is_read() {
        let config = Config::from_lookup(env(&[
            ("MQTT_URL", "mqtts://svc:pw@broker.example:9999"),
            ("MQTT_CA_FILE", "/etc/ca.pem"),
            ("MQTT_CLIENT_ID", "stt-7"),
            ("MQTT_SOURCE_NAME", "stt"),
            ("MQTT_KEEPALIVE", "15"),
            ("MQTT_ENABLE_HEALTH", "true"),
            ("MQTT_ENABLE_HEARTBEAT", "1"),
            ("MQTT_HEARTBEAT_INTERVAL", "2.5"),
            ("MQTT_DEDUPE_TTL", "60"),
            ("MQTT_DEDUPE_MAX_ENTRIES", "10"),
            ("MQTT_RECONNECT_MIN_DELAY", "0.25"),
            ("MQTT_RECONNECT_MAX_DELAY", "30"),
            ("MQTT_CLEAN_SESSION", "false"),
            ("MQTT_MAX_PACKET_SIZE", "4096"),
            ("MQTT_REQUEST_CHANNEL_CAPACITY", "16"),
        ]))
        .unwrap();
        assert_eq!(config.broker.host, "broker.example");
        assert_eq!(config.broker.port, 9999);
        assert_eq!(
            config.broker.tls,
            Some(Tls::new(Some(PathBuf::from("/etc/ca.pem"))))
        );
        let credentials = config.credentials.as_ref().unwrap();
        assert_eq!(credentials.username, "svc");
        assert_eq!(credentials.password.as_ref().unwrap().expose(), "pw");
        assert_eq!(config.client_id, "stt-7");
        assert_eq!(config.source_name, "stt");
        assert_eq!(config.keep_alive, Duration::from_secs(15));
        assert!(config.enable_health);
        assert!(config.enable_heartbeat);
        assert_eq!(config.heartbeat_interval, Duration::from_millis(2500));
        assert_eq!(config.dedupe_ttl, Duration::from_secs(60));
        assert_eq!(config.dedupe_max_entries, 10);
        assert_eq!(config.reconnect_min_delay, Duration::from_millis(250));
        assert_eq!(config.reconnect_max_delay, Duration::from_secs(30));
        assert!(!config.clean_session);
        assert_eq!(config.max_packet_size, 4096);
        assert_eq!(config.request_channel_capacity, 16);
    }

    #[test]
    fn values_are_trimmed_and_empty_means_unset() {
        let config = Config::from_lookup(env(&[
            ("MQTT_URL", "  mqtt://broker:1883\n"),
            ("MQTT_KEEPALIVE", " 20 "),
            ("MQTT_SOURCE_NAME", ""),
            ("MQTT_ENABLE_HEALTH", "   "),
        ]))
        .unwrap();
        assert_eq!(config.broker.host, "broker");
        assert_eq!(config.keep_alive, Duration::from_secs(20));
        assert_eq!(config.source_name, "tower-mqtt");
        assert!(!config.enable_health);
    }

    #[test]
    fn missing_url_is_detectable() {
        for vars in [&[][..], &[("MQTT_URL", "")][..], &[("MQTT_URL", " ")][..]] {
            let error = Config::from_lookup(env(vars)).unwrap_err();
            assert!(error.is_missing_url(), "{error:?}");
            assert_eq!(error.var(), "MQTT_URL");
            assert!(
                error
                    .to_string()
                    .starts_with("MQTT_URL is not set: expected"),
                "{error}"
            );
        }
        assert!(!url_error("bogus").is_missing_url());
    }

    #[test]
    fn source_name_drives_the_generated_client_id() {
        let config = with_url(&[("MQTT_SOURCE_NAME", "llm-worker")]).unwrap();
        assert_generated_id(&config.client_id, "llm-worker");

        let config = Config::new("mqtt://h").unwrap().with_source_name("tts");
        assert_generated_id(&config.client_id, "tts");

        let config = Config::new("mqtt://h")
            .unwrap()
            .with_client_id("fixed")
            .with_source_name("tts");
        assert_eq!(config.client_id, "fixed");

        let config = with_url(&[("MQTT_SOURCE_NAME", "tts"), ("MQTT_CLIENT_ID", "mine")]).unwrap();
        assert_eq!(config.client_id, "mine");
    }

    #[test]
    fn generated_client_ids_differ_between_instances() {
        let a = with_url(&[]).unwrap().client_id;
        let b = with_url(&[]).unwrap().client_id;
        let c = with_url(&[]).unwrap().client_id;
        // Three 32-bit random suffixes colliding is a 1-in-2^31 event.
        assert!(a != b || b != c, "{a} {b} {c}");
    }

    #[test]
    fn bools_accept_common_spellings() {
        for (raw, value) in [
            ("true", true),
            ("TRUE", true),
            ("1", true),
            ("yes", true),
            ("On", true),
            ("false", false),
            ("0", false),
            ("No", false),
            ("off", false),
        ] {
            let config = with_url(&[
                ("MQTT_ENABLE_HEALTH", raw),
                ("MQTT_ENABLE_HEARTBEAT", raw),
                ("MQTT_CLEAN_SESSION", raw),
            ])
            .unwrap();
            assert_eq!(config.enable_health, value, "{raw}");
            assert_eq!(config.enable_heartbeat, value, "{raw}");
            assert_eq!(config.clean_session, value, "{raw}");
        }
        for name in [
            "MQTT_ENABLE_HEALTH",
            "MQTT_ENABLE_HEARTBEAT",
            "MQTT_CLEAN_SESSION",
        ] {
            let error = with_url(&[(name, "maybe")]).unwrap_err();
            assert_eq!(
                error.to_string(),
                format!(
                    "{name}=\"maybe\" is invalid: expected a boolean: true, false, 1, 0, yes, \
                     no, on or off"
                )
            );
        }
    }

    #[test]
    fn keep_alive_errors() {
        let error = with_url(&[("MQTT_KEEPALIVE", "abc")]).unwrap_err();
        assert_eq!(
            error.to_string(),
            "MQTT_KEEPALIVE=\"abc\" is invalid: expected an integer number of seconds between \
             1 and 65535"
        );
        assert_eq!(error.var(), "MQTT_KEEPALIVE");
        for raw in ["0", "65536", "1.5", "-1", "99999999999999999999999"] {
            let error = with_url(&[("MQTT_KEEPALIVE", raw)]).unwrap_err();
            assert!(
                matches!(&error, ConfigError::Invalid { var: "MQTT_KEEPALIVE", value, .. } if value == raw),
                "{raw}: {error:?}"
            );
        }
        for (raw, secs) in [("1", 1), ("65535", 65535)] {
            let config = with_url(&[("MQTT_KEEPALIVE", raw)]).unwrap();
            assert_eq!(config.keep_alive, Duration::from_secs(secs));
        }
    }

    #[test]
    fn seconds_variables_accept_decimals_and_reject_nonsense() {
        // MQTT_DEDUPE_TTL also takes 0 (dedup off); see
        // `code_defaults_then_the_environment_on_top`.
        for name in [
            "MQTT_HEARTBEAT_INTERVAL",
            "MQTT_HANDLER_TIMEOUT",
            "MQTT_RECONNECT_MIN_DELAY",
            "MQTT_RECONNECT_MAX_DELAY",
        ] {
            for raw in [
                "0", "-1", "abc", "nan", "inf", "-inf", "1e-12", "86400.5", "1e300", "",
            ] {
                let result = with_url(&[
                    (name, raw),
                    // Keep min <= max whichever of the two is under test.
                    ("MQTT_RECONNECT_MIN_DELAY", "0.001"),
                    ("MQTT_RECONNECT_MAX_DELAY", "86400"),
                    (name, raw),
                ]);
                if raw.is_empty() {
                    assert!(result.is_ok(), "{name}={raw:?}");
                    continue;
                }
                let error = result.unwrap_err();
                assert_eq!(
                    error.to_string(),
                    format!(
                        "{name}={raw:?} is invalid: expected a number of seconds greater than 0 \
                         and at most 86400, such as 5 or 0.5"
                    )
                );
            }
        }
        let config = with_url(&[("MQTT_HEARTBEAT_INTERVAL", "86400")]).unwrap();
        assert_eq!(config.heartbeat_interval, Duration::from_secs(86_400));
        let config = with_url(&[("MQTT_DEDUPE_TTL", "0.001")]).unwrap();
        assert_eq!(config.dedupe_ttl, Duration::from_millis(1));
    }

    #[test]
    fn env_helper_last_value_wins() {
        // The seconds test above relies on a later pair overriding an earlier one.
        let lookup = env(&[("A", "1"), ("A", "2")]);
        assert_eq!(lookup("A").as_deref(), Some("2"));
    }

    #[test]
    fn dedupe_max_entries_must_be_positive() {
        for raw in ["0", "-5", "many", "1.5"] {
            let error = with_url(&[("MQTT_DEDUPE_MAX_ENTRIES", raw)]).unwrap_err();
            assert_eq!(
                error.to_string(),
                format!("MQTT_DEDUPE_MAX_ENTRIES={raw:?} is invalid: expected a positive integer")
            );
        }
        let config = with_url(&[("MQTT_DEDUPE_MAX_ENTRIES", "1")]).unwrap();
        assert_eq!(config.dedupe_max_entries, 1);
    }

    #[test]
    fn reconnect_min_above_max_names_both_variables() {
        let error = with_url(&[
            ("MQTT_RECONNECT_MIN_DELAY", "10"),
            ("MQTT_RECONNECT_MAX_DELAY", "5"),
        ])
        .unwrap_err();
        assert_eq!(
            error.to_string(),
            "MQTT_RECONNECT_MIN_DELAY=\"10\" conflicts with MQTT_RECONNECT_MAX_DELAY=\"5\": \
             expected MQTT_RECONNECT_MIN_DELAY to be at most MQTT_RECONNECT_MAX_DELAY"
        );
        // A minimum above the default maximum needs the maximum raised too.
        assert!(with_url(&[("MQTT_RECONNECT_MIN_DELAY", "6")]).is_err());
        let config = with_url(&[
            ("MQTT_RECONNECT_MIN_DELAY", "2"),
            ("MQTT_RECONNECT_MAX_DELAY", "2"),
        ])
        .unwrap();
        assert_eq!(config.reconnect_min_delay, config.reconnect_max_delay);

        let error = Config::new("mqtt://h")
            .unwrap()
            .with_reconnect_delays(Duration::from_secs(3), Duration::from_secs(1))
            .validate()
            .unwrap_err();
        assert!(matches!(error, ConfigError::Conflict { .. }), "{error:?}");
    }

    #[test]
    fn packet_size_and_channel_capacity_bounds() {
        for raw in ["0", "1023", "268435456", "big", "-1"] {
            let error = with_url(&[("MQTT_MAX_PACKET_SIZE", raw)]).unwrap_err();
            assert_eq!(error.var(), "MQTT_MAX_PACKET_SIZE", "{raw}");
        }
        for (raw, size) in [("1024", 1024), ("268435455", 268_435_455)] {
            let config = with_url(&[("MQTT_MAX_PACKET_SIZE", raw)]).unwrap();
            assert_eq!(config.max_packet_size, size);
        }
        for raw in ["0", "1048577", "x"] {
            let error = with_url(&[("MQTT_REQUEST_CHANNEL_CAPACITY", raw)]).unwrap_err();
            assert_eq!(error.var(), "MQTT_REQUEST_CHANNEL_CAPACITY", "{raw}");
        }
        let config = with_url(&[("MQTT_REQUEST_CHANNEL_CAPACITY", "1")]).unwrap();
        assert_eq!(config.request_channel_capacity, 1);
    }

    #[test]
    fn client_id_and_source_name_must_be_usable_topic_levels() {
        for name in ["MQTT_CLIENT_ID", "MQTT_SOURCE_NAME"] {
            for raw in ["a/b", "a+", "#", "tab\there", "nul\0"] {
                let error = with_url(&[(name, raw)]).unwrap_err();
                assert_eq!(error.var(), name, "{raw:?}");
            }
            let long = "x".repeat(65_536);
            assert_eq!(with_url(&[(name, long.as_str())]).unwrap_err().var(), name);
        }
        let config = with_url(&[("MQTT_CLIENT_ID", "svc.1_ü-$x")]).unwrap();
        assert_eq!(config.client_id, "svc.1_ü-$x");
        let error = Config::new("mqtt://h")
            .unwrap()
            .with_client_id("")
            .validate()
            .unwrap_err();
        assert_eq!(error.var(), "MQTT_CLIENT_ID");
    }

    #[test]
    fn url_schemes_and_default_ports() {
        for (url, tls, port) in [
            ("mqtt://h", false, 1883),
            ("MQTT://h", false, 1883),
            ("tcp://h", false, 1883),
            ("mqtts://h", true, 8883),
            ("ssl://h", true, 8883),
            ("tls://h", true, 8883),
            ("mqtt://h:1", false, 1),
            ("mqtts://h:65535", true, 65535),
            ("mqtt://h/", false, 1883),
            ("mqtt://h:1884/", false, 1884),
        ] {
            let config = Config::new(url).unwrap();
            assert_eq!(config.broker.host, "h", "{url}");
            assert_eq!(config.broker.port, port, "{url}");
            assert_eq!(config.broker.is_tls(), tls, "{url}");
        }
    }

    #[test]
    fn ipv6_literals() {
        let config = Config::new("mqtt://[::1]:1884").unwrap();
        assert_eq!(config.broker.host, "::1");
        assert_eq!(config.broker.port, 1884);
        assert_eq!(config.broker.to_string(), "mqtt://[::1]:1884");

        let config = Config::new("mqtts://u:p@[fe80::1:2]").unwrap();
        assert_eq!(config.broker.host, "fe80::1:2");
        assert_eq!(config.broker.port, 8883);
        assert_eq!(config.broker.to_string(), "mqtts://[fe80::1:2]:8883");

        // rumqttc formats "{host}:{port}" to connect and builds the TLS server name from
        // the host, so the host must be the bare address.
        let options = Config::new("mqtt://[::1]:1884")
            .unwrap()
            .mqtt_options()
            .unwrap();
        assert_eq!(options.broker_address(), ("::1".to_owned(), 1884));
    }

    #[test]
    fn userinfo_is_percent_decoded() {
        let config = Config::new("mqtt://us%40er:p%2Fa%3Fs%23s%25@h").unwrap();
        let credentials = config.credentials.unwrap();
        assert_eq!(credentials.username, "us@er");
        assert_eq!(credentials.password.unwrap().expose(), "p/a?s#s%");

        let config = Config::new("mqtt://user:p@ss:w0rd@h:1").unwrap();
        let credentials = config.credentials.unwrap();
        assert_eq!(credentials.username, "user");
        assert_eq!(credentials.password.unwrap().expose(), "p@ss:w0rd");
        assert_eq!(config.broker.port, 1);

        let config = Config::new("mqtt://%C3%BCser@h").unwrap();
        let credentials = config.credentials.unwrap();
        assert_eq!(credentials.username, "üser");
        assert!(credentials.password.is_none());

        let config = Config::new("mqtt://user:@h").unwrap();
        assert!(config.credentials.unwrap().password.is_none());
    }

    #[test]
    fn url_errors() {
        for (url, expected) in [
            ("broker:1883", expect::URL),
            ("", expect::URL),
            ("http://h", expect::SCHEME),
            ("ws://h", expect::SCHEME),
            ("mqtt://", expect::HOST),
            ("mqtt://:1883", expect::HOST),
            ("mqtt://user:pw@", expect::HOST),
            ("mqtt://user:pw@:1883", expect::HOST),
            ("mqtt://h:", expect::PORT),
            ("mqtt://h:abc", expect::PORT),
            ("mqtt://h:0", expect::PORT),
            ("mqtt://h:65536", expect::PORT),
            ("mqtt://h:-1", expect::PORT),
            ("mqtt://h:+1", expect::PORT),
            ("mqtt://h/path", expect::PATH),
            ("mqtt://h//", expect::PATH),
            ("mqtt://h?client_id=x", expect::QUERY),
            ("mqtt://h/?x", expect::QUERY),
            ("mqtt://h#x", expect::FRAGMENT),
            ("mqtt://::1", expect::IPV6),
            ("mqtt://::1:1883", expect::IPV6),
            ("mqtt://[::1", expect::IPV6),
            ("mqtt://[127.0.0.1]:1883", expect::IPV6),
            ("mqtt://[::1]1883", expect::IPV6),
            ("mqtt://[::1]:", expect::PORT),
            ("mqtt://h st", expect::HOST_CHARS),
            ("mqtt://h%41", expect::HOST_CHARS),
            ("mqtt://:pw@h", expect::USER),
            ("mqtt://@h", expect::USER),
            ("mqtt://user:pa/ss@h", expect::RESERVED_IN_USERINFO),
            ("mqtt://user:pa?ss@h", expect::RESERVED_IN_USERINFO),
            ("mqtt://user:pa#ss@h", expect::RESERVED_IN_USERINFO),
            ("mqtt://user:%FF@h", expect::USERINFO_UTF8),
        ] {
            let error = url_error(url);
            assert_eq!(error.var(), "MQTT_URL", "{url}");
            assert_eq!(expected_of(&error), expected, "{url}: {error}");
        }
        let long_user = format!("mqtt://{}@h", "u".repeat(65_536));
        assert_eq!(expected_of(&url_error(&long_user)), expect::USERINFO_LEN);
    }

    #[test]
    fn url_error_message_shows_the_redacted_value() {
        let error = url_error("mqtt://svc:hunter2@h:99999");
        assert_eq!(
            error.to_string(),
            "MQTT_URL=\"mqtt://svc:***@h:99999\" is invalid: expected a port number between 1 \
             and 65535 after ':'"
        );
        assert!(!format!("{error:?}").contains("hunter2"));
    }

    #[test]
    fn passwords_never_leak() {
        let secret = "hunter2";
        let config = Config::new("mqtts://svc:hunter2@broker:8883").unwrap();
        for text in [
            format!("{config:?}"),
            format!("{:?}", config.credentials),
            format!("{}", config.broker),
            format!("{:?}", config.broker),
            format!(
                "{}",
                config
                    .credentials
                    .as_ref()
                    .unwrap()
                    .password
                    .as_ref()
                    .unwrap()
            ),
            format!("{:?}", config.credentials.as_ref().unwrap().password),
        ] {
            assert!(!text.contains(secret), "{text}");
        }
        assert!(format!("{config:?}").contains("***"));
        assert_eq!(format!("{}", Password::new("x")), "***");
        assert_eq!(format!("{:?}", Password::new("x")), "***");

        for url in [
            "mqtt://svc:hunter2@h:0",
            "mqtt://svc:hunter2@h/path",
            "mqtt://svc:hunter2@h?q",
            "mqtt://svc:hun/ter2@h",
            "mqtt://svc:hunter2@",
            "bogus://svc:hunter2@h",
            "svc:hunter2@h",
            "svc:x://hunter2@h",
            "mqtt://svc:hunter2@@h st",
            "mqtt://svc:hunter2@[::1",
        ] {
            let error = url_error(url);
            for text in [error.to_string(), format!("{error:?}")] {
                assert!(
                    !text.contains("hunter2") && !text.contains("hun/ter2"),
                    "{text}"
                );
            }
        }
    }

    #[test]
    fn redaction_keeps_the_rest_of_the_url() {
        assert_eq!(redact_url("mqtt://u:p@h:1"), "mqtt://u:***@h:1");
        assert_eq!(redact_url("mqtt://u:p@x@h"), "mqtt://u:***@h");
        assert_eq!(redact_url("mqtt://u@h"), "mqtt://u@h");
        assert_eq!(redact_url("mqtt://h:1"), "mqtt://h:1");
        assert_eq!(redact_url("u:p@h"), "u:***@h");
        assert_eq!(redact_url("u:a://b@h"), "u:***@h");
    }

    #[test]
    fn mqtt_options_carries_every_setting() {
        let config = Config::new("mqtt://svc:pw@broker:1884")
            .unwrap()
            .with_client_id("svc-1")
            .with_keep_alive(Duration::from_secs(7))
            .with_clean_session(false)
            .with_max_packet_size(2048)
            .with_request_channel_capacity(3);
        let options = config.mqtt_options().unwrap();
        assert_eq!(options.client_id(), "svc-1");
        assert_eq!(options.broker_address(), ("broker".to_owned(), 1884));
        assert_eq!(options.keep_alive(), Duration::from_secs(7));
        assert!(!options.clean_session());
        // Reading is limited only by the protocol, so an oversized message
        // cannot wedge the connection; 2048 applies to what is sent.
        assert_eq!(options.max_packet_size(), MAX_MQTT_PACKET);
        assert_eq!(options.request_channel_capacity(), 3);
        let options = config
            .with_max_incoming_packet_size(4096)
            .mqtt_options()
            .unwrap();
        assert_eq!(options.max_packet_size(), 4096);
        let login = options.credentials().unwrap();
        assert_eq!(login.username, "svc");
        assert_eq!(login.password, "pw");
        assert!(matches!(options.transport(), Transport::Tcp));

        let options = Config::new("mqtt://u@h").unwrap().mqtt_options().unwrap();
        let login = options.credentials().unwrap();
        assert_eq!(
            (login.username.as_str(), login.password.as_str()),
            ("u", "")
        );
        assert!(Config::new("mqtt://h")
            .unwrap()
            .mqtt_options()
            .unwrap()
            .credentials()
            .is_none());
    }

    #[test]
    fn mqtt_options_rejects_what_would_make_rumqttc_panic() {
        let base = || Config::new("mqtt://h").unwrap();
        for keep_alive in [
            Duration::ZERO,
            Duration::from_millis(500),
            Duration::from_millis(1500),
            Duration::from_secs(65_536),
        ] {
            let error = base()
                .with_keep_alive(keep_alive)
                .mqtt_options()
                .unwrap_err();
            assert_eq!(error.var(), "MQTT_KEEPALIVE", "{keep_alive:?}");
        }
        let error = base()
            .with_keep_alive(Duration::from_millis(500))
            .mqtt_options()
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "MQTT_KEEPALIVE=\"0.5\" is invalid: expected an integer number of seconds between \
             1 and 65535"
        );
        let error = base()
            .with_client_id("")
            .with_clean_session(false)
            .mqtt_options()
            .unwrap_err();
        assert_eq!(error.var(), "MQTT_CLIENT_ID");

        let mut config = base();
        config.broker.port = 0;
        assert_eq!(config.mqtt_options().unwrap_err().var(), "MQTT_URL");
        let mut config = base();
        config.broker.host = "bad host".to_owned();
        assert_eq!(config.mqtt_options().unwrap_err().var(), "MQTT_URL");
        let config = base().with_credentials(Credentials::new("", None));
        assert_eq!(config.mqtt_options().unwrap_err().var(), "MQTT_URL");
        let error = base()
            .with_heartbeat_interval(Duration::ZERO)
            .validate()
            .unwrap_err();
        assert_eq!(error.var(), "MQTT_HEARTBEAT_INTERVAL");
        let error = base()
            .with_dedupe(Duration::from_secs(1), 0)
            .validate()
            .unwrap_err();
        assert_eq!(error.var(), "MQTT_DEDUPE_MAX_ENTRIES");
        let error = base().with_max_packet_size(10).validate().unwrap_err();
        assert_eq!(error.var(), "MQTT_MAX_PACKET_SIZE");
        let error = base()
            .with_request_channel_capacity(0)
            .validate()
            .unwrap_err();
        assert_eq!(error.var(), "MQTT_REQUEST_CHANNEL_CAPACITY");
    }

    #[test]
    fn ca_file_is_only_used_with_tls() {
        let config = with_url(&[("MQTT_CA_FILE", "/nonexistent/ca.pem")]).unwrap();
        assert_eq!(config.broker.tls, None);
        assert!(config.mqtt_options().is_ok());
    }

    fn tls_config(options: &MqttOptions) -> Arc<ClientConfig> {
        match options.transport() {
            Transport::Tls(TlsConfiguration::Rustls(config)) => config,
            _ => panic!("not a rustls transport"),
        }
    }

    #[test]
    fn tls_with_system_roots() {
        let config = Config::new("mqtts://broker.example").unwrap();
        let system_roots = !rustls_native_certs::load_native_certs().certs.is_empty();
        match config.mqtt_options() {
            Ok(options) => {
                assert!(system_roots, "TLS options built without any trusted root");
                tls_config(&options);
            }
            Err(error) => {
                assert!(!system_roots, "{error}");
                assert!(
                    matches!(error, ConfigError::NoTrustAnchors { .. }),
                    "{error:?}"
                );
                assert_eq!(error.var(), "MQTT_CA_FILE");
            }
        }
    }

    #[test]
    fn tls_ca_file_errors() {
        let dir = tempfile::tempdir().unwrap();
        let config_with = |path: &Path| {
            let mut config = Config::new("mqtts://broker.example").unwrap();
            config.broker.tls = Some(Tls::new(Some(path.to_owned())));
            config
        };

        let missing = dir.path().join("missing.pem");
        let error = config_with(&missing).mqtt_options().unwrap_err();
        assert!(
            matches!(&error, ConfigError::CaFileUnreadable { source, .. } if source.kind() == io::ErrorKind::NotFound),
            "{error:?}"
        );
        assert!(
            error
                .to_string()
                .starts_with(&format!("MQTT_CA_FILE={missing:?} cannot be read (")),
            "{error}"
        );

        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no certificates here\n").unwrap();
        let error = config_with(&empty).mqtt_options().unwrap_err();
        assert!(
            matches!(error, ConfigError::CaFileInvalid { .. }),
            "{error:?}"
        );
        assert!(
            error
                .to_string()
                .contains("no '-----BEGIN CERTIFICATE-----'"),
            "{error}"
        );

        let garbage = dir.path().join("garbage.pem");
        std::fs::write(
            &garbage,
            "-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let error = config_with(&garbage).mqtt_options().unwrap_err();
        assert!(
            matches!(error, ConfigError::CaFileInvalid { .. }),
            "{error:?}"
        );

        let good = dir.path().join("ca.pem");
        std::fs::write(&good, TEST_CA_PEM).unwrap();
        tls_config(&config_with(&good).mqtt_options().unwrap());
    }

    /// Runs a TLS handshake between a local server with `TEST_SERVER_PEM` and the client
    /// configuration `mqtt_options` builds.
    async fn handshake(ca_file: Option<PathBuf>) -> io::Result<()> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio_rustls::rustls::pki_types::ServerName;

        let certs = rustls_pemfile::certs(&mut TEST_SERVER_PEM.as_bytes())
            .collect::<Result<Vec<_>, _>>()?;
        let key = rustls_pemfile::private_key(&mut TEST_SERVER_KEY.as_bytes())?.unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server_config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await?;
            let mut tls = acceptor.accept(stream).await?;
            tls.write_all(b"ok").await?;
            tls.shutdown().await
        });

        let mut config = Config::new(&format!("mqtts://127.0.0.1:{port}")).unwrap();
        config.broker.tls = Some(Tls::new(ca_file));
        let options = config
            .mqtt_options()
            .map_err(|error| io::Error::other(error.to_string()))?;
        let connector = tokio_rustls::TlsConnector::from(tls_config(&options));
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let mut tls = connector.connect(name, stream).await?;
        let mut reply = Vec::new();
        tls.read_to_end(&mut reply).await?;
        assert_eq!(reply, b"ok");
        server.await.unwrap()
    }

    #[tokio::test]
    async fn tls_trusts_the_ca_file() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, TEST_CA_PEM).unwrap();
        handshake(Some(ca)).await.unwrap();
    }

    #[tokio::test]
    async fn tls_without_the_ca_file_rejects_the_private_ca() {
        // Only meaningful where the system store has roots (else mqtt_options fails).
        if rustls_native_certs::load_native_certs().certs.is_empty() {
            let error = handshake(None).await.unwrap_err();
            assert!(error.to_string().contains("MQTT_CA_FILE"), "{error}");
            return;
        }
        let error = handshake(None).await.unwrap_err();
        assert!(
            error.to_string().to_lowercase().contains("certificate"),
            "unexpected error: {error}"
        );
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        fn all_text(error: &ConfigError) -> String {
            format!("{error} {error:?}")
        }

        proptest! {
            #[test]
            fn arbitrary_urls_never_panic(raw in any::<String>()) {
                let _ = Config::new(&raw).map(|config| config.mqtt_options());
            }

            #[test]
            fn url_like_strings_never_panic(
                scheme in "(mqtt|mqtts|tcp|ssl|tls|http|)",
                rest in "[a-z0-9:@/?#%\\[\\]. +-]{0,40}",
            ) {
                let raw = format!("{scheme}://{rest}");
                if let Ok(config) = Config::new(&raw) {
                    prop_assert!(config.validate().is_ok(), "{raw} parsed but is invalid");
                    // TLS options read the system store; plain ones are cheap to build.
                    if !config.broker.is_tls() {
                        prop_assert!(config.mqtt_options().is_ok(), "{raw}");
                    }
                }
            }

            #[test]
            fn passwords_never_appear_in_errors_or_debug(
                scheme in "(mqtt|mqtts|bogus|)(://|:/|)",
                user in "[a-z%:/@]{0,6}",
                secret in "[A-Za-z0-9!$&'()*+,;=@/?#%\\[\\]]{0,10}",
                host in "[a-z0-9.:\\[\\]/?# -]{0,12}",
            ) {
                // A marker the host and user patterns cannot produce.
                let password = format!("Pw{secret}Zq");
                let raw = format!("{scheme}{user}:{password}@{host}");
                let decoded = percent_decode_str(&password).decode_utf8_lossy().into_owned();
                let text = match Config::new(&raw) {
                    Ok(config) => format!("{config:?} {}", config.broker),
                    Err(error) => all_text(&error),
                };
                prop_assert!(!text.contains(&password), "{raw} leaked in {text}");
                prop_assert!(!text.contains(&decoded), "{raw} leaked in {text}");
            }

            #[test]
            fn arbitrary_environment_values_never_panic(
                values in proptest::collection::vec(any::<String>(), 15),
            ) {
                let names = [
                    "MQTT_URL", "MQTT_CA_FILE", "MQTT_CLIENT_ID", "MQTT_SOURCE_NAME",
                    "MQTT_KEEPALIVE", "MQTT_ENABLE_HEALTH", "MQTT_ENABLE_HEARTBEAT",
                    "MQTT_HEARTBEAT_INTERVAL", "MQTT_DEDUPE_TTL", "MQTT_DEDUPE_MAX_ENTRIES",
                    "MQTT_RECONNECT_MIN_DELAY", "MQTT_RECONNECT_MAX_DELAY",
                    "MQTT_CLEAN_SESSION", "MQTT_MAX_PACKET_SIZE",
                    "MQTT_REQUEST_CHANNEL_CAPACITY",
                ];
                // A fixed URL so that every other variable is reached; URLs have their
                // own properties above.
                let lookup = |name: &str| match names.iter().position(|n| *n == name)? {
                    0 => Some("mqtt://h".to_owned()),
                    index => Some(values[index].clone()),
                };
                if let Ok(config) = Config::from_lookup(lookup) {
                    prop_assert!(config.validate().is_ok());
                }
            }
        }
    }
}
