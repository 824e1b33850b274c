//! Snapshot throughput (not a timed test): a 2,000,000-row table copied into
//! Kafka (tansu on loopback) by the initial snapshot, timed to the moment every
//! snapshot row is acknowledged and checkpointed, for parallelism 1 and 4; in
//! the same run `COPY (SELECT …) TO STDOUT` of the table into /dev/null (the
//! fastest of three runs).
//!
//! Also prints the CPU seconds each side spent (pgcdc, PostgreSQL, tansu;
//! psql and PostgreSQL for COPY): on 2 cores the services share the machine.
//!
//! Run with `cargo bench --bench snapshot`.

#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pgcdc_testkit::bench::{self, cpu_secs, pg_children, pg_cpu_secs, Target};
use pgcdc_testkit::config::daemon_config as config;
use pgcdc_testkit::wait::{self, Poll};
use pgcdc_testkit::{Daemon, PgCluster, Tansu};

/// The daemon under test.
const PGCDC: &str = env!("CARGO_BIN_EXE_pgcdc");

const ROWS: u64 = 2_000_000;
/// The ratio to COPY the snapshot should reach (at parallelism 4).
const TARGET: f64 = 0.5;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let pg = PgCluster::start().unwrap();
    let tansu = Tansu::start().unwrap();
    let db = pg.client().await.unwrap();
    eprintln!("bench: writing {ROWS} rows");
    db.batch_execute(&format!(
        "CREATE TABLE snap (id bigint PRIMARY KEY, a text, b text, n int, ts timestamptz);
         INSERT INTO snap SELECT g, md5(g::text), 'row ' || g, g % 1000, now() FROM generate_series(1, {ROWS}) g;"
    ))
    .await
    .unwrap();
    db.batch_execute("VACUUM ANALYZE snap").await.unwrap();

    let psql = String::from_utf8(
        Command::new("pg_config")
            .arg("--bindir")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let psql = std::path::Path::new(psql.trim()).join("psql");
    // COPY is timed three times and the fastest run is the baseline.
    let (mut copy, mut copy_cpu) = (f64::MAX, (0.0, 0.0));
    for _ in 0..3 {
        let backends = pg_children(&pg).len();
        let (pg_cpu, self_cpu) = (pg_cpu_secs(&pg), cpu_secs(std::process::id(), true));
        let t0 = Instant::now();
        let status = Command::new(&psql)
            .args([
                "-X",
                "-q",
                "-h",
                "127.0.0.1",
                "-p",
                &pg.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
            ])
            .args(["-c", "COPY (SELECT id, a, b, n, ts FROM snap) TO STDOUT"])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
        let secs = t0.elapsed().as_secs_f64();
        // The COPY backend's CPU is counted once the postmaster has reaped it.
        let reaped = wait::poll_blocking(
            "the copy backends to exit",
            Duration::from_secs(10),
            Duration::from_millis(10),
            || {
                let n = pg_children(&pg).len();
                Poll::when(n <= backends, (), || format!("{n} backends"))
            },
        );
        // Still running after the wait: their CPU so far is all that is counted.
        drop(reaped);
        if secs < copy {
            copy = secs;
            copy_cpu = (
                cpu_secs(std::process::id(), true) - self_cpu,
                pg_cpu_secs(&pg) - pg_cpu,
            );
        }
    }

    let mut results = Vec::new();
    for parallelism in [1, 4] {
        let dir = tempfile::tempdir().unwrap();
        let name = format!("snap{parallelism}");
        let cfg = config(&pg, &tansu, &dir.path().join("state"), &["snap"], "")
            .replace(
                "info,pgcdc_actors=debug",
                "warn,pgcdc_actors::checkpoint=info",
            )
            .replace(
                "[postgres]\n",
                &format!("[postgres]\nslot = \"{name}\"\npublication = \"{name}\"\n"),
            )
            + &format!("\n[snapshot]\nparallelism = {parallelism}\n");
        let (pg_cpu, tansu_cpu) = (pg_cpu_secs(&pg), cpu_secs(tansu.pid(), false));
        let t0 = Instant::now();
        let mut daemon =
            Daemon::start(std::path::Path::new(PGCDC), dir.path(), &cfg, "run", &[]).unwrap();
        daemon
            .wait_log("table copy fully acknowledged", Duration::from_secs(1800))
            .await
            .unwrap();
        let secs = t0.elapsed().as_secs_f64();
        let pid = daemon.pid().unwrap();
        let cpu = (
            cpu_secs(pid, false),
            pg_cpu_secs(&pg) - pg_cpu,
            cpu_secs(tansu.pid(), false) - tansu_cpu,
        );
        let librdkafka = bench::threads_cpu_secs(pid, bench::LIBRDKAFKA_THREADS);
        results.push((parallelism, secs, cpu, librdkafka));
        daemon.terminate(Duration::from_secs(60)).unwrap();
    }

    println!();
    println!(
        "snapshot of a {ROWS}-row table (id, two text, int, timestamptz) on this machine, one run:"
    );
    println!(
        "{:<52} {:>9} {:>8} {:>8} {:>26}",
        "", "rows/s", "seconds", "vs COPY", "CPU s: client / pg / tansu"
    );
    println!(
        "{:<52} {:>9.0} {:>8.2} {:>8} {:>12.2} / {:.2} / -",
        "COPY (SELECT ...) TO STDOUT > /dev/null, best of 3",
        ROWS as f64 / copy,
        copy,
        "1.00",
        copy_cpu.0,
        copy_cpu.1
    );
    for (p, secs, (own, pg, tansu), _) in &results {
        let label = format!("pgcdc snapshot -> tansu, parallelism {p}");
        println!(
            "{:<52} {:>9.0} {:>8.2} {:>8.2} {:>12.2} / {pg:.2} / {tansu:.2}",
            label,
            ROWS as f64 / secs,
            secs,
            copy / secs,
            own
        );
    }
    println!("(target >= {TARGET} of COPY at parallelism 4; with parallelism > 1 the table is split into key ranges read in parallel)");
    for (parallelism, secs, (own, pg, tansu), librdkafka) in &results {
        bench::figure(
            &format!("2M-row snapshot, parallelism {parallelism}"),
            &format!(
                "{:.0} rows/s (CPU s pgcdc {own:.1}, pg {pg:.1}, tansu {tansu:.1})",
                ROWS as f64 / secs
            ),
            &format!(
                "COPY {:.0} rows/s (CPU s psql {:.1}, pg {:.1})",
                ROWS as f64 / copy,
                copy_cpu.0,
                copy_cpu.1
            ),
            copy / secs,
            Target::AtLeast(TARGET),
        );
        let per_row = own * 1e6 / ROWS as f64;
        let librdkafka = librdkafka * 1e6 / ROWS as f64;
        bench::figure(
            &format!("CPU per snapshot row, parallelism {parallelism} (µs)"),
            &format!("{per_row:.1} µs ({librdkafka:.1} in librdkafka's I/O threads)"),
            "-",
            per_row,
            Target::AtMost(3.0),
        );
    }
}
