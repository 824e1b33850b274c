//! `[snapshot]`: whether and how existing rows are copied.

use crate::error::ConfigError;
use serde::Deserialize;

/// Most reader connections a snapshot may open: each holds a transaction on
/// the exported snapshot, so more would mostly load the server.
const PARALLELISM_MAX: usize = 32;
/// Most rows per chunk: one chunk's rows are held in memory at once.
const CHUNK_ROWS_MAX: usize = 1_000_000;
/// Default reader connections: parallel, yet gentle on the server.
const DEFAULT_PARALLELISM: usize = 2;
/// Default rows per chunk: large enough to amortise a keyset query, small
/// enough to keep a chunk's memory and its progress step modest, and a
/// quarter of `kafka.max_inflight_records` (10,000): the producer takes the
/// next chunk while about three wait for their acknowledgements. A chunk as
/// large as that window waited for the one before to be acknowledged whole;
/// the 2M-row snapshot benchmark copied 149,000-156,000 rows/s with 10,000,
/// 173,000-185,000 with 5,000, 217,000-225,000 with 2,500 and
/// 166,000-191,000 with 1,000 (more queries and steps).
const DEFAULT_CHUNK_ROWS: usize = 2_500;
/// Most bytes per chunk (1 GiB).
const CHUNK_BYTES_MAX: usize = 1 << 30;
/// Default bytes of row text per chunk (8 MiB): ordinary rows reach
/// `chunk_rows` first (2,500 rows of 3 KiB), while a chunk of wide rows is
/// cut at this size. The copy holds about eight chunks at once (those on
/// their way and one per reader being read), so this bounds its memory.
const DEFAULT_CHUNK_BYTES: usize = 8 << 20;

/// Whether pgcdc copies existing rows before streaming.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotMode {
    /// Copy every table on first start (and tables added later), then stream.
    Initial,
    /// Only stream changes made after the slot is created.
    Never,
}

/// `[snapshot]` configuration section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SnapshotConfig {
    /// `initial` (snapshot then stream) or `never` (stream only).
    pub mode: SnapshotMode,
    /// Reader connections copying key ranges in parallel (initial snapshot).
    pub parallelism: usize,
    /// Rows per chunk: one keyset query, one progress step.
    pub chunk_rows: usize,
    /// Bytes of row text (as PostgreSQL sends it) at which a chunk ends
    /// before `chunk_rows`: the rest comes in further chunks.
    pub chunk_bytes: usize,
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        Self {
            mode: SnapshotMode::Initial,
            parallelism: DEFAULT_PARALLELISM,
            chunk_rows: DEFAULT_CHUNK_ROWS,
            chunk_bytes: DEFAULT_CHUNK_BYTES,
        }
    }
}

impl SnapshotConfig {
    /// Every invalid field, by path.
    pub fn validate(&self, errors: &mut Vec<ConfigError>) {
        if !(1..=PARALLELISM_MAX).contains(&self.parallelism) {
            errors.push(ConfigError::new(
                "snapshot.parallelism",
                format!("must be between 1 and {PARALLELISM_MAX}"),
            ));
        }
        if !(1..=CHUNK_ROWS_MAX).contains(&self.chunk_rows) {
            errors.push(ConfigError::new(
                "snapshot.chunk_rows",
                format!("must be between 1 and {CHUNK_ROWS_MAX}"),
            ));
        }
        if !(1..=CHUNK_BYTES_MAX).contains(&self.chunk_bytes) {
            errors.push(ConfigError::new(
                "snapshot.chunk_bytes",
                format!("must be between 1 and {CHUNK_BYTES_MAX}"),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_validated_by_path() {
        let mut errors = Vec::new();
        SnapshotConfig::default().validate(&mut errors);
        assert!(errors.is_empty());
        SnapshotConfig {
            parallelism: 0,
            chunk_rows: 0,
            chunk_bytes: 0,
            ..Default::default()
        }
        .validate(&mut errors);
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert_eq!(errors[0].key, "snapshot.parallelism");
        assert_eq!(errors[1].key, "snapshot.chunk_rows");
        assert_eq!(errors[2].key, "snapshot.chunk_bytes");
    }
}
