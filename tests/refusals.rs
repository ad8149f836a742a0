//! Refusals surface: a subscription the broker refuses fails `ready()`, is
//! logged at ERROR with its filter, counted, and reported in the health; a
//! connection the broker refuses is logged at ERROR with its return code once
//! (not on every retry), backs off, and shows in the connection state. A
//! service started before its broker is ready soon after the broker is.
//!
//! mosquitto 2.0.11 grants ACL-denied subscriptions (SUBACK 0) and drops the
//! messages later, so the refusals are made by aedes, which the tests start
//! with `authorizeSubscribe` and `authenticate` hooks.

mod support;

use support::service_config as config;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde_json::Value;
use support::{Aedes, AedesOptions, Captured, Probe, QoS as WireQoS, TestBroker};
use tower_mqtt::{
    config::{Config, Credentials, Password},
    runtime::ReadyError,
    ConnectionState, Envelope, Request, Router,
};

const WAIT: Duration = Duration::from_secs(15);

async fn aedes(options: AedesOptions) -> Option<Aedes> {
    if support::on_v5() {
        eprintln!(
            "skipped on MQTT 5: aedes 0.51 refuses MQTT 5 connections \
             (tests/mqtt5.rs checks MQTT 5 refusals on mosquitto)"
        );
        return None;
    }
    let broker = Aedes::try_start_with(options).await;
    if broker.is_none() {
        eprintln!("skipped: aedes is not installed here (CI installs it)");
    }
    broker
}

#[tokio::test]
async fn a_refused_subscription_fails_ready_names_its_filter_and_reports_unhealthy() {
    let Some(broker) = aedes(AedesOptions::new().deny("secret/#")).await else {
        return;
    };
    let logs = Captured::default();
    let _guard = logs.install();
    let service = "refusals";
    let mut health = Probe::subscribe(&broker.url(), &format!("system/health/{service}")).await;
    let topics = Arc::new(Mutex::new(Vec::new()));
    let handler = {
        let topics = topics.clone();
        move |req: Request<Envelope>| {
            topics.lock().unwrap().push(req.topic().to_string());
            std::future::ready(())
        }
    };
    let router = Router::new()
        .route("open/news", handler.clone())
        .route("secret/#", handler);
    let running = tower_mqtt::serve(config(&broker.url(), service).with_health(true), router)
        .spawn()
        .unwrap();

    let ready = tokio::time::timeout(WAIT, running.ready())
        .await
        .expect("the broker answered");
    let Err(ReadyError::Refused(refused)) = ready else {
        panic!("ready() must fail on a refused subscription: {ready:?}");
    };
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].filter, "secret/#");
    assert_eq!(running.stats().subscriptions_refused, 1);

    let report = health.next(WAIT).await.expect("a health report");
    let data: Value = serde_json::from_slice::<Value>(&report.payload).unwrap()["data"].clone();
    assert_eq!(data["ok"], false, "{data}");
    assert_eq!(data["event"], "subscribe_refused", "{data}");
    assert!(
        data["err"]
            .as_str()
            .unwrap_or_default()
            .contains("secret/#"),
        "the health names the filter: {data}"
    );

    let errors: Vec<String> = logs
        .lines()
        .into_iter()
        .filter(|line| line.contains("ERROR") && line.contains("refused a subscription"))
        .collect();
    assert_eq!(errors.len(), 1, "one ERROR per refused filter: {errors:?}");
    assert!(errors[0].contains("secret/#"), "{errors:?}");

    // What was granted works.
    support::publish_raw(
        &broker.url(),
        "open/news",
        b"{}".to_vec(),
        WireQoS::AtLeastOnce,
        false,
    )
    .await;
    tokio::time::timeout(WAIT, async {
        while topics.lock().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the granted route is served");
    assert_eq!(*topics.lock().unwrap(), ["open/news"]);
    running.shutdown().await;
}

#[tokio::test]
async fn a_refused_connection_logs_its_return_code_once_backs_off_and_shows_in_the_state() {
    let Some(broker) = aedes(AedesOptions::new().login("svc", "right")).await else {
        return;
    };
    let logs = Captured::default();
    let _guard = logs.install();
    let cfg = config(&broker.url(), "refused")
        .with_credentials(Credentials::new("svc", Some(Password::new("wrong"))));
    let running = tower_mqtt::serve(cfg, Router::new()).spawn().unwrap();

    let started = Instant::now();
    let mut connection = running.state();
    let reason = tokio::time::timeout(WAIT, async {
        loop {
            if let ConnectionState::Disconnected { reason, .. } = &*connection.borrow_and_update() {
                return reason.clone();
            }
            connection.changed().await.unwrap();
        }
    })
    .await
    .expect("the refusal shows in the state");
    assert!(
        reason.contains("bad user name or password") && reason.contains("return code 4"),
        "{reason}"
    );
    tokio::time::timeout(WAIT, async {
        while running.stats().connection_refusals < 4 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("it keeps trying");
    let elapsed = started.elapsed();
    let stats = running.stats();
    let errors: Vec<String> = logs
        .lines()
        .into_iter()
        .filter(|line| line.contains("ERROR") && line.contains("refused the connection"))
        .collect();
    eprintln!(
        "FIGURES connack refusal: attempts={} in_ms={} error_lines={}",
        stats.connection_refusals,
        elapsed.as_millis(),
        errors.len()
    );
    assert_eq!(errors.len(), 1, "logged when it first appears: {errors:?}");
    assert!(errors[0].contains("return code 4"), "{errors:?}");
    assert!(
        !logs.lines().iter().any(|line| line.contains("wrong")),
        "the password never appears in the log"
    );
    // Backoff, not a hot loop: the delays grow from 100 ms to 1 s.
    let fastest = elapsed.as_millis() / 100 + 1;
    assert!(
        u128::from(stats.connection_refusals) <= fastest,
        "{} attempts in {elapsed:?}",
        stats.connection_refusals
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_started_before_its_broker_is_ready_within_10_s_of_it() {
    let mut broker = TestBroker::start().await;
    if broker.stop().await.is_err() {
        eprintln!("skipped: needs mosquitto, which can be stopped and started");
        return;
    }
    // The service's defaults: 0.5 s to 5 s between attempts.
    let cfg = Config::new(&broker.url())
        .unwrap()
        .with_client_id(support::unique_id("early"));
    let running = tower_mqtt::serve(
        cfg,
        Router::new().route("early/#", |_: Request<Envelope>| std::future::ready(())),
    )
    .spawn()
    .unwrap();
    // Until the backoff has grown towards its cap.
    tokio::time::timeout(Duration::from_secs(30), async {
        while running.stats().connection_failures < 4 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the service kept trying");
    broker.restart().await.expect("start mosquitto");
    let up = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), running.ready())
        .await
        .expect("ready within 10 s of the broker starting")
        .expect("subscribed");
    eprintln!(
        "FIGURES broker after service: ready_after_broker_ms={} failed_attempts={}",
        up.elapsed().as_millis(),
        running.stats().connection_failures
    );
    running.shutdown().await;
}
