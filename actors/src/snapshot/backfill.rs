//! Watermark backfill work: copy tables chunk by chunk while the stream
//! runs, each chunk between a low and a high mark in the WAL (see
//! [`super::watermark`]).

use std::sync::Arc;

use actix::Addr;
use futures::TryStreamExt;
use tokio_postgres::{Client, SimpleQueryMessage};

use super::copy::reader;
use super::shape::{RowSize, Shape};
use super::watermark::{ChunkOutcome, ChunkRead, Mark, Watermarks, WATERMARK_PREFIX};
use super::{SnapshotConfig, SnapshotError};
use crate::checkpoint::{CheckpointActor, TableProgress};
use crate::event::{TableRef, TxMeta};
use crate::lsn::Lsn;
use crate::messages::GetCheckpoint;
use crate::pg::{waits, PostgresConfig};

/// One run of the copy work.
pub(super) struct Backfill {
    /// The `[postgres]` section.
    pub pg: Arc<PostgresConfig>,
    /// The `[snapshot]` section.
    pub cfg: Arc<SnapshotConfig>,
    /// Chunks between their watermarks, shared with the stream.
    pub marks: Watermarks,
    /// The checkpoint store (unfinished copies).
    pub checkpoint: Addr<CheckpointActor>,
    /// The stream session the chunks are meant for.
    pub epoch: u64,
    /// The configured tables.
    pub tables: Vec<Arc<TableRef>>,
    /// The copies the stream asked for; `None`: read them from the checkpoint.
    pub pending: Option<Vec<TableProgress>>,
    /// Tables requested since (signals), copied from the start.
    pub requested: Vec<TableProgress>,
}

impl Backfill {
    /// Copy every pending and requested table, one after the other, naming
    /// the PostgreSQL sessions that keep a copy waiting.
    pub async fn run(self) -> Result<(), SnapshotError> {
        let pg = self.pg.clone();
        waits::reported(&pg, "a backfill", self.copy_all()).await
    }

    /// Copy every pending and requested table, one after the other.
    async fn copy_all(self) -> Result<(), SnapshotError> {
        let mut work = match self.pending.clone() {
            Some(w) => w,
            None => {
                let checkpoint = self.checkpoint.send(GetCheckpoint).await??;
                checkpoint.pending().cloned().collect()
            }
        };
        for p in &self.requested {
            work.retain(|q| (&q.schema, &q.name) != (&p.schema, &p.name));
            work.push(p.clone());
        }
        if work.is_empty() {
            return Ok(());
        }
        let sql = reader(&self.pg).await?;
        for progress in work {
            let qualified = format!("{}.{}", progress.schema, progress.name);
            let Some(table) = self
                .tables
                .iter()
                .find(|t| t.schema == progress.schema && t.name == progress.name)
            else {
                tracing::warn!(table = %qualified, "not a configured table; not copied");
                continue;
            };
            let shape = Shape::load(&sql, table, &self.pg.publication).await?;
            if shape.keyless() {
                return Err(SnapshotError::Keyless(qualified));
            }
            tracing::info!(table = %qualified, rows_before = progress.rows, "backfill started");
            let Some(progress) = self.copy(&sql, &shape, progress).await? else {
                return Ok(()); // the stream restarted; a new run takes over
            };
            tracing::info!(table = %qualified, rows = progress.rows, "backfill copied");
        }
        Ok(())
    }

    /// Copy every unfinished range of one table, chunk by chunk.
    async fn copy(
        &self,
        sql: &Client,
        shape: &Shape,
        mut progress: TableProgress,
    ) -> Result<Option<TableProgress>, SnapshotError> {
        let placeholder = TxMeta {
            xid: 0,
            commit_lsn: Lsn::ZERO,
            commit_time_us: 0,
        };
        let mut unsettled = Unsettled::default();
        let size = shape.row_size();
        let mut limit = self.cfg.chunk_rows;
        for r in 0..progress.ranges.len() {
            while !progress.ranges[r].done {
                let Some((id, outcome)) =
                    self.marks
                        .register(self.epoch, &progress.schema, &progress.name)
                else {
                    return Ok(None);
                };
                let before = progress.clone();
                let chunk = async {
                    self.mark(sql, id, false).await?;
                    let q = shape.chunk_query(&progress.ranges[r], limit);
                    let bound = Some((&size, self.cfg.chunk_bytes));
                    let SnapshotRead { rows, unseen, cut } =
                        read_in_snapshot(sql, &q, bound).await?;
                    fail::fail_point!(crate::wire::failpoint::SNAPSHOT_CHUNK);
                    let keyed = shape.events(&rows, placeholder, Lsn::ZERO, &mut 0);
                    let range = &mut progress.ranges[r];
                    range.done = !cut && keyed.len() < limit;
                    limit = next_limit(limit, cut, keyed.len(), self.cfg.chunk_rows);
                    if let Some((k, _)) = keyed.last() {
                        range.after = Some(k.clone());
                    }
                    progress.rows += keyed.len() as u64;
                    let rows = keyed.into_iter().map(|(_, e)| e).collect();
                    let progress = Some(progress.clone());
                    self.marks.fill(
                        id,
                        ChunkRead {
                            rows,
                            progress,
                            unseen,
                        },
                    );
                    self.mark(sql, id, true).await
                };
                if let Err(e) = chunk.await {
                    self.marks.forget(id);
                    return Err(e);
                }
                match outcome.await {
                    Ok(ChunkOutcome::Emitted) => unsettled = Unsettled::default(),
                    Ok(ChunkOutcome::Retry) => progress = before,
                    Ok(ChunkOutcome::NotYetVisible(xid)) => {
                        progress = before;
                        unsettled.wait(&shape.table, xid).await;
                    }
                    Err(_) => return Ok(None),
                }
            }
        }
        Ok(Some(progress))
    }

    /// Write a low or high watermark into the WAL.
    async fn mark(&self, sql: &Client, id: u64, high: bool) -> Result<(), SnapshotError> {
        write_mark(sql, &self.marks, &self.pg.slot, id, high).await
    }
}

/// What [`read_in_snapshot`] read.
pub(super) struct SnapshotRead {
    /// The rows kept.
    pub rows: Vec<SimpleQueryMessage>,
    /// The transactions in progress in the read's snapshot (it did not see them).
    pub unseen: Vec<u32>,
    /// The rows kept reached the byte bound: any after them were read and
    /// dropped.
    pub cut: bool,
}

/// Run the chunk query `query` in a snapshot of its own. With `bound`, the
/// rows after those that reach its bytes (as `RowSize` counts them) are
/// read and dropped, so a query of wide rows is never held whole.
pub(super) async fn read_in_snapshot(
    sql: &Client,
    query: &str,
    bound: Option<(&RowSize, usize)>,
) -> Result<SnapshotRead, tokio_postgres::Error> {
    let batch = format!(
        "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SELECT txid_current_snapshot()::text; {query}; COMMIT"
    );
    let read = async {
        let stream = sql.simple_query_raw(&batch).await?;
        futures::pin_mut!(stream);
        let mut read = SnapshotRead {
            rows: Vec::new(),
            unseen: Vec::new(),
            cut: false,
        };
        let (mut first, mut bytes) = (true, 0);
        while let Some(message) = stream.try_next().await? {
            let SimpleQueryMessage::Row(row) = message else {
                continue;
            };
            if std::mem::take(&mut first) {
                read.unseen = in_progress(row.get(0).unwrap_or_default());
                continue;
            }
            if read.cut {
                continue;
            }
            if let Some((size, most)) = bound {
                bytes += size.of(&row);
                read.cut = bytes >= most;
            }
            read.rows.push(SimpleQueryMessage::Row(row));
        }
        Ok(read)
    };
    let read = read.await;
    if read.is_err() {
        let _ = sql.batch_execute("ROLLBACK").await;
    }
    read
}

/// The row limit of the chunk query after one that asked for `limit` rows
/// and kept `kept`: as many as fitted the byte bound after a cut, twice as
/// many (up to `chunk_rows`) after a full chunk below it.
fn next_limit(limit: usize, cut: bool, kept: usize, chunk_rows: usize) -> usize {
    match (cut, kept >= limit) {
        (true, _) => kept.max(1),
        (false, true) => limit.saturating_mul(2).min(chunk_rows),
        (false, false) => limit,
    }
}

/// The in-progress transactions of a snapshot written as `xmin:xmax:xip,…`
/// (epoch-extended ids, reduced to the 32 bits the stream carries).
fn in_progress(snapshot: &str) -> Vec<u32> {
    let xip = snapshot.splitn(3, ':').nth(2).unwrap_or_default();
    xip.split(',')
        .filter_map(|x| x.trim().parse::<u64>().ok())
        .map(|x| x as u32)
        .collect()
}

/// Chunks read again because a transaction that committed before their
/// low mark was not yet visible: said, and paced.
#[derive(Default)]
pub(super) struct Unsettled {
    tries: u32,
}

impl Unsettled {
    /// Log and wait before the next read: 100 ms, doubling up to 5 s.
    pub(super) async fn wait(&mut self, table: &TableRef, xid: u32) {
        self.tries += 1;
        let table = format!("{}.{}", table.schema, table.name);
        crate::metrics::metrics()
            .chunks_read_again
            .with_label_values(&[table.as_str()])
            .inc();
        let pause = std::time::Duration::from_millis(50 << self.tries.min(7))
            .min(std::time::Duration::from_secs(5));
        tracing::warn!(table = %table, xid, tries = self.tries, "backfill chunk read again: transaction {xid} committed before the chunk's low mark but was not yet visible to its read (a commit waiting for a synchronous standby stays invisible)");
        tokio::time::sleep(pause).await;
    }
}

/// Write the low or high watermark of chunk `id` of `slot` into the WAL.
pub(super) async fn write_mark(
    sql: &Client,
    marks: &Watermarks,
    slot: &str,
    id: u64,
    high: bool,
) -> Result<(), SnapshotError> {
    let mark = Mark::signed(marks.key(), slot, id, high);
    let content = serde_json::to_string(&mark).unwrap_or_default();
    sql.execute(
        "SELECT pg_logical_emit_message(true, $1, $2)",
        &[&WATERMARK_PREFIX, &content],
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{in_progress, next_limit};

    #[test]
    fn a_cut_chunk_sets_the_next_limit_to_what_fitted_and_full_chunks_grow_it_back() {
        assert_eq!(next_limit(2500, true, 16, 2500), 16);
        assert_eq!(next_limit(16, true, 1, 2500), 1);
        assert_eq!(next_limit(16, false, 16, 2500), 32);
        assert_eq!(next_limit(2000, false, 2000, 2500), 2500);
        assert_eq!(next_limit(2500, false, 2500, 2500), 2500);
        // The range's last chunk: fewer rows than asked, nothing cut.
        assert_eq!(next_limit(32, false, 5, 2500), 32);
    }

    #[test]
    fn a_snapshots_in_progress_transactions_are_read_as_stream_xids() {
        assert_eq!(in_progress("100:104:100,102"), vec![100, 102]);
        assert_eq!(in_progress("100:100:"), Vec::<u32>::new());
        // Epoch-extended ids (epoch 1) reduce to the 32-bit xid decoding reports.
        assert_eq!(in_progress("4294967396:4294967400:4294967398"), vec![102]);
    }
}
