//! The faults of each scenario, injected at seeded random times while the
//! workload runs, and the checks some scenarios add after the clean stop.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use pgcdc_actors::wire::failpoint;
use tokio::task::block_in_place;

use super::world::{wait_streaming, World, SLOT};
use super::{ChaosOptions, Rng, Scenario};
use crate::proxy::bulk::Fault;
use crate::wait;

/// How long the daemon gets to exit after SIGTERM, or to refuse a start.
const EXIT: Duration = Duration::from_secs(60);
/// How long a slot operation is retried while the walsender lets go of the slot.
const SLOT_BUSY: Duration = Duration::from_secs(10);
/// Pause between two attempts of a slot operation.
const SLOT_RETRY: Duration = Duration::from_millis(200);
/// The exit code of a slot that cannot be trusted (docs/operations).
const EXIT_SLOT: i32 = 5;
/// The exit code of a local I/O failure (docs/operations).
const EXIT_LOCAL_IO: i32 = 6;

/// What the sink logs when it starts filling a new generation.
const FILLING: &str = "filling a new index from PostgreSQL";

/// Failpoints the `panic` scenario arms, one per restart: after Kafka
/// acknowledged a batch (before the checkpoint), after the checkpoint
/// (before the confirm), after a batch was handed to the producer, after an
/// ES bulk was written (before the offsets are committed), and in the middle
/// of a backfill chunk (a backfill is requested with `pgcdc snapshot`).
const FAILPOINTS: [&str; 5] = [
    failpoint::PRODUCER_AFTER_ACK,
    failpoint::CHECKPOINT_BEFORE_CONFIRM,
    failpoint::REPLICATION_PUBLISH,
    failpoint::ES_AFTER_BULK,
    failpoint::SNAPSHOT_CHUNK,
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
    name: Scenario,
    rng: &mut Rng,
    opts: &ChaosOptions,
    w: &mut World,
) -> Result<usize> {
    let duration = Duration::from_secs(opts.duration_secs);
    use Scenario::*;
    let count = match name {
        SlotDropped | SlotAdvanced => 0,
        Panic | EsErrors | KafkaDown | DiskFull | SchemaChange => opts.kills.max(1),
        CheckpointCorrupt | CheckpointMissing | Proxy => opts.kills.max(1),
        Kill9 | PgRestart | WalsenderKill => opts.kills,
    };
    let start = Instant::now();
    let first_fp = rng.below(FAILPOINTS.len() as u64) as usize;
    let mut injected = 0;
    for (i, at) in schedule(rng, count, duration).into_iter().enumerate() {
        tokio::time::sleep((start + at).saturating_duration_since(Instant::now())).await;
        injected += match name {
            Kill9 => kill9(rng, w).await?,
            Panic => arm_failpoint(FAILPOINTS[(first_fp + i) % FAILPOINTS.len()], w).await?,
            PgRestart => {
                let mode = if i % 2 == 0 { "immediate" } else { "fast" };
                if let Some(s) = &w.slot {
                    s.restarted.store(true, Ordering::SeqCst);
                }
                block_in_place(|| w.pg.restart(mode))?;
                1
            }
            WalsenderKill => terminate_walsender(w).await?,
            Proxy => proxy_fault(rng, w).await?,
            EsErrors => arm_es_faults(rng, w)?,
            KafkaDown => kafka_down(rng, w).await?,
            DiskFull => disk_full(rng, w).await?,
            CheckpointCorrupt => checkpoint_fault(i, rng, w, Damage::Corrupt).await?,
            CheckpointMissing => checkpoint_fault(i, rng, w, Damage::Delete).await?,
            SchemaChange => schema_change(i, rng, w).await?,
            SlotDropped | SlotAdvanced => bail!("no faults for scenario {}", name.name()),
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

/// Arm the ES proxy with a burst of faults for the next bulk requests,
/// unless the last burst has not all fired yet: the sink retries one
/// request at a time with a growing pause (up to 10 s), so bursts queued
/// behind each other would outlast the time the oracle gives the mirror
/// (seen with `--seed 5152 --kills 5 --duration-secs 40`: 21 faults in a
/// row on one request, 2 minutes). They are counted when they fire (see
/// [`after_stop`]: the sink may be behind, so they can fire while the
/// mirror converges).
fn arm_es_faults(rng: &mut Rng, w: &mut World) -> Result<usize> {
    let (p, draw) = w.es_proxy.as_mut().context("no es proxy")?;
    let n = 2 + rng.below(4) as usize;
    let burst: Vec<Fault> = (0..n).map(|_| es_fault(draw)).collect();
    if p.pending() == 0 {
        p.push(burst);
    }
    Ok(0)
}

/// One `_bulk` fault: 429 or 500 for the whole request, a dropped
/// connection, or every 2nd–4th item failing with 429 or 503.
fn es_fault(rng: &mut Rng) -> Fault {
    match rng.below(4) {
        0 => Fault::Reject(429),
        1 => Fault::Reject(500),
        2 => Fault::Drop,
        _ => Fault::Partial {
            every: 2 + rng.below(3) as usize,
            status: if rng.below(2) == 0 { 429 } else { 503 },
        },
    }
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
    w.broker.signal("STOP")?;
    tokio::time::sleep(Duration::from_millis(2000 + rng.below(4000))).await;
    w.broker.signal("CONT")?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    Ok(1)
}

/// The `i`th schema change, in turns: a column added with a default (older
/// documents lack a value their rows hold: a new generation filled from
/// PostgreSQL), a nullable column added (a mapping), the first one's type
/// changed from integer to text, rewriting every row without a change in
/// the WAL, the second one renamed, the first one dropped (each of the last
/// three a new generation). Then kill -9 within 3 s, often while the fill
/// runs, and start again.
async fn schema_change(i: usize, rng: &mut Rng, w: &mut World) -> Result<usize> {
    let t = "ALTER TABLE chaos_items";
    let (d, a) = (format!("d{}", i - i % 5), format!("a{}", i - i % 5));
    let ddl = match i % 5 {
        0 => format!("{t} ADD COLUMN {d} int NOT NULL DEFAULT {i}"),
        1 => format!("{t} ADD COLUMN {a} text"),
        2 => format!("{t} ALTER COLUMN {d} TYPE text USING 'was ' || {d}"),
        3 => format!("{t} RENAME COLUMN {a} TO r{a}"),
        _ => format!("{t} DROP COLUMN {d}"),
    };
    w.db.batch_execute(&ddl).await?;
    tokio::time::sleep(Duration::from_millis(rng.below(3000))).await;
    kill9(rng, w).await
}

/// `kill -9`, then start again within half a second.
async fn kill9(rng: &mut Rng, w: &mut World) -> Result<usize> {
    w.daemon.kill9();
    tokio::time::sleep(Duration::from_millis(rng.below(500))).await;
    w.daemon.spawn()?;
    Ok(1)
}

/// SIGTERM (must exit 0), then start again with `FAILPOINTS` set.
async fn arm_failpoint(name: &str, w: &mut World) -> Result<usize> {
    let status = block_in_place(|| w.daemon.terminate(EXIT))?;
    if status.code() != Some(0) {
        bail!(
            "sigterm before arming {name}: exit code {:?}",
            status.code()
        );
    }
    w.daemon
        .set_env("FAILPOINTS", Some(&format!("{name}=1*panic")));
    w.daemon.spawn()?;
    wait_streaming(w).await?;
    if name == failpoint::SNAPSHOT_CHUNK {
        let out = block_in_place(|| w.daemon.run(&["snapshot", "--table", "public.chaos_items"]))?;
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
    let status = block_in_place(|| w.daemon.wait_exit(EXIT))?;
    if status.code() != Some(EXIT_SLOT) {
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
pub(crate) async fn after_stop(name: Scenario, injections: usize, w: &mut World) -> Result<usize> {
    match name {
        Scenario::Panic => {
            let fired = w.daemon.log_text().matches("panicked").count();
            if fired < injections {
                bail!("only {fired} of {injections} failpoints fired");
            }
        }
        Scenario::Proxy if injections == 0 => bail!("no fault fired"),
        Scenario::SchemaChange if !w.daemon.log_text().contains(FILLING) => {
            bail!("the sink never filled a new index after a schema change")
        }
        Scenario::EsErrors => {
            let fired = w.es_proxy.as_ref().map_or(0, |(p, _)| p.fired());
            if fired == 0 {
                bail!("no es fault fired");
            }
            return Ok(fired);
        }
        Scenario::SlotAdvanced => {
            advance_slot(w).await?;
            restart_refused(w, "restart with the slot advanced past the checkpoint")?;
            return Ok(1);
        }
        Scenario::SlotDropped => {
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
    wait::retry("the slot to be dropped", SLOT_BUSY, SLOT_RETRY, || {
        w.db.execute("SELECT pg_drop_replication_slot($1)", &[&SLOT])
    })
    .await?;
    Ok(())
}

/// Fill `state_dir`'s filesystem for a few seconds while the workload runs.
/// The daemon must either keep going or exit with code 6 (local I/O); the
/// slot must not be confirmed past the checkpoint; after the space is freed
/// (and a restart, if it exited) it streams on.
async fn disk_full(rng: &mut Rng, w: &mut World) -> Result<usize> {
    let filler = w.state_dir.join("chaos-filler");
    block_in_place(|| fill(&filler))?;
    let held = Duration::from_millis(3000 + rng.below(4000));
    // Hold the disk full for `held`, unless the daemon exits first (then the wait ends early).
    let _ = wait::until("pgcdc to exit on a full disk", held, || async {
        !w.daemon.is_running()
    })
    .await;
    std::fs::remove_file(&filler).context("remove the filler")?;
    if w.daemon.is_running() {
        // A write that failed just before the space came back may still be
        // stopping the daemon. It kept running once the slot is confirmed
        // past the WAL written now: a checkpoint written since.
        let now = "SELECT (pg_current_wal_lsn() - '0/0')::bigint";
        let now = w.db.query_one(now, &[]).await?.get::<_, i64>(0) as u64;
        let seen = std::sync::Mutex::new(String::new());
        wait::until(
            "pgcdc to exit or confirm the slot past the freed disk",
            Duration::from_secs(60),
            || async {
                let confirmed = crate::pg::confirmed_flush(&w.db, SLOT).await;
                *crate::lock(&seen) = format!("{confirmed:x?}");
                !w.daemon.is_running() || confirmed.ok().flatten().unwrap_or(0) > now
            },
        )
        .await
        .with_context(|| {
            format!(
                "WAL written was at {now:x}, the slot confirmed {}",
                crate::lock(&seen)
            )
        })?;
    }
    let exited = !w.daemon.is_running();
    if exited {
        let status = block_in_place(|| w.daemon.wait_exit(Duration::from_secs(5)))?;
        if status.code() != Some(EXIT_LOCAL_IO) {
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
    let confirmed = crate::pg::confirmed_flush(&w.db, SLOT).await?.unwrap_or(0);
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
    if i % 2 == 0 {
        let status = block_in_place(|| w.daemon.terminate(EXIT))?;
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
        let status =
            block_in_place(|| w.daemon.wait_exit(EXIT)).with_context(|| format!("after {what}"))?;
        if status.code() != Some(EXIT_LOCAL_IO) {
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
    let confirmed = || crate::pg::confirmed_flush(&w.db, SLOT);
    let before = confirmed().await?.unwrap_or(0);
    w.db.batch_execute(
        "CREATE TABLE IF NOT EXISTS chaos_pad (x int); INSERT INTO chaos_pad VALUES (1)",
    )
    .await?;
    let advance = "SELECT pg_replication_slot_advance($1, pg_current_wal_lsn())";
    wait::retry("the slot to advance", SLOT_BUSY, SLOT_RETRY, || {
        w.db.execute(advance, &[&SLOT])
    })
    .await?;
    let after = confirmed().await?.unwrap_or(0);
    if after <= before {
        bail!("the slot did not advance ({before:x} -> {after:x})");
    }
    Ok(())
}
