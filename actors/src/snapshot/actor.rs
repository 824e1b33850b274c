//! SnapshotActor: copies tables by watermark backfill while the stream runs
//! (the rest of an interrupted initial snapshot, tables added to the
//! configuration, `pgcdc snapshot --table`). Supervised like the others: an
//! error or a panic restarts it with backoff, and it picks up from the
//! progress in the checkpoint.

use std::sync::Arc;

use actix::prelude::*;
use tokio_postgres::Client;

use super::watermark::{ChunkOutcome, Mark, Watermarks, WATERMARK_PREFIX};
use super::{reader, Shape, SnapshotConfig};
use crate::checkpoint::{CheckpointActor, TableProgress};
use crate::error::ErrorClass;
use crate::event::{TableRef, TxMeta};
use crate::lsn::Lsn;
use crate::messages::GetCheckpoint;
use crate::replication::{PostgresConfig, ReplicationError};
use crate::supervision::{spawn_after_backoff, task_outcome, RestartBudget};

/// The stream (re)started as session `epoch`: copy `pending`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StreamStarted {
    /// The watermark session of the new stream.
    pub epoch: u64,
    /// The configured tables.
    pub tables: Vec<Arc<TableRef>>,
    /// Copies to finish (unfinished in the checkpoint, or added to the configuration).
    pub pending: Vec<TableProgress>,
}

/// Copy a table again from the start (a signal seen in the stream).
#[derive(Message)]
#[rtype(result = "()")]
pub struct BackfillTable {
    /// The table, with fresh progress.
    pub progress: TableProgress,
}

/// The snapshot actor (supervised).
pub struct SnapshotActor {
    pg: Arc<PostgresConfig>,
    cfg: Arc<SnapshotConfig>,
    marks: Watermarks,
    checkpoint: Addr<CheckpointActor>,
    budget: RestartBudget,
    stream: Option<(u64, Vec<Arc<TableRef>>)>,
    pending: Option<Vec<TableProgress>>,
    requested: Vec<TableProgress>,
    generation: u64,
    task: Option<tokio::task::AbortHandle>,
}

impl SnapshotActor {
    /// A snapshot actor copying from `pg` through the watermarks in `marks`.
    pub fn new(
        pg: Arc<PostgresConfig>,
        cfg: Arc<SnapshotConfig>,
        marks: Watermarks,
        checkpoint: Addr<CheckpointActor>,
        budget: RestartBudget,
    ) -> Self {
        Self {
            pg,
            cfg,
            marks,
            checkpoint,
            budget,
            stream: None,
            pending: None,
            requested: Vec::new(),
            generation: 0,
            task: None,
        }
    }

    /// (Re)start the copy work for the current stream session: the list
    /// the stream gave, or (after a restart or a new request) what the
    /// checkpoint says is unfinished.
    fn launch(&mut self, ctx: &mut Context<Self>) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
        let Some((epoch, tables)) = self.stream.clone() else {
            return;
        };
        self.generation += 1;
        let generation = self.generation;
        let work = Backfill {
            pg: self.pg.clone(),
            cfg: self.cfg.clone(),
            marks: self.marks.clone(),
            checkpoint: self.checkpoint.clone(),
            epoch,
            tables,
            pending: self.pending.take(),
            requested: self.requested.clone(),
        };
        let handle = spawn_after_backoff(&self.budget, work.run());
        self.task = Some(handle.abort_handle());
        ctx.spawn(handle.into_actor(self).map(move |res, act, ctx| {
            if generation != act.generation {
                return; // replaced by a newer launch
            }
            if let Ok(Err(e)) = &res {
                if let ErrorClass::Fatal(code) = e.class() {
                    act.budget.fatal(code, "snapshot cannot continue", e);
                    return;
                }
            }
            match task_outcome("snapshot", res) {
                Ok(()) => act.requested.clear(),
                Err(_) => ctx.stop(),
            }
        }));
    }
}

impl Actor for SnapshotActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.launch(ctx);
    }
}

impl Supervised for SnapshotActor {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        self.budget.record();
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

impl Handler<StreamStarted> for SnapshotActor {
    type Result = ();

    fn handle(&mut self, msg: StreamStarted, ctx: &mut Self::Context) {
        self.stream = Some((msg.epoch, msg.tables));
        self.pending = Some(msg.pending);
        self.requested.clear();
        self.launch(ctx);
    }
}

impl Handler<BackfillTable> for SnapshotActor {
    type Result = ();

    fn handle(&mut self, msg: BackfillTable, ctx: &mut Self::Context) {
        let p = msg.progress;
        self.requested
            .retain(|q| (&q.schema, &q.name) != (&p.schema, &p.name));
        self.requested.push(p);
        self.launch(ctx);
    }
}

/// One run of the copy work.
struct Backfill {
    pg: Arc<PostgresConfig>,
    cfg: Arc<SnapshotConfig>,
    marks: Watermarks,
    checkpoint: Addr<CheckpointActor>,
    epoch: u64,
    tables: Vec<Arc<TableRef>>,
    pending: Option<Vec<TableProgress>>,
    requested: Vec<TableProgress>,
}

impl Backfill {
    async fn run(self) -> Result<(), ReplicationError> {
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
            let shape = Shape::load(&sql, table).await?;
            if shape.keyless() {
                return Err(ReplicationError::SlotGap(format!(
                    "table {qualified} has no primary key, so it cannot be copied while streaming \
                     (its initial snapshot was interrupted or it was added later)"
                )));
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
    ) -> Result<Option<TableProgress>, ReplicationError> {
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
                    self.marks.fill(id, events, progress.clone());
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
    async fn mark(&self, sql: &Client, id: u64, high: bool) -> Result<(), ReplicationError> {
        let mark = Mark {
            slot: self.pg.slot.clone(),
            id,
            high,
        };
        let content = serde_json::to_string(&mark).unwrap_or_default();
        sql.execute(
            "SELECT pg_logical_emit_message(true, $1, $2)",
            &[&WATERMARK_PREFIX, &content],
        )
        .await?;
        Ok(())
    }
}
