//! The faults of each scenario, injected at seeded random times while the
//! workload runs, and the checks some scenarios add after the clean stop.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::task::block_in_place;

use super::{wait_streaming, ChaosOptions, Rng, World};

/// Failpoints the `panic` scenario arms, one per restart.
const FAILPOINTS: [&str; 3] = [
    "producer-after-ack=1*panic",
    "checkpoint-before-confirm=1*panic",
    "replication-publish=1*panic",
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
        "slot-dropped" => 0,
        "panic" => opts.kills.max(1),
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
            other => bail!("no faults for scenario {other}"),
        };
    }
    tokio::time::sleep((start + duration).saturating_duration_since(Instant::now())).await;
    Ok(injected)
}

async fn kill9(rng: &mut Rng, w: &mut World) -> Result<usize> {
    w.daemon.kill9();
    tokio::time::sleep(Duration::from_millis(rng.below(500))).await;
    w.daemon.spawn()?;
    Ok(1)
}

/// SIGTERM (must exit 0), then start again with `FAILPOINTS` set.
async fn arm_failpoint(failpoint: &str, w: &mut World) -> Result<usize> {
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
    Ok(1)
}

async fn terminate_walsender(w: &mut World) -> Result<usize> {
    let q = "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_replication";
    let n: i64 = w.db.query_one(q, &[]).await?.get(0);
    Ok(n as usize)
}

/// Checks that need the daemon stopped: failpoints fired; a dropped slot is refused with exit 5.
/// Returns the faults injected here.
pub(crate) async fn after_stop(name: &str, injections: usize, w: &mut World) -> Result<usize> {
    match name {
        "panic" => {
            let fired = w.daemon.log_text().matches("panicked").count();
            if fired < injections {
                bail!("only {fired} of {injections} failpoints fired");
            }
        }
        "slot-dropped" => {
            drop_slot(w).await?;
            w.daemon.spawn()?;
            let status = block_in_place(|| w.daemon.wait_exit(Duration::from_secs(60)))?;
            if status.code() != Some(5) {
                bail!(
                    "restart without the slot: exit code {:?}, want 5",
                    status.code()
                );
            }
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
