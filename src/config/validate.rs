//! Checking a configuration, and what it hands to rumqttc.

use rumqttc::{MqttOptions, TlsConfiguration, Transport};

use super::{
    channel_capacity_ok, expect, host_ok, invalid, keep_alive_ok, name_ok, packet_size_ok, seconds,
    seconds_ok, tls_client_config, var, Config, ConfigError, Password, MAX_MQTT_STRING,
};

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

    /// The rumqttc options of this configuration (no rumqttc type is public:
    /// `Client::new` is the way in).
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
            // Read here too, so that a missing password file stops the start.
            let password = self.current_password()?;
            let password = password.as_ref().map_or("", Password::expose);
            options.set_credentials(credentials.username.clone(), password);
        }
        let tls = match &self.broker.tls {
            Some(tls) => Some(TlsConfiguration::Rustls(tls_client_config(
                &self.broker,
                tls,
            )?)),
            None => None,
        };
        match (&self.broker.websocket_path, tls) {
            (None, None) => {}
            (None, Some(tls)) => {
                options.set_transport(Transport::tls_with_config(tls));
            }
            #[cfg(feature = "websocket")]
            (Some(_), tls) => {
                // rumqttc takes a WebSocket broker as a whole URL and reads the
                // host and port back from it; the user info is never part of it.
                options = self.websocket_options(&options, tls);
            }
            #[cfg(not(feature = "websocket"))]
            (Some(_), _) => {
                let value = self.broker.to_string();
                return Err(invalid(var::URL, value, expect::WEBSOCKET_FEATURE));
            }
        }
        Ok(options)
    }
}

#[cfg(feature = "websocket")]
impl Config {
    /// `options` rebuilt for rumqttc's WebSocket transport, whose broker address
    /// is the URL (without user info) rather than the host.
    fn websocket_options(
        &self,
        options: &MqttOptions,
        tls: Option<TlsConfiguration>,
    ) -> MqttOptions {
        let mut ws = MqttOptions::new(
            options.client_id(),
            self.broker.to_string(),
            self.broker.port,
        );
        ws.set_keep_alive(options.keep_alive())
            .set_clean_session(options.clean_session())
            .set_max_packet_size(self.max_incoming_packet_size, self.max_packet_size)
            .set_request_channel_capacity(options.request_channel_capacity())
            .set_transport(match tls {
                Some(tls) => Transport::wss_with_config(tls),
                None => Transport::Ws,
            });
        if let Some(login) = options.credentials() {
            ws.set_credentials(login.username, login.password);
        }
        ws
    }
}
