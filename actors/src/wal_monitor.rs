//! WAL safety: how much WAL the slot keeps on the server (metric, and a
//! warning over budget), and heartbeats so an idle published database does not
//! pin WAL forever (`pg_logical_emit_message(false, 'pgcdc.heartbeat', …)`:
//! the stream sees it, and the position it confirms moves on).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::metrics::metrics;
use crate::replication::{slot, PostgresConfig, ReplicationError};

/// Prefix of heartbeat messages (ignored by the stream apart from their position).
pub const HEARTBEAT_PREFIX: &str = crate::wire::message::HEARTBEAT;

/// `[wal]` configuration section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WalConfig {
    /// Warn (log and metric) when the slot retains more WAL than this.
    pub budget_bytes: u64,
    /// Seconds between retained-WAL checks.
    pub check_interval_secs: u64,
    /// Seconds between heartbeat messages; 0 disables them.
    pub heartbeat_secs: u64,
}

impl Default for WalConfig {
    fn default() -> Self {
        Self {
            budget_bytes: 4 << 30,
            check_interval_secs: 30,
            heartbeat_secs: 60,
        }
    }
}

impl WalConfig {
    /// Every invalid field, by path.
    pub fn validate(&self, errors: &mut Vec<String>) {
        if self.budget_bytes == 0 {
            errors.push("wal.budget_bytes: must be at least 1".into());
        }
        if !(1..=3600).contains(&self.check_interval_secs) {
            errors.push("wal.check_interval_secs: must be between 1 and 3600".into());
        }
        if self.heartbeat_secs > 86_400 {
            errors.push("wal.heartbeat_secs: must be at most 86400 (0 disables)".into());
        }
    }
}

/// Check retained WAL and write heartbeats until the process ends; failures
/// are logged and retried (this is advice, never on the data path).
pub async fn run(pg: Arc<PostgresConfig>, cfg: WalConfig) {
    let mut over = false;
    let mut last_warn: Option<Instant> = None;
    let mut last_beat = Instant::now();
    loop {
        match check(&pg, &cfg, &mut last_beat).await {
            Ok(retained) => {
                metrics().slot_retained_wal.set(retained as i64);
                let now_over = retained > cfg.budget_bytes;
                metrics().wal_over_budget.set(i64::from(now_over));
                let remind = last_warn.is_none_or(|t| t.elapsed() >= Duration::from_secs(300));
                if now_over && (!over || remind) {
                    tracing::warn!(
                        slot = %pg.slot,
                        retained_bytes = retained,
                        budget_bytes = cfg.budget_bytes,
                        "replication slot retains more WAL than wal.budget_bytes: pgcdc is behind or stopped; the server's disk fills up if this goes on"
                    );
                    last_warn = Some(Instant::now());
                } else if over && !now_over {
                    tracing::info!(slot = %pg.slot, retained_bytes = retained, "retained WAL back under budget");
                }
                over = now_over;
            }
            Err(e) => tracing::warn!(error = %e, "WAL check failed; retrying"),
        }
        tokio::time::sleep(Duration::from_secs(cfg.check_interval_secs)).await;
    }
}

async fn check(
    pg: &PostgresConfig,
    cfg: &WalConfig,
    last_beat: &mut Instant,
) -> Result<u64, ReplicationError> {
    let sql = slot::connect(pg).await?;
    if cfg.heartbeat_secs > 0 && last_beat.elapsed() >= Duration::from_secs(cfg.heartbeat_secs) {
        sql.execute(
            "SELECT pg_logical_emit_message(false, $1, now()::text)",
            &[&HEARTBEAT_PREFIX],
        )
        .await?;
        metrics().heartbeats.inc();
        *last_beat = Instant::now();
    }
    let row = sql
        .query_opt(
            "SELECT COALESCE(pg_current_wal_lsn() - restart_lsn, 0)::bigint \
               FROM pg_replication_slots WHERE slot_name = $1",
            &[&pg.slot],
        )
        .await?;
    Ok(row.map_or(0, |r| r.get::<_, i64>(0).max(0) as u64))
}
