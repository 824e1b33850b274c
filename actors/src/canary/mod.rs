//! The freshness canary: every `canary.interval_secs` the daemon writes a
//! signed logical message carrying its wall-clock time into the WAL
//! (`pg_logical_emit_message(true, 'pgcdc.canary', …)`, a transaction of
//! its own). The stream sees it in commit order with the data; once the
//! checkpoint confirms its commit (every change before it acknowledged by
//! Kafka), a signed record of it goes to the canary topic (`record`,
//! `publish`), listing the change partitions' high watermarks.
//!
//! Two stages are measured ([`Freshness`]): `kafka`, when that record is
//! acknowledged (so a frozen Kafka ages canaries even on a database with
//! no change), and `search`, when the sink has applied every change
//! partition up to the listed offsets, plus the index refresh interval
//! (`crate::es_writer`'s canary watch). Per stage,
//! `pgcdc_freshness_seconds` is the histogram of commit → stage and
//! `pgcdc_freshness_last_canary_age_seconds` the age of the newest canary
//! that got that far: it grows while a leg is stalled and stays low while
//! an idle pipeline is healthy. `/ready` requires each measured stage's age
//! below `canary.max_lag_secs` when set.

mod freshness;
mod publish;
pub mod record;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;
use crate::lsn::Lsn;
use crate::metrics::metrics;
use crate::pg::PostgresConfig;
use crate::snapshot::watermark::MessageKey;

pub use freshness::{Freshness, Stage};
pub use publish::spawn_publisher;

/// Prefix of canary messages.
pub const CANARY_PREFIX: &str = crate::wire::message::CANARY;
/// Default seconds between canaries.
const DEFAULT_INTERVAL_SECS: u64 = 10;
/// Longest allowed interval (an hour).
const INTERVAL_MAX_SECS: u64 = 3600;
/// Canaries waiting for their confirmation, at most (older ones are dropped).
const WAITING_MAX: usize = 1024;

/// `[canary]` configuration section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CanaryConfig {
    /// Seconds between canaries; 0 disables them.
    pub interval_secs: u64,
    /// `/ready` is 503 while the newest canary that reached a measured stage
    /// (kafka; search where a sink runs) is older than this many seconds;
    /// 0: freshness does not count for readiness.
    pub max_lag_secs: u64,
}

impl Default for CanaryConfig {
    fn default() -> Self {
        Self {
            interval_secs: DEFAULT_INTERVAL_SECS,
            max_lag_secs: 0,
        }
    }
}

impl CanaryConfig {
    /// Every invalid field, by path.
    pub fn validate(&self, errors: &mut Vec<ConfigError>) {
        if self.interval_secs > INTERVAL_MAX_SECS {
            errors.push(ConfigError::new(
                "canary.interval_secs",
                format!("must be at most {INTERVAL_MAX_SECS}"),
            ));
        }
        if self.max_lag_secs > 0 && self.max_lag_secs <= self.interval_secs {
            errors.push(ConfigError::new(
                "canary.max_lag_secs",
                "must be above canary.interval_secs (a healthy pipeline's canary is up to one interval old), or 0",
            ));
        }
        if self.max_lag_secs > 0 && self.interval_secs == 0 {
            errors.push(ConfigError::new(
                "canary.max_lag_secs",
                "needs canary.interval_secs above 0",
            ));
        }
    }
}

/// A canary message's content.
#[derive(Debug, Serialize, Deserialize)]
pub struct Canary {
    /// The slot of the pgcdc instance that wrote it.
    pub slot: String,
    /// Wall-clock time it was written, in µs since the Unix epoch.
    pub t_us: i64,
    /// HMAC of the fields above ([`MessageKey`]).
    #[serde(default)]
    pub mac: String,
}

impl Canary {
    /// A canary of `slot` written now, signed with `key`.
    pub fn now(key: &MessageKey, slot: &str) -> Self {
        let mut c = Self {
            slot: slot.to_owned(),
            t_us: now_us(),
            mac: String::new(),
        };
        c.mac = key.sign(&c.fields());
        c
    }

    fn fields(&self) -> [String; 3] {
        ["canary".into(), self.slot.clone(), self.t_us.to_string()]
    }

    /// Whether its MAC verifies with `key`.
    pub fn genuine(&self, key: &MessageKey) -> bool {
        key.verify(&self.fields(), &self.mac)
    }
}

/// Now, in µs since the Unix epoch.
pub(crate) fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// Canaries seen by the stream and not yet confirmed: (commit LSN, written at µs).
static WAITING: Mutex<VecDeque<(Lsn, i64)>> = Mutex::new(VecDeque::new());

fn waiting() -> std::sync::MutexGuard<'static, VecDeque<(Lsn, i64)>> {
    WAITING.lock().unwrap_or_else(|p| p.into_inner())
}

/// The stream saw a canary written at `t_us` in the transaction committing
/// at `commit` (once: a stream restarted from the checkpoint sees it again).
pub fn seen(commit: Lsn, t_us: i64) {
    let mut w = waiting();
    if w.iter().any(|&(c, _)| c == commit) {
        return;
    }
    if w.len() >= WAITING_MAX {
        w.pop_front();
    }
    w.push_back((commit, t_us));
}

/// The checkpoint confirmed everything up to `lsn`: every change before
/// the canaries committed at or below it is acknowledged; their records go
/// to the canary topic.
pub fn confirmed(lsn: Lsn) {
    let mut w = waiting();
    while let Some(&(commit, t_us)) = w.front() {
        if commit > lsn {
            break;
        }
        w.pop_front();
        publish::offer(t_us, commit);
    }
}

/// Write a canary every `interval` until the process ends; a failed write
/// is logged and tried again at the next interval.
pub fn spawn_writer(pg: Arc<PostgresConfig>, key: MessageKey, interval: Duration) {
    metrics().freshness.measure(Stage::Kafka, now_us());
    tokio::spawn(async move {
        let mut sql = None;
        loop {
            tokio::time::sleep(interval).await;
            if sql.is_none() {
                sql = crate::pg::connect(&pg).await.ok();
            }
            let Some(client) = &sql else { continue };
            let content = serde_json::to_string(&Canary::now(&key, &pg.slot)).unwrap_or_default();
            let res = client
                .execute(
                    "SELECT pg_logical_emit_message(true, $1, $2)",
                    &[&CANARY_PREFIX, &content],
                )
                .await;
            if let Err(e) = res {
                tracing::warn!(error = %e, "canary not written");
                sql = None;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_canary_seen_again_waits_once_and_leaves_when_its_commit_is_confirmed() {
        seen(Lsn(u64::MAX - 9), 1);
        seen(Lsn(u64::MAX - 9), 1);
        seen(Lsn(u64::MAX - 5), 2);
        let mine = || {
            waiting()
                .iter()
                .filter(|(c, _)| c.0 >= u64::MAX - 9)
                .count()
        };
        assert_eq!(mine(), 2, "seen again after a stream restart: kept once");
        confirmed(Lsn(u64::MAX - 7));
        assert_eq!(mine(), 1, "the confirmed one goes to the publisher");
        confirmed(Lsn(u64::MAX));
        assert_eq!(mine(), 0);
    }

    #[test]
    fn canaries_are_signed_and_config_is_validated() {
        let key = MessageKey::random().unwrap_or_else(|e| panic!("{e}"));
        let mut c = Canary::now(&key, "s");
        assert!(c.genuine(&key));
        c.t_us += 1;
        assert!(!c.genuine(&key), "a changed time is refused");
        let mut errors = Vec::new();
        CanaryConfig::default().validate(&mut errors);
        assert!(errors.is_empty());
        CanaryConfig {
            interval_secs: 10,
            max_lag_secs: 5,
        }
        .validate(&mut errors);
        assert_eq!(errors[0].key, "canary.max_lag_secs");
    }
}
