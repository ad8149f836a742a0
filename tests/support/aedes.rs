//! aedes (the npm MQTT broker, run by node) as a third test broker.
//!
//! The script is `tests/support/aedes/broker.js`; its packages are pinned by the
//! `package-lock.json` beside it and installed with `npm ci` there (`.ci/run` does it).
//! aedes speaks MQTT 3.1.1 (and 3.1) only. Each [`Aedes`] is one node process on
//! free loopback ports chosen by the OS; sessions are kept in memory, so they survive a
//! reconnect but not [`kill`](Aedes::kill).
//!
//! What aedes can do that the other test brokers cannot: refuse a subscription (the
//! client sees SUBACK 0x80; mosquitto 2.0.11 grants ACL-denied filters and rumqttd has
//! no per-filter refusal), and serve MQTT over WebSocket.
//!
//! ```ignore
//! let Some(aedes) = Aedes::try_start_with(
//!     AedesOptions::new().deny("secret/#").login("svc", "s3cret").websocket(),
//! ).await else { return };
//! let url = aedes.url();       // mqtt://127.0.0.1:<port>
//! let ws = aedes.ws_url();     // ws://127.0.0.1:<port>/
//! ```
//!
//! All waits use real time with bounded deadlines; do not drive these helpers from a test
//! with paused tokio time.

use std::fs::{self, File};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::mosquitto::{find_binary, on_ci, HOST};

/// How long node may take to load aedes and listen.
const START_DEADLINE: Duration = Duration::from_secs(10);
/// Polling interval while waiting for the readiness line.
const POLL: Duration = Duration::from_millis(10);
/// The line `broker.js` prints once it listens.
const READY: &str = "aedes ready ";
const LOG_FILE: &str = "aedes.log";

/// How to start aedes: refused filters, a required login, a WebSocket listener.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct AedesOptions {
    deny: Vec<String>,
    login: Option<(String, String)>,
    websocket: bool,
}

impl AedesOptions {
    /// Anonymous, every subscription granted, TCP only.
    pub(crate) fn new() -> AedesOptions {
        AedesOptions::default()
    }

    /// Refuses a SUBSCRIBE entry whose filter is exactly `filter` (string equality,
    /// not topic matching): the SUBACK carries 0x80 for it and grants the others.
    pub(crate) fn deny(mut self, filter: impl Into<String>) -> AedesOptions {
        self.deny.push(filter.into());
        self
    }

    /// Requires this user name and password; anything else gets CONNACK return code 4
    /// ("bad user name or password").
    pub(crate) fn login(
        mut self,
        username: impl Into<String>,
        password: impl Into<String>,
    ) -> AedesOptions {
        self.login = Some((username.into(), password.into()));
        self
    }

    /// Also listens for MQTT over WebSocket ([`Aedes::ws_url`]).
    pub(crate) fn websocket(mut self) -> AedesOptions {
        self.websocket = true;
        self
    }

    fn args(&self) -> Vec<String> {
        let mut args = vec![String::from("--port"), String::from("0")];
        if self.websocket {
            args.extend([String::from("--ws-port"), String::from("0")]);
        }
        for filter in &self.deny {
            args.extend([String::from("--deny"), filter.clone()]);
        }
        if let Some((username, password)) = &self.login {
            args.extend([
                String::from("--username"),
                username.clone(),
                String::from("--password"),
                password.clone(),
            ]);
        }
        args
    }
}

/// An aedes process owned by one test. Dropping it kills the process.
pub(crate) struct Aedes {
    dir: TempDir,
    child: Option<Child>,
    /// Held open: `broker.js` exits when its stdin closes, so a test binary that dies
    /// without running destructors leaves no broker behind.
    stdin: Option<ChildStdin>,
    port: u16,
    ws_port: Option<u16>,
    version: String,
}

impl Aedes {
    /// Starts aedes with default options and waits until it listens.
    ///
    /// # Panics
    ///
    /// If node or the aedes packages are missing, or aedes does not come up within
    /// 10 s (the message carries its log).
    pub(crate) async fn start() -> Aedes {
        Self::start_with(AedesOptions::new()).await
    }

    /// Like [`Aedes::start`], with options.
    pub(crate) async fn start_with(options: AedesOptions) -> Aedes {
        match installed() {
            Ok(install) => Self::launch(&install, &options).await,
            Err(reason) => panic!("aedes is not available: {reason}"),
        }
    }

    /// Starts aedes if node and the aedes packages are installed.
    ///
    /// Returns `None` (after printing why) when they are not, so a test can skip; on CI
    /// (env `CI` non-empty) that panics instead.
    pub(crate) async fn try_start() -> Option<Aedes> {
        Self::try_start_with(AedesOptions::new()).await
    }

    /// Like [`Aedes::try_start`], with options.
    pub(crate) async fn try_start_with(options: AedesOptions) -> Option<Aedes> {
        match installed() {
            Ok(install) => Some(Self::launch(&install, &options).await),
            Err(reason) => {
                skip_without_aedes(&reason);
                None
            }
        }
    }

    async fn launch(install: &Install, options: &AedesOptions) -> Aedes {
        let dir = tempfile::Builder::new()
            .prefix("tower-mqtt-aedes-")
            .tempdir()
            .expect("create a temporary directory for aedes");
        let log = File::create(dir.path().join(LOG_FILE)).expect("create aedes.log");
        let mut child = Command::new(&install.node)
            .arg(install.dir.join("broker.js"))
            .args(options.args())
            .current_dir(&install.dir)
            .stdin(Stdio::piped())
            .stdout(log.try_clone().expect("clone the log file handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|err| panic!("spawn {}: {err}", install.node.display()));
        let stdin = child.stdin.take();
        let mut aedes = Aedes {
            dir,
            child: Some(child),
            stdin,
            port: 0,
            ws_port: None,
            version: String::new(),
        };
        aedes.wait_ready().await;
        aedes
    }

    /// Waits for the readiness line, then for the listener to accept.
    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if let Some(line) = self.log().lines().find(|line| line.starts_with(READY)) {
                self.parse_ready(line);
                if TcpStream::connect_timeout(&self.addr(), Duration::from_millis(200)).is_ok() {
                    return;
                }
            }
            if !self.is_running() {
                self.fail("it exited");
            }
            if Instant::now() > deadline {
                self.fail(&format!("not ready after {START_DEADLINE:?}"));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Reads `aedes ready version=V mqtt=HOST:PORT [ws=HOST:PORT]`.
    fn parse_ready(&mut self, line: &str) {
        let port_of = |value: &str| -> u16 {
            value
                .rsplit_once(':')
                .and_then(|(_, port)| port.parse().ok())
                .unwrap_or_else(|| panic!("bad aedes readiness line {line:?}"))
        };
        for field in line[READY.len()..].split(' ') {
            match field.split_once('=') {
                Some(("version", version)) => version.clone_into(&mut self.version),
                Some(("mqtt", addr)) => self.port = port_of(addr),
                Some(("ws", addr)) => self.ws_port = Some(port_of(addr)),
                _ => {}
            }
        }
    }

    fn fail(&mut self, why: &str) -> ! {
        self.kill();
        panic!("aedes did not start: {why}\n--- log ---\n{}", self.log());
    }

    /// `mqtt://127.0.0.1:<port>`.
    pub(crate) fn url(&self) -> String {
        format!("mqtt://{HOST}:{}", self.port)
    }

    /// The MQTT (TCP) port.
    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// The MQTT listening address, for [`Proxy::start`](super::Proxy::start).
    pub(crate) fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// `ws://127.0.0.1:<port>/`, MQTT over WebSocket (any path is accepted).
    ///
    /// # Panics
    ///
    /// If aedes was started without [`AedesOptions::websocket`].
    #[track_caller]
    pub(crate) fn ws_url(&self) -> String {
        let port = self
            .ws_port
            .expect("aedes was started without AedesOptions::websocket()");
        format!("ws://{HOST}:{port}/")
    }

    /// The WebSocket port, if enabled.
    pub(crate) fn ws_port(&self) -> Option<u16> {
        self.ws_port
    }

    /// The aedes version that runs (from its package.json).
    pub(crate) fn version(&self) -> &str {
        &self.version
    }

    /// Whether the node process is alive.
    pub(crate) fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills the process with SIGKILL; its sessions and queued messages are gone.
    /// Does nothing if it is not running.
    pub(crate) fn kill(&mut self) {
        self.stdin = None;
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// What the broker logged (connections, subscriptions, refusals, errors), for
    /// assertion messages.
    pub(crate) fn log(&self) -> String {
        fs::read(self.dir.path().join(LOG_FILE))
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }
}

impl Drop for Aedes {
    fn drop(&mut self) {
        self.kill();
    }
}

impl std::fmt::Debug for Aedes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Aedes")
            .field("version", &self.version)
            .field("port", &self.port)
            .field("ws_port", &self.ws_port)
            .field("pid", &self.child.as_ref().map(Child::id))
            .finish_non_exhaustive()
    }
}

/// Where node and the installed script are.
struct Install {
    node: PathBuf,
    dir: PathBuf,
}

/// Finds node and the `npm ci`-installed aedes, or says what is missing.
fn installed() -> Result<Install, String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/aedes");
    let node = find_binary("node")
        .ok_or_else(|| String::from("`node` not found on PATH (apt-get install nodejs npm)"))?;
    if !dir.join("node_modules/aedes/package.json").is_file() {
        return Err(format!(
            "the aedes packages are not installed (run `npm ci` in {})",
            dir.display()
        ));
    }
    Ok(Install { node, dir })
}

/// Whether aedes can be started here; the reason if not.
pub(crate) fn aedes_available() -> Result<(), String> {
    installed().map(|_| ())
}

/// Prints why aedes is unavailable; panics on CI, which must run against it.
pub(crate) fn skip_without_aedes(reason: &str) {
    assert!(!on_ci(), "CI must run against aedes: {reason}");
    eprintln!("skipping aedes: {reason}");
}
