//! Checking a configuration, and what it hands to rumqttc.

use rumqttc::{MqttOptions, TlsConfiguration, Transport};

use super::{
    channel_capacity_ok, expect, host_ok, invalid, keep_alive_ok, name_ok, packet_size_ok, seconds,
    seconds_ok, tls_client_config, var, Config, ConfigError, Password, Protocol, MAX_MQTT_PACKET,
    MAX_MQTT_STRING,
};

/// rumqttc's MQTT 5 client asserts a keep-alive of at least this.
const MIN_KEEP_ALIVE_V5: std::time::Duration = std::time::Duration::from_secs(5);

impl Config {
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
        if !(1..=100).contains(&self.publish_attempts) {
            let value = self.publish_attempts.to_string();
            return Err(invalid(var::PUBLISH_RETRIES, value, expect::ATTEMPTS));
        }
        if !seconds_ok(self.publish_retry_backoff) {
            let value = seconds(self.publish_retry_backoff);
            return Err(invalid(var::PUBLISH_RETRY_BACKOFF, value, expect::SECONDS));
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
        self.validate_protocol()?;
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
        self.validate_credentials()?;
        self.validate_tls()?;
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

    /// The MQTT 5 settings: rumqttc's MQTT 5 client panics on a keep-alive
    /// below 5 s, and a session expiry means nothing without a session.
    fn validate_protocol(&self) -> Result<(), ConfigError> {
        if self.protocol == Protocol::V5 && self.keep_alive < MIN_KEEP_ALIVE_V5 {
            return Err(invalid(
                var::KEEPALIVE,
                seconds(self.keep_alive),
                expect::KEEPALIVE_V5,
            ));
        }
        if let Some(expiry) = self.session_expiry {
            let value = seconds(expiry);
            if self.protocol != Protocol::V5 {
                return Err(invalid(
                    var::SESSION_EXPIRY,
                    value,
                    expect::SESSION_EXPIRY_V5,
                ));
            }
            if self.clean_session {
                return Err(invalid(
                    var::SESSION_EXPIRY,
                    value,
                    expect::SESSION_EXPIRY_CLEAN,
                ));
            }
            if expiry.is_zero()
                || expiry.subsec_nanos() != 0
                || expiry.as_secs() > u64::from(u32::MAX)
            {
                return Err(invalid(var::SESSION_EXPIRY, value, expect::SESSION_EXPIRY));
            }
        }
        Ok(())
    }

    /// The Session Expiry Interval an MQTT 5 CONNECT carries: 0 for a clean
    /// session, the configured one or "never" (`u32::MAX`) for a persistent one.
    pub(crate) fn session_expiry_interval(&self) -> u32 {
        if self.clean_session {
            return 0;
        }
        self.session_expiry.map_or(u32::MAX, |expiry| {
            u32::try_from(expiry.as_secs()).unwrap_or(u32::MAX)
        })
    }

    /// The rumqttc options of this configuration (no rumqttc type is public:
    /// `Client::new` is the way in), for MQTT 3.1.1.
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
    pub(crate) fn mqtt_options(&self) -> Result<MqttOptions, ConfigError> {
        self.client_options()
    }

    /// [`mqtt_options`](Self::mqtt_options) for rumqttc's MQTT 5 client, with the
    /// CONNECT properties: Session Expiry Interval, Maximum Packet Size (so the
    /// broker drops a message no handler could take, rather than send it) and
    /// Receive Maximum (from the pending limit). No Topic Alias Maximum: rumqttc
    /// hands a message over before it resolves an incoming alias.
    pub(crate) fn mqtt5_options(&self) -> Result<rumqttc::v5::MqttOptions, ConfigError> {
        self.client_options()
    }

    fn client_options<O: ClientOptions>(&self) -> Result<O, ConfigError> {
        self.validate()?;
        let tls = match &self.broker.tls {
            Some(tls) => Some(TlsConfiguration::Rustls(tls_client_config(
                &self.broker,
                tls,
            )?)),
            None => None,
        };
        let transport = match (&self.broker.websocket_path, tls) {
            (None, None) => None,
            (None, Some(tls)) => Some(Transport::tls_with_config(tls)),
            #[cfg(feature = "websocket")]
            (Some(_), tls) => Some(match tls {
                Some(tls) => Transport::wss_with_config(tls),
                None => Transport::Ws,
            }),
            #[cfg(not(feature = "websocket"))]
            (Some(_), _) => {
                let value = self.broker.to_string();
                return Err(invalid(var::URL, value, expect::WEBSOCKET_FEATURE));
            }
        };
        // rumqttc takes a WebSocket broker as a whole URL and reads the host and
        // port back from it; the user info is never part of it.
        let host = if self.broker.websocket_path.is_some() {
            self.broker.to_string()
        } else {
            self.broker.host.clone()
        };
        let mut options = O::create(self.client_id.clone(), host, self.broker.port);
        options.common(self);
        if let Some(credentials) = &self.credentials {
            // Read here too, so that a missing password file stops the start.
            let password = self.current_password()?;
            let password = password.as_ref().map_or("", Password::expose);
            options.login(credentials.username.clone(), password);
        }
        if let Some(transport) = transport {
            options.transport(transport);
        }
        Ok(options)
    }
}

/// Room for a PUBLISH's fixed header, topic and properties above its payload,
/// in the Maximum Packet Size an MQTT 5 client announces: a message whose
/// payload a handler may take is never dropped by the broker for its size.
const HEADER_ROOM: usize = 128 * 1024;

/// What the configuration sets on either of rumqttc's clients.
trait ClientOptions {
    fn create(client_id: String, host: String, port: u16) -> Self;
    /// Keep-alive, session, packet sizes and the channel.
    fn common(&mut self, config: &Config);
    fn login(&mut self, user: String, password: &str);
    fn transport(&mut self, transport: Transport);
}

impl ClientOptions for MqttOptions {
    fn create(client_id: String, host: String, port: u16) -> Self {
        MqttOptions::new(client_id, host, port)
    }

    fn common(&mut self, config: &Config) {
        self.set_keep_alive(config.keep_alive)
            .set_clean_session(config.clean_session)
            .set_max_packet_size(config.max_incoming_packet_size, config.max_packet_size)
            .set_request_channel_capacity(config.request_channel_capacity);
    }

    fn login(&mut self, user: String, password: &str) {
        self.set_credentials(user, password);
    }

    fn transport(&mut self, transport: Transport) {
        self.set_transport(transport);
    }
}

impl ClientOptions for rumqttc::v5::MqttOptions {
    fn create(client_id: String, host: String, port: u16) -> Self {
        rumqttc::v5::MqttOptions::new(client_id, host, port)
    }

    fn common(&mut self, config: &Config) {
        let incoming = config
            .max_incoming_packet_size
            .min(config.max_packet_size.saturating_add(HEADER_ROOM))
            .min(MAX_MQTT_PACKET);
        self.set_keep_alive(config.keep_alive)
            .set_clean_start(config.clean_session)
            .set_session_expiry_interval(Some(config.session_expiry_interval()))
            .set_max_packet_size(u32::try_from(incoming).ok())
            .set_receive_maximum(Some(config.receive_maximum()))
            // The default allocates a table of 65,535 in-flight publishes.
            .set_outgoing_inflight_upper_limit(MAX_OUTGOING_INFLIGHT_V5)
            .set_request_channel_capacity(config.request_channel_capacity);
    }

    fn login(&mut self, user: String, password: &str) {
        self.set_credentials(user, password);
    }

    fn transport(&mut self, transport: Transport) {
        self.set_transport(transport);
    }
}

/// Outgoing QoS 1 and 2 publishes in flight at once on MQTT 5 (the broker's
/// Receive Maximum may lower it).
const MAX_OUTGOING_INFLIGHT_V5: u16 = 100;

impl Config {
    /// The Receive Maximum an MQTT 5 CONNECT announces: the pending limit,
    /// within the protocol's 1 to 65,535.
    pub(crate) fn receive_maximum(&self) -> u16 {
        u16::try_from(self.max_pending.max(1)).unwrap_or(u16::MAX)
    }
}
