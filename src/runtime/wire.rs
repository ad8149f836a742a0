//! Between our types and rumqttc's: no rumqttc type appears in a public
//! signature, so the conversions live here, beside the runtime that needs them.

use bytes::Bytes;

use crate::{
    request::{QoS, Request},
    topic::{TopicError, TopicName},
};

/// Our QoS as rumqttc's.
pub(crate) fn to_wire(qos: QoS) -> rumqttc::QoS {
    match qos {
        QoS::AtMostOnce => rumqttc::QoS::AtMostOnce,
        QoS::AtLeastOnce => rumqttc::QoS::AtLeastOnce,
        QoS::ExactlyOnce => rumqttc::QoS::ExactlyOnce,
    }
}

/// rumqttc's QoS as ours.
pub(crate) fn from_wire(qos: rumqttc::QoS) -> QoS {
    match qos {
        rumqttc::QoS::AtMostOnce => QoS::AtMostOnce,
        rumqttc::QoS::AtLeastOnce => QoS::AtLeastOnce,
        rumqttc::QoS::ExactlyOnce => QoS::ExactlyOnce,
    }
}

/// The request for a PUBLISH packet received by rumqttc.
pub(crate) fn request(publish: &rumqttc::Publish) -> Result<Request<Bytes>, TopicError> {
    let mut req = Request::new(TopicName::new(&publish.topic)?, publish.payload.clone());
    req.set_qos(from_wire(publish.qos));
    req.set_retain(publish.retain);
    req.set_dup(publish.dup);
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_publish_keeps_its_flags() {
        let mut publish = rumqttc::Publish::new("a/b", rumqttc::QoS::ExactlyOnce, b"xy".to_vec());
        publish.retain = true;
        publish.dup = true;
        let req = request(&publish).unwrap();
        assert_eq!(req.topic(), "a/b");
        assert_eq!(req.qos(), QoS::ExactlyOnce);
        assert!(req.retain() && req.dup());
        assert_eq!(&req.body()[..], b"xy");
    }

    #[test]
    fn a_publish_with_a_bad_topic_is_refused() {
        let publish = rumqttc::Publish::new("a/+", rumqttc::QoS::AtMostOnce, Vec::new());
        assert!(request(&publish).is_err());
    }

    #[test]
    fn qos_round_trips() {
        for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
            assert_eq!(from_wire(to_wire(qos)), qos);
        }
    }
}
