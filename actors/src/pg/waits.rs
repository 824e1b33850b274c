//! Naming the PostgreSQL sessions that keep pgcdc waiting.
//!
//! Creating a slot waits until every transaction that holds a transaction ID
//! when it starts has ended (an `idle in transaction` session can hold one for
//! hours); a copy waits for a table lock that an `ALTER TABLE`, `LOCK TABLE`
//! or `VACUUM FULL` holds or queues for. PostgreSQL tells the waiting client
//! nothing, so a first start or a backfill would hang without a word.
//! [`reported`] runs such work and, once it has lasted [`LOOK_AFTER`], looks
//! every [`LOOK_EVERY`] for pgcdc sessions waiting on a lock and the sessions
//! that block them (`pg_blocking_pids`). It logs them at once when they
//! change and every [`REPEAT_EVERY`] while they last, counts them in
//! `pgcdc_postgres_blocking_sessions` and gives them as `/ready`'s reason while
//! the process is not ready. Only who blocks is logged (pid, role,
//! application, client, state, transaction age), never a session's query,
//! which can hold row values.

use std::future::Future;
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::{PgError, PostgresConfig};
use crate::metrics::metrics;

/// How long work runs before the first look: most creations and copies
/// wait for nothing, and open a connection for nothing then.
pub const LOOK_AFTER: Duration = Duration::from_secs(5);
/// How often to look while the work lasts.
pub const LOOK_EVERY: Duration = Duration::from_secs(5);
/// How often an unchanged set of blocking sessions is logged again.
pub const REPEAT_EVERY: Duration = Duration::from_secs(60);
/// Longest a look may take (connecting included), so a PostgreSQL that does
/// not answer does not hold the work up.
const LOOK_TIMEOUT: Duration = Duration::from_secs(5);

/// A session that blocks one of pgcdc's sessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocker {
    /// Its backend's process ID (for `pg_terminate_backend`).
    pub pid: i32,
    /// Its role, application and client address, where visible.
    pub who: String,
    /// `idle in transaction`, `active`, …; empty where not visible.
    pub state: String,
    /// Seconds since its transaction began, if it is in one.
    pub xact_secs: Option<i64>,
    /// What pgcdc's session waits for (`transactionid`: the transaction to
    /// end; `relation`: a table lock); empty if none waits yet.
    pub waited: String,
}

impl std::fmt::Display for Blocker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} ({}", self.pid, self.who)?;
        if !self.state.is_empty() {
            write!(f, ", {}", self.state)?;
        }
        if let Some(secs) = self.xact_secs {
            write!(f, ", transaction open {secs} s")?;
        }
        match self.waited.as_str() {
            "" => write!(f, ")"),
            "transactionid" => write!(f, "; pgcdc waits for its transaction to end)"),
            "relation" => write!(f, "; pgcdc waits for a table lock)"),
            other => write!(f, "; pgcdc waits for a {other} lock)"),
        }
    }
}

/// The sessions that block pgcdc's sessions in this database: those that
/// hold or queue ahead for a lock a pgcdc session waits for.
pub async fn blockers(sql: &Client) -> Result<Vec<Blocker>, PgError> {
    let rows = sql
        .query(
            &format!(
                "SELECT DISTINCT ON (b.pid) {WHO}, coalesce(w.wait_event, '') \
               FROM pg_stat_activity w \
               CROSS JOIN LATERAL unnest(pg_blocking_pids(w.pid)) AS blocking(pid) \
               JOIN pg_stat_activity b ON b.pid = blocking.pid \
              WHERE w.application_name = $1 AND w.wait_event_type = 'Lock' \
                AND w.datname = current_database() AND w.pid <> pg_backend_pid() \
              ORDER BY b.pid"
            ),
            &[&super::connect::APPLICATION_NAME],
        )
        .await?;
    Ok(rows.iter().map(|r| blocker(r, r.get(4))).collect())
}

/// The columns [`blocker`] reads, of `pg_stat_activity b`.
const WHO: &str = "b.pid, \
     concat_ws(' ', coalesce(b.usename::text, '?'), 'via ' || nullif(b.application_name, ''), \
               'from ' || host(b.client_addr)), \
     coalesce(b.state, ''), extract(epoch FROM now() - b.xact_start)::bigint";

/// A [`WHO`] row as the session blocking a wait for `waited`.
fn blocker(r: &tokio_postgres::Row, waited: String) -> Blocker {
    Blocker {
        pid: r.get(0),
        who: r.get(1),
        state: r.get(2),
        xact_secs: r.get(3),
        waited,
    }
}

/// The sessions (of any database) whose transaction holds a transaction ID:
/// creating a logical slot waits until each has ended.
pub async fn transactions_holding_ids(sql: &Client) -> Result<Vec<Blocker>, PgError> {
    let rows = sql
        .query(
            &format!(
                "SELECT {WHO} FROM pg_stat_activity b \
                  WHERE b.backend_xid IS NOT NULL AND b.pid <> pg_backend_pid() \
                  ORDER BY b.xact_start"
            ),
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| blocker(r, String::new())).collect())
}

/// Run `work` (`what`: what it does, for the log); while it lasts, report the
/// sessions that block pgcdc's (see the module doc).
pub async fn reported<F: Future>(cfg: &PostgresConfig, what: &str, work: F) -> F::Output {
    tokio::pin!(work);
    let mut looks = tokio::time::interval_at((Instant::now() + LOOK_AFTER).into(), LOOK_EVERY);
    looks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut watch = Watch {
        what,
        sql: None,
        logged: Vec::new(),
        logged_at: None,
    };
    loop {
        tokio::select! {
            out = &mut work => {
                watch.ended();
                return out;
            }
            _ = looks.tick() => watch.look(cfg).await,
        }
    }
}

/// What the last looks found.
struct Watch<'a> {
    /// What the work does.
    what: &'a str,
    /// The connection the looks use, opened at the first.
    sql: Option<Client>,
    /// The blocking sessions' pids last logged, and when.
    logged: Vec<i32>,
    logged_at: Option<Instant>,
}

impl Watch<'_> {
    /// Look once; log and count what blocks, if that changed or is due again.
    async fn look(&mut self, cfg: &PostgresConfig) {
        let what = self.what;
        let found = match tokio::time::timeout(LOOK_TIMEOUT, self.find(cfg)).await {
            Ok(Ok(found)) => found,
            Ok(Err(e)) => {
                self.sql = None;
                tracing::debug!(error = %e, "could not look for sessions blocking pgcdc's");
                return;
            }
            Err(_) => return,
        };
        let pids: Vec<i32> = found.iter().map(|b| b.pid).collect();
        let due = self.logged_at.is_none_or(|t| t.elapsed() >= REPEAT_EVERY);
        metrics().postgres_blocking.set(pids.len() as i64);
        if found.is_empty() {
            self.ended();
            return;
        }
        let named = found
            .iter()
            .map(Blocker::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        metrics().postgres_waiting(Some(format!(
            "{what} waits for PostgreSQL sessions: {named}"
        )));
        if pids != self.logged || due {
            tracing::warn!(work = what, sessions = %named, "pgcdc waits for these PostgreSQL sessions: it cannot go on until they end their transactions or release their locks (COMMIT or ROLLBACK them, or end them with pg_terminate_backend(pid))");
            self.logged = pids;
            self.logged_at = Some(Instant::now());
        }
    }

    /// The blocking sessions, on the watch's connection.
    async fn find(&mut self, cfg: &PostgresConfig) -> Result<Vec<Blocker>, PgError> {
        if self.sql.is_none() {
            self.sql = Some(super::connect(cfg).await?);
        }
        match &self.sql {
            Some(sql) => blockers(sql).await,
            None => Ok(Vec::new()),
        }
    }

    /// Nothing blocks (any more): say so if something was logged.
    fn ended(&mut self) {
        if !self.logged.is_empty() {
            tracing::info!(
                work = self.what,
                "no PostgreSQL session blocks pgcdc's any more"
            );
            unreport();
        }
        self.logged.clear();
        self.logged_at = None;
    }
}

/// Clear what the watch reported: nothing blocks pgcdc's sessions.
fn unreport() {
    metrics().postgres_blocking.set(0);
    metrics().postgres_waiting(None);
}

impl Drop for Watch<'_> {
    /// Cancelled while blocked: what it reported is no longer so.
    fn drop(&mut self) {
        if !self.logged.is_empty() {
            unreport();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blocker_is_named_by_pid_role_state_and_age_never_its_query() {
        let b = Blocker {
            pid: 4242,
            who: "alice via psql from 10.0.0.7".into(),
            state: "idle in transaction".into(),
            xact_secs: Some(65),
            waited: "transactionid".into(),
        };
        assert_eq!(
            b.to_string(),
            "pid 4242 (alice via psql from 10.0.0.7, idle in transaction, transaction open 65 s; pgcdc waits for its transaction to end)"
        );
        let hidden = Blocker {
            state: String::new(),
            xact_secs: None,
            waited: "relation".into(),
            ..b
        };
        assert_eq!(
            hidden.to_string(),
            "pid 4242 (alice via psql from 10.0.0.7; pgcdc waits for a table lock)"
        );
        let unwaited = Blocker {
            waited: String::new(),
            ..hidden
        };
        assert_eq!(
            unwaited.to_string(),
            "pid 4242 (alice via psql from 10.0.0.7)"
        );
    }
}
