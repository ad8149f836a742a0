// The tests reach into every part of the module.
#![allow(clippy::wildcard_imports)]

mod transport;

use std::{
    collections::HashMap,
    io,
    path::{Path, PathBuf},
    sync::Arc,
};

use rumqttc::{MqttOptions, TlsConfiguration, Transport};
use tokio_rustls::rustls::{self, ClientConfig};

use super::url::*;
use super::*;

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
    assert_eq!(config.ack_order, AckOrder::Connection);
    assert_eq!(config.max_incoming_packet_size, MAX_MQTT_PACKET);
    let config = with_url(&[
        ("MQTT_MAX_PENDING", "100"),
        ("MQTT_MAX_PENDING_BYTES", "65536"),
        ("MQTT_ACK_ORDER", "Topic"),
        ("MQTT_MAX_INCOMING_PACKET_SIZE", "2097152"),
    ])
    .unwrap();
    assert_eq!(config.max_pending, 100);
    assert_eq!(config.max_pending_bytes, 65536);
    assert_eq!(config.ack_order, AckOrder::Topic);
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
        ("mqtt+ws://h", expect::SCHEME),
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

    let certs =
        rustls_pemfile::certs(&mut TEST_SERVER_PEM.as_bytes()).collect::<Result<Vec<_>, _>>()?;
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
    use percent_encoding::percent_decode_str;

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
            scheme in "(mqtt|mqtts|tcp|ssl|tls|ws|wss|http|)",
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
            values in proptest::collection::vec(any::<String>(), 21),
        ) {
            let names = [
                "MQTT_URL", "MQTT_CA_FILE", "MQTT_CLIENT_ID", "MQTT_SOURCE_NAME",
                "MQTT_KEEPALIVE", "MQTT_ENABLE_HEALTH", "MQTT_ENABLE_HEARTBEAT",
                "MQTT_HEARTBEAT_INTERVAL", "MQTT_DEDUPE_TTL", "MQTT_DEDUPE_MAX_ENTRIES",
                "MQTT_RECONNECT_MIN_DELAY", "MQTT_RECONNECT_MAX_DELAY",
                "MQTT_CLEAN_SESSION", "MQTT_MAX_PACKET_SIZE",
                "MQTT_REQUEST_CHANNEL_CAPACITY", "MQTT_USERNAME", "MQTT_PASSWORD",
                "MQTT_PASSWORD_FILE", "MQTT_CLIENT_CERT_FILE", "MQTT_CLIENT_KEY_FILE",
                "MQTT_TLS_ALPN",
            ];
            // A fixed URL so that every other variable is reached; URLs have their
            // own properties above.
            let lookup = |name: &str| match names.iter().position(|n| *n == name)? {
                // TLS, so that the TLS variables are read too.
                0 => Some("mqtts://h".to_owned()),
                index => Some(values[index].clone()),
            };
            if let Ok(config) = Config::from_lookup(lookup) {
                prop_assert!(config.validate().is_ok());
            }
        }
    }
}

#[test]
fn publish_retries_come_from_the_environment_and_reach_the_outbound_stack() {
    let config = with_url(&[]).unwrap();
    assert_eq!(config.publish_attempts, 3);
    assert_eq!(config.publish_retry_backoff, Duration::from_millis(100));
    let config = with_url(&[
        ("MQTT_PUBLISH_RETRIES", "6"),
        ("MQTT_PUBLISH_RETRY_BACKOFF", "0.25"),
    ])
    .unwrap();
    assert_eq!(config.publish_attempts, 6);
    assert_eq!(config.publish_retry_backoff, Duration::from_millis(250));
    let stack = format!("{:?}", config.outbound_stack());
    assert!(stack.contains("max_attempts: 6"), "{stack}");
    assert!(stack.contains("min_backoff: 250ms"), "{stack}");
    for (var, raw) in [
        ("MQTT_PUBLISH_RETRIES", "0"),
        ("MQTT_PUBLISH_RETRIES", "many"),
        ("MQTT_PUBLISH_RETRY_BACKOFF", "0"),
    ] {
        let error = with_url(&[(var, raw)]).unwrap_err();
        assert_eq!(error.var(), var, "{var}={raw}");
    }
}
