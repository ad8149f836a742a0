//! What MQTT 5 adds, end to end on mosquitto: properties in and out (and
//! none over MQTT 3.1.1), native request/reply between two services, No Local,
//! Retain Handling and Retain As Published,
//! the broker's reason codes on a refused publish, a refused connection and
//! its DISCONNECT, the session expiry, and one trace id across two services.
//!
//! mosquitto 2.0.11 grants an ACL-denied subscription on MQTT 5 as on 3.1.1
//! (SUBACK 0x00, and the messages are dropped later), so no broker here
//! refuses one on MQTT 5: the SUBACK reason codes are checked in
//! `src/runtime/wire/v5.rs`, and the refusal path (shared by both versions)
//! in `tests/refusals.rs` with aedes.
//!
//! These run on MQTT 5 whatever `TOWER_MQTT_TEST_PROTOCOL` says; the runtime,
//! backlog, fault and interop suites run on both versions (`.ci/run`).

mod support;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use serde_json::json;
use support::Mosquitto;
use tokio::sync::mpsc;
use tower_mqtt::{
    config::{Config, Protocol},
    layers::outbound::{DeliveryError, PublishError},
    reply::Replies,
    ConnectionState, Envelope, Properties, Publisher, Request, Router, Running, Subscription,
};

const WAIT: Duration = Duration::from_secs(15);

fn config(url: &str, name: &str, protocol: Protocol) -> Config {
    support::service_config(url, name).with_protocol(protocol)
}

fn v5(url: &str, name: &str) -> Config {
    config(url, name, Protocol::V5)
}

async fn serve(config: Config, router: Router) -> Running {
    let running = tower_mqtt::serve(config, router).spawn().expect("serve");
    tokio::time::timeout(WAIT, running.ready())
        .await
        .expect("ready in time")
        .expect("subscribed");
    running
}

/// A route that forwards each message's properties.
fn recorder(tx: mpsc::UnboundedSender<(String, Properties)>) -> Router {
    Router::new().route(
        "props/#",
        move |props: Properties, req: Request<Envelope>| {
            let _ = tx.send((req.topic().to_string(), props));
            std::future::ready(())
        },
    )
}

async fn next<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> T {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("a message in time")
        .expect("open")
}

#[tokio::test]
async fn properties_cross_the_broker_on_mqtt5_and_are_not_sent_on_311() {
    let broker = Mosquitto::start().await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let consumer = serve(v5(&broker.url(), "props-in"), recorder(tx)).await;

    for (name, protocol) in [("props-v5", Protocol::V5), ("props-v311", Protocol::V311)] {
        let sender = tower_mqtt::serve(config(&broker.url(), name, protocol), Router::new())
            .spawn()
            .unwrap();
        sender
            .publisher()
            .publish(format!("props/{name}"), json!({"n": 1}))
            .user_property("tenant", "acme")
            .user_property("tenant", "globex")
            .user_property("trace", "t-1")
            .content_type("application/json")
            .message_expiry(Duration::from_secs(300))
            .response_topic("replies/props")
            .correlation_data(Bytes::from_static(b"\x00\xffid"))
            .utf8_payload(true)
            .await
            .unwrap();
        let (topic, props) = next(&mut rx).await;
        assert_eq!(topic, format!("props/{name}"));
        if protocol == Protocol::V5 {
            let tenants: Vec<_> = props.user_property_values("tenant").collect();
            assert_eq!(tenants, ["acme", "globex"], "order and repeats kept");
            assert_eq!(props.user_property("trace"), Some("t-1"));
            assert_eq!(props.content_type.as_deref(), Some("application/json"));
            assert_eq!(props.response_topic.as_deref(), Some("replies/props"));
            assert_eq!(props.correlation_data.as_deref(), Some(&b"\x00\xffid"[..]));
            let expiry = props.message_expiry.expect("an expiry");
            assert!(
                expiry <= Duration::from_secs(300) && expiry >= Duration::from_secs(290),
                "the broker sends what is left of it: {expiry:?}"
            );
            assert!(props.utf8_payload);
        } else {
            // MQTT 3.1.1 has no properties: the setters send nothing.
            let ours: Vec<_> = props
                .user_properties
                .iter()
                .filter(|(k, _)| k == "tenant" || k == "trace")
                .collect();
            assert!(ours.is_empty(), "{props:?}");
            assert!(props.response_topic.is_none() && props.correlation_data.is_none());
            assert!(props.content_type.is_none() && props.message_expiry.is_none());
        }
        sender.shutdown().await;
    }
    consumer.shutdown().await;
}

#[tokio::test]
async fn a_request_is_answered_on_its_response_topic_with_its_correlation_data() {
    let broker = Mosquitto::start().await;
    // The responder answers with `reply_to`, on whatever topic the request names.
    let responder = Router::new().route(
        "math/double",
        |publisher: Publisher, req: Request<Envelope>| async move {
            let n = req.body().data()["n"].as_i64().unwrap_or_default();
            publisher
                .publish("math/results", json!({"n": n * 2}))
                .reply_to(&req)
                .await
        },
    );
    let responder = serve(v5(&broker.url(), "responder"), responder).await;

    let replies = Replies::new().with_reply_topic("requester/replies");
    let requester = serve(
        v5(&broker.url(), "requester"),
        Router::new().route_service("requester/replies", replies.clone()),
    )
    .await;
    let publisher = requester.publisher();
    for n in 0..20 {
        let request = Envelope::new("math.double", json!({ "n": n })).unwrap();
        let id = request.id().to_owned();
        let reply = replies
            .request(&publisher, "math/double", request, WAIT)
            .await
            .unwrap();
        assert_eq!(reply.id(), id, "the reply keeps the request's id");
        assert_eq!(reply.data()["n"], n * 2);
    }
    assert_eq!(replies.waiting(), 0);
    requester.shutdown().await;
    responder.shutdown().await;
}

#[tokio::test]
async fn no_local_keeps_a_service_from_receiving_its_own_publishes() {
    let broker = Mosquitto::start().await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = |seen: Arc<Mutex<Vec<String>>>, route: &'static str| {
        move |req: Request<Envelope>| {
            seen.lock()
                .unwrap()
                .push(format!("{route}:{}", req.body().source()));
            std::future::ready(())
        }
    };
    let router = Router::new()
        .route(
            Subscription::new("chat/room").no_local(),
            record(seen.clone(), "room"),
        )
        .route("chat/echo", record(seen.clone(), "echo"));
    let service = serve(v5(&broker.url(), "chatter"), router).await;
    let other = tower_mqtt::serve(v5(&broker.url(), "other"), Router::new())
        .spawn()
        .unwrap();

    let own = service.publisher();
    own.publish("chat/room", json!({})).await.unwrap();
    own.publish("chat/echo", json!({})).await.unwrap();
    other
        .publisher()
        .publish("chat/room", json!({}))
        .await
        .unwrap();
    // The marker: once the other service's message is in, ours would be too.
    tokio::time::timeout(WAIT, async {
        while seen.lock().unwrap().len() < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut seen = seen.lock().unwrap().clone();
    seen.sort();
    assert_eq!(
        seen,
        ["echo:chatter", "room:other"],
        "its own message on the no-local route never came back"
    );
    other.shutdown().await;
    service.shutdown().await;
}

/// A mosquitto whose ACL lets anyone read and write `open/#` and nothing else.
async fn broker_with_acl() -> (Mosquitto, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let acl = dir.path().join("acl");
    std::fs::write(&acl, "topic readwrite open/#\n").unwrap();
    let broker = Mosquitto::start_with_config(&format!("acl_file {}\n", acl.display())).await;
    (broker, dir)
}

#[tokio::test]
async fn a_publish_the_broker_refuses_fails_with_its_reason() {
    let (broker, _dir) = broker_with_acl().await;
    let running = tower_mqtt::serve(
        v5(&broker.url(), "refused-publish").with_publish_retries(1, Duration::from_millis(10)),
        Router::new(),
    )
    .spawn()
    .unwrap();
    tokio::time::timeout(WAIT, running.ready())
        .await
        .unwrap()
        .unwrap();
    let publisher = running.publisher();
    let err = publisher
        .publish("closed/door", json!({}))
        .await
        .expect_err("the broker refuses it");
    let refused = err
        .downcast_ref::<PublishError>()
        .unwrap_or_else(|| panic!("a publish error: {err}"));
    let PublishError::Delivery(DeliveryError::Refused { code, reason }) = refused else {
        panic!("refused with a reason code: {refused:?}");
    };
    assert_eq!(*code, 0x87, "{reason}");
    assert!(reason.contains("not authorized"), "{reason}");
    // The connection is fine: the next publish goes through.
    publisher.publish("open/door", json!({})).await.unwrap();
    let stats = running.stats();
    assert_eq!(stats.publishes_refused, 1, "{stats:?}");
    assert_eq!(stats.connections, 1, "{stats:?}");
    running.shutdown().await;
}

/// Messages published while a persistent-session service is away: delivered
/// when it comes back within its session expiry, lost once the session
/// expired.
#[tokio::test]
async fn the_session_expiry_decides_what_a_returning_service_gets() {
    let broker = Mosquitto::start().await;
    for (expiry, away, expect_delivered) in [
        (None, Duration::from_secs(3), true),
        (Some(Duration::from_secs(1)), Duration::from_secs(3), false),
    ] {
        let id = support::unique_id("expiry");
        let cfg = || {
            let cfg = v5(&broker.url(), "expiry")
                .with_client_id(id.clone())
                .with_clean_session(false);
            match expiry {
                Some(expiry) => cfg.with_session_expiry(expiry),
                None => cfg,
            }
        };
        let (tx, mut rx) = mpsc::unbounded_channel();
        let route = move |req: Request<Envelope>| {
            let _ = tx.send(req.body().data()["n"].as_i64());
            std::future::ready(())
        };
        let router = Router::new().route("expiry/jobs", route);
        let first = serve(cfg(), router.clone()).await;
        first.shutdown().await;

        let sender = tower_mqtt::serve(v5(&broker.url(), "expiry-tx"), Router::new())
            .spawn()
            .unwrap();
        tokio::time::sleep(away).await;
        sender
            .publisher()
            .publish("expiry/jobs", json!({"n": 7}))
            .await
            .unwrap();
        sender.shutdown().await;

        let second = serve(cfg(), router).await;
        let got = tokio::time::timeout(Duration::from_secs(2), rx.recv()).await;
        if expect_delivered {
            assert_eq!(got.ok().flatten(), Some(Some(7)), "kept by the session");
        } else {
            assert!(got.is_err(), "the session expired: {got:?}");
        }
        second.shutdown().await;
    }
}

#[test]
fn session_settings_are_checked() {
    let base = || Config::new("mqtt://localhost").unwrap();
    let err = base()
        .with_clean_session(false)
        .with_session_expiry(Duration::from_secs(60))
        .validate()
        .unwrap_err();
    assert_eq!(
        err.var(),
        "MQTT_SESSION_EXPIRY",
        "MQTT 3.1.1 has none: {err}"
    );
    let err = base()
        .with_protocol(Protocol::V5)
        .with_session_expiry(Duration::from_secs(60))
        .validate()
        .unwrap_err();
    assert!(err.to_string().contains("MQTT_CLEAN_SESSION"), "{err}");
    let err = base()
        .with_protocol(Protocol::V5)
        .with_clean_session(false)
        .with_session_expiry(Duration::ZERO)
        .validate()
        .unwrap_err();
    assert!(
        err.to_string().contains("MQTT_CLEAN_SESSION=true"),
        "a session that ends at every disconnect is a clean one: {err}"
    );
    let err = base()
        .with_protocol(Protocol::V5)
        .with_keep_alive(Duration::from_secs(2))
        .validate()
        .unwrap_err();
    assert_eq!(err.var(), "MQTT_KEEPALIVE", "{err}");
    let from_env = Config::from_lookup(|name| match name {
        "MQTT_URL" => Some("mqtt://localhost".into()),
        "MQTT_PROTOCOL" => Some("5".into()),
        "MQTT_CLEAN_SESSION" => Some("false".into()),
        "MQTT_SESSION_EXPIRY" => Some("3600".into()),
        _ => None,
    })
    .unwrap();
    assert_eq!(from_env.protocol, Protocol::V5);
    assert_eq!(from_env.session_expiry, Some(Duration::from_secs(3600)));
    let err = Config::from_lookup(|name| match name {
        "MQTT_URL" => Some("mqtt://localhost".into()),
        "MQTT_PROTOCOL" => Some("6".into()),
        _ => None,
    })
    .unwrap_err();
    assert_eq!(err.var(), "MQTT_PROTOCOL", "{err}");
}

/// The first state after `Connected` that says why the connection went.
async fn disconnect_reason(running: &Running) -> String {
    let mut state = running.state();
    tokio::time::timeout(WAIT, async {
        loop {
            if let ConnectionState::Disconnected { reason, .. } = &*state.borrow_and_update() {
                return reason.clone();
            }
            state.changed().await.unwrap();
        }
    })
    .await
    .expect("a disconnect in time")
}

/// rumqttc never gives back the in-flight slot of a QoS 2 publish whose
/// PUBREC refused it; once refusals have taken every slot it stops sending
/// anything, acknowledgements included, and the client starts the connection
/// over.
#[tokio::test]
async fn refused_qos2_publishes_past_the_in_flight_window_do_not_wedge_the_client() {
    let (broker, _dir) = broker_with_acl().await;
    let running = tower_mqtt::serve(
        v5(&broker.url(), "refused-qos2")
            .with_keep_alive(Duration::from_secs(5))
            .with_publish_retries(1, Duration::from_millis(10)),
        Router::new(),
    )
    .spawn()
    .unwrap();
    tokio::time::timeout(WAIT, running.ready())
        .await
        .unwrap()
        .unwrap();
    let publisher = running.publisher();
    // mosquitto's window is 20; 30 refusals fill it.
    for n in 0..30 {
        let err = tokio::time::timeout(
            WAIT,
            publisher
                .publish("closed/vault", json!({ "n": n }))
                .qos(tower_mqtt::QoS::ExactlyOnce),
        )
        .await
        .unwrap_or_else(|_| panic!("publish {n} answered in time: {:?}", running.stats()))
        .expect_err("refused");
        assert!(err.to_string().contains("not authorized"), "{err}");
    }
    tokio::time::timeout(WAIT, publisher.publish("open/vault", json!({})))
        .await
        .expect("publishing goes on")
        .unwrap();
    assert_eq!(running.stats().publishes_refused, 30);
    running.shutdown().await;
}

#[tokio::test]
async fn a_publish_over_the_brokers_packet_limit_fails_unsent_and_keeps_the_connection() {
    // mosquitto announces its limit in the CONNACK's Maximum Packet Size.
    let broker = Mosquitto::start_with_config("max_packet_size 2048\n").await;
    let running = serve(v5(&broker.url(), "big"), Router::new()).await;
    let publisher = running.publisher();
    let err = publisher
        .publish("open/big", json!({"blob": "x".repeat(4096)}))
        .await
        .expect_err("over the broker's limit");
    let Some(PublishError::Delivery(DeliveryError::TooLargeForBroker { size, max })) =
        err.downcast_ref::<PublishError>()
    else {
        panic!("too large for the broker: {err}");
    };
    assert_eq!(*max, 2048);
    assert!(*size > 4096, "{size}");
    // Without the check rumqttc would drop the connection and send it again
    // on every reconnect; here the next publish simply goes through.
    publisher
        .publish("open/small", json!({"n": 1}))
        .await
        .unwrap();
    assert_eq!(running.stats().connections, 1);
    running.shutdown().await;
}

#[tokio::test]
async fn a_refused_connection_names_its_connack_reason() {
    let broker = Mosquitto::start_with_config("allow_anonymous false\n").await;
    let running = tower_mqtt::serve(v5(&broker.url(), "anonymous"), Router::new())
        .spawn()
        .unwrap();
    let reason = disconnect_reason(&running).await;
    assert!(
        reason.starts_with("refused: ") && reason.contains("CONNACK reason code 0x8"),
        "{reason}"
    );
    assert!(running.stats().connection_refusals >= 1);
    running.shutdown().await;
}

/// One trace id from a request through the handler of another service to
/// the reply back, across the broker.
#[tokio::test]
async fn one_trace_id_spans_request_handler_and_reply_across_two_services() {
    use tower_mqtt::layers::trace_context::{self, TraceContext};

    let broker = Mosquitto::start().await;
    let traces = Arc::new(Mutex::new(Vec::new()));
    let record = |traces: Arc<Mutex<Vec<(&'static str, String)>>>, at: &'static str| {
        move || {
            let trace = trace_context::current().expect("a trace while handling");
            traces
                .lock()
                .unwrap()
                .push((at, trace.trace_id().to_string()));
        }
    };
    let in_handler = record(traces.clone(), "handler");
    let responder = Router::new().route(
        "trace/ask",
        move |publisher: Publisher, req: Request<Envelope>| {
            in_handler();
            async move {
                publisher
                    .publish("trace/answers", json!({"ok": true}))
                    .reply_to(&req)
                    .await
            }
        },
    );
    let responder = serve(v5(&broker.url(), "trace-b"), responder).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let in_reply = record(traces.clone(), "reply");
    let requester = Router::new().route("trace/answers", move |props: Properties| {
        in_reply();
        let _ = tx.send(props.user_property("traceparent").map(str::to_owned));
        std::future::ready(())
    });
    let requester = serve(v5(&broker.url(), "trace-a"), requester).await;

    let origin = TraceContext::new_root();
    requester
        .publisher()
        .publish("trace/ask", json!({}))
        .user_property("traceparent", origin.traceparent())
        .await
        .unwrap();
    let reply_parent = next(&mut rx)
        .await
        .expect("the reply carries a traceparent");
    let reply_parent = TraceContext::parse(&reply_parent).unwrap();
    let trace = origin.trace_id().to_string();
    assert_eq!(reply_parent.trace_id().to_string(), trace);
    assert_ne!(
        reply_parent.span_id(),
        origin.span_id(),
        "the reply's own span"
    );
    assert_eq!(
        *traces.lock().unwrap(),
        [("handler", trace.clone()), ("reply", trace)],
        "the responder's handler and the requester's reply route run in the request's trace"
    );
    requester.shutdown().await;
    responder.shutdown().await;
}

/// Retain Handling and Retain As Published: which retained messages a
/// subscription gets, and whether forwarded ones keep the flag.
#[tokio::test]
async fn retain_options_decide_what_a_subscription_gets() {
    use tower_mqtt::subscription::RetainHandling;

    let broker = Mosquitto::start().await;
    let sender = tower_mqtt::serve(v5(&broker.url(), "retainer"), Router::new())
        .spawn()
        .unwrap();
    let publisher = sender.publisher();
    for topic in ["state/never", "state/always"] {
        publisher
            .publish(topic, json!({"retained": true}))
            .retain(true)
            .await
            .unwrap();
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    let route = move |req: Request<Envelope>| {
        let _ = tx.send((req.topic().to_string(), req.retain()));
        std::future::ready(())
    };
    let router = Router::new()
        .route(
            Subscription::new("state/never").retain_handling(RetainHandling::Never),
            route.clone(),
        )
        .route(
            Subscription::new("state/always").retain_as_published(),
            route,
        );
    let service = serve(v5(&broker.url(), "retain-options"), router).await;
    assert_eq!(
        next(&mut rx).await,
        ("state/always".to_owned(), true),
        "the retained message, sent on subscribing"
    );
    // A live publish: forwarded with its retain flag kept (Retain As Published).
    publisher
        .publish("state/always", json!({"retained": true}))
        .retain(true)
        .await
        .unwrap();
    assert_eq!(next(&mut rx).await, ("state/always".to_owned(), true));
    publisher
        .publish("state/never", json!({"live": true}))
        .await
        .unwrap();
    assert_eq!(
        next(&mut rx).await,
        ("state/never".to_owned(), false),
        "only the live message: the retained one was never sent"
    );
    service.shutdown().await;
    sender.shutdown().await;
}
