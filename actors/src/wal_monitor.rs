//! WAL safety: how much WAL the slot keeps on the server (metric, and a
//! warning over budget), and heartbeats so an idle published database does not
//! pin WAL forever (`pg_logical_emit_message(false, 'pgcdc.heartbeat', …)`:
//! the stream sees it, and the position it confirms moves on).
//!
//! [`WalMonitorActor`] is supervised like the other actors: its loop runs in
//! a task, and a panic there is a crash that restarts it (within the restart
//! budget) instead of silently ending heartbeats. A failed check is advice,
//! never on the data path: it is logged and retried at the next interval,
//! without spending the restart budget (an unreachable PostgreSQL is the
//! replication actor's to report).

use crate::error::ConfigError;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use serde::Deserialize;

use crate::metrics::metrics;
use crate::pg::{PgError, PostgresConfig};
use crate::supervision::{spawn_after_backoff, task_outcome, RestartBudget};

/// How often the over-budget warning is repeated while the slot stays over
/// budget: often enough to be seen, rarely enough not to flood the log.
const WARN_REMIND_EVERY: Duration = Duration::from_secs(300);
/// Default retained-WAL budget (4 GiB): far above a healthy slot's backlog,
/// well below a typical WAL volume's size.
const DEFAULT_BUDGET_BYTES: u64 = 4 << 30;
/// Default seconds between retained-WAL checks.
const DEFAULT_CHECK_INTERVAL_SECS: u64 = 30;
/// Default seconds between heartbeats: an idle database's slot moves on
/// about once a minute.
const DEFAULT_HEARTBEAT_SECS: u64 = 60;
/// Longest allowed check interval (an hour): a slower check would notice a
/// filling disk too late.
const CHECK_INTERVAL_MAX_SECS: u64 = 3600;
/// Longest allowed heartbeat interval (a day).
const HEARTBEAT_MAX_SECS: u64 = 86_400;

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
            budget_bytes: DEFAULT_BUDGET_BYTES,
            check_interval_secs: DEFAULT_CHECK_INTERVAL_SECS,
            heartbeat_secs: DEFAULT_HEARTBEAT_SECS,
        }
    }
}

impl WalConfig {
    /// Every invalid field, by path.
    pub fn validate(&self, errors: &mut Vec<ConfigError>) {
        if self.budget_bytes == 0 {
            errors.push(ConfigError::new("wal.budget_bytes", "must be at least 1"));
        }
        if !(1..=CHECK_INTERVAL_MAX_SECS).contains(&self.check_interval_secs) {
            errors.push(ConfigError::new(
                "wal.check_interval_secs",
                format!("must be between 1 and {CHECK_INTERVAL_MAX_SECS}"),
            ));
        }
        if self.heartbeat_secs > HEARTBEAT_MAX_SECS {
            errors.push(ConfigError::new(
                "wal.heartbeat_secs",
                format!("must be at most {HEARTBEAT_MAX_SECS} (0 disables)"),
            ));
        }
    }
}

/// The WAL monitor (supervised): checks retained WAL and writes heartbeats.
pub struct WalMonitorActor {
    /// The `[postgres]` section.
    pg: Arc<PostgresConfig>,
    /// The `[wal]` section.
    cfg: WalConfig,
    /// Restarts so far and the backoff before the next start.
    budget: RestartBudget,
    /// The running loop, aborted before a restart starts another.
    task: Option<tokio::task::AbortHandle>,
}

impl WalMonitorActor {
    /// A monitor of `pg`'s slot with the `[wal]` settings `cfg`.
    pub fn new(pg: Arc<PostgresConfig>, cfg: WalConfig, budget: RestartBudget) -> Self {
        Self {
            pg,
            cfg,
            budget,
            task: None,
        }
    }
}

impl Actor for WalMonitorActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let handle = spawn_after_backoff(&self.budget, run(self.pg.clone(), self.cfg.clone()));
        self.task = Some(handle.abort_handle());
        ctx.spawn(handle.into_actor(self).map(|res, _act, ctx| {
            if task_outcome("wal_monitor", res).is_err() {
                ctx.stop();
            }
        }));
    }
}

impl Supervised for WalMonitorActor {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        self.budget.record();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// What the loop remembers between checks; fresh on every (re)start.
struct Watch {
    /// The slot was over budget at the last check.
    over: bool,
    /// When the over-budget warning was last logged.
    last_warn: Option<Instant>,
    /// When the last heartbeat was written (or the loop started).
    last_beat: Instant,
}

/// Check retained WAL and write heartbeats until aborted; failed checks are
/// logged and retried (this is advice, never on the data path).
async fn run(pg: Arc<PostgresConfig>, cfg: WalConfig) -> Result<(), Infallible> {
    let mut watch = Watch {
        over: false,
        last_warn: None,
        last_beat: Instant::now(),
    };
    loop {
        // Tests panic here to prove a crash restarts the loop.
        fail::fail_point!(crate::wire::failpoint::WAL_MONITOR_PASS);
        match check(&pg, &cfg, &mut watch.last_beat).await {
            Ok(retained) => report(&pg, &cfg, &mut watch, retained),
            Err(e) => tracing::warn!(error = %e, "WAL check failed; retrying"),
        }
        tokio::time::sleep(Duration::from_secs(cfg.check_interval_secs)).await;
    }
}

/// Publish the retained WAL and warn (and remind) while it is over budget.
fn report(pg: &PostgresConfig, cfg: &WalConfig, watch: &mut Watch, retained: u64) {
    metrics().slot_retained_wal.set(retained as i64);
    let now_over = retained > cfg.budget_bytes;
    metrics().wal_over_budget.set(i64::from(now_over));
    let remind = watch
        .last_warn
        .is_none_or(|t| t.elapsed() >= WARN_REMIND_EVERY);
    if now_over && (!watch.over || remind) {
        tracing::warn!(
            slot = %pg.slot,
            retained_bytes = retained,
            budget_bytes = cfg.budget_bytes,
            "replication slot retains more WAL than wal.budget_bytes: pgcdc is behind or stopped; the server's disk fills up if this goes on"
        );
        watch.last_warn = Some(Instant::now());
    } else if watch.over && !now_over {
        tracing::info!(slot = %pg.slot, retained_bytes = retained, "retained WAL back under budget");
    }
    watch.over = now_over;
}

/// Write a heartbeat if one is due, then read how much WAL the slot retains.
async fn check(
    pg: &PostgresConfig,
    cfg: &WalConfig,
    last_beat: &mut Instant,
) -> Result<u64, PgError> {
    let sql = crate::pg::connect(pg).await?;
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

#[cfg(test)]
#[cfg(feature = "failpoints")]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::supervision::SupervisionConfig;

    /// A `[postgres]` section pointing at a port nothing listens on.
    fn unreachable_pg() -> Arc<PostgresConfig> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap();
        Arc::new(PostgresConfig {
            host: "127.0.0.1".into(),
            port,
            connect_timeout_secs: 1,
            ..PostgresConfig::default()
        })
    }

    #[actix_rt::test]
    async fn a_panic_in_the_loop_restarts_the_monitor() {
        let name = crate::wire::failpoint::WAL_MONITOR_PASS;
        let passes = Arc::new(AtomicUsize::new(0));
        let counted = passes.clone();
        fail::cfg_callback(name, move || {
            if counted.fetch_add(1, Ordering::SeqCst) == 0 {
                panic!("injected wal monitor panic");
            }
        })
        .unwrap();
        let budget = RestartBudget::new(
            "wal_monitor",
            SupervisionConfig {
                max_restarts: 5,
                window_secs: 60,
                backoff_initial_ms: 1,
                backoff_max_ms: 1,
            },
        );
        let cfg = WalConfig {
            check_interval_secs: 3600,
            ..WalConfig::default()
        };
        let (pg, b) = (unreachable_pg(), budget.clone());
        let _monitor = Supervisor::start(move |_| WalMonitorActor::new(pg, cfg, b));
        let deadline = Instant::now() + Duration::from_secs(20);
        while passes.load(Ordering::SeqCst) < 2 {
            assert!(
                Instant::now() < deadline,
                "the loop did not run again after its panic"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        fail::remove(name);
        assert_eq!(budget.recent(), 1, "the panic counts as one restart");
        assert_eq!(passes.load(Ordering::SeqCst), 2, "one pass per (re)start");
    }
}
