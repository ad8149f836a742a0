//! Credentials from the variables, a password file read again at every
//! connect, and the promise that the password appears in no output: every
//! line this process logs, at TRACE and from every crate (rumqttc and rustls
//! log through `log`, bridged here), is searched for the secrets.
//!
//! One test, because it owns the process-wide log subscriber.

mod support;

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde_json::json;
use support::{find_binary, ClientCerts, File, Leaf, Mosquitto, Pki};
use tokio::sync::{mpsc, watch};
use tower_mqtt::{config::Config, ConnectionState, Envelope, Request, Router, Running};

const WAIT: Duration = Duration::from_secs(15);
const USER: &str = "svc";
/// Markers that appear nowhere unless a password leaks.
const FIRST: &str = "Pw1-first-7c1e9b";
const SECOND: &str = "Pw2-rotated-d04a52";
const WRONG: &str = "Pw3-wrong-5f88aa";

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

/// Sets the broker's password for [`USER`].
fn broker_password(file: &Path, password: &str) {
    let tool = find_binary("mosquitto_passwd").expect("mosquitto_passwd (package mosquitto)");
    let status = Command::new(tool)
        .arg("-b")
        .arg(file)
        .args([USER, password])
        .status()
        .expect("run mosquitto_passwd");
    assert!(status.success());
}

async fn wait_state(
    state: &mut watch::Receiver<ConnectionState>,
    what: &str,
    accept: impl Fn(&ConnectionState) -> bool,
) -> ConnectionState {
    tokio::time::timeout(WAIT, state.wait_for(|s| accept(s)))
        .await
        .unwrap_or_else(|_| panic!("{what}: not in time"))
        .expect("the client runs")
        .clone()
}

async fn echo(running: &Running, rx: &mut mpsc::UnboundedReceiver<u64>, n: u64) {
    tokio::time::timeout(WAIT, running.ready())
        .await
        .expect("ready in time")
        .expect("subscribed");
    running
        .publisher()
        .publish("cred/echo", json!({ "n": n }))
        .await
        .expect("published");
    let seen = tokio::time::timeout(WAIT, rx.recv()).await.expect("echoed");
    assert_eq!(seen, Some(n));
}

#[tokio::test]
#[allow(clippy::too_many_lines)] // one story: connect, rotate, lose the file, get it back
async fn a_password_file_is_read_at_every_connect_and_never_printed() {
    if find_binary("mosquitto").is_none() {
        assert!(!support::on_ci(), "CI must run against mosquitto");
        eprintln!("skipped: needs mosquitto (apt-get install mosquitto)");
        return;
    }
    let logs = Arc::new(Mutex::new(Vec::new()));
    let writer = Capture(logs.clone());
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .try_init()
        .expect("the only subscriber of this test binary");

    let dir = tempfile::tempdir().unwrap();
    let broker_file = dir.path().join("passwd");
    std::fs::write(&broker_file, "").unwrap();
    broker_password(&broker_file, FIRST);
    // Over TLS, so that rustls' own TRACE output is searched too.
    let pki = Pki::generate();
    let mut broker = Mosquitto::start_with_config(&format!(
        "{}allow_anonymous false\npassword_file {}\n",
        pki.mosquitto_listener(Leaf::Server, ClientCerts::None),
        broker_file.display()
    ))
    .await;
    let secret = dir.path().join("mqtt-password");
    std::fs::write(&secret, format!("{FIRST}\n")).unwrap();
    let secret_var = secret.display().to_string();

    let vars = [
        ("MQTT_URL", format!("mqtts://localhost:{}", broker.port())),
        ("MQTT_CA_FILE", pki.var(File::Ca)),
        ("MQTT_USERNAME", USER.to_owned()),
        ("MQTT_PASSWORD_FILE", secret_var.clone()),
        ("MQTT_CLIENT_ID", support::unique_id("cred")),
        ("MQTT_RECONNECT_MIN_DELAY", "0.1".to_owned()),
        ("MQTT_RECONNECT_MAX_DELAY", "0.5".to_owned()),
    ];
    let config = Config::from_lookup(|name| {
        vars.iter()
            .find(|(var, _)| *var == name)
            .map(|(_, value)| value.clone())
    })
    .unwrap();
    let mut shown = vec![format!("{config:?}")];
    let (tx, mut rx) = mpsc::unbounded_channel();
    let router = Router::new().route("cred/echo", move |req: Request<Envelope>| {
        let _ = tx.send(req.body().data()["n"].as_u64().unwrap_or_default());
        std::future::ready(())
    });
    let running = tower_mqtt::serve(config, router).spawn().unwrap();
    let mut state = running.state();
    echo(&running, &mut rx, 1).await;

    // The secret is rotated on both sides; the next connect reads the new one.
    broker_password(&broker_file, SECOND);
    std::fs::write(&secret, SECOND).unwrap();
    broker.restart().await;
    wait_state(&mut state, "reconnected after the rotation", |s| {
        s.is_connected()
    })
    .await;
    echo(&running, &mut rx, 2).await;

    // The file disappears: the attempt fails, says which variable and file, and
    // the client keeps trying with its backoff until the file is back.
    std::fs::remove_file(&secret).unwrap();
    broker.restart().await;
    let lost = wait_state(&mut state, "the unreadable file reported", |s| {
        matches!(s, ConnectionState::Disconnected { reason, .. } if reason.contains("MQTT_PASSWORD_FILE"))
    })
    .await;
    shown.push(format!("{lost:?}"));
    let ConnectionState::Disconnected { reason, .. } = &lost else {
        unreachable!()
    };
    assert!(reason.contains(&secret_var), "{reason}");
    std::fs::write(&secret, format!("{SECOND}\n")).unwrap();
    wait_state(&mut state, "connected once the file is back", |s| {
        s.is_connected()
    })
    .await;
    echo(&running, &mut rx, 3).await;

    // A wrong password is refused by the broker, and said so.
    std::fs::write(&secret, WRONG).unwrap();
    broker.restart().await;
    let refused = wait_state(
        &mut state,
        "the refused login reported",
        |s| matches!(s, ConnectionState::Disconnected { reason, .. } if reason.contains("refused")),
    )
    .await;
    shown.push(format!("{refused:?}"));
    let report = running.shutdown().await;
    shown.push(format!("{report:?}"));

    let logs =
        String::from_utf8_lossy(&logs.lock().unwrap_or_else(PoisonError::into_inner)).into_owned();
    // The capture works: rustls' TRACE lines (through `log`) are there, and so
    // are the errors above.
    assert!(
        logs.lines()
            .any(|l| l.contains("TRACE") && l.contains("rustls")),
        "nothing at TRACE was captured"
    );
    let errors: Vec<&str> = logs.lines().filter(|l| l.contains(" ERROR ")).collect();
    assert!(
        errors
            .iter()
            .any(|l| l.contains("MQTT_PASSWORD_FILE") && l.contains(&secret_var)),
        "no ERROR names the variable and the file: {errors:#?}"
    );
    assert!(
        errors.iter().any(|l| l.contains("refused")),
        "no ERROR for the refused login: {errors:#?}"
    );
    for secret in [FIRST, SECOND, WRONG] {
        assert!(!logs.contains(secret), "{secret} was logged");
        for text in &shown {
            assert!(!text.contains(secret), "{secret} shown in {text}");
        }
    }
}
