//! The MQTT 5 properties of a PUBLISH: [`Properties`].
//!
//! A message received over MQTT 5 carries them on its [`Request`](crate::Request)
//! ([`Request::properties`](crate::Request::properties)); a publish sets them
//! on its request before it goes out. MQTT 3.1.1 has no properties: a message
//! received over 3.1.1 has none, and properties set on a publish are not sent
//! (the trace context, for one, is set on every publish whatever the version).
//!
//! ```
//! use std::time::Duration;
//! use tower_mqtt::{Properties, Request};
//!
//! let mut props = Properties::new();
//! props.add_user_property("tenant", "acme");
//! props.add_user_property("tenant", "globex");
//! props.content_type = Some("application/json".into());
//! props.message_expiry = Some(Duration::from_secs(30));
//!
//! let req = Request::builder("orders/new").properties(props).body(()).unwrap();
//! assert_eq!(req.properties().user_property("tenant"), Some("acme"));
//! assert_eq!(req.properties().user_property_values("tenant").count(), 2);
//! assert_eq!(req.properties().content_type.as_deref(), Some("application/json"));
//! ```

use std::time::Duration;

use bytes::Bytes;

/// The properties of an MQTT 5 PUBLISH that a service reads or sets.
///
/// All are optional and empty by default. User properties keep their order
/// and may repeat a key, as the protocol allows [MQTT-3.3.2-18].
///
/// ```
/// use tower_mqtt::Properties;
///
/// let mut props = Properties::new();
/// assert!(props.is_empty());
/// props.response_topic = Some("replies/7".into());
/// props.correlation_data = Some(bytes::Bytes::from_static(b"req-7"));
/// assert!(!props.is_empty());
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Properties {
    /// User properties: (name, value) pairs, in order, names may repeat.
    pub user_properties: Vec<(String, String)>,
    /// The content type of the payload (a MIME type, by convention).
    pub content_type: Option<String>,
    /// The topic a reply goes to (request/reply).
    pub response_topic: Option<String>,
    /// Data that pairs a reply with its request; a reply carries it back.
    pub correlation_data: Option<Bytes>,
    /// How long the broker keeps the message for a subscriber that has not
    /// received it yet (whole seconds on the wire; more than `u32::MAX`
    /// seconds is sent as `u32::MAX`).
    pub message_expiry: Option<Duration>,
    /// Whether the payload is UTF-8 text (Payload Format Indicator 1); `false`
    /// means unspecified bytes.
    pub utf8_payload: bool,
}

/// The properties of a request that has none: returned by reference.
pub(crate) static NONE: Properties = Properties::new();

impl Properties {
    /// No properties.
    ///
    /// ```
    /// assert!(tower_mqtt::Properties::new().is_empty());
    /// ```
    pub const fn new() -> Self {
        Self {
            user_properties: Vec::new(),
            content_type: None,
            response_topic: None,
            correlation_data: None,
            message_expiry: None,
            utf8_payload: false,
        }
    }

    /// Whether no property is set.
    ///
    /// ```
    /// let mut props = tower_mqtt::Properties::new();
    /// props.utf8_payload = true;
    /// assert!(!props.is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        *self == Self::new()
    }

    /// The value of the first user property named `name`.
    ///
    /// ```
    /// let mut props = tower_mqtt::Properties::new();
    /// props.add_user_property("k", "1").add_user_property("k", "2");
    /// assert_eq!(props.user_property("k"), Some("1"));
    /// assert_eq!(props.user_property("missing"), None);
    /// ```
    pub fn user_property(&self, name: &str) -> Option<&str> {
        self.user_properties
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    /// The values of every user property named `name`, in order.
    ///
    /// ```
    /// let mut props = tower_mqtt::Properties::new();
    /// props.add_user_property("k", "1").add_user_property("j", "x").add_user_property("k", "2");
    /// assert_eq!(props.user_property_values("k").collect::<Vec<_>>(), ["1", "2"]);
    /// ```
    pub fn user_property_values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> {
        self.user_properties
            .iter()
            .filter(move |(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    /// Appends a user property (an existing one of the same name stays).
    ///
    /// ```
    /// let mut props = tower_mqtt::Properties::new();
    /// props.add_user_property("trace", "a");
    /// assert_eq!(props.user_properties, [("trace".to_owned(), "a".to_owned())]);
    /// ```
    pub fn add_user_property(
        &mut self,
        name: impl Into<String>,
        value: impl Into<String>,
    ) -> &mut Self {
        self.user_properties.push((name.into(), value.into()));
        self
    }

    /// Replaces every user property named `name` by one with `value`, where
    /// the first of them was (or at the end).
    ///
    /// ```
    /// let mut props = tower_mqtt::Properties::new();
    /// props.add_user_property("traceparent", "old").add_user_property("x", "1");
    /// props.set_user_property("traceparent", "new");
    /// assert_eq!(props.user_property("traceparent"), Some("new"));
    /// assert_eq!(props.user_properties.len(), 2);
    /// ```
    pub fn set_user_property(
        &mut self,
        name: impl Into<String>,
        value: impl Into<String>,
    ) -> &mut Self {
        let name = name.into();
        let value = value.into();
        match self
            .user_properties
            .iter()
            .position(|(key, _)| *key == name)
        {
            Some(at) => {
                self.user_properties[at].1 = value;
                let mut index = 0;
                self.user_properties.retain(|(key, _)| {
                    index += 1;
                    index - 1 <= at || *key != name
                });
            }
            None => self.user_properties.push((name, value)),
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_user_property_keeps_order_and_drops_later_copies() {
        let mut props = Properties::new();
        props
            .add_user_property("a", "1")
            .add_user_property("k", "x")
            .add_user_property("b", "2")
            .add_user_property("k", "y");
        props.set_user_property("k", "z");
        let names: Vec<_> = props
            .user_properties
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        assert_eq!(names, ["a=1", "k=z", "b=2"]);
    }

    #[test]
    fn empty_means_nothing_set() {
        assert!(Properties::default().is_empty());
        let props = Properties {
            message_expiry: Some(Duration::ZERO),
            ..Properties::new()
        };
        assert!(!props.is_empty());
    }
}
