//! `pgcdc verify` against a live pipeline (PostgreSQL, tansu, osmem-server,
//! the daemon with its sink): drift made behind pgcdc's back is reported
//! with its key and kind and repaired under a concurrent writer; a writer
//! at full speed, or a transaction still committing, causes no false drift.

#![allow(clippy::unwrap_used)]

use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pgcdc_testkit::oracle::{self, Want};
use serde_json::{json, Value};

use crate::support::{config, Daemon, PgCluster, Probe, SearchServer, Tansu};
use pgcdc_testkit::Broker;

/// The mirror of `public.items`.
const INDEX: &str = "cdc_public_items";
/// Rows the table starts with.
const ROWS: i64 = 300;

/// A pipeline with its sink in the daemon, streaming `items`, mirror in step.
struct Rig {
    pg: PgCluster,
    _broker: Tansu,
    es: SearchServer,
    _dir: tempfile::TempDir,
    daemon: Daemon,
}

async fn rig() -> Rig {
    rig_with("", None).await
}

/// [`rig`] with `extra` appended to the daemon's configuration, and its
/// metrics served on `metrics_port` if given.
async fn rig_with(extra: &str, metrics_port: Option<u16>) -> Rig {
    let (pg, broker, dir, db) = crate::support::pg_and_tansu().await;
    broker.create_topic("cdc-events", 1).unwrap();
    let es = SearchServer::start().unwrap();
    db.batch_execute(&format!(
        "CREATE TABLE items (id int PRIMARY KEY, name text, n int);
         INSERT INTO items SELECT g, 'item ' || g, g FROM generate_series(1, {ROWS}) g;"
    ))
    .await
    .unwrap();
    let cfg = config(&pg, &broker, &dir.path().join("state"), &["public.items"], "")
        + &format!("\n[elasticsearch]\nrun_in_daemon = true\nurl = {:?}\nnumber_of_replicas = 0\nflush_interval_ms = 50\n", es.url)
        + extra;
    let cfg = match metrics_port {
        Some(port) => pgcdc_testkit::config::with_metrics(&cfg, port),
        None => cfg,
    };
    let mut daemon = crate::support::daemon(dir.path(), &cfg, &[]);
    crate::support::wait_slot_active(&db, &mut daemon, "pgcdc").await;
    let rig = Rig {
        pg,
        _broker: broker,
        es,
        _dir: dir,
        daemon,
    };
    rig.mirrored(Duration::from_secs(90)).await;
    rig
}

impl Rig {
    /// Wait up to `within` until the mirror equals the table.
    async fn mirrored(&self, within: Duration) {
        let want = Want::Verified {
            pg: &self.pg,
            table: "public.items",
        };
        oracle::mirror_equals(&self.es.url, INDEX, want, within, Some(&self.daemon))
            .await
            .unwrap();
    }
}

/// `pgcdc verify` with `args`: its exit code and its JSON reports.
fn verify(daemon: &Daemon, args: &[&str]) -> (i32, Vec<Value>, String) {
    let mut all = vec!["verify", "--format", "json"];
    all.extend(args);
    let out: Output = daemon.run(&all).unwrap();
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let reports = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    (out.status.code().unwrap_or(-1), reports, text)
}

/// The ids a report shows for `kind`.
fn shown(report: &Value, kind: &str) -> Vec<String> {
    report[kind]["first"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|f| f["id"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Change the mirror behind pgcdc's back: one document deleted, one field
/// changed, one stray document added.
async fn tamper(es: &str) {
    let http = reqwest::Client::new();
    let ok = |r: reqwest::Response| assert!(r.status().is_success(), "{}", r.status());
    ok(http
        .delete(format!("{es}/{INDEX}/_doc/5"))
        .send()
        .await
        .unwrap());
    let changed = json!({"doc": {"name": "tampered"}});
    ok(http
        .post(format!("{es}/{INDEX}/_update/6"))
        .json(&changed)
        .send()
        .await
        .unwrap());
    let stray = json!({"id": 100_000, "name": "stray", "n": 0});
    ok(http
        .put(format!("{es}/{INDEX}/_doc/100000"))
        .json(&stray)
        .send()
        .await
        .unwrap());
}

/// The writer's pause between changes.
const WRITE_PAUSE: std::time::Duration = std::time::Duration::from_millis(2);

/// Update, delete and re-insert rows 100.. until `stop`.
fn writer(db: tokio_postgres::Client, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let id = 100 + (i % 200) as i32;
            let q = match i % 3 {
                0 => format!("UPDATE items SET n = n + 1, name = 'w{i}' WHERE id = {id}"),
                1 => format!("DELETE FROM items WHERE id = {id}"),
                _ => format!("INSERT INTO items VALUES ({id}, 'w{i}', 0) ON CONFLICT (id) DO UPDATE SET n = 0"),
            };
            db.batch_execute(&q).await.unwrap();
            i += 1;
            // About 500 changes/s: concurrent with verify, and a pace the
            // debug-build pipeline keeps up with on 2 loaded cores.
            tokio::time::sleep(WRITE_PAUSE).await;
        }
        i
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_is_reported_by_key_and_kind_and_repaired_under_a_concurrent_writer() {
    let r = rig().await;
    let (code, reports, text) = verify(&r.daemon, &[]);
    assert_eq!(code, 0, "{text}");
    assert_eq!(reports[0]["compared"], ROWS, "{text}");
    tamper(&r.es.url).await;
    let (code, reports, text) = verify(&r.daemon, &["--table", "public.items"]);
    assert_eq!(code, 1, "{text}");
    let report = &reports[0];
    assert_eq!(shown(report, "missing"), ["5"], "{text}");
    assert_eq!(shown(report, "stale"), ["6"], "{text}");
    assert_eq!(
        report["stale"]["first"][0]["columns"],
        json!(["name"]),
        "{text}"
    );
    assert_eq!(shown(report, "extra"), ["100000"], "{text}");
    let stop = Arc::new(AtomicBool::new(false));
    let writes = writer(r.pg.client().await.unwrap(), stop.clone());
    let (code, reports, text) = verify(&r.daemon, &["--repair"]);
    assert_eq!(code, 0, "the pass after the repair is equal: {text}");
    assert_eq!(
        reports.len(),
        2,
        "the drift, then the pass after the repair: {text}"
    );
    stop.store(true, Ordering::Relaxed);
    assert!(writes.await.unwrap() > 0);
    let (code, _, text) = verify(&r.daemon, &[]);
    assert_eq!(code, 0, "{text}");
    r.mirrored(Duration::from_secs(60)).await;
}

/// `pgcdc verify` kept waiting by a table lock names the session holding
/// it (after 5 s), then compares once the lock is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_names_the_session_whose_lock_keeps_it_waiting() {
    let r = rig().await;
    let locker = r.pg.client().await.unwrap();
    locker
        .batch_execute("BEGIN; LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let pid: i32 = locker
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let cfg = std::fs::read_to_string(&r.daemon.config).unwrap();
    let dir = r._dir.path().join("verify");
    let mut verify = crate::support::daemon_cmd(&dir, &cfg, &[], "verify");
    verify
        .wait_log(
            "pgcdc waits for these PostgreSQL sessions",
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    let log = verify.log_text();
    assert!(log.contains("verifying public.items"), "{log}");
    assert!(log.contains(&format!("pid {pid} (")), "{log}");
    assert!(log.contains("pgcdc waits for a table lock"), "{log}");
    locker.batch_execute("ROLLBACK").await.unwrap();
    let status = verify.wait_exit(Duration::from_secs(60)).unwrap();
    assert_eq!(status.code(), Some(0), "{}", verify.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_writer_causes_no_false_drift() {
    let r = rig().await;
    let stop = Arc::new(AtomicBool::new(false));
    let writes = writer(r.pg.client().await.unwrap(), stop.clone());
    for _ in 0..3 {
        let (code, reports, text) = verify(&r.daemon, &["--kafka"]);
        assert_eq!(code, 0, "{text}");
        assert!(reports[0]["compared"].as_u64().unwrap() > 0, "{text}");
        assert!(
            reports[0]["kafka"]["compared"].as_u64().unwrap() > 0,
            "{text}"
        );
    }
    stop.store(true, Ordering::Relaxed);
    assert!(writes.await.unwrap() > 0);
    assert!(r.daemon.is_running(), "{}", r.daemon.log_tail());
}

/// `pgcdc verify` with the rig's config and `[verify]` set to `section`.
fn verify_with(r: &Rig, section: &str, args: &[&str]) -> (i32, Vec<Value>, String) {
    let base = std::fs::read_to_string(&r.daemon.config).unwrap();
    let path = r
        .daemon
        .config
        .with_file_name(format!("verify-{}.toml", section.len()));
    std::fs::write(&path, format!("{base}\n[verify]\n{section}\n")).unwrap();
    let mut all = vec!["verify", "--format", "json"];
    all.extend(args);
    let out = crate::support::pgcdc(&path, &all);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let text = format!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let reports = stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    (out.status.code().unwrap_or(-1), reports, text)
}

/// Delete the documents of `ids` behind pgcdc's back.
async fn delete_docs(es: &str, ids: impl IntoIterator<Item = i64>) {
    let http = reqwest::Client::new();
    for id in ids {
        let r = http
            .delete(format!("{es}/{INDEX}/_doc/{id}"))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.status());
    }
}

/// The counts and sorted shown ids of every kind of a report.
fn findings(report: &Value) -> Vec<(u64, Vec<String>)> {
    ["missing", "extra", "stale", "newer"]
        .iter()
        .map(|kind| {
            let mut ids = shown(report, kind);
            ids.sort();
            (report[kind]["count"].as_u64().unwrap(), ids)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_ranges_report_what_one_range_at_a_time_reports() {
    let r = rig().await;
    delete_docs(&r.es.url, [3, 77, 151, 299]).await;
    tamper(&r.es.url).await;
    // Small chunks: the 300 rows split into several ranges.
    let (code, serial, text1) = verify_with(&r, "chunk_rows = 20\nparallelism = 1", &[]);
    assert_eq!(code, 1, "{text1}");
    let (code, parallel, text4) = verify_with(&r, "chunk_rows = 20\nparallelism = 4", &[]);
    assert_eq!(code, 1, "{text4}");
    assert_eq!(
        findings(&parallel[0]),
        findings(&serial[0]),
        "{text1}\n{text4}"
    );
    assert_eq!(parallel[0]["compared"], serial[0]["compared"], "{text4}");
    assert_eq!(parallel[0]["documents"], serial[0]["documents"], "{text4}");
    let mut missing = shown(&parallel[0], "missing");
    missing.sort();
    assert_eq!(missing, ["151", "299", "3", "5", "77"], "{text4}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn differences_the_pipeline_cannot_settle_in_time_are_unconfirmed_never_equal() {
    let mut r = rig().await;
    tamper(&r.es.url).await;
    // A change nothing applies: the slot stays behind the snapshot's position.
    r.daemon.kill9();
    let db = r.pg.client().await.unwrap();
    db.batch_execute("UPDATE items SET n = -1 WHERE id = 7")
        .await
        .unwrap();
    let (code, reports, text) = verify_with(&r, "fence_timeout_secs = 1", &[]);
    assert_eq!(code, 8, "unconfirmed, not equal: {text}");
    let report = &reports[0];
    let mut ids = shown(report, "unconfirmed");
    ids.sort();
    assert_eq!(ids, ["100000", "5", "6", "7"], "{text}");
    for kind in ["missing", "extra", "stale"] {
        assert_eq!(report[kind]["count"], 0, "{text}");
    }
    let behind = &report["fence"]["timed_out"];
    assert_eq!(behind["stage"], "slot", "{text}");
    assert_eq!(behind["timeout_secs"], 1, "{text}");
    assert!(behind["behind"].as_u64().unwrap() > 0, "{text}");
}

/// The ids of `kind` the Kafka section of `report` shows.
fn kafka_shown(report: &Value, kind: &str) -> Vec<String> {
    shown(&report["kafka"], kind)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_deleted_while_pgcdc_was_stopped_and_never_published_is_extra_in_both_legs_and_repaired(
) {
    let mut r = rig().await;
    let (code, reports, text) = verify(&r.daemon, &["--kafka"]);
    assert_eq!(code, 0, "{text}");
    assert_eq!(reports[0]["kafka"]["compared"], ROWS, "{text}");
    assert!(
        reports[0]["kafka"]["records"].as_u64().unwrap() >= ROWS as u64,
        "{text}"
    );
    r.daemon.terminate(Duration::from_secs(30)).unwrap();
    // The delete is decoded while the table is outside the publication:
    // it never reaches Kafka, so neither leg hears of it.
    let db = r.pg.client().await.unwrap();
    db.batch_execute(
        "ALTER PUBLICATION pgcdc DROP TABLE items;
         DELETE FROM items WHERE id = 42;
         ALTER PUBLICATION pgcdc ADD TABLE items;",
    )
    .await
    .unwrap();
    r.daemon.spawn().unwrap();
    crate::support::wait_slot_active(&db, &mut r.daemon, "pgcdc").await;
    let (code, reports, text) = verify(&r.daemon, &[]);
    assert_eq!(code, 1, "{text}");
    assert_eq!(shown(&reports[0], "extra"), ["42"], "{text}");
    assert!(reports[0].get("kafka").is_none(), "{text}");
    let (code, reports, text) = verify(&r.daemon, &["--kafka"]);
    assert_eq!(code, 1, "{text}");
    assert_eq!(shown(&reports[0], "extra"), ["42"], "{text}");
    assert_eq!(kafka_shown(&reports[0], "extra"), ["42"], "{text}");
    assert_eq!(reports[0]["kafka"]["missing"]["count"], 0, "{text}");
    assert_eq!(reports[0]["kafka"]["stale"]["count"], 0, "{text}");
    let stop = Arc::new(AtomicBool::new(false));
    let writes = writer(r.pg.client().await.unwrap(), stop.clone());
    let (code, reports, text) = verify(&r.daemon, &["--kafka", "--repair"]);
    assert_eq!(code, 0, "the pass after the repair is equal: {text}");
    assert_eq!(reports.len(), 2, "{text}");
    stop.store(true, Ordering::Relaxed);
    assert!(writes.await.unwrap() > 0);
    let (code, reports, text) = verify(&r.daemon, &["--kafka"]);
    assert_eq!(code, 0, "{text}");
    assert_eq!(reports[0]["kafka"]["extra"]["count"], 0, "{text}");
}

/// Make every commit wait for a synchronous standby that never connects
/// (`true`), or stop waiting (`false`).
async fn hold_commits(db: &tokio_postgres::Client, hold: bool) {
    let set = match hold {
        true => "ALTER SYSTEM SET synchronous_standby_names = 'nobody'",
        false => "ALTER SYSTEM RESET synchronous_standby_names",
    };
    db.batch_execute(set).await.unwrap();
    db.batch_execute("SELECT pg_reload_conf()").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_still_committing_is_newer_in_both_legs_never_drift() {
    let r = rig().await;
    let admin = r.pg.client().await.unwrap();
    hold_commits(&admin, true).await;
    // Its commit record is written, decoded, published and applied, but
    // it stays invisible to every snapshot until the standby answers.
    let stuck = r.pg.client().await.unwrap();
    crate::support::until_commits_wait(&stuck, &admin).await;
    let commit = tokio::spawn(async move {
        stuck
            .batch_execute(
                "BEGIN; UPDATE items SET n = -5 WHERE id = 7; DELETE FROM items WHERE id = 8;
                 INSERT INTO items VALUES (100001, 'late', 0); COMMIT;",
            )
            .await
    });
    let url = format!("{}/{INDEX}/_doc/100001", r.es.url);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while crate::support::get(&url).await.map(|(code, _)| code) != Some(200) {
        assert!(std::time::Instant::now() < deadline, "never applied");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (code, reports, text) = verify(&r.daemon, &["--kafka"]);
    let held_throughout = !commit.is_finished();
    hold_commits(&admin, false).await;
    commit.await.unwrap().unwrap();
    assert!(
        held_throughout,
        "the commit was released before verify ended"
    );
    assert_eq!(code, 0, "no drift: {text}");
    let report = &reports[0];
    for ids in [shown(report, "newer"), kafka_shown(report, "newer")] {
        let mut ids = ids;
        ids.sort();
        assert_eq!(ids, ["100001", "7", "8"], "{text}");
    }
    let (code, reports, text) = verify(&r.daemon, &["--kafka"]);
    assert_eq!(code, 0, "{text}");
    assert_eq!(reports[0]["newer"]["count"], 0, "{text}");
    assert_eq!(reports[0]["kafka"]["newer"]["count"], 0, "{text}");
}

/// Continuous verification with `verify.repair = false`: drift is counted,
/// logged and named by `/ready` (503) until a round finds none, here after
/// `pgcdc verify --repair`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuous_verification_without_repair_names_drift_until_repaired() {
    let port = crate::support::free_port();
    let extra = "\n[verify]\ninterval_secs = 1\nsample = 1.0\nrepair = false\n";
    let mut r = rig_with(extra, Some(port)).await;
    let probe = Probe::on(port);
    // Rounds run and find the mirror equal.
    probe
        .until("rounds find the mirror equal", &mut r.daemon, |t, ready| {
            ready == 200 && count(t, "equal").is_some_and(|n| n >= ROWS as f64)
        })
        .await;
    assert_eq!(count(&probe.metrics().await, "extra").unwrap_or(0.0), 0.0);
    tamper(&r.es.url).await;
    probe
        .until("drift found", &mut r.daemon, |t, ready| {
            ready == 503 && count(t, "extra").is_some_and(|n| n > 0.0)
        })
        .await;
    let (_, why) = probe.ready().await;
    assert!(
        why.contains("continuous verification found the mirror drifted: public.items (1 missing, 1 extra, 1 stale; run pgcdc verify --repair)"),
        "{why}"
    );
    let text = probe.metrics().await;
    assert_eq!(
        drift_rows(&text),
        Some(3.0),
        "missing 5, stale 6, extra 100000: {text}"
    );
    assert!(count(&text, "missing").unwrap_or(0.0) > 0.0, "{text}");
    assert!(
        crate::support::sample(&text, "pgcdc_verify_last_run_timestamp_seconds", &[])
            .unwrap_or(0.0)
            > 0.0
    );
    assert_eq!(repaired(&text), None, "nothing repaired: {text}");
    assert!(r
        .daemon
        .log_text()
        .contains("continuous verification found drift"));

    let (code, _, text) = verify(&r.daemon, &["--repair"]);
    assert_eq!(code, 0, "{text}");
    probe
        .until(
            "ready once a round finds no drift",
            &mut r.daemon,
            |t, ready| ready == 200 && drift_rows(t) == Some(0.0),
        )
        .await;
}

/// Continuous verification (default `verify.repair`): the drift it finds
/// is copied again by the daemon, the mirror equals the table again, and
/// `/ready` is 200 once it is repaired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuous_verification_repairs_the_drift_it_finds() {
    let port = crate::support::free_port();
    let extra = "\n[verify]\ninterval_secs = 1\nsample = 1.0\n";
    let mut r = rig_with(extra, Some(port)).await;
    let probe = Probe::on(port);
    probe
        .until("rounds find the mirror equal", &mut r.daemon, |t, _| {
            count(t, "equal").is_some_and(|n| n >= ROWS as f64)
        })
        .await;
    tamper(&r.es.url).await;
    probe
        .until("the drift repaired", &mut r.daemon, |t, ready| {
            ready == 200 && repaired(t).is_some_and(|n| n >= 3.0) && drift_rows(t) == Some(0.0)
        })
        .await;
    r.mirrored(Duration::from_secs(30)).await;
    let log = r.daemon.log_text();
    assert!(log.contains("continuous verification found drift"), "{log}");
    assert!(
        log.contains("continuous verification: drift repaired"),
        "{log}"
    );
}

/// `pgcdc_verify_rows_total` of `public.items` for `result` in `text`.
fn count(text: &str, result: &str) -> Option<f64> {
    let labels = [("table", "public.items"), ("result", result)];
    crate::support::sample(text, "pgcdc_verify_rows_total", &labels)
}

/// `pgcdc_verify_drift_rows` of `public.items` in `text`.
fn drift_rows(text: &str) -> Option<f64> {
    crate::support::sample(
        text,
        "pgcdc_verify_drift_rows",
        &[("table", "public.items")],
    )
}

/// `pgcdc_verify_repaired_rows_total` of `public.items` in `text`.
fn repaired(text: &str) -> Option<f64> {
    let labels = [("table", "public.items")];
    crate::support::sample(text, "pgcdc_verify_repaired_rows_total", &labels)
}

/// Change the `name` of the documents of `ids` behind pgcdc's back.
async fn change_docs(es: &str, ids: impl IntoIterator<Item = i64>) {
    let http = reqwest::Client::new();
    for id in ids {
        let body = json!({"doc": {"name": "tampered"}});
        let r = http
            .post(format!("{es}/{INDEX}/_update/{id}"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.status());
    }
}

/// Whether `id` lies in one of a sampled report's ranges (`(after, upto]`).
fn in_sampled_ranges(report: &Value, id: i64) -> bool {
    let bound = |v: &Value| v[0].as_str().map(|s| s.parse::<i64>().unwrap());
    report["sampled_ranges"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| bound(&r[0]).is_none_or(|a| id > a) && bound(&r[1]).is_none_or(|u| id <= u))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sampled_run_reports_the_drift_of_the_ranges_it_compared_and_a_full_run_all() {
    let r = rig().await;
    let missing: Vec<i64> = (10..=290).step_by(20).collect();
    let stale: Vec<i64> = (20..=300).step_by(20).collect();
    delete_docs(&r.es.url, missing.clone()).await;
    change_docs(&r.es.url, stale.clone()).await;
    // Small chunks: the 300 rows split into the sample's 100 ranges.
    let section = "chunk_rows = 5";
    let (code, reports, text) = verify_with(&r, section, &["--sample", "0.2"]);
    assert_eq!(code, 1, "{text}");
    let report = &reports[0];
    assert_eq!(report["sample"], 0.2, "{text}");
    let compared = report["compared"].as_u64().unwrap();
    assert!(compared > 0 && compared < ROWS as u64, "{text}");
    let ranges = report["sampled_ranges"].as_array().unwrap().len();
    assert!(ranges > 0 && ranges < 100, "{text}");
    for (kind, planted) in [("missing", &missing), ("stale", &stale)] {
        let inside = planted
            .iter()
            .filter(|id| in_sampled_ranges(report, **id))
            .count();
        assert_eq!(report[kind]["count"], inside as u64, "{kind}: {text}");
        for id in shown(report, kind) {
            assert!(
                in_sampled_ranges(report, id.parse().unwrap()),
                "{kind} {id}: {text}"
            );
        }
    }
    let (code, reports, text) = verify_with(&r, section, &[]);
    assert_eq!(code, 1, "{text}");
    assert_eq!(reports[0]["compared"], ROWS, "{text}");
    assert!(reports[0].get("sample").is_none(), "{text}");
    assert_eq!(
        reports[0]["missing"]["count"],
        missing.len() as u64,
        "{text}"
    );
    assert_eq!(reports[0]["stale"]["count"], stale.len() as u64, "{text}");
}
