//! Schema changes while streaming: each DDL form runs while a concurrent
//! writer inserts and updates rows; the first change after the DDL already
//! has the new shape, every committed change is on the topic keyed by its
//! row, and the daemon keeps running. Generated columns (not published
//! before PostgreSQL 18) are left out of the snapshot as they are of the
//! stream. A table dropped and created again (in one transaction, in two,
//! and while pgcdc is stopped) is truncated on the topic and copied again:
//! folding the topic gives the new table, under a publication pgcdc adds it
//! back to as under one `FOR ALL TABLES`. So is a table renamed away and
//! back, and one whose column list or row filter in the publication
//! changed (while streaming, and while pgcdc is stopped).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pgcdc_actors::wire::header;
use serde_json::{json, Value};
use tokio::task::JoinHandle;

use crate::support::{config, wait, PgCluster, Record};

const TOPIC: &str = "cdc-events";
/// The table every test changes.
const TABLE: &str = "public.t";
/// How long a topic read may wait for the records a test expects.
const READ: Duration = Duration::from_secs(120);
/// How long the writer may take to commit the rows a phase waits for.
const PROGRESS: Duration = Duration::from_secs(60);
/// Writer rows committed before and again after the DDL: enough that the
/// DDL lands between writes, not before the first or after the last.
const ROWS_PER_PHASE: usize = 20;
/// The key of the row written last, after the writer stopped.
const SENTINEL: i32 = 1_000_000;

/// The table before any DDL: `n` and `extra` have defaults, so the writer
/// (which names only `id`) works on every shape the tests give it.
const CREATE: &str = "CREATE TABLE t (id int PRIMARY KEY, n int DEFAULT 7, extra text DEFAULT 'x')";

/// A task inserting row `i` and updating row `i - 1` in a loop, each
/// statement its own transaction; it returns the committed changes in
/// commit order as `(op, id)`. A statement that fails is not counted:
/// only committed changes must reach the topic.
struct Writer {
    /// Set to end the loop.
    stop: Arc<AtomicBool>,
    /// Inserts committed so far.
    committed: Arc<AtomicUsize>,
    /// The loop; its result is the committed changes.
    task: JoinHandle<Vec<(&'static str, i32)>>,
}

impl Writer {
    /// Start writing to `t` on a connection of its own.
    async fn start(pg: &PgCluster) -> Writer {
        let db = pg.client().await.unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let committed = Arc::new(AtomicUsize::new(0));
        let (halt, count) = (stop.clone(), committed.clone());
        let task = tokio::spawn(async move {
            let mut done = Vec::new();
            let mut i = 0;
            while !halt.load(Ordering::SeqCst) {
                i += 1;
                if db
                    .execute("INSERT INTO t (id) VALUES ($1)", &[&i])
                    .await
                    .is_ok()
                {
                    done.push(("c", i));
                    count.fetch_add(1, Ordering::SeqCst);
                }
                let prev = i - 1;
                let updated = db
                    .execute("UPDATE t SET id = id WHERE id = $1", &[&prev])
                    .await;
                if matches!(updated, Ok(1)) {
                    done.push(("u", prev));
                }
            }
            done
        });
        Writer {
            stop,
            committed,
            task,
        }
    }

    /// Wait until the writer committed `n` more inserts than `since`.
    async fn advance(&self, since: usize, n: usize) -> usize {
        let committed = self.committed.clone();
        wait::until("the writer commits rows", PROGRESS, || {
            let c = committed.load(Ordering::SeqCst);
            async move { c >= since + n }
        })
        .await
        .unwrap();
        self.committed.load(Ordering::SeqCst)
    }

    /// End the loop; the committed changes in commit order.
    async fn stop(self) -> Vec<(&'static str, i32)> {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.unwrap()
    }
}

/// `"X/Y"` as a number.
fn lsn(text: &str) -> u64 {
    let (hi, lo) = text.split_once('/').unwrap();
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

/// Run `ddl` on `t` while a writer streams rows into it; check the records.
/// `old` and `new` tell a row image of the shape before and after the DDL.
async fn ddl_under_a_writer(ddl: &str, old: fn(&Value) -> bool, new: fn(&Value) -> bool) {
    let (pg, tansu, dir, mut db) = crate::support::pg_and_tansu().await;
    db.batch_execute(CREATE).await.unwrap();
    let cfg = config(&pg, &tansu, &dir.path().join("state"), &["t"], "");
    let mut daemon = crate::support::daemon(dir.path(), &cfg, &[]);
    crate::support::wait_slot_active(&db, &mut daemon, "pgcdc").await;

    let writer = Writer::start(&pg).await;
    let before = writer.advance(0, ROWS_PER_PHASE).await;
    // The writer's statements wait on the DDL's lock, so every change
    // committed after the DDL has a commit LSN above this one.
    let tx = db.transaction().await.unwrap();
    tx.batch_execute(ddl).await.unwrap();
    let row = tx
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .unwrap();
    let boundary = lsn(row.get::<_, &str>(0));
    tx.commit().await.unwrap();
    writer.advance(before, ROWS_PER_PHASE).await;
    let mut committed = writer.stop().await;
    db.execute("INSERT INTO t (id) VALUES ($1)", &[&SENTINEL])
        .await
        .unwrap();
    committed.push(("c", SENTINEL));

    let records = crate::support::read_until(&tansu, TOPIC, READ, |rs| {
        rs.iter().any(|r| r.key == Some(json!({ "id": SENTINEL })))
    });
    let changes: Vec<&Record> = records.iter().filter(|r| r.value.is_some()).collect();
    let got: Vec<(String, String, Value)> = changes
        .iter()
        .map(|r| {
            let key = r.key.clone().unwrap_or(Value::Null);
            (r.op().to_owned(), r.header(header::TABLE).to_owned(), key)
        })
        .collect();
    let want: Vec<(String, String, Value)> = committed
        .iter()
        .map(|(op, id)| ((*op).to_owned(), TABLE.to_owned(), json!({ "id": id })))
        .collect();
    assert_eq!(got, want, "every committed change, in commit order");
    let (mut olds, mut news) = (0, 0);
    for r in &changes {
        let at = lsn(r.header(header::COMMIT_LSN));
        let after = r.after();
        if at < boundary {
            assert!(old(after), "before the ddl, old shape: {after}");
            olds += 1;
        } else {
            assert!(new(after), "after the ddl, new shape: {after}");
            news += 1;
        }
    }
    assert!(
        olds >= ROWS_PER_PHASE && news >= ROWS_PER_PHASE,
        "{olds} before, {news} after"
    );
    assert!(daemon.is_running(), "{}", daemon.log_tail());
}

/// Whether the row image has `column`.
fn has(after: &Value, column: &str) -> bool {
    after.get(column).is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_column_while_streaming() {
    ddl_under_a_writer(
        "ALTER TABLE t ADD COLUMN added text DEFAULT 'new'",
        |a| has(a, "n") && !has(a, "added"),
        |a| a["added"] == json!("new") && a["n"] == json!(7),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_column_while_streaming() {
    ddl_under_a_writer(
        "ALTER TABLE t DROP COLUMN extra",
        |a| a["extra"] == json!("x"),
        |a| !has(a, "extra") && a["n"] == json!(7),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rename_column_while_streaming() {
    ddl_under_a_writer(
        "ALTER TABLE t RENAME COLUMN n TO renamed",
        |a| a["n"] == json!(7) && !has(a, "renamed"),
        |a| a["renamed"] == json!(7) && !has(a, "n"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alter_column_type_while_streaming() {
    ddl_under_a_writer(
        "ALTER TABLE t ALTER COLUMN n TYPE text",
        |a| a["n"] == json!(7),
        |a| a["n"] == json!("7"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alter_column_type_to_bigint_while_streaming() {
    ddl_under_a_writer(
        "ALTER TABLE t ALTER COLUMN n TYPE bigint, ALTER COLUMN n SET DEFAULT 9000000000",
        |a| a["n"] == json!(7),
        |a| a["n"] == json!(9_000_000_000_i64) || a["n"] == json!(7),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_columns_are_in_neither_snapshot_nor_stream() {
    let (pg, tansu, dir, db) = crate::support::pg_and_tansu().await;
    db.batch_execute(
        "CREATE TABLE g (id int PRIMARY KEY, n int, twice int GENERATED ALWAYS AS (n * 2) STORED);
         INSERT INTO g (id, n) VALUES (1, 10);",
    )
    .await
    .unwrap();
    let cfg = config(&pg, &tansu, &dir.path().join("state"), &["g"], "");
    let mut daemon = crate::support::daemon(dir.path(), &cfg, &[]);
    crate::support::wait_slot_active(&db, &mut daemon, "pgcdc").await;
    db.batch_execute("INSERT INTO g (id, n) VALUES (2, 20)")
        .await
        .unwrap();
    let records = crate::support::read_until(&tansu, TOPIC, READ, |rs| {
        rs.iter().any(|r| r.key == Some(json!({"id": 2})))
    });
    let rows: Vec<(String, Value)> = records
        .iter()
        .filter(|r| r.value.is_some())
        .map(|r| (r.op().to_owned(), r.after().clone()))
        .collect();
    let want = [
        ("r".to_owned(), json!({"id": 1, "n": 10})),
        ("c".to_owned(), json!({"id": 2, "n": 20})),
    ];
    assert_eq!(rows, want, "the same columns in snapshot and stream");
    assert!(daemon.is_running(), "{}", daemon.log_tail());
}

/// The topic folded into rows by key: the last image of each key, deletes
/// remove it, a truncate removes every row before it.
fn fold(records: &[Record]) -> BTreeMap<String, Value> {
    let mut rows = BTreeMap::new();
    for r in records.iter().filter(|r| r.value.is_some()) {
        let key = r.key.clone().unwrap_or(Value::Null).to_string();
        match r.op() {
            "t" => rows.clear(),
            "d" => {
                rows.remove(&key);
            }
            _ => {
                rows.insert(key, r.after().clone());
            }
        }
    }
    rows
}

/// Every row of `t`, keyed as [`fold`] keys them.
async fn table_rows(db: &tokio_postgres::Client) -> BTreeMap<String, Value> {
    let rows = db
        .query("SELECT id, row_to_json(t)::text FROM t", &[])
        .await
        .unwrap();
    rows.iter()
        .map(|r| {
            let id: i32 = r.get(0);
            let row: Value = serde_json::from_str(r.get(1)).unwrap();
            (json!({ "id": id }).to_string(), row)
        })
        .collect()
}

/// How many truncate records `records` hold.
fn truncates(records: &[Record]) -> usize {
    records.iter().filter(|r| r.op() == "t").count()
}

/// Stop `daemon`, drop `t` and create it again with the rows `values` (an
/// `INSERT … VALUES` list of ids), start it again; the records once the
/// topic folds to the new table.
async fn created_again_while_stopped(
    daemon: &mut crate::support::Daemon,
    db: &tokio_postgres::Client,
    tansu: &crate::support::Tansu,
    values: &str,
) -> Vec<Record> {
    daemon.terminate(Duration::from_secs(60)).unwrap();
    db.batch_execute(&format!(
        "DROP TABLE t; {CREATE}; INSERT INTO t (id) VALUES {values}"
    ))
    .await
    .unwrap();
    daemon.spawn().unwrap();
    until_topic_equals_table(tansu, db).await
}

/// Wait until the topic folds to exactly the rows of `t`; the records.
async fn until_topic_equals_table(
    tansu: &crate::support::Tansu,
    db: &tokio_postgres::Client,
) -> Vec<Record> {
    let want = table_rows(db).await;
    crate::support::read_until(tansu, TOPIC, READ, |rs| fold(rs) == want)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_dropped_and_created_again_is_truncated_and_copied_again() {
    let (pg, tansu, dir, db) = crate::support::pg_and_tansu().await;
    db.batch_execute(CREATE).await.unwrap();
    db.batch_execute("INSERT INTO t (id) SELECT -g FROM generate_series(1, 5) g")
        .await
        .unwrap();
    let cfg = config(&pg, &tansu, &dir.path().join("state"), &["t"], "");
    let mut daemon = crate::support::daemon(dir.path(), &cfg, &[]);
    crate::support::wait_slot_active(&db, &mut daemon, "pgcdc").await;

    // In one transaction, under a writer; the new table has a row written
    // before pgcdc can have added it to the publication.
    let writer = Writer::start(&pg).await;
    let before = writer.advance(0, ROWS_PER_PHASE).await;
    db.batch_execute(&format!(
        "BEGIN; DROP TABLE t; {CREATE}; INSERT INTO t (id) VALUES (-100); COMMIT;"
    ))
    .await
    .unwrap();
    writer.advance(before, ROWS_PER_PHASE).await;
    writer.stop().await;
    let records = until_topic_equals_table(&tansu, &db).await;
    assert_eq!(
        truncates(&records),
        1,
        "one truncate per table created again"
    );

    // Dropped, reported while gone, then created again.
    db.batch_execute("DROP TABLE t").await.unwrap();
    daemon
        .wait_log("configured table no longer exists", READ)
        .await
        .unwrap();
    db.batch_execute(&format!("{CREATE}; INSERT INTO t (id) VALUES (-200)"))
        .await
        .unwrap();
    let records = until_topic_equals_table(&tansu, &db).await;
    assert_eq!(truncates(&records), 2);

    // Dropped and created again while pgcdc is stopped.
    let records = created_again_while_stopped(&mut daemon, &db, &tansu, "(-300), (-301)").await;
    assert_eq!(truncates(&records), 3);
    assert!(daemon.is_running(), "{}", daemon.log_tail());
}

/// The rows of `t` the filter `filter` passes, with the columns `columns`
/// only, keyed as [`fold`] keys them: what the publication sends.
async fn published_rows(
    db: &tokio_postgres::Client,
    columns: &str,
    filter: &str,
) -> BTreeMap<String, Value> {
    let q =
        format!("SELECT id, row_to_json(p)::text FROM (SELECT {columns} FROM t WHERE {filter}) p");
    let rows = db.query(&q, &[]).await.unwrap();
    rows.iter()
        .map(|r| {
            let id: i32 = r.get(0);
            let row: Value = serde_json::from_str(r.get(1)).unwrap();
            (json!({ "id": id }).to_string(), row)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_column_list_or_row_filter_copies_the_table_again() {
    let (pg, tansu, dir, db) = crate::support::pg_and_tansu().await;
    db.batch_execute(CREATE).await.unwrap();
    db.batch_execute(
        "INSERT INTO t (id) SELECT -g FROM generate_series(1, 6) g;
         CREATE PUBLICATION pgcdc FOR TABLE t (id, n) WHERE (id % 2 = 0);",
    )
    .await
    .unwrap();
    let cfg = config(&pg, &tansu, &dir.path().join("state"), &["t"], "");
    let mut daemon = crate::support::daemon(dir.path(), &cfg, &[]);
    crate::support::wait_slot_active(&db, &mut daemon, "pgcdc").await;
    let until_mirrored = |columns: &'static str, filter: &'static str| {
        let (db, tansu) = (&db, &tansu);
        async move {
            let want = published_rows(db, columns, filter).await;
            crate::support::read_until(tansu, TOPIC, READ, |rs| fold(rs) == want)
        }
    };

    // The snapshot and the stream: even rows, without `extra`.
    let writer = Writer::start(&pg).await;
    let before = writer.advance(0, ROWS_PER_PHASE).await;
    db.batch_execute("ALTER PUBLICATION pgcdc SET TABLE t (id, n, extra) WHERE (id % 3 = 0)")
        .await
        .unwrap();
    writer.advance(before, ROWS_PER_PHASE).await;
    writer.stop().await;
    // Changed while streaming: rows divisible by 3, with `extra`; the even
    // rows copied before are gone.
    let records = until_mirrored("id, n, extra", "id % 3 = 0").await;
    assert_eq!(truncates(&records), 1, "one reset");
    assert!(
        daemon
            .log_text()
            .contains("column list or row filter for the table changed"),
        "{}",
        daemon.log_tail()
    );

    // Changed while pgcdc is stopped.
    daemon.terminate(Duration::from_secs(60)).unwrap();
    db.batch_execute(&format!(
        "ALTER PUBLICATION pgcdc SET TABLE t WHERE (id > 0);
         INSERT INTO t (id) VALUES (-100), ({SENTINEL});"
    ))
    .await
    .unwrap();
    daemon.spawn().unwrap();
    let records = until_mirrored("*", "id > 0").await;
    assert_eq!(truncates(&records), 2, "one more reset");
    assert!(daemon.is_running(), "{}", daemon.log_tail());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_a_publication_for_all_tables_a_table_created_again_or_renamed_back_is_copied_again()
{
    let (pg, tansu, dir, db) = crate::support::pg_and_tansu().await;
    db.batch_execute(CREATE).await.unwrap();
    db.batch_execute(
        "INSERT INTO t (id) SELECT -g FROM generate_series(1, 5) g;
         CREATE PUBLICATION pgcdc FOR ALL TABLES;",
    )
    .await
    .unwrap();
    let cfg = config(&pg, &tansu, &dir.path().join("state"), &["t"], "");
    let port = crate::support::free_port();
    let cfg = pgcdc_testkit::config::with_metrics(&cfg, port);
    let mut daemon = crate::support::daemon(dir.path(), &cfg, &[]);
    crate::support::wait_slot_active(&db, &mut daemon, "pgcdc").await;
    until_topic_equals_table(&tansu, &db).await;

    // Dropped and created again: the publication takes the new table in at
    // once, and the dropped table's rows must not stay.
    db.batch_execute(&format!(
        "DROP TABLE t; {CREATE}; INSERT INTO t (id) VALUES (-100), (-101)"
    ))
    .await
    .unwrap();
    let records = until_topic_equals_table(&tansu, &db).await;
    assert_eq!(truncates(&records), 1, "one reset for the new table");
    let log = daemon.log_text();
    assert!(log.contains("the table was created again"), "{log}");

    // Renamed away, changed, renamed back: the changes made meanwhile were
    // not captured.
    db.batch_execute("ALTER TABLE t RENAME TO t_away")
        .await
        .unwrap();
    daemon
        .wait_log("configured table no longer exists", READ)
        .await
        .unwrap();
    db.batch_execute(
        "INSERT INTO t_away (id) VALUES (-200); DELETE FROM t_away WHERE id = -100;
         ALTER TABLE t_away RENAME TO t;",
    )
    .await
    .unwrap();
    let records = until_topic_equals_table(&tansu, &db).await;
    assert_eq!(truncates(&records), 2, "one more reset");
    let log = daemon.log_text();
    assert!(log.contains("exists again after it was gone"), "{log}");
    let metrics = crate::support::Probe::on(port).metrics().await;
    let resets = |cause| {
        let labels = [("table", "public.t"), ("cause", cause)];
        crate::support::sample(&metrics, "pgcdc_table_resets_total", &labels)
    };
    assert_eq!(resets("created_again"), Some(1.0), "{metrics}");
    assert_eq!(resets("back_after_gone"), Some(1.0), "{metrics}");

    // Dropped and created again while pgcdc is stopped.
    let records = created_again_while_stopped(&mut daemon, &db, &tansu, "(-300)").await;
    assert_eq!(truncates(&records), 3);
    assert!(daemon.is_running(), "{}", daemon.log_tail());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_option_changed_while_streaming_is_said_and_counted() {
    let (pg, tansu, dir, db) = crate::support::pg_and_tansu().await;
    db.batch_execute(CREATE).await.unwrap();
    let cfg = config(&pg, &tansu, &dir.path().join("state"), &["t"], "");
    let port = crate::support::free_port();
    let cfg = pgcdc_testkit::config::with_metrics(&cfg, port);
    let probe = crate::support::Probe::on(port);
    let mut daemon = crate::support::daemon(dir.path(), &cfg, &[]);
    crate::support::wait_slot_active(&db, &mut daemon, "pgcdc").await;
    let unpublished = |n: f64| {
        move |m: &str, _| {
            crate::support::sample(m, "pgcdc_publication_unpublished_operations", &[]) == Some(n)
        }
    };
    probe
        .until("every operation published", &mut daemon, unpublished(0.0))
        .await;

    // Each change of the option: what is said, and how many operations are left out.
    for (publish, said, left_out) in [
        (
            "insert, update",
            "the publication now does not publish delete, truncate",
            2.0,
        ),
        (
            "insert, update, delete, truncate",
            "the publication publishes every operation again",
            0.0,
        ),
    ] {
        db.batch_execute(&format!(
            "ALTER PUBLICATION pgcdc SET (publish = '{publish}')"
        ))
        .await
        .unwrap();
        daemon.wait_log(said, READ).await.unwrap();
        probe.until(said, &mut daemon, unpublished(left_out)).await;
    }
}
