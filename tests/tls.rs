//! TLS against real brokers with certificates made by the test: mosquitto's
//! TLS listeners (server-verified and mTLS), a rustls front that requires an
//! ALPN protocol the way AWS IoT Core does on port 443, and MQTT over
//! WebSockets (`ws://`, `wss://`) against rumqttd's WebSocket listener, since
//! Debian 12's mosquitto has none.
//!
//! A working connection is proven by a message that goes from the service's
//! publisher through the broker to its own handler. A refused one by the
//! connection state's reason, which must carry rustls' words, and by an ERROR
//! log line that names the broker.

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use serde_json::json;
use support::{ClientCerts, File, Leaf, Mosquitto, Pki, TlsFront, WsBroker};
use tokio::sync::mpsc;
use tower_mqtt::{config::Config, ConnectionState, Envelope, Request, Router};

/// How long a connection, a refusal or a message may take.
const WAIT: Duration = Duration::from_secs(15);

/// Every log line of this test binary, at DEBUG and above.
fn logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer = Capture(buffer.clone());
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .try_init();
        buffer
    })
}

#[derive(Clone)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The ERROR lines logged about `broker`.
fn errors_about(broker: &str) -> Vec<String> {
    let logs = logs().lock().unwrap_or_else(PoisonError::into_inner);
    String::from_utf8_lossy(&logs)
        .lines()
        .filter(|line| line.contains("ERROR") && line.contains(&format!("broker={broker}")))
        .map(str::to_owned)
        .collect()
}

fn config(url: &str) -> Config {
    logs();
    support::service_config(url, "tls-test")
        .with_reconnect_delays(Duration::from_millis(200), Duration::from_secs(1))
}

/// Serves `config` until one message has gone round through the broker
/// (`Ok`), or the first connection attempt failed (`Err` with the reason the
/// connection state gives).
async fn round_trip(config: Config) -> Result<(), String> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let router = Router::new().route("tls/echo", move |req: Request<Envelope>| {
        let _ = tx.send(req.body().data()["n"].clone());
        std::future::ready(())
    });
    let running = tower_mqtt::serve(config, router)
        .spawn()
        .map_err(|error| format!("configuration: {error}"))?;
    let mut state = running.state();
    let outcome = tokio::time::timeout(WAIT, async {
        let state = state
            .wait_for(|s| {
                matches!(
                    s,
                    ConnectionState::Connected { .. } | ConnectionState::Disconnected { .. }
                )
            })
            .await
            .expect("the client runs")
            .clone();
        if let ConnectionState::Disconnected { reason, .. } = state {
            return Err(reason);
        }
        running
            .ready()
            .await
            .map_err(|error| format!("not ready: {error}"))?;
        running
            .publisher()
            .publish("tls/echo", json!({ "n": 7 }))
            .await
            .map_err(|error| format!("publish: {error}"))?;
        match rx.recv().await {
            Some(n) if n == 7 => Ok(()),
            other => Err(format!("the handler saw {other:?}")),
        }
    })
    .await
    .unwrap_or_else(|_| Err("neither connected nor refused in time".to_owned()));
    running.shutdown().await;
    outcome
}

async fn mosquitto(pki: &Pki, leaf: Leaf, client_certs: ClientCerts) -> Mosquitto {
    Mosquitto::start_with_config(&pki.mosquitto_listener(leaf, client_certs)).await
}

/// Asserts that `result` is a refusal whose reason has every one of `words`,
/// and that an ERROR line named the broker with the same reason.
fn assert_refused(result: Result<(), String>, broker: &str, words: &[&str]) {
    let reason = match result {
        Ok(()) => panic!("{broker}: connected, but should have been refused"),
        Err(reason) => reason,
    };
    for word in words {
        assert!(
            reason.contains(word),
            "{broker}: {word:?} not in {reason:?}"
        );
    }
    let errors = errors_about(broker);
    assert!(
        errors
            .iter()
            .any(|line| words.iter().all(|w| line.contains(w))),
        "{broker}: no ERROR line with {words:?}; ERROR lines: {errors:#?}"
    );
}

#[tokio::test]
async fn a_trusted_ca_by_host_name_and_by_ip_address() {
    let pki = Pki::generate();
    let broker = mosquitto(&pki, Leaf::Server, ClientCerts::None).await;
    for host in ["localhost", "127.0.0.1"] {
        let url = format!("mqtts://{host}:{}", broker.port());
        let result = round_trip(config(&url).with_ca_file(pki.path(File::Ca))).await;
        assert_eq!(result, Ok(()), "{url}\n{}", broker.log());
    }
}

#[tokio::test]
async fn the_system_roots_alone_refuse_a_private_ca() {
    let pki = Pki::generate();
    let broker = mosquitto(&pki, Leaf::Server, ClientCerts::None).await;
    let url = format!("mqtts://localhost:{}", broker.port());
    let result = round_trip(config(&url)).await;
    if let Err(reason) = &result {
        if reason.contains("MQTT_CA_FILE is not set") {
            assert!(!support::on_ci(), "CI must have the system store: {reason}");
            eprintln!("skipped: the system store is empty here ({reason})");
            return;
        }
    }
    assert_refused(
        result,
        &format!("mqtts://localhost:{}", broker.port()),
        &["TLS with", "invalid peer certificate", "UnknownIssuer"],
    );
}

#[tokio::test]
async fn a_rogue_ca_is_refused() {
    let pki = Pki::generate();
    let broker = mosquitto(&pki, Leaf::Server, ClientCerts::None).await;
    let url = format!("mqtts://localhost:{}", broker.port());
    let result = round_trip(config(&url).with_ca_file(pki.path(File::RogueCa))).await;
    assert_refused(result, &url, &["UnknownIssuer", "MQTT_CA_FILE"]);
}

#[tokio::test]
async fn a_certificate_for_another_host_is_refused() {
    let pki = Pki::generate();
    let broker = mosquitto(&pki, Leaf::OtherHost, ClientCerts::None).await;
    let url = format!("mqtts://localhost:{}", broker.port());
    let result = round_trip(config(&url).with_ca_file(pki.path(File::Ca))).await;
    assert_refused(
        result,
        &url,
        &["not valid for name", "not for the host name"],
    );
}

#[tokio::test]
async fn mtls_without_a_client_certificate_is_refused() {
    let pki = Pki::generate();
    let broker = mosquitto(&pki, Leaf::Server, ClientCerts::Required).await;
    let url = format!("mqtts://localhost:{}", broker.port());
    let result = round_trip(config(&url).with_ca_file(pki.path(File::Ca))).await;
    assert_refused(result, &url, &["TLS with", "received fatal alert"]);
}

#[tokio::test]
async fn mtls_with_a_good_client_certificate_works() {
    let pki = Pki::generate();
    let broker = mosquitto(&pki, Leaf::Server, ClientCerts::Required).await;
    let url = format!("mqtts://localhost:{}", broker.port());
    let config = config(&url)
        .with_ca_file(pki.path(File::Ca))
        .with_client_auth(pki.path(File::ClientCert), pki.path(File::ClientKey));
    assert_eq!(round_trip(config).await, Ok(()), "{}", broker.log());
}

#[tokio::test]
async fn mtls_with_a_client_certificate_from_a_rogue_ca_is_refused() {
    let pki = Pki::generate();
    let broker = mosquitto(&pki, Leaf::Server, ClientCerts::Required).await;
    let url = format!("mqtts://localhost:{}", broker.port());
    let config = config(&url)
        .with_ca_file(pki.path(File::Ca))
        .with_client_auth(
            pki.path(File::RogueClientCert),
            pki.path(File::RogueClientKey),
        );
    assert_refused(
        round_trip(config).await,
        &url,
        &[
            "TLS with",
            "received fatal alert",
            "refused the client certificate",
        ],
    );
}

/// AWS IoT Core's MQTT on port 443: a client certificate and the ALPN protocol
/// `x-amzn-mqtt-ca`, from the variables alone.
#[tokio::test]
async fn alpn_and_a_client_certificate_like_aws_iot_core() {
    let pki = Pki::generate();
    let broker = Mosquitto::start().await;
    let front = TlsFront::start(
        broker.addr(),
        pki.front_config(ClientCerts::Required, &[b"x-amzn-mqtt-ca"]),
    )
    .await;
    let url = format!("mqtts://localhost:{}", front.port());
    let vars = [
        ("MQTT_URL", url.clone()),
        ("MQTT_CA_FILE", pki.var(File::Ca)),
        ("MQTT_CLIENT_CERT_FILE", pki.var(File::ClientCert)),
        ("MQTT_CLIENT_KEY_FILE", pki.var(File::ClientKey)),
        ("MQTT_TLS_ALPN", "x-amzn-mqtt-ca".to_owned()),
        ("MQTT_RECONNECT_MIN_DELAY", "0.2".to_owned()),
    ];
    let config = Config::from_lookup(lookup(&vars)).unwrap();
    assert_eq!(round_trip(config).await, Ok(()));
    let seen = front.seen();
    assert_eq!(seen[0].alpn.as_deref(), Some(&b"x-amzn-mqtt-ca"[..]));
    assert!(seen[0].client_cert);

    // Without the protocol the front refuses the handshake, and says why.
    let config = Config::from_lookup(lookup(&vars[..5]))
        .unwrap()
        .with_reconnect_delays(Duration::from_millis(200), Duration::from_secs(1));
    let config = config.with_lookup(|name| (name == "MQTT_TLS_ALPN").then(|| "mqtt".to_owned()));
    assert_refused(
        round_trip(config.unwrap()).await,
        &url,
        &["NoApplicationProtocol", "MQTT_TLS_ALPN"],
    );
}

/// The variables as a lookup, as `Config::from_env` reads them.
fn lookup(vars: &[(&'static str, String)]) -> impl Fn(&str) -> Option<String> {
    let vars = vars.to_vec();
    move |name| {
        vars.iter()
            .find(|(var, _)| *var == name)
            .map(|(_, value)| value.clone())
    }
}

#[tokio::test]
async fn plain_websocket_with_a_path() {
    let broker = WsBroker::start().await;
    let url = format!("ws://127.0.0.1:{}/mqtt", broker.ws_port());
    assert_eq!(round_trip(config(&url)).await, Ok(()));
    // The same broker over TCP sees what went over the WebSocket.
    assert_eq!(round_trip(config(&broker.tcp_url())).await, Ok(()));
}

/// `wss://` through a TLS front, as a WebSocket broker behind a proxy is
/// reached: the CA file and the host name check apply as for `mqtts://`.
#[tokio::test]
async fn secure_websocket_through_a_tls_front() {
    let pki = Pki::generate();
    let broker = WsBroker::start().await;
    let front = TlsFront::start(broker.ws_addr(), pki.front_config(ClientCerts::None, &[])).await;
    let url = format!("wss://localhost:{}/mqtt", front.port());
    let result = round_trip(config(&url).with_ca_file(pki.path(File::Ca))).await;
    assert_eq!(result, Ok(()));
    let line = front.seen()[0].first_line.clone();
    assert_eq!(line.as_deref(), Some("GET /mqtt HTTP/1.1"));

    let result = round_trip(config(&url).with_ca_file(pki.path(File::RogueCa))).await;
    assert_refused(result, &url, &["TLS with", "UnknownIssuer"]);
}

/// The variable that marks the child process of
/// `a_service_configured_only_by_the_environment_connects_over_mtls`.
const CHILD: &str = "TOWER_MQTT_TLS_TEST_CHILD";

/// A service that starts with `Config::from_env()` then `serve` connects over
/// mTLS with only the variables set: the service runs in a process of its
/// own (this test binary again), whose environment holds nothing else.
#[tokio::test]
async fn a_service_configured_only_by_the_environment_connects_over_mtls() {
    let pki = Pki::generate();
    let broker = mosquitto(&pki, Leaf::Server, ClientCerts::Required).await;
    let child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "service_from_env", "--ignored", "--nocapture"])
        .env_clear()
        .env(CHILD, "1")
        .env("MQTT_URL", format!("mqtts://localhost:{}", broker.port()))
        .env("MQTT_CA_FILE", pki.var(File::Ca))
        .env("MQTT_CLIENT_CERT_FILE", pki.var(File::ClientCert))
        .env("MQTT_CLIENT_KEY_FILE", pki.var(File::ClientKey))
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(WAIT * 2, child)
        .await
        .expect("the service finished in time")
        .expect("the service ran");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "{stdout}\n{}\n{}",
        String::from_utf8_lossy(&output.stderr),
        broker.log()
    );
}

/// The service of the test above; only meaningful in its child process.
#[tokio::test]
#[ignore = "run by a_service_configured_only_by_the_environment_connects_over_mtls"]
async fn service_from_env() {
    assert!(
        std::env::var_os(CHILD).is_some(),
        "run by another test only"
    );
    let config = Config::from_env().expect("the configuration from the environment");
    round_trip(config)
        .await
        .expect("a message went round over mTLS");
}
