//! `pgcdc verify` against a live pipeline (PostgreSQL, tansu, osmem-server,
//! the daemon with its sink): drift made behind pgcdc's back is reported
//! with its key and kind and repaired under a concurrent writer; a writer
//! at full speed causes no false drift.

#![allow(clippy::unwrap_used)]

use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pgcdc_testkit::oracle::{self, Want};
use serde_json::{json, Value};

use crate::support::{config, Daemon, PgCluster, SearchServer, Tansu};
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
        + &format!("\n[elasticsearch]\nrun_in_daemon = true\nurl = {:?}\nnumber_of_replicas = 0\nflush_interval_ms = 50\n", es.url);
    let mut daemon = crate::support::daemon(dir.path(), &cfg, &[]);
    crate::support::wait_slot_active(&db, &mut daemon, "pgcdc").await;
    let want = Want::Verified {
        pg: &pg,
        table: "public.items",
    };
    oracle::mirror_equals(&es.url, INDEX, want, Duration::from_secs(90), Some(&daemon))
        .await
        .unwrap();
    Rig {
        pg,
        _broker: broker,
        es,
        _dir: dir,
        daemon,
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
    let db = r.pg.client().await.unwrap();
    let want = Want::Table {
        db: &db,
        table: "items",
    };
    oracle::mirror_equals(
        &r.es.url,
        INDEX,
        want,
        Duration::from_secs(60),
        Some(&r.daemon),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_writer_causes_no_false_drift() {
    let r = rig().await;
    let stop = Arc::new(AtomicBool::new(false));
    let writes = writer(r.pg.client().await.unwrap(), stop.clone());
    for _ in 0..3 {
        let (code, reports, text) = verify(&r.daemon, &[]);
        assert_eq!(code, 0, "{text}");
        assert!(reports[0]["compared"].as_u64().unwrap() > 0, "{text}");
    }
    stop.store(true, Ordering::Relaxed);
    assert!(writes.await.unwrap() > 0);
    assert!(r.daemon.is_running(), "{}", r.daemon.log_tail());
}
