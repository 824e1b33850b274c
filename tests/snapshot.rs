//! The initial snapshot: existing rows are copied inside the slot's exported
//! snapshot and streaming continues from its consistent point — no gap, no
//! overlap — also under concurrent writes and after `kill -9`, which resumes
//! the copy instead of starting over. Backfills (`pgcdc snapshot --table`,
//! tables added to the configuration) copy tables while a writer changes them.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use pgcdc_actors::wire::header;
use pgcdc_testkit::oracle::{self, Want};
use serde_json::{json, Value};

use crate::support::{config, wait, Daemon, PgCluster, Record, SearchServer, Tansu};
use wait::Poll;

const TOPIC: &str = "cdc-events";

fn table_of(r: &Record) -> &str {
    r.headers
        .get(header::TABLE)
        .map(String::as_str)
        .unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_rows_are_copied_then_changes_stream_without_gap_or_overlap() {
    let (pg, tansu, dir, db) = crate::support::pg_and_tansu().await;
    db.batch_execute(
        "CREATE TABLE empty (id int PRIMARY KEY);
         CREATE TABLE one (id int PRIMARY KEY, v text);
         INSERT INTO one VALUES (1, 'only');
         CREATE TABLE big (id bigint PRIMARY KEY, name text, at timestamptz);
         INSERT INTO big SELECT g, 'row ' || g, '2024-01-01 00:00:00+00'::timestamptz + g * interval '1 second'
           FROM generate_series(1, 200000) g;
         CREATE TABLE pair (a int, b text, n numeric, PRIMARY KEY (a, b));
         INSERT INTO pair VALUES (1, 'x', 1.50), (1, 'y', 2.25), (2, 'x', NULL);",
    )
    .await
    .unwrap();
    let cfg = config(
        &pg,
        &tansu,
        &dir.path().join("state"),
        &["empty", "one", "big", "pair"],
        "",
    ) + "\n[snapshot]\nparallelism = 3\nchunk_rows = 7000\n";
    let mut daemon = crate::support::daemon(dir.path(), &cfg, &[]);
    crate::support::wait_slot_active(&db, &mut daemon, "pgcdc").await;
    db.batch_execute(
        "INSERT INTO one VALUES (2, 'streamed'); UPDATE big SET name = 'changed' WHERE id = 7;",
    )
    .await
    .unwrap();

    let records = crate::support::read_until(&tansu, TOPIC, Duration::from_secs(180), |rs| {
        rs.iter()
            .any(|r| r.op() == "u" && r.key == Some(json!({"id": 7})))
    });
    let snap: Vec<&Record> = records.iter().filter(|r| r.op() == "r").collect();
    let count = |t: &str| snap.iter().filter(|r| table_of(r) == t).count();
    assert_eq!(
        (
            count("public.empty"),
            count("public.one"),
            count("public.big"),
            count("public.pair")
        ),
        (0, 1, 200_000, 3)
    );
    let big_ids: BTreeSet<i64> = snap
        .iter()
        .filter(|r| table_of(r) == "public.big")
        .map(|r| r.key.as_ref().unwrap()["id"].as_i64().unwrap())
        .collect();
    assert_eq!(
        big_ids.len(),
        200_000,
        "a row was copied twice or not at all"
    );
    let r7 = snap
        .iter()
        .find(|r| r.key == Some(json!({"id": 7})) && table_of(r) == "public.big")
        .unwrap();
    assert_eq!(
        r7.after(),
        &json!({"id": 7, "name": "row 7", "at": "2024-01-01T00:00:07Z"})
    );
    let pair: BTreeMap<String, Value> = snap
        .iter()
        .filter(|r| table_of(r) == "public.pair")
        .map(|r| (r.key.as_ref().unwrap().to_string(), r.after()["n"].clone()))
        .collect();
    assert_eq!(pair[&json!({"a": 1, "b": "y"}).to_string()], json!("2.25"));
    assert_eq!(pair[&json!({"a": 2, "b": "x"}).to_string()], Value::Null);

    // Every snapshot row carries the consistent point; streamed changes come after it, each once.
    let points: BTreeSet<u64> = snap
        .iter()
        .map(|r| {
            r.value.as_ref().unwrap()["source"]["commit_lsn"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(points.len(), 1);
    assert!(snap
        .iter()
        .all(|r| r.value.as_ref().unwrap()["source"]["snapshot"] == json!("true")));
    let streamed: Vec<&Record> = records.iter().filter(|r| r.op() != "r").collect();
    assert_eq!(
        streamed.len(),
        2,
        "{:?}",
        streamed
            .iter()
            .map(|r| (r.op(), &r.key))
            .collect::<Vec<_>>()
    );
    assert!(streamed
        .iter()
        .all(|r| r.value.as_ref().unwrap()["source"]["commit_lsn"]
            .as_u64()
            .unwrap()
            > *points.first().unwrap()));
    // The big table was split into key ranges read in parallel.
    assert!(
        daemon.log_text().contains("ranges=6"),
        "{}",
        daemon.log_text()
    );
    daemon
        .wait_log("table copy fully acknowledged", Duration::from_secs(30))
        .await
        .unwrap();

    // A restart after a completed snapshot does not copy again.
    assert_eq!(
        daemon.terminate(Duration::from_secs(30)).unwrap().code(),
        Some(0)
    );
    daemon.spawn().unwrap();
    crate::support::wait_slot_active(&db, &mut daemon, "pgcdc").await;
    db.batch_execute("INSERT INTO one VALUES (900000, 'after restart')")
        .await
        .unwrap();
    let again = crate::support::read_until(&tansu, TOPIC, Duration::from_secs(60), |rs| {
        rs.iter().any(|r| r.key == Some(json!({"id": 900000})))
    });
    assert_eq!(again.iter().filter(|r| r.op() == "r").count(), snap.len());
}

/// Snapshot rows are encoded straight from PostgreSQL's text; a streamed
/// update of the same, unchanged row must carry the same `after` and the
/// same key bytes (partitioning and compaction go by them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_rows_encode_exactly_as_streamed_changes() {
    let (pg, tansu, dir, db) = crate::support::pg_and_tansu().await;
    db.batch_execute(
        "CREATE TYPE mood AS ENUM ('sad', 'happy');
         CREATE TABLE types (
            id int, i2 smallint, i8 bigint, n numeric, nn numeric, f4 real, f8 double precision,
            fnan double precision, finf double precision, b boolean, t text, vc varchar(10), c char(3),
            ts timestamp, tstz timestamptz, d date, tm time, iv interval, j json, jb jsonb, by bytea,
            u uuid, ai int[], at text[], a2 int[][], m mood, nul text, \"Zé\" text,
            PRIMARY KEY (t, id));
         INSERT INTO types VALUES (1, -32768, 9223372036854775807, 12345678901234567890.123456789, 'NaN', 1.5,
           0.1, 'NaN', '-Infinity', true, 'héllo \"q\"\n', 'vc', 'ab', '2024-01-02 03:04:05.678',
           '2024-01-02 03:04:05.5+02', '2024-02-29', '13:14:15', '1 day 2 hours', '{\"a\": [1, 2]}',
           '{\"b\": {\"c\": null}}', '\\x00ff10', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{1,NULL,3}',
           '{\"x y\",\"NULL\",NULL}', '{{1,2},{3,4}}', 'happy', NULL, 'z'),
           (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, false, '', NULL, NULL, '0044-03-15 01:00:00 BC',
           '1999-12-31 23:59:59.999999-08', NULL, NULL, NULL, 'null', '[]', '\\x', NULL, '{}', NULL, NULL,
           'sad', NULL, NULL);",
    )
    .await
    .unwrap();
    let cfg = config(&pg, &tansu, &dir.path().join("state"), &["types"], "");
    let mut daemon = crate::support::daemon(dir.path(), &cfg, &[]);
    crate::support::wait_slot_active(&db, &mut daemon, "pgcdc").await;
    db.batch_execute("UPDATE types SET id = id").await.unwrap();
    let records = crate::support::read_until(&tansu, TOPIC, Duration::from_secs(60), |rs| {
        rs.iter().filter(|r| r.op() == "u").count() == 2
    });
    for id in [1, 2] {
        let of = |op: &str| {
            records
                .iter()
                .find(|r| r.op() == op && r.after()["id"] == json!(id))
                .unwrap_or_else(|| panic!("no {op} record for id {id}"))
        };
        let (read, update) = (of("r"), of("u"));
        assert_eq!(read.after(), update.after(), "row {id}");
        assert_eq!(read.key_bytes, update.key_bytes, "row {id}");
        assert_eq!(
            read.headers.get(header::TYPES),
            update.headers.get(header::TYPES)
        );
    }
    assert_eq!(
        daemon.terminate(Duration::from_secs(30)).unwrap().code(),
        Some(0)
    );
}

/// PostgreSQL with `items (id, name, n)` holding `rows` rows, tansu,
/// osmem-server, a temp dir and a client.
async fn with_items(
    rows: i64,
) -> (
    PgCluster,
    Tansu,
    SearchServer,
    tempfile::TempDir,
    tokio_postgres::Client,
) {
    let pg = PgCluster::start().unwrap();
    let db = pg.client().await.unwrap();
    let sql = format!(
        "CREATE TABLE items (id int PRIMARY KEY, name text, n int);
         INSERT INTO items SELECT g, 'item ' || g, g FROM generate_series(1, {rows}) g;"
    );
    db.batch_execute(&sql).await.unwrap();
    let (tansu, es) = (Tansu::start().unwrap(), SearchServer::start().unwrap());
    (pg, tansu, es, tempfile::tempdir().unwrap(), db)
}

/// The ES mirror of `items` must equal the table, row for row (by `pgcdc verify`'s comparison).
async fn assert_mirror_equals_table(es: &SearchServer, pg: &PgCluster, daemon: &mut Daemon) {
    let want = Want::Verified {
        pg,
        table: "public.items",
    };
    let index = "cdc_public_items";
    oracle::mirror_equals(&es.url, index, want, Duration::from_secs(120), Some(daemon))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_under_concurrent_writes_and_a_kill_9_ends_equal_to_postgres() {
    let (pg, tansu, es, dir, db) = with_items(60000).await;
    // A transaction that begins before the slot exists and commits after its consistent point.
    let early = pg.client().await.unwrap();
    early
        .batch_execute("BEGIN; UPDATE items SET name = 'early', n = -1 WHERE id = 5")
        .await
        .unwrap();

    let cfg = config(&pg, &tansu, &dir.path().join("state"), &["items"], "")
        + &format!(
            "\n[snapshot]\nchunk_rows = 2000\n[elasticsearch]\nrun_in_daemon = true\nurl = {:?}\nnumber_of_replicas = 0\nflush_interval_ms = 50\n",
            es.url
        );
    let mut daemon = crate::support::daemon(dir.path(), &cfg, &[]);
    // The slot is created once the early transaction ends; commit it while the copy is under way.
    let wait_slot = async {
        let q = "SELECT 1 FROM pg_replication_slots WHERE slot_name = 'pgcdc'";
        let every = Duration::from_millis(50);
        wait::poll(
            "the slot to be created",
            Duration::from_secs(60),
            every,
            || async {
                let created = db.query_opt(q, &[]).await.unwrap().is_some();
                Poll::when(created, (), || {
                    format!("no slot; log:\n{}", daemon.log_text())
                })
            },
        )
        .await
        .unwrap();
    };
    let commit_early = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        early.batch_execute("COMMIT").await.unwrap();
    };
    tokio::join!(wait_slot, commit_early);
    // Crash in the middle of the copy: the restart must copy the rest, not skip it.
    daemon
        .wait_log("snapshot started", Duration::from_secs(60))
        .await
        .unwrap();
    assert!(
        !daemon.log_text().contains("snapshot copied"),
        "the copy finished before the kill"
    );
    daemon.kill9();
    daemon.spawn().unwrap();

    // Concurrent writer while the rest is copied by backfill.
    let writer = pg.client().await.unwrap();
    for i in 0..200 {
        let id = 1 + (i * 7919) % 60000;
        let sql = match i % 4 {
            0 => format!("DELETE FROM items WHERE id = {id}"),
            1 => format!(
                "INSERT INTO items VALUES ({}, 'new', {i}) ON CONFLICT (id) DO UPDATE SET n = {i}",
                60000 + i
            ),
            _ => format!("UPDATE items SET name = 'w{i}', n = n + 1 WHERE id = {id}"),
        };
        writer.batch_execute(&sql).await.unwrap();
    }
    assert_mirror_equals_table(&es, &pg, &mut daemon).await;
    assert!(
        daemon
            .log_text()
            .contains("resuming interrupted table copies by backfill"),
        "{}",
        daemon.log_text()
    );
    let row5 = es
        .documents("cdc_public_items")
        .await
        .unwrap()
        .remove("5")
        .unwrap();
    assert_eq!(
        row5.1["name"],
        json!("early"),
        "the update committed after the consistent point was lost"
    );
}

/// Slowed down by the same failpoint as the kill test, so SIGTERM lands mid-copy.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_the_snapshot_exits_cleanly_and_the_next_start_finishes_it() {
    let (pg, tansu, dir, db) = crate::support::pg_and_tansu().await;
    db.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, 'v' FROM generate_series(1, 100000) g;",
    )
    .await
    .unwrap();
    let cfg = config(&pg, &tansu, &dir.path().join("state"), &["t"], "")
        + "\n[snapshot]\nchunk_rows = 1000\n";
    let mut daemon = crate::support::daemon(dir.path(), &cfg, &[("FAILPOINTS", &slow_copy())]);
    daemon
        .wait_log("snapshot started", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        daemon.terminate(Duration::from_secs(60)).unwrap().code(),
        Some(0),
        "{}",
        daemon.log_text()
    );
    assert!(
        daemon
            .log_text()
            .contains("stopped during the initial snapshot"),
        "{}",
        daemon.log_text()
    );

    daemon.spawn().unwrap();
    daemon
        .wait_log("table copy fully acknowledged", Duration::from_secs(120))
        .await
        .unwrap();
    assert!(daemon
        .log_text()
        .contains("resuming interrupted table copies by backfill"));
    let ids: BTreeSet<i64> = crate::support::read_all(&tansu, TOPIC)
        .iter()
        .filter(|r| r.op() == "r")
        .map(|r| r.key.as_ref().unwrap()["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids.len(), 100_000);
}

/// A failed SQL statement is logged with PostgreSQL's own reason, not only
/// as "db error": here a role that may replicate but not read the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_the_role_may_not_read_is_logged_with_postgresqls_reason() {
    let (pg, tansu, dir, db) = crate::support::pg_and_tansu().await;
    db.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1);
         CREATE PUBLICATION pgcdc FOR TABLE t WITH (publish_via_partition_root = true);
         CREATE ROLE limited LOGIN REPLICATION;",
    )
    .await
    .unwrap();
    let cfg = config(&pg, &tansu, &dir.path().join("state"), &["t"], "")
        .replace("user = \"postgres\"", "user = \"limited\"");
    let mut daemon = crate::support::daemon(dir.path(), &cfg, &[]);
    daemon
        .wait_log("permission denied for table t", Duration::from_secs(60))
        .await
        .unwrap();
    daemon.terminate(Duration::from_secs(60)).unwrap();
}

/// A partition detached and another attached after the slot's snapshot was
/// taken, before the initial copy read the partitioned table: the copy holds
/// the rows the table had at the snapshot (PostgreSQL would read the table
/// through its current partitions), for a role that may read the table but
/// not its partitions; the stream then copies the table again.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_initial_copy_reads_the_partitions_a_table_had_at_the_snapshot() {
    let (pg, tansu, dir, db) = crate::support::pg_and_tansu().await;
    db.batch_execute(&format!(
        "{PARTITIONED_M}
         CREATE TABLE m_ap (LIKE m INCLUDING ALL);
         INSERT INTO m_ap VALUES (3, 'ap');
         CREATE PUBLICATION pgcdc FOR TABLE m WITH (publish_via_partition_root = true);
         CREATE ROLE reader LOGIN REPLICATION;
         GRANT SELECT ON m, m_us TO reader;"
    ))
    .await
    .unwrap();
    let cfg = config(&pg, &tansu, &dir.path().join("state"), &["m"], "")
        .replace("user = \"postgres\"", "user = \"reader\"");
    // The copy is planned 3 s after the slot and its snapshot were made.
    let plan_later = format!(
        "{}=sleep(3000)",
        pgcdc_actors::wire::failpoint::SNAPSHOT_PLAN
    );
    let daemon = crate::support::daemon(dir.path(), &cfg, &[("FAILPOINTS", &plan_later)]);
    let made = "SELECT 1 FROM pg_replication_slots WHERE slot_name = 'pgcdc'";
    wait::poll(
        "the slot",
        Duration::from_secs(60),
        Duration::from_millis(20),
        || async {
            let rows = db.query(made, &[]).await.unwrap();
            Poll::when(!rows.is_empty(), (), || "no slot yet".into())
        },
    )
    .await
    .unwrap();
    db.batch_execute(
        "ALTER TABLE m DETACH PARTITION m_us;
         ALTER TABLE m ATTACH PARTITION m_ap FOR VALUES IN ('ap');",
    )
    .await
    .unwrap();
    assert!(
        !daemon.log_text().contains("snapshot started"),
        "the copy was planned before the partitions changed: {}",
        daemon.log_tail()
    );
    daemon
        .wait_log("table copy fully acknowledged", Duration::from_secs(120))
        .await
        .unwrap();
    assert!(
        daemon
            .log_text()
            .contains("partitions changed since the snapshot"),
        "{}",
        daemon.log_tail()
    );
    assert_copy_of_m_holds_its_rows_then_heals(&tansu, &[(1, "eu"), (3, "ap")]);
}

/// A partition detached with `DETACH PARTITION … CONCURRENTLY` while the
/// initial copy reads its table: the copy still holds the partition's rows
/// (they were in the table at the snapshot), and the detach completes once
/// the copy's transaction ends; the stream then copies the table again.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_detached_concurrently_during_the_copy_keeps_its_rows_in_it() {
    let (pg, tansu, dir, db) = crate::support::pg_and_tansu().await;
    db.batch_execute(PARTITIONED_M).await.unwrap();
    // One row per chunk, one reader, each chunk followed by 3 s: row 2 (in
    // m_us) is read after the detach's first transaction committed.
    let cfg = config(&pg, &tansu, &dir.path().join("state"), &["m"], "")
        + "\n[snapshot]\nparallelism = 1\nchunk_rows = 1\n";
    let pause = format!(
        "{}=sleep(3000)",
        pgcdc_actors::wire::failpoint::SNAPSHOT_COPY_CHUNK
    );
    let daemon = crate::support::daemon(dir.path(), &cfg, &[("FAILPOINTS", &pause)]);
    daemon
        .wait_log("snapshot started", Duration::from_secs(60))
        .await
        .unwrap();
    let other = pg.client().await.unwrap();
    let detach = tokio::spawn(async move {
        other
            .batch_execute("ALTER TABLE m DETACH PARTITION m_us CONCURRENTLY")
            .await
    });
    daemon
        .wait_log("table copy fully acknowledged", Duration::from_secs(120))
        .await
        .unwrap();
    // The detach waited for the copy's transaction, and then completed.
    tokio::time::timeout(Duration::from_secs(60), detach)
        .await
        .expect("the detach did not complete after the copy")
        .unwrap()
        .unwrap();
    assert_copy_of_m_holds_its_rows_then_heals(&tansu, &[(1, "eu")]);
}

/// A table `m` partitioned by region, `m_eu` holding (1, eu) and `m_us` (2, us).
#[cfg(feature = "failpoints")]
const PARTITIONED_M: &str =
    "CREATE TABLE m (id int, region text, PRIMARY KEY (id, region)) PARTITION BY LIST (region);
     CREATE TABLE m_eu PARTITION OF m FOR VALUES IN ('eu');
     CREATE TABLE m_us PARTITION OF m FOR VALUES IN ('us');
     INSERT INTO m VALUES (1, 'eu'), (2, 'us');";

/// The initial copy of [`PARTITIONED_M`] on the topic (its `r` records
/// before the first truncate) holds exactly its two rows; then, since its
/// partitions changed, the table is truncated and copied again until the
/// topic holds the rows of `now` (keys `(id, region)`).
#[cfg(feature = "failpoints")]
fn assert_copy_of_m_holds_its_rows_then_heals(tansu: &Tansu, now: &[(i64, &str)]) {
    let keys_of = |records: &[Record]| -> BTreeSet<String> {
        records
            .iter()
            .filter(|r| table_of(r) == "public.m" && matches!(r.op(), "r" | "c"))
            .map(|r| r.key.as_ref().unwrap().to_string())
            .collect()
    };
    let keys = |rows: &[(i64, &str)]| -> BTreeSet<String> {
        rows.iter()
            .map(|(id, region)| json!({"id": id, "region": region}).to_string())
            .collect()
    };
    let healed = keys(now);
    let records = crate::support::read_until(tansu, TOPIC, Duration::from_secs(120), |rs| {
        let last = rs.iter().rposition(|r| r.op() == "t");
        last.is_some_and(|t| keys_of(&rs[t..]) == healed)
    });
    let first = records.iter().position(|r| r.op() == "t").unwrap();
    assert_eq!(keys_of(&records[..first]), keys(&[(1, "eu"), (2, "us")]));
}

/// `FAILPOINTS` for an initial copy whose every chunk waits 50 ms: slow
/// enough that a test reading the topic (debug-built JSON parsing of
/// Debezium-sized envelopes) keeps up with the copy.
#[cfg(feature = "failpoints")]
fn slow_copy() -> String {
    format!(
        "{}=sleep(50)",
        pgcdc_actors::wire::failpoint::SNAPSHOT_COPY_CHUNK
    )
}

/// `pgcdc snapshot --table <table>` against `daemon`'s configuration,
/// which must succeed; its output.
fn request_backfill(daemon: &Daemon, table: &str) -> std::process::Output {
    let out = crate::support::pgcdc(&daemon.config, &["snapshot", "--table", table]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The `rows_before` of the first "backfill started" line after `from` in the log.
#[cfg(feature = "failpoints")]
fn resumed_rows(log: &str) -> u64 {
    let line = log
        .lines()
        .find(|l| l.contains("backfill started"))
        .unwrap_or_else(|| panic!("no backfill started:\n{log}"));
    let at = line.find("rows_before=").unwrap() + "rows_before=".len();
    line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Each 1,000-row chunk waits 50 ms (a failpoint), so the kill at a quarter
/// of the rows lands mid-copy however fast the machine is.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_the_snapshot_resumes_after_the_last_acknowledged_chunk() {
    const ROWS: usize = 200_000;
    let (pg, tansu, dir, db) = crate::support::pg_and_tansu().await;
    db.batch_execute(&format!(
        "CREATE TABLE t (id int PRIMARY KEY, v text); \
         INSERT INTO t SELECT g, repeat('v', 100) FROM generate_series(1, {ROWS}) g;"
    ))
    .await
    .unwrap();
    let cfg = config(&pg, &tansu, &dir.path().join("state"), &["t"], "")
        + "\n[snapshot]\nparallelism = 1\nchunk_rows = 1000\n";
    let mut daemon = crate::support::daemon(dir.path(), &cfg, &[("FAILPOINTS", &slow_copy())]);
    let before_kill = crate::support::read_until(&tansu, TOPIC, Duration::from_secs(120), |rs| {
        rs.len() >= ROWS / 4
    })
    .len();
    daemon.kill9();
    assert!(
        !daemon.log_text().contains("snapshot copied"),
        "the copy finished before the kill"
    );
    daemon.spawn().unwrap();
    daemon
        .wait_log("table copy fully acknowledged", Duration::from_secs(180))
        .await
        .unwrap();
    let rows_before = resumed_rows(&daemon.log_text());
    assert!(rows_before > 0, "the copy started over");
    let copied: Vec<i64> = crate::support::read_all(&tansu, TOPIC)
        .iter()
        .filter(|r| r.op() == "r")
        .map(|r| r.key.as_ref().unwrap()["id"].as_i64().unwrap())
        .collect();
    let distinct: BTreeSet<i64> = copied.iter().copied().collect();
    assert_eq!(distinct.len(), ROWS, "a row is missing");
    let duplicates = copied.len() - ROWS;
    assert!(
        duplicates < before_kill,
        "{duplicates} rows copied twice: the copy started over (had {before_kill} before the kill)"
    );
}

/// PostgreSQL writes a commit into the WAL a moment before other sessions
/// see it, and a commit waiting for a synchronous standby stays invisible
/// for as long as it waits, while the stream already carries it. A backfill
/// chunk read then saw the row's older image and put it after the newer
/// change on Kafka, for good. The chunk must be read again until the
/// commit is visible, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_chunk_is_read_again_while_a_commit_before_its_low_mark_is_invisible() {
    let (pg, tansu, dir, db) = crate::support::pg_and_tansu().await;
    db.batch_execute(
        "CREATE TABLE sync (id int PRIMARY KEY, v text);
         INSERT INTO sync SELECT g, 'old' FROM generate_series(1, 100) g;",
    )
    .await
    .unwrap();
    let cfg = config(&pg, &tansu, &dir.path().join("state"), &["sync"], "");
    let port = crate::support::free_port();
    let cfg = pgcdc_testkit::config::with_metrics(&cfg, port);
    let probe = crate::support::Probe::on(port);
    let mut daemon = crate::support::daemon(dir.path(), &cfg, &[]);
    daemon
        .wait_log("table copy fully acknowledged", Duration::from_secs(120))
        .await
        .unwrap();

    let writer = crate::support::waiting_writer(&pg, &db).await;
    let update = tokio::spawn(async move {
        writer
            .batch_execute("UPDATE sync SET v = 'new' WHERE id = 7")
            .await
    });
    let id7 = |r: &Record| r.key == Some(json!({"id": 7}));
    crate::support::read_until(&tansu, TOPIC, Duration::from_secs(60), |rs| {
        rs.iter()
            .any(|r| id7(r) && r.op() == "u" && r.after()["v"] == json!("new"))
    });
    let v: String = db
        .query_one("SELECT v FROM sync WHERE id = 7", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        v, "old",
        "the update must still be invisible (waiting for the standby)"
    );

    request_backfill(&daemon, "public.sync");
    daemon
        .wait_log("was not yet visible to its read", Duration::from_secs(60))
        .await
        .unwrap();
    let read_again = |m: &str, _| {
        let labels = [("table", "public.sync")];
        let n = crate::support::sample(m, "pgcdc_backfill_chunks_read_again_total", &labels);
        n >= Some(1.0)
    };
    probe
        .until("a chunk read again", &mut daemon, read_again)
        .await;
    assert!(
        !daemon.log_text().contains("backfill copied"),
        "{}",
        daemon.log_tail()
    );

    // The wait ends (cancelled: the transaction stays committed) and the update becomes visible.
    crate::support::release_commits(&db).await;
    update.await.unwrap().unwrap();
    daemon
        .wait_log("backfill copied", Duration::from_secs(60))
        .await
        .unwrap();
    let records = crate::support::read_until(&tansu, TOPIC, Duration::from_secs(60), |rs| {
        rs.iter().filter(|r| r.op() == "r").count() >= 200
    });
    let last = records.iter().rev().find(|r| id7(r)).unwrap();
    assert_eq!(
        (last.op(), &last.after()["v"]),
        ("r", &json!("new")),
        "the backfill's image of id 7 must be the visible one"
    );
    let stale: Vec<&Record> = records
        .iter()
        .filter(|r| r.op() == "r" && r.after()["v"] != json!("old") && !id7(r))
        .collect();
    assert!(stale.is_empty(), "{stale:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfills_while_a_writer_changes_the_table_end_equal_to_postgres() {
    let (pg, tansu, es, dir, db) = with_items(10000).await;
    db.batch_execute(
        "CREATE TABLE added (id int PRIMARY KEY, v text);
         INSERT INTO added SELECT g, 'a' || g FROM generate_series(1, 5000) g;",
    )
    .await
    .unwrap();
    // Stream only: the mirror gets rows only from the stream and the backfills.
    let es_cfg = format!(
        "\n[elasticsearch]\nrun_in_daemon = true\nurl = {:?}\nnumber_of_replicas = 0\nflush_interval_ms = 50\n",
        es.url
    );
    let snapshot = "\n[snapshot]\nmode = \"initial\"\nchunk_rows = 200\n";
    let state = dir.path().join("state");
    let cfg = config(&pg, &tansu, &state, &["items"], "") + snapshot + &es_cfg;
    let mut daemon = crate::support::daemon(dir.path(), &cfg, &[]);
    daemon
        .wait_log("table copy fully acknowledged", Duration::from_secs(120))
        .await
        .unwrap();

    // Re-copy items on request while a writer keeps changing it.
    let out = request_backfill(&daemon, "public.items");
    assert!(String::from_utf8_lossy(&out.stdout).contains("requested backfill of public.items"));
    let bad = crate::support::pgcdc(&daemon.config, &["snapshot", "--table", "public.nope"]);
    assert_eq!(
        bad.status.code(),
        Some(2),
        "unconfigured table must be refused"
    );
    let writer = pg.client().await.unwrap();
    let mut i = 0;
    while !daemon.log_text().contains("backfill copied") || i < 300 {
        let id = 1 + (i * 7919) % 10000;
        let sql = match i % 5 {
            0 => format!("DELETE FROM items WHERE id = {id}"),
            1 => format!("INSERT INTO items VALUES ({}, 'new', {i})", 10000 + i),
            2 => format!("UPDATE items SET id = {} WHERE id = {id}", 100_000 + i),
            _ => format!("UPDATE items SET name = 'w{i}', n = n + 1 WHERE id = {id}"),
        };
        writer.batch_execute(&sql).await.unwrap();
        assert!(daemon.is_running(), "pgcdc exited:\n{}", daemon.log_text());
        assert!(
            i < 20_000,
            "backfill never finished:\n{}",
            daemon.log_text()
        );
        // A steady writer, not a flood: the copy must make progress beside it.
        tokio::time::sleep(Duration::from_millis(5)).await;
        i += 1;
    }
    assert_mirror_equals_table(&es, &pg, &mut daemon).await;
    let log = daemon.log_text();
    assert!(log.contains("backfill requested"), "{log}");

    // A table added to the configuration is copied on the next start.
    assert_eq!(
        daemon.terminate(Duration::from_secs(60)).unwrap().code(),
        Some(0)
    );
    let cfg = config(&pg, &tansu, &state, &["items", "added"], "") + snapshot + &es_cfg;
    std::fs::write(&daemon.config, cfg).unwrap();
    daemon.spawn().unwrap();
    daemon
        .wait_log("table added to the configuration", Duration::from_secs(60))
        .await
        .unwrap();
    db.batch_execute("UPDATE added SET v = 'changed' WHERE id = 4999")
        .await
        .unwrap();
    let want = Want::Verified {
        pg: &pg,
        table: "public.added",
    };
    let docs = oracle::mirror_equals(
        &es.url,
        "cdc_public_added",
        want,
        Duration::from_secs(120),
        Some(&daemon),
    )
    .await
    .unwrap();
    assert_eq!(docs.len(), 5000);
    assert_eq!(docs["4999"].1["v"], json!("changed"));
    assert_eq!(docs["1"].1, json!({"id": 1, "v": "a1"}));
}

/// Row-level security on a table, with a policy that filters rows for
/// pgcdc's role: the copy fails loudly instead of copying only the rows the
/// policy shows (the stream sends every row's changes); `pgcdc check` and
/// the start say how to fix it, and once the role bypasses row-level
/// security the copy holds every row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_level_security_fails_the_copy_loudly_until_the_role_bypasses_it() {
    let (pg, tansu, dir, db) = crate::support::pg_and_tansu().await;
    db.batch_execute(
        "CREATE TABLE secured (id int PRIMARY KEY, v text);
         INSERT INTO secured VALUES (1, 'shown'), (20, 'filtered by the policy');
         ALTER TABLE secured ENABLE ROW LEVEL SECURITY;
         CREATE POLICY low ON secured USING (id < 10);
         CREATE PUBLICATION pgcdc FOR TABLE secured;
         CREATE ROLE reader LOGIN REPLICATION;
         GRANT SELECT ON secured TO reader;",
    )
    .await
    .unwrap();
    let cfg = config(&pg, &tansu, &dir.path().join("state"), &["secured"], "")
        .replace("user = \"postgres\"", "user = \"reader\"");
    let path = dir.path().join("check.toml");
    std::fs::write(&path, &cfg).unwrap();
    let check = crate::support::pgcdc(&path, &["check"]);
    let out = String::from_utf8_lossy(&check.stdout);
    assert!(
        out.lines().any(|l| l.starts_with("WARN  privileges")
            && l.contains("row-level security filters the rows of secured")
            && l.contains(r#"ALTER ROLE "reader" BYPASSRLS"#)),
        "{out}"
    );
    let daemon = crate::support::daemon(dir.path(), &cfg, &[]);
    daemon
        .wait_log(
            "query would be affected by row-level security policy",
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    assert!(daemon
        .log_text()
        .contains("row-level security filters these tables' rows"));
    let copied = |rs: &[Record]| -> BTreeSet<String> {
        rs.iter()
            .filter(|r| r.op() == "r")
            .map(|r| r.key.as_ref().unwrap().to_string())
            .collect()
    };
    assert!(copied(&crate::support::read_all(&tansu, TOPIC)).is_empty());
    db.batch_execute("ALTER ROLE reader BYPASSRLS")
        .await
        .unwrap();
    let both: BTreeSet<String> = [json!({"id": 1}), json!({"id": 20})]
        .iter()
        .map(Value::to_string)
        .collect();
    crate::support::read_until(&tansu, TOPIC, Duration::from_secs(120), |rs| {
        copied(rs) == both
    });
}

/// Creating the slot waits until every transaction holding a transaction ID
/// has ended, and a backfill's read waits for a table lock; PostgreSQL tells
/// the waiting session nothing. pgcdc names the sessions it waits for (log,
/// `pgcdc_postgres_blocking_sessions`, `/ready`'s reason) and goes on once
/// they end, also when the database's statement, lock and idle timeouts are
/// shorter than those waits and than the snapshot readers' idle time.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_that_block_the_slot_creation_or_a_backfill_are_named_then_waited_for() {
    let (pg, tansu, dir, db) = crate::support::pg_and_tansu().await;
    db.batch_execute(
        "CREATE TABLE items (id int PRIMARY KEY, v text);
         INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 50) g;
         CREATE TABLE other (id int);
         CREATE PUBLICATION pgcdc FOR TABLE items;
         DO $$ BEGIN
           EXECUTE format('ALTER DATABASE %I SET statement_timeout = ''100ms''', current_database());
           EXECUTE format('ALTER DATABASE %I SET lock_timeout = ''100ms''', current_database());
           EXECUTE format('ALTER DATABASE %I SET idle_in_transaction_session_timeout = ''300ms''',
                          current_database());
         END $$;",
    )
    .await
    .unwrap();
    let holder = pg.client().await.unwrap();
    holder
        .batch_execute(
            "SET idle_in_transaction_session_timeout = 0; BEGIN; INSERT INTO other VALUES (1)",
        )
        .await
        .unwrap();
    let pid: i32 = holder
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let port = crate::support::free_port();
    let cfg = config(&pg, &tansu, &dir.path().join("state"), &["items"], "");
    let cfg = pgcdc_testkit::config::with_metrics(&cfg, port);
    let named = format!("pid {pid} (");
    let path = dir.path().join("check.toml");
    std::fs::write(&path, &cfg).unwrap();
    let check = crate::support::pgcdc(&path, &["check"]);
    let out = String::from_utf8_lossy(&check.stdout);
    assert!(
        out.lines()
            .any(|l| l.starts_with("WARN  slot: pgcdc does not exist yet")
                && l.contains("waits until these transactions end")
                && l.contains(&named)),
        "{out}"
    );
    let probe = crate::support::Probe::on(port);
    // The snapshot readers stay idle in their transactions for 1 s.
    let plan_later = format!(
        "{}=sleep(1000)",
        pgcdc_actors::wire::failpoint::SNAPSHOT_PLAN
    );
    let mut daemon = crate::support::daemon(dir.path(), &cfg, &[("FAILPOINTS", &plan_later)]);
    daemon
        .wait_log(&named, Duration::from_secs(60))
        .await
        .unwrap();
    let line = |log: &str, what: &str| {
        log.lines()
            .find(|l| l.contains(&named) && l.contains(what))
            .map(str::to_owned)
    };
    let warned = line(&daemon.log_text(), "the initial snapshot").unwrap();
    assert!(
        warned.contains("idle in transaction")
            && warned.contains("pgcdc waits for its transaction to end")
            && warned.contains("pg_terminate_backend"),
        "{warned}"
    );
    let blocking = |m: &str| crate::support::sample(m, "pgcdc_postgres_blocking_sessions", &[]);
    probe
        .until("the blocker counted", &mut daemon, |m, ready| {
            blocking(m) == Some(1.0) && ready == 503
        })
        .await;
    let (_, why) = probe.ready().await;
    assert!(why.contains(&named), "{why}");
    let copied = |rs: &[Record]| rs.iter().filter(|r| r.op() == "r").count();
    assert_eq!(copied(&crate::support::read_all(&tansu, TOPIC)), 0);

    holder.batch_execute("COMMIT").await.unwrap();
    crate::support::read_until(&tansu, TOPIC, Duration::from_secs(60), |rs| {
        copied(rs) == 50
    });
    probe
        .until("nothing blocks, ready", &mut daemon, |m, ready| {
            blocking(m) == Some(0.0) && ready == 200
        })
        .await;
    assert!(daemon
        .log_text()
        .contains("no PostgreSQL session blocks pgcdc's any more"));

    // A backfill's read waits for a table lock held by an open transaction.
    holder
        .batch_execute("BEGIN; LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    request_backfill(&daemon, "public.items");
    let waited = |log: &str| line(log, "a backfill").filter(|l| l.contains("a table lock"));
    wait::until(
        "the backfill's blocker named",
        Duration::from_secs(60),
        || std::future::ready(waited(&daemon.log_text()).is_some()),
    )
    .await
    .unwrap();
    assert!(!daemon.log_text().contains("backfill copied"));
    probe
        .until("the blocker counted", &mut daemon, |m, _| {
            blocking(m) == Some(1.0)
        })
        .await;
    holder.batch_execute("ROLLBACK").await.unwrap();
    daemon
        .wait_log("backfill copied", Duration::from_secs(60))
        .await
        .unwrap();
    crate::support::read_until(&tansu, TOPIC, Duration::from_secs(60), |rs| {
        copied(rs) == 100
    });
    probe
        .until("nothing blocks", &mut daemon, |m, _| {
            blocking(m) == Some(0.0)
        })
        .await;
    let log = daemon.log_text();
    assert!(
        !log.contains("canceling statement due to") && !log.contains("idle-in-transaction timeout"),
        "{log}"
    );
}
