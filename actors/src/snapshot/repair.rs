//! Repairs (`pgcdc verify --repair`): copy given keys of a table again
//! through the watermark windows, as a backfill copies ranges. A key with
//! a row is emitted as a read (`op=r`); a key without one as a delete
//! (`op=d`), so a document the table no longer has is removed the same
//! consistent way: a key changed between the marks is dropped from the
//! chunk, the stream carrying a change at least as new.
//!
//! A repair is not checkpointed: one cut short by a restart is simply
//! asked for again (`pgcdc verify --repair` verifies after repairing).

use std::collections::HashSet;
use std::sync::Arc;

use tokio_postgres::{Client, SimpleQueryMessage};

use super::backfill::write_mark;
use super::backfill::{read_in_snapshot, Unsettled};
use super::copy::reader;
use super::shape::Shape;
use super::watermark::{ChunkOutcome, ChunkRead, Watermarks};
use super::{SnapshotConfig, SnapshotError};
use crate::checkpoint::KeyText;
use crate::es_writer::doc_id;
use crate::event::{ChangeEvent, Op, TableRef, TxMeta};
use crate::lsn::Lsn;
use crate::pg::{waits, PostgresConfig};

/// One repair request.
pub(super) struct Repair {
    /// The `[postgres]` section.
    pub pg: Arc<PostgresConfig>,
    /// The `[snapshot]` section (chunk size).
    pub cfg: Arc<SnapshotConfig>,
    /// Chunks between their watermarks, shared with the stream.
    pub marks: Watermarks,
    /// The stream session the chunks are meant for.
    pub epoch: u64,
    /// The table.
    pub table: Arc<TableRef>,
    /// The keys to copy again.
    pub keys: Vec<KeyText>,
}

impl Repair {
    /// Copy every key, chunk by chunk, each chunk between its marks, naming
    /// the PostgreSQL sessions that keep a read waiting.
    pub async fn run(self) -> Result<(), SnapshotError> {
        waits::reported(&self.pg, "a repair", self.copy_keys()).await
    }

    /// Copy every key, chunk by chunk.
    async fn copy_keys(&self) -> Result<(), SnapshotError> {
        let sql = reader(&self.pg).await?;
        let shape = Shape::load(&sql, &self.table, &self.pg.publication).await?;
        if shape.keyless() {
            let t = &self.table;
            return Err(SnapshotError::Keyless(format!("{}.{}", t.schema, t.name)));
        }
        for keys in self.keys.chunks(self.cfg.chunk_rows.max(1)) {
            if !self.chunk(&sql, &shape, keys).await? {
                return Ok(()); // the stream restarted: the request is gone with it
            }
        }
        tracing::info!(table = %shape.qualified, keys = self.keys.len(), "repair copied");
        Ok(())
    }

    /// Copy one chunk of keys until the stream emitted it; `false` if the
    /// stream session ended.
    async fn chunk(
        &self,
        sql: &Client,
        shape: &Shape,
        keys: &[KeyText],
    ) -> Result<bool, SnapshotError> {
        let (schema, name) = (&self.table.schema, &self.table.name);
        let mut unsettled = Unsettled::default();
        loop {
            let Some((id, outcome)) = self.marks.register(self.epoch, schema, name) else {
                return Ok(false);
            };
            let chunk = async {
                write_mark(sql, &self.marks, &self.pg.slot, id, false).await?;
                let (rows, unseen) = read_keys(sql, shape, keys).await?;
                let progress = None;
                self.marks.fill(
                    id,
                    ChunkRead {
                        rows,
                        progress,
                        unseen,
                    },
                );
                write_mark(sql, &self.marks, &self.pg.slot, id, true).await
            };
            if let Err(e) = chunk.await {
                self.marks.forget(id);
                return Err(e);
            }
            match outcome.await {
                Ok(ChunkOutcome::Emitted) => return Ok(true),
                Ok(ChunkOutcome::Retry) => continue,
                Ok(ChunkOutcome::NotYetVisible(xid)) => {
                    unsettled.wait(&shape.table, xid).await;
                }
                Err(_) => return Ok(false),
            }
        }
    }
}

/// The rows of `keys` as reads, and a delete for each key without a row;
/// with the transactions the reads did not see.
async fn read_keys(
    sql: &Client,
    shape: &Shape,
    keys: &[KeyText],
) -> Result<(Vec<ChangeEvent>, Vec<u32>), SnapshotError> {
    let (rows, unseen) = rows_of(sql, shape, keys).await?;
    let placeholder = TxMeta::default();
    let mut events: Vec<ChangeEvent> = shape
        .events(&rows, placeholder, Lsn::ZERO, &mut 0)
        .into_iter()
        .map(|(_, e)| e)
        .collect();
    let found: HashSet<String> = events
        .iter()
        .filter_map(|e| e.key.as_ref().map(|k| doc_id(&k.to_map())))
        .collect();
    for k in keys {
        let key = shape.key_map(k);
        if !found.contains(&doc_id(&key)) {
            events.push(delete(shape, key));
        }
    }
    Ok((events, unseen))
}

/// The rows of `keys` and the transactions their reads did not see; a key
/// PostgreSQL cannot read as its column's type (a stray document's) has none.
async fn rows_of(
    sql: &Client,
    shape: &Shape,
    keys: &[KeyText],
) -> Result<(Vec<SimpleQueryMessage>, Vec<u32>), SnapshotError> {
    // Every row of `keys` is kept: a key not read back counts as deleted.
    match read_in_snapshot(sql, &shape.keys_query(keys), None).await {
        Ok(read) => Ok((read.rows, read.unseen)),
        Err(e) if e.as_db_error().is_some() && keys.len() > 1 => {
            let (mut rows, mut unseen) = (Vec::new(), Vec::new());
            for k in keys {
                let (r, u) = Box::pin(rows_of(sql, shape, std::slice::from_ref(k))).await?;
                rows.extend(r);
                unseen.extend(u);
            }
            Ok((rows, unseen))
        }
        Err(e) if e.as_db_error().is_some() => Ok((Vec::new(), Vec::new())),
        Err(e) => Err(e.into()),
    }
}

/// A delete of the row with `key` (its position set by the stream).
fn delete(shape: &Shape, key: serde_json::Map<String, serde_json::Value>) -> ChangeEvent {
    ChangeEvent {
        op: Op::Delete,
        table: shape.table.clone(),
        before: Some(key.clone().into()),
        key: Some(key.into()),
        after: None,
        unchanged_toast: Vec::new(),
        lsn: Lsn::ZERO,
        seq: 0,
        tx: TxMeta::default(),
        snapshot: true,
    }
}
