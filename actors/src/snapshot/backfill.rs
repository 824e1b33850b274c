//! Watermark backfill work: copy tables chunk by chunk while the stream
//! runs, each chunk between a low and a high mark in the WAL (see
//! [`super::watermark`]).

use std::sync::Arc;

use actix::Addr;
use tokio_postgres::Client;

use super::copy::reader;
use super::shape::Shape;
use super::watermark::{ChunkOutcome, Mark, Watermarks, WATERMARK_PREFIX};
use super::{SnapshotConfig, SnapshotError};
use crate::checkpoint::{CheckpointActor, TableProgress};
use crate::event::{TableRef, TxMeta};
use crate::lsn::Lsn;
use crate::messages::GetCheckpoint;
use crate::pg::PostgresConfig;

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
    /// Copy every pending and requested table, one after the other.
    pub async fn run(self) -> Result<(), SnapshotError> {
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
                    let q = shape.chunk_query(&progress.ranges[r], self.cfg.chunk_rows);
                    let rows = sql.simple_query(&q).await?;
                    fail::fail_point!(crate::wire::failpoint::SNAPSHOT_CHUNK);
                    let keyed = shape.events(&rows, placeholder, Lsn::ZERO, &mut 0);
                    let range = &mut progress.ranges[r];
                    range.done = keyed.len() < self.cfg.chunk_rows;
                    if let Some((k, _)) = keyed.last() {
                        range.after = Some(k.clone());
                    }
                    progress.rows += keyed.len() as u64;
                    let events = keyed.into_iter().map(|(_, e)| e).collect();
                    self.marks.fill(id, events, Some(progress.clone()));
                    self.mark(sql, id, true).await
                };
                if let Err(e) = chunk.await {
                    self.marks.forget(id);
                    return Err(e);
                }
                match outcome.await {
                    Ok(ChunkOutcome::Emitted) => {}
                    Ok(ChunkOutcome::Retry) => progress = before,
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
