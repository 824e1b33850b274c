//! PostgreSQL over TLS: a cluster that takes TCP connections over TLS only,
//! with certificates made by the test; each `postgres.sslmode` against it,
//! and a whole stream through it.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use pgcdc_testkit::certs::TestCa;
use pgcdc_testkit::pg::ServerTls;

use crate::support::{config, pgcdc, read_until, Broker, PgCluster, Tansu};

/// A TLS-only cluster whose certificate lists `names`, and its CA file.
fn tls_cluster(dir: &Path, names: &[&str], client_cert: bool) -> (PgCluster, TestCa, PathBuf) {
    let ca = TestCa::new("pgcdc test ca").unwrap();
    let pg = PgCluster::start_tls(&ServerTls {
        ca: &ca,
        names,
        client_cert,
    })
    .unwrap();
    let ca_file = ca.write(&dir.join("ca.crt")).unwrap();
    (pg, ca, ca_file)
}

/// The test configuration with `postgres_keys` in place of the host.
fn tls_config(pg: &PgCluster, broker: &dyn Broker, dir: &Path, postgres_keys: &str) -> String {
    let state = dir.join("state");
    config(pg, broker, &state, &["t"], "").replace("host = \"127.0.0.1\"\n", postgres_keys)
}

/// `pgcdc check` with `postgres_keys`.
fn check(pg: &PgCluster, broker: &dyn Broker, dir: &Path, postgres_keys: &str) -> (Output, String) {
    let path = dir.join("check.toml");
    std::fs::write(&path, tls_config(pg, broker, dir, postgres_keys)).unwrap();
    let out = pgcdc(&path, &["check"]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, text)
}

/// `host`, `sslmode` and `sslrootcert` lines.
fn keys(host: &str, mode: &str, root: Option<&Path>) -> String {
    let root = root.map_or(String::new(), |p| {
        format!("sslrootcert = {:?}\n", p.display().to_string())
    });
    format!("host = {host:?}\nsslmode = {mode:?}\n{root}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_streams_end_to_end_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (pg, _ca, ca_file) = tls_cluster(dir.path(), &["localhost"], false);
    let tansu = Tansu::start().unwrap();
    let db = pg.client().await.unwrap();
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let pg_keys = keys("localhost", "verify-full", Some(&ca_file));

    let (out, text) = check(&pg, &tansu, dir.path(), &pg_keys);
    assert_eq!(out.status.code(), Some(0), "{text}");
    let verified = "encrypted (TLSv1.3), server certificate verified (ca and host name)";
    assert!(
        text.contains(&format!("sql connection {verified}")),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "ok    postgresql replication connection: {verified}"
        )),
        "{text}"
    );

    let cfg = tls_config(&pg, &tansu, dir.path(), &pg_keys);
    let mut daemon = crate::support::daemon(dir.path(), &cfg, &[]);
    crate::support::wait_slot_active(&db, &mut daemon, "pgcdc").await;
    db.batch_execute("INSERT INTO t VALUES (1, 'over tls')")
        .await
        .unwrap();
    let records = read_until(&tansu, "cdc-events", Duration::from_secs(60), |r| {
        r.iter().any(|r| r.after()["v"] == "over tls")
    });
    assert!(!records.is_empty());
    // The walsender streaming now (the slot may have been held a moment
    // earlier by the connection that created it, then by none).
    let q = "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_replication_slots r ON r.active_pid = s.pid \
             WHERE r.slot_name = 'pgcdc'";
    let walsender_ssl: bool = pgcdc_testkit::wait::poll(
        "the slot's walsender in pg_stat_ssl",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async {
            match db.query_opt(q, &[]).await {
                Ok(Some(row)) => pgcdc_testkit::wait::Poll::Ready(row.get(0)),
                other => pgcdc_testkit::wait::Poll::Pending(format!("{other:?}")),
            }
        },
    )
    .await
    .unwrap();
    assert!(walsender_ssl, "the replication connection is not encrypted");
    let log = daemon.log_text();
    for connection in ["sql", "replication"] {
        let line = log
            .lines()
            .find(|l| {
                l.contains("postgresql connection security")
                    && l.contains(&format!("connection=\"{connection}\""))
            })
            .unwrap_or_else(|| panic!("no {connection} security line in:\n{log}"));
        assert!(
            line.contains("encrypted=true") && line.contains("verified=\"ca and host name\""),
            "{line}"
        );
    }
    daemon.terminate(Duration::from_secs(30)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_sslmode_is_honoured_and_failures_say_what_to_change() {
    let dir = tempfile::tempdir().unwrap();
    let (pg, _ca, ca_file) = tls_cluster(dir.path(), &["db.pgcdc.invalid"], false);
    let tansu = Tansu::start().unwrap();
    let db = pg.client().await.unwrap();
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let other_ca = TestCa::new("someone else").unwrap();
    let other_file = other_ca.write(&dir.path().join("other.crt")).unwrap();
    let run = |keys: String| check(&pg, &tansu, dir.path(), &keys);

    let (out, text) = run(keys("localhost", "verify-full", Some(&ca_file)));
    assert_eq!(out.status.code(), Some(4), "{text}");
    assert!(
        text.contains("does not match the host \"localhost\""),
        "{text}"
    );

    let (out, text) = run(keys("localhost", "verify-ca", Some(&other_file)));
    assert_eq!(out.status.code(), Some(4), "{text}");
    assert!(
        text.contains("certificate is not trusted") && text.contains("postgres.sslrootcert"),
        "{text}"
    );

    // verify-ca: the CA is checked, the host name is not, on both connections.
    let (out, text) = run(keys("localhost", "verify-ca", Some(&ca_file)));
    assert_eq!(out.status.code(), Some(0), "{text}");
    let ca_only = "encrypted (TLSv1.3), server certificate verified (ca)";
    assert!(
        text.contains(&format!("sql connection {ca_only}")),
        "{text}"
    );
    assert!(
        text.contains(&format!("replication connection: {ca_only}")),
        "{text}"
    );

    let (out, text) = run(keys("localhost", "require", None));
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("encrypted (TLSv1.3), server certificate NOT verified (sslmode = require"),
        "{text}"
    );

    let (out, text) = run(keys("localhost", "disable", None));
    assert_eq!(out.status.code(), Some(4), "{text}");
    assert!(
        text.contains("the server requires TLS") && text.contains("set postgres.sslmode"),
        "{text}"
    );

    let missing = Path::new("/nonexistent/ca.pem");
    let (out, text) = run(keys("localhost", "verify-full", Some(missing)));
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("postgres.sslrootcert: cannot use /nonexistent/ca.pem"),
        "{text}"
    );

    // The daemon stops with the same words and exit code instead of retrying.
    let cfg = tls_config(
        &pg,
        &tansu,
        dir.path(),
        &keys("localhost", "verify-full", Some(&ca_file)),
    );
    let mut daemon = crate::support::daemon(dir.path(), &cfg, &[]);
    let status = daemon.wait_exit(Duration::from_secs(60)).unwrap();
    assert_eq!(status.code(), Some(4), "{}", daemon.log_text());
    assert!(
        daemon.log_text().contains("does not match the host"),
        "{}",
        daemon.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_refuses_a_server_without_tls_and_prefer_reports_plain_text() {
    let dir = tempfile::tempdir().unwrap();
    let pg = PgCluster::start().unwrap();
    let tansu = Tansu::start().unwrap();
    let db = pg.client().await.unwrap();
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let (out, text) = check(&pg, &tansu, dir.path(), &keys("127.0.0.1", "require", None));
    assert_eq!(out.status.code(), Some(4), "{text}");
    assert!(
        text.contains("the server does not support TLS (postgres.sslmode = require)"),
        "{text}"
    );
    let (out, text) = check(&pg, &tansu, dir.path(), &keys("127.0.0.1", "prefer", None));
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains(
            "replication connection: not encrypted (sslmode = prefer: the server offers no TLS)"
        ),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_is_presented_when_the_server_requires_one() {
    let dir = tempfile::tempdir().unwrap();
    let (pg, ca, ca_file) = tls_cluster(dir.path(), &["localhost"], true);
    let tansu = Tansu::start().unwrap();
    let db = pg.client().await.unwrap();
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let server_keys = keys("localhost", "verify-full", Some(&ca_file));
    let (out, text) = check(&pg, &tansu, dir.path(), &server_keys);
    assert_ne!(
        out.status.code(),
        Some(0),
        "accepted without a client certificate: {text}"
    );

    let (cert, key) = ca
        .issue(&[], "postgres")
        .unwrap()
        .write(dir.path(), "client")
        .unwrap();
    let with_cert = format!(
        "{server_keys}sslcert = {:?}\nsslkey = {:?}\n",
        cert.display().to_string(),
        key.display().to_string()
    );
    let (out, text) = check(&pg, &tansu, dir.path(), &with_cert);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("replication connection: encrypted"), "{text}");
}
