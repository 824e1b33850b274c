//! Tables as users have them: row keys from the replica identity (USING
//! INDEX, FULL, NOTHING refused), a key column renamed and the primary key
//! changed while streaming, partitioned tables under their root's name
//! (ATTACH/DETACH and a partition's own TRUNCATE copy the table again
//! where rows came or went without a change), a table with inheritance
//! children, a publication with a column list and
//! a row filter, a publication with more tables than configured, backfill signals for tables that cannot be backfilled, and
//! forged signals and watermarks.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Duration;

use pgcdc_actors::snapshot::watermark::{Mark, MessageKey, Signal};
use pgcdc_actors::wire::{header, message};
use serde_json::{json, Value};

use crate::support::{config, Daemon, Record, Tansu};

const TOPIC: &str = "cdc-events";
/// How long a topic read may wait for the records a test expects.
const READ: Duration = Duration::from_secs(120);
/// How long a refused start may take to exit.
const EXIT: Duration = Duration::from_secs(60);
/// `ExitCode::SourceNotReady`.
const SOURCE_NOT_READY: i32 = 3;

/// `(op, table, key)` of every record but tombstones, in topic order.
fn changes(records: &[Record]) -> Vec<(String, String, Value)> {
    records
        .iter()
        .filter(|r| r.value.is_some())
        .map(|r| {
            let key = r.key.clone().unwrap_or(Value::Null);
            (r.op().to_owned(), r.header(header::TABLE).to_owned(), key)
        })
        .collect()
}

fn change(op: &str, table: &str, key: Value) -> (String, String, Value) {
    (op.to_owned(), table.to_owned(), key)
}

/// Read the topic until a record of `table` keyed `key` arrived.
fn read_until_key(tansu: &Tansu, table: &str, key: Value) -> Vec<Record> {
    crate::support::read_until(tansu, TOPIC, READ, |rs| {
        rs.iter()
            .any(|r| r.header(header::TABLE) == table && r.key.as_ref() == Some(&key))
    })
}

/// Write a transactional logical message, as pgcdc does.
async fn emit(db: &tokio_postgres::Client, prefix: &str, content: &str) {
    db.execute(
        "SELECT pg_logical_emit_message(true, $1, $2)",
        &[&prefix, &content],
    )
    .await
    .unwrap();
}

/// Write `cfg` beside the daemon's and run a one-shot command with it.
fn one_shot(dir: &Path, cfg: &str, args: &[&str]) -> std::process::Output {
    let path = dir.join("one-shot.toml");
    std::fs::write(&path, cfg).unwrap();
    crate::support::pgcdc(&path, args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_are_keyed_by_the_replica_identity_in_snapshot_and_stream() {
    let (pg, tansu, dir, db) = crate::support::pg_and_tansu().await;
    db.batch_execute(
        "CREATE TABLE by_index (id int PRIMARY KEY, code text NOT NULL, v text);
         CREATE UNIQUE INDEX by_index_code ON by_index (code);
         ALTER TABLE by_index REPLICA IDENTITY USING INDEX by_index_code;
         INSERT INTO by_index VALUES (1, 'a', 'x'), (2, 'b', 'y');
         CREATE TABLE full_pk (id int PRIMARY KEY, v text);
         ALTER TABLE full_pk REPLICA IDENTITY FULL;
         INSERT INTO full_pk VALUES (1, 'x');
         CREATE TABLE full_bag (v text, n int);
         ALTER TABLE full_bag REPLICA IDENTITY FULL;
         INSERT INTO full_bag VALUES ('x', 1);",
    )
    .await
    .unwrap();
    let tables = ["by_index", "full_pk", "full_bag"];
    let cfg = config(&pg, &tansu, &dir.path().join("state"), &tables, "");
    let mut daemon = crate::support::daemon(dir.path(), &cfg, &[]);
    crate::support::wait_slot_active(&db, &mut daemon, "pgcdc").await;
    db.batch_execute(
        "DELETE FROM by_index WHERE id = 1;
         UPDATE by_index SET v = 'z' WHERE id = 2;
         DELETE FROM full_pk WHERE id = 1;
         DELETE FROM full_bag;
         INSERT INTO by_index VALUES (3, 'c', 'end');",
    )
    .await
    .unwrap();
    let records = read_until_key(&tansu, "public.by_index", json!({"code": "c"}));
    let got = changes(&records);
    let want = [
        change("r", "public.by_index", json!({"code": "a"})),
        change("r", "public.by_index", json!({"code": "b"})),
        change("r", "public.full_bag", json!({"v": "x", "n": 1})),
        change("r", "public.full_pk", json!({"id": 1})),
        change("d", "public.by_index", json!({"code": "a"})),
        change("u", "public.by_index", json!({"code": "b"})),
        change("d", "public.full_pk", json!({"id": 1})),
        change("d", "public.full_bag", json!({"v": "x", "n": 1})),
        change("c", "public.by_index", json!({"code": "c"})),
    ];
    let mut snapshot: Vec<_> = got.iter().filter(|c| c.0 == "r").cloned().collect();
    snapshot.sort_by_key(|c| (c.1.clone(), c.2.to_string()));
    let streamed: Vec<_> = got.iter().filter(|c| c.0 != "r").cloned().collect();
    assert_eq!(snapshot, want[..4], "snapshot keys");
    assert_eq!(streamed, want[4..], "stream keys");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_identity_nothing_is_refused_and_the_table_stays_writable() {
    let (pg, tansu, dir, db) = crate::support::pg_and_tansu().await;
    db.batch_execute(
        "CREATE TABLE nada (id int PRIMARY KEY, v text);
         ALTER TABLE nada REPLICA IDENTITY NOTHING;
         INSERT INTO nada VALUES (1, 'x'), (2, 'y');",
    )
    .await
    .unwrap();
    let cfg = config(&pg, &tansu, &dir.path().join("state"), &["nada"], "");
    let check = one_shot(dir.path(), &cfg, &["check"]);
    let printed = String::from_utf8_lossy(&check.stdout);
    assert!(
        printed.contains("REPLICA IDENTITY NOTHING"),
        "check: {printed}"
    );
    refused_naming_the_fix(
        dir.path(),
        &cfg,
        r#"ALTER TABLE "public"."nada" REPLICA IDENTITY DEFAULT"#,
    );
    db.batch_execute("UPDATE nada SET v = 'changed' WHERE id = 1; DELETE FROM nada WHERE id = 2;")
        .await
        .expect("the refused table's writes still succeed");
    let published = db
        .query(
            "SELECT 1 FROM pg_publication_tables WHERE tablename = 'nada'",
            &[],
        )
        .await
        .unwrap();
    assert!(published.is_empty(), "the refused table was published");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_follows_a_renamed_key_column_and_a_changed_primary_key() {
    let (pg, tansu, dir, db) = crate::support::pg_and_tansu().await;
    db.batch_execute("CREATE TABLE ren (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let cfg = config(&pg, &tansu, &dir.path().join("state"), &["ren"], "");
    let mut daemon = crate::support::daemon(dir.path(), &cfg, &[]);
    crate::support::wait_slot_active(&db, &mut daemon, "pgcdc").await;
    db.batch_execute(
        "INSERT INTO ren VALUES (1, 'one');
         ALTER TABLE ren RENAME COLUMN id TO uid;
         INSERT INTO ren VALUES (2, 'two');
         UPDATE ren SET v = 'uno' WHERE uid = 1;
         DELETE FROM ren WHERE uid = 2;
         ALTER TABLE ren ADD COLUMN code text;
         UPDATE ren SET code = 'k' || uid;
         ALTER TABLE ren ALTER COLUMN code SET NOT NULL;
         ALTER TABLE ren DROP CONSTRAINT ren_pkey, ADD PRIMARY KEY (code);
         UPDATE ren SET v = 'eins' WHERE uid = 1;
         DELETE FROM ren WHERE code = 'k1';",
    )
    .await
    .unwrap();
    let records = crate::support::read_until(&tansu, TOPIC, READ, |rs| {
        rs.iter()
            .any(|r| r.op() == "d" && r.key == Some(json!({"code": "k1"})))
    });
    let t = "public.ren";
    let want = [
        change("c", t, json!({"id": 1})),
        change("c", t, json!({"uid": 2})),
        change("u", t, json!({"uid": 1})),
        change("d", t, json!({"uid": 2})),
        change("u", t, json!({"uid": 1})),
        change("u", t, json!({"code": "k1"})),
        change("d", t, json!({"code": "k1"})),
    ];
    assert_eq!(changes(&records), want);
    assert!(daemon.is_running(), "{}", daemon.log_tail());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_table_is_captured_under_its_root_through_attach_and_detach() {
    let (pg, tansu, dir, db) = crate::support::pg_and_tansu().await;
    db.batch_execute(
        "CREATE TABLE m (id int, region text, v text, PRIMARY KEY (id, region)) PARTITION BY LIST (region);
         CREATE TABLE m_eu PARTITION OF m FOR VALUES IN ('eu');
         CREATE TABLE m_us PARTITION OF m FOR VALUES IN ('us');
         INSERT INTO m VALUES (1, 'eu', 'a'), (2, 'us', 'b');
         CREATE TABLE m_ap (LIKE m INCLUDING ALL);
         INSERT INTO m_ap VALUES (50, 'ap', 'held before the attach');",
    )
    .await
    .unwrap();
    let cfg = config(&pg, &tansu, &dir.path().join("state"), &["m"], "");
    let port = crate::support::free_port();
    let cfg = pgcdc_testkit::config::with_metrics(&cfg, port);
    let probe = crate::support::Probe::on(port);
    let mut daemon = crate::support::daemon(dir.path(), &cfg, &[]);
    crate::support::wait_slot_active(&db, &mut daemon, "pgcdc").await;
    let copies = |m: &str, cause: &str| {
        let labels = [("table", "public.m"), ("cause", cause)];
        crate::support::sample(m, "pgcdc_table_resets_total", &labels)
    };
    let attached = |m: &str| copies(m, "partition_attached");
    let removed = |m: &str| copies(m, "partition_removed");

    // Attached holding a row no change brought: copied again, no truncate.
    db.batch_execute(
        "INSERT INTO m VALUES (3, 'eu', 'c'), (4, 'us', 'd');
         UPDATE m_us SET v = 'bb' WHERE id = 2;
         ALTER TABLE m ATTACH PARTITION m_ap FOR VALUES IN ('ap');
         INSERT INTO m VALUES (5, 'ap', 'e');",
    )
    .await
    .unwrap();
    let records = read_until_table(&tansu, &db).await;
    assert!(records.iter().all(|r| r.op() != "t"), "no truncate");
    assert_eq!(attached(&probe.metrics().await), Some(1.0));
    assert!(daemon
        .log_text()
        .contains("partitions attached to the table hold rows no change brought (m_ap)"));
    let stream: Vec<_> = changes(&records)
        .into_iter()
        .filter(|c| c.0 != "r")
        .take(4)
        .collect();
    let key = |id: i64, region: &str| json!({"id": id, "region": region});
    let want = [
        change("c", "public.m", key(3, "eu")),
        change("c", "public.m", key(4, "us")),
        change("u", "public.m", key(2, "us")),
        change("c", "public.m", key(5, "ap")),
    ];
    assert_eq!(stream, want, "changes under the root's name");
    assert!(
        !daemon
            .log_text()
            .contains("the publication has a table that postgres.tables does not"),
        "no warning for the partitions PostgreSQL describes with their root"
    );

    // Detached: its rows leave the mirror (truncate, copy again).
    db.batch_execute(
        "ALTER TABLE m DETACH PARTITION m_us;
         INSERT INTO m_us VALUES (6, 'us', 'not in m');
         DELETE FROM m WHERE id = 1;
         INSERT INTO m VALUES (7, 'eu', 'end');",
    )
    .await
    .unwrap();
    let records = read_until_table(&tansu, &db).await;
    assert!(records.iter().any(|r| r.op() == "t"), "truncated");
    assert!(removed(&probe.metrics().await) >= Some(1.0));

    // Truncated by itself: PostgreSQL publishes no truncate under the root.
    db.batch_execute("TRUNCATE m_eu; INSERT INTO m VALUES (9, 'eu', 'after')")
        .await
        .unwrap();
    read_until_table(&tansu, &db).await;
    let rewritten = copies(&probe.metrics().await, "partition_rewritten");
    assert!(rewritten >= Some(1.0));

    // Created empty: nothing to copy; its rows come as changes.
    db.batch_execute("CREATE TABLE m_sa PARTITION OF m FOR VALUES IN ('sa')")
        .await
        .unwrap();
    let empty = "partitions added to the table, empty: nothing to copy";
    daemon.wait_log(empty, READ).await.unwrap();
    db.batch_execute("INSERT INTO m VALUES (8, 'sa', 'f')")
        .await
        .unwrap();
    read_until_table(&tansu, &db).await;
    assert_eq!(
        attached(&probe.metrics().await),
        Some(1.0),
        "not copied again"
    );

    // Attached while pgcdc is stopped: found at the next start (a new
    // process, so its counter starts at 0).
    assert_eq!(daemon.terminate(EXIT).unwrap().code(), Some(0));
    db.batch_execute(
        "CREATE TABLE m_af (LIKE m INCLUDING ALL);
         INSERT INTO m_af VALUES (60, 'af', 'attached while stopped');
         ALTER TABLE m ATTACH PARTITION m_af FOR VALUES IN ('af');",
    )
    .await
    .unwrap();
    daemon.spawn().unwrap();
    read_until_table(&tansu, &db).await;
    assert_eq!(attached(&probe.metrics().await), Some(1.0));
}

/// PostgreSQL decodes no change of an unlogged or a foreign partition's
/// rows: while a partitioned table has one, pgcdc says the table is not
/// captured (log, `pgcdc_tables_uncaptured`, `/ready`, `pgcdc check`), and
/// once every partition is decoded again it copies the table again, so
/// the changes missed meanwhile reach the mirror.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unlogged_and_foreign_partitions_are_reported_uncaptured_then_copied_again() {
    let (pg, tansu, dir, db) = crate::support::pg_and_tansu().await;
    // A table with a unique index cannot have a foreign partition: `mf`
    // is keyed by its whole row.
    db.batch_execute(
        "CREATE TABLE m (id int PRIMARY KEY, v text) PARTITION BY RANGE (id);
         CREATE TABLE m_1 PARTITION OF m FOR VALUES FROM (0) TO (100);
         CREATE UNLOGGED TABLE m_2 PARTITION OF m FOR VALUES FROM (100) TO (200);
         INSERT INTO m VALUES (1, 'a'), (150, 'b');
         CREATE TABLE mf (id int, v text) PARTITION BY RANGE (id);
         ALTER TABLE mf REPLICA IDENTITY FULL;
         CREATE TABLE mf_1 PARTITION OF mf FOR VALUES FROM (0) TO (100);",
    )
    .await
    .unwrap();
    let cfg = config(&pg, &tansu, &dir.path().join("state"), &["m", "mf"], "");
    let port = crate::support::free_port();
    let cfg = pgcdc_testkit::config::with_metrics(&cfg, port);
    let probe = crate::support::Probe::on(port);
    let mut daemon = crate::support::daemon(dir.path(), &cfg, &[]);
    crate::support::wait_slot_active(&db, &mut daemon, "pgcdc").await;
    daemon
        .wait_log("partitions=m_2 (unlogged)", READ)
        .await
        .unwrap();
    let undecoded = "PostgreSQL decodes no change of these partitions' rows";
    assert!(daemon.log_text().contains(undecoded));
    let uncaptured = |m: &str| crate::support::sample(m, "pgcdc_tables_uncaptured", &[]);
    let resets = |m: &str, table: &str| {
        let labels = [("table", table), ("cause", "partition_undecoded")];
        crate::support::sample(m, "pgcdc_table_resets_total", &labels)
    };
    probe
        .until("m counted uncaptured", &mut daemon, |m, ready| {
            uncaptured(m) == Some(1.0) && ready == 503
        })
        .await;
    let (_, why) = probe.ready().await;
    assert!(why.contains("unlogged or foreign partitions"), "{why}");
    let check = |dir: &Path, line: &str| {
        let out = one_shot(dir, &cfg, &["check"]);
        let out = String::from_utf8_lossy(&out.stdout).into_owned();
        let warned = out
            .lines()
            .any(|l| l.starts_with("WARN  publication") && l.contains(line));
        assert!(warned, "{out}");
    };
    check(dir.path(), "public.m's partitions m_2 (unlogged):");

    // The unlogged partition's changes never reach the stream; once it is
    // logged the table is copied again and its mirror has them.
    db.batch_execute(
        "INSERT INTO m VALUES (2, 'logged'), (151, 'not decoded');
         UPDATE m SET v = 'not decoded either' WHERE id = 150;",
    )
    .await
    .unwrap();
    db.batch_execute("ALTER TABLE m_2 SET LOGGED")
        .await
        .unwrap();
    let records = read_until_table(&tansu, &db).await;
    assert!(records.iter().any(|r| r.op() == "t"), "truncated");
    probe
        .until("m captured again", &mut daemon, |m, _| {
            uncaptured(m) == Some(0.0) && resets(m, "public.m") == Some(1.0)
        })
        .await;

    // A foreign partition (a wrapper without a handler: no row is read
    // from it), until it is detached.
    db.batch_execute(
        "CREATE FOREIGN DATA WRAPPER nowhere;
         CREATE SERVER elsewhere FOREIGN DATA WRAPPER nowhere;
         CREATE FOREIGN TABLE mf_f PARTITION OF mf FOR VALUES FROM (100) TO (200) SERVER elsewhere;",
    )
    .await
    .unwrap();
    daemon
        .wait_log("partitions=mf_f (foreign table)", READ)
        .await
        .unwrap();
    probe
        .until("mf counted uncaptured", &mut daemon, |m, ready| {
            uncaptured(m) == Some(1.0) && ready == 503
        })
        .await;
    check(dir.path(), "public.mf's partitions mf_f (foreign table):");
    db.batch_execute("ALTER TABLE mf DETACH PARTITION mf_f")
        .await
        .unwrap();
    probe
        .until("every table captured", &mut daemon, |m, ready| {
            uncaptured(m) == Some(0.0) && ready == 200 && resets(m, "public.mf") == Some(1.0)
        })
        .await;
}

/// Read the topic until folding it gives the rows of `m` (`id` → `v`).
async fn read_until_table(tansu: &Tansu, db: &tokio_postgres::Client) -> Vec<Record> {
    let rows = db.query("SELECT id::int8, v FROM m", &[]).await.unwrap();
    let want: BTreeMap<i64, Value> = rows
        .iter()
        .map(|r| (r.get(0), json!(r.get::<_, String>(1))))
        .collect();
    let records = crate::support::read_until(tansu, TOPIC, READ, |rs| fold(rs) == want);
    assert!(records
        .iter()
        .all(|r| r.header(header::TABLE) == "public.m"));
    records
}

/// A table with an inheritance child (`INHERITS`): PostgreSQL publishes
/// the child's changes under the child's name, an update through the
/// parent included, so the table's records hold its own rows only, in the
/// snapshot as in the stream, and the start says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_with_inheritance_children_holds_only_its_own_rows() {
    let (pg, tansu, dir, db) = crate::support::pg_and_tansu().await;
    db.batch_execute(
        "CREATE TABLE ip (id int PRIMARY KEY, v text);
         CREATE TABLE ic (extra int, PRIMARY KEY (id)) INHERITS (ip);
         INSERT INTO ip VALUES (1, 'parent');
         INSERT INTO ic VALUES (2, 'child', 0);",
    )
    .await
    .unwrap();
    let cfg = config(&pg, &tansu, &dir.path().join("state"), &["ip"], "");
    let mut daemon = crate::support::daemon(dir.path(), &cfg, &[]);
    crate::support::wait_slot_active(&db, &mut daemon, "pgcdc").await;
    let log = daemon.log_text();
    assert!(
        log.contains("the table has inheritance children") && log.contains("children=ic"),
        "{}",
        daemon.log_tail()
    );
    db.batch_execute(
        "UPDATE ip SET v = 'changed through the parent' WHERE id = 2;
         INSERT INTO ip VALUES (3, 'end');",
    )
    .await
    .unwrap();
    let records = read_until_key(&tansu, "public.ip", json!({"id": 3}));
    let want: BTreeMap<i64, Value> = [(1, json!("parent")), (3, json!("end"))].into();
    assert_eq!(fold(&records), want);
    let check = one_shot(dir.path(), &cfg, &["check"]);
    let out = String::from_utf8_lossy(&check.stdout);
    assert!(
        out.lines().any(|l| l.starts_with("WARN  publication")
            && l.contains("ip's inheritance children (ic) under their own names")),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_snapshot_reads_only_the_columns_and_rows_the_publication_sends() {
    let (pg, tansu, dir, db) = crate::support::pg_and_tansu().await;
    db.batch_execute(
        "CREATE TABLE acct (tenant int, id int, name text, secret text, PRIMARY KEY (tenant, id));
         INSERT INTO acct VALUES (1, 1, 'a', 's'), (2, 1, 'b', 's'), (1, 2, 'c', 's');
         CREATE PUBLICATION pgcdc FOR TABLE acct (tenant, id, name) WHERE (tenant = 1);",
    )
    .await
    .unwrap();
    let cfg = config(&pg, &tansu, &dir.path().join("state"), &["acct"], "");
    let mut daemon = crate::support::daemon(dir.path(), &cfg, &[]);
    crate::support::wait_slot_active(&db, &mut daemon, "pgcdc").await;
    db.batch_execute(
        "INSERT INTO acct VALUES (2, 2, 'e', 's');
         UPDATE acct SET name = 'a2' WHERE tenant = 1 AND id = 1;
         DELETE FROM acct WHERE tenant = 2 AND id = 1;
         DELETE FROM acct WHERE tenant = 1 AND id = 2;
         INSERT INTO acct VALUES (1, 9, 'end', 's');",
    )
    .await
    .unwrap();
    let key = |tenant: i64, id: i64| json!({"tenant": tenant, "id": id});
    let records = read_until_key(&tansu, "public.acct", key(1, 9));
    let want = [
        change("r", "public.acct", key(1, 1)),
        change("r", "public.acct", key(1, 2)),
        change("u", "public.acct", key(1, 1)),
        change("d", "public.acct", key(1, 2)),
        change("c", "public.acct", key(1, 9)),
    ];
    let mut got = changes(&records);
    got[..2].sort_by_key(|c| c.2.to_string());
    assert_eq!(
        got, want,
        "only tenant 1's rows, in the snapshot as in the stream"
    );
    for r in records.iter().filter(|r| r.value.is_some()) {
        let v = r.value.as_ref().unwrap();
        for row in [&v["before"], &v["after"]] {
            assert!(row.get("secret").is_none(), "unpublished column sent: {v}");
        }
        assert_eq!(r.after()["name"].is_string(), r.op() != "d", "{v}");
        let types: Value = serde_json::from_str(r.header(header::TYPES)).unwrap();
        assert_eq!(
            types,
            json!({"tenant": "int4", "id": "int4", "name": "text"}),
            "{}",
            r.op()
        );
    }
    let out = one_shot(dir.path(), &cfg, &["check"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(
            r#"it sends public.acct only columns (tenant, id, name) and rows WHERE (tenant = 1)"#
        ),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publication_without_partition_root_is_refused_for_a_partitioned_table() {
    let (pg, tansu, dir, db) = crate::support::pg_and_tansu().await;
    db.batch_execute(
        "CREATE TABLE m (id int PRIMARY KEY) PARTITION BY RANGE (id);
         CREATE TABLE m_low PARTITION OF m FOR VALUES FROM (0) TO (100);
         CREATE PUBLICATION pgcdc FOR TABLE m;",
    )
    .await
    .unwrap();
    let cfg = config(&pg, &tansu, &dir.path().join("state"), &["m"], "");
    refused_naming_the_fix(
        dir.path(),
        &cfg,
        r#"ALTER PUBLICATION "pgcdc" SET (publish_via_partition_root = true)"#,
    );
}

/// `publish_via_partition_root` turned off while streaming: PostgreSQL then
/// sends a partitioned table's changes under its partitions' names, which
/// pgcdc does not capture. That must be said (ERROR naming the fix,
/// `pgcdc_tables_uncaptured`, `/ready` 503) and a restart refused; once the
/// option is on again (while streaming, or before the next start) the table
/// is copied again, so that the changes made meanwhile reach the topic.
/// Turned off and on while pgcdc is stopped, the changes made meanwhile come
/// under the partitions' names: the table is copied again too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_root_turned_off_while_streaming_is_said_and_healed_once_it_is_on() {
    let (pg, tansu, dir, db) = crate::support::pg_and_tansu().await;
    db.batch_execute(
        "CREATE TABLE m (id int PRIMARY KEY, v text) PARTITION BY RANGE (id);
         CREATE TABLE m_low PARTITION OF m FOR VALUES FROM (0) TO (100);
         CREATE TABLE m_high PARTITION OF m FOR VALUES FROM (100) TO (200);
         INSERT INTO m VALUES (1, 'a'), (150, 'b');",
    )
    .await
    .unwrap();
    let cfg = config(&pg, &tansu, &dir.path().join("state"), &["m"], "");
    let port = crate::support::free_port();
    let cfg = pgcdc_testkit::config::with_metrics(&cfg, port);
    let probe = crate::support::Probe::on(port);
    let mut daemon = crate::support::daemon(dir.path(), &cfg, &[]);
    crate::support::wait_slot_active(&db, &mut daemon, "pgcdc").await;
    let uncaptured = |n: f64, status: u16| {
        move |m: &str, ready: u16| {
            ready == status && crate::support::sample(m, "pgcdc_tables_uncaptured", &[]) == Some(n)
        }
    };
    probe
        .until("captured", &mut daemon, uncaptured(0.0, 200))
        .await;
    let mut want: BTreeMap<i64, Value> = BTreeMap::new();
    want.insert(1, json!("a"));
    want.insert(150, json!("b"));
    let restored = [("table", "public.m"), ("cause", "partition_root_restored")];

    // Off and on again: while streaming; around a refused restart; while pgcdc is stopped.
    for (phase, n) in [("streaming", 0), ("refused", 1), ("stopped", 2)] {
        if phase == "stopped" {
            assert_eq!(daemon.terminate(EXIT).unwrap().code(), Some(0));
        }
        db.batch_execute(&format!(
            "ALTER PUBLICATION pgcdc SET (publish_via_partition_root = false);
             INSERT INTO m VALUES ({0}, 'while off'), ({1}, 'while off');
             UPDATE m SET v = 'changed while off {0}' WHERE id = 1;",
            2 + n,
            160 + n
        ))
        .await
        .unwrap();
        want.insert(2 + n, json!("while off"));
        want.insert(160 + n, json!("while off"));
        want.insert(1, json!(format!("changed while off {}", 2 + n)));
        if phase != "stopped" {
            probe
                .until("uncaptured", &mut daemon, uncaptured(1.0, 503))
                .await;
            let log = daemon.log_text();
            assert!(
                log.contains("under its partitions' names (publish_via_partition_root is off)")
                    && log.contains(
                        r#"ALTER PUBLICATION "pgcdc" SET (publish_via_partition_root = true)"#
                    ),
                "{}",
                daemon.log_tail()
            );
        }
        if phase == "refused" {
            assert_eq!(daemon.terminate(EXIT).unwrap().code(), Some(0));
            daemon.spawn().unwrap();
            exits_not_ready(&mut daemon);
        }
        db.batch_execute("ALTER PUBLICATION pgcdc SET (publish_via_partition_root = true)")
            .await
            .unwrap();
        if phase != "streaming" {
            daemon.spawn().unwrap();
        }
        probe
            .until("captured again", &mut daemon, uncaptured(0.0, 200))
            .await;
        let records = crate::support::read_until(&tansu, TOPIC, READ, |rs| fold(rs) == want);
        let truncates = records.iter().filter(|r| r.op() == "t").count();
        assert!(
            truncates > n as usize,
            "{phase}: copied again after a truncate"
        );
        // Counted by the process that copied it (the first, or the one started after).
        let text = probe.metrics().await;
        let resets = crate::support::sample(&text, "pgcdc_table_resets_total", &restored);
        assert!(resets >= Some(1.0), "{phase}: {text}");
    }
}

/// The topic folded into `v` by `id`: the last image of each key, deletes
/// remove it, a truncate removes every row before it.
fn fold(records: &[Record]) -> BTreeMap<i64, Value> {
    let mut rows = BTreeMap::new();
    for r in records.iter().filter(|r| r.value.is_some()) {
        let id = r.key.as_ref().and_then(|k| k["id"].as_i64()).unwrap_or(-1);
        match r.op() {
            "t" => rows.clear(),
            "d" => {
                rows.remove(&id);
            }
            _ => {
                rows.insert(id, r.after()["v"].clone());
            }
        }
    }
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_whose_changes_are_sent_as_another_tables_is_refused() {
    let (pg, tansu, dir, db) = crate::support::pg_and_tansu().await;
    db.batch_execute(
        "CREATE TABLE m (id int PRIMARY KEY) PARTITION BY RANGE (id);
         CREATE TABLE m_low PARTITION OF m FOR VALUES FROM (0) TO (100);",
    )
    .await
    .unwrap();
    let state = dir.path().join("state");
    // Both the root and its partition configured: the partition's changes
    // are sent as the root's.
    let cfg = config(&pg, &tansu, &state, &["m", "m_low"], "");
    refused_naming_the_fix(dir.path(), &cfg, "Remove public.m_low from postgres.tables");
    let out = one_shot(dir.path(), &cfg, &["check"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(
            "FAIL  publication: postgresql is not ready: public.m_low is a partition of public.m,"
        ),
        "{text}"
    );
    let publications: i64 = db
        .query_one("SELECT count(*) FROM pg_publication", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(publications, 0, "refused before creating the publication");
    // The partition configured, its root in the publication.
    db.batch_execute(
        "CREATE PUBLICATION pgcdc FOR TABLE m WITH (publish_via_partition_root = true)",
    )
    .await
    .unwrap();
    let cfg = config(&pg, &tansu, &state, &["m_low"], "");
    refused_naming_the_fix(
        dir.path(),
        &cfg,
        "Configure public.m instead of public.m_low, or take public.m out of the publication",
    );
    // The partition alone in the publication is captured as itself.
    db.batch_execute("ALTER PUBLICATION pgcdc SET TABLE m_low; INSERT INTO m VALUES (7)")
        .await
        .unwrap();
    let mut daemon = crate::support::daemon(dir.path(), &cfg, &[]);
    crate::support::wait_slot_active(&db, &mut daemon, "pgcdc").await;
    db.batch_execute("INSERT INTO m VALUES (8)").await.unwrap();
    let records = crate::support::read_until(&tansu, "cdc-events", EXIT, |r| r.len() >= 2);
    let seen: Vec<_> = records
        .iter()
        .map(|r| (r.op(), r.header(header::TABLE), r.after()["id"].as_i64()))
        .collect();
    assert_eq!(
        seen,
        [
            ("r", "public.m_low", Some(7)),
            ("c", "public.m_low", Some(8))
        ]
    );
    let status = daemon.terminate(EXIT).unwrap();
    assert_eq!(status.code(), Some(0), "{}", daemon.log_tail());
}

/// The started daemon must exit 3.
fn exits_not_ready(daemon: &mut Daemon) {
    let status = daemon.wait_exit(EXIT).unwrap();
    assert_eq!(
        status.code(),
        Some(SOURCE_NOT_READY),
        "{}",
        daemon.log_tail()
    );
}

/// Start the daemon with `cfg`: it must exit 3 with `fix` in its log.
fn refused_naming_the_fix(dir: &std::path::Path, cfg: &str, fix: &str) {
    let mut daemon = crate::support::daemon(dir, cfg, &[]);
    exits_not_ready(&mut daemon);
    assert!(daemon.log_text().contains(fix), "{}", daemon.log_tail());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publication_with_an_extra_table_emits_only_configured_tables() {
    let (pg, tansu, dir, db) = crate::support::pg_and_tansu().await;
    db.batch_execute(
        "CREATE TABLE wanted (id int PRIMARY KEY);
         CREATE TABLE extra (id int PRIMARY KEY);
         CREATE PUBLICATION pgcdc FOR TABLE wanted, extra WITH (publish_via_partition_root = true);",
    )
    .await
    .unwrap();
    let cfg = config(&pg, &tansu, &dir.path().join("state"), &["wanted"], "");
    let check = one_shot(dir.path(), &cfg, &["check"]);
    let printed = String::from_utf8_lossy(&check.stdout);
    assert!(
        printed.contains("WARN  publication") && printed.contains("public.extra"),
        "check: {printed}"
    );
    let mut daemon = crate::support::daemon(dir.path(), &cfg, &[]);
    crate::support::wait_slot_active(&db, &mut daemon, "pgcdc").await;
    db.batch_execute(
        "INSERT INTO extra VALUES (1); INSERT INTO wanted VALUES (1);
         INSERT INTO extra VALUES (2); TRUNCATE extra; INSERT INTO wanted VALUES (2);",
    )
    .await
    .unwrap();
    let records = read_until_key(&tansu, "public.wanted", json!({"id": 2}));
    let want = [
        change("c", "public.wanted", json!({"id": 1})),
        change("c", "public.wanted", json!({"id": 2})),
    ];
    assert_eq!(changes(&records), want);
    let warned = daemon
        .log_text()
        .matches("the publication has a table that postgres.tables does not")
        .count();
    assert_eq!(warned, 1, "{}", daemon.log_tail());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_signals_for_keyless_or_unconfigured_tables_change_nothing() {
    let (pg, tansu, dir, db) = crate::support::pg_and_tansu().await;
    db.batch_execute(
        "CREATE TABLE keyed (id int PRIMARY KEY);
         CREATE TABLE bag (v text);
         ALTER TABLE bag REPLICA IDENTITY FULL;
         CREATE TABLE other (id int PRIMARY KEY);",
    )
    .await
    .unwrap();
    let cfg = config(
        &pg,
        &tansu,
        &dir.path().join("state"),
        &["keyed", "bag"],
        "",
    );
    let mut daemon = crate::support::daemon(dir.path(), &cfg, &[]);
    crate::support::wait_slot_active(&db, &mut daemon, "pgcdc").await;
    let refused = one_shot(dir.path(), &cfg, &["snapshot", "--table", "bag"]);
    let said = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(SOURCE_NOT_READY), "{said}");
    assert!(said.contains("no unique key"), "{said}");
    // Genuine (signed) signals: the daemon itself refuses them.
    let key = MessageKey::load(&dir.path().join("state/message.key")).unwrap();
    for table in ["bag", "other"] {
        let signal = Signal::signed(&key, "pgcdc", "public", table, false);
        emit(
            &db,
            message::SIGNAL,
            &serde_json::to_string(&signal).unwrap(),
        )
        .await;
    }
    db.batch_execute("INSERT INTO keyed VALUES (1)")
        .await
        .unwrap();
    read_until_key(&tansu, "public.keyed", json!({"id": 1}));
    let log = daemon.log_text();
    for ignored in [
        "ignoring a backfill signal for a table without a unique key",
        "ignoring a signal for a table that is not configured",
    ] {
        assert_eq!(log.matches(ignored).count(), 1, "{}", daemon.log_tail());
    }
    // Nothing was persisted: a restart streams on instead of finding a copy it cannot finish.
    daemon.terminate(EXIT).unwrap();
    daemon.spawn().unwrap();
    crate::support::wait_slot_active(&db, &mut daemon, "pgcdc").await;
    db.batch_execute("INSERT INTO keyed VALUES (2)")
        .await
        .unwrap();
    read_until_key(&tansu, "public.keyed", json!({"id": 2}));
    let status = one_shot(dir.path(), &cfg, &["status"]);
    let printed = String::from_utf8_lossy(&status.stdout);
    assert!(!printed.contains("copying"), "status: {printed}");
    assert!(daemon.is_running(), "{}", daemon.log_tail());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_signals_and_watermarks_from_another_role_change_nothing() {
    let (pg, tansu, dir, db) = crate::support::pg_and_tansu().await;
    db.batch_execute(
        "CREATE TABLE keyed (id int PRIMARY KEY);
         INSERT INTO keyed VALUES (1);
         CREATE ROLE intruder LOGIN;
         GRANT INSERT ON keyed TO intruder;",
    )
    .await
    .unwrap();
    let state = dir.path().join("state");
    let cfg = config(&pg, &tansu, &state, &["keyed"], "");
    let mut daemon = crate::support::daemon(dir.path(), &cfg, &[]);
    crate::support::wait_slot_active(&db, &mut daemon, "pgcdc").await;
    read_until_key(&tansu, "public.keyed", json!({"id": 1}));
    let intruder = pgcdc_testkit::pg::connect(
        &pg.url().replace("user=postgres", "user=intruder"),
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    // What a forger can write: unsigned, signed with another key, a genuine
    // field set with a guessed MAC; a reset would truncate the table's mirror.
    let stranger = MessageKey::random().unwrap();
    let forged = [
        (
            message::SIGNAL,
            json!({"slot": "pgcdc", "schema": "public", "table": "keyed", "reset": true})
                .to_string(),
        ),
        (
            message::SIGNAL,
            serde_json::to_string(&Signal::signed(&stranger, "pgcdc", "public", "keyed", true))
                .unwrap(),
        ),
        (
            message::WATERMARK,
            serde_json::to_string(&Mark::signed(&stranger, "pgcdc", 1, true)).unwrap(),
        ),
        (
            message::WATERMARK,
            json!({"slot": "pgcdc", "id": 1, "high": false, "mac": "00"}).to_string(),
        ),
    ];
    for (prefix, content) in &forged {
        emit(&intruder, prefix, content).await;
    }
    intruder
        .batch_execute("INSERT INTO keyed VALUES (2)")
        .await
        .unwrap();
    let records = read_until_key(&tansu, "public.keyed", json!({"id": 2}));
    let ops: Vec<_> = changes(&records).into_iter().map(|(op, ..)| op).collect();
    assert_eq!(ops, ["r", "c"], "a forged message produced events");
    let warned = daemon
        .log_text()
        .matches("ignoring a message whose signature does not match")
        .count();
    assert_eq!(warned, forged.len(), "{}", daemon.log_tail());
    let status = one_shot(dir.path(), &cfg, &["status"]);
    let printed = String::from_utf8_lossy(&status.stdout);
    assert!(!printed.contains("copying"), "status: {printed}");
}

/// A composite primary key whose index lists its columns in another order
/// than the table does: a row's snapshot record and its changes carry the
/// same key bytes, so they share a partition (per-row order) and a key
/// (compaction).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_composite_key_has_the_same_bytes_in_snapshot_and_stream() {
    let (pg, tansu, dir, db) = crate::support::pg_and_tansu().await;
    db.batch_execute(
        "CREATE TABLE lines (region text, code text, v text, PRIMARY KEY (code, region));
         INSERT INTO lines SELECT 'r' || g, 'c' || g, 'x' FROM generate_series(1, 20) g;",
    )
    .await
    .unwrap();
    let cfg = config(&pg, &tansu, &dir.path().join("state"), &["lines"], "");
    let mut daemon = crate::support::daemon(dir.path(), &cfg, &[]);
    crate::support::wait_slot_active(&db, &mut daemon, "pgcdc").await;
    db.batch_execute("UPDATE lines SET v = 'y'; INSERT INTO lines VALUES ('end', 'end', 'z')")
        .await
        .unwrap();
    let end = json!({"code": "end", "region": "end"});
    let records = read_until_key(&tansu, "public.lines", end);
    let mut by_row: HashMap<String, Vec<(String, Vec<u8>, i32)>> = HashMap::new();
    for r in records.iter().filter(|r| r.value.is_some()) {
        let row = r.key.as_ref().map(Value::to_string).unwrap_or_default();
        let bytes = r.key_bytes.clone().unwrap_or_default();
        by_row
            .entry(row)
            .or_default()
            .push((r.op().to_owned(), bytes, r.partition));
    }
    assert_eq!(by_row.len(), 21);
    let changed = by_row.values().filter(|s| s.len() > 1).count();
    assert_eq!(changed, 20, "every copied row also has its update");
    for (row, seen) in by_row.iter().filter(|(_, s)| s.len() > 1) {
        let ops: Vec<&str> = seen.iter().map(|(op, _, _)| op.as_str()).collect();
        assert_eq!(ops, ["r", "u"], "{row}");
        let texts: Vec<String> = seen
            .iter()
            .map(|(_, b, _)| String::from_utf8_lossy(b).into_owned())
            .collect();
        assert_eq!(texts[0], texts[1], "{row}: key bytes differ");
        assert_eq!(seen[0].2, seen[1].2, "{row}: partitions differ");
    }
}
