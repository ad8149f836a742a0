//! Reading `MQTT_*` variables onto a configuration.

use super::{
    credentials::apply_credentials, expect, invalid, parse_url, tls::apply_tls, var, Config,
    ConfigError, Duration, OfflineOverflow, MAX_MQTT_PACKET, MAX_MQTT_STRING,
    MAX_REQUEST_CHANNEL_CAPACITY, MAX_SECONDS, MIN_PACKET_SIZE,
};

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
    /// [module docs](crate::config)). The result has been [validated](Config::validate).
    pub fn from_lookup<F: Fn(&str) -> Option<String>>(lookup: F) -> Result<Config, ConfigError> {
        let vars = Vars(lookup);
        let url = vars.get(var::URL).ok_or(ConfigError::Missing {
            var: var::URL,
            expected: expect::URL,
        })?;
        Self::apply(Config::new(&url)?, &vars, Some(&url))
    }

    /// The service's defaults in code, the deployment's in the environment,
    /// with `MQTT_URL` required: `defaults` is applied to a configuration for
    /// the broker `MQTT_URL` names, and every `MQTT_*` variable that is set
    /// goes on top. Unset, `MQTT_URL` is the error [`from_env`](Self::from_env)
    /// gives; a service that may fall back to a local broker uses
    /// `Config::new(default_url)?…with_env()` instead.
    ///
    /// ```no_run
    /// use tower_mqtt::config::Config;
    ///
    /// # fn main() -> Result<(), tower_mqtt::config::ConfigError> {
    /// let config = Config::from_env_with(|defaults| {
    ///     defaults.with_source_name("memory-worker").with_health(true)
    /// })?; // MQTT_URL must be set; MQTT_SOURCE_NAME, MQTT_ENABLE_HEALTH, ... win
    /// # Ok(()) }
    /// ```
    pub fn from_env_with(defaults: impl FnOnce(Config) -> Config) -> Result<Config, ConfigError> {
        Self::from_lookup_with(
            |name| std::env::var_os(name).map(|value| value.to_string_lossy().into_owned()),
            defaults,
        )
    }

    /// [`from_env_with`](Self::from_env_with) with the variables read through
    /// `lookup`.
    ///
    /// ```
    /// use tower_mqtt::config::Config;
    ///
    /// let defaults = |config: Config| config.with_source_name("memory-worker").with_health(true);
    /// let env = |var: &str| match var {
    ///     "MQTT_URL" => Some("mqtt://broker.prod:1883".to_owned()),
    ///     "MQTT_ENABLE_HEALTH" => Some("false".to_owned()),
    ///     _ => None,
    /// };
    /// let config = Config::from_lookup_with(env, defaults)?;
    /// assert_eq!(config.source_name, "memory-worker"); // the code's default
    /// assert!(!config.enable_health); // the environment wins
    ///
    /// let unset = Config::from_lookup_with(|_| None, defaults).unwrap_err();
    /// assert!(unset.is_missing_url());
    /// # Ok::<(), tower_mqtt::config::ConfigError>(())
    /// ```
    pub fn from_lookup_with<F: Fn(&str) -> Option<String>>(
        lookup: F,
        defaults: impl FnOnce(Config) -> Config,
    ) -> Result<Config, ConfigError> {
        let url = Vars(&lookup).get(var::URL).ok_or(ConfigError::Missing {
            var: var::URL,
            expected: expect::URL,
        })?;
        defaults(Config::new(&url)?).with_lookup(lookup)
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
        let url = vars.get(var::URL);
        if let Some(url) = &url {
            let (mut broker, credentials) = parse_url(url)?;
            // TLS settings made in code (a client certificate, say) still apply
            // to another TLS URL; the variables below may replace them.
            if let (Some(tls), Some(old)) = (&mut broker.tls, self.broker.tls.take()) {
                *tls = old;
            }
            self.broker = broker;
            if credentials.as_ref().is_some_and(|c| c.password.is_some()) {
                self.password_source = None;
            }
            self.credentials = credentials;
        }
        Self::apply(self, &vars, url.as_deref())
    }

    /// Puts the variables that are set on top of `config`, and validates. `url`
    /// is `MQTT_URL` when it was set in the same environment.
    #[allow(clippy::too_many_lines)] // one field per variable, nothing else
    fn apply<F: Fn(&str) -> Option<String>>(
        mut config: Config,
        vars: &Vars<F>,
        url: Option<&str>,
    ) -> Result<Config, ConfigError> {
        apply_tls(&mut config, vars)?;
        let shown_url = url.map(super::url::redact_url).unwrap_or_default();
        apply_credentials(&mut config, vars, url.is_some(), &shown_url)?;
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
            publish_attempts: vars
                .parse(var::PUBLISH_RETRIES, expect::ATTEMPTS, |raw| {
                    raw.parse::<u32>().ok().filter(|n| (1..=100).contains(n))
                })?
                .unwrap_or(base.publish_attempts),
            publish_retry_backoff: vars
                .seconds(var::PUBLISH_RETRY_BACKOFF)?
                .unwrap_or(base.publish_retry_backoff),
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
            protocol: vars
                .parse(var::PROTOCOL, expect::PROTOCOL, |raw| raw.parse().ok())?
                .unwrap_or(base.protocol),
            session_expiry: vars
                .parse(var::SESSION_EXPIRY, expect::SESSION_EXPIRY, |raw| {
                    raw.parse::<u32>()
                        .ok()
                        .map(|secs| Duration::from_secs(secs.into()))
                })?
                .or(base.session_expiry),
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
}

/// The variables, read through a lookup closure.
pub(super) struct Vars<F>(pub(super) F);

impl<F: Fn(&str) -> Option<String>> Vars<F> {
    /// The trimmed value of `name`; `None` when unset or empty.
    pub(super) fn get(&self, name: &str) -> Option<String> {
        (self.0)(name)
            .map(|value| value.trim().to_owned())
            .filter(|value| !value.is_empty())
    }

    /// The value of `name` parsed by `parse`, which returns `None` for a bad value.
    pub(super) fn parse<T>(
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

pub(super) fn generate_client_id(source_name: &str) -> String {
    format!(
        "{source_name}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

pub(super) fn parse_name(raw: &str) -> Option<String> {
    name_ok(raw).then(|| raw.to_owned())
}

/// Client ids and service names become topic levels (`system/keepalive/<client id>`,
/// `system/health/<service>`), so they may not contain topic separators or wildcards.
pub(super) fn name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_MQTT_STRING
        && !name
            .chars()
            .any(|c| matches!(c, '/' | '+' | '#') || c.is_control())
}

pub(super) fn parse_bool(raw: &str) -> Option<bool> {
    match raw.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" => Some(false),
        _ => None,
    }
}

pub(super) fn parse_keep_alive(raw: &str) -> Option<Duration> {
    let secs: u64 = raw.parse().ok()?;
    Some(Duration::from_secs(secs)).filter(|d| keep_alive_ok(*d))
}

/// MQTT carries the keep-alive as a `u16` of seconds, and rumqttc panics below one
/// second and truncates (`as u16`) above 65535.
pub(super) fn keep_alive_ok(keep_alive: Duration) -> bool {
    keep_alive.subsec_nanos() == 0 && (1..=u64::from(u16::MAX)).contains(&keep_alive.as_secs())
}

pub(super) fn parse_seconds(raw: &str) -> Option<Duration> {
    let secs: f64 = raw.parse().ok()?;
    // Rejects negative, NaN, infinite and overflowing values.
    Duration::try_from_secs_f64(secs)
        .ok()
        .filter(|d| seconds_ok(*d))
}

/// `MQTT_DEDUPE_TTL=0` is the fleet's way to turn dedup off.
pub(super) fn parse_dedupe_ttl(raw: &str) -> Option<Duration> {
    if raw.parse::<f64>().ok() == Some(0.0) {
        return Some(Duration::ZERO);
    }
    parse_seconds(raw)
}

pub(super) fn seconds_ok(duration: Duration) -> bool {
    !duration.is_zero() && duration <= MAX_SECONDS
}

/// A duration written as the seconds variables are (`0.5`, `30`).
pub(super) fn seconds(duration: Duration) -> String {
    duration.as_secs_f64().to_string()
}

pub(super) fn parse_positive(raw: &str) -> Option<u64> {
    raw.parse().ok().filter(|n| *n > 0)
}

pub(super) fn parse_usize(raw: &str) -> Option<usize> {
    raw.parse().ok()
}

pub(super) fn packet_size_ok(bytes: usize) -> bool {
    (MIN_PACKET_SIZE..=MAX_MQTT_PACKET).contains(&bytes)
}

pub(super) fn channel_capacity_ok(capacity: usize) -> bool {
    (1..=MAX_REQUEST_CHANNEL_CAPACITY).contains(&capacity)
}
