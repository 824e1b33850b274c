//! The freshness canary: every `canary.interval_secs` the daemon writes a
//! signed logical message carrying its wall-clock time into the WAL
//! (`pg_logical_emit_message(true, 'pgcdc.canary', …)`, a transaction of
//! its own). The stream sees it in commit order with the data; once the
//! checkpoint confirms its commit (every record up to it acknowledged by
//! Kafka and the position synced), its age is the Kafka-stage freshness:
//! `pgcdc_freshness_seconds{stage="kafka"}`, and
//! `pgcdc_freshness_last_canary_age_seconds{stage="kafka"}` is the age of
//! the newest canary that got that far (it grows while a leg is stalled,
//! and stays low while an idle pipeline is healthy). `/ready` requires that
//! age below `canary.max_lag_secs` when set.
//!
//! A canary's own transaction has no Kafka record: it is confirmed once
//! every change before it is acknowledged. So a frozen Kafka ages the
//! canaries as soon as a change waits for it; on a database with no change
//! at all it goes unnoticed by the canary (the search stage, which needs a
//! canary record in Kafka, is not measured yet).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prometheus::{GaugeVec, HistogramOpts, HistogramVec, Opts, Registry};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;
use crate::lsn::Lsn;
use crate::metrics::metrics;
use crate::pg::PostgresConfig;
use crate::snapshot::watermark::MessageKey;

/// Prefix of canary messages.
pub const CANARY_PREFIX: &str = crate::wire::message::CANARY;
/// Default seconds between canaries.
const DEFAULT_INTERVAL_SECS: u64 = 10;
/// Longest allowed interval (an hour).
const INTERVAL_MAX_SECS: u64 = 3600;
/// Canaries waiting for their confirmation, at most (older ones are dropped).
const WAITING_MAX: usize = 1024;
/// The Kafka stage's label.
const KAFKA: &str = "kafka";
/// Histogram buckets of freshness, in seconds.
const BUCKETS: &[f64] = &[0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];

/// `[canary]` configuration section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CanaryConfig {
    /// Seconds between canaries; 0 disables them.
    pub interval_secs: u64,
    /// `/ready` is 503 while the newest canary acknowledged by Kafka is older
    /// than this many seconds; 0: freshness does not count for readiness.
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

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// The freshness metrics (part of [`crate::metrics::Metrics`]).
pub struct Freshness {
    /// Commit → stage, per stage.
    seconds: HistogramVec,
    /// Age of the newest canary that reached a stage, per stage (set when rendered).
    age: GaugeVec,
    /// Write time of the newest canary Kafka acknowledged (or the writer's start), µs.
    kafka_us: AtomicI64,
    /// `canary.max_lag_secs` (0: not part of readiness).
    max_lag_secs: AtomicU64,
}

impl Freshness {
    /// The metrics, registered in `r`.
    pub(crate) fn new(r: &Registry) -> Self {
        let seconds = HistogramVec::new(
            HistogramOpts::new(
                "freshness_seconds",
                "Canary commit to reaching a stage (kafka: acknowledged and checkpointed)",
            )
            .buckets(BUCKETS.to_vec()),
            &["stage"],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let age = GaugeVec::new(
            Opts::new(
                "freshness_last_canary_age_seconds",
                "Age of the newest canary that reached a stage",
            ),
            &["stage"],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        r.register(Box::new(seconds.clone()))
            .unwrap_or_else(|e| panic!("{e}"));
        r.register(Box::new(age.clone()))
            .unwrap_or_else(|e| panic!("{e}"));
        Self {
            seconds,
            age,
            kafka_us: AtomicI64::new(0),
            max_lag_secs: AtomicU64::new(0),
        }
    }

    /// Require the Kafka stage's canary age below `secs` for readiness (0: don't).
    pub fn set_max_lag(&self, secs: u64) {
        self.max_lag_secs.store(secs, Ordering::Relaxed);
    }

    /// The writer started at `now_us`: ages count from here until a canary arrives.
    fn started(&self, now_us: i64) {
        let _ = self
            .kafka_us
            .compare_exchange(0, now_us, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// A canary written at `t_us` reached `stage` at `now_us`.
    fn reached(&self, stage: &str, t_us: i64, now_us: i64) {
        let secs = (now_us - t_us).max(0) as f64 / 1e6;
        self.seconds.with_label_values(&[stage]).observe(secs);
        self.kafka_us.fetch_max(t_us, Ordering::Relaxed);
    }

    /// Seconds since the newest canary Kafka acknowledged was written, if canaries run.
    fn kafka_age(&self) -> Option<f64> {
        let t = self.kafka_us.load(Ordering::Relaxed);
        (t > 0).then(|| (now_us() - t).max(0) as f64 / 1e6)
    }

    /// Set the age gauges (before rendering).
    pub(crate) fn refresh(&self) {
        if let Some(age) = self.kafka_age() {
            self.age.with_label_values(&[KAFKA]).set(age);
        }
    }

    /// Whether freshness allows readiness; if not, why.
    pub(crate) fn check(&self) -> Result<(), String> {
        let max = self.max_lag_secs.load(Ordering::Relaxed);
        match self.kafka_age() {
            Some(age) if max > 0 && age > max as f64 => Err(format!(
                "freshness: the newest canary acknowledged by kafka was written {age:.0}s ago (canary.max_lag_secs = {max})"
            )),
            _ => Ok(()),
        }
    }
}

/// Canaries seen by the stream and not yet confirmed: (commit LSN, written at µs).
static WAITING: Mutex<VecDeque<(Lsn, i64)>> = Mutex::new(VecDeque::new());

fn waiting() -> std::sync::MutexGuard<'static, VecDeque<(Lsn, i64)>> {
    WAITING.lock().unwrap_or_else(|p| p.into_inner())
}

/// The stream saw a canary written at `t_us` in the transaction committing at `commit`.
pub fn seen(commit: Lsn, t_us: i64) {
    let mut w = waiting();
    if w.len() >= WAITING_MAX {
        w.pop_front();
    }
    w.push_back((commit, t_us));
}

/// The checkpoint confirmed everything up to `lsn`: canaries committed at
/// or below it reached Kafka.
pub fn confirmed(lsn: Lsn) {
    let mut w = waiting();
    while let Some(&(commit, t_us)) = w.front() {
        if commit > lsn {
            break;
        }
        w.pop_front();
        metrics().freshness.reached(KAFKA, t_us, now_us());
    }
}

/// Write a canary every `interval` until the process ends; a failed write
/// is logged and tried again at the next interval.
pub fn spawn_writer(pg: Arc<PostgresConfig>, key: MessageKey, interval: Duration) {
    metrics().freshness.started(now_us());
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
