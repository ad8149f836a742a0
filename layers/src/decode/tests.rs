use super::*;
use std::{convert::Infallible, time::Duration};
use tower::ServiceExt;
use tower_test::mock;

fn request(topic: &str, payload: &'static [u8]) -> Request<Bytes> {
    Request::builder(topic)
        .body(Bytes::from_static(payload))
        .unwrap()
}

/// Decodes through the layer with a handler that hands back what it got.
async fn decode(
    layer: &DecodeLayer,
    topic: &str,
    payload: &'static [u8],
) -> Result<Request<Envelope>, HandlerError> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let svc = layer.layer(tower::service_fn(move |req: Request<Envelope>| {
        tx.send(req).unwrap();
        async { Ok::<_, Infallible>(Outcome::Handled) }
    }));
    match svc.oneshot(request(topic, payload)).await.unwrap() {
        Outcome::Handled => Ok(rx.try_recv().unwrap()),
        Outcome::Failed(err) => {
            assert!(rx.try_recv().is_err(), "the handler must not run");
            Err(err)
        }
        other => panic!("unexpected {other:?}"),
    }
}

fn decode_error(err: &HandlerError) -> &DecodeError {
    assert!(!err.is_retryable(), "decode errors are permanent");
    err.get_ref().downcast_ref().expect("a DecodeError")
}

#[tokio::test]
async fn envelopes_decode_as_they_are() {
    let layer = DecodeLayer::new(EventRegistry::fleet());
    let req = decode(
        &layer,
        "stt/final",
        br#"{"id":"3f1c9b1e8a2d4c6f9e0b7a5d4c3b2a19","type":"stt.final","ts":1732650123.5,"source":"stt-worker","data":{"text":"hi"}}"#,
    )
    .await
    .unwrap();
    let env = req.body();
    assert_eq!(env.id(), "3f1c9b1e8a2d4c6f9e0b7a5d4c3b2a19");
    assert_eq!(env.source(), "stt-worker");
    assert_eq!(env.data()["text"], "hi");
    assert!(req.extensions().get::<RawPayload>().is_none());
}

#[tokio::test]
async fn decoding_keeps_topic_flags_and_extensions() {
    #[derive(Clone)]
    struct Tag;
    let svc =
        DecodeLayer::default().layer(tower::service_fn(|req: Request<Envelope>| async move {
            assert_eq!(req.topic(), "a/b");
            assert_eq!(req.qos(), tower_mqtt_core::QoS::ExactlyOnce);
            assert!(req.retain() && req.dup());
            assert!(req.extensions().get::<Tag>().is_some());
            Ok::<_, Infallible>(Outcome::Handled)
        }));
    let req = Request::builder("a/b")
        .qos(tower_mqtt_core::QoS::ExactlyOnce)
        .retain(true)
        .dup(true)
        .extension(Tag)
        .body(Bytes::from_static(br#"{"type":"x"}"#))
        .unwrap();
    assert!(matches!(svc.oneshot(req).await.unwrap(), Outcome::Handled));
}

#[tokio::test]
async fn raw_objects_take_the_registered_type() {
    let layer = DecodeLayer::new(EventRegistry::fleet());
    let req = decode(
        &layer,
        "system/health/stt",
        br#"{"ok":true,"event":"ready"}"#,
    )
    .await
    .unwrap();
    assert_eq!(req.body().event_type(), "system.health.stt");
    assert_eq!(req.body().data()["event"], "ready");
    assert_eq!(
        req.body().source(),
        tower_mqtt_core::envelope::DEFAULT_SOURCE
    );
    assert_eq!(req.body().id().len(), 32);
    let raw = req.extensions().get::<RawPayload>().expect("marked raw");
    assert_eq!(&raw.payload()[..], br#"{"ok":true,"event":"ready"}"#);
}

#[tokio::test]
async fn unregistered_topics_use_the_default_type_or_the_topic() {
    let derived = DecodeLayer::new(EventRegistry::fleet());
    let req = decode(&derived, "camera/front/frame", br#"{"n":1}"#)
        .await
        .unwrap();
    assert_eq!(req.body().event_type(), "camera.front.frame");

    let fixed = derived.clone().default_type("raw.json");
    let req = decode(&fixed, "camera/front/frame", br#"{"n":1}"#)
        .await
        .unwrap();
    assert_eq!(req.body().event_type(), "raw.json");
    // The registry still wins, and the clone kept its own setting.
    let req = decode(&fixed, "tts/say", br#"{"text":"x"}"#).await.unwrap();
    assert_eq!(req.body().event_type(), "tts.say");
    let req = decode(&derived, "x/y", br"{}").await.unwrap();
    assert_eq!(req.body().event_type(), "x.y");
}

#[tokio::test]
async fn an_object_with_an_extra_key_is_raw_like_in_python() {
    let layer = DecodeLayer::new(EventRegistry::fleet());
    let payload =
        br#"{"id":"a","type":"tts.say","ts":1.0,"source":"s","data":{},"correlation_id":"x"}"#;
    let req = decode(&layer, "tts/say", payload).await.unwrap();
    assert!(req.extensions().get::<RawPayload>().is_some());
    assert_eq!(req.body().event_type(), "tts.say");
    assert_eq!(req.body().data()["correlation_id"], "x");
    assert_ne!(req.body().id(), "a");
}

#[tokio::test]
async fn malformed_payloads_are_typed_permanent_errors() {
    let layer = DecodeLayer::new(EventRegistry::fleet());
    let err = decode(&layer, "a", b"").await.unwrap_err();
    assert!(matches!(decode_error(&err), DecodeError::Empty));
    let err = decode(&layer, "a", b"{\"text\":\"\xff\"}")
        .await
        .unwrap_err();
    assert!(matches!(decode_error(&err), DecodeError::NotUtf8(_)));
    let err = decode(&layer, "a", b"not json").await.unwrap_err();
    assert!(matches!(decode_error(&err), DecodeError::NotJson(_)));
    let err = decode(&layer, "a", b"{\"a\":1").await.unwrap_err();
    assert!(matches!(decode_error(&err), DecodeError::NotJson(_)));
    for (payload, found) in [
        (&b"[1,2,3]"[..], "array"),
        (b"\"text\"", "string"),
        (b"42", "number"),
        (b"null", "null"),
        (b"true", "boolean"),
    ] {
        let svc = layer.layer(tower::service_fn(|_: Request<Envelope>| async {
            Ok::<_, Infallible>(Outcome::Handled)
        }));
        let req = Request::builder("a")
            .body(Bytes::copy_from_slice(payload))
            .unwrap();
        let outcome = svc.oneshot(req).await.unwrap();
        let err = outcome.error().unwrap();
        match decode_error(err) {
            DecodeError::NotAnObject { found: got } => assert_eq!(*got, found),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            err.to_string(),
            format!("payload is a JSON {found}, not an object")
        );
    }
}

#[tokio::test]
async fn broken_envelopes_are_errors_not_raw_payloads() {
    let layer = DecodeLayer::new(EventRegistry::fleet());
    for payload in [
        &br#"{"id":"a","type":"t","ts":1.0,"source":"s","data":[1,2]}"#[..],
        br#"{"type":"t","data":"text"}"#,
        br#"{"type":"t","ts":"yesterday"}"#,
        br#"{"type":7}"#,
        br#"{"id":1,"type":"t"}"#,
    ] {
        let svc = layer.layer(tower::service_fn(|_: Request<Envelope>| async {
            Ok::<_, Infallible>(Outcome::Handled)
        }));
        let req = Request::builder("a")
            .body(Bytes::copy_from_slice(payload))
            .unwrap();
        let outcome = svc.oneshot(req).await.unwrap();
        let err = outcome.error().expect("a failure");
        assert!(
            matches!(decode_error(err), DecodeError::InvalidEnvelope(_)),
            "{}",
            String::from_utf8_lossy(payload)
        );
        assert!(err.to_string().starts_with("invalid envelope"), "{err}");
    }
}

#[tokio::test]
async fn decode_errors_never_reach_the_inner_service() {
    let (mock, mut handle) = mock::pair::<Request<Envelope>, Outcome>();
    let mut svc = DecodeLayer::default().layer(mock);
    handle.allow(1);
    std::future::poll_fn(|cx| svc.poll_ready(cx)).await.unwrap();
    let outcome = svc.call(request("a", b"[]")).await.unwrap();
    assert!(outcome.is_failed());
    // The readiness is kept for the next message, which does get through.
    let call = svc.call(request("a", br#"{"type":"x"}"#));
    let (req, respond) = handle.next_request().await.unwrap();
    assert_eq!(req.body().event_type(), "x");
    respond.send_response(Outcome::Handled);
    assert!(matches!(call.await.unwrap(), Outcome::Handled));
}

#[tokio::test]
async fn inner_errors_pass_through() {
    let (mock, mut handle) = mock::pair::<Request<Envelope>, Outcome>();
    let svc = Decode::new(mock, EventRegistry::new());
    handle.allow(1);
    let call = svc.oneshot(request("a", br#"{"type":"x"}"#));
    let ((), result) = tokio::join!(
        async {
            let (_, respond) = handle.next_request().await.unwrap();
            respond.send_error(std::io::Error::other("boom"));
        },
        call
    );
    assert_eq!(result.unwrap_err().to_string(), "boom");
}

#[tokio::test]
async fn bad_input_is_one_warning_with_topic_size_and_reason_never_the_payload() {
    let (logs, _guard) = crate::test_util::capture();
    let layer = DecodeLayer::new(EventRegistry::fleet());
    let secret = br#"["password: hunter2"]"#;
    let err = decode(&layer, "tts/say", secret).await.unwrap_err();
    assert!(matches!(
        decode_error(&err),
        DecodeError::NotAnObject { .. }
    ));

    let events = logs.events();
    assert_eq!(events.len(), 1, "{events:?}");
    let warning = &events[0];
    assert_eq!(warning.level, tracing::Level::WARN);
    assert_eq!(
        warning.message(),
        "dropping a message that cannot be decoded"
    );
    assert_eq!(warning.fields["topic"], "tts/say");
    assert_eq!(warning.fields["size"], secret.len().to_string());
    assert_eq!(warning.fields["reason"], "not_an_object");
    assert_eq!(
        warning.fields["error"],
        "payload is a JSON array, not an object"
    );
    assert_eq!(warning.fields["suppressed"], "0");
    let span = warning
        .span("mqtt.message")
        .expect("inside the message's span");
    assert_eq!(span["topic"], "tts/say");
    assert_eq!(span["qos"], "1");
    let everything = format!("{events:?}");
    assert!(!everything.contains("hunter2"), "{everything}");

    // A long error text is cut.
    let long = format!(r#"{{"type":"t","ts":"{}"}}"#, "x".repeat(1000));
    let req = Request::builder("a").body(Bytes::from(long)).unwrap();
    let svc = layer.layer(tower::service_fn(|_: Request<Envelope>| async {
        Ok::<_, Infallible>(Outcome::Handled)
    }));
    assert!(svc.oneshot(req).await.unwrap().is_failed());
    let error = &logs.events()[1].fields["error"];
    assert!(error.chars().count() <= MAX_ERROR_CHARS + 1, "{error}");
}

#[tokio::test(start_paused = true)]
async fn a_flood_of_junk_is_rate_limited_per_reason_and_counted() {
    let (logs, _guard) = crate::test_util::capture();
    let layer = DecodeLayer::default();
    for _ in 0..100 {
        decode(&layer, "junk", b"not json").await.unwrap_err();
    }
    decode(&layer, "junk", b"[]").await.unwrap_err();
    let warnings = logs.at(tracing::Level::WARN);
    let reasons: Vec<&str> = warnings
        .iter()
        .map(|w| w.fields["reason"].as_str())
        .collect();
    let per_second = tower_mqtt_core::log_limit::DEFAULT_PER_SECOND as usize;
    assert_eq!(reasons.len(), per_second + 1, "{reasons:?}");
    assert!(reasons[..per_second].iter().all(|r| *r == "not_json"));
    assert_eq!(
        reasons[per_second], "not_an_object",
        "another reason has its own limit"
    );

    tokio::time::advance(Duration::from_secs(1)).await;
    decode(&layer, "junk", b"not json").await.unwrap_err();
    let warnings = logs.at(tracing::Level::WARN);
    let last = warnings.last().unwrap();
    assert_eq!(last.fields["reason"], "not_json");
    assert_eq!(last.fields["suppressed"], (100 - per_second).to_string());
}
