//! One ignored test of the running test binary, run as a child process: a consumer to
//! kill with SIGKILL, or a broker to stop (rumqttd cannot be stopped in-process).
//!
//! The child is the same binary started with `--ignored --exact <name>`, so the entry
//! is a `#[ignore = "..."]` test that never passes as a no-op in a normal run. It talks
//! to its parent through environment variables and lines on stdin (in:
//! [`TestChild::send`], [`parent_lines`]) and lines on stdout (out), and ends with its
//! parent ([`until_stdin_closes`], or [`parent_lines`] ending): the parent holds the
//! child's stdin open, so even a parent that dies without running destructors leaves no
//! child behind.
//!
//! ```ignore
//! // Parent:
//! let mut child = TestChild::spawn("consumer_child", &[("CHILD_URL", url)]);
//! child.line("CHILD-READY", WAIT).await;
//! child.send("SYNC").await;           // a line on the child's stdin
//! child.kill().await;                 // SIGKILL
//! let printed = child.lines();        // everything it printed, to its end
//!
//! // Child:
//! #[tokio::test]
//! #[ignore = "the consumer process of ...; started by the parent test"]
//! async fn consumer_child() {
//!     println!("CHILD-READY");
//!     support::until_stdin_closes(Duration::from_secs(120));
//! }
//! ```

use std::io::Read as _;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// How long a killed child may take to be reaped and its output to end.
const EXIT_DEADLINE: Duration = Duration::from_secs(10);

/// A test of this binary running as a child process. Dropping it kills the child.
pub(crate) struct TestChild {
    name: String,
    child: Child,
    /// Held open; the child may end when it closes ([`until_stdin_closes`]).
    stdin: Option<ChildStdin>,
    /// Every line the child printed on stdout so far.
    lines: Arc<Mutex<Vec<String>>>,
    /// How many lines, to wake waiters; closed when stdout ends.
    printed: watch::Receiver<usize>,
    /// Lines [`line`](TestChild::line) has looked at.
    cursor: usize,
    reader: Option<JoinHandle<()>>,
}

impl TestChild {
    /// Starts the ignored test `name` (its full path in this binary, for example
    /// `consumer_child` or `kill::consumer_child`) with `env` set, its stdout read
    /// line by line and its stderr shared with this process.
    ///
    /// # Panics
    ///
    /// If the process cannot be started.
    pub(crate) fn spawn(name: &str, env: &[(&str, String)]) -> TestChild {
        let exe = std::env::current_exe().expect("the test binary's path");
        let mut child = Command::new(exe)
            .args([
                name,
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .envs(env.iter().map(|(key, value)| (*key, value.as_str())))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|err| panic!("start the child test {name}: {err}"));
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("a piped stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (count, printed) = watch::channel(0);
        let reader = {
            let lines = Arc::clone(&lines);
            tokio::spawn(async move {
                let mut stdout = BufReader::new(stdout).lines();
                while let Ok(Some(line)) = stdout.next_line().await {
                    let mut lines = lines.lock().unwrap_or_else(PoisonError::into_inner);
                    lines.push(line);
                    count.send_replace(lines.len());
                }
            })
        };
        TestChild {
            name: name.to_owned(),
            child,
            stdin,
            lines,
            printed,
            cursor: 0,
            reader: Some(reader),
        }
    }

    /// The next line (after those this method returned before) that contains
    /// `marker`, from `marker` on: the test harness may print its own text before it
    /// on the same line.
    ///
    /// # Panics
    ///
    /// If the child's stdout ends (it exited) or `timeout` passes first; the message
    /// carries what it printed.
    pub(crate) async fn line(&mut self, marker: &str, timeout: Duration) -> String {
        let found = tokio::time::timeout(timeout, async {
            loop {
                if let Some(found) = self.scan(marker) {
                    return Some(found);
                }
                let seen = self.cursor;
                if self.printed.wait_for(|count| *count > seen).await.is_err() {
                    // Stdout ended; the last lines may have come with the end.
                    return self.scan(marker);
                }
            }
        })
        .await;
        match found {
            Ok(Some(line)) => line,
            Ok(None) => panic!(
                "the child {} ended before printing {marker:?}; it printed:\n{}",
                self.name,
                self.lines().join("\n")
            ),
            Err(elapsed) => panic!(
                "the child {} printed no {marker:?} ({elapsed} after {timeout:?}); it printed:\n{}",
                self.name,
                self.lines().join("\n")
            ),
        }
    }

    /// Looks for `marker` in the lines after the cursor, moving the cursor past them.
    fn scan(&mut self, marker: &str) -> Option<String> {
        let lines = self.lines.lock().unwrap_or_else(PoisonError::into_inner);
        while self.cursor < lines.len() {
            let line = &lines[self.cursor];
            self.cursor += 1;
            if let Some(at) = line.find(marker) {
                return Some(line[at..].to_owned());
            }
        }
        None
    }

    /// Writes `line` and a newline to the child's stdin ([`parent_lines`] reads it).
    ///
    /// # Panics
    ///
    /// If the child's stdin was closed or the child is gone.
    pub(crate) async fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("the child's stdin is open");
        let written = async {
            stdin.write_all(line.as_bytes()).await?;
            stdin.write_all(b"\n").await?;
            stdin.flush().await
        };
        if let Err(err) = written.await {
            panic!("write {line:?} to the child {}: {err}", self.name);
        }
    }

    /// Every line printed so far.
    pub(crate) fn lines(&self) -> Vec<String> {
        self.lines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The process id, while it runs.
    pub(crate) fn id(&self) -> Option<u32> {
        self.child.id()
    }

    /// Kills the child with SIGKILL and waits until it is gone and everything it
    /// printed has been read.
    ///
    /// # Panics
    ///
    /// If it is not gone within 10 s.
    pub(crate) async fn kill(&mut self) -> ExitStatus {
        self.child.start_kill().expect("SIGKILL the child");
        self.finish().await
    }

    /// Closes the child's stdin (a child in [`until_stdin_closes`] then returns and its
    /// test ends) and waits for its exit.
    ///
    /// # Panics
    ///
    /// If it has not exited within 10 s.
    pub(crate) async fn close(&mut self) -> ExitStatus {
        self.stdin = None;
        self.finish().await
    }

    async fn finish(&mut self) -> ExitStatus {
        let status = tokio::time::timeout(EXIT_DEADLINE, self.child.wait())
            .await
            .unwrap_or_else(|_| {
                panic!("the child {} still runs after {EXIT_DEADLINE:?}", self.name)
            })
            .expect("wait for the child");
        if let Some(reader) = self.reader.take() {
            // Its stdout closes with it (unless it left a process of its own holding
            // the pipe, which these children do not).
            let _ = tokio::time::timeout(EXIT_DEADLINE, reader).await;
        }
        status
    }
}

impl Drop for TestChild {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        if let Some(reader) = self.reader.take() {
            reader.abort();
        }
    }
}

impl std::fmt::Debug for TestChild {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestChild")
            .field("name", &self.name)
            .field("pid", &self.child.id())
            .finish_non_exhaustive()
    }
}

/// In a child test: the lines its parent [sends](TestChild::send), ending when the parent
/// closes this process's stdin (or dies). Call it once.
pub(crate) fn parent_lines() -> mpsc::UnboundedReceiver<String> {
    let (lines, receiver) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { return };
            if lines.send(line).is_err() {
                return;
            }
        }
    });
    receiver
}

/// In a child test: blocks until the parent closes this process's stdin (or dies), or
/// `at_most` passes, so that no child outlives its test.
pub(crate) fn until_stdin_closes(at_most: Duration) {
    let (closed, wait) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
        let _ = closed.send(());
    });
    let _ = wait.recv_timeout(at_most);
}
