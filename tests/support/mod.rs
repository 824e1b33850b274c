//! Test harness: real services started per test (a private PostgreSQL
//! cluster, a tansu Kafka broker) and the pgcdc daemon as a child process.
#![allow(dead_code)]

pub mod es;
pub mod kafka;
pub mod pg;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

#[allow(unused_imports)]
pub use kafka::{Record, Tansu};
pub use pg::PgCluster;

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port")
}

/// Poll `cond` until it holds or `timeout` passes; panics with `what` on timeout.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !cond().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Wait until the daemon holds `slot` with an active walsender; panics if it exits first.
pub async fn wait_slot_active(db: &tokio_postgres::Client, daemon: &mut Daemon, slot: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(daemon.is_running(), "pgcdc exited:\n{}", daemon.log_text());
        let q = "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND active";
        if db.query_opt(q, &[&slot]).await.ok().flatten().is_some() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "slot {slot} never became active; log:\n{}",
            daemon.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A pgcdc daemon process with its own config and state directory.
pub struct Daemon {
    child: Option<Child>,
    pub config: PathBuf,
    pub log: PathBuf,
    envs: Vec<(String, String)>,
    command: &'static str,
}

impl Daemon {
    /// Write `config_toml` into `dir` and start `pgcdc run` with it.
    pub fn start(dir: &Path, config_toml: &str, envs: &[(&str, &str)]) -> Daemon {
        Self::start_command(dir, config_toml, envs, "run")
    }

    /// Write `config_toml` into `dir` and start `pgcdc <command>` with it.
    pub fn start_command(
        dir: &Path,
        config_toml: &str,
        envs: &[(&str, &str)],
        command: &'static str,
    ) -> Daemon {
        std::fs::create_dir_all(dir).expect("daemon dir");
        let config = dir.join("pgcdc.toml");
        std::fs::write(&config, config_toml).expect("write config");
        let mut d = Daemon {
            child: None,
            config,
            log: dir.join("pgcdc.log"),
            envs: envs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            command,
        };
        d.spawn();
        d
    }

    /// Start the process again (after a kill or exit), appending to the same log.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open log");
        let child = Command::new(env!("CARGO_BIN_EXE_pgcdc"))
            .args([
                "--config",
                self.config.to_str().unwrap_or_default(),
                self.command,
            ])
            .envs(self.envs.iter().cloned())
            .env("RUST_BACKTRACE", "1")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn pgcdc");
        self.child = Some(child);
    }

    /// Replace the environment used by the next `spawn`.
    pub fn set_env(&mut self, key: &str, value: Option<&str>) {
        self.envs.retain(|(k, _)| k != key);
        if let Some(v) = value {
            self.envs.push((key.into(), v.into()));
        }
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Send SIGTERM and wait for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
        }
        self.wait_exit(timeout)
    }

    /// Wait for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().expect("daemon not running");
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "pgcdc did not exit within {timeout:?}; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The process id while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Wait until the log contains `text`; panics if the daemon exits or `timeout` passes first.
    pub async fn wait_log(&mut self, text: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.log_text().contains(text) {
            assert!(
                self.is_running(),
                "pgcdc exited before logging {text:?}:\n{}",
                self.log_text()
            );
            assert!(
                Instant::now() < deadline,
                "pgcdc did not log {text:?} within {timeout:?}:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Everything the daemon logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Run a one-shot `pgcdc` subcommand with `config`; its output.
pub fn pgcdc(config: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_pgcdc"))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("run pgcdc")
}

/// `[kafka.properties]` for tests that kill a consumer: the group coordinator
/// then waits at most this long for the dead member during a rebalance
/// (librdkafka's default `max.poll.interval.ms` is 5 minutes). Tests that
/// kill a sink repeatedly also give it a static `group.instance.id`: tansu
/// sometimes never reassigns the partitions of a killed member otherwise.
/// The producer writes one record per batch: tansu 0.6 answers a fetch from
/// the middle of a batch with the next batch, so a restarted sink resuming
/// inside one would miss the rest of it (real Kafka returns the whole batch).
pub const FAST_REBALANCE: &str =
    "[kafka.properties]\n\"max.poll.interval.ms\" = \"15000\"\n\"batch.num.messages\" = \"1\"\n";

/// Config text for a daemon streaming `tables` from `pg` into `tansu`.
pub fn config(
    pg: &PgCluster,
    tansu: &Tansu,
    state_dir: &Path,
    tables: &[&str],
    extra_kafka: &str,
) -> String {
    let tables: Vec<String> = tables.iter().map(|t| format!("{t:?}")).collect();
    format!(
        "state_dir = {state:?}\nshutdown_timeout_secs = 20\n\
         [postgres]\nhost = \"127.0.0.1\"\nport = {port}\nuser = \"postgres\"\ndatabase = \"postgres\"\n\
         tables = [{tables}]\nstatus_interval_secs = 1\n\
         [kafka]\nbrokers = {brokers:?}\ntopic_partitions = 1\ndelivery_timeout_ms = 30000\n{extra_kafka}\n\
         [supervision]\nmax_restarts = 20\nbackoff_initial_ms = 50\nbackoff_max_ms = 1000\n\
         [log]\nlevel = \"info,pgcdc_actors=debug\"\n[metrics]\nlisten = \"\"\n",
        state = state_dir.display().to_string(),
        port = pg.port,
        tables = tables.join(", "),
        brokers = tansu.brokers(),
    )
}
