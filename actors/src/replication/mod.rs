//! ReplicationActor: owns the replication connection, decodes pgoutput and
//! hands whole transactions (in bounded batches) to the Kafka producer.
//!
//! Every start (first start or supervised restart) re-reads the checkpoint,
//! re-checks the slot against it and opens a new producer session, so a
//! restarted stream resumes exactly at the last durably acknowledged commit.
//!
//! This file holds the actor only. The session's work is in `stream` (the
//! streaming task) and `start` (checks, slot, initial snapshot); what to
//! report to PostgreSQL and when is the pure policy in `flush`; [`decode`]
//! and `assembler` turn pgoutput into events; [`slot`] decides where a
//! stream may start without a gap.
//!
//! Dependencies point one way: replication uses [`crate::snapshot`] (the
//! initial copy, backfills) and [`crate::pg`]; neither uses replication.

mod assembler;
mod batch;
pub mod decode;
mod error;
mod flush;
mod scope;
pub mod slot;
mod start;
mod stream;
mod tuple;

use std::sync::Arc;

use actix::prelude::*;
use tokio::sync::{oneshot, watch};

pub use assembler::{AssembleError, Assembler};
pub use error::ReplicationError;

use crate::checkpoint::CheckpointActor;
use crate::error::{ErrorClass, ExitCode};
use crate::kafka_producer::KafkaProducerActor;
use crate::lsn::Lsn;
use crate::messages::{LsnPersisted, SessionBroken, StopStreaming};
use crate::pg::PostgresConfig;
use crate::snapshot::watermark::Watermarks;
use crate::snapshot::{SnapshotActor, SnapshotConfig};
use crate::supervision::{spawn_after_backoff_or_stop, task_outcome, RestartBudget};
use stream::Stream;

/// The replication actor (supervised).
pub struct ReplicationActor {
    /// The `[postgres]` section.
    config: Arc<PostgresConfig>,
    /// The `[snapshot]` section.
    snapshot: Arc<SnapshotConfig>,
    /// The snapshot actor, for backfills.
    snapshots: Addr<SnapshotActor>,
    /// Backfill chunks between their watermarks, shared with `snapshots`.
    marks: Watermarks,
    /// Where batches go.
    producer: Addr<KafkaProducerActor>,
    /// The checkpoint store.
    checkpoint: Addr<CheckpointActor>,
    /// Restarts so far and the backoff before the next start.
    budget: RestartBudget,
    /// The current producer session (one per start).
    session: u64,
    /// Persisted positions for the current stream task (only ever raised).
    confirm: Option<watch::Sender<Lsn>>,
    /// Tells the current stream task to stop.
    stop: Option<watch::Sender<bool>>,
    /// Waiters of `StopStreaming`, answered once the stream ended.
    stopped: Vec<oneshot::Sender<()>>,
    /// The last stream task failed because PostgreSQL was unreachable.
    unreachable: bool,
    /// Shutting down: a restart must not start a new stream.
    stopping: bool,
    /// The current stream task, aborted before a restart starts another.
    task: Option<tokio::task::AbortHandle>,
}

impl ReplicationActor {
    /// A replication actor streaming `config`'s tables into `producer`;
    /// backfills run on `snapshots`, meeting the stream at `marks`.
    pub fn new(
        config: Arc<PostgresConfig>,
        snapshot: Arc<SnapshotConfig>,
        (snapshots, marks): (Addr<SnapshotActor>, Watermarks),
        producer: Addr<KafkaProducerActor>,
        checkpoint: Addr<CheckpointActor>,
        budget: RestartBudget,
    ) -> Self {
        Self {
            config,
            snapshot,
            snapshots,
            marks,
            producer,
            checkpoint,
            budget,
            session: 0,
            confirm: None,
            stop: None,
            stopped: Vec::new(),
            unreachable: false,
            stopping: false,
            task: None,
        }
    }
}

impl Actor for ReplicationActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        if self.stopping {
            self.stopped.drain(..).for_each(|w| {
                let _ = w.send(());
            });
            return;
        }
        self.session += 1;
        let (confirm_tx, confirm_rx) = watch::channel(Lsn::ZERO);
        let (stop_tx, stop_rx) = watch::channel(false);
        self.confirm = Some(confirm_tx);
        self.stop = Some(stop_tx);
        let stream = Stream {
            config: self.config.clone(),
            snapshot: self.snapshot.clone(),
            snapshots: self.snapshots.clone(),
            marks: self.marks.clone(),
            producer: self.producer.clone(),
            checkpoint: self.checkpoint.clone(),
            me: ctx.address(),
            session: self.session,
            confirm: confirm_rx,
            stop: stop_rx.clone(),
        };
        let handle = spawn_after_backoff_or_stop(&self.budget, stop_rx, stream.run());
        self.task = Some(handle.abort_handle());
        ctx.spawn(handle.into_actor(self).map(|res, act, ctx| {
            let unreachable = matches!(&res, Ok(Err(e)) if e.is_unreachable());
            if let Ok(Err(e)) = &res {
                if let ErrorClass::Fatal(code) = e.class() {
                    act.budget.fatal(code, "replication cannot continue", e);
                    return;
                }
            }
            act.unreachable = unreachable;
            match task_outcome("replication", res) {
                Ok(()) => act.stopped.drain(..).for_each(|w| {
                    let _ = w.send(());
                }),
                Err(_) => ctx.stop(),
            }
        }));
    }
}

impl Supervised for ReplicationActor {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        if self.unreachable && self.budget.recent() >= self.budget.limit() {
            self.budget.fatal(
                ExitCode::Upstream,
                "postgresql stayed unreachable",
                &"restart budget spent",
            );
        }
        self.budget.record();
        // The old stream task (and its replication connection) must be gone
        // before a new one claims the slot.
        if let Some(task) = self.task.take() {
            task.abort();
        }
        self.confirm = None;
        self.stop = None;
    }
}

impl Handler<LsnPersisted> for ReplicationActor {
    type Result = ();

    fn handle(&mut self, msg: LsnPersisted, _ctx: &mut Self::Context) {
        if let Some(c) = &self.confirm {
            c.send_if_modified(|cur| flush::raise(cur, msg.lsn));
        }
    }
}

impl Handler<SessionBroken> for ReplicationActor {
    type Result = ();

    fn handle(&mut self, msg: SessionBroken, ctx: &mut Self::Context) {
        if msg.session == self.session {
            tracing::warn!(session = msg.session, reason = %msg.reason, "producer session broke; restarting stream from checkpoint");
            ctx.stop();
        }
    }
}

impl Handler<StopStreaming> for ReplicationActor {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _msg: StopStreaming, _ctx: &mut Self::Context) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        self.stopped.push(tx);
        self.stopping = true;
        match &self.stop {
            Some(stop) => {
                let _ = stop.send(true);
            }
            None => self.stopped.drain(..).for_each(|w| {
                let _ = w.send(());
            }),
        }
        Box::pin(async move {
            let _ = rx.await;
        })
    }
}
