//! Property tests over everything that parses outside input: envelope
//! decoding, topic names and filters, and `MQTT_URL` (with the other
//! `MQTT_*` variables).
//!
//! Nothing may panic, whatever the input; valid envelopes round-trip; topic
//! matching agrees with a plain reference matcher; configuration errors name
//! the variable and never show the password.
//!
//! The number of cases per property comes from `PROPTEST_CASES` (read by
//! proptest), 2,000 when it is unset. The long run:
//!
//! ```sh
//! PROPTEST_CASES=100000 cargo test --release --test fuzz
//! ```

use bytes::Bytes;
use futures_util::FutureExt;
use proptest::{collection, prelude::*, test_runner::Config as ProptestConfig};
use serde_json::{Map, Value};
use tower::{service_fn, BoxError, Layer, ServiceExt};
use tower_mqtt::layers::{DecodeError, DecodeLayer, EventRegistry};
use tower_mqtt::{config::Config, Envelope, Outcome, Request, TopicFilter, TopicName};

/// Cases per property when `PROPTEST_CASES` is unset.
const DEFAULT_CASES: u32 = 2_000;

fn cases() -> ProptestConfig {
    let mut config = ProptestConfig {
        // Report a failure with its minimal input; write no regression files
        // into the source tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = DEFAULT_CASES;
    }
    config
}

/// Any JSON value, a few levels deep, with finite numbers.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON numbers are finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            collection::btree_map(".{0,8}", inner, 0..6)
                .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

fn json_object() -> impl Strategy<Value = Map<String, Value>> {
    collection::btree_map(".{0,8}", json_value(), 0..6).prop_map(|map| map.into_iter().collect())
}

/// Objects made of the envelope's keys (and sometimes one more), with values
/// of any JSON type: the near misses a decoder must reject cleanly.
fn envelope_like() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        Just("id"),
        Just("type"),
        Just("ts"),
        Just("source"),
        Just("data"),
        Just("extra"),
    ];
    collection::btree_map(key, json_value(), 0..7).prop_map(|map| {
        Value::Object(
            map.into_iter()
                .map(|(key, value)| (key.to_owned(), value))
                .collect(),
        )
    })
}

/// Runs the inbound decode layer over `payload`: it must neither panic nor
/// return anything but a handled message or a permanent decode failure.
fn decode_through_layer(payload: Bytes) {
    let handler =
        service_fn(|_req: Request<Envelope>| async { Ok::<_, BoxError>(Outcome::Handled) });
    let decode = DecodeLayer::new(EventRegistry::fleet()).layer(handler);
    let req = Request::builder("fuzz/decode").body(payload).unwrap();
    let outcome = decode
        .oneshot(req)
        .now_or_never()
        .expect("decoding does not wait")
        .expect("the decode layer does not fail as a service");
    match outcome {
        Outcome::Handled => {}
        Outcome::Failed(err) => {
            assert!(!err.is_retryable(), "a decode failure is permanent: {err}");
            assert!(
                err.get_ref().downcast_ref::<DecodeError>().is_some(),
                "a decode failure carries a DecodeError: {err}"
            );
        }
        other => panic!("unexpected outcome {other:?}"),
    }
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn arbitrary_bytes_never_panic_the_envelope_decoder(bytes in collection::vec(any::<u8>(), 0..512)) {
        let _ = Envelope::from_slice(&bytes);
        decode_through_layer(Bytes::from(bytes));
    }

    #[test]
    fn arbitrary_json_never_panics_the_envelope_decoder(value in json_value()) {
        let bytes = serde_json::to_vec(&value).unwrap();
        let _ = Envelope::from_slice(&bytes);
        decode_through_layer(Bytes::from(bytes));
    }

    #[test]
    fn near_envelopes_decode_or_fail_cleanly_and_what_decodes_round_trips(value in envelope_like()) {
        let bytes = serde_json::to_vec(&value).unwrap();
        if let Ok(envelope) = Envelope::from_slice(&bytes) {
            prop_assert!(value.get("extra").is_none(), "an extra key is rejected: {value}");
            prop_assert!(value.get("type").is_some_and(Value::is_string));
            let again = Envelope::from_slice(&envelope.to_vec()).unwrap();
            prop_assert_eq!(again, envelope);
        }
        decode_through_layer(Bytes::from(bytes));
    }

    #[test]
    fn valid_envelopes_round_trip_exactly(
        event_type in ".{1,24}",
        id in "[0-9a-f]{32}",
        source in ".{0,16}",
        ts in any::<f64>().prop_filter("finite", |f| f.is_finite()),
        data in json_object(),
    ) {
        let envelope = Envelope::from_map(event_type, data)
            .with_id(id)
            .with_source(source)
            .with_ts(ts);
        let bytes = envelope.to_vec();
        let wire: Value = serde_json::from_slice(&bytes).unwrap();
        prop_assert_eq!(wire.as_object().map(Map::len), Some(5), "exactly five keys");
        let decoded = Envelope::from_slice(&bytes).unwrap();
        prop_assert_eq!(decoded.ts().to_bits(), envelope.ts().to_bits());
        prop_assert_eq!(decoded, envelope);
    }

    #[test]
    fn deep_nesting_never_overflows_the_stack(depth in 0_usize..20_000, object in any::<bool>()) {
        let (open, close): (&[u8], &[u8]) = if object { (b"{\"a\":", b"}") } else { (b"[", b"]") };
        let mut bytes = open.repeat(depth);
        bytes.extend(close.repeat(depth));
        let _ = Envelope::from_slice(&bytes);
        decode_through_layer(Bytes::from(bytes));
    }
}

// Fails until envelope decoding refuses JSON arrays: serde's derived
// `Deserialize` also accepts a struct as a sequence of its fields in order, so
// `["<id>", "<type>"]` decodes as an envelope (found by the property above).
// The fleet's Python model and the decode layer's documentation reject arrays.
#[test]
fn a_json_array_is_never_an_envelope() {
    for array in [
        r#"["",""]"#,
        r#"["0123456789abcdef0123456789abcdef","llm.request",1.5,"router",{}]"#,
    ] {
        assert!(
            Envelope::from_slice(array.as_bytes()).is_err(),
            "{array} decoded as an envelope"
        );
    }
}

#[test]
fn a_hundred_thousand_and_a_million_deep_arrays_are_rejected_without_a_panic() {
    for depth in [100_000, 1_000_000] {
        let mut bytes = vec![b'['; depth];
        bytes.extend(std::iter::repeat_n(b']', depth));
        assert!(Envelope::from_slice(&bytes).is_err());
        decode_through_layer(Bytes::from(bytes));
    }
}

/// The reference: MQTT 3.1.1 section 4.7, level by level.
fn reference_match(pattern: &str, topic: &str) -> bool {
    fn levels(filter: &[&str], topic: &[&str]) -> bool {
        match (filter.split_first(), topic.split_first()) {
            (Some((&"#", _)), _) | (None, None) => true,
            (Some((&"+", filter)), Some((_, topic))) => levels(filter, topic),
            (Some((want, filter)), Some((got, topic))) => want == got && levels(filter, topic),
            _ => false,
        }
    }
    let filter: Vec<&str> = pattern.split('/').collect();
    let topic_levels: Vec<&str> = topic.split('/').collect();
    if topic.starts_with('$') && matches!(filter[0], "+" | "#") {
        return false;
    }
    levels(&filter, &topic_levels)
}

/// Topic names from a small alphabet of levels, so that filters hit them often.
fn topic_name() -> impl Strategy<Value = String> {
    let level = prop_oneof![
        Just(""),
        Just("a"),
        Just("b"),
        Just("ab"),
        Just("$SYS"),
        Just("x y"),
    ];
    collection::vec(level, 1..6)
        .prop_map(|levels| levels.join("/"))
        .prop_filter("a topic is at least one character", |topic| {
            !topic.is_empty()
        })
}

/// Valid topic filters over the same levels, with wildcards and sometimes a
/// shared-subscription prefix.
fn topic_filter() -> impl Strategy<Value = String> {
    let level = prop_oneof![
        Just(""),
        Just("a"),
        Just("b"),
        Just("ab"),
        Just("$SYS"),
        Just("+"),
    ];
    (collection::vec(level, 0..5), any::<bool>(), any::<bool>())
        .prop_map(|(mut levels, hash, shared)| {
            if hash || levels.is_empty() {
                levels.push("#");
            }
            let pattern = levels.join("/");
            if shared {
                format!("$share/group/{pattern}")
            } else {
                pattern
            }
        })
        .prop_filter("a filter is at least one character", |filter| {
            !filter.is_empty() && !filter.ends_with("group/")
        })
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn arbitrary_strings_never_panic_topic_parsing(raw in ".{0,64}", bytes in collection::vec(any::<u8>(), 0..64)) {
        let lossy = String::from_utf8_lossy(&bytes);
        for text in [raw.as_str(), lossy.as_ref()] {
            let name = TopicName::new(text);
            let filter = TopicFilter::new(text);
            if let (Ok(name), Ok(filter)) = (name, filter) {
                let _ = filter.matches(&name);
                let _ = filter.captures(&name);
            }
        }
    }

    #[test]
    fn wildcard_heavy_strings_never_panic_topic_parsing(raw in "[a+#/$ ]{0,24}") {
        let _ = TopicName::new(&raw);
        if let Ok(filter) = TopicFilter::new(&raw) {
            let _ = filter.has_wildcards();
            let _ = filter.share_group();
        }
    }

    #[test]
    fn matching_agrees_with_the_reference(filter in topic_filter(), topic in topic_name()) {
        let parsed = TopicFilter::new(&filter).unwrap();
        let name = TopicName::new(&topic).unwrap();
        let expected = reference_match(parsed.pattern(), &topic);
        prop_assert_eq!(parsed.matches(&name), expected, "{} vs {}", filter, topic);
        prop_assert_eq!(parsed.captures(&name).is_some(), expected);
    }

    #[test]
    fn a_covering_filter_matches_everything_the_covered_one_does(
        wide in topic_filter(),
        narrow in topic_filter(),
        topic in topic_name(),
    ) {
        let (wide, narrow) = (TopicFilter::new(&wide).unwrap(), TopicFilter::new(&narrow).unwrap());
        let name = TopicName::new(&topic).unwrap();
        if wide.covers(&narrow) && narrow.matches(&name) {
            prop_assert!(wide.matches(&name), "{wide} covers {narrow} but misses {topic}");
        }
    }
}

/// A password no generated URL part can contain by accident (no strategy
/// below produces upper-case letters).
const SECRET: &str = "QZXSECRETPW";

/// URLs close to valid: each part drawn from valid and broken variants.
fn near_valid_url() -> impl Strategy<Value = String> {
    let scheme = prop_oneof![
        Just("mqtt://"),
        Just("mqtts://"),
        Just("tcp://"),
        Just("ssl://"),
        Just("http://"),
        Just("mqtt:/"),
        Just(""),
    ];
    let userinfo = prop_oneof![
        Just(String::new()),
        Just(format!("user:{SECRET}@")),
        Just(format!(":{SECRET}@")),
        Just(format!("user:{SECRET}%2F%zz@")),
        Just(format!("user:{SECRET}@@")),
        Just(format!("us/er:{SECRET}@")),
        Just(format!("user:{SECRET}%ff%fe@")),
        Just("user@".to_owned()),
    ];
    let host = prop_oneof![
        Just("localhost"),
        Just("127.0.0.1"),
        Just("[::1]"),
        Just("[::1"),
        Just("::1"),
        Just("bad host"),
        Just(""),
        Just("b\u{e9}roker"),
        Just("a..b"),
    ];
    let port = prop_oneof![
        Just(""),
        Just(":1883"),
        Just(":0"),
        Just(":65536"),
        Just(":-1"),
        Just(":abc"),
        Just(":"),
        Just(":99999999999999999999"),
    ];
    let tail = prop_oneof![
        Just(""),
        Just("/"),
        Just("/path"),
        Just("?client_id=x"),
        Just("#frag"),
        Just("//"),
    ];
    (scheme, userinfo, host, port, tail).prop_map(|(scheme, userinfo, host, port, tail)| {
        format!("{scheme}{userinfo}{host}{port}{tail}")
    })
}

/// Checks a configuration result: a success makes a client without a panic
/// (rumqttc's setters panic on some bad input); an error names a variable that
/// was set and never shows the password.
fn check_config(
    result: Result<Config, tower_mqtt::config::ConfigError>,
    set: &[&str],
) -> Result<(), TestCaseError> {
    match result {
        Ok(config) => {
            if !config.broker.is_tls() {
                // TLS options load the system's certificates: slow, and not parsing.
                let _ = tower_mqtt::Client::new(config);
            }
        }
        Err(err) => {
            let text = err.to_string();
            prop_assert!(
                set.contains(&err.var()),
                "names a variable that was set: {}",
                text
            );
            prop_assert!(
                text.contains(err.var()),
                "the message names {}: {}",
                err.var(),
                text
            );
            prop_assert!(!text.contains(SECRET), "the password leaked: {}", text);
            prop_assert!(
                !format!("{err:?}").contains(SECRET),
                "the password leaked: {:?}",
                err
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn arbitrary_strings_never_panic_the_url_parser(raw in ".{0,80}") {
        match Config::new(&raw) {
            Ok(config) => { let _ = config.broker.to_string(); }
            Err(err) => prop_assert_eq!(err.var(), "MQTT_URL", "{}", err),
        }
    }

    #[test]
    fn near_valid_urls_parse_or_fail_naming_mqtt_url_without_the_password(url in near_valid_url()) {
        check_config(Config::new(&url), &["MQTT_URL"])?;
        let config = Config::from_lookup(|var| (var == "MQTT_URL").then(|| url.clone()));
        check_config(config, &["MQTT_URL"])?;
    }

    #[test]
    fn arbitrary_values_of_every_variable_never_panic(
        url in near_valid_url(),
        values in collection::vec(prop_oneof![".{0,12}", "[0-9. -]{0,8}", Just("true".to_owned())], 16),
    ) {
        // MQTT_CA_FILE is left out: it names a file to read.
        const VARS: [&str; 16] = [
            "MQTT_CLIENT_ID", "MQTT_SOURCE_NAME", "MQTT_KEEPALIVE", "MQTT_ENABLE_HEALTH",
            "MQTT_ENABLE_HEARTBEAT", "MQTT_HEARTBEAT_INTERVAL", "MQTT_DEDUPE_TTL",
            "MQTT_DEDUPE_MAX_ENTRIES", "MQTT_RECONNECT_MIN_DELAY", "MQTT_RECONNECT_MAX_DELAY",
            "MQTT_CLEAN_SESSION", "MQTT_MAX_PACKET_SIZE", "MQTT_REQUEST_CHANNEL_CAPACITY",
            "MQTT_OFFLINE_BUFFER", "MQTT_OFFLINE_MAX_AGE", "MQTT_OFFLINE_OVERFLOW",
        ];
        let lookup = |var: &str| {
            if var == "MQTT_URL" {
                return Some(url.clone());
            }
            VARS.iter().position(|known| *known == var).map(|i| values[i].clone())
        };
        let mut set = VARS.to_vec();
        set.push("MQTT_URL");
        check_config(Config::from_lookup(lookup), &set)?;
    }
}
