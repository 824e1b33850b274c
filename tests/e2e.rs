//! End-to-end: the pgcdc daemon against a real PostgreSQL cluster and a real
//! tansu broker, every event checked on Kafka.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use pgcdc_actors::wire::header;
use serde_json::{json, Value};

use crate::support::{config, Daemon, PgCluster, Record, Tansu};

const TOPIC: &str = "cdc-events";

struct Stack {
    pg: PgCluster,
    tansu: Tansu,
    dir: tempfile::TempDir,
}

impl Stack {
    fn start() -> Stack {
        Stack {
            pg: PgCluster::start().unwrap(),
            tansu: Tansu::start().unwrap(),
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn daemon(&self, tables: &[&str], extra_kafka: &str) -> Daemon {
        let state = self.dir.path().join("state");
        crate::support::daemon(
            self.dir.path(),
            &config(&self.pg, &self.tansu, &state, tables, extra_kafka),
            &[],
        )
    }
}

/// Wait until the daemon holds its slot and its initial snapshot is over.
async fn wait_streaming(client: &tokio_postgres::Client, daemon: &mut Daemon) {
    crate::support::wait_slot_active(client, daemon, "pgcdc").await;
    daemon
        .wait_streaming(Duration::from_secs(60))
        .await
        .unwrap();
}

/// Start the daemon again: it must refuse the slot and exit with code 5.
fn restart_is_refused_with_code_5(daemon: &mut Daemon) {
    daemon.spawn().unwrap();
    let status = daemon.wait_exit(Duration::from_secs(60)).unwrap();
    assert_eq!(status.code(), Some(5), "{}", daemon.log_text());
}

fn ops(records: &[Record]) -> Vec<(String, Option<Value>)> {
    records
        .iter()
        .map(|r| (r.op().to_string(), r.key.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_changes_arrive_in_commit_order_field_by_field() {
    let s = Stack::start();
    let db = s.pg.client().await.unwrap();
    db.batch_execute(
        "CREATE TABLE users (id int PRIMARY KEY, name text NOT NULL, email text);
         CREATE TABLE orders (id bigint PRIMARY KEY, user_id int, total numeric(12,2));",
    )
    .await
    .unwrap();
    let mut daemon = s.daemon(&["public.users", "orders"], "");
    wait_streaming(&db, &mut daemon).await;

    db.batch_execute("INSERT INTO users VALUES (1, 'ann', 'ann@example.com')")
        .await
        .unwrap();
    db.batch_execute("UPDATE users SET name = 'anne' WHERE id = 1")
        .await
        .unwrap();
    db.batch_execute("UPDATE users SET id = 2 WHERE id = 1")
        .await
        .unwrap();
    db.batch_execute(
        "BEGIN; INSERT INTO users VALUES (3, 'bob', NULL); INSERT INTO orders VALUES (10, 3, 99.95); \
         UPDATE orders SET total = 100.00 WHERE id = 10; COMMIT;",
    )
    .await
    .unwrap();
    db.batch_execute("BEGIN; INSERT INTO users VALUES (4, 'rolled back', NULL); ROLLBACK;")
        .await
        .unwrap();
    db.batch_execute("DELETE FROM users WHERE id = 3")
        .await
        .unwrap();
    db.batch_execute("TRUNCATE orders").await.unwrap();

    let records = crate::support::read_until(&s.tansu, TOPIC, Duration::from_secs(60), |r| {
        r.iter().any(|r| r.op() == "t")
    });
    let k = |id: i64| Some(json!({ "id": id }));
    let expected = vec![
        ("c".to_string(), k(1)),
        ("u".into(), k(1)),
        ("d".into(), k(1)), // primary-key change: delete of the old key …
        ("".into(), k(1)),  // … its tombstone …
        ("c".into(), k(2)), // … and a create of the new one
        ("c".into(), k(3)),
        ("c".into(), k(10)),
        ("u".into(), k(10)),
        ("d".into(), k(3)),
        ("".into(), k(3)),
        ("t".into(), None),
    ];
    assert_eq!(ops(&records), expected);

    let first = records[0].value.as_ref().unwrap();
    assert_eq!(
        first["after"],
        json!({"id": 1, "name": "ann", "email": "ann@example.com"})
    );
    assert_eq!(first["before"], Value::Null);
    let src = &first["source"];
    assert_eq!(
        (src["connector"].as_str(), src["db"].as_str()),
        (Some("pgcdc"), Some("postgres"))
    );
    assert_eq!(
        (src["schema"].as_str(), src["table"].as_str()),
        (Some("public"), Some("users"))
    );
    assert_eq!(src["snapshot"], json!("false"));
    assert!(src["txId"].as_u64().unwrap() > 0 && src["lsn"].as_u64().unwrap() > 0);
    assert_eq!(records[0].header(header::TABLE), "public.users");
    assert_eq!(records[0].header(header::OP), "c");
    assert_eq!(records[1].after()["name"], json!("anne"));
    assert_eq!(
        records[2].value.as_ref().unwrap()["before"],
        json!({"id": 1})
    );
    assert_eq!(records[7].after()["total"], json!("100.00"));

    // One transaction: one commit LSN, increasing positions.
    let tx: Vec<&Record> = records[5..8].iter().collect();
    let commit: Vec<&str> = tx.iter().map(|r| r.header(header::COMMIT_LSN)).collect();
    assert!(commit.windows(2).all(|w| w[0] == w[1]), "{commit:?}");
    let seqs: Vec<u64> = tx
        .iter()
        .map(|r| r.value.as_ref().unwrap()["source"]["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [0, 1, 2]);
    // Commit LSNs never go backwards across transactions.
    let lsns: Vec<u64> = records
        .iter()
        .filter_map(|r| r.value.as_ref())
        .map(|v| v["source"]["commit_lsn"].as_u64().unwrap())
        .collect();
    assert!(lsns.windows(2).all(|w| w[0] <= w[1]), "{lsns:?}");

    let status = daemon.terminate(Duration::from_secs(30)).unwrap();
    assert_eq!(status.code(), Some(0), "log:\n{}", daemon.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_common_type_becomes_faithful_json() {
    let s = Stack::start();
    let db = s.pg.client().await.unwrap();
    db.batch_execute(
        "CREATE TYPE mood AS ENUM ('sad', 'happy');
         CREATE TABLE types (
            id int PRIMARY KEY, i2 smallint, i8 bigint, n numeric, nn numeric, f4 real, f8 double precision,
            fnan double precision, finf double precision, b boolean, t text, vc varchar(10), c char(3),
            ts timestamp, tstz timestamptz, d date, tm time, iv interval, j json, jb jsonb, by bytea,
            u uuid, ai int[], at text[], a2 int[][], m mood, nul text, big text);",
    )
    .await
    .unwrap();
    let mut daemon = s.daemon(&["types"], "");
    wait_streaming(&db, &mut daemon).await;
    db.batch_execute(
        "INSERT INTO types VALUES (1, -32768, 9223372036854775807, 12345678901234567890.123456789, 'NaN', 1.5, \
         0.1, 'NaN', '-Infinity', true, 'héllo \"q\"', 'vc', 'ab', '2024-01-02 03:04:05.678', \
         '2024-01-02 03:04:05.5+02', '2024-02-29', '13:14:15', '1 day 2 hours', '{\"a\": [1, 2]}', \
         '{\"b\": {\"c\": null}}', '\\x00ff10', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{1,NULL,3}', \
         '{\"x y\",\"NULL\",NULL,\"q\\\"\"}', '{{1,2},{3,4}}', 'happy', NULL, (SELECT string_agg(md5(g::text), '') FROM generate_series(1, 3000) g))",
    )
    .await
    .unwrap();
    db.batch_execute("UPDATE types SET i2 = 7 WHERE id = 1")
        .await
        .unwrap();

    let records =
        crate::support::read_until(&s.tansu, TOPIC, Duration::from_secs(60), |r| r.len() >= 2);
    let a = records[0].after();
    let expect = [
        ("id", json!(1)),
        ("i2", json!(-32768)),
        ("i8", json!(9223372036854775807i64)),
        ("n", json!("12345678901234567890.123456789")),
        ("nn", json!("NaN")),
        ("f4", json!(1.5)),
        ("f8", json!(0.1)),
        ("fnan", json!("NaN")),
        ("finf", json!("-Infinity")),
        ("b", json!(true)),
        ("t", json!("héllo \"q\"")),
        ("vc", json!("vc")),
        ("c", json!("ab ")),
        ("ts", json!("2024-01-02T03:04:05.678")),
        ("tstz", json!("2024-01-02T01:04:05.5Z")),
        ("d", json!("2024-02-29")),
        ("tm", json!("13:14:15")),
        ("iv", json!("P1DT2H")),
        ("j", json!({"a": [1, 2]})),
        ("jb", json!({"b": {"c": null}})),
        ("by", json!("AP8Q")),
        ("u", json!("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")),
        ("ai", json!([1, null, 3])),
        ("at", json!(["x y", "NULL", null, "q\""])),
        ("a2", json!([[1, 2], [3, 4]])),
        ("m", json!("happy")),
        ("nul", Value::Null),
    ];
    for (col, want) in expect {
        assert_eq!(a[col], want, "column {col}");
    }
    assert_eq!(a["big"].as_str().map(str::len), Some(96_000));
    // The update did not touch the TOASTed column: it is absent and listed, never a fake value.
    let upd = records[1].value.as_ref().unwrap();
    assert_eq!(upd["after"]["i2"], json!(7));
    assert!(
        upd["after"].get("big").is_none(),
        "unchanged toast leaked a value"
    );
    assert_eq!(upd["unchanged_toast"], json!(["big"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_without_key_are_refused_unless_replica_identity_full() {
    let s = Stack::start();
    let db = s.pg.client().await.unwrap();
    db.batch_execute(
        "CREATE TABLE nokey (a int, b text); CREATE TABLE full_id (a int, b text); \
                      ALTER TABLE full_id REPLICA IDENTITY FULL;",
    )
    .await
    .unwrap();
    let mut daemon = s.daemon(&["nokey"], "");
    let status = daemon.wait_exit(Duration::from_secs(60)).unwrap();
    assert_eq!(status.code(), Some(3), "log:\n{}", daemon.log_text());
    assert!(
        daemon.log_text().contains("REPLICA IDENTITY FULL"),
        "{}",
        daemon.log_text()
    );

    let state = s.dir.path().join("state2");
    let cfg = config(&s.pg, &s.tansu, &state, &["full_id"], "");
    let mut daemon = crate::support::daemon(s.dir.path(), &cfg, &[]);
    wait_streaming(&db, &mut daemon).await;
    db.batch_execute("INSERT INTO full_id VALUES (1, 'x'); DELETE FROM full_id;")
        .await
        .unwrap();
    let records =
        crate::support::read_until(&s.tansu, TOPIC, Duration::from_secs(60), |r| r.len() >= 3);
    assert_eq!(records[0].key, Some(json!({"a": 1, "b": "x"})));
    assert_eq!(
        records[1].value.as_ref().unwrap()["before"],
        json!({"a": 1, "b": "x"})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_dropped_or_recreated_behind_our_back_is_refused() {
    let s = Stack::start();
    let db = s.pg.client().await.unwrap();
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let mut daemon = s.daemon(&["t"], "");
    wait_streaming(&db, &mut daemon).await;
    db.batch_execute("INSERT INTO t VALUES (1)").await.unwrap();
    crate::support::read_until(&s.tansu, TOPIC, Duration::from_secs(60), |r| !r.is_empty());
    assert_eq!(
        daemon.terminate(Duration::from_secs(30)).unwrap().code(),
        Some(0),
        "{}",
        daemon.log_text()
    );

    // Dropped: a checkpoint exists but the slot is gone.
    db.batch_execute("SELECT pg_drop_replication_slot('pgcdc')")
        .await
        .unwrap();
    restart_is_refused_with_code_5(&mut daemon);
    assert!(daemon.log_text().contains("missing"));

    // Recreated: a slot with the same name whose position is past our checkpoint.
    db.batch_execute("INSERT INTO t VALUES (2)").await.unwrap();
    db.batch_execute("SELECT pg_create_logical_replication_slot('pgcdc', 'pgoutput')")
        .await
        .unwrap();
    restart_is_refused_with_code_5(&mut daemon);
    assert!(daemon.log_text().contains("beyond our checkpoint"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_confirms_everything() {
    let s = Stack::start();
    let db = s.pg.client().await.unwrap();
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let mut daemon = s.daemon(&["t"], "");
    wait_streaming(&db, &mut daemon).await;
    db.batch_execute("INSERT INTO t SELECT g, 'v' FROM generate_series(1, 5000) g")
        .await
        .unwrap();
    let end: i64 = db
        .query_one("SELECT (pg_current_wal_lsn() - '0/0')::bigint", &[])
        .await
        .unwrap()
        .get(0);
    crate::support::read_until(&s.tansu, TOPIC, Duration::from_secs(60), |r| {
        r.len() >= 5000
    });
    assert_eq!(
        daemon.terminate(Duration::from_secs(30)).unwrap().code(),
        Some(0),
        "{}",
        daemon.log_text()
    );
    // After a clean stop the slot is confirmed up to the last transaction.
    let confirmed = s.pg.confirmed_flush(&db, "pgcdc").await.unwrap().unwrap();
    assert!(
        confirmed >= end as u64 - 200,
        "confirmed {confirmed:x} far behind {end:x}"
    );

    // A restart resends nothing already confirmed.
    daemon.spawn().unwrap();
    wait_streaming(&db, &mut daemon).await;
    db.batch_execute("INSERT INTO t VALUES (6000, 'after')")
        .await
        .unwrap();
    let records = crate::support::read_until(&s.tansu, TOPIC, Duration::from_secs(60), |r| {
        r.iter().any(|r| r.key == Some(json!({"id": 6000})))
    });
    assert_eq!(
        records.len(),
        5001,
        "records were re-sent after a clean restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_small_transactions_shares_batches_and_arrives_once_in_order() {
    let s = Stack::start();
    let db = s.pg.client().await.unwrap();
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let port = crate::support::free_port();
    let cfg = pgcdc_testkit::config::with_metrics(
        &config(&s.pg, &s.tansu, &s.dir.path().join("state"), &["t"], ""),
        port,
    );
    let mut daemon = crate::support::daemon(s.dir.path(), &cfg, &[]);
    // Stopped before its initial snapshot is over, pgcdc would copy the table
    // again on the next start, and the rows below would arrive twice.
    wait_streaming(&db, &mut daemon).await;
    daemon.terminate(Duration::from_secs(30)).unwrap();
    // 2,000 transactions of one row each, in the WAL before pgcdc reads them.
    const TXS: i64 = 2000;
    db.batch_execute(&format!(
        "DO $$ BEGIN FOR i IN 1..{TXS} LOOP INSERT INTO t VALUES (i, 'v'); COMMIT; END LOOP; END $$"
    ))
    .await
    .unwrap();
    daemon.spawn().unwrap();
    let records = crate::support::read_until(&s.tansu, TOPIC, Duration::from_secs(120), |r| {
        r.len() >= TXS as usize
    });
    let mut ids: Vec<i64> = records
        .iter()
        .filter_map(|r| r.key.as_ref()?["id"].as_i64())
        .collect();
    ids.sort_unstable();
    assert_eq!(
        ids,
        (1..=TXS).collect::<Vec<_>>(),
        "each row once: {}",
        daemon.log_text()
    );
    for p in records
        .iter()
        .map(|r| r.partition)
        .collect::<std::collections::BTreeSet<_>>()
    {
        let lsns: Vec<pgcdc_actors::lsn::Lsn> = records
            .iter()
            .filter(|r| r.partition == p)
            .map(|r| r.headers[header::COMMIT_LSN].parse().unwrap())
            .collect();
        assert!(
            lsns.windows(2).all(|w| w[0] < w[1]),
            "commit order on partition {p}"
        );
    }
    // Every batch acknowledged is timed from its oldest commit, and all of
    // these committed before pgcdc started.
    let probe = crate::support::Probe::on(port);
    let text = pgcdc_testkit::wait::poll(
        "every batch timed in pgcdc_kafka_ack_seconds",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async {
            let text = probe.metrics().await;
            let batches = crate::support::sample(&text, "pgcdc_batches_total", &[]);
            let timed = crate::support::histogram_count(&text, "pgcdc_kafka_ack_seconds", "");
            pgcdc_testkit::wait::Poll::when(batches == Some(timed), text, || {
                format!("{timed} of {batches:?} batches timed")
            })
        },
    )
    .await
    .unwrap();
    let batches = crate::support::sample(&text, "pgcdc_batches_total", &[]).unwrap();
    assert!(
        batches < (TXS / 10) as f64,
        "{batches} batches for {TXS} transactions already received: they should share batches"
    );
    let buckets = pgcdc_testkit::bench::histogram_buckets(&text, "pgcdc_kafka_ack_seconds");
    let bucket = |le: f64| buckets.iter().find(|b| b.0 == le).map(|b| b.1);
    assert_eq!(
        bucket(0.005),
        Some(0),
        "no batch of the backlog can be that fresh:\n{text}"
    );
    assert_eq!(
        bucket(300.0),
        Some(batches as u64),
        "every batch within 300 s:\n{text}"
    );
}

#[test]
fn bad_configuration_fails_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[postgres]\ntables = [\"t\"]\nprot = 5432\n[kafka]\ntopic_partitions = 0\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgcdc"))
        .args(["--config", path.to_str().unwrap(), "run"])
        .env("PGCDC_POSTGRES__PASSWORD", "hunter2")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("prot"), "{err}");
    assert!(!err.contains("hunter2"));

    std::fs::write(
        &path,
        "[postgres]\ntables = []\n[kafka]\ntopic_partitions = 0\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgcdc"))
        .args(["--config", path.to_str().unwrap(), "check"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("postgres.tables") && err.contains("kafka.topic_partitions"),
        "{err}"
    );

    // A property librdkafka does not know: the first client pgcdc makes
    // names it (before any broker is asked).
    std::fs::write(
        &path,
        "[postgres]\ntables = [\"t\"]\n[kafka]\nbrokers = \"127.0.0.1:1\"\n\
         [kafka.properties]\n\"no.such.property\" = \"1\"\n",
    )
    .unwrap();
    let state = dir.path().join("state");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgcdc"))
        .args(["--config", path.to_str().unwrap(), "run", "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("kafka.properties") && err.contains("no.such.property"),
        "{err}"
    );
}

/// `pgcdc check` with configuration `cfg` (written into the stack's directory).
fn pgcdc_check(s: &Stack, cfg: &str) -> std::process::Output {
    let path = s.dir.path().join("check.toml");
    std::fs::write(&path, cfg).unwrap();
    crate::support::pgcdc(&path, &["check"])
}

/// `pgcdc check` warns about tables the role may not read, with the GRANT
/// that fixes it, and about operations the publication does not publish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_warns_about_tables_the_role_may_not_read_and_operations_not_published() {
    let s = Stack::start();
    let db = s.pg.client().await.unwrap();
    db.batch_execute(
        "CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY);
         CREATE ROLE reader LOGIN REPLICATION; GRANT SELECT ON a TO reader;
         CREATE PUBLICATION pgcdc FOR TABLE a, b WITH (publish = 'insert, update');",
    )
    .await
    .unwrap();
    let state = s.dir.path().join("state");
    let check = || {
        let cfg = config(&s.pg, &s.tansu, &state, &["a", "b"], "")
            .replace("user = \"postgres\"", "user = \"reader\"");
        pgcdc_check(&s, &cfg)
    };
    let out = check();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("WARN  privileges: \"reader\" may not read \"public\".\"b\":")
            && text.contains("GRANT SELECT ON \"public\".\"b\" TO \"reader\""),
        "{text}"
    );
    assert!(
        text.contains("WARN  publication: \"pgcdc\" does not publish delete, truncate"),
        "{text}"
    );
    db.batch_execute(
        "GRANT SELECT ON b TO reader;
         ALTER PUBLICATION pgcdc SET (publish = 'insert, update, delete, truncate');",
    )
    .await
    .unwrap();
    let out = check();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("ok    privileges") && text.contains("ok    publication"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_what_is_wrong_and_per_table_topics_route_by_table() {
    let s = Stack::start();
    let db = s.pg.client().await.unwrap();
    db.batch_execute("CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY); CREATE TABLE nokey (x int);")
        .await
        .unwrap();
    let state = s.dir.path().join("state");
    let check = |tables: &[&str]| {
        let cfg = config(
            &s.pg,
            &s.tansu,
            &state,
            tables,
            "topic_mode = \"per_table\"",
        );
        pgcdc_check(&s, &cfg)
    };
    let bad = check(&["a", "nokey"]);
    let out = String::from_utf8_lossy(&bad.stdout);
    assert_eq!(bad.status.code(), Some(3), "{out}");
    assert!(
        out.contains("FAIL  postgresql")
            && out.contains("no primary key")
            && out.contains("ok    kafka"),
        "{out}"
    );
    let good = check(&["a", "b"]);
    let out = String::from_utf8_lossy(&good.stdout);
    assert_eq!(good.status.code(), Some(0), "{out}");
    assert!(
        out.contains("ok    postgresql") && out.contains("start: Snapshot"),
        "{out}"
    );

    let cfg = config(
        &s.pg,
        &s.tansu,
        &state,
        &["a", "b"],
        "topic_mode = \"per_table\"\ntombstones = false",
    );
    let mut daemon = crate::support::daemon(s.dir.path(), &cfg, &[]);
    wait_streaming(&db, &mut daemon).await;
    db.batch_execute("INSERT INTO a VALUES (1); INSERT INTO b VALUES (2); DELETE FROM b; INSERT INTO b VALUES (3);").await.unwrap();
    let a = crate::support::read_until(&s.tansu, "pgcdc.public.a", Duration::from_secs(60), |r| {
        !r.is_empty()
    });
    assert_eq!(ops(&a), [("c".to_string(), Some(json!({"id": 1})))]);
    let b = crate::support::read_until(&s.tansu, "pgcdc.public.b", Duration::from_secs(60), |r| {
        r.len() >= 3
    });
    // Tombstones disabled: no null record between the delete and the next insert.
    let (c, d) = ("c".to_string(), "d".to_string());
    assert_eq!(
        ops(&b),
        [
            (c.clone(), Some(json!({"id": 2}))),
            (d, Some(json!({"id": 2}))),
            (c, Some(json!({"id": 3})))
        ]
    );
}
