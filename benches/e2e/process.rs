//! The parent's side of a child: start this binary again with a
//! [`ChildSpec`], read its lines with a time limit, kill it if it hangs.

use std::{process::Stdio, time::Duration};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines},
    process::{Child, ChildStdin, ChildStdout, Command},
    time::timeout,
};

use crate::child::{ChildReport, ChildSpec, ENV};

/// How long a child may take to exit after its report.
const EXIT_LIMIT: Duration = Duration::from_secs(10);

/// A running child process.
pub(crate) struct ChildProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Lines<BufReader<ChildStdout>>,
}

impl ChildProcess {
    /// Starts this binary as the child `spec` describes. Its stderr is ours,
    /// so a panic in it shows.
    ///
    /// `E2E_CHILD_WRAPPER` (e.g. `valgrind --tool=callgrind`) runs the child
    /// under that command: instruction counts, unlike seconds, do not move
    /// with the load on a shared machine.
    pub(crate) fn spawn(spec: &ChildSpec) -> Result<Self, String> {
        let exe = std::env::current_exe().map_err(|err| format!("current_exe: {err}"))?;
        let spec = serde_json::to_string(spec).map_err(|err| err.to_string())?;
        let wrapper = std::env::var("E2E_CHILD_WRAPPER").unwrap_or_default();
        let mut words = wrapper.split_whitespace();
        let mut command = match words.next() {
            Some(program) => {
                let mut command = Command::new(program);
                command.args(words).arg(exe);
                command
            }
            None => Command::new(exe),
        };
        let mut child = command
            .env(ENV, spec)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|err| format!("spawn child: {err}"))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().ok_or("child without stdout")?;
        Ok(Self {
            child,
            stdin,
            lines: BufReader::new(stdout).lines(),
        })
    }

    /// The next line the child prints, within `limit`.
    pub(crate) async fn line(&mut self, limit: Duration) -> Result<String, String> {
        match timeout(limit, self.lines.next_line()).await {
            Ok(Ok(Some(line))) => Ok(line),
            Ok(Ok(None)) => Err("child exited without answering".to_owned()),
            Ok(Err(err)) => Err(format!("reading the child: {err}")),
            Err(_) => Err(format!("no answer from the child within {limit:?}")),
        }
    }

    /// Writes one line to the child's stdin.
    pub(crate) async fn tell(&mut self, line: &str) -> Result<(), String> {
        let stdin = self.stdin.as_mut().ok_or("child stdin closed")?;
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .map_err(|err| format!("writing to the child: {err}"))?;
        stdin
            .flush()
            .await
            .map_err(|err| format!("writing to the child: {err}"))
    }

    /// The child's report line, within `limit`; other lines are skipped.
    pub(crate) async fn report(&mut self, limit: Duration) -> Result<ChildReport, String> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let line = self.line(left).await?;
            if line.starts_with('{') {
                return serde_json::from_str(&line)
                    .map_err(|err| format!("bad report {line:?}: {err}"));
            }
        }
    }

    /// Closes stdin and waits for the child to exit; kills it if it does not.
    pub(crate) async fn finish(mut self) {
        drop(self.stdin.take());
        if timeout(EXIT_LIMIT, self.child.wait()).await.is_err() {
            let _ = self.child.kill().await;
        }
    }
}
