//! Copying existing rows: the initial snapshot and backfills.
//!
//! **Initial snapshot.** `CREATE_REPLICATION_SLOT … (SNAPSHOT 'export')`
//! exports the slot's consistent point as a snapshot. Every reader connection
//! imports it (`SET TRANSACTION SNAPSHOT`, REPEATABLE READ, READ ONLY) before
//! the replication session moves on, so the copy and the stream meet exactly
//! at the consistent point: no gap, no overlap. Large tables are split into
//! primary-key ranges read in parallel; each range is read in keyset chunks of
//! `chunk_rows` rows, so memory stays bounded whatever the table size. Rows are
//! `op=r` events versioned with the consistent point.
//!
//! **Progress.** Every chunk's rows travel to Kafka with the new progress of
//! their table (the last key copied in their range); the checkpoint stores the
//! progress in the same synced write as the LSN, only once Kafka acknowledged
//! the rows. A restart never starts over: what is left is copied by watermark
//! backfill ([`watermark`], [`SnapshotActor`]) while the stream runs from the
//! consistent point.

mod actor;
pub mod watermark;

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio_postgres::{Client, SimpleQueryMessage, SimpleQueryRow};

pub use actor::{BackfillTable, SnapshotActor, StreamStarted};

use crate::checkpoint::{KeyRange, KeyText, TableProgress};
use crate::event::{ChangeEvent, CopiedRows, Op, TableRef, TxMeta};
use crate::lsn::Lsn;
use crate::replication::values::{text_to_json, type_name};
use crate::replication::{quote_ident, slot, PostgresConfig, ReplicationError};

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
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        Self {
            mode: SnapshotMode::Initial,
            parallelism: 2,
            chunk_rows: 10_000,
        }
    }
}

impl SnapshotConfig {
    /// Every invalid field, by path.
    pub fn validate(&self, errors: &mut Vec<String>) {
        if !(1..=32).contains(&self.parallelism) {
            errors.push("snapshot.parallelism: must be between 1 and 32".into());
        }
        if !(1..=1_000_000).contains(&self.chunk_rows) {
            errors.push("snapshot.chunk_rows: must be between 1 and 1000000".into());
        }
    }
}

/// Session settings the value converter expects (as on the replication
/// connection), and literal quoting the keyset queries rely on.
const READER_SETTINGS: &str =
    "SET datestyle = 'ISO, YMD'; SET timezone = 'UTC'; SET intervalstyle = 'iso_8601'; \
     SET extra_float_digits = 3; SET bytea_output = 'hex'; SET standard_conforming_strings = on;";

/// A reader connection with the session settings applied.
pub(crate) async fn reader(pg: &PostgresConfig) -> Result<Client, ReplicationError> {
    let sql = slot::connect(pg).await?;
    sql.batch_execute(READER_SETTINGS).await?;
    Ok(sql)
}

/// What a copy needs to know about a table: its columns in order, which of
/// them form the key, and how to cast key literals.
pub(crate) struct Shape {
    /// The table, with `column_types` filled in.
    pub table: Arc<TableRef>,
    qualified: String,
    columns: Arc<[(String, u32)]>,
    key: Vec<(usize, String)>,
    keyless: bool,
}

impl Shape {
    /// Read the table's columns and key from the catalog.
    pub async fn load(sql: &Client, table: &TableRef) -> Result<Self, ReplicationError> {
        let qualified = format!(
            "{}.{}",
            quote_ident(&table.schema),
            quote_ident(&table.name)
        );
        let rows = sql
            .query(
                "SELECT a.attname::text, a.atttypid, format_type(a.atttypid, a.atttypmod), \
                        COALESCE(a.attnum = ANY(i.indkey), false) \
                   FROM pg_attribute a \
                   LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary \
                  WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped \
                  ORDER BY a.attnum",
                &[&qualified],
            )
            .await?;
        let columns: Vec<(String, u32)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        let casts: Vec<String> = rows.iter().map(|r| r.get(2)).collect();
        let has_pk = rows.iter().any(|r| r.get::<_, bool>(3));
        let key = table
            .key_columns
            .iter()
            .filter_map(|k| {
                let i = columns.iter().position(|(c, _)| c == k)?;
                Some((i, casts[i].clone()))
            })
            .collect::<Vec<_>>();
        let keyless = !has_pk || key.len() != table.key_columns.len();
        let types: Map<String, Value> = columns
            .iter()
            .map(|(c, oid)| (c.clone(), Value::from(type_name(*oid).unwrap_or("unknown"))))
            .collect();
        let table = Arc::new(TableRef {
            column_types: Value::Object(types).to_string(),
            ..table.clone()
        });
        Ok(Self {
            table,
            qualified,
            columns: columns.into(),
            key,
            keyless,
        })
    }

    /// Whether the table has no primary key (REPLICA IDENTITY FULL): it can
    /// only be copied whole, in one pass, and not backfilled by key.
    pub fn keyless(&self) -> bool {
        self.keyless
    }

    fn key_list(&self) -> String {
        let names: Vec<String> = self
            .key
            .iter()
            .map(|(i, _)| quote_ident(&self.columns[*i].0))
            .collect();
        names.join(", ")
    }

    fn key_literal(&self, key: &KeyText) -> String {
        let items: Vec<String> = self
            .key
            .iter()
            .zip(key)
            .map(|((_, cast), v)| format!("'{}'::{cast}", v.replace('\'', "''")))
            .collect();
        format!("({})", items.join(", "))
    }

    fn range_filter(&self, after: Option<&KeyText>, upto: Option<&KeyText>) -> String {
        let cols = self.key_list();
        let mut conds = Vec::new();
        if let Some(a) = after {
            conds.push(format!("({cols}) > {}", self.key_literal(a)));
        }
        if let Some(u) = upto {
            conds.push(format!("({cols}) <= {}", self.key_literal(u)));
        }
        if conds.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", conds.join(" AND "))
        }
    }

    /// The keyset query for the next `limit` rows of `range`.
    pub fn chunk_query(&self, range: &KeyRange, limit: usize) -> String {
        format!(
            "SELECT * FROM {}{} ORDER BY {} LIMIT {limit}",
            self.qualified,
            self.range_filter(range.after.as_ref(), range.upto.as_ref()),
            self.key_list()
        )
    }

    /// Split the table into at most `parts` key ranges of similar size
    /// (one range for small or keyless tables).
    pub async fn split(
        &self,
        sql: &Client,
        parts: usize,
        chunk_rows: usize,
    ) -> Result<Vec<KeyRange>, ReplicationError> {
        let whole = vec![KeyRange {
            after: None,
            upto: None,
            done: false,
        }];
        if self.keyless || parts < 2 {
            return Ok(whole);
        }
        let row = sql
            .query_one(
                "SELECT reltuples::float8 FROM pg_class WHERE oid = $1::text::regclass",
                &[&self.qualified],
            )
            .await?;
        let mut estimate = row.get::<_, f64>(0);
        if estimate < 0.0 {
            // Never analyzed: count (cheaper than copying unsplit).
            let row = sql
                .query_one(
                    &format!("SELECT count(*)::float8 FROM {}", self.qualified),
                    &[],
                )
                .await?;
            estimate = row.get::<_, f64>(0);
        }
        if estimate < (2 * chunk_rows) as f64 {
            return Ok(whole);
        }
        let step = (estimate / parts as f64).ceil().max(1.0) as u64;
        let mut bounds: Vec<KeyText> = Vec::new();
        for _ in 1..parts {
            let q = format!(
                "SELECT {} FROM {}{} ORDER BY {} OFFSET {} LIMIT 1",
                self.key_list(),
                self.qualified,
                self.range_filter(bounds.last(), None),
                self.key_list(),
                step - 1
            );
            let rows = sql.simple_query(&q).await?;
            let Some(row) = rows.iter().find_map(|m| match m {
                SimpleQueryMessage::Row(r) => Some(r),
                _ => None,
            }) else {
                break;
            };
            bounds.push(
                (0..self.key.len())
                    .map(|i| row.get(i).unwrap_or("").to_owned())
                    .collect(),
            );
        }
        let mut ranges = Vec::with_capacity(bounds.len() + 1);
        let mut after = None;
        for b in bounds {
            ranges.push(KeyRange {
                after: after.clone(),
                upto: Some(b.clone()),
                done: false,
            });
            after = Some(b);
        }
        ranges.push(KeyRange {
            after,
            upto: None,
            done: false,
        });
        Ok(ranges)
    }

    /// The key text of a row (for the last key and watermark filtering).
    fn key_of(&self, row: &SimpleQueryRow) -> KeyText {
        self.key
            .iter()
            .map(|(i, _)| row.get(*i).unwrap_or("").to_owned())
            .collect()
    }

    /// Turn query rows into `op=r` events of transaction `tx`, positions from
    /// `seq`; also returns each row's key text (for the last key and for
    /// watermark filtering).
    pub fn events(
        &self,
        rows: &[SimpleQueryMessage],
        tx: TxMeta,
        lsn: Lsn,
        seq: &mut u32,
    ) -> Vec<(KeyText, ChangeEvent)> {
        rows.iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(row) => Some(row),
                _ => None,
            })
            .map(|row| {
                let event = self.event(row, tx, lsn, *seq);
                *seq = seq.wrapping_add(1);
                (self.key_of(row), event)
            })
            .collect()
    }

    fn event(&self, row: &SimpleQueryRow, tx: TxMeta, lsn: Lsn, seq: u32) -> ChangeEvent {
        let after: Map<String, Value> = self
            .columns
            .iter()
            .enumerate()
            .map(|(i, (c, oid))| {
                let v = row
                    .get(i)
                    .map_or(Value::Null, |s| text_to_json(*oid, s.as_bytes()));
                (c.clone(), v)
            })
            .collect();
        let key = self
            .table
            .key_columns
            .iter()
            .map(|c| after.get(c).map(|v| (c.clone(), v.clone())))
            .collect();
        ChangeEvent {
            op: Op::Read,
            table: self.table.clone(),
            key,
            before: None,
            after: Some(after),
            unchanged_toast: Vec::new(),
            lsn,
            seq,
            tx,
            snapshot: true,
        }
    }
}

/// A copied chunk on its way to Kafka.
pub struct CopiedChunk {
    /// Index of the table in the copy plan.
    pub table: usize,
    /// Index of the key range in the table's progress.
    pub range: usize,
    /// The rows.
    pub rows: CopiedRows,
    /// The last key copied in the range.
    pub after: Option<KeyText>,
    /// Whether the range is now fully copied.
    pub done: bool,
}

/// Reader connections that imported the exported snapshot.
pub struct SnapshotReaders {
    conns: Vec<Client>,
}

/// Open `cfg.parallelism` connections and import `snapshot` on each. Must
/// finish before the replication session runs its next command.
pub async fn import_snapshot(
    pg: &PostgresConfig,
    cfg: &SnapshotConfig,
    snapshot: &str,
) -> Result<SnapshotReaders, ReplicationError> {
    let mut conns = Vec::with_capacity(cfg.parallelism);
    for _ in 0..cfg.parallelism {
        let sql = reader(pg).await?;
        let import = format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT '{}'",
            snapshot.replace('\'', "''")
        );
        sql.batch_execute(&import).await?;
        conns.push(sql);
    }
    Ok(SnapshotReaders { conns })
}

impl SnapshotReaders {
    /// Plan the copy: each table's shape and key ranges.
    pub(crate) async fn plan(
        &self,
        tables: &[Arc<TableRef>],
        cfg: &SnapshotConfig,
    ) -> Result<Vec<(Shape, TableProgress)>, ReplicationError> {
        let sql = &self.conns[0];
        let mut plan = Vec::with_capacity(tables.len());
        for t in tables {
            let shape = Shape::load(sql, t).await?;
            let ranges = shape.split(sql, cfg.parallelism, cfg.chunk_rows).await?;
            let progress = TableProgress {
                ranges,
                ..TableProgress::fresh(&t.schema, &t.name)
            };
            plan.push((shape, progress));
        }
        Ok(plan)
    }

    /// Copy every range of `plan` as of the imported snapshot (taken at
    /// `at`), sending chunks to `out`. Returns the number of rows copied.
    pub(crate) async fn copy(
        self,
        plan: &[(Shape, TableProgress)],
        chunk_rows: usize,
        at: Lsn,
        out: mpsc::Sender<CopiedChunk>,
    ) -> Result<u64, ReplicationError> {
        let work: Vec<(usize, usize)> = plan
            .iter()
            .enumerate()
            .flat_map(|(t, (_, p))| (0..p.ranges.len()).map(move |r| (t, r)))
            .collect();
        let next = std::sync::atomic::AtomicUsize::new(0);
        let now_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as i64);
        let tx = TxMeta {
            xid: 0,
            commit_lsn: at,
            commit_time_us: now_us,
        };
        let readers = self.conns.into_iter().map(|sql| {
            let (work, next, out) = (&work, &next, out.clone());
            async move {
                let mut rows = 0u64;
                let mut seq = 0u32;
                while let Some(&(t, r)) =
                    work.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
                {
                    let shape = &plan[t].0;
                    let range = plan[t].1.ranges[r].clone();
                    rows += copy_range(&sql, shape, (t, r), range, chunk_rows, tx, &mut seq, &out)
                        .await?;
                }
                sql.batch_execute("COMMIT").await?;
                Ok::<u64, ReplicationError>(rows)
            }
        });
        let counts = futures::future::try_join_all(readers).await?;
        Ok(counts.into_iter().sum())
    }
}

/// Copy one key range in keyset chunks (a keyless table through a cursor).
#[allow(clippy::too_many_arguments)]
async fn copy_range(
    sql: &Client,
    shape: &Shape,
    (table, range_ix): (usize, usize),
    mut range: KeyRange,
    chunk_rows: usize,
    tx: TxMeta,
    seq: &mut u32,
    out: &mpsc::Sender<CopiedChunk>,
) -> Result<u64, ReplicationError> {
    let mut copied = 0u64;
    if shape.keyless {
        sql.batch_execute(&format!(
            "DECLARE pgcdc_snapshot NO SCROLL CURSOR FOR SELECT * FROM {}",
            shape.qualified
        ))
        .await?;
    }
    loop {
        let q = if shape.keyless {
            format!("FETCH {chunk_rows} FROM pgcdc_snapshot")
        } else {
            shape.chunk_query(&range, chunk_rows)
        };
        let rows: Vec<SimpleQueryRow> = sql
            .simple_query(&q)
            .await?
            .into_iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(row) => Some(row),
                _ => None,
            })
            .collect();
        let done = rows.len() < chunk_rows;
        if !shape.keyless {
            if let Some(row) = rows.last() {
                range.after = Some(shape.key_of(row));
            }
        }
        copied += rows.len() as u64;
        let first_seq = *seq;
        *seq = seq.wrapping_add(rows.len() as u32);
        let chunk = CopiedChunk {
            table,
            range: range_ix,
            rows: CopiedRows {
                table: shape.table.clone(),
                columns: shape.columns.clone(),
                rows,
                tx,
                first_seq,
            },
            after: range.after.clone(),
            done,
        };
        out.send(chunk)
            .await
            .map_err(|_| ReplicationError::StreamEnded)?;
        // Tests slow the copy down here (`sleep(ms)`) to interrupt it midway.
        fail::fail_point!(crate::wire::failpoint::SNAPSHOT_COPY_CHUNK);
        if done {
            break;
        }
    }
    if shape.keyless {
        sql.batch_execute("CLOSE pgcdc_snapshot").await?;
    }
    tracing::debug!(table = %shape.qualified, range = range_ix, rows = copied, "key range copied");
    Ok(copied)
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
            ..Default::default()
        }
        .validate(&mut errors);
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors[0].starts_with("snapshot.parallelism"));
        assert!(errors[1].starts_with("snapshot.chunk_rows"));
    }

    fn shape(keys: &[(&str, &str)]) -> Shape {
        let columns: Arc<[(String, u32)]> = keys.iter().map(|(c, _)| (c.to_string(), 25)).collect();
        Shape {
            table: Arc::new(TableRef {
                schema: "public".into(),
                name: "t".into(),
                key_columns: keys.iter().map(|(c, _)| c.to_string()).collect(),
                column_types: String::new(),
            }),
            qualified: "public.t".into(),
            key: keys
                .iter()
                .enumerate()
                .map(|(i, (_, cast))| (i, cast.to_string()))
                .collect(),
            columns,
            keyless: false,
        }
    }

    #[test]
    fn keyset_queries_compare_rows_and_quote_literals() {
        let s = shape(&[("Id", "integer"), ("name", "text")]);
        let range = KeyRange {
            after: Some(vec!["5".into(), "o'k".into()]),
            upto: Some(vec!["9".into(), "z".into()]),
            done: false,
        };
        assert_eq!(
            s.chunk_query(&range, 100),
            "SELECT * FROM public.t WHERE (\"Id\", \"name\") > ('5'::integer, 'o''k'::text) \
             AND (\"Id\", \"name\") <= ('9'::integer, 'z'::text) ORDER BY \"Id\", \"name\" LIMIT 100"
        );
        let open = KeyRange {
            after: None,
            upto: None,
            done: false,
        };
        assert_eq!(
            s.chunk_query(&open, 7),
            "SELECT * FROM public.t ORDER BY \"Id\", \"name\" LIMIT 7"
        );
    }
}
