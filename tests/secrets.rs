//! No secret leaks: a distinct sentinel in every secret-bearing setting, a
//! run with retries and errors, then every output a person or a scraper
//! sees is searched for the sentinels.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use pgcdc_testkit::certs::TestCa;
use pgcdc_testkit::proxy::tls::TlsTerminator;

use crate::support::{config, free_port, pgcdc, read_until, PgCluster, Tansu};

const PG_PASSWORD: &str = "pg-sentinel-7f3a";
const PG_WRONG: &str = "pg-wrong-sentinel-c0de";
const KAFKA_PASSWORD: &str = "kafka-sentinel-91c2";
const ES_PASSWORD: &str = "es-sentinel-55d1";
const ES_API_KEY: &str = "es-apikey-sentinel-2b8e";
const ALL: [&str; 5] = [
    PG_PASSWORD,
    PG_WRONG,
    KAFKA_PASSWORD,
    ES_PASSWORD,
    ES_API_KEY,
];

/// Fail if any sentinel is in `text`.
fn assert_clean(what: &str, text: &str) {
    for s in ALL {
        assert!(!text.contains(s), "{what} shows {s}:\n{text}");
    }
}

/// The `[elasticsearch]` section with `auth`, over https to `port`.
fn es(port: u16, ca: &Path, auth: &str) -> String {
    format!(
        "\n[elasticsearch]\nrun_in_daemon = true\nurl = \"https://localhost:{port}\"\n\
         ca_file = {:?}\nretry_max_ms = 200\n{auth}\n",
        ca.display().to_string()
    )
}

/// Output of a one-shot `pgcdc` command, both streams.
fn run(dir: &Path, cfg: &str, args: &[&str]) -> String {
    let path = dir.join("oneshot.toml");
    std::fs::write(&path, cfg).unwrap();
    let out = pgcdc(&path, args);
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_appears_in_any_output() {
    let pg = PgCluster::start_with_password(PG_PASSWORD).unwrap();
    let tansu = Tansu::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = pg.client().await.unwrap();
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    // Search over https, to a terminator whose upstream is gone: every bulk
    // request fails and is retried (and logged) while the stream runs.
    let ca = TestCa::new("sentinel ca").unwrap();
    let ca_file = ca.write(&dir.path().join("ca.crt")).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let es_port = listener.local_addr().unwrap().port();
    let cert = ca.issue(&["localhost"], "search").unwrap();
    let _terminator = TlsTerminator::start(listener, &cert, free_port()).unwrap();
    let metrics = free_port();
    let kafka = format!(
        "[kafka.properties]\n\"sasl.username\" = \"pgcdc\"\n\"sasl.password\" = \"{KAFKA_PASSWORD}\"\n"
    );
    let base = config(&pg, &tansu, &dir.path().join("state"), &["t"], &kafka).replace(
        "listen = \"\"",
        &format!("listen = \"127.0.0.1:{metrics}\""),
    );
    let basic = format!("username = \"pgcdc\"\npassword = \"{ES_PASSWORD}\"\n");
    let cfg = base.clone() + &es(es_port, &ca_file, &basic);

    let env = [("PGCDC_POSTGRES__PASSWORD", PG_PASSWORD)];
    let mut daemon = crate::support::daemon(dir.path(), &cfg, &env);
    crate::support::wait_slot_active(&db, &mut daemon, "pgcdc").await;
    db.batch_execute("INSERT INTO t VALUES (1, 'x')")
        .await
        .unwrap();
    read_until(&tansu, "cdc-events", Duration::from_secs(60), |r| {
        !r.is_empty()
    });
    let retried = "elasticsearch request failed; retrying";
    daemon
        .wait_log(retried, Duration::from_secs(60))
        .await
        .unwrap();
    let scraped = reqwest::get(format!("http://127.0.0.1:{metrics}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(scraped.contains("pgcdc_"), "{scraped}");
    assert_clean("/metrics", &scraped);

    let with_pw = base.replace(
        "[postgres]\n",
        &format!("[postgres]\npassword = \"{PG_PASSWORD}\"\n"),
    );
    let api = format!("api_key = \"{ES_API_KEY}\"\n");
    let status = run(
        dir.path(),
        &(with_pw.clone() + &es(es_port, &ca_file, &api)),
        &["status"],
    );
    assert!(status.contains("checkpoint lsn"), "{status}");
    assert_clean("pgcdc status", &status);
    daemon.terminate(Duration::from_secs(30)).unwrap();
    assert_clean("the console", &daemon.log_text());

    let check = run(
        dir.path(),
        &(with_pw + &es(es_port, &ca_file, &basic)),
        &["check"],
    );
    assert!(check.contains("ok    postgresql"), "{check}");
    assert_clean("pgcdc check", &check);
    let wrong = base.replace(
        "[postgres]\n",
        &format!("[postgres]\npassword = \"{PG_WRONG}\"\n"),
    );
    let refused = run(
        dir.path(),
        &(wrong + &es(es_port, &ca_file, &api)),
        &["check"],
    );
    assert!(
        refused.contains("password authentication failed"),
        "{refused}"
    );
    assert_clean("pgcdc check with a wrong password", &refused);
    // Credentials in the URL and over plain http are refused without echoing them.
    let in_url = base.clone()
        + &format!("\n[elasticsearch]\nurl = \"https://pgcdc:{ES_PASSWORD}@localhost:9200\"\n");
    let refused = run(dir.path(), &in_url, &["check"]);
    assert!(refused.contains("elasticsearch.url"), "{refused}");
    assert_clean("a refused url", &refused);

    let logs = run(dir.path(), &base, &["logs", "--limit", "100000"]);
    assert!(logs.contains(retried), "{logs}");
    assert_clean("pgcdc logs", &logs);
    assert_files_clean(&dir.path().join("state"));
}

/// Fail if any file under `dir` (the audit database and its WAL, the
/// checkpoint store) holds a sentinel.
fn assert_files_clean(dir: &Path) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            assert_files_clean(&path);
        } else {
            let bytes = std::fs::read(&path).unwrap();
            assert_clean(
                &path.display().to_string(),
                &String::from_utf8_lossy(&bytes),
            );
        }
    }
}
