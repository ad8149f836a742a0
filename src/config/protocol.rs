//! Which MQTT version the client speaks: [`Protocol`].

use std::{fmt, str::FromStr};

/// The MQTT version the client speaks (`MQTT_PROTOCOL`).
///
/// MQTT 3.1.1 is the default: the fleet speaks it, and every broker does.
/// MQTT 5 adds properties ([`Properties`](crate::Properties): user
/// properties, content type, response topic and correlation data, message
/// expiry), reason codes the broker explains refusals with, session expiry and
/// subscription options. The API is the same for both; properties set on a
/// publish are not sent over 3.1.1, which has none.
///
/// ```
/// use tower_mqtt::config::Protocol;
///
/// assert_eq!("5".parse::<Protocol>().unwrap(), Protocol::V5);
/// assert_eq!("3.1.1".parse::<Protocol>().unwrap(), Protocol::V311);
/// assert_eq!(Protocol::default(), Protocol::V311);
/// assert_eq!(Protocol::V5.to_string(), "5");
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Protocol {
    /// MQTT 3.1.1 (protocol level 4): `3.1.1`, also written `3` or `4`.
    #[default]
    V311,
    /// MQTT 5.0: `5`, also written `5.0`.
    V5,
}

/// A protocol version other than 3.1.1 or 5.
///
/// ```
/// assert!("3.1".parse::<tower_mqtt::config::Protocol>().is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown MQTT protocol version {0:?}: expected 3.1.1 or 5")]
pub struct UnknownProtocol(pub String);

impl FromStr for Protocol {
    type Err = UnknownProtocol;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        match raw.trim().to_ascii_lowercase().trim_start_matches('v') {
            "3.1.1" | "3" | "4" | "311" => Ok(Self::V311),
            "5" | "5.0" => Ok(Self::V5),
            _ => Err(UnknownProtocol(raw.to_owned())),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::V311 => "3.1.1",
            Self::V5 => "5",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spellings_of_each_version_parse() {
        for raw in ["3.1.1", "3", "4", "v3.1.1", " 311 "] {
            assert_eq!(raw.parse::<Protocol>().unwrap(), Protocol::V311, "{raw}");
        }
        for raw in ["5", "5.0", "V5"] {
            assert_eq!(raw.parse::<Protocol>().unwrap(), Protocol::V5, "{raw}");
        }
        for raw in ["", "3.1", "6", "mqtt5"] {
            assert!(raw.parse::<Protocol>().is_err(), "{raw}");
        }
    }

    #[test]
    fn display_parses_back() {
        for protocol in [Protocol::V311, Protocol::V5] {
            assert_eq!(protocol.to_string().parse::<Protocol>().unwrap(), protocol);
        }
    }
}
