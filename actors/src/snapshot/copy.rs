//! The initial copy: reader connections that imported the slot's exported
//! snapshot copy every table's key ranges in parallel, in keyset chunks,
//! and hand each chunk to the replication stream for Kafka.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_postgres::{Client, SimpleQueryRow};

use super::shape::{lock_partitioned, Pieces, Shape};
use super::{SnapshotConfig, SnapshotError};
use crate::checkpoint::{KeyRange, KeyText, TableProgress};
use crate::event::{CopiedRows, TableRef, TxMeta};
use crate::lsn::Lsn;
use crate::pg::quote::quote_literal;
use crate::pg::{session, PostgresConfig};

/// A SQL connection for reading rows, with the session settings applied.
pub(crate) async fn reader(pg: &PostgresConfig) -> Result<Client, SnapshotError> {
    let sql = crate::pg::connect(pg).await?;
    session::apply(&sql).await?;
    Ok(sql)
}

/// A copied chunk on its way to Kafka.
pub(crate) struct CopiedChunk {
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
pub(crate) struct SnapshotReaders {
    /// One connection per reader, each inside the imported snapshot's transaction.
    conns: Vec<Client>,
}

/// Open `cfg.parallelism` connections and import `snapshot` on each. Must
/// finish before the replication session runs its next command.
pub(crate) async fn import_snapshot(
    pg: &PostgresConfig,
    cfg: &SnapshotConfig,
    snapshot: &str,
) -> Result<SnapshotReaders, SnapshotError> {
    let mut conns = Vec::with_capacity(cfg.parallelism);
    for _ in 0..cfg.parallelism {
        let sql = reader(pg).await?;
        let import = format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
            quote_literal(snapshot)
        );
        sql.batch_execute(&import).await?;
        conns.push(sql);
    }
    Ok(SnapshotReaders { conns })
}

impl SnapshotReaders {
    /// Plan the copy: each table's shape (as `publication` sends it) and key ranges.
    pub(crate) async fn plan(
        &self,
        tables: &[Arc<TableRef>],
        cfg: &SnapshotConfig,
        publication: &str,
    ) -> Result<Vec<(Shape, TableProgress)>, SnapshotError> {
        let sql = &self.conns[0];
        let mut plan = Vec::with_capacity(tables.len());
        let mut partitioned = Vec::new();
        for t in tables {
            let mut shape = Shape::load(sql, t, publication).await?;
            if shape.pin_partitions(sql).await? {
                partitioned.push(shape.qualified.clone());
            }
            let ranges = shape.split(sql, cfg.parallelism, cfg.chunk_rows).await?;
            let progress = TableProgress {
                ranges,
                ..TableProgress::fresh(&t.schema, &t.name)
            };
            plan.push((shape, progress));
        }
        // Every reader holds the roots' locks: the first one's ends with its
        // transaction, maybe before another reader's copy of the table.
        for reader in &self.conns[1..] {
            lock_partitioned(reader, &partitioned).await?;
        }
        Ok(plan)
    }

    /// Copy every range of `plan` as of the imported snapshot (taken at
    /// `at`), sending chunks to `out`. Returns the number of rows copied.
    pub(crate) async fn copy(
        self,
        plan: &[(Shape, TableProgress)],
        cfg: &SnapshotConfig,
        at: Lsn,
        out: mpsc::Sender<CopiedChunk>,
    ) -> Result<u64, SnapshotError> {
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
                    rows += copy_range(&sql, shape, (t, r), range, cfg, tx, &mut seq, &out).await?;
                }
                sql.batch_execute("COMMIT").await?;
                Ok::<u64, SnapshotError>(rows)
            }
        });
        let counts = futures::future::try_join_all(readers).await?;
        Ok(counts.into_iter().sum())
    }
}

/// Copy one key range in keyset chunks (a keyless table through a cursor).
/// A query's rows are sent on as they arrive, in chunks cut at
/// `cfg.chunk_bytes` of row text, so a query of wide rows is never held
/// whole; while the chunks wait, PostgreSQL waits on the socket.
#[allow(clippy::too_many_arguments)]
async fn copy_range(
    sql: &Client,
    shape: &Shape,
    (table, range_ix): (usize, usize),
    mut range: KeyRange,
    cfg: &SnapshotConfig,
    tx: TxMeta,
    seq: &mut u32,
    out: &mpsc::Sender<CopiedChunk>,
) -> Result<u64, SnapshotError> {
    let mut copied = 0u64;
    if shape.keyless() {
        sql.batch_execute(&format!(
            "DECLARE pgcdc_snapshot NO SCROLL CURSOR FOR SELECT {} FROM {}",
            shape.select_list(),
            shape.from
        ))
        .await?;
    }
    let mut send = |rows: Vec<SimpleQueryRow>, range: &mut KeyRange, done: bool| {
        if !shape.keyless() {
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
                raw: shape.raw,
                rows,
                tx,
                first_seq,
            },
            after: range.after.clone(),
            done,
        };
        async move {
            out.send(chunk)
                .await
                .map_err(|_| SnapshotError::CopyAbandoned)?;
            // Tests slow the copy down here (`sleep(ms)`) to interrupt it midway.
            fail::fail_point!(crate::wire::failpoint::SNAPSHOT_COPY_CHUNK);
            Ok::<(), SnapshotError>(())
        }
    };
    loop {
        let q = if shape.keyless() {
            format!("FETCH {} FROM pgcdc_snapshot", cfg.chunk_rows)
        } else {
            shape.chunk_query(&range, cfg.chunk_rows)
        };
        let mut pieces = Pieces::start(sql, &q, shape.row_size(), cfg.chunk_bytes).await?;
        // One piece is held back: the query's last one ends the range if
        // the query found fewer than `chunk_rows` rows.
        let mut held = None;
        while let Some(piece) = pieces.next().await? {
            if let Some(rows) = held.replace(piece) {
                send(rows, &mut range, false).await?;
            }
        }
        // Without rows, the query found fewer than `chunk_rows`.
        let done = pieces.read() < cfg.chunk_rows;
        send(held.unwrap_or_default(), &mut range, done).await?;
        if done {
            break;
        }
    }
    if shape.keyless() {
        sql.batch_execute("CLOSE pgcdc_snapshot").await?;
    }
    tracing::debug!(table = %shape.qualified, range = range_ix, rows = copied, "key range copied");
    Ok(copied)
}
