//! Very large values: 64 MiB values stream intact while the daemon's peak
//! memory stays within a bound a regression to "a batch of copies" would
//! break; a backlog of wide rows read while Kafka is frozen is read only a
//! few rows ahead; the initial snapshot and a backfill of wide rows hold
//! chunks bounded by bytes; a record above the producer's
//! `message.max.bytes` stops pgcdc with exit 4 and an error naming the
//! record and the setting (again on every restart, never skipped), or with
//! `kafka.oversized = "dead_letter"` is described on the dead-letter topic
//! while streaming goes on. A record the broker refuses as too large
//! (librdkafka's mock cluster answering "message too large") is named the
//! same way.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::Duration;

use pgcdc_actors::lsn::Lsn;
use pgcdc_actors::wire::header;
use pgcdc_testkit::kafka::consumer;
use rdkafka::consumer::Consumer;
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{json, Value};

use crate::support::{
    config, daemon, mock_broker, pg_and_tansu, read_until, wait, wait_slot_active, Broker, Daemon,
    PgCluster, Tansu,
};

const TOPIC: &str = "cdc-events";
/// Where `kafka.oversized = "dead_letter"` sends its descriptions (the default
/// `elasticsearch.dead_letter_topic`).
const DEAD_LETTERS: &str = "pgcdc-dead-letters";
/// The table every test writes.
const CREATE: &str = "CREATE TABLE docs (id int PRIMARY KEY, body text)";
/// Repetitions of a 32-character md5 text in one large value: 64 MiB.
const REPEAT: usize = 2 << 20;
/// Large values streamed, one per transaction.
const LARGE_VALUES: i32 = 10;
/// The daemon's peak resident memory may not exceed this while streaming
/// ten 64 MiB values (measured: 245-280 MiB): the value being encoded and
/// its record, one record in librdkafka (a value above half of what
/// librdkafka may hold waits until it holds none), and the rest of
/// a transaction read ahead. Holding the six values of one transaction as
/// one batch, as pgcdc did before batches were bounded by bytes, peaked at
/// about 1,000 MiB.
const PEAK_RSS_MAX_MIB: u64 = 512;
/// How long the large values may take to reach the topic.
const STREAM: Duration = Duration::from_secs(300);
/// How long the daemon may take to stop on an oversized record.
const EXIT: Duration = Duration::from_secs(60);
/// Kafka's error code for a record larger than the broker accepts.
const MESSAGE_TOO_LARGE: i32 = 10;
/// A value above librdkafka's default `message.max.bytes` (1,000,000).
const OVERSIZED_CHARS: i32 = 2_000_000;

/// `[kafka.properties]` letting records of the 64 MiB values through (tansu
/// accepts them; the setting under test).
const LARGE_MESSAGES: &str = "[kafka.properties]\n\"message.max.bytes\" = \"100000000\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_of_64_mib_stream_intact_in_bounded_memory() {
    let (_pg, tansu, _dir, db, mut d) = streaming(LARGE_MESSAGES).await;

    // Four values one per transaction, then six in one transaction: without
    // a byte bound on batches those six would be one batch held whole.
    let mut units = HashMap::new();
    let insert = "INSERT INTO docs SELECT i, repeat(md5(i::text), $3) \
                  FROM generate_series($1::int, $2::int) i RETURNING id, md5(id::text)";
    for (from, to) in [(1, 1), (2, 2), (3, 3), (4, 4), (5, LARGE_VALUES)] {
        for row in db
            .query(insert, &[&from, &to, &(REPEAT as i32)])
            .await
            .unwrap()
        {
            units.insert(row.get::<_, i32>(0), row.get::<_, String>(1));
        }
    }

    let mut seen = Vec::new();
    for_each_record(
        &tansu.brokers(),
        TOPIC,
        LARGE_VALUES as usize,
        STREAM,
        &d,
        |value| {
            let after = &value["after"];
            let id = after["id"].as_i64().unwrap() as i32;
            let body = after["body"].as_str().unwrap();
            assert_eq!(body.len(), 32 * REPEAT, "length of value {id}");
            assert!(body == units[&id].repeat(REPEAT), "value {id} differs");
            seen.push(id);
        },
    );
    assert_eq!(seen, (1..=LARGE_VALUES).collect::<Vec<_>>());

    // Huge pages would make memory resident in 2 MiB steps (src/main.rs).
    let thp = d.status_field("THP_enabled");
    assert_eq!(thp.as_deref(), Some("0"), "the daemon runs without THP");
    // Freed values go back to the kernel after 100 ms (src/main.rs).
    let pid = d.pid().expect("daemon running");
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(
        environ
            .split(|b| *b == 0)
            .any(|v| v == b"MIMALLOC_PURGE_DELAY=100"),
        "the daemon runs with MIMALLOC_PURGE_DELAY=100"
    );
    // ... and keeps its name, which `ps` and `pkill pgcdc` go by.
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    assert_eq!(comm.trim_end(), "pgcdc", "the daemon's process name");
    d.sample_rss();
    let peak_mib = d.peak_rss_kb / 1024;
    eprintln!("peak rss streaming {LARGE_VALUES} values of 64 MiB: {peak_mib} MiB");
    assert!(
        peak_mib < PEAK_RSS_MAX_MIB,
        "peak rss {peak_mib} MiB, more than {PEAK_RSS_MAX_MIB} MiB"
    );
    let status = d.terminate(Duration::from_secs(60)).unwrap();
    assert_eq!(status.code(), Some(0), "{}", d.log_tail());
}

/// Rows of [`WIDE_MIB`] MiB in the backlog read while the broker is frozen.
const WIDE_ROWS: i32 = 150;
/// Size of each of those rows.
const WIDE_MIB: i32 = 4;
/// `[kafka]` settings for them: each row's record fits (librdkafka holds the
/// default `max_inflight_bytes`, 64 MiB, of records).
const WIDE_MESSAGES: &str = "[kafka.properties]\n\"message.max.bytes\" = \"8000000\"\n";
/// The daemon's peak while it reads those rows with Kafka frozen: its
/// baseline, `max_inflight_bytes`, the batch being encoded (at most
/// `postgres.max_batch_bytes`, 64 MiB) and 17 rows read ahead (measured:
/// 153 MiB). Reading up to 256 rows ahead held about 88 of them, 371 MiB;
/// with `max_inflight_bytes` at 256 MiB, 358 MiB.
const WIDE_PEAK_MAX_MIB: u64 = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_wide_rows_is_read_ahead_only_a_few_rows_while_kafka_stalls() {
    let (_pg, tansu, _dir, db, mut d) = streaming(WIDE_MESSAGES).await;

    pgcdc_testkit::signal(tansu.pid(), "STOP").unwrap();
    let repeat = WIDE_MIB << 15; // 32-character md5 texts
    for id in 1..=WIDE_ROWS {
        db.execute(
            "INSERT INTO docs SELECT i, repeat(md5(i::text), $2) FROM (SELECT $1::int AS i) s",
            &[&id, &repeat],
        )
        .await
        .unwrap();
    }
    let end: Lsn = db
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get::<_, String>(0)
        .parse()
        .unwrap();

    // Until pgcdc stops reading: the walsender's sent position holds still
    // for three polls in a row (or reached the end).
    let sent = "SELECT sent_lsn::text FROM pg_stat_replication WHERE application_name = 'pgcdc'";
    let last = std::cell::Cell::new((None::<Lsn>, 0_u32));
    let stalled_at = wait::poll(
        "pgcdc to stop reading the backlog",
        STREAM,
        Duration::from_millis(500),
        || {
            let (at, last) = (db.query_opt(sent, &[]), &last);
            async move {
                let at: Option<Lsn> = at
                    .await
                    .unwrap()
                    .and_then(|r| r.get::<_, Option<String>>(0))
                    .and_then(|t| t.parse().ok());
                let (before, still) = last.get();
                let still = if at == before { still + 1 } else { 0 };
                last.set((at, still));
                let done = at.is_some_and(|at| at >= end) || still >= 3;
                wait::Poll::when(done, at, || format!("sent {at:?} of {end}"))
            }
        },
    )
    .await
    .unwrap();
    d.sample_rss();
    let stalled_mib = d.peak_rss_kb / 1024;
    pgcdc_testkit::signal(tansu.pid(), "CONT").unwrap();

    let mut seen = 0;
    for_each_record(
        &tansu.brokers(),
        TOPIC,
        WIDE_ROWS as usize,
        STREAM,
        &d,
        |value| {
            seen += 1;
            assert_eq!(value["after"]["id"], json!(seen), "in order");
        },
    );
    d.sample_rss();
    let peak_mib = d.peak_rss_kb / 1024;
    eprintln!("peak rss: {stalled_mib} MiB with kafka frozen (sent {stalled_at:?} of {end}), {peak_mib} MiB in all");
    assert!(
        stalled_at.is_some_and(|at| at < end),
        "pgcdc read the whole backlog ahead while kafka was frozen"
    );
    assert!(
        peak_mib < WIDE_PEAK_MAX_MIB,
        "peak rss {peak_mib} MiB, more than {WIDE_PEAK_MAX_MIB} MiB"
    );
    let status = d.terminate(Duration::from_secs(60)).unwrap();
    assert_eq!(status.code(), Some(0), "{}", d.log_tail());
}

/// Rows of [`SNAPSHOT_KIB`] KiB the initial snapshot and a backfill copy:
/// all of them fit one chunk of the default `snapshot.chunk_rows` (2,500).
const SNAPSHOT_ROWS: i32 = 600;
/// Size of each of those rows: its record stays below librdkafka's default
/// `message.max.bytes`.
const SNAPSHOT_KIB: i32 = 512;
/// The daemon's peak while it copies those 300 MiB with the default
/// settings (measured: 187-203 MiB for the initial snapshot, 91-95 MiB for
/// the backfill; 952 and 910 MiB when their chunks were bounded by rows
/// only).
const SNAPSHOT_PEAK_MAX_MIB: u64 = 250;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_of_wide_rows_hold_chunks_bounded_by_bytes() {
    let (pg, tansu, dir, db) = pg_and_tansu().await;
    db.batch_execute(CREATE).await.unwrap();
    let repeat = SNAPSHOT_KIB << 5; // 32-character md5 texts
    db.execute(
        "INSERT INTO docs SELECT i, repeat(md5(i::text), $2) FROM generate_series(1, $1::int) i",
        &[&SNAPSHOT_ROWS, &repeat],
    )
    .await
    .unwrap();
    let cfg = config(&pg, &tansu, &dir.path().join("state"), &["docs"], "");
    let mut d = daemon(dir.path(), &cfg, &[]);
    let copied = copied_ids(&tansu, &d, 1);
    assert_eq!(
        copied,
        (1..=SNAPSHOT_ROWS).collect::<Vec<_>>(),
        "in key order"
    );
    let status = d.terminate(Duration::from_secs(60)).unwrap();
    assert_eq!(status.code(), Some(0), "{}", d.log_tail());
    let snapshot_mib = d.peak_rss_kb / 1024;

    // A backfill (what resumes an interrupted copy, or `pgcdc snapshot`)
    // reads its chunks in one snapshot each and holds them until the
    // stream passes their high watermark.
    d.peak_rss_kb = 0;
    d.spawn().unwrap();
    wait_slot_active(&db, &mut d, "pgcdc").await;
    let out = crate::support::pgcdc(&d.config, &["snapshot", "--table", "public.docs"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let both = copied_ids(&tansu, &d, 2);
    assert_eq!(&both[..copied.len()], copied, "the first copy");
    assert_eq!(&both[copied.len()..], copied, "the backfill");
    let status = d.terminate(Duration::from_secs(60)).unwrap();
    assert_eq!(status.code(), Some(0), "{}", d.log_tail());
    let backfill_mib = d.peak_rss_kb / 1024;

    eprintln!(
        "peak rss copying {SNAPSHOT_ROWS} rows of {SNAPSHOT_KIB} KiB: initial snapshot {snapshot_mib} MiB, backfill {backfill_mib} MiB"
    );
    for (copy, mib) in [
        ("initial snapshot", snapshot_mib),
        ("backfill", backfill_mib),
    ] {
        assert!(
            mib < SNAPSHOT_PEAK_MAX_MIB,
            "{copy}: peak rss {mib} MiB, more than {SNAPSHOT_PEAK_MAX_MIB} MiB"
        );
    }
}

/// The ids of the first `copies` × [`SNAPSHOT_ROWS`] records on the topic,
/// each checked as a whole copied row.
fn copied_ids(tansu: &Tansu, d: &Daemon, copies: usize) -> Vec<i32> {
    let mut ids = Vec::new();
    for_each_record(
        &tansu.brokers(),
        TOPIC,
        copies * SNAPSHOT_ROWS as usize,
        STREAM,
        d,
        |value| {
            let id = value["after"]["id"].as_i64().unwrap() as i32;
            let body = value["after"]["body"].as_str().unwrap();
            assert_eq!(
                body.len(),
                1024 * SNAPSHOT_KIB as usize,
                "length of row {id}"
            );
            assert_eq!(value["op"], json!("r"), "row {id}");
            ids.push(id);
        },
    );
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_above_message_max_bytes_stops_pgcdc_naming_it_on_every_start() {
    let (_pg, tansu, _dir, db, mut d) = streaming("").await;

    let (before, after) = write_small_large_small(&db).await;
    let status = d.wait_exit(EXIT).unwrap();
    assert_eq!(status.code(), Some(4), "{}", d.log_tail());
    let first = oversized_errors(&d);
    assert_eq!(first.len(), 1, "{}", d.log_tail());
    assert_names_the_record(&first[0], before, after);
    let records = read_until(&tansu, TOPIC, STREAM, |r| !r.is_empty());
    let ids: Vec<Value> = records.iter().map(|r| r.after()["id"].clone()).collect();
    assert_eq!(ids, [json!(1)], "only the row before the large one");

    // A restart meets the same record: the same error, nothing skipped.
    d.spawn().unwrap();
    let status = d.wait_exit(EXIT).unwrap();
    assert_eq!(status.code(), Some(4), "{}", d.log_tail());
    let again = oversized_errors(&d);
    assert_eq!(again.len(), 2, "{}", d.log_tail());
    assert_names_the_record(&again[1], before, after);
    let confirmed: Lsn = db
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'pgcdc'",
            &[],
        )
        .await
        .unwrap()
        .get::<_, String>(0)
        .parse()
        .unwrap();
    assert!(
        confirmed < after,
        "slot confirmed {confirmed}, past the large row"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_oversized_dead_letter_the_record_is_described_and_streaming_goes_on() {
    let extra = "oversized = \"dead_letter\"\n";
    let (_pg, tansu, _dir, db, mut d) = streaming(extra).await;

    let (before, after) = write_small_large_small(&db).await;
    let records = read_until(&tansu, TOPIC, STREAM, |r| r.len() >= 2);
    let ids: Vec<Value> = records.iter().map(|r| r.after()["id"].clone()).collect();
    assert_eq!(ids, [json!(1), json!(3)], "the rows around the large one");

    let dead = read_until(&tansu, DEAD_LETTERS, STREAM, |r| !r.is_empty());
    assert_eq!(dead.len(), 1);
    let letter = dead[0].value.as_ref().unwrap();
    assert_eq!(dead[0].key, Some(json!({"id": 2})));
    assert_eq!(dead[0].header(header::REASON), "record too large for kafka");
    assert_eq!(
        (&letter["table"], &letter["topic"], &letter["key"]),
        (&json!("public.docs"), &json!(TOPIC), &json!(r#"{"id":2}"#))
    );
    let lsn: Lsn = letter["lsn"].as_str().unwrap().parse().unwrap();
    assert!(before < lsn && lsn < after, "{before} < {lsn} < {after}");
    assert!(letter["size"].as_u64().unwrap() > OVERSIZED_CHARS as u64);
    assert!(d.is_running(), "{}", d.log_tail());

    let audited = wait::poll(
        "the dead letter in the audit log",
        STREAM,
        wait::EVERY,
        || async {
            let out = crate::support::pgcdc(&d.config, &["logs", "--dead-letters"]);
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            wait::Poll::when(text.contains("public.docs"), text.clone(), || text)
        },
    )
    .await
    .unwrap();
    assert!(
        audited.contains(r#"key={"id":2}"#) && audited.contains("record too large"),
        "{audited}"
    );
    let status = d.terminate(Duration::from_secs(60)).unwrap();
    assert_eq!(status.code(), Some(0), "{}", d.log_tail());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_the_broker_refuses_as_too_large_stops_pgcdc_naming_it() {
    let pg = PgCluster::start().unwrap();
    let mock = mock_broker();
    mock.create_topic(TOPIC, 1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = pg.client().await.unwrap();
    db.batch_execute(CREATE).await.unwrap();
    let cfg = config(&pg, &mock, &dir.path().join("state"), &["docs"], "");
    let mut d = daemon(dir.path(), &cfg, &[]);
    wait_slot_active(&db, &mut d, "pgcdc").await;

    mock.produce_errors(MESSAGE_TOO_LARGE, 1).unwrap();
    db.batch_execute("INSERT INTO docs VALUES (1, 'refused by the broker')")
        .await
        .unwrap();
    let status = d.wait_exit(EXIT).unwrap();
    assert_eq!(status.code(), Some(4), "{}", d.log_tail());
    let log = d.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("fatal: ") && l.contains("refused a record as too large"))
        .unwrap_or_else(|| panic!("no fatal line naming the record:\n{log}"));
    for part in [
        "exit_code=4",
        r#"public.docs key {"id":1} at commit lsn "#,
        "max.message.bytes",
        r#"kafka.properties."message.max.bytes""#,
    ] {
        assert!(line.contains(part), "{part:?} missing: {line}");
    }
}

/// PostgreSQL, tansu, a scratch directory, a SQL client and a daemon
/// streaming the `docs` table with `extra_kafka` in its `[kafka]` section.
async fn streaming(
    extra_kafka: &str,
) -> (
    PgCluster,
    Tansu,
    tempfile::TempDir,
    tokio_postgres::Client,
    Daemon,
) {
    let (pg, tansu, dir, db) = pg_and_tansu().await;
    db.batch_execute(CREATE).await.unwrap();
    let state = dir.path().join("state");
    let cfg = config(&pg, &tansu, &state, &["docs"], extra_kafka);
    let mut d = daemon(dir.path(), &cfg, &[]);
    wait_slot_active(&db, &mut d, "pgcdc").await;
    (pg, tansu, dir, db, d)
}

/// Insert row 1 (small), row 2 (above `message.max.bytes`) and row 3
/// (small), each in its own transaction; the WAL positions just before and
/// just after row 2's transaction.
async fn write_small_large_small(db: &tokio_postgres::Client) -> (Lsn, Lsn) {
    let lsn = |row: tokio_postgres::Row| row.get::<_, String>(0).parse::<Lsn>().unwrap();
    let now = "SELECT pg_current_wal_insert_lsn()::text";
    db.batch_execute("INSERT INTO docs VALUES (1, 'small')")
        .await
        .unwrap();
    let before = lsn(db.query_one(now, &[]).await.unwrap());
    db.execute(
        "INSERT INTO docs VALUES (2, repeat('x', $1))",
        &[&OVERSIZED_CHARS],
    )
    .await
    .unwrap();
    let after = lsn(db.query_one(now, &[]).await.unwrap());
    db.batch_execute("INSERT INTO docs VALUES (3, 'small')")
        .await
        .unwrap();
    (before, after)
}

/// The log lines reporting an oversized record.
fn oversized_errors(d: &Daemon) -> Vec<String> {
    d.log_text()
        .lines()
        .filter(|l| l.contains("fatal: ") && l.contains("record too large for kafka"))
        .map(str::to_owned)
        .collect()
}

/// `line` names the table, the key, a commit LSN of row 2's transaction
/// (between `before` and `after`), the size and the setting to raise.
fn assert_names_the_record(line: &str, before: Lsn, after: Lsn) {
    for part in [
        "exit_code=4",
        "public.docs",
        r#"key {"id":2}"#,
        r#"kafka.properties."message.max.bytes" (1000000)"#,
        "max.message.bytes",
        r#"kafka.oversized = "dead_letter""#,
    ] {
        assert!(line.contains(part), "{part:?} missing: {line}");
    }
    let lsn_text = word_after(line, "commit lsn ");
    let lsn: Lsn = lsn_text.parse().unwrap();
    assert!(
        before < lsn && lsn < after,
        "{before} < {lsn} < {after}: {line}"
    );
    let size: u64 = word_after(line, &format!("{lsn_text}, ")).parse().unwrap();
    assert!(size > OVERSIZED_CHARS as u64, "{line}");
}

/// The text in `line` after `prefix`, up to the next space or comma.
fn word_after<'a>(line: &'a str, prefix: &str) -> &'a str {
    let rest = &line[line.find(prefix).unwrap() + prefix.len()..];
    rest.split([' ', ',']).next().unwrap()
}

/// Read `topic` (one partition) from the beginning until `want` records
/// arrived, handing each value (as JSON) to `check` and dropping it, so the
/// reader holds one large record at a time.
fn for_each_record(
    brokers: &str,
    topic: &str,
    want: usize,
    timeout: Duration,
    d: &Daemon,
    mut check: impl FnMut(Value),
) {
    let reader = consumer(brokers, "pgcdc-tests").unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .unwrap();
    reader.assign(&tpl).unwrap();
    let mut got = 0;
    let what = format!("{want} records of {topic}");
    wait::poll_blocking(&what, timeout, Duration::ZERO, || {
        if got == want {
            return wait::Poll::Ready(());
        }
        if !d.is_running() {
            return wait::Poll::Abort(format!("pgcdc exited:\n{}", d.log_tail()));
        }
        match reader.poll(Duration::from_millis(500)) {
            Some(Ok(msg)) => {
                let has_table = msg
                    .headers()
                    .is_some_and(|h| h.iter().any(|h| h.key == header::TABLE));
                assert!(has_table, "record without headers");
                check(serde_json::from_slice(msg.payload().unwrap()).unwrap());
                got += 1;
            }
            Some(Err(e)) => return wait::Poll::Abort(format!("kafka: {e}")),
            None => {}
        }
        wait::Poll::Pending(format!("{got} so far; pgcdc log:\n{}", d.log_tail()))
    })
    .unwrap();
}
