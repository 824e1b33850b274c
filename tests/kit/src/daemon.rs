//! The pgcdc daemon as a child process: a config file in its own directory,
//! one log appended to by every incarnation, kill -9, SIGTERM, restarts.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};

use crate::lock;
use crate::wait::{self, Poll};

/// How often a waiting caller looks at the process or its log again.
const EVERY: Duration = Duration::from_millis(20);
/// Lines of the log quoted in failure messages.
const TAIL_LINES: usize = 60;

/// A pgcdc process with its own config; killed on drop.
pub struct Daemon {
    exe: PathBuf,
    child: Mutex<Option<Child>>,
    /// The configuration file.
    pub config: PathBuf,
    /// stderr of every incarnation, appended.
    pub log: PathBuf,
    envs: Vec<(String, String)>,
    command: String,
    /// Highest VmHWM (kB) read from any incarnation.
    pub peak_rss_kb: u64,
    /// Length of the log when the current incarnation started.
    spawned_at: usize,
}

impl Daemon {
    /// Write `config_toml` into `dir` and start `<exe> --config … <command>` with `envs`.
    pub fn start(
        exe: &Path,
        dir: &Path,
        config_toml: &str,
        command: &str,
        envs: &[(&str, &str)],
    ) -> Result<Daemon> {
        std::fs::create_dir_all(dir)?;
        let config = dir.join("pgcdc.toml");
        std::fs::write(&config, config_toml)?;
        let mut d = Daemon {
            exe: exe.to_path_buf(),
            child: Mutex::new(None),
            config,
            log: dir.join("pgcdc.log"),
            envs: envs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            command: command.to_owned(),
            peak_rss_kb: 0,
            spawned_at: 0,
        };
        d.spawn()?;
        Ok(d)
    }

    /// Start the process (again, after a kill or exit), appending to the same log.
    pub fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        self.spawned_at = log.metadata()?.len() as usize;
        let child = Command::new(&self.exe)
            .arg("--config")
            .arg(&self.config)
            .arg(&self.command)
            .envs(self.envs.iter().cloned())
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawn {}", self.exe.display()))?;
        *lock(&self.child) = Some(child);
        Ok(())
    }

    /// Run a one-shot command with the daemon's config (`pgcdc --config … args…`).
    pub fn run(&self, args: &[&str]) -> Result<Output> {
        pgcdc(&self.exe, &self.config, args)
    }

    /// Set (or with `None` remove) an environment variable for the next `spawn`.
    pub fn set_env(&mut self, key: &str, value: Option<&str>) {
        self.envs.retain(|(k, _)| k != key);
        if let Some(v) = value {
            self.envs.push((key.into(), v.into()));
        }
    }

    /// The value of field `name` (`VmHWM`, `THP_enabled`) in the running
    /// process's `/proc/<pid>/status`, its unit cut off.
    pub fn status_field(&self, name: &str) -> Option<String> {
        let pid = self.pid()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let value = status
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))?;
        Some(value.trim().trim_end_matches("kB").trim().to_owned())
    }

    /// Fold the running process's VmHWM into `peak_rss_kb`.
    pub fn sample_rss(&mut self) {
        let hwm = self
            .status_field("VmHWM")
            .and_then(|v| v.parse::<u64>().ok());
        self.peak_rss_kb = self.peak_rss_kb.max(hwm.unwrap_or(0));
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        self.sample_rss();
        if let Some(mut c) = lock(&self.child).take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Send SIGTERM and wait for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        self.sample_rss();
        if let Some(pid) = self.pid() {
            Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()?;
        }
        self.wait_exit(timeout)
    }

    /// Wait for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let what = format!("{} to exit", self.exe.display());
        let status = wait::poll_blocking(&what, timeout, EVERY, || {
            let mut child = lock(&self.child);
            let Some(c) = child.as_mut() else {
                return Poll::Abort("it is not running".into());
            };
            match c.try_wait() {
                Ok(Some(status)) => {
                    *child = None;
                    Poll::Ready(status)
                }
                Ok(None) => Poll::Pending(format!("still running; log:\n{}", self.log_tail())),
                Err(e) => Poll::Abort(e.to_string()),
            }
        })?;
        Ok(status)
    }

    /// The process id while running.
    pub fn pid(&self) -> Option<u32> {
        lock(&self.child).as_ref().map(Child::id)
    }

    /// Whether the process is still running.
    pub fn is_running(&self) -> bool {
        lock(&self.child)
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Wait until the log contains `text`; fails if the daemon exits or `timeout` passes first.
    pub async fn wait_log(&self, text: &str, timeout: Duration) -> Result<()> {
        self.wait_log_from(0, text, timeout).await
    }

    /// Wait until the current incarnation logs that it streams: its initial
    /// snapshot, if it takes one, is over. Stopped before that, pgcdc copies
    /// the tables again on its next start.
    pub async fn wait_streaming(&self, timeout: Duration) -> Result<()> {
        self.wait_log_from(self.spawned_at, "streaming session=", timeout)
            .await
    }

    /// Wait until the log after its first `from` bytes contains `text`.
    async fn wait_log_from(&self, from: usize, text: &str, timeout: Duration) -> Result<()> {
        let what = format!("pgcdc to log {text:?}");
        wait::poll(&what, timeout, EVERY, || async {
            let log = self.log_text();
            if log.get(from..).is_some_and(|l| l.contains(text)) {
                Poll::Ready(())
            } else if !self.is_running() {
                Poll::Abort(format!("pgcdc exited:\n{log}"))
            } else {
                Poll::Pending(format!("log:\n{log}"))
            }
        })
        .await?;
        Ok(())
    }

    /// Everything the daemon logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last lines of the log (for failure messages).
    pub fn log_tail(&self) -> String {
        let log = self.log_text();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
    }

    /// A failure naming `why`, with the log's tail.
    pub fn fail(&self, why: &str) -> anyhow::Error {
        anyhow!("{why}; pgcdc log tail:\n{}", self.log_tail())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The time a log line starts with (pgcdc logs `2026-01-31T12:00:00.123456Z …`),
/// in microseconds since the Unix epoch; `None` for a line without one.
pub fn log_time_us(line: &str) -> Option<i64> {
    let stamp = line.split_whitespace().next()?.strip_suffix('Z')?;
    let (date, time) = stamp.split_once('T')?;
    let mut ymd = date.splitn(3, '-').map(str::parse::<i64>);
    let (y, m, d) = (ymd.next()?.ok()?, ymd.next()?.ok()?, ymd.next()?.ok()?);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut hms = hms.splitn(3, ':').map(str::parse::<i64>);
    let (h, min, sec) = (hms.next()?.ok()?, hms.next()?.ok()?, hms.next()?.ok()?);
    let micros: i64 = format!("{frac:0<6}").get(..6)?.parse().ok()?;
    let seconds = days_from_civil(y, m, d) * 86_400 + h * 3600 + min * 60 + sec;
    Some(seconds * 1_000_000 + micros)
}

/// Now, in microseconds since the Unix epoch (comparable with [`log_time_us`]).
pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// Days from 1970-01-01 to the proleptic Gregorian date `y-m-d` (Howard
/// Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Run a one-shot `pgcdc` command with `config`; its output.
pub fn pgcdc(exe: &Path, config: &Path, args: &[&str]) -> Result<Output> {
    Command::new(exe)
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .with_context(|| format!("run {}", exe.display()))
}

/// Whether `exe` was built with failpoints: such a build refuses an invalid
/// `FAILPOINTS` before it parses its flags (it panics); one without ignores it.
pub fn has_failpoints(exe: &Path) -> bool {
    Command::new(exe)
        .arg("--version")
        .env("FAILPOINTS", "pgcdc-probe=not-an-action")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| !s.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_times_are_read_as_microseconds_since_the_epoch() {
        let line = "2026-11-30T14:26:42.413284Z  INFO pgcdc::http: listening";
        assert_eq!(log_time_us(line), Some(1_796_048_802_413_284));
        assert_eq!(log_time_us("1970-01-01T00:00:01Z x"), Some(1_000_000));
        assert_eq!(
            log_time_us("2000-03-01T00:00:00.5Z"),
            Some(951_868_800_500_000)
        );
        assert_eq!(log_time_us("   at src/main.rs:3"), None);
    }
}
