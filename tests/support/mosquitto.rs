//! A real mosquitto 2.x process per test, on a free loopback port.
//!
//! Each [`Mosquitto`] owns a temporary directory holding its generated config, its
//! persistence database and its log, so it can be stopped, killed and restarted on the
//! same port without touching any other broker (in particular not the system-wide one on
//! port 1883).
//!
//! ```ignore
//! let mut broker = Mosquitto::start().await;
//! let mut probe = Probe::subscribe(&broker.url(), "t/#").await;
//! broker.restart().await; // same port, sessions kept (graceful stop writes persistence)
//! ```
//!
//! All waits use real time (`std::time::Instant` deadlines); do not drive these helpers
//! from a test with paused tokio time.

use std::fmt::Write as _;
use std::fs::{self, OpenOptions};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// The loopback address every test broker listens on.
pub(crate) const HOST: &str = "127.0.0.1";

/// How long a broker may take to accept TCP after being spawned.
const START_DEADLINE: Duration = Duration::from_secs(10);
/// How long a broker may take to exit after SIGTERM before it is killed.
const STOP_DEADLINE: Duration = Duration::from_secs(10);
/// Polling interval while waiting for a process or a port.
const POLL: Duration = Duration::from_millis(10);
/// Fresh-port attempts when a picked port was taken before mosquitto could bind it.
const PORT_ATTEMPTS: usize = 5;

const CONFIG_FILE: &str = "mosquitto.conf";
const LOG_FILE: &str = "mosquitto.log";
const OUTPUT_FILE: &str = "mosquitto.out";

/// A mosquitto process owned by one test. Dropping it kills the process.
pub(crate) struct Mosquitto {
    bin: PathBuf,
    dir: TempDir,
    port: u16,
    child: Option<Child>,
}

impl Mosquitto {
    /// Starts a broker and waits until it accepts TCP.
    ///
    /// # Panics
    ///
    /// If no `mosquitto` binary exists, or the broker does not come up within 10 s (the
    /// message carries the broker log).
    pub(crate) async fn start() -> Mosquitto {
        Self::start_with_config("").await
    }

    /// Like [`Mosquitto::start`], with `extra` appended to the generated config (for
    /// example `"max_inflight_messages 1\n"`).
    pub(crate) async fn start_with_config(extra: &str) -> Mosquitto {
        let bin = find_binary("mosquitto").unwrap_or_else(|| panic!("{}", missing("mosquitto")));
        Self::launch(bin, extra).await
    }

    /// Starts a broker if a `mosquitto` binary exists.
    ///
    /// Returns `None` (after printing why) when there is none, so a test can skip; on CI
    /// (env `CI` non-empty) a missing binary panics instead, because CI must run against
    /// mosquitto.
    pub(crate) async fn try_start() -> Option<Mosquitto> {
        let Some(bin) = find_binary("mosquitto") else {
            skip_without("mosquitto");
            return None;
        };
        Some(Self::launch(bin, "").await)
    }

    async fn launch(bin: PathBuf, extra: &str) -> Mosquitto {
        let dir = tempfile::Builder::new()
            .prefix("tower-mqtt-mosquitto-")
            .tempdir()
            .expect("create a temporary directory for mosquitto");
        let mut broker = Mosquitto {
            bin,
            dir,
            port: 0,
            child: None,
        };
        for _ in 0..PORT_ATTEMPTS {
            broker.port = free_port();
            broker.write_config(extra);
            match broker.spawn_and_wait().await {
                Ok(()) => return broker,
                // Another process took the port between our probe and mosquitto's bind.
                Err(StartError::AddrInUse) => {}
                Err(err) => broker.fail(&err),
            }
        }
        panic!(
            "mosquitto could not bind a free port in {PORT_ATTEMPTS} attempts\n{}",
            broker.log()
        );
    }

    /// `mqtt://127.0.0.1:<port>`.
    pub(crate) fn url(&self) -> String {
        format!("mqtt://{HOST}:{}", self.port)
    }

    /// The port the broker listens on (kept across restarts).
    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// Always `127.0.0.1`.
    // A method like `url()` and `port()`, so callers need not know it is constant.
    #[allow(clippy::unused_self)]
    pub(crate) fn host(&self) -> &'static str {
        HOST
    }

    /// The listening socket address, for [`Proxy::start`](super::Proxy::start).
    pub(crate) fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// The directory holding the config, the persistence database and the log.
    pub(crate) fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Whether the broker process is alive.
    pub(crate) fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Stops the broker gracefully (SIGTERM, then waits for exit), so mosquitto writes its
    /// persistence database. Does nothing if it is not running.
    ///
    /// # Panics
    ///
    /// If the signal cannot be sent. A broker still alive after 10 s is killed with a
    /// printed warning.
    pub(crate) async fn stop(&mut self) {
        let Some(child) = &mut self.child else { return };
        if child.try_wait().ok().flatten().is_none() {
            let status = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()
                .expect("run `kill -TERM`");
            assert!(status.success(), "`kill -TERM {}` failed", child.id());
            let deadline = Instant::now() + STOP_DEADLINE;
            while child.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    eprintln!("mosquitto ignored SIGTERM for {STOP_DEADLINE:?}; killing it");
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                tokio::time::sleep(POLL).await;
            }
        }
        self.child = None;
    }

    /// Kills the broker with SIGKILL, like a crash: state changed since the last autosave
    /// is lost. Does nothing if it is not running.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the broker gracefully if it runs, then starts it again on the same port with
    /// the same config and persistence directory, and waits until it accepts TCP.
    ///
    /// # Panics
    ///
    /// If the broker does not come back within 10 s (the message carries the log).
    pub(crate) async fn restart(&mut self) {
        self.stop().await;
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            match self.spawn_and_wait().await {
                Ok(()) => return,
                // The old socket may linger briefly; mosquitto sets SO_REUSEADDR, so this
                // is rare, but retrying the same port is the contract.
                Err(StartError::AddrInUse) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(err) => self.fail(&err),
            }
        }
    }

    /// The broker log (every run of this broker, `log_type all`), followed by anything the
    /// process wrote to stdout/stderr.
    pub(crate) fn log(&self) -> String {
        let mut text = read_lossy(&self.dir.path().join(LOG_FILE));
        let output = read_lossy(&self.dir.path().join(OUTPUT_FILE));
        if !output.trim().is_empty() {
            let _ = write!(text, "\n--- mosquitto stdout/stderr ---\n{output}");
        }
        text
    }

    fn write_config(&self, extra: &str) {
        let dir = self.dir.path().display();
        let config = format!(
            "# generated by tests/support/mosquitto.rs\n\
             listener {port} {HOST}\n\
             allow_anonymous true\n\
             persistence true\n\
             persistence_location {dir}/\n\
             log_dest file {dir}/{LOG_FILE}\n\
             log_type all\n\
             log_timestamp_format %H:%M:%S\n\
             max_queued_messages 10000\n\
             set_tcp_nodelay true\n\
             # Running as root, mosquitto would switch to the `mosquitto` user, which cannot\n\
             # write this directory; as any other user the setting has no effect.\n\
             user root\n\
             {extra}\n",
            port = self.port,
        );
        fs::write(self.dir.path().join(CONFIG_FILE), config).expect("write mosquitto.conf");
    }

    async fn spawn_and_wait(&mut self) -> Result<(), StartError> {
        let runs_before = self.runs_logged();
        let output = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(OUTPUT_FILE))
            .expect("open mosquitto output file");
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(self.dir.path().join(CONFIG_FILE))
            .stdin(Stdio::null())
            .stdout(output.try_clone().expect("clone output file handle"))
            .stderr(output)
            .spawn()
            .map_err(|err| StartError::Spawn(err.to_string()))?;
        self.child = Some(child);

        let deadline = Instant::now() + START_DEADLINE;
        loop {
            let exited = self
                .child
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.child = None;
                return Err(if self.log().contains("Address already in use") {
                    StartError::AddrInUse
                } else {
                    StartError::Exited(status)
                });
            }
            // The log line proves that *our* process bound the port; the connect proves
            // that the listener accepts.
            if self.runs_logged() > runs_before
                && TcpStream::connect_timeout(&self.addr(), Duration::from_millis(200)).is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(StartError::Timeout);
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// How many times the log says "mosquitto version X running".
    fn runs_logged(&self) -> usize {
        read_lossy(&self.dir.path().join(LOG_FILE))
            .lines()
            .filter(|line| line.contains("mosquitto version") && line.ends_with(" running"))
            .count()
    }

    fn fail(&mut self, err: &StartError) -> ! {
        self.kill();
        panic!(
            "mosquitto on port {} did not start: {err}\n--- config ---\n{}\n--- log ---\n{}",
            self.port,
            read_lossy(&self.dir.path().join(CONFIG_FILE)),
            self.log()
        );
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
    }
}

impl std::fmt::Debug for Mosquitto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mosquitto")
            .field("port", &self.port)
            .field("dir", &self.dir.path())
            .field("pid", &self.child.as_ref().map(Child::id))
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
enum StartError {
    Spawn(String),
    AddrInUse,
    Exited(ExitStatus),
    Timeout,
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Spawn(err) => write!(f, "could not spawn it: {err}"),
            StartError::AddrInUse => f.write_str("address already in use"),
            StartError::Exited(status) => write!(f, "it exited ({status})"),
            StartError::Timeout => write!(f, "not accepting TCP after {START_DEADLINE:?}"),
        }
    }
}

/// A free loopback port: bind port 0, read it, release it. Never 1883.
fn free_port() -> u16 {
    loop {
        let listener =
            TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0 for a port");
        let port = listener.local_addr().expect("local address").port();
        if port != 1883 {
            return port;
        }
    }
}

/// Finds a mosquitto tool (`mosquitto`, `mosquitto_sub`, ...) on `PATH` or in the
/// usual system directories (`mosquitto` lives in `/usr/sbin`, often not on `PATH`).
pub(crate) fn find_binary(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Whether this run is on CI (env `CI` set and non-empty), where falling back is not
/// allowed.
pub(crate) fn on_ci() -> bool {
    std::env::var_os("CI").is_some_and(|value| !value.is_empty())
}

fn missing(name: &str) -> String {
    format!("`{name}` not found on PATH or in /usr/sbin: CI must run against mosquitto: apt-get install mosquitto mosquitto-clients")
}

/// Prints why a mosquitto-only helper is unavailable; panics on CI.
pub(crate) fn skip_without(name: &str) {
    assert!(!on_ci(), "{}", missing(name));
    eprintln!("skipping: `{name}` is not installed (apt-get install mosquitto mosquitto-clients)");
}

/// Reads a file as text, replacing invalid UTF-8; empty if it does not exist.
fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default()
}
