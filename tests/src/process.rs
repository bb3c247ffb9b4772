//! Runs the `node` binary (or any program) as a child process whose output goes to a log
//! file, so that tests can wait for log lines, kill -9 it, or freeze it with SIGSTOP.

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use crate::HarnessError;

/// How often [`NodeProcess::wait_for_log_line`] and [`NodeProcess::wait_exit`] look again.
const POLL_INTERVAL_MS: u64 = 50;
/// How much of the log an error message quotes.
const LOG_TAIL_BYTES: u64 = 4_096;

/// The `node` binary of this build: `target/<profile>/node`, next to the test executable's
/// `deps/` directory, or next to the executable itself (a harness binary such as `chaos`
/// lives in `target/<profile>/`).
///
/// # Panics
/// When it has not been built.
pub fn node_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable has a path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test executable lives in target/<profile>/deps");
    let node = profile_dir.join("node");
    if let Some(beside) = exe.parent().map(|dir| dir.join("node")) {
        if !node.is_file() && beside.is_file() {
            return beside;
        }
    }
    assert!(
        node.is_file(),
        "{} does not exist: build it: cargo build -p tributary-node",
        node.display()
    );
    node
}

/// A child process with its stdout and stderr appended to a log file. Dropping it kills
/// the process (SIGKILL) and reaps it.
pub struct NodeProcess {
    child: Child,
    log_path: PathBuf,
    /// Where this process's output starts in the log, so that a restarted node sharing
    /// the log file is not satisfied by its predecessor's lines.
    log_start: u64,
    exit: Option<ExitStatus>,
}

impl NodeProcess {
    /// Spawns the `node` binary.
    pub fn spawn<A, K, V>(
        args: impl IntoIterator<Item = A>,
        envs: impl IntoIterator<Item = (K, V)>,
        log_path: &Path,
    ) -> Result<NodeProcess, HarnessError>
    where
        A: AsRef<OsStr>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        Self::spawn_program(node_binary(), args, envs, log_path)
    }

    /// Spawns any program the same way; the harness's own tests use this.
    pub fn spawn_program<A, K, V>(
        program: impl AsRef<OsStr>,
        args: impl IntoIterator<Item = A>,
        envs: impl IntoIterator<Item = (K, V)>,
        log_path: &Path,
    ) -> Result<NodeProcess, HarnessError>
    where
        A: AsRef<OsStr>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        let log_err = |source| HarnessError::ProcessLog {
            path: log_path.to_owned(),
            source,
        };
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .map_err(log_err)?;
        let log_start = log.metadata().map_err(log_err)?.len();
        let stderr = log.try_clone().map_err(log_err)?;
        let program = program.as_ref();
        let child = Command::new(program)
            .args(args)
            .envs(envs)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr)
            .spawn()
            .map_err(|source| HarnessError::ProcessSpawn {
                program: program.to_string_lossy().into_owned(),
                source,
            })?;
        Ok(NodeProcess {
            child,
            log_path: log_path.to_owned(),
            log_start,
            exit: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Kills the process with SIGKILL and reaps it.
    pub fn kill9(&mut self) -> Result<(), HarnessError> {
        if self.exited()?.is_some() {
            return Ok(());
        }
        self.child.kill().map_err(|e| HarnessError::ProcessSignal {
            pid: self.pid(),
            signal: "SIGKILL",
            detail: e.to_string(),
        })?;
        let status = self.child.wait().map_err(|e| HarnessError::ProcessSignal {
            pid: self.pid(),
            signal: "SIGKILL",
            detail: format!("reaping: {e}"),
        })?;
        self.exit = Some(status);
        Ok(())
    }

    /// Sends SIGTERM: the node's graceful shutdown. Use [`wait_exit`](Self::wait_exit).
    pub fn terminate(&mut self) -> Result<(), HarnessError> {
        self.signal("TERM")
    }

    /// Freezes the process (SIGSTOP): it holds its sockets but answers nothing.
    pub fn sigstop(&mut self) -> Result<(), HarnessError> {
        self.signal("STOP")
    }

    /// Thaws a process frozen by [`sigstop`](Self::sigstop).
    pub fn sigcont(&mut self) -> Result<(), HarnessError> {
        self.signal("CONT")
    }

    fn signal(&mut self, name: &'static str) -> Result<(), HarnessError> {
        let pid = self.pid();
        let err = |detail: String| HarnessError::ProcessSignal {
            pid,
            signal: name,
            detail,
        };
        if let Some(status) = self.exited()? {
            return Err(err(format!("it already exited ({status})")));
        }
        // The child is not reaped yet (checked just above), so its pid cannot have been
        // reused by another process.
        let out = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(pid.to_string())
            .output()
            .map_err(|e| err(format!("running kill: {e}")))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(err(String::from_utf8_lossy(&out.stderr).trim().to_owned()))
        }
    }

    /// The exit status, if the process has exited (reaping it).
    pub fn exited(&mut self) -> Result<Option<ExitStatus>, HarnessError> {
        if self.exit.is_none() {
            self.exit = self
                .child
                .try_wait()
                .map_err(|e| HarnessError::ProcessSignal {
                    pid: self.child.id(),
                    signal: "none",
                    detail: format!("checking whether it exited: {e}"),
                })?;
        }
        Ok(self.exit)
    }

    /// Waits, bounded, for the process to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, HarnessError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited()? {
                return Ok(status);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(HarnessError::Timeout {
                    step: format!("waiting for process {} to exit", self.pid()),
                    waited_ms: timeout.as_millis() as u64,
                    detail: format!("; its log ends with:\n{}", self.log_tail()),
                });
            }
            // std's Child has no async wait; polling is the portable way.
            tokio::time::sleep(Duration::from_millis(POLL_INTERVAL_MS)).await;
        }
    }

    /// Waits, bounded, until this process has logged a line containing `pattern`, and
    /// returns that line. Fails early if the process exits first.
    pub async fn wait_for_log_line(
        &mut self,
        pattern: &str,
        timeout: Duration,
    ) -> Result<String, HarnessError> {
        self.wait_for_log_count(pattern, 1, timeout).await
    }

    /// Waits, bounded, until this process has logged `count` lines containing `pattern`
    /// (counting from its start), and returns the last of them. Fails early if the
    /// process exits first.
    pub async fn wait_for_log_count(
        &mut self,
        pattern: &str,
        count: usize,
        timeout: Duration,
    ) -> Result<String, HarnessError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut scanned = self.log_start;
        let mut partial = String::new();
        let mut seen = 0;
        loop {
            // Check the exit first, then read: output written just before the exit is
            // then still seen.
            let exit = self.exited()?;
            let (chunk, end) = read_from(&self.log_path, scanned)?;
            scanned = end;
            partial.push_str(&chunk);
            while let Some(newline) = partial.find('\n') {
                let line: String = partial.drain(..=newline).collect();
                if line.contains(pattern) {
                    seen += 1;
                    if seen >= count {
                        return Ok(line.trim_end().to_owned());
                    }
                }
            }
            if let Some(status) = exit {
                if partial.contains(pattern) && seen + 1 >= count {
                    return Ok(partial.trim_end().to_owned());
                }
                return Err(HarnessError::ProcessExited {
                    pid: self.pid(),
                    status: status.to_string(),
                    step: format!("waiting for {count} log lines containing {pattern:?}"),
                    log_tail: self.log_tail(),
                });
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(HarnessError::Timeout {
                    step: format!(
                        "waiting for process {} to log {pattern:?} {count} times (seen {seen})",
                        self.pid()
                    ),
                    waited_ms: timeout.as_millis() as u64,
                    detail: format!("; its log ends with:\n{}", self.log_tail()),
                });
            }
            // The log is a plain file written by another process: there is no event to
            // await, so poll it.
            tokio::time::sleep(Duration::from_millis(POLL_INTERVAL_MS)).await;
        }
    }

    /// The end of this process's part of the log, for error messages.
    pub fn log_tail(&self) -> String {
        let len = std::fs::metadata(&self.log_path)
            .map(|m| m.len())
            .unwrap_or(0);
        let from = len.saturating_sub(LOG_TAIL_BYTES).max(self.log_start);
        read_from(&self.log_path, from)
            .map(|(s, _)| s)
            .unwrap_or_else(|e| e.to_string())
    }
}

/// Reads the log from `offset` to its current end; returns the text and the new offset.
fn read_from(path: &Path, offset: u64) -> Result<(String, u64), HarnessError> {
    let err = |source| HarnessError::ProcessLog {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(err)?;
    file.seek(SeekFrom::Start(offset)).map_err(err)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(err)?;
    let end = offset + bytes.len() as u64;
    Ok((String::from_utf8_lossy(&bytes).into_owned(), end))
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if self.exit.is_none() {
            // A frozen process dies from SIGKILL too, so no SIGCONT is needed first.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl std::fmt::Debug for NodeProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeProcess")
            .field("pid", &self.child.id())
            .field("log", &self.log_path)
            .field("exit", &self.exit)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_secs(10);

    fn sh(script: &str, log: &Path) -> NodeProcess {
        NodeProcess::spawn_program("sh", ["-c", script], [("GREETING", "hello")], log).unwrap()
    }

    #[tokio::test]
    async fn waits_for_lines_of_this_run_only() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("node.log");
        let mut first = sh("echo \"$GREETING ready\"; echo oops >&2; exit 3", &log);
        assert_eq!(
            first.wait_for_log_line("ready", WAIT).await.unwrap(),
            "hello ready"
        );
        assert_eq!(first.wait_for_log_line("oops", WAIT).await.unwrap(), "oops");
        assert_eq!(first.wait_exit(WAIT).await.unwrap().code(), Some(3));

        // The second run appends to the same log; the first run's line must not count.
        let mut second = sh("echo started; exit 0", &log);
        match second.wait_for_log_line("ready", WAIT).await {
            Err(HarnessError::ProcessExited { log_tail, .. }) => {
                assert!(
                    log_tail.contains("started") && !log_tail.contains("ready"),
                    "{log_tail}"
                )
            }
            other => panic!("expected the exit to be reported, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn kill9_and_stop_cont() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("node.log");
        // Prints a tick every 20 ms, so a frozen process is visible as a silent log.
        let mut p = sh(
            "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.02; done",
            &log,
        );
        p.wait_for_log_line("tick 1", WAIT).await.unwrap();
        p.sigstop().unwrap();
        wait_state(p.pid(), 'T').await;
        let frozen_len = std::fs::metadata(&log).unwrap().len();
        // Absence can only be shown by waiting a while.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            std::fs::metadata(&log).unwrap().len(),
            frozen_len,
            "output while stopped"
        );
        p.sigcont().unwrap();
        let (text, _) = read_from(&log, 0).unwrap();
        let last: u64 = text
            .lines()
            .last()
            .unwrap()
            .trim_start_matches("tick ")
            .parse()
            .unwrap();
        p.wait_for_log_line(&format!("tick {}", last + 2), WAIT)
            .await
            .unwrap();

        p.kill9().unwrap();
        let status = p.exited().unwrap().expect("reaped after kill9");
        assert!(!status.success());
        assert!(
            p.sigcont().is_err(),
            "signalling an exited process is an error"
        );
        assert!(matches!(
            p.wait_for_log_line("never printed", WAIT).await,
            Err(HarnessError::ProcessExited { .. })
        ));
    }

    /// Polls /proc until the process is in `state` (T: stopped), bounded by WAIT.
    async fn wait_state(pid: u32, state: char) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
            // The state follows the parenthesised command name.
            let after = &stat[stat.rfind(')').unwrap() + 2..];
            if after.starts_with(state) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "process {pid} never reached {state}"
            );
            tokio::time::sleep(Duration::from_millis(POLL_INTERVAL_MS)).await;
        }
    }

    #[tokio::test]
    async fn a_missing_line_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("node.log");
        let mut p = sh("echo up; exec sleep 30", &log);
        match p
            .wait_for_log_line("never printed", Duration::from_millis(300))
            .await
        {
            Err(HarnessError::Timeout { detail, .. }) => assert!(detail.contains("up"), "{detail}"),
            other => panic!("expected a timeout, got {other:?}"),
        }
    }
}
