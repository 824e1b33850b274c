//! A private PostgreSQL cluster: initdb in a temp dir, wal_level=logical, a free port.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls};

/// A running cluster, stopped (immediately) and deleted on drop.
pub struct PgCluster {
    dir: tempfile::TempDir,
    pub port: u16,
    bindir: PathBuf,
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

/// Run a PostgreSQL program, as user `postgres` when we are root (initdb refuses root).
fn pg_command(bindir: &Path, program: &str, args: &[&str]) -> Output {
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
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", exe.display()))
}

fn bindir() -> PathBuf {
    if let Ok(dir) = std::env::var("PG_BINDIR") {
        return dir.into();
    }
    let out = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .expect("pg_config not found: install postgresql");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

impl PgCluster {
    /// initdb and start a cluster configured for logical replication.
    pub fn start() -> PgCluster {
        Self::start_with("")
    }

    /// Like [`PgCluster::start`], with extra `postgresql.conf` lines.
    pub fn start_with(extra_conf: &str) -> PgCluster {
        let dir = tempfile::Builder::new()
            .prefix("pgcdc-pg-")
            .tempdir()
            .expect("tempdir");
        if is_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status();
            assert!(
                ok.is_ok_and(|s| s.success()),
                "chown of the cluster dir failed"
            );
        }
        let bindir = bindir();
        let data = dir.path().join("data");
        let out = pg_command(
            &bindir,
            "initdb",
            &[
                "-D",
                data.to_str().unwrap_or_default(),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
        );
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = super::free_port();
        let conf = format!(
            "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nwal_level = logical\n\
             max_replication_slots = 10\nmax_wal_senders = 10\nfsync = off\nsynchronous_commit = on\n\
             wal_sender_timeout = 60s\nshared_buffers = 64MB\n",
            dir.path().display()
        );
        let mut existing =
            std::fs::read_to_string(data.join("postgresql.conf")).unwrap_or_default();
        existing.push_str(&conf);
        existing.push_str(extra_conf);
        std::fs::write(data.join("postgresql.conf"), existing).expect("write postgresql.conf");
        let cluster = PgCluster { dir, port, bindir };
        cluster.pg_ctl_start();
        cluster
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn pg_ctl_start(&self) {
        let log = self.dir.path().join("postgres.log").display().to_string();
        let out = pg_command(
            &self.bindir,
            "pg_ctl",
            &["-D", &self.data(), "-l", &log, "-w", "-t", "60", "start"],
        );
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Stop with the given mode (`fast`, `immediate`) and start again.
    pub fn restart(&self, mode: &str) {
        pg_command(
            &self.bindir,
            "pg_ctl",
            &["-D", &self.data(), "-m", mode, "-w", "stop"],
        );
        self.pg_ctl_start();
    }

    /// A connection string for tools.
    /// The postmaster's process id (its children are the backends).
    pub fn postmaster_pid(&self) -> u32 {
        let pidfile = self.dir.path().join("data/postmaster.pid");
        let text = std::fs::read_to_string(pidfile).expect("postmaster.pid");
        text.lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .expect("pid in postmaster.pid")
    }

    pub fn url(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        )
    }

    /// A SQL client (its connection runs in the background).
    pub async fn client(&self) -> Client {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match tokio_postgres::connect(&self.url(), NoTls).await {
                Ok((client, conn)) => {
                    tokio::spawn(conn);
                    return client;
                }
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("cannot connect to the test cluster: {e}"),
            }
        }
    }

    /// The slot's confirmed_flush_lsn as a number, if the slot exists.
    pub async fn confirmed_flush(&self, client: &Client, slot: &str) -> Option<u64> {
        let row = client
            .query_opt("SELECT (confirmed_flush_lsn - '0/0')::bigint FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
            .await
            .expect("query slot")?;
        row.get::<_, Option<i64>>(0).map(|v| v as u64)
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        pg_command(
            &self.bindir,
            "pg_ctl",
            &["-D", &self.data(), "-m", "immediate", "stop"],
        );
    }
}
