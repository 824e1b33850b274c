//! Throughput benchmark (not a timed test): a 1,000,000-row backlog
//! (1,000 transactions of 1,000 rows, written after pgcdc created its slot
//! and stopped, as during a downtime) drained by pgcdc into tansu, next to
//! `pg_recvlogical` draining the same backlog into /dev/null; then 200,000
//! single-row transactions drained by both, with pgcdc's synced checkpoint
//! writes; then peak RSS for one 10,000,000-row transaction and for ten
//! values of 64 MiB.
//!
//! Run with `cargo bench --bench pipeline` (scripts/bench.sh).

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use pgcdc_testkit::bench::{self, Target};
use pgcdc_testkit::config::daemon_config as config;
use pgcdc_testkit::wait::{self, Poll};
use pgcdc_testkit::{Daemon, PgCluster, Tansu};

/// The daemon under test.
const PGCDC: &str = env!("CARGO_BIN_EXE_pgcdc");

const TXS: u64 = 1_000;
const ROWS_PER_TX: u64 = 1_000;
const ROWS: u64 = TXS * ROWS_PER_TX;
/// Single-row transactions of the small-transactions part.
const SMALL_TXS: u64 = 200_000;
/// Peak resident memory pgcdc should stay under, MiB.
const RSS_TARGET_MIB: f64 = 100.0;
/// Rows of the one large transaction (`PIPELINE_BENCH_BIG_ROWS`).
const BIG_ROWS: u64 = 10_000_000;
/// Values of [`LARGE_VALUE_MIB`] streamed one per transaction.
const LARGE_VALUES: i32 = 10;
/// Size of each large value, MiB: `md5` text (32 bytes) repeated.
const LARGE_VALUE_MIB: i32 = 64;

/// What one drain by pgcdc measured.
struct Drained {
    secs: f64,
    /// Seconds from the daemon's start to its slot streaming.
    start_secs: f64,
    rss_mib: f64,
    cpu_secs: f64,
    /// Of `cpu_secs`, what librdkafka's own I/O threads (`rdk:…`) used.
    librdkafka_cpu_secs: f64,
    /// CPU seconds PostgreSQL and tansu spent meanwhile.
    pg_cpu_secs: f64,
    tansu_cpu_secs: f64,
    /// The `/metrics` page at the end.
    metrics: String,
}

/// The LSN pgcdc checkpointed and confirms, from its `/metrics` page.
const CHECKPOINTED: &str = "pgcdc_lsn{position=\"confirmed\"}";

/// Start pgcdc and wait until its checkpoint reaches `end` (every record
/// before it acknowledged by Kafka and checkpointed), read from its
/// `/metrics`. The slot's `confirmed_flush_lsn` follows at the next standby
/// status update (`postgres.status_interval_secs`), which is not work.
async fn drain_with_pgcdc(
    (pg, tansu): (&PgCluster, &Tansu),
    dir: &std::path::Path,
    cfg: &str,
    db: &tokio_postgres::Client,
    slot: &str,
    before: impl std::future::Future<Output = i64>,
) -> Drained {
    let port = pgcdc_testkit::free_port().expect("a free port");
    let cfg = pgcdc_testkit::config::with_metrics(cfg, port);
    let page = format!("http://127.0.0.1:{port}/metrics");
    let started = Instant::now();
    let (pg_cpu, tansu_cpu) = (bench::pg_cpu_secs(pg), bench::cpu_secs(tansu.pid(), false));
    let mut daemon = Daemon::start(std::path::Path::new(PGCDC), dir, &cfg, "run", &[]).unwrap();
    let end = before.await;
    let start_secs = std::cell::Cell::new(None);
    let every = Duration::from_millis(20);
    let metrics = wait::poll(
        "pgcdc to checkpoint the backlog",
        Duration::from_secs(1800),
        every,
        || async {
            if !daemon.is_running() {
                return Poll::Abort(format!("pgcdc exited:\n{}", daemon.log_text()));
            }
            if start_secs.get().is_none() && slot_active(db, slot).await {
                start_secs.set(Some(started.elapsed().as_secs_f64()));
            }
            let text = match reqwest::get(&page).await {
                Ok(r) => r.text().await.unwrap_or_default(),
                Err(e) => return Poll::Pending(format!("{page}: {e}")),
            };
            let at = bench::sample(&text, CHECKPOINTED).unwrap_or(0.0) as i64;
            Poll::when(at >= end, text, || format!("checkpointed {at} of {end}"))
        },
    )
    .await
    .unwrap();
    let secs = started.elapsed().as_secs_f64();
    let pid = daemon.pid().expect("pid");
    let (rss_mib, cpu_secs) = (bench::peak_rss_mib(pid), bench::cpu_secs(pid, false));
    let librdkafka_cpu_secs = bench::threads_cpu_secs(pid, bench::LIBRDKAFKA_THREADS);
    let pg_cpu_secs = bench::pg_cpu_secs(pg) - pg_cpu;
    let tansu_cpu_secs = bench::cpu_secs(tansu.pid(), false) - tansu_cpu;
    daemon.terminate(Duration::from_secs(60)).unwrap();
    Drained {
        secs,
        start_secs: start_secs.get().unwrap_or(secs),
        rss_mib,
        cpu_secs,
        librdkafka_cpu_secs,
        pg_cpu_secs,
        tansu_cpu_secs,
        metrics,
    }
}

/// Whether `slot` exists and a session streams from it.
async fn slot_active(db: &tokio_postgres::Client, slot: &str) -> bool {
    let active = "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND active";
    db.query_opt(active, &[&slot])
        .await
        .ok()
        .flatten()
        .is_some()
}

/// Let pgcdc create its slot `slot` (copying the still empty table), then
/// stop it: what is written next is a backlog it resumes from, as after a
/// downtime. A slot made outside pgcdc would be adopted without a
/// checkpoint, and pgcdc would backfill the table while streaming it.
async fn create_slot_with_pgcdc(
    dir: &std::path::Path,
    cfg: &str,
    db: &tokio_postgres::Client,
    slot: &str,
) {
    let mut daemon = Daemon::start(std::path::Path::new(PGCDC), dir, cfg, "run", &[]).unwrap();
    let every = Duration::from_millis(50);
    wait::poll("pgcdc's slot", Duration::from_secs(120), every, || async {
        if !daemon.is_running() {
            return Poll::Abort(format!("pgcdc exited:\n{}", daemon.log_text()));
        }
        Poll::when(slot_active(db, slot).await, (), || {
            format!("slot {slot} not active yet")
        })
    })
    .await
    .unwrap();
    daemon.terminate(Duration::from_secs(60)).unwrap();
}

/// Seconds `pg_recvlogical` takes to drain `slot` (pgoutput, protocol 1,
/// `publication`) into /dev/null up to `end`.
fn recvlogical(pg: &PgCluster, recv: &Path, slot: &str, publication: &str, end: &str) -> f64 {
    let t0 = Instant::now();
    let publication = format!("publication_names={publication}");
    let status = Command::new(recv)
        .args(["-h", "127.0.0.1", "-p", &pg.port.to_string()])
        .args(["-U", "postgres", "-d", "postgres"])
        .args(["--slot", slot, "--start", "-o", "proto_version=1", "-o"])
        .args([publication.as_str(), "--endpos", end])
        .args(["-f", "/dev/null", "--no-loop"])
        .status()
        .expect("pg_recvlogical");
    assert!(status.success(), "pg_recvlogical failed");
    t0.elapsed().as_secs_f64()
}

/// The CPU seconds of each side during a drain, as one line.
fn cpu_split(d: &Drained) -> String {
    format!(
        "CPU seconds while pgcdc drained: pgcdc {:.1} (librdkafka's I/O threads {:.1} of it), PostgreSQL {:.1}, tansu {:.1} in {:.1} s (of which {:.2} s from start to streaming)",
        d.cpu_secs, d.librdkafka_cpu_secs, d.pg_cpu_secs, d.tansu_cpu_secs, d.secs, d.start_secs
    )
}

/// The table of both drains: (rate, seconds) of `pg_recvlogical` and of pgcdc.
fn print_rates(unit: &str, recv: (f64, f64), pgcdc: (f64, f64)) {
    println!("{:<44} {:>12} {:>10}", "", unit, "seconds");
    let rows = [
        ("pg_recvlogical (pgoutput, proto 1) > /dev/null", recv),
        ("pgcdc -> tansu, to its checkpoint at the end", pgcdc),
    ];
    for (what, (rate, secs)) in rows {
        println!("{what:<44} {rate:>12.0} {secs:>10.2}");
    }
}

/// Small transactions: `SMALL_TXS` single-row transactions (inserts and
/// updates, alternating) already in the WAL, drained by pgcdc next to
/// `pg_recvlogical`; prints both rates and pgcdc's synced checkpoint writes.
async fn small_transactions(
    pg: &PgCluster,
    tansu: &Tansu,
    db: &tokio_postgres::Client,
    recv: &Path,
) {
    for sql in [
        "CREATE TABLE small (id bigint PRIMARY KEY, n int)",
        "CREATE PUBLICATION small FOR TABLE small",
        "SELECT pg_create_logical_replication_slot('small_recv', 'pgoutput')",
        "SELECT pg_create_logical_replication_slot('small_recv2', 'pgoutput')",
        "CREATE PROCEDURE churn(total int) LANGUAGE plpgsql AS $$ BEGIN \
           FOR i IN 1..total LOOP \
             IF i % 2 = 1 THEN INSERT INTO small VALUES (i, 0); \
             ELSE UPDATE small SET n = n + 1 WHERE id = i - 1; END IF; \
             COMMIT; \
           END LOOP; END $$",
    ] {
        db.batch_execute(sql).await.expect("setup");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = table_config((pg, tansu), dir.path(), "small", "");
    create_slot_with_pgcdc(dir.path(), &cfg, db, "small").await;
    eprintln!("bench: writing {SMALL_TXS} single-row transactions");
    db.batch_execute(&format!("CALL churn({SMALL_TXS})"))
        .await
        .expect("churn");
    let end = db
        .query_one(
            "SELECT pg_current_wal_lsn()::text, (pg_current_wal_lsn() - '0/0')::bigint",
            &[],
        )
        .await
        .expect("lsn");
    let (end, end_num): (String, i64) = (end.get(0), end.get(1));
    let recv_first = recvlogical(pg, recv, "small_recv", "small", &end);
    let end_at = async { end_num };
    let drained = drain_with_pgcdc((pg, tansu), dir.path(), &cfg, db, "small", end_at).await;
    let (secs, cpu) = (drained.secs, drained.cpu_secs);
    let writes = bench::sample(&drained.metrics, "pgcdc_checkpoint_writes_total").unwrap_or(0.0);
    let recv_second = recvlogical(pg, recv, "small_recv2", "small", &end);
    let recv_secs = recv_first.min(recv_second);
    let (rate, recv_rate) = (SMALL_TXS as f64 / secs, SMALL_TXS as f64 / recv_secs);
    println!();
    println!("{SMALL_TXS} single-row transactions (inserts and updates) in the WAL, on this machine in one run:");
    print_rates("txs/s", (recv_rate, recv_secs), (rate, secs));
    println!(
        "ratio pgcdc / pg_recvlogical: {:.2} (target >= 0.9)",
        rate / recv_rate
    );
    println!(
        "pgcdc synced checkpoint writes: {writes:.0} ({:.0}/s, {:.1} transactions per write); CPU µs per transaction: {:.1}",
        writes / secs,
        SMALL_TXS as f64 / writes.max(1.0),
        cpu * 1e6 / SMALL_TXS as f64
    );
    println!("{}", cpu_split(&drained));
    bench::figure(
        "200k single-row txs drained",
        &format!("{rate:.0} tx/s, {:.0} synced writes/s", writes / secs),
        &format!("pg_recvlogical {recv_rate:.0} tx/s"),
        rate / recv_rate,
        Target::AtLeast(0.9),
    );
}

/// The config of a daemon in `dir` streaming only `table`: slot and
/// publication named after it, topic `cdc-<table>`, `extra_kafka` in its
/// `[kafka]` section, logging warnings only.
fn table_config(
    (pg, tansu): (&PgCluster, &Tansu),
    dir: &Path,
    table: &str,
    extra_kafka: &str,
) -> String {
    let extra = format!("topic = \"cdc-{table}\"\n{extra_kafka}");
    config(pg, tansu, &dir.join("state"), &[table], &extra)
        .replace("info,pgcdc_actors=debug", "warn")
        .replace(
            "[postgres]\n",
            &format!("[postgres]\nslot = \"{table}\"\npublication = \"{table}\"\n"),
        )
}

/// A fresh daemon streaming new table `table` while `write` commits to it
/// (the daemon makes its slot and publication), with `table_config`.
async fn drain_table(
    (pg, tansu): (&PgCluster, &Tansu),
    db: &tokio_postgres::Client,
    (table, columns): (&str, &str),
    extra_kafka: &str,
    write: impl std::future::Future<Output = ()>,
) -> Drained {
    let create = format!("CREATE TABLE {table} ({columns})");
    db.batch_execute(&create).await.expect("setup");
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = table_config((pg, tansu), dir.path(), table, extra_kafka);
    let writer = async {
        wait::until("the slot", Duration::from_secs(60), || {
            slot_active(db, table)
        })
        .await
        .unwrap();
        write.await;
        let end = db
            .query_one("SELECT (pg_current_wal_lsn() - '0/0')::bigint", &[])
            .await;
        end.expect("lsn").get::<_, i64>(0)
    };
    drain_with_pgcdc((pg, tansu), dir.path(), &cfg, db, table, writer).await
}

/// One transaction of `PIPELINE_BENCH_BIG_ROWS` rows (default
/// [`BIG_ROWS`]), streamed while it is written: pgcdc's peak RSS.
async fn big_transaction(pg: &PgCluster, tansu: &Tansu, db: &tokio_postgres::Client) {
    let rows: u64 = std::env::var("PIPELINE_BENCH_BIG_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(BIG_ROWS);
    eprintln!("bench: one transaction of {rows} rows");
    let insert =
        format!("INSERT INTO big SELECT g, md5(g::text), g FROM generate_series(1, {rows}) g");
    let write = async { db.batch_execute(&insert).await.expect("big insert") };
    let columns = "id bigint PRIMARY KEY, a text, n int";
    let big = drain_table((pg, tansu), db, ("big", columns), "", write).await;
    println!();
    println!(
        "pgcdc peak RSS, one {rows}-row transaction: {:.1} MiB in {:.1} s ({:.0} rows/s; target <= {RSS_TARGET_MIB})",
        big.rss_mib,
        big.secs,
        rows as f64 / big.secs
    );
    println!("{}", cpu_split(&big));
    bench::figure(
        &format!("peak RSS, one {rows}-row transaction (MiB)"),
        &format!("{:.0} MiB", big.rss_mib),
        "-",
        big.rss_mib,
        Target::AtMost(RSS_TARGET_MIB),
    );
}

/// [`LARGE_VALUES`] values of [`LARGE_VALUE_MIB`] MiB, one per transaction,
/// streamed with `message.max.bytes` raised to let their records through:
/// pgcdc's peak RSS, next to the size of one value.
async fn large_values(pg: &PgCluster, tansu: &Tansu, db: &tokio_postgres::Client) {
    eprintln!("bench: {LARGE_VALUES} values of {LARGE_VALUE_MIB} MiB");
    let repeat = LARGE_VALUE_MIB * (1 << 20) / 32;
    let write = async {
        for id in 1..=LARGE_VALUES {
            db.execute(
                "INSERT INTO docs SELECT i, repeat(md5(i::text), $2) FROM (SELECT $1::int AS i) s",
                &[&id, &repeat],
            )
            .await
            .expect("large value");
        }
    };
    let large = "[kafka.properties]\n\"message.max.bytes\" = \"100000000\"\n";
    let columns = "id int PRIMARY KEY, body text";
    let docs = drain_table((pg, tansu), db, ("docs", columns), large, write).await;
    let rss = docs.rss_mib;
    println!();
    println!(
        "pgcdc peak RSS, {LARGE_VALUES} values of {LARGE_VALUE_MIB} MiB: {rss:.1} MiB in {:.1} s ({:.1} times one value; target <= {RSS_TARGET_MIB})",
        docs.secs,
        rss / f64::from(LARGE_VALUE_MIB)
    );
    bench::figure(
        &format!("peak RSS, {LARGE_VALUE_MIB} MiB values (MiB)"),
        &format!("{rss:.0} MiB"),
        &format!("one value {LARGE_VALUE_MIB} MiB"),
        rss,
        Target::AtMost(RSS_TARGET_MIB),
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let pg = PgCluster::start().unwrap();
    let tansu = Tansu::start().unwrap();
    let dir = tempfile::tempdir().expect("tempdir");
    let db = pg.client().await.unwrap();
    for sql in [
        "CREATE TABLE bench (id bigint PRIMARY KEY, a text, b text, n int, ts timestamptz)",
        "CREATE PUBLICATION pgcdc FOR TABLE bench",
        "SELECT pg_create_logical_replication_slot('recv', 'pgoutput')",
        "SELECT pg_create_logical_replication_slot('recv2', 'pgoutput')",
    ] {
        db.batch_execute(sql).await.expect("setup");
    }
    let state = dir.path().join("state");
    let cfg =
        config(&pg, &tansu, &state, &["bench"], "").replace("info,pgcdc_actors=debug", "warn");
    create_slot_with_pgcdc(dir.path(), &cfg, &db, "pgcdc").await;
    eprintln!("bench: writing {ROWS} rows in {TXS} transactions");
    for t in 0..TXS {
        let lo = t * ROWS_PER_TX;
        let sql = format!(
            "INSERT INTO bench SELECT g, md5(g::text), 'row ' || g, g % 1000, now() FROM generate_series({lo}, {}) g",
            lo + ROWS_PER_TX - 1
        );
        db.batch_execute(&sql).await.expect("insert");
    }
    let end: String = db
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .expect("lsn")
        .get(0);
    let end_num: i64 = db
        .query_one("SELECT (pg_current_wal_lsn() - '0/0')::bigint", &[])
        .await
        .expect("lsn")
        .get(0);

    // Baseline: pg_recvlogical (pgoutput, proto 1) into /dev/null, up to the same LSN.
    let bindir = String::from_utf8(
        Command::new("pg_config")
            .arg("--bindir")
            .output()
            .expect("pg_config")
            .stdout,
    )
    .unwrap_or_default();
    let recv = std::path::Path::new(bindir.trim()).join("pg_recvlogical");
    let drain = |slot: &str| recvlogical(&pg, &recv, slot, "pgcdc", &end);
    // Once before pgcdc (colder caches) and once after; the faster counts.
    let recv_first = drain("recv");

    let backlog = drain_with_pgcdc((&pg, &tansu), dir.path(), &cfg, &db, "pgcdc", async {
        end_num
    })
    .await;
    let (secs, rss, cpu) = (backlog.secs, backlog.rss_mib, backlog.cpu_secs);

    let recv_second = drain("recv2");
    let recv_secs = recv_first.min(recv_second);

    let rate = ROWS as f64 / secs;
    let recv_rate = ROWS as f64 / recv_secs;
    println!();
    println!("backlog of {ROWS} rows in {TXS} transactions, on this machine in one run:");
    print_rates("rows/s", (recv_rate, recv_secs), (rate, secs));
    println!("(pg_recvlogical ran before and after pgcdc: {recv_first:.2} s and {recv_second:.2} s; the faster is shown)");
    println!(
        "ratio pgcdc / pg_recvlogical: {:.2} (target >= 0.7)",
        rate / recv_rate
    );
    println!(
        "pgcdc CPU seconds per million rows: {:.2}",
        cpu / (ROWS as f64 / 1e6)
    );
    println!("{}", cpu_split(&backlog));
    println!("pgcdc peak RSS, backlog: {rss:.1} MiB (target <= {RSS_TARGET_MIB})");
    bench::figure(
        "1M-row backlog streamed",
        &format!("{rate:.0} rows/s"),
        &format!("pg_recvlogical {recv_rate:.0} rows/s"),
        rate / recv_rate,
        Target::AtLeast(0.7),
    );
    let per_row = cpu * 1e6 / ROWS as f64;
    let librdkafka = backlog.librdkafka_cpu_secs * 1e6 / ROWS as f64;
    bench::figure(
        "CPU per streamed row (µs)",
        &format!("{per_row:.1} µs ({librdkafka:.1} in librdkafka's I/O threads)"),
        "-",
        per_row,
        Target::AtMost(3.0),
    );
    bench::figure(
        "peak RSS, 1M-row backlog (MiB)",
        &format!("{rss:.0} MiB"),
        "-",
        rss,
        Target::AtMost(RSS_TARGET_MIB),
    );

    small_transactions(&pg, &tansu, &db, &recv).await;
    // The memory figures each on a fresh broker: tansu keeps every record in memory.
    drop(tansu);
    big_transaction(&pg, &Tansu::start().unwrap(), &db).await;
    large_values(&pg, &Tansu::start().unwrap(), &db).await;
}
