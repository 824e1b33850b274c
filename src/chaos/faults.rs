//! The faults of each scenario, injected at seeded random times while the
//! workload runs, and the checks some scenarios add after the clean stop.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::task::block_in_place;

use super::es_proxy::EsFaultProxy;
use super::{oracle, wait_streaming, ChaosOptions, Rng, World};

/// Failpoints the `panic` scenario arms, one per restart: after Kafka
/// acknowledged a batch (before the checkpoint), after the checkpoint
/// (before the confirm), after a batch was handed to the producer, after an
/// ES bulk was written (before the offsets are committed), and in the middle
/// of a backfill chunk (a backfill is requested with `pgcdc snapshot`).
const FAILPOINTS: [&str; 5] = [
    "producer-after-ack=1*panic",
    "checkpoint-before-confirm=1*panic",
    "replication-publish=1*panic",
    "es-after-bulk=1*panic",
    "snapshot-chunk=1*panic",
];

/// `count` sorted offsets within the middle 80% of `duration`.
fn schedule(rng: &mut Rng, count: usize, duration: Duration) -> Vec<Duration> {
    let ms = duration.as_millis() as u64;
    let mut at: Vec<u64> = (0..count)
        .map(|_| ms / 10 + rng.below(ms * 8 / 10))
        .collect();
    at.sort_unstable();
    at.into_iter().map(Duration::from_millis).collect()
}

/// Run the scenario's faults over `opts.duration_secs`; how many were injected.
pub(crate) async fn inject(
    name: &str,
    rng: &mut Rng,
    opts: &ChaosOptions,
    w: &mut World,
) -> Result<usize> {
    let duration = Duration::from_secs(opts.duration_secs);
    let count = match name {
        "slot-dropped" | "slot-advanced" => 0,
        "panic" | "es-errors" | "kafka-down" | "disk-full" => opts.kills.max(1),
        "checkpoint-corrupt" | "checkpoint-missing" | "proxy" => opts.kills.max(1),
        _ => opts.kills,
    };
    let start = Instant::now();
    let first_fp = rng.below(FAILPOINTS.len() as u64) as usize;
    let mut injected = 0;
    for (i, at) in schedule(rng, count, duration).into_iter().enumerate() {
        tokio::time::sleep((start + at).saturating_duration_since(Instant::now())).await;
        injected += match name {
            "kill9" => kill9(rng, w).await?,
            "panic" => arm_failpoint(FAILPOINTS[(first_fp + i) % FAILPOINTS.len()], w).await?,
            "pg-restart" => {
                let mode = if i % 2 == 0 { "immediate" } else { "fast" };
                w.pg_restarted.store(true, Ordering::SeqCst);
                block_in_place(|| w.pg.restart(mode))?;
                1
            }
            "walsender-kill" => terminate_walsender(w).await?,
            "proxy" => proxy_fault(rng, w).await?,
            "es-errors" => arm_es_faults(rng, w)?,
            "kafka-down" => kafka_down(rng, w).await?,
            "disk-full" => disk_full(rng, w).await?,
            "checkpoint-corrupt" => checkpoint_fault(i, rng, w, Damage::Corrupt).await?,
            "checkpoint-missing" => checkpoint_fault(i, rng, w, Damage::Delete).await?,
            other => bail!("no faults for scenario {other}"),
        };
    }
    tokio::time::sleep((start + duration).saturating_duration_since(Instant::now())).await;
    Ok(injected)
}

/// Cut every connection of one proxy or of all three, or delay them all for a while.
async fn proxy_fault(rng: &mut Rng, w: &mut World) -> Result<usize> {
    match rng.below(3) {
        0 => {
            for (_, p) in &w.proxies {
                p.cut_all();
            }
            Ok(w.proxies.len())
        }
        1 => {
            let (_, p) = &w.proxies[rng.below(w.proxies.len() as u64) as usize];
            p.cut_all();
            Ok(1)
        }
        _ => {
            let delay = Duration::from_millis(20 + rng.below(280));
            for (_, p) in &w.proxies {
                p.set_delay(delay);
            }
            tokio::time::sleep(Duration::from_millis(1000 + rng.below(2000))).await;
            for (_, p) in &w.proxies {
                p.set_delay(Duration::ZERO);
            }
            Ok(1)
        }
    }
}

/// Arm the ES proxy with a burst of faults for the next bulk requests;
/// they are counted when they fire (see [`after_stop`]: the sink may be
/// behind, so they can fire while the mirror converges).
fn arm_es_faults(rng: &mut Rng, w: &World) -> Result<usize> {
    let p = w.es_proxy.as_ref().context("no es proxy")?;
    p.arm(2 + rng.below(4) as usize);
    Ok(0)
}

/// Freeze the broker (SIGSTOP) for 2–6 s, then let it go on (SIGCONT):
/// every connection stays open but nothing is answered. The freeze, plus the
/// 2 s heartbeat interval, stays under the sink's 10 s session timeout, and
/// the broker then gets 4 s to answer heartbeats before the next fault: when
/// the session timed out (freezes of up to 8 s, back to back), librdkafka
/// rejoined the group and tansu 0.6 left the sink without partitions for
/// minutes (seen with `--seed 2026 --scenarios kafka-down --kills 4
/// --duration-secs 30` when freezes were 2–8 s). Killing and restarting tansu is not done:
/// with memory storage it loses its records, and with its SQLite storage the
/// sink's consumer group got no assignment, even before the first fault.
async fn kafka_down(rng: &mut Rng, w: &mut World) -> Result<usize> {
    w.tansu.signal("STOP")?;
    tokio::time::sleep(Duration::from_millis(2000 + rng.below(4000))).await;
    w.tansu.signal("CONT")?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    Ok(1)
}

/// `kill -9` once the live sink has joined its group (see [`wait_sink_joined`]).
async fn kill9(rng: &mut Rng, w: &mut World) -> Result<usize> {
    wait_sink_joined(w).await?;
    w.daemon.kill9();
    tokio::time::sleep(Duration::from_millis(rng.below(500))).await;
    w.daemon.spawn()?;
    Ok(1)
}

/// SIGTERM (must exit 0), then start again with `FAILPOINTS` set.
async fn arm_failpoint(failpoint: &str, w: &mut World) -> Result<usize> {
    wait_sink_joined(w).await?;
    let status = block_in_place(|| w.daemon.terminate(Duration::from_secs(60)))?;
    if status.code() != Some(0) {
        bail!(
            "sigterm before arming {failpoint}: exit code {:?}",
            status.code()
        );
    }
    w.daemon.set_env("FAILPOINTS", Some(failpoint));
    w.daemon.spawn()?;
    wait_streaming(w).await?;
    if failpoint.starts_with("snapshot-chunk") {
        let out = block_in_place(|| {
            w.daemon
                .command(&["snapshot", "--table", "public.chaos_items"])
        })?;
        if !out.status.success() {
            bail!(
                "pgcdc snapshot failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    Ok(1)
}

/// Start the daemon again; it must exit with code 5 (the slot cannot be
/// trusted) within 60 s.
fn restart_refused(w: &mut World, what: &str) -> Result<()> {
    w.daemon.spawn()?;
    let status = block_in_place(|| w.daemon.wait_exit(Duration::from_secs(60)))?;
    if status.code() != Some(5) {
        bail!("{what}: exit code {:?}, want 5", status.code());
    }
    Ok(())
}

async fn terminate_walsender(w: &mut World) -> Result<usize> {
    let q = "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_replication";
    let n: i64 = w.db.query_one(q, &[]).await?.get(0);
    Ok(n as usize)
}

/// Checks that need the daemon stopped: failpoints fired; ES faults fired (counted here);
/// a dropped or advanced slot is refused with exit 5.
/// Returns the faults injected here.
pub(crate) async fn after_stop(name: &str, injections: usize, w: &mut World) -> Result<usize> {
    match name {
        "panic" => {
            let fired = w.daemon.log_text().matches("panicked").count();
            if fired < injections {
                bail!("only {fired} of {injections} failpoints fired");
            }
        }
        "proxy" if injections == 0 => bail!("no fault fired"),
        "es-errors" => {
            let fired = w.es_proxy.as_ref().map_or(0, EsFaultProxy::fired);
            if fired == 0 {
                bail!("no es fault fired");
            }
            return Ok(fired);
        }
        "slot-advanced" => {
            advance_slot(w).await?;
            restart_refused(w, "restart with the slot advanced past the checkpoint")?;
            return Ok(1);
        }
        "slot-dropped" => {
            drop_slot(w).await?;
            restart_refused(w, "restart without the slot")?;
            return Ok(1);
        }
        _ => {}
    }
    Ok(0)
}

/// Drop the slot; the walsender may need a moment to let go of it.
async fn drop_slot(w: &World) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match w
            .db
            .execute("SELECT pg_drop_replication_slot('pgcdc')", &[])
            .await
        {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e).context("drop the slot"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Fill `state_dir`'s filesystem for a few seconds while the workload runs.
/// The daemon must either keep going or exit with code 6 (local I/O); the
/// slot must not be confirmed past the checkpoint; after the space is freed
/// (and a restart, if it exited) it streams on.
async fn disk_full(rng: &mut Rng, w: &mut World) -> Result<usize> {
    let filler = w.state_dir.join("chaos-filler");
    block_in_place(|| fill(&filler))?;
    let held = Instant::now() + Duration::from_millis(3000 + rng.below(4000));
    while Instant::now() < held && w.daemon.is_running() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let exited = !w.daemon.is_running();
    std::fs::remove_file(&filler).context("remove the filler")?;
    if exited {
        let status = block_in_place(|| w.daemon.wait_exit(Duration::from_secs(5)))?;
        if status.code() != Some(6) {
            bail!(
                "disk full: exit code {:?}, want 6 (local I/O)",
                status.code()
            );
        }
        checkpoint_covers_slot(w).await?;
        w.daemon.spawn()?;
        wait_streaming(w).await?;
    }
    eprintln!(
        "chaos: disk-full: the daemon {}",
        if exited {
            "exited with code 6"
        } else {
            "kept running"
        }
    );
    Ok(1)
}

/// Write to `path` until the filesystem is full.
fn fill(path: &std::path::Path) -> Result<()> {
    use std::io::Write as _;
    let mut f = std::fs::File::create(path).context("create the filler")?;
    let chunk = vec![0x5a_u8; 1 << 20];
    loop {
        match f.write(&chunk) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(28) => return Ok(()),
            Err(e) => return Err(e).context("fill the disk"),
        }
    }
}

/// The slot's `confirmed_flush_lsn` must not be past the checkpoint in
/// RocksDB (read while the daemon is stopped).
async fn checkpoint_covers_slot(w: &World) -> Result<()> {
    let path = w.state_dir.join("checkpoint");
    let checkpoint =
        block_in_place(|| pgcdc_actors::checkpoint::CheckpointStore::open_read_only(&path)?.load())
            .context("read the checkpoint")?;
    let q = "SELECT (confirmed_flush_lsn - '0/0')::bigint FROM pg_replication_slots WHERE slot_name = 'pgcdc'";
    let confirmed: Option<i64> = w.db.query_one(q, &[]).await?.get(0);
    let confirmed = confirmed.unwrap_or(0) as u64;
    if confirmed > checkpoint.lsn.0 {
        bail!(
            "slot confirmed {confirmed:x} past the checkpoint {:x}",
            checkpoint.lsn.0
        );
    }
    Ok(())
}

/// What `checkpoint_fault` does to `state_dir/checkpoint`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Damage {
    /// Truncate the MANIFEST, garble CURRENT or overwrite the middle of an SST.
    Corrupt,
    /// Delete the directory.
    Delete,
}

/// Stop the daemon (SIGTERM or `kill -9`, alternating), damage the
/// checkpoint and start again. A deleted checkpoint is recovered from by
/// taking the slot over at its confirmed position (safe: the slot is
/// confirmed only after a synced checkpoint). A corrupt one must be refused
/// with exit code 6; then the operator's documented recovery (delete
/// `state_dir/checkpoint`) must bring the daemon back.
async fn checkpoint_fault(i: usize, rng: &mut Rng, w: &mut World, damage: Damage) -> Result<usize> {
    wait_sink_joined(w).await?;
    if i % 2 == 0 {
        let status = block_in_place(|| w.daemon.terminate(Duration::from_secs(60)))?;
        if status.code() != Some(0) {
            bail!("sigterm: exit code {:?}", status.code());
        }
    } else {
        w.daemon.kill9();
    }
    checkpoint_covers_slot(w).await?;
    let dir = w.state_dir.join("checkpoint");
    let takeovers = |w: &World| {
        w.daemon
            .log_text()
            .matches("taking over the existing slot")
            .count()
    };
    if damage == Damage::Corrupt {
        let what = block_in_place(|| corrupt(&dir, rng))?;
        w.daemon.spawn()?;
        let status = block_in_place(|| w.daemon.wait_exit(Duration::from_secs(60)))
            .with_context(|| format!("after {what}"))?;
        if status.code() != Some(6) {
            bail!("after {what}: exit code {:?}, want 6", status.code());
        }
    }
    let before = takeovers(w);
    std::fs::remove_dir_all(&dir).context("delete the checkpoint")?;
    w.daemon.spawn()?;
    wait_streaming(w).await?;
    if takeovers(w) <= before {
        bail!("no takeover warning after the checkpoint was deleted");
    }
    Ok(1)
}

/// Damage one RocksDB file of `dir` (seeded choice); what was done.
fn corrupt(dir: &std::path::Path, rng: &mut Rng) -> Result<String> {
    let mut files: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort();
    let named = |prefix: &str, suffix: &str| {
        files.iter().find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix) && n.ends_with(suffix))
        })
    };
    let sst = named("", ".sst");
    let choice = rng.below(if sst.is_some() { 3 } else { 2 });
    match (choice, sst) {
        (2, Some(sst)) => {
            let len = std::fs::metadata(sst)?.len();
            let mut bytes = std::fs::read(sst)?;
            let from = (len / 4) as usize;
            let to = (len * 3 / 4) as usize;
            bytes[from..to].fill(0xa5);
            std::fs::write(sst, bytes)?;
            Ok(format!("overwriting the middle of {}", sst.display()))
        }
        (1, _) => {
            std::fs::write(dir.join("CURRENT"), b"\x00garbage")?;
            Ok("garbling CURRENT".into())
        }
        _ => {
            let manifest = named("MANIFEST-", "").context("no MANIFEST")?;
            std::fs::OpenOptions::new()
                .write(true)
                .open(manifest)?
                .set_len(0)?;
            Ok(format!("truncating {}", manifest.display()))
        }
    }
}

/// Write some WAL the daemon never saw and advance the slot over it.
async fn advance_slot(w: &World) -> Result<()> {
    let confirmed = "SELECT (confirmed_flush_lsn - '0/0')::bigint FROM pg_replication_slots WHERE slot_name = 'pgcdc'";
    let before: i64 = w.db.query_one(confirmed, &[]).await?.get(0);
    w.db.batch_execute(
        "CREATE TABLE IF NOT EXISTS chaos_pad (x int); INSERT INTO chaos_pad VALUES (1)",
    )
    .await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r =
            w.db.execute(
                "SELECT pg_replication_slot_advance('pgcdc', pg_current_wal_lsn())",
                &[],
            )
            .await;
        match r {
            Ok(_) => break,
            Err(e) if Instant::now() >= deadline => return Err(e).context("advance the slot"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    let after: i64 = w.db.query_one(confirmed, &[]).await?.get(0);
    if after <= before {
        bail!("the slot did not advance ({before:x} -> {after:x})");
    }
    Ok(())
}

/// Wait (60 s at most) until the running ES sink has joined its group:
/// until the group's committed offsets grow past what they were at the call
/// (the workload keeps writing while faults fire, and only the live
/// incarnation commits). tansu 0.6 mishandles a static member that stops
/// during its first join and comes back with the same `group.instance.id`:
/// the new incarnation is assigned one of the three partitions and the
/// others stay unconsumed (replay without this wait: `pgcdc chaos --seed 7
/// --scenarios checkpoint-missing --kills 1 --duration-secs 5`, the mirror
/// stuck at a third of the rows). Checking only that the index holds
/// documents is not enough: a previous incarnation may have written them
/// (seen with `--seed 7 --scenarios panic --kills 2`, two restarts seconds
/// apart).
async fn wait_sink_joined(w: &World) -> Result<()> {
    let brokers = w.tansu.brokers();
    let committed = || {
        block_in_place(|| oracle::sink_offsets(&brokers))
            .map(|o| o.iter().map(|&o| o.max(0)).sum::<i64>())
    };
    let before = committed()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while committed()? <= before {
        if Instant::now() >= deadline {
            bail!("the es sink committed nothing within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}
