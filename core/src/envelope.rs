//! The fleet's message envelope: exactly five keys on the wire.
//!
//! | key | JSON type | meaning |
//! |---|---|---|
//! | `id` | string | uuid4 as 32 lowercase hex digits; a reply or stream chunk reuses the request's id |
//! | `type` | string | dotted event type, such as `llm.request` |
//! | `ts` | number | epoch seconds as a float |
//! | `source` | string | the emitting service |
//! | `data` | object | the payload, always a JSON object |
//!
//! The fleet's Python services reject any extra key, so an [`Envelope`] has no
//! room for one: encoding always yields exactly these five keys, and decoding
//! rejects unknown keys the same way the Python model does. As in the Python model,
//! only `type` is required when decoding; a missing `id`, `ts`, `source` or
//! `data` takes its default.
//!
//! ```
//! use serde::{Deserialize, Serialize};
//! use tower_mqtt::Envelope;
//!
//! #[derive(Serialize, Deserialize, Debug, PartialEq)]
//! struct Query { text: String, top_k: u32 }
//!
//! let request = Envelope::new("memory.query", Query { text: "cats".into(), top_k: 3 })?;
//! let bytes = request.to_vec();
//!
//! let received = Envelope::from_slice(&bytes)?;
//! assert_eq!(received.data_as::<Query>()?, Query { text: "cats".into(), top_k: 3 });
//!
//! // A reply reuses the request's id: that is how the fleet correlates.
//! let reply = Envelope::reply_to(&received, "memory.results", serde_json::json!({"hits": []}))?;
//! assert_eq!(reply.id(), request.id());
//! # Ok::<(), tower_mqtt::EnvelopeError>(())
//! ```

use std::{
    fmt,
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use serde::{
    de::{self, DeserializeOwned, Visitor},
    Deserialize, Deserializer, Serialize,
};
use serde_json::{Map, Value};

/// The `source` of an envelope built without one; the fleet's Python default.
pub const DEFAULT_SOURCE: &str = "router";

/// Why an envelope could not be built, decoded or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// The bytes are not a valid envelope: not JSON, not UTF-8, a missing `type`,
    /// a key of the wrong JSON type, or a key the contract does not have.
    #[error("invalid envelope: {0}")]
    Decode(#[source] serde_json::Error),
    /// `data` must be a JSON object; this value was something else.
    #[error("envelope data must be a JSON object, got {found}")]
    DataNotAnObject {
        /// The JSON type that was given instead (`array`, `string`, ...).
        found: &'static str,
    },
    /// The value given as `data` could not be serialized to JSON.
    #[error("cannot serialize envelope data: {0}")]
    Serialize(#[source] serde_json::Error),
    /// `data` does not have the shape of the requested type.
    #[error("envelope data does not match the expected type: {0}")]
    Data(#[source] serde_json::Error),
}

/// A message in the fleet's envelope; see the [module docs](self).
///
/// The fields are private so that the wire shape cannot drift: read them with
/// the accessors, change them with the `with_*` builders.
///
/// Cloning is one reference count: a clone shares the fields, data included
/// (the retry layer keeps a copy of every message it runs). A change through
/// a builder or [`data_mut`](Self::data_mut) copies them first if they are
/// shared.
#[derive(Clone, PartialEq)]
pub struct Envelope(Arc<Fields>);

/// The five keys, in their order on the wire.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename = "Envelope", deny_unknown_fields)]
struct Fields {
    /// An `Arc` of its own, for a [`CorrelationId`](crate::correlation::CorrelationId)
    /// that shares it.
    #[serde(default = "new_shared_id", deserialize_with = "shared_str")]
    id: Arc<str>,
    #[serde(rename = "type")]
    event_type: String,
    #[serde(default = "now")]
    ts: f64,
    #[serde(default = "default_source")]
    source: String,
    #[serde(default)]
    data: Map<String, Value>,
}

impl Serialize for Envelope {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Envelope {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Fields::deserialize(deserializer).map(|fields| Self(Arc::new(fields)))
    }
}

impl fmt::Debug for Envelope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let fields = &*self.0;
        f.debug_struct("Envelope")
            .field("id", &fields.id)
            .field("event_type", &fields.event_type)
            .field("ts", &fields.ts)
            .field("source", &fields.source)
            .field("data", &fields.data)
            .finish()
    }
}

fn default_source() -> String {
    DEFAULT_SOURCE.to_owned()
}

/// Decodes a string straight into an `Arc<str>`: one allocation, as for a
/// `String` (serde's own `Arc<str>` decodes a `Box<str>` and copies it).
fn shared_str<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Arc<str>, D::Error> {
    struct SharedStr;

    impl Visitor<'_> for SharedStr {
        type Value = Arc<str>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string")
        }

        fn visit_str<E: de::Error>(self, value: &str) -> Result<Arc<str>, E> {
            Ok(value.into())
        }
    }

    deserializer.deserialize_str(SharedStr)
}

/// [`new_id`] without the intermediate `String`.
fn new_shared_id() -> Arc<str> {
    let mut buffer = uuid::Uuid::encode_buffer();
    (&*uuid::Uuid::new_v4().simple().encode_lower(&mut buffer)).into()
}

/// A fresh id in the fleet's form: a uuid4 as 32 lowercase hex digits.
///
/// ```
/// let id = tower_mqtt::envelope::new_id();
/// assert_eq!(id.len(), 32);
/// assert!(id.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
/// ```
pub fn new_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// The current time as epoch seconds, the way Python's `time.time()` gives it.
///
/// ```
/// assert!(tower_mqtt::envelope::now() > 1.7e9);
/// ```
pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |elapsed| elapsed.as_secs_f64())
}

/// The name of a JSON value's type, for error messages: `null`, `boolean`,
/// `number`, `string`, `array` or `object`.
///
/// ```
/// assert_eq!(tower_mqtt::envelope::json_type(&serde_json::json!([1])), "array");
/// ```
#[doc(hidden)] // the decode layer's error text; not part of the API
pub fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn to_object(data: impl Serialize) -> Result<Map<String, Value>, EnvelopeError> {
    match serde_json::to_value(data).map_err(EnvelopeError::Serialize)? {
        Value::Object(map) => Ok(map),
        other => Err(EnvelopeError::DataNotAnObject {
            found: json_type(&other),
        }),
    }
}

impl Envelope {
    /// A new event of `event_type` with a fresh id, the current time and the
    /// default source; `data` must serialize to a JSON object.
    ///
    /// ```
    /// use tower_mqtt::Envelope;
    ///
    /// let hello = Envelope::new("tts.say", serde_json::json!({"text": "hello"})).unwrap();
    /// assert_eq!(hello.event_type(), "tts.say");
    /// assert!(Envelope::new("tts.say", [1, 2, 3]).is_err());
    /// ```
    pub fn new(event_type: impl Into<String>, data: impl Serialize) -> Result<Self, EnvelopeError> {
        Ok(Self::from_map(event_type, to_object(data)?))
    }

    /// A new event from a JSON object that is already built; cannot fail.
    ///
    /// ```
    /// use tower_mqtt::Envelope;
    ///
    /// let empty = Envelope::from_map("wake.event", serde_json::Map::new());
    /// assert!(empty.data().is_empty());
    /// ```
    pub fn from_map(event_type: impl Into<String>, data: Map<String, Value>) -> Self {
        Self(Arc::new(Fields {
            id: new_shared_id(),
            event_type: event_type.into(),
            ts: now(),
            source: default_source(),
            data,
        }))
    }

    /// A reply or stream chunk for `request`: a new event that reuses the
    /// request's id (the fleet has no separate correlation field).
    ///
    /// ```
    /// use tower_mqtt::Envelope;
    /// use serde_json::json;
    ///
    /// let request = Envelope::new("llm.request", json!({"text": "hi"})).unwrap();
    /// let chunk = Envelope::reply_to(&request, "llm.stream", json!({"seq": 0, "delta": "He"})).unwrap();
    /// assert_eq!(chunk.id(), request.id());
    /// assert_eq!(chunk.seq(), Some(0));
    /// ```
    pub fn reply_to(
        request: &Envelope,
        event_type: impl Into<String>,
        data: impl Serialize,
    ) -> Result<Self, EnvelopeError> {
        let mut reply = Self::new(event_type, data)?;
        reply.fields_mut().id = request.0.id.clone();
        Ok(reply)
    }

    /// Replaces the id: the fleet's "correlate" (a reply takes the request's id).
    #[must_use]
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.fields_mut().id = id.into().into();
        self
    }

    /// Replaces the source.
    ///
    /// ```
    /// use tower_mqtt::Envelope;
    ///
    /// let env = Envelope::from_map("stt.final", Default::default()).with_source("stt-worker");
    /// assert_eq!(env.source(), "stt-worker");
    /// ```
    #[must_use]
    pub fn with_source(mut self, source: impl Into<String>) -> Self {
        self.fields_mut().source = source.into();
        self
    }

    /// Replaces the timestamp (epoch seconds).
    #[must_use]
    pub fn with_ts(mut self, ts: f64) -> Self {
        self.fields_mut().ts = ts;
        self
    }

    /// The fields, to change: copied first if a clone shares them.
    fn fields_mut(&mut self) -> &mut Fields {
        Arc::make_mut(&mut self.0)
    }

    /// The id.
    pub fn id(&self) -> &str {
        &self.0.id
    }

    /// The id as it is stored, for a [`CorrelationId`](crate::correlation::CorrelationId)
    /// that shares it.
    pub(crate) fn shared_id(&self) -> &Arc<str> {
        &self.0.id
    }

    /// The event type (the `type` key).
    pub fn event_type(&self) -> &str {
        &self.0.event_type
    }

    /// The timestamp in epoch seconds.
    pub fn ts(&self) -> f64 {
        self.0.ts
    }

    /// The emitting service.
    pub fn source(&self) -> &str {
        &self.0.source
    }

    /// The payload object.
    pub fn data(&self) -> &Map<String, Value> {
        &self.0.data
    }

    /// The payload object, mutably; copied first if a clone of the envelope
    /// shares it.
    pub fn data_mut(&mut self) -> &mut Map<String, Value> {
        &mut self.fields_mut().data
    }

    /// Consumes the envelope and returns its payload object.
    pub fn into_data(self) -> Map<String, Value> {
        Arc::unwrap_or_clone(self.0).data
    }

    /// `data.seq` when it is an integer: the position of a stream chunk.
    pub fn seq(&self) -> Option<i64> {
        self.0.data.get("seq").and_then(Value::as_i64)
    }

    /// Decodes `data` into `T`.
    ///
    /// ```
    /// use tower_mqtt::Envelope;
    ///
    /// #[derive(serde::Deserialize)]
    /// struct Say { text: String }
    ///
    /// let env = Envelope::new("tts.say", serde_json::json!({"text": "hi"})).unwrap();
    /// assert_eq!(env.data_as::<Say>().unwrap().text, "hi");
    /// assert!(env.data_as::<Vec<u8>>().is_err());
    /// ```
    pub fn data_as<T: DeserializeOwned>(&self) -> Result<T, EnvelopeError> {
        T::deserialize(&self.0.data).map_err(EnvelopeError::Data)
    }

    /// Encodes the envelope as JSON: exactly the five keys.
    pub fn to_vec(&self) -> Vec<u8> {
        // Only strings, a float and a JSON map: serializing cannot fail, except
        // for a non-finite `ts`, which JSON cannot express and is written as null
        // by serde_json's `Value` path; encode it as 0 to keep the contract.
        let fields = &*self.0;
        let ts = if fields.ts.is_finite() {
            fields.ts
        } else {
            0.0
        };
        let wire = Wire {
            id: &fields.id,
            event_type: &fields.event_type,
            ts,
            source: &fields.source,
            data: &fields.data,
        };
        serde_json::to_vec(&wire).unwrap_or_default()
    }

    /// Encodes the envelope as JSON into [`Bytes`].
    pub fn to_bytes(&self) -> Bytes {
        Bytes::from(self.to_vec())
    }

    /// Decodes an envelope; see the [module docs](self) for the rules.
    ///
    /// ```
    /// use tower_mqtt::Envelope;
    ///
    /// let env = Envelope::from_slice(br#"{"type":"wake.event","data":{"word":"tars"}}"#).unwrap();
    /// assert_eq!(env.source(), "router");
    /// assert!(Envelope::from_slice(br#"{"type":"x","extra":1}"#).is_err());
    /// assert!(Envelope::from_slice(br#"["3f1c9b1e8a2d4c6f9e0b7a5d4c3b2a19","x"]"#).is_err());
    /// ```
    pub fn from_slice(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        // serde's derived decoding also takes a struct written as an array of
        // its fields; pydantic does not, and neither may we.
        if bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
            return Err(EnvelopeError::Decode(serde::de::Error::custom(
                "an envelope is a JSON object, not an array",
            )));
        }
        serde_json::from_slice(bytes).map_err(EnvelopeError::Decode)
    }
}

/// The serialized form; borrowing avoids copying the payload on the hot path.
#[derive(Serialize)]
struct Wire<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    event_type: &'a str,
    ts: f64,
    source: &'a str,
    data: &'a Map<String, Value>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// What a Python service's `Envelope(...).model_dump_json()` looks like.
    const PYTHON_FIXTURE: &str = r#"{"id":"3f1c9b1e8a2d4c6f9e0b7a5d4c3b2a19","type":"stt.final","ts":1732650123.456789,"source":"stt-worker","data":{"text":"turn on the lights","confidence":0.93,"is_final":true}}"#;

    #[test]
    fn decodes_python_fixture() {
        let env = Envelope::from_slice(PYTHON_FIXTURE.as_bytes()).unwrap();
        assert_eq!(env.id(), "3f1c9b1e8a2d4c6f9e0b7a5d4c3b2a19");
        assert_eq!(env.event_type(), "stt.final");
        assert!((env.ts() - 1_732_650_123.456_789).abs() < 1e-6);
        assert_eq!(env.source(), "stt-worker");
        assert_eq!(env.data()["text"], "turn on the lights");
    }

    #[test]
    fn round_trips_python_fixture_value_for_value() {
        let env = Envelope::from_slice(PYTHON_FIXTURE.as_bytes()).unwrap();
        let ours: Value = serde_json::from_slice(&env.to_vec()).unwrap();
        let theirs: Value = serde_json::from_str(PYTHON_FIXTURE).unwrap();
        assert_eq!(ours, theirs);
    }

    #[test]
    fn the_wire_bytes_are_pinned() {
        let env = Envelope::from_slice(PYTHON_FIXTURE.as_bytes()).unwrap();
        // `data` comes out with its keys sorted (serde_json's map); the rest
        // in the contract's order.
        let expected = r#"{"id":"3f1c9b1e8a2d4c6f9e0b7a5d4c3b2a19","type":"stt.final","ts":1732650123.456789,"source":"stt-worker","data":{"confidence":0.93,"is_final":true,"text":"turn on the lights"}}"#;
        assert_eq!(String::from_utf8(env.to_vec()).unwrap(), expected);
        // The derived serializer (used by serde_json::to_value and by anyone
        // who serializes an envelope directly) writes the same bytes.
        assert_eq!(serde_json::to_string(&env).unwrap(), expected);
        let escaped = Envelope::from_slice(
            br#"{"id":"a\"b","type":"t\u00e9","ts":1.5,"source":"s\\n","data":{}}"#,
        )
        .unwrap();
        assert_eq!(
            (escaped.id(), escaped.event_type(), escaped.source()),
            ("a\"b", "t\u{e9}", "s\\n")
        );
        assert_eq!(
            String::from_utf8(escaped.to_vec()).unwrap(),
            r#"{"id":"a\"b","type":"té","ts":1.5,"source":"s\\n","data":{}}"#
        );
    }

    #[test]
    fn clones_share_until_changed() {
        let env = Envelope::from_slice(PYTHON_FIXTURE.as_bytes()).unwrap();
        let mut copy = env.clone();
        assert!(Arc::ptr_eq(&env.0, &copy.0));
        copy.data_mut().insert("extra".into(), json!(1));
        let copy = copy.with_source("other");
        assert!(!env.data().contains_key("extra"));
        assert_eq!(env.source(), "stt-worker");
        assert_eq!((copy.source(), copy.id()), ("other", env.id()));
        assert_eq!(
            format!("{env:?}"),
            format!(
                "Envelope {{ id: {:?}, event_type: \"stt.final\", ts: {:?}, source: \"stt-worker\", data: {:?} }}",
                env.id(),
                env.ts(),
                env.data()
            )
        );
    }

    #[test]
    fn encodes_exactly_five_keys() {
        let env = Envelope::new("llm.request", json!({"text": "hi", "nested": {"a": 1}}))
            .unwrap()
            .with_source("llm-worker");
        let value: Value = serde_json::from_slice(&env.to_vec()).unwrap();
        let object = value.as_object().unwrap();
        let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["data", "id", "source", "ts", "type"]);
        assert!(object["id"].is_string());
        assert!(object["type"].is_string());
        assert!(object["ts"].is_f64());
        assert!(object["source"].is_string());
        assert!(object["data"].is_object());
    }

    #[test]
    fn generated_ids_are_uuid4_hex() {
        let env = Envelope::from_map("x", Map::new());
        assert_eq!(env.id().len(), 32);
        assert!(env
            .id()
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)));
        let uuid = uuid::Uuid::parse_str(env.id()).unwrap();
        assert_eq!(uuid.get_version_num(), 4);
        assert_ne!(env.id(), Envelope::from_map("x", Map::new()).id());
    }

    #[test]
    fn integer_ts_is_accepted() {
        let env = Envelope::from_slice(
            br#"{"id":"a","type":"t","ts":1732650123,"source":"s","data":{}}"#,
        )
        .unwrap();
        assert!((env.ts() - 1_732_650_123.0).abs() < f64::EPSILON);
    }

    #[test]
    fn missing_optional_keys_take_defaults() {
        let env = Envelope::from_slice(br#"{"type":"wake.event"}"#).unwrap();
        assert_eq!(env.id().len(), 32);
        assert_eq!(env.source(), DEFAULT_SOURCE);
        assert!(env.data().is_empty());
        assert!(env.ts() > 1.7e9);
    }

    #[test]
    fn rejects_what_python_rejects() {
        let cases: &[&[u8]] = &[
            br#"{"id":"a","type":"t","ts":1.0,"source":"s","data":{},"correlation_id":"x"}"#,
            br#"{"id":"a","ts":1.0,"source":"s","data":{}}"#,
            br#"{"id":"a","type":"t","ts":1.0,"source":"s","data":[1,2]}"#,
            br#"{"id":"a","type":"t","ts":1.0,"source":"s","data":"text"}"#,
            br#"{"id":1,"type":"t","ts":1.0,"source":"s","data":{}}"#,
            br#"{"id":"a","type":"t","ts":"yesterday","source":"s","data":{}}"#,
            br"[1,2,3]",
            b"not json",
            b"\xff\xfe",
            b"",
        ];
        for case in cases {
            assert!(
                matches!(Envelope::from_slice(case), Err(EnvelopeError::Decode(_))),
                "{} should be rejected",
                String::from_utf8_lossy(case)
            );
        }
    }

    #[test]
    fn non_object_data_is_a_clear_error() {
        let err = Envelope::new("t", vec![1, 2]).unwrap_err();
        assert!(matches!(
            err,
            EnvelopeError::DataNotAnObject { found: "array" }
        ));
        assert_eq!(
            err.to_string(),
            "envelope data must be a JSON object, got array"
        );
        assert!(matches!(
            Envelope::new("t", "x"),
            Err(EnvelopeError::DataNotAnObject { found: "string" })
        ));
    }

    #[test]
    fn typed_data_round_trip_and_errors() {
        #[derive(Serialize, Deserialize, Debug, PartialEq)]
        struct Chunk {
            seq: u32,
            delta: String,
        }
        #[derive(Deserialize, Debug)]
        #[allow(dead_code)]
        struct Other {
            missing: String,
        }
        let env = Envelope::new(
            "llm.stream",
            Chunk {
                seq: 4,
                delta: "lo".into(),
            },
        )
        .unwrap();
        assert_eq!(env.seq(), Some(4));
        assert_eq!(
            env.data_as::<Chunk>().unwrap(),
            Chunk {
                seq: 4,
                delta: "lo".into()
            }
        );
        let err = env.data_as::<Other>().unwrap_err();
        assert!(matches!(err, EnvelopeError::Data(_)));
        assert!(err.to_string().contains("missing"));
    }

    #[test]
    fn ts_round_trips_exactly() {
        for i in 0..2000u32 {
            let ts = 1_732_650_123.0 + f64::from(i) * 0.000_123_457;
            let env = Envelope::from_map("t", Map::new()).with_ts(ts);
            let back = Envelope::from_slice(&env.to_vec()).unwrap();
            assert_eq!(back.ts().to_bits(), ts.to_bits(), "{ts}");
        }
    }

    #[test]
    fn non_finite_ts_still_encodes_a_number() {
        let env = Envelope::from_map("t", Map::new()).with_ts(f64::NAN);
        let value: Value = serde_json::from_slice(&env.to_vec()).unwrap();
        assert!(value["ts"].is_number());
    }
}
