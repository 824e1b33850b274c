//! The services a chaos scenario runs against, each private to the scenario:
//! a PostgreSQL cluster (initdb in a temp dir, `wal_level=logical`, a free
//! port, SCRAM password auth), a tansu broker (memory storage) and
//! osmem-server, plus the pgcdc daemon as a child process.
//!
//! Small cousins of `tests/support` (the binary cannot use `tests/`).

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tokio_postgres::{Client, NoTls};

/// A port nobody listens on right now.
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

/// Run a PostgreSQL program, as user `postgres` when we are root (initdb refuses root).
fn pg_command(bindir: &Path, program: &str, args: &[&str]) -> Result<Output> {
    let exe = bindir.join(program);
    let mut cmd = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(&exe);
        c
    } else {
        Command::new(&exe)
    };
    cmd.args(args)
        .output()
        .with_context(|| format!("cannot run {}", exe.display()))
}

fn pg_bindir() -> Result<PathBuf> {
    if let Ok(dir) = std::env::var("PG_BINDIR") {
        return Ok(dir.into());
    }
    let out = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .context("pg_config not found: install the PostgreSQL server packages")?;
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// A running cluster, stopped (immediately) and deleted on drop.
pub struct PgCluster {
    dir: tempfile::TempDir,
    /// TCP port on 127.0.0.1.
    pub port: u16,
    /// The superuser's password (host connections need it: SCRAM).
    pub password: String,
    bindir: PathBuf,
}

impl PgCluster {
    /// initdb and start a cluster for logical replication whose TCP
    /// connections (replication included) authenticate with SCRAM.
    pub fn start(password: &str) -> Result<PgCluster> {
        let dir = tempfile::Builder::new()
            .prefix("pgcdc-chaos-pg-")
            .tempdir()?;
        let pwfile = dir.path().join("pw");
        std::fs::write(&pwfile, format!("{password}\n"))?;
        if is_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()?;
            if !ok.success() {
                bail!("chown of the cluster dir failed");
            }
        }
        let bindir = pg_bindir()?;
        let data = dir.path().join("data");
        let data_s = data.display().to_string();
        let pw_s = pwfile.display().to_string();
        let args = [
            "-D",
            &data_s,
            "-U",
            "postgres",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--pwfile",
            &pw_s,
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ];
        let out = pg_command(&bindir, "initdb", &args)?;
        if !out.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let port = free_port()?;
        let conf = format!(
            "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             wal_level = logical\nmax_replication_slots = 10\nmax_wal_senders = 10\nfsync = off\n\
             wal_sender_timeout = 60s\nshared_buffers = 64MB\n",
            dir.path().display()
        );
        let mut existing = std::fs::read_to_string(data.join("postgresql.conf"))?;
        existing.push_str(&conf);
        std::fs::write(data.join("postgresql.conf"), existing)?;
        let cluster = PgCluster {
            dir,
            port,
            password: password.to_owned(),
            bindir,
        };
        cluster.pg_ctl_start()?;
        Ok(cluster)
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn pg_ctl_start(&self) -> Result<()> {
        let log = self.dir.path().join("postgres.log").display().to_string();
        let args = ["-D", &self.data(), "-l", &log, "-w", "-t", "60", "start"];
        let out = pg_command(&self.bindir, "pg_ctl", &args)?;
        if !out.status.success() {
            bail!(
                "pg_ctl start failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Stop with `mode` (`fast`, `immediate`) and start again.
    pub fn restart(&self, mode: &str) -> Result<()> {
        let args = ["-D", &self.data(), "-m", mode, "-w", "stop"];
        pg_command(&self.bindir, "pg_ctl", &args)?;
        self.pg_ctl_start()
    }

    /// A connection string for SQL clients.
    pub fn url(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres password={}",
            self.port, self.password
        )
    }

    /// A SQL client (its connection runs in the background); retries for 30 s.
    pub async fn client(&self) -> Result<Client> {
        connect(&self.url(), Duration::from_secs(30)).await
    }
}

/// Connect to `url`, retrying until `timeout` passes.
pub async fn connect(url: &str, timeout: Duration) -> Result<Client> {
    let deadline = Instant::now() + timeout;
    loop {
        match tokio_postgres::connect(url, NoTls).await {
            Ok((client, conn)) => {
                tokio::spawn(conn);
                return Ok(client);
            }
            Err(e) if Instant::now() >= deadline => return Err(e.into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = pg_command(
            &self.bindir,
            "pg_ctl",
            &["-D", &self.data(), "-m", "immediate", "stop"],
        );
    }
}

/// A tansu broker with memory storage, killed on drop.
pub struct Tansu {
    child: Child,
    /// TCP port on 127.0.0.1 it listens on.
    pub port: u16,
    /// The port it advertises in metadata (a proxy's, or `port`).
    pub advertised: u16,
}

impl Tansu {
    /// Start tansu; [`crate::chaos::oracle`] waits for it to answer.
    pub fn start() -> Result<Tansu> {
        let port = free_port()?;
        Tansu::start_with(port, port)
    }

    /// Start tansu on `port`, advertising `advertised` to clients.
    pub fn start_with(port: u16, advertised: u16) -> Result<Tansu> {
        let url = format!("tcp://127.0.0.1:{port}");
        let front = format!("tcp://127.0.0.1:{advertised}");
        let bin = std::env::var("TANSU").unwrap_or_else(|_| "tansu".into());
        let child = Command::new(bin)
            .args(["broker", "--listener-url", &url])
            .args(["--advertised-listener-url", &front])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context(
                "cannot start tansu: cargo install tansu --locked --features dynostore,libsql",
            )?;
        Ok(Tansu {
            child,
            port,
            advertised,
        })
    }

    /// Send `signal` (`STOP`, `CONT`) to the broker.
    pub fn signal(&self, signal: &str) -> Result<()> {
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()?;
        if !ok.success() {
            bail!("kill -{signal} tansu failed");
        }
        Ok(())
    }

    /// Bootstrap servers (the advertised address).
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.advertised)
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.signal("CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A small tmpfs mounted over a directory (root only), unmounted on drop.
pub struct TmpfsMount {
    /// The mount point.
    pub path: PathBuf,
}

impl TmpfsMount {
    /// Mount a tmpfs of `size_mb` MiB on `path` (created if missing).
    pub fn mount(path: &Path, size_mb: u64) -> Result<TmpfsMount> {
        if !is_root() {
            bail!("mounting a small filesystem needs root");
        }
        std::fs::create_dir_all(path)?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mb}m"), "tmpfs"])
            .arg(path)
            .output()
            .context("mount")?;
        if !out.status.success() {
            bail!(
                "mount -t tmpfs failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(TmpfsMount {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// osmem-server (an in-memory OpenSearch-compatible server), killed on drop.
pub struct SearchServer {
    child: Child,
    /// Base URL.
    pub url: String,
}

fn osmem_binary() -> Result<String> {
    if let Ok(bin) = std::env::var("OSMEM_SERVER_BIN") {
        return Ok(bin);
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import osmem_server; print(osmem_server.resolve_binary())",
        ])
        .output()
        .context("python3")?;
    let bin = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if bin.is_empty() {
        bail!("osmem-server not installed: pip install osmem-server");
    }
    Ok(bin)
}

impl SearchServer {
    /// Start the server; it prints its URL as JSON on its first line.
    pub fn start() -> Result<SearchServer> {
        let mut child = Command::new(osmem_binary()?)
            .args(["-addr", "127.0.0.1:0", "-no-stdin-watch", "-no-ja"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("start osmem-server")?;
        let mut line = String::new();
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        BufReader::new(stdout).read_line(&mut line)?;
        let banner: serde_json::Value = serde_json::from_str(&line).context("osmem banner")?;
        let url = banner["url"].as_str().unwrap_or_default().to_owned();
        Ok(SearchServer { child, url })
    }
}

impl Drop for SearchServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The pgcdc daemon (`pgcdc run`, this very executable) with its config and log.
pub struct Daemon {
    child: Option<Child>,
    config: PathBuf,
    /// stderr of every incarnation, appended.
    pub log: PathBuf,
    envs: Vec<(String, String)>,
    /// Highest VmHWM (kB) read from any incarnation.
    pub peak_rss_kb: u64,
}

impl Daemon {
    /// Write `config_toml` into `dir` and start `pgcdc run` with it.
    pub fn start(dir: &Path, config_toml: &str) -> Result<Daemon> {
        let config = dir.join("pgcdc.toml");
        std::fs::write(&config, config_toml)?;
        let mut d = Daemon {
            child: None,
            config,
            log: dir.join("pgcdc.log"),
            envs: Vec::new(),
            peak_rss_kb: 0,
        };
        d.spawn()?;
        Ok(d)
    }

    /// Start the process (again), appending to the same log.
    pub fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(std::env::current_exe()?)
            .arg("--config")
            .arg(&self.config)
            .arg("run")
            .envs(self.envs.iter().cloned())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawn pgcdc")?;
        self.child = Some(child);
        Ok(())
    }

    /// Run another pgcdc command (`pgcdc --config <the daemon's> args…`).
    pub fn command(&self, args: &[&str]) -> Result<std::process::Output> {
        Command::new(std::env::current_exe()?)
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .output()
            .context("run pgcdc")
    }

    /// Set (or with `None` remove) an environment variable for the next `spawn`.
    pub fn set_env(&mut self, key: &str, value: Option<&str>) {
        self.envs.retain(|(k, _)| k != key);
        if let Some(v) = value {
            self.envs.push((key.into(), v.into()));
        }
    }

    /// Fold the running process's VmHWM into `peak_rss_kb`.
    pub fn sample_rss(&mut self) {
        let Some(pid) = self.child.as_ref().map(Child::id) else {
            return;
        };
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let hwm = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0);
        self.peak_rss_kb = self.peak_rss_kb.max(hwm);
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        self.sample_rss();
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Send SIGTERM and wait for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        self.sample_rss();
        if let Some(c) = &self.child {
            Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status()?;
        }
        self.wait_exit(timeout)
    }

    /// Wait for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self
            .child
            .as_mut()
            .ok_or_else(|| anyhow!("pgcdc is not running"))?;
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!("pgcdc did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
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
