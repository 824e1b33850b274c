//! The initial snapshot: copies every configured table inside the snapshot
//! that `CREATE_REPLICATION_SLOT … (SNAPSHOT 'export')` exported, so the copy
//! and the stream meet exactly at the slot's consistent point — no gap, no
//! overlap. Runs inside the replication actor's supervised task, before
//! `START_REPLICATION` is sent on the same replication session (which keeps the
//! exported snapshot valid until then).
//!
//! Each reader connection imports the snapshot (`SET TRANSACTION SNAPSHOT`,
//! REPEATABLE READ, READ ONLY) before any copying, then reads whole tables
//! through a cursor in `fetch_rows` chunks: memory stays bounded whatever the
//! table size. Rows are `op=r` events versioned with the consistent point.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::event::{ChangeEvent, Op, TableRef, TxMeta};
use crate::lsn::Lsn;
use crate::replication::values::{text_to_json, type_name};
use crate::replication::{quote_ident, slot, PostgresConfig, ReplicationError};

/// Whether pgcdc copies existing rows before streaming.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotMode {
    /// On first start (no checkpoint), copy every table, then stream.
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
    /// Reader connections copying tables in parallel.
    pub parallelism: usize,
    /// Rows fetched per cursor round trip (and per batch to Kafka).
    pub fetch_rows: usize,
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        Self {
            mode: SnapshotMode::Initial,
            parallelism: 2,
            fetch_rows: 5000,
        }
    }
}

impl SnapshotConfig {
    /// Every invalid field, by path.
    pub fn validate(&self, errors: &mut Vec<String>) {
        if !(1..=32).contains(&self.parallelism) {
            errors.push("snapshot.parallelism: must be between 1 and 32".into());
        }
        if self.fetch_rows == 0 {
            errors.push("snapshot.fetch_rows: must be at least 1".into());
        }
    }
}

/// Session settings the value converter expects (as on the replication connection).
const READER_SETTINGS: &str =
    "SET datestyle = 'ISO, YMD'; SET timezone = 'UTC'; SET intervalstyle = 'iso_8601'; \
     SET extra_float_digits = 3; SET bytea_output = 'hex';";

/// Copy `tables` as of `snapshot` (exported at `at`), sending event chunks to `out`.
/// Returns the number of rows copied.
pub async fn copy_tables(
    pg: &PostgresConfig,
    cfg: &SnapshotConfig,
    tables: &[Arc<TableRef>],
    snapshot: &str,
    at: Lsn,
    out: mpsc::Sender<Vec<ChangeEvent>>,
) -> Result<u64, ReplicationError> {
    let readers = cfg.parallelism.min(tables.len()).max(1);
    let mut conns = Vec::with_capacity(readers);
    for _ in 0..readers {
        let sql = slot::connect(pg).await?;
        let import = format!(
            "{READER_SETTINGS} BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT '{}'",
            snapshot.replace('\'', "''")
        );
        sql.batch_execute(&import).await?;
        conns.push(sql);
    }
    let mut assigned: Vec<Vec<Arc<TableRef>>> = vec![Vec::new(); readers];
    for (i, t) in tables.iter().enumerate() {
        assigned[i % readers].push(t.clone());
    }
    let work = conns
        .into_iter()
        .zip(assigned)
        .map(|(sql, ts)| copy_reader(sql, ts, cfg.fetch_rows, at, out.clone()));
    let counts = futures::future::try_join_all(work).await?;
    Ok(counts.into_iter().sum())
}

/// One reader: its tables, one cursor at a time.
async fn copy_reader(
    sql: Client,
    tables: Vec<Arc<TableRef>>,
    fetch: usize,
    at: Lsn,
    out: mpsc::Sender<Vec<ChangeEvent>>,
) -> Result<u64, ReplicationError> {
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64);
    let tx = TxMeta {
        xid: 0,
        commit_lsn: at,
        commit_time_us: now_us,
    };
    let mut total = 0u64;
    for table in tables {
        let qualified = format!(
            "{}.{}",
            quote_ident(&table.schema),
            quote_ident(&table.name)
        );
        let cols = columns(&sql, &qualified).await?;
        let types: Map<String, Value> = cols
            .iter()
            .map(|(c, oid)| (c.clone(), Value::from(type_name(*oid).unwrap_or("unknown"))))
            .collect();
        let table = Arc::new(TableRef {
            column_types: Value::Object(types).to_string(),
            ..(*table).clone()
        });
        sql.batch_execute(&format!(
            "DECLARE pgcdc_snapshot NO SCROLL CURSOR FOR SELECT * FROM {qualified}"
        ))
        .await?;
        let mut copied = 0u64;
        loop {
            let rows = sql
                .simple_query(&format!("FETCH {fetch} FROM pgcdc_snapshot"))
                .await?;
            let events: Vec<ChangeEvent> = rows
                .iter()
                .filter_map(|m| match m {
                    SimpleQueryMessage::Row(row) => Some(row),
                    _ => None,
                })
                .map(|row| {
                    let after: Map<String, Value> = cols
                        .iter()
                        .enumerate()
                        .map(|(i, (c, oid))| {
                            let v = row
                                .get(i)
                                .map_or(Value::Null, |s| text_to_json(*oid, s.as_bytes()));
                            (c.clone(), v)
                        })
                        .collect();
                    let key = table
                        .key_columns
                        .iter()
                        .map(|c| after.get(c).map(|v| (c.clone(), v.clone())))
                        .collect();
                    let seq = (copied % u64::from(u32::MAX)) as u32;
                    copied += 1;
                    ChangeEvent {
                        op: Op::Read,
                        table: table.clone(),
                        key,
                        before: None,
                        after: Some(after),
                        unchanged_toast: Vec::new(),
                        lsn: at,
                        seq,
                        tx,
                        snapshot: true,
                    }
                })
                .collect();
            if events.is_empty() {
                break;
            }
            out.send(events)
                .await
                .map_err(|_| ReplicationError::StreamEnded)?;
        }
        sql.batch_execute("CLOSE pgcdc_snapshot").await?;
        tracing::info!(table = %qualified, rows = copied, "table snapshot copied");
        total += copied;
    }
    sql.batch_execute("COMMIT").await?;
    Ok(total)
}

/// Column names and type OIDs of a table, in order.
async fn columns(sql: &Client, qualified: &str) -> Result<Vec<(String, u32)>, ReplicationError> {
    let rows = sql
        .query(
            "SELECT attname::text, atttypid FROM pg_attribute \
              WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            &[&qualified],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, u32>(1)))
        .collect())
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
            fetch_rows: 0,
            ..Default::default()
        }
        .validate(&mut errors);
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors[0].starts_with("snapshot.parallelism"));
    }
}
