//! What the test areas share beyond `pgcdc-testkit`: the `pgcdc` binary
//! under test, and the kit's fallible calls in the shape tests want (a
//! failure fails the test with the kit's message).

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

pub use pgcdc_testkit::config::daemon_config as config;
pub use pgcdc_testkit::{
    wait, Broker, Daemon, MockBroker, PgCluster, Record, SearchServer, Tansu, TopicReader,
};

/// The daemon under test.
pub const PGCDC: &str = env!("CARGO_BIN_EXE_pgcdc");

/// How long a whole-topic read may take.
const READ_ALL: Duration = Duration::from_secs(60);
/// How long a topic must stay quiet before a whole-topic read ends.
const QUIET: Duration = Duration::from_secs(1);

/// A private PostgreSQL cluster, a tansu broker, a scratch directory and a
/// SQL client: what most integration tests start from.
pub async fn pg_and_tansu() -> (PgCluster, Tansu, tempfile::TempDir, tokio_postgres::Client) {
    let pg = PgCluster::start().expect("postgresql");
    let tansu = Tansu::start().expect("tansu");
    let dir = tempfile::tempdir().expect("tempdir");
    let db = pg.client().await.expect("sql client");
    (pg, tansu, dir, db)
}

/// Start `pgcdc run` with `config_toml` in `dir`.
pub fn daemon(dir: &Path, config_toml: &str, envs: &[(&str, &str)]) -> Daemon {
    daemon_cmd(dir, config_toml, envs, "run")
}

/// Start `pgcdc <command>` with `config_toml` in `dir`.
pub fn daemon_cmd(dir: &Path, config_toml: &str, envs: &[(&str, &str)], command: &str) -> Daemon {
    Daemon::start(Path::new(PGCDC), dir, config_toml, command, envs).expect("start pgcdc")
}

/// Run a one-shot `pgcdc` command with `config`; its output.
pub fn pgcdc(config: &Path, args: &[&str]) -> Output {
    pgcdc_testkit::daemon::pgcdc(Path::new(PGCDC), config, args).expect("run pgcdc")
}

/// Write `cfg` as `dir/pgcdc.toml` and assert that `pgcdc check` reaches
/// the one broker; the file's path.
pub fn check_reaches_kafka(dir: &Path, cfg: &str) -> PathBuf {
    let path = dir.join("pgcdc.toml");
    std::fs::write(&path, cfg).expect("write pgcdc.toml");
    let out = pgcdc(&path, &["check"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("ok    kafka: 1 brokers"), "{text}");
    path
}

/// The `kafka-mock` binary (built beside `pgcdc` by `cargo test --workspace`).
pub fn kafka_mock() -> PathBuf {
    Path::new(PGCDC).with_file_name("kafka-mock")
}

/// A mock cluster of one broker.
pub fn mock_broker() -> MockBroker {
    let exe = kafka_mock();
    MockBroker::start(&exe, 1).unwrap_or_else(|e| {
        panic!(
            "{e:#} ({} missing? cargo build -p pgcdc-testkit --bins)",
            exe.display()
        )
    })
}

/// Wait until the daemon holds `slot` with an active walsender.
pub async fn wait_slot_active(db: &tokio_postgres::Client, daemon: &mut Daemon, slot: &str) {
    pgcdc_testkit::pg::wait_slot_active(db, daemon, slot)
        .await
        .expect("slot active");
}

/// Read `topic` from the beginning until `done` holds.
pub fn read_until(
    broker: &dyn Broker,
    topic: &str,
    timeout: Duration,
    done: impl Fn(&[Record]) -> bool,
) -> Vec<Record> {
    let reader = TopicReader::new(&broker.brokers()).expect("reader");
    reader.read_until(topic, timeout, done).expect("read topic")
}

/// Read everything in `topic`.
pub fn read_all(broker: &dyn Broker, topic: &str) -> Vec<Record> {
    let reader = TopicReader::new(&broker.brokers()).expect("reader");
    reader.read_all(topic, QUIET, READ_ALL).expect("read topic")
}

/// A free port on 127.0.0.1.
pub fn free_port() -> u16 {
    pgcdc_testkit::free_port().expect("free port")
}

/// `GET url`: the status and body, or `None` if the request failed.
pub async fn get(url: &str) -> Option<(u16, String)> {
    let resp = reqwest::get(url).await.ok()?;
    let status = resp.status().as_u16();
    Some((status, resp.text().await.ok()?))
}

/// The value of `metric` with every label in `labels`, if present in the Prometheus `text`.
pub fn sample(text: &str, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let scrape =
        prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("parses");
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .find_map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => Some(v),
            _ => None,
        })
}

/// A daemon's metrics endpoint (`/metrics`, `/ready`).
pub struct Probe {
    /// `http://127.0.0.1:<port>`.
    pub base: String,
}

impl Probe {
    /// The endpoint listening on `port` of 127.0.0.1.
    pub fn on(port: u16) -> Probe {
        Probe {
            base: format!("http://127.0.0.1:{port}"),
        }
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        get(&format!("{}/metrics", self.base))
            .await
            .expect("/metrics")
            .1
    }

    /// The `/ready` status and body.
    pub async fn ready(&self) -> (u16, String) {
        get(&format!("{}/ready", self.base)).await.expect("/ready")
    }

    /// Poll until `cond(metrics text, /ready status)` holds (an endpoint
    /// not listening yet is waited for).
    pub async fn until(&self, what: &str, daemon: &mut Daemon, cond: impl Fn(&str, u16) -> bool) {
        self.until_within(what, Duration::from_secs(60), daemon, cond)
            .await;
    }

    /// [`Probe::until`], waiting up to `within`.
    pub async fn until_within(
        &self,
        what: &str,
        within: Duration,
        daemon: &mut Daemon,
        cond: impl Fn(&str, u16) -> bool,
    ) {
        let every = Duration::from_millis(200);
        wait::poll(what, within, every, || async {
            let text = get(&format!("{}/metrics", self.base)).await;
            let ready = get(&format!("{}/ready", self.base)).await;
            let (Some((_, text)), Some((ready, _))) = (text, ready) else {
                return wait::Poll::Pending("metrics endpoint not answering".into());
            };
            if cond(&text, ready) {
                wait::Poll::Ready(())
            } else if !daemon.is_running() {
                wait::Poll::Abort(format!("pgcdc exited:\n{}", daemon.log_text()))
            } else {
                wait::Poll::Pending(format!("/ready {ready}; metrics:\n{text}"))
            }
        })
        .await
        .expect("condition reached");
    }
}

/// The number of observations of histogram `metric` with `labels` (`{a="b"}`) in `text`.
pub fn histogram_count(text: &str, metric: &str, labels: &str) -> f64 {
    let prefix = format!("{metric}_count{labels} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// A session of `pg` whose commits wait for a synchronous standby that
/// never connects, while every other session (pgcdc's too) commits
/// locally; [`release_commits`] ends the wait. `admin` changes the settings.
pub async fn waiting_writer(
    pg: &PgCluster,
    admin: &tokio_postgres::Client,
) -> tokio_postgres::Client {
    for sql in [
        "ALTER SYSTEM SET synchronous_standby_names = 'nobody'",
        "ALTER SYSTEM SET synchronous_commit = 'local'",
        "SELECT pg_reload_conf()",
    ] {
        admin.batch_execute(sql).await.expect("commit settings");
    }
    let writer = pg.client().await.expect("writer session");
    writer
        .batch_execute("SET synchronous_commit = on")
        .await
        .expect("synchronous_commit");
    until_commits_wait(&writer, admin).await;
    writer
}

/// Return once `session`'s commits wait for the synchronous standby named
/// in settings just reloaded. A session reads new names at its next
/// statement, but its commits wait only once the checkpointer has read them
/// too: commit a transaction that writes WAL (a temporary table's catalog
/// rows, which pgcdc does not stream) until one waits, then cancel that
/// wait (it stays committed).
pub async fn until_commits_wait(session: &tokio_postgres::Client, admin: &tokio_postgres::Client) {
    let pid: i32 = session
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("session pid")
        .get(0);
    wait::poll(
        "a commit of the session to wait for the standby",
        Duration::from_secs(30),
        Duration::from_millis(50),
        || async {
            let commit = session.batch_execute(
                "BEGIN; CREATE TEMP TABLE commit_probe (x int) ON COMMIT DROP; COMMIT",
            );
            tokio::pin!(commit);
            loop {
                tokio::select! {
                    done = &mut commit => {
                        done.expect("probe commit");
                        return wait::Poll::Pending("a commit did not wait".into());
                    }
                    () = tokio::time::sleep(Duration::from_millis(20)) => {
                        let waits: i64 = admin
                            .query_one(
                                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND wait_event = 'SyncRep'",
                                &[&pid],
                            )
                            .await
                            .expect("session's wait")
                            .get(0);
                        if waits == 1 {
                            admin
                                .execute("SELECT pg_cancel_backend($1)", &[&pid])
                                .await
                                .expect("cancel the probe's wait");
                            commit.await.expect("cancelled probe commit");
                            return wait::Poll::Ready(());
                        }
                    }
                }
            }
        },
    )
    .await
    .expect("commits wait for the standby");
}

/// End the waits [`waiting_writer`] set up (cancelled, a waiting commit
/// stands and becomes visible) and restore the settings.
pub async fn release_commits(admin: &tokio_postgres::Client) {
    for sql in [
        "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE wait_event = 'SyncRep'",
        "ALTER SYSTEM RESET synchronous_standby_names",
        "ALTER SYSTEM RESET synchronous_commit",
        "SELECT pg_reload_conf()",
    ] {
        admin.batch_execute(sql).await.expect("commit settings");
    }
}
