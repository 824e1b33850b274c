//! Restart budget and backoff shared by the supervised actors.
//!
//! actix's `Supervisor` restarts a stopped actor with the same value; each
//! actor calls [`RestartBudget::record`] from `restarting()` and waits
//! [`RestartBudget::backoff`] before starting its work again. More than
//! `max_restarts` in `window` escalates to a fatal report (exit code 7), so a
//! crash loop ends in a documented exit code instead of spinning forever.
//!
//! The budget also carries the process's [`FatalReporter`]: an actor reports
//! its fatal conditions through [`RestartBudget::fatal`], and once anything was
//! reported no supervised work starts again.

use crate::error::ConfigError;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::error::{ExitCode, FatalReporter};

/// `[supervision]`: how often actors may restart before pgcdc gives up.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SupervisionConfig {
    /// Restarts of one actor allowed within `window_secs` before the process exits (code 7).
    pub max_restarts: u32,
    /// Length of the restart window, in seconds.
    pub window_secs: u64,
    /// First restart delay, in milliseconds; doubles with each recent restart.
    pub backoff_initial_ms: u64,
    /// Largest restart delay, in milliseconds.
    pub backoff_max_ms: u64,
}

impl Default for SupervisionConfig {
    fn default() -> Self {
        Self {
            max_restarts: 10,
            window_secs: 60,
            backoff_initial_ms: 200,
            backoff_max_ms: 10_000,
        }
    }
}

impl SupervisionConfig {
    /// Every invalid field, by path.
    pub fn validate(&self, errors: &mut Vec<ConfigError>) {
        if self.max_restarts == 0 {
            errors.push(ConfigError::new(
                "supervision.max_restarts",
                "must be at least 1",
            ));
        }
        if self.window_secs == 0 {
            errors.push(ConfigError::new(
                "supervision.window_secs",
                "must be at least 1",
            ));
        }
        if self.backoff_initial_ms > self.backoff_max_ms {
            errors.push(ConfigError::new(
                "supervision.backoff_initial_ms",
                "must not exceed backoff_max_ms",
            ));
        }
    }
}

/// Restart history of one actor, and where it reports fatal conditions.
#[derive(Debug, Clone)]
pub struct RestartBudget {
    actor: &'static str,
    config: SupervisionConfig,
    history: Arc<Mutex<VecDeque<Instant>>>,
    fatal: FatalReporter,
}

impl RestartBudget {
    /// A fresh budget for the actor named `actor`, reporting fatal conditions
    /// nowhere but the log until [`RestartBudget::reporting_to`] is called.
    pub fn new(actor: &'static str, config: SupervisionConfig) -> Self {
        Self {
            actor,
            config,
            history: Arc::default(),
            fatal: FatalReporter::detached(),
        }
    }

    /// The same budget, reporting fatal conditions (its own and its actor's) to `fatal`.
    pub fn reporting_to(self, fatal: FatalReporter) -> Self {
        Self { fatal, ..self }
    }

    /// Report that the actor cannot continue; the caller stops its work.
    pub fn fatal(&self, code: ExitCode, what: &str, error: &dyn std::fmt::Display) {
        self.fatal.report(code, what, error);
    }

    /// Whether a fatal condition was reported anywhere: no work should start.
    pub fn is_stopping(&self) -> bool {
        self.fatal.is_reported()
    }

    /// Count one restart now. Over the budget it reports a fatal
    /// `RestartBudget` condition and returns `false`: do not restart.
    pub fn record(&self) -> bool {
        let restarts = self.record_at(Instant::now());
        crate::metrics::metrics()
            .restarts
            .with_label_values(&[self.actor])
            .inc();
        tracing::warn!(actor = self.actor, restarts, "actor restarting");
        if restarts > self.config.max_restarts as usize {
            let msg = format!(
                "{} restarts within {}s (max {})",
                restarts, self.config.window_secs, self.config.max_restarts
            );
            self.fatal(
                ExitCode::RestartBudget,
                &format!("{} keeps crashing", self.actor),
                &msg,
            );
            return false;
        }
        !self.is_stopping()
    }

    /// Record a restart at `now`; returns how many fall in the window.
    fn record_at(&self, now: Instant) -> usize {
        let window = Duration::from_secs(self.config.window_secs);
        let mut history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        history.push_back(now);
        while history
            .front()
            .is_some_and(|t| now.duration_since(*t) > window)
        {
            history.pop_front();
        }
        history.len()
    }

    /// Delay before the next start: zero before any restart, then doubling.
    pub fn backoff(&self) -> Duration {
        let recent = self.history.lock().unwrap_or_else(|e| e.into_inner()).len();
        if recent == 0 {
            return Duration::ZERO;
        }
        let exp = (recent - 1).min(16) as u32;
        let ms = self.config.backoff_initial_ms.saturating_mul(1 << exp);
        Duration::from_millis(ms.min(self.config.backoff_max_ms))
    }

    /// Restarts allowed in one window.
    pub fn limit(&self) -> usize {
        self.config.max_restarts as usize
    }

    /// Number of restarts recorded in the current window.
    pub fn recent(&self) -> usize {
        self.history.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// Run an actor's work in its own task after the restart backoff, so a panic
/// in it surfaces as a `JoinError` (a crash) instead of unwinding the actor.
/// Once a fatal condition was reported the work never starts: the process is
/// stopping.
pub fn spawn_after_backoff<E: 'static>(
    budget: &RestartBudget,
    work: impl std::future::Future<Output = Result<(), E>> + 'static,
) -> tokio::task::JoinHandle<Result<(), E>> {
    spawn_unless(budget, std::future::pending(), work)
}

/// [`spawn_after_backoff`], except that `stop` turning true during the
/// backoff ends the task at once (`Ok`) without starting the work: a
/// shutdown does not wait out the backoff and one more failing attempt.
pub fn spawn_after_backoff_or_stop<E: 'static>(
    budget: &RestartBudget,
    mut stop: tokio::sync::watch::Receiver<bool>,
    work: impl std::future::Future<Output = Result<(), E>> + 'static,
) -> tokio::task::JoinHandle<Result<(), E>> {
    let stopped = async move {
        if stop.wait_for(|stop| *stop).await.is_err() {
            // No one can ask for a stop any more: only the backoff ends the wait.
            std::future::pending::<()>().await;
        }
    };
    spawn_unless(budget, stopped, work)
}

/// The work after the backoff, unless `stopped` completes first.
fn spawn_unless<E: 'static>(
    budget: &RestartBudget,
    stopped: impl std::future::Future<Output = ()> + 'static,
    work: impl std::future::Future<Output = Result<(), E>> + 'static,
) -> tokio::task::JoinHandle<Result<(), E>> {
    let backoff = budget.backoff();
    let budget = budget.clone();
    actix::spawn(async move {
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = stopped => {
                tracing::debug!(actor = budget.actor, "not restarting: stopped during the backoff");
                return Ok(());
            }
        }
        if budget.is_stopping() {
            tracing::debug!(
                actor = budget.actor,
                "not restarting: the process is stopping"
            );
            std::future::pending::<()>().await;
        }
        work.await
    })
}

/// Why an actor's worker task ended badly.
#[derive(Debug)]
pub enum TaskError<E> {
    /// The work returned an error.
    Failed(E),
    /// The work panicked.
    Panicked(tokio::task::JoinError),
    /// The task was aborted.
    Cancelled(tokio::task::JoinError),
}

impl<E: std::fmt::Display> std::fmt::Display for TaskError<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TaskError::Failed(e) => e.fmt(f),
            TaskError::Panicked(j) => write!(f, "panicked: {j}"),
            TaskError::Cancelled(j) => write!(f, "was cancelled: {j}"),
        }
    }
}

impl<E: std::error::Error + 'static> std::error::Error for TaskError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TaskError::Failed(e) => Some(e),
            TaskError::Panicked(j) | TaskError::Cancelled(j) => Some(j),
        }
    }
}

/// Turn a finished worker task into "keep running" or "crash": a panic
/// (`JoinError`) counts as a crash exactly like an error, which actix alone does
/// not give us.
pub fn task_outcome<E: std::fmt::Display>(
    actor: &'static str,
    res: Result<Result<(), E>, tokio::task::JoinError>,
) -> Result<(), TaskError<E>> {
    match res {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => {
            tracing::error!(actor, error = %e, "actor work failed");
            Err(TaskError::Failed(e))
        }
        Err(join) if join.is_panic() => {
            tracing::error!(actor, error = %join, "actor work panicked");
            Err(TaskError::Panicked(join))
        }
        Err(join) => {
            tracing::error!(actor, error = %join, "actor work was cancelled");
            Err(TaskError::Cancelled(join))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget() -> RestartBudget {
        let config = SupervisionConfig {
            max_restarts: 3,
            window_secs: 10,
            backoff_initial_ms: 100,
            backoff_max_ms: 350,
        };
        RestartBudget::new("test", config)
    }

    #[test]
    fn old_restarts_leave_the_window() {
        let b = budget();
        let t0 = Instant::now();
        assert_eq!(b.record_at(t0), 1);
        assert_eq!(b.record_at(t0 + Duration::from_secs(5)), 2);
        assert_eq!(b.record_at(t0 + Duration::from_secs(11)), 2);
        assert_eq!(b.record_at(t0 + Duration::from_secs(30)), 1);
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let b = budget();
        assert_eq!(b.backoff(), Duration::ZERO);
        let t0 = Instant::now();
        b.record_at(t0);
        assert_eq!(b.backoff(), Duration::from_millis(100));
        b.record_at(t0);
        assert_eq!(b.backoff(), Duration::from_millis(200));
        b.record_at(t0);
        assert_eq!(b.backoff(), Duration::from_millis(350));
    }

    #[test]
    fn invalid_config_is_reported_by_path() {
        let mut errors = Vec::new();
        let c = SupervisionConfig {
            max_restarts: 0,
            window_secs: 0,
            backoff_initial_ms: 5,
            backoff_max_ms: 1,
        };
        c.validate(&mut errors);
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert_eq!(errors[0].key, "supervision.max_restarts");
    }

    #[tokio::test]
    async fn panics_count_as_crashes() {
        let res = tokio::spawn(async { panic!("boom") }).await;
        let res: Result<Result<(), String>, _> = res.map(|()| Ok(()));
        let err = task_outcome("t", res).unwrap_err();
        assert!(matches!(err, TaskError::Panicked(_)), "{err}");
        assert!(err.to_string().starts_with("panicked"));
        let ok: Result<Result<(), String>, tokio::task::JoinError> = Ok(Ok(()));
        assert!(task_outcome("t", ok).is_ok());
        let failed: Result<Result<(), String>, tokio::task::JoinError> = Ok(Err("x".into()));
        assert!(matches!(task_outcome("t", failed), Err(TaskError::Failed(e)) if e == "x"));
    }

    #[tokio::test]
    async fn a_spent_budget_reports_a_restart_budget_fatal() {
        let (reporter, mut rx) = FatalReporter::channel();
        let b = budget().reporting_to(reporter);
        for _ in 0..3 {
            assert!(b.record(), "within the budget");
        }
        assert_eq!(rx.try_recv(), None);
        assert!(!b.record(), "the fourth restart is over the budget");
        let fatal = rx.recv().await.expect("a fatal report");
        assert_eq!(fatal.code, ExitCode::RestartBudget);
        assert_eq!(fatal.code.code(), 7);
        assert_eq!(fatal.what, "test keeps crashing");
        assert!(b.is_stopping());
    }

    #[actix::test]
    async fn a_stop_during_the_backoff_ends_the_task_without_the_work() {
        let b = budget();
        b.record_at(Instant::now());
        b.record_at(Instant::now());
        assert_eq!(b.backoff(), Duration::from_millis(200));
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let started = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = started.clone();
        let handle = spawn_after_backoff_or_stop(&b, stop_rx, async move {
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
            Ok::<(), String>(())
        });
        let _ = stop_tx.send(true);
        let ended = handle.await.expect("the task ends");
        assert_eq!(ended, Ok(()));
        assert!(
            !started.load(std::sync::atomic::Ordering::SeqCst),
            "the work must not start after a stop"
        );
    }

    #[actix::test]
    async fn without_a_stop_the_work_runs_after_the_backoff() {
        let b = budget();
        b.record_at(Instant::now());
        let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let handle = spawn_after_backoff_or_stop(&b, stop_rx, async { Err::<(), _>("ran") });
        assert_eq!(handle.await.expect("the task ends"), Err("ran"));
    }

    #[actix::test]
    async fn no_work_starts_once_the_process_is_stopping() {
        let (reporter, _rx) = FatalReporter::channel();
        let b = budget().reporting_to(reporter);
        b.fatal(ExitCode::LocalIo, "disk", &"gone");
        let started = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = started.clone();
        let handle = spawn_after_backoff(&b, async move {
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
            Ok::<(), String>(())
        });
        // A started task would finish at once; this one must still be parked.
        let waited = tokio::time::timeout(Duration::from_millis(200), handle).await;
        assert!(waited.is_err(), "the work must not run");
        assert!(!started.load(std::sync::atomic::Ordering::SeqCst));
    }
}
