//! Crash safety: `kill -9` and injected panics in the middle of a stream of
//! numbered transactions. The oracle: no committed change is missing from
//! Kafka, and the slot's confirmed_flush_lsn never passes acknowledged data
//! and never moves backwards.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::{config, wait, Broker, Daemon, PgCluster, Tansu};
#[cfg(feature = "failpoints")]
use pgcdc_actors::wire::failpoint;
use pgcdc_testkit::slot::SlotWatcher;
use tokio_postgres::Client;
use wait::Poll;

const TOPIC: &str = "cdc-events";
const ROWS_PER_TX: i64 = 3;

/// Transactions committed so far: (n, WAL position right after the commit returned).
type Committed = Arc<Mutex<Vec<(i64, u64)>>>;

/// Commit `count` numbered transactions, pausing `pause` between them.
async fn write_numbered(db: Client, count: i64, pause: Duration, committed: Committed) {
    for n in 0..count {
        let sql = format!(
            "BEGIN; INSERT INTO numbered SELECT {n} * {ROWS_PER_TX} + g, {n}, repeat('x', 50) FROM generate_series(0, {}) g; COMMIT;",
            ROWS_PER_TX - 1
        );
        db.batch_execute(&sql).await.expect("write");
        let after: i64 = db
            .query_one("SELECT (pg_current_wal_lsn() - '0/0')::bigint", &[])
            .await
            .expect("lsn")
            .get(0);
        committed.lock().unwrap().push((n, after as u64));
        tokio::time::sleep(pause).await;
    }
}

/// Ids seen on Kafka, with how often each was seen.
fn seen_ids(tansu: &Tansu) -> HashMap<i64, usize> {
    let mut seen = HashMap::new();
    for r in crate::support::read_all(tansu, TOPIC) {
        if r.op() == "c" {
            let id = r.key.as_ref().and_then(|k| k["id"].as_i64()).expect("key");
            *seen.entry(id).or_default() += 1;
        }
    }
    seen
}

/// Transactions at or below `confirmed` whose rows are not all on Kafka.
fn unacknowledged(
    confirmed: u64,
    committed: &[(i64, u64)],
    seen: &HashMap<i64, usize>,
) -> Vec<(i64, u64)> {
    committed
        .iter()
        .filter(|(n, after)| {
            *after <= confirmed
                && (n * ROWS_PER_TX..(n + 1) * ROWS_PER_TX).any(|id| !seen.contains_key(&id))
        })
        .copied()
        .collect()
}

/// With pgcdc stopped, every transaction known to be at or below `confirmed`
/// must be readable from Kafka. The broker may make acknowledged records
/// visible to readers a moment later, so this re-reads for a few seconds; as
/// nothing is writing, whatever appears was stored before the kill.
async fn assert_confirmed_is_acknowledged(tansu: &Tansu, confirmed: u64, committed: &[(i64, u64)]) {
    let every = Duration::from_millis(200);
    wait::poll("confirmed transactions on kafka", Duration::from_secs(10), every, || async {
        let missing = unacknowledged(confirmed, committed, &seen_ids(tansu));
        Poll::when(missing.is_empty(), (), || {
            format!("slot confirmed {confirmed:x} but these (tx, ended by) are not on kafka: {missing:x?}")
        })
    })
    .await
    .unwrap();
}

/// Watch the slot every 20 ms (a move backwards is reported when it stops).
fn watch_slot(pg_url: String) -> SlotWatcher {
    SlotWatcher::start(pg_url, "pgcdc", Duration::from_millis(20))
}

/// Stop the watcher: the slot never moved backwards; its last position.
async fn slot_never_moved_back(watcher: SlotWatcher) -> u64 {
    let seen = watcher.stop().await;
    assert!(
        seen.backwards.is_none(),
        "confirmed_flush_lsn moved backwards: {:x?}",
        seen.backwards
    );
    seen.last
}

/// The slot's confirmed position (the slot must exist).
async fn confirmed(db: &Client) -> u64 {
    pgcdc_testkit::pg::confirmed_flush(db, "pgcdc")
        .await
        .unwrap()
        .expect("slot")
}

async fn setup() -> (PgCluster, Tansu, tempfile::TempDir, Client) {
    let (pg, tansu, dir, db) = crate::support::pg_and_tansu().await;
    db.batch_execute("CREATE TABLE numbered (id bigint PRIMARY KEY, tx bigint NOT NULL, pad text)")
        .await
        .expect("ddl");
    (pg, tansu, dir, db)
}

async fn wait_active(db: &Client, daemon: &mut Daemon) {
    crate::support::wait_slot_active(db, daemon, "pgcdc").await;
}

/// Wait until every committed row is on Kafka; returns the duplicate count.
fn assert_nothing_lost(tansu: &Tansu, total_tx: i64) -> usize {
    let want = (total_tx * ROWS_PER_TX) as usize;
    let records = crate::support::read_until(tansu, TOPIC, Duration::from_secs(120), |rs| {
        let mut ids: Vec<i64> = rs
            .iter()
            .filter(|r| r.op() == "c")
            .filter_map(|r| r.key.as_ref()?["id"].as_i64())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids.len() >= want
    });
    let creates = records.iter().filter(|r| r.op() == "c").count();
    creates - want
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_loses_no_committed_change() {
    let (pg, tansu, dir, db) = setup().await;
    let cfg = config(&pg, &tansu, &dir.path().join("state"), &["numbered"], "");
    let mut daemon = crate::support::daemon(dir.path(), &cfg, &[]);
    wait_active(&db, &mut daemon).await;
    let poller = watch_slot(pg.url());

    let total = 300;
    let committed: Committed = Arc::default();
    let writer = tokio::spawn(write_numbered(
        pg.client().await.unwrap(),
        total,
        Duration::from_millis(5),
        committed.clone(),
    ));
    let mut last_confirmed = 0;
    for round in 0..4 {
        // Let a few more transactions commit, then kill mid-stream.
        let target = (round + 1) * total as usize / 6;
        wait::until(
            "the writer to progress",
            Duration::from_secs(60),
            || async { committed.lock().unwrap().len() >= target },
        )
        .await
        .unwrap();
        daemon.kill9();
        let confirmed = confirmed(&db).await;
        assert!(
            confirmed >= last_confirmed,
            "confirmed moved backwards across a kill"
        );
        last_confirmed = confirmed;
        let snapshot = committed.lock().unwrap().clone();
        assert_confirmed_is_acknowledged(&tansu, confirmed, &snapshot).await;
        daemon.spawn().unwrap();
        wait_active(&db, &mut daemon).await;
    }
    writer.await.expect("writer");
    let duplicates = assert_nothing_lost(&tansu, total);
    eprintln!("kill -9 x4: {total} transactions, {duplicates} duplicate records");
    assert!(slot_never_moved_back(poller).await > 0);
    assert!(daemon.is_running());
}

#[cfg(feature = "failpoints")]
async fn panic_in_actor_is_restarted(failpoint: &str) {
    let (pg, tansu, dir, db) = setup().await;
    let cfg = config(&pg, &tansu, &dir.path().join("state"), &["numbered"], "");
    // Early: batches are coalesced and checkpoint writes group-committed,
    // so a short run makes few.
    let action = format!("{failpoint}=1*off->1*panic");
    let mut daemon = crate::support::daemon(dir.path(), &cfg, &[("FAILPOINTS", &action)]);
    wait_active(&db, &mut daemon).await;
    let poller = watch_slot(pg.url());
    let total = 150;
    let committed: Committed = Arc::default();
    write_numbered(
        pg.client().await.unwrap(),
        total,
        Duration::from_millis(2),
        committed.clone(),
    )
    .await;
    assert_nothing_lost(&tansu, total);
    let log = daemon.log_text();
    assert!(
        log.contains("panicked"),
        "failpoint {failpoint} never fired:\n{log}"
    );
    // Everything may be on Kafka before the crashed actor's restart is logged.
    daemon
        .wait_log("actor restarting", Duration::from_secs(30))
        .await
        .expect("a supervised restart");
    assert!(
        daemon.is_running(),
        "a panic ended the process:\n{}",
        daemon.log_text()
    );
    // The slot catches up once the stream runs again.
    let end = committed.lock().unwrap().last().map(|c| c.1).unwrap_or(0);
    wait::until(
        "the slot to confirm the last transaction",
        Duration::from_secs(60),
        || async { pg.confirmed_flush(&db, "pgcdc").await.unwrap().unwrap_or(0) + 200 >= end },
    )
    .await
    .unwrap();
    slot_never_moved_back(poller).await;
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panic_in_kafka_producer_restarts_it_without_loss() {
    panic_in_actor_is_restarted(failpoint::PRODUCER_AFTER_ACK).await;
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panic_in_replication_restarts_it_without_loss() {
    panic_in_actor_is_restarted(failpoint::REPLICATION_PUBLISH).await;
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panic_in_checkpoint_restarts_it_without_loss() {
    panic_in_actor_is_restarted(failpoint::CHECKPOINT_BEFORE_CONFIRM).await;
}

/// A daemon (restart budget 2) whose producer panics at every
/// acknowledged batch, with `more` failpoints armed; it must end with code
/// 7 within `timeout`. The first acknowledged batch (the end of the initial
/// snapshot) trips it, at every restart.
#[cfg(feature = "failpoints")]
async fn keeps_crashing(more: &str, timeout: Duration) -> Crashed {
    let (pg, tansu, dir, db) = setup().await;
    let cfg = config(&pg, &tansu, &dir.path().join("state"), &["numbered"], "")
        .replace("max_restarts = 20", "max_restarts = 2");
    let failpoints = format!("{}=panic{more}", failpoint::PRODUCER_AFTER_ACK);
    let mut daemon = crate::support::daemon(dir.path(), &cfg, &[("FAILPOINTS", &failpoints)]);
    let status = daemon.wait_exit(timeout).unwrap();
    assert_eq!(status.code(), Some(7), "{}", daemon.log_text());
    assert!(daemon.log_text().contains("keeps crashing"));
    Crashed {
        daemon,
        db,
        _services: (pg, tansu, dir),
    }
}

/// What [`keeps_crashing`] leaves: the exited daemon, and the services it
/// ran against, kept up for a restart.
#[cfg(feature = "failpoints")]
struct Crashed {
    daemon: Daemon,
    db: Client,
    _services: (PgCluster, Tansu, tempfile::TempDir),
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_actor_that_keeps_crashing_ends_the_process_with_code_7() {
    keeps_crashing("", Duration::from_secs(60)).await;
}

/// Whatever holds up the end once the outcome is known (a Kafka client
/// whose close waits on the broker), the process ends within seconds with
/// the outcome's exit code: after a fatal report, and after SIGTERM.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wind_down_that_hangs_still_ends_the_process_with_its_exit_code() {
    let hang = format!("{}=sleep(600000)", failpoint::TEARDOWN);
    let crashed = keeps_crashing(&format!(";{hang}"), Duration::from_secs(90)).await;
    let (mut daemon, db) = (crashed.daemon, crashed.db);
    assert!(daemon
        .log_text()
        .contains("closing the clients did not finish in time"));

    daemon.set_env("FAILPOINTS", Some(&hang));
    daemon.spawn().unwrap();
    wait_active(&db, &mut daemon).await;
    let status = daemon.terminate(Duration::from_secs(60)).unwrap();
    assert_eq!(status.code(), Some(0), "{}", daemon.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_postgres_ends_with_the_upstream_code_after_retries() {
    let pg = PgCluster::start().unwrap();
    let tansu = Tansu::start().unwrap();
    let dir = tempfile::tempdir().expect("tempdir");
    let closed_port = crate::support::free_port();
    let cfg = config(&pg, &tansu, &dir.path().join("state"), &["numbered"], "")
        .replace(
            &format!("port = {}", pg.port),
            &format!("port = {closed_port}"),
        )
        .replace("max_restarts = 20", "max_restarts = 3");
    let mut daemon = crate::support::daemon(dir.path(), &cfg, &[]);
    let status = daemon.wait_exit(Duration::from_secs(60)).unwrap();
    let log = daemon.log_text();
    assert_eq!(status.code(), Some(4), "{log}");
    assert!(
        log.contains("cannot connect to postgresql") && log.contains("actor restarting"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalives_keep_the_walsender_alive_while_kafka_is_down() {
    let pg = PgCluster::start_with("wal_sender_timeout = 2s\n").unwrap();
    let mut tansu = Tansu::start().unwrap();
    let dir = tempfile::tempdir().expect("tempdir");
    let db = pg.client().await.unwrap();
    db.batch_execute("CREATE TABLE numbered (id bigint PRIMARY KEY, tx bigint NOT NULL, pad text)")
        .await
        .expect("ddl");
    let cfg = config(
        &pg,
        &tansu,
        &dir.path().join("state"),
        &["numbered"],
        "max_inflight_records = 50",
    );
    let mut daemon = crate::support::daemon(dir.path(), &cfg, &[]);
    wait_active(&db, &mut daemon).await;
    let walsender = || async {
        let q = "SELECT pid FROM pg_stat_replication WHERE application_name = 'pgcdc'";
        db.query_opt(q, &[])
            .await
            .expect("pg_stat_replication")
            .map(|r| r.get::<_, i32>(0))
    };
    let pid = walsender().await.expect("walsender");
    tansu.stop();
    let q = "SELECT (pg_current_wal_lsn() - '0/0')::bigint";
    let down_at = db.query_one(q, &[]).await.expect("lsn").get::<_, i64>(0) as u64;
    // Far more than max_inflight_records: WAL reading must pause (backpressure).
    write_numbered(
        pg.client().await.unwrap(),
        400,
        Duration::ZERO,
        Committed::default(),
    )
    .await;
    // For four times wal_sender_timeout the same walsender must stay connected.
    let every = Duration::from_millis(200);
    wait::during(
        "the walsender to stay",
        Duration::from_secs(8),
        every,
        || async {
            if walsender().await != Some(pid) {
                return Err(format!(
                    "the walsender timed out while kafka was down:\n{}",
                    daemon.log_text()
                ));
            }
            if !daemon.is_running() {
                return Err(daemon.log_text());
            }
            Ok(())
        },
    )
    .await
    .unwrap();
    // Nothing written after the broker went down can have been confirmed.
    let confirmed = confirmed(&db).await;
    assert!(
        confirmed <= down_at,
        "confirmed {confirmed:x} past the outage at {down_at:x}"
    );
}

/// Issue 16: a lost replication connection (walsender terminated) while
/// many records wait for a frozen broker. The records already handed to
/// Kafka finish (acknowledged, checkpointed) before the stream starts
/// again, so at most the open transaction's records are sent twice; before,
/// every record in flight was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_replication_connection_resends_at_most_one_transaction() {
    let (pg, tansu, dir, db) = setup().await;
    let port = crate::support::free_port();
    let cfg = pgcdc_testkit::config::with_metrics(
        &config(&pg, &tansu, &dir.path().join("state"), &["numbered"], ""),
        port,
    );
    let mut daemon = crate::support::daemon(dir.path(), &cfg, &[]);
    wait_active(&db, &mut daemon).await;
    let total = 300;
    tansu.signal("STOP").unwrap();
    write_numbered(
        pg.client().await.unwrap(),
        total,
        Duration::ZERO,
        Committed::default(),
    )
    .await;
    // Every row read and handed to the frozen broker.
    let want = (total * ROWS_PER_TX) as f64;
    let metrics = format!("http://127.0.0.1:{port}/metrics");
    wait::poll(
        "rows handed to kafka",
        Duration::from_secs(60),
        Duration::from_millis(100),
        || async {
            let text = crate::support::get(&metrics)
                .await
                .map(|(_, t)| t)
                .unwrap_or_default();
            let read = crate::support::sample(&text, "pgcdc_events_in_total", &[("op", "c")])
                .unwrap_or(0.0);
            Poll::when(read >= want, (), || format!("{read} of {want} rows read"))
        },
    )
    .await
    .unwrap();
    let killed: i64 = db
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_replication WHERE application_name = 'pgcdc'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(killed, 1, "one walsender terminated");
    // The loss is noticed (the stream either waits or starts again at once).
    wait::until(
        "the lost connection to be noticed",
        Duration::from_secs(30),
        || async {
            let log = daemon.log_text();
            log.contains("replication connection lost") || log.contains("actor work failed")
        },
    )
    .await
    .unwrap();
    tansu.signal("CONT").unwrap();
    wait_active(&db, &mut daemon).await;
    let duplicates = assert_nothing_lost(&tansu, total);
    assert!(
        duplicates <= ROWS_PER_TX as usize,
        "{duplicates} records sent twice after the walsender was terminated (at most one transaction's {ROWS_PER_TX} allowed):\n{}",
        daemon.log_tail()
    );
    assert!(daemon
        .log_text()
        .contains("records in flight acknowledged and checkpointed"));
}
