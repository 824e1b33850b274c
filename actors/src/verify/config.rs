//! `[verify]`: how `pgcdc verify` reads and how long it waits.

use std::time::Duration;

use serde::Deserialize;

use crate::error::ConfigError;

/// Most rows per chunk: one chunk's rows and documents are held in memory at once.
const CHUNK_ROWS_MAX: usize = 100_000;
/// Default rows per chunk: one keyset query and one `_mget` each.
const DEFAULT_CHUNK_ROWS: usize = 1000;
/// Default longest wait for the pipeline to apply a snapshot's position.
const DEFAULT_FENCE_TIMEOUT_SECS: u64 = 60;
/// Default rounds of re-checking a difference before it counts as drift.
const DEFAULT_RECHECKS: usize = 3;
/// Most re-check rounds.
const RECHECKS_MAX: usize = 20;
/// Default key ranges compared at once.
const DEFAULT_PARALLELISM: usize = 4;
/// Most key ranges compared at once (one PostgreSQL connection each).
const PARALLELISM_MAX: usize = 64;
/// Default fraction of each table the daemon's continuous verification compares.
const DEFAULT_SAMPLE: f64 = 0.01;

/// `[verify]` configuration section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VerifyConfig {
    /// Rows (and documents) read per query.
    pub chunk_rows: usize,
    /// Longest wait, in seconds, for the pipeline to apply everything up to
    /// a snapshot's position before differences are checked again.
    pub fence_timeout_secs: u64,
    /// Rounds of re-checking a difference (new snapshot, wait, read again)
    /// before it counts as drift.
    pub rechecks: usize,
    /// PostgreSQL connections sharing the snapshot: mirror pages looked up
    /// at once, and key ranges compared at once (a sample also reads up to
    /// as many mirror slices at once): at most `parallelism × chunk_rows`
    /// rows in memory.
    pub parallelism: usize,
    /// Seconds between two continuous verifications in the daemon (`pgcdc
    /// run`); 0: none.
    pub interval_secs: u64,
    /// Fraction (0 < f ≤ 1) of each table's key ranges (and of its mirror's
    /// slices) a continuous verification compares.
    pub sample: f64,
    /// Whether the continuous verification has the daemon copy the drifted
    /// rows it finds again, as `pgcdc verify --repair` does.
    pub repair: bool,
}

impl Default for VerifyConfig {
    fn default() -> Self {
        Self {
            chunk_rows: DEFAULT_CHUNK_ROWS,
            fence_timeout_secs: DEFAULT_FENCE_TIMEOUT_SECS,
            rechecks: DEFAULT_RECHECKS,
            parallelism: DEFAULT_PARALLELISM,
            interval_secs: 0,
            sample: DEFAULT_SAMPLE,
            repair: true,
        }
    }
}

impl VerifyConfig {
    /// Every invalid field, by path.
    pub fn validate(&self, errors: &mut Vec<ConfigError>) {
        if !(1..=CHUNK_ROWS_MAX).contains(&self.chunk_rows) {
            errors.push(ConfigError::new(
                "verify.chunk_rows",
                format!("must be between 1 and {CHUNK_ROWS_MAX}"),
            ));
        }
        if self.fence_timeout_secs == 0 {
            errors.push(ConfigError::new(
                "verify.fence_timeout_secs",
                "must be at least 1",
            ));
        }
        if !(1..=RECHECKS_MAX).contains(&self.rechecks) {
            errors.push(ConfigError::new(
                "verify.rechecks",
                format!("must be between 1 and {RECHECKS_MAX}"),
            ));
        }
        if !(1..=PARALLELISM_MAX).contains(&self.parallelism) {
            errors.push(ConfigError::new(
                "verify.parallelism",
                format!("must be between 1 and {PARALLELISM_MAX}"),
            ));
        }
        if !(self.sample > 0.0 && self.sample <= 1.0) {
            errors.push(ConfigError::new(
                "verify.sample",
                "must be a fraction above 0 and at most 1",
            ));
        }
    }

    /// The time between two continuous verifications; `None`: off.
    pub fn interval(&self) -> Option<Duration> {
        (self.interval_secs > 0).then(|| Duration::from_secs(self.interval_secs))
    }

    /// The fence timeout as a duration.
    pub fn fence_timeout(&self) -> Duration {
        Duration::from_secs(self.fence_timeout_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_validated_by_path() {
        let mut errors = Vec::new();
        VerifyConfig::default().validate(&mut errors);
        assert!(errors.is_empty());
        VerifyConfig {
            chunk_rows: 0,
            fence_timeout_secs: 0,
            rechecks: 0,
            parallelism: 0,
            interval_secs: 0,
            sample: 0.0,
            repair: false,
        }
        .validate(&mut errors);
        let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "verify.chunk_rows",
                "verify.fence_timeout_secs",
                "verify.rechecks",
                "verify.parallelism",
                "verify.sample"
            ]
        );
    }
}
