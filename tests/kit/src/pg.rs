//! A private PostgreSQL cluster: initdb in a temp dir, `wal_level=logical`,
//! a free port on 127.0.0.1; trust authentication, or SCRAM with a password,
//! or TLS only (`hostssl`) with a certificate from a test CA.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio_postgres::{Client, NoTls};

use crate::certs::TestCa;
use crate::daemon::Daemon;
use crate::wait::{self, Poll};
use crate::{free_port, is_root};

/// How long a client keeps trying to connect to a cluster that is starting.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a daemon gets to take its slot over with an active walsender.
const SLOT_ACTIVE_TIMEOUT: Duration = Duration::from_secs(60);

/// Settings every test cluster gets (replication, prepared transactions, no
/// fsync: tests need no durability).
const BASE_CONF: &str = "listen_addresses = '127.0.0.1'\nwal_level = logical\n\
     max_replication_slots = 10\nmax_wal_senders = 10\nfsync = off\nsynchronous_commit = on\n\
     wal_sender_timeout = 60s\nshared_buffers = 64MB\nmax_prepared_transactions = 10\n";

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

/// `$PG_BINDIR`, else what `pg_config --bindir` says.
fn bindir() -> Result<PathBuf> {
    if let Ok(dir) = std::env::var("PG_BINDIR") {
        return Ok(dir.into());
    }
    let out = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .context("pg_config not found: install the PostgreSQL server packages")?;
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// How a TLS cluster serves TCP clients: only over TLS (`hostssl`), with a
/// certificate for `names` signed by `ca`.
pub struct ServerTls<'a> {
    /// The CA that signs the server certificate (and trusted client certificates).
    pub ca: &'a TestCa,
    /// DNS names the server certificate lists.
    pub names: &'a [&'a str],
    /// Whether clients must present a certificate signed by `ca` whose
    /// common name is their user name.
    pub client_cert: bool,
}

/// A running cluster, stopped (immediately) and deleted on drop.
pub struct PgCluster {
    dir: tempfile::TempDir,
    /// TCP port on 127.0.0.1.
    pub port: u16,
    /// The superuser's password when host connections use SCRAM (empty: trust).
    pub password: String,
    /// TCP takes TLS only; the kit's own clients use the Unix socket.
    tls: bool,
    bindir: PathBuf,
}

impl PgCluster {
    /// initdb and start a cluster for logical replication (trust authentication).
    pub fn start() -> Result<PgCluster> {
        PgCluster::launch("", "", None)
    }

    /// Like [`PgCluster::start`], with extra `postgresql.conf` lines.
    pub fn start_with(extra_conf: &str) -> Result<PgCluster> {
        PgCluster::launch("", extra_conf, None)
    }

    /// A cluster whose TCP connections (replication included) authenticate with SCRAM.
    pub fn start_with_password(password: &str) -> Result<PgCluster> {
        PgCluster::launch(password, "", None)
    }

    /// A cluster with `ssl = on` whose TCP connections (replication
    /// included) must use TLS: a client without it gets "no pg_hba.conf entry
    /// ... no encryption".
    pub fn start_tls(tls: &ServerTls<'_>) -> Result<PgCluster> {
        PgCluster::launch("", "", Some(tls))
    }

    fn launch(password: &str, extra_conf: &str, tls: Option<&ServerTls<'_>>) -> Result<PgCluster> {
        let dir = tempfile::Builder::new().prefix("pgcdc-pg-").tempdir()?;
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
        let bindir = bindir()?;
        let data = dir.path().join("data").display().to_string();
        let pw_arg = format!("--pwfile={}", pwfile.display());
        let mut args = vec!["-D", &data, "-U", "postgres", "-E", "UTF8", "--locale=C"];
        args.push("--no-sync");
        if password.is_empty() {
            args.extend(["-A", "trust"]);
        } else {
            args.extend(["--auth-local=trust", "--auth-host=scram-sha-256", &pw_arg]);
        }
        let out = pg_command(&bindir, "initdb", &args)?;
        if !out.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let port = free_port()?;
        let conf_path = dir.path().join("data/postgresql.conf");
        let mut conf = std::fs::read_to_string(&conf_path)?;
        conf.push_str(&format!(
            "port = {port}\nunix_socket_directories = '{}'\n{BASE_CONF}{extra_conf}",
            dir.path().display()
        ));
        if let Some(tls) = tls {
            conf.push_str(&serve_tls(&dir.path().join("data"), tls)?);
        }
        std::fs::write(&conf_path, conf)?;
        let cluster = PgCluster {
            dir,
            port,
            password: password.to_owned(),
            tls: tls.is_some(),
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
        pg_command(
            &self.bindir,
            "pg_ctl",
            &["-D", &self.data(), "-m", mode, "-w", "stop"],
        )?;
        self.pg_ctl_start()
    }

    /// The postmaster's process id (its children are the backends).
    pub fn postmaster_pid(&self) -> Result<u32> {
        let text = std::fs::read_to_string(self.dir.path().join("data/postmaster.pid"))?;
        text.lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .context("no pid in postmaster.pid")
    }

    /// A connection string for SQL clients and tools (over the Unix socket
    /// when TCP takes TLS only).
    pub fn url(&self) -> String {
        let host = match self.tls {
            true => self.dir.path().display().to_string(),
            false => "127.0.0.1".into(),
        };
        let mut url = format!(
            "host={host} port={} user=postgres dbname=postgres",
            self.port
        );
        if !self.password.is_empty() {
            url.push_str(&format!(" password={}", self.password));
        }
        url
    }

    /// A SQL client (its connection runs in the background); retries while the cluster starts.
    pub async fn client(&self) -> Result<Client> {
        connect(&self.url(), CONNECT_TIMEOUT).await
    }

    /// The slot's `confirmed_flush_lsn` as a number, if the slot exists.
    pub async fn confirmed_flush(&self, client: &Client, slot: &str) -> Result<Option<u64>> {
        confirmed_flush(client, slot).await
    }
}

/// Write the server certificate, its key and the CA into `data`, allow TCP
/// over TLS only; the `postgresql.conf` lines that turn TLS on.
fn serve_tls(data: &Path, tls: &ServerTls<'_>) -> Result<String> {
    tls.ca.write(&data.join("ca.crt"))?;
    tls.ca
        .issue(tls.names, tls.names[0])?
        .write(data, "server")?;
    let client = if tls.client_cert {
        " clientcert=verify-full"
    } else {
        ""
    };
    let hba = format!(
        "local all all trust\nhostssl all all 127.0.0.1/32 trust{client}\n\
         hostssl replication all 127.0.0.1/32 trust{client}\n"
    );
    std::fs::write(data.join("pg_hba.conf"), hba)?;
    if is_root() {
        let files = ["ca.crt", "server.crt", "server.key", "pg_hba.conf"].map(|f| data.join(f));
        let ok = Command::new("chown")
            .arg("postgres:postgres")
            .args(files)
            .status()?;
        if !ok.success() {
            bail!("chown of the certificate files failed");
        }
    }
    Ok("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\nssl_ca_file = 'ca.crt'\n".into())
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let stop = ["-D", &self.data(), "-m", "immediate", "stop"];
        let _ = pg_command(&self.bindir, "pg_ctl", &stop);
    }
}

/// Connect to `url`, retrying until `timeout` passes.
pub async fn connect(url: &str, timeout: Duration) -> Result<Client> {
    let what = format!("a connection to {url}");
    let every = Duration::from_millis(100);
    let client = wait::retry(&what, timeout, every, || async {
        let (client, conn) = tokio_postgres::connect(url, NoTls).await?;
        tokio::spawn(conn);
        Ok::<_, tokio_postgres::Error>(client)
    })
    .await?;
    Ok(client)
}

/// The slot's `confirmed_flush_lsn` as a number, if the slot exists.
pub async fn confirmed_flush(client: &Client, slot: &str) -> Result<Option<u64>> {
    let q = "SELECT (confirmed_flush_lsn - '0/0')::bigint FROM pg_replication_slots WHERE slot_name = $1";
    let row = client.query_opt(q, &[&slot]).await?;
    Ok(row
        .and_then(|r| r.get::<_, Option<i64>>(0))
        .map(|v| v as u64))
}

/// Wait until `daemon` holds `slot` with an active walsender; fails if it exits first.
pub async fn wait_slot_active(db: &Client, daemon: &mut Daemon, slot: &str) -> Result<()> {
    let q = "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND active";
    let what = format!("slot {slot} to become active");
    wait::poll(&what, SLOT_ACTIVE_TIMEOUT, wait::EVERY, || async {
        if !daemon.is_running() {
            return Poll::Abort(format!("pgcdc exited; log:\n{}", daemon.log_tail()));
        }
        let active = db.query_opt(q, &[&slot]).await.ok().flatten().is_some();
        Poll::when(active, (), || {
            format!("inactive; log:\n{}", daemon.log_tail())
        })
    })
    .await?;
    Ok(())
}
