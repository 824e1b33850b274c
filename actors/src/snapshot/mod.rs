//! Copying existing rows: the initial snapshot and backfills.
//!
//! **Initial snapshot.** `CREATE_REPLICATION_SLOT … (SNAPSHOT 'export')`
//! exports the slot's consistent point as a snapshot. Every reader connection
//! imports it (`SET TRANSACTION SNAPSHOT`, REPEATABLE READ, READ ONLY) before
//! the replication session moves on, so the copy and the stream meet exactly
//! at the consistent point: no gap, no overlap. Large tables are split into
//! primary-key ranges read in parallel; each range is read in keyset chunks of
//! `chunk_rows` rows, passed on as they arrive in pieces cut at `chunk_bytes`,
//! so memory stays bounded whatever the table or row size. Rows are
//! `op=r` events versioned with the consistent point.
//!
//! **Progress.** Every chunk's rows travel to Kafka with the new progress of
//! their table (the last key copied in their range); the checkpoint stores the
//! progress in the same synced write as the LSN, only once Kafka acknowledged
//! the rows. A restart never starts over: what is left is copied by watermark
//! backfill ([`watermark`], [`SnapshotActor`]) while the stream runs from the
//! consistent point.
//!
//! This file holds the actor (it runs the backfills); `config` is the
//! `[snapshot]` section, `shape` a table's columns and keyset SQL, `copy`
//! the initial copy (run by the replication stream on the readers it opens
//! with [`import_snapshot`]), `backfill` the watermark copy work.
//!
//! Dependencies point one way: this module uses [`crate::pg`] and never
//! [`crate::replication`], which uses it.

mod backfill;
mod config;
mod copy;
mod error;
mod message;
mod repair;
pub(crate) mod shape;
mod sign;
pub mod watermark;

use std::sync::Arc;

use actix::prelude::*;

pub use config::{SnapshotConfig, SnapshotMode};
pub(crate) use copy::{import_snapshot, reader};
pub use error::SnapshotError;
pub(crate) use shape::{cell as row_cell, read_event, Shape};

use crate::checkpoint::{CheckpointActor, TableProgress};
use crate::error::ErrorClass;
use crate::event::TableRef;
use crate::pg::PostgresConfig;
use crate::supervision::{spawn_after_backoff, task_outcome, RestartBudget};
use backfill::Backfill;
use watermark::Watermarks;

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

/// Copy these keys of a table again (a repair signal seen in the stream).
#[derive(Message)]
#[rtype(result = "()")]
pub struct RepairKeys {
    /// The table.
    pub table: Arc<TableRef>,
    /// Key texts, in key order.
    pub keys: Vec<crate::checkpoint::KeyText>,
}

/// The snapshot actor (supervised).
pub struct SnapshotActor {
    /// The `[postgres]` section.
    pg: Arc<PostgresConfig>,
    /// The `[snapshot]` section.
    cfg: Arc<SnapshotConfig>,
    /// Chunks between their watermarks, shared with the stream.
    marks: Watermarks,
    /// The checkpoint store.
    checkpoint: Addr<CheckpointActor>,
    /// Restarts so far and the backoff before the next start.
    budget: RestartBudget,
    /// The current stream session and its tables, once the stream started.
    stream: Option<(u64, Vec<Arc<TableRef>>)>,
    /// The copies the stream asked for, taken by the next launch.
    pending: Option<Vec<TableProgress>>,
    /// Tables requested by signal and not yet copied.
    requested: Vec<TableProgress>,
    /// Counts launches, so a replaced run's result is ignored.
    generation: u64,
    /// The current copy task, aborted when replaced or restarted.
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

impl Handler<RepairKeys> for SnapshotActor {
    type Result = ();

    /// Run the repair beside the backfill work; it ends with the stream
    /// session (its chunks are refused then) and is not retried: the
    /// verification that asked for it checks the result.
    fn handle(&mut self, msg: RepairKeys, _ctx: &mut Self::Context) {
        let Some((epoch, _)) = &self.stream else {
            return;
        };
        let repair = repair::Repair {
            pg: self.pg.clone(),
            cfg: self.cfg.clone(),
            marks: self.marks.clone(),
            epoch: *epoch,
            table: msg.table,
            keys: msg.keys,
        };
        tokio::spawn(async move {
            if let Err(e) = repair.run().await {
                tracing::warn!(error = %e, "repair failed; run pgcdc verify --repair again");
            }
        });
    }
}
