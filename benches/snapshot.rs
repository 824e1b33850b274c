//! Snapshot throughput (not a timed test): a 2,000,000-row table copied into
//! Kafka (tansu on loopback) by the initial snapshot, timed to the moment every
//! snapshot row is acknowledged and checkpointed, for parallelism 1 and 4; in
//! the same run `COPY (SELECT …) TO STDOUT` of the table into /dev/null.
//!
//! Run with `cargo bench --bench snapshot`.

#![allow(clippy::unwrap_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{config, Daemon, PgCluster, Tansu};

const ROWS: u64 = 2_000_000;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let pg = PgCluster::start();
    let tansu = Tansu::start();
    let db = pg.client().await;
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
    let t0 = Instant::now();
    let status = Command::new(psql)
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
    let copy = t0.elapsed().as_secs_f64();

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
        let t0 = Instant::now();
        let mut daemon = Daemon::start(dir.path(), &cfg, &[]);
        daemon
            .wait_log("table copy fully acknowledged", Duration::from_secs(1800))
            .await;
        results.push((parallelism, t0.elapsed().as_secs_f64()));
        daemon.terminate(Duration::from_secs(60));
    }

    println!();
    println!(
        "snapshot of a {ROWS}-row table (id, two text, int, timestamptz) on this machine, one run:"
    );
    println!(
        "{:<48} {:>10} {:>9} {:>10}",
        "", "rows/s", "seconds", "vs COPY"
    );
    println!(
        "{:<48} {:>10.0} {:>9.2} {:>10}",
        "COPY (SELECT ...) TO STDOUT > /dev/null",
        ROWS as f64 / copy,
        copy,
        "1.00"
    );
    for (p, secs) in results {
        let label = format!("pgcdc snapshot -> tansu, parallelism {p}");
        println!(
            "{:<48} {:>10.0} {:>9.2} {:>10.2}",
            label,
            ROWS as f64 / secs,
            secs,
            copy / secs
        );
    }
    println!("(target >= 0.3 of COPY; with parallelism > 1 the table is split into key ranges read in parallel)");
}
