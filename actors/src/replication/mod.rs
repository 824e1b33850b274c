//! ReplicationActor: owns the replication connection, decodes pgoutput and
//! hands whole transactions (in bounded batches) to the Kafka producer.
//!
//! Every start (first start or supervised restart) re-reads the checkpoint,
//! re-checks the slot against it and opens a new producer session, so a
//! restarted stream resumes exactly at the last durably acknowledged commit.

mod assembler;
mod config;
pub mod decode;
pub mod slot;
pub mod values;

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use pgwire_replication::{ReplicationClient, ReplicationConfig, ReplicationEvent, TlsConfig};
use tokio::sync::{oneshot, watch};

pub use assembler::{AssembleError, Assembler};
pub use config::{parse_table_name, quote_ident, PostgresConfig};

use crate::checkpoint::{CheckpointActor, CheckpointError, SlotIdentity, TableProgress};
use crate::error::{ErrorClass, ExitCode};
use crate::event::{ChangeEvent, CopiedRows, TableRef};
use crate::kafka_producer::{KafkaProducerActor, ProducerError};
use crate::lsn::Lsn;
use crate::messages::{
    GetCheckpoint, LsnPersisted, OpenSession, PersistSlotIdentity, PublishBatch, SessionBroken,
    StopStreaming,
};
use crate::snapshot::watermark::{MessageAction, Watermarks, Windows};
use crate::snapshot::{BackfillTable, SnapshotActor, SnapshotConfig, SnapshotMode, StreamStarted};
use crate::supervision::{spawn_after_backoff, task_outcome, RestartBudget};

/// Session settings pinned on the replication connection so values are
/// rendered the way the value converter expects.
const SESSION_OPTIONS: &str =
    "-c datestyle=ISO,YMD -c timezone=UTC -c intervalstyle=iso_8601 -c extra_float_digits=3 -c bytea_output=hex";

/// Replication failures.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    /// PostgreSQL is not set up for pgcdc; the message says how to fix it.
    #[error("postgresql is not ready: {0}")]
    NotReady(String),
    /// Streaming would leave a gap; refused.
    #[error("refusing to stream: {0}. Recreate the slot and re-snapshot (delete the state dir) only if a gap is acceptable")]
    SlotGap(String),
    /// Could not connect.
    #[error("cannot connect to postgresql: {0}")]
    Connect(#[source] tokio_postgres::Error),
    /// A SQL statement failed.
    #[error("postgresql: {0}")]
    Sql(#[from] tokio_postgres::Error),
    /// The replication connection failed.
    #[error("replication stream: {0}")]
    Stream(#[from] pgwire_replication::PgWireError),
    /// The server ended the stream.
    #[error("replication stream ended by the server")]
    StreamEnded,
    /// A pgoutput message could not be decoded.
    #[error("undecodable pgoutput message at {lsn}: {source}")]
    Decode {
        /// Where.
        lsn: Lsn,
        /// Why.
        #[source]
        source: decode::DecodeError,
    },
    /// A decoded message does not fit the stream state.
    #[error("inconsistent stream at {lsn}: {source}")]
    Assemble {
        /// Where.
        lsn: Lsn,
        /// Why.
        #[source]
        source: AssembleError,
    },
    /// The checkpoint store failed.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The producer refused a batch (session broken).
    #[error(transparent)]
    Producer(#[from] ProducerError),
    /// Another actor is gone.
    #[error("actor mailbox: {0}")]
    Mailbox(#[from] MailboxError),
}

impl ReplicationError {
    /// The one classification point for replication errors.
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::NotReady(_) => ErrorClass::Fatal(ExitCode::SourceNotReady),
            Self::SlotGap(_) => ErrorClass::Fatal(ExitCode::SlotGap),
            Self::Decode { .. } | Self::Assemble { .. } => ErrorClass::Fatal(ExitCode::Internal),
            Self::Checkpoint(e) => e.class(),
            Self::Producer(e) => e.class(),
            Self::Connect(_)
            | Self::Sql(_)
            | Self::Stream(_)
            | Self::StreamEnded
            | Self::Mailbox(_) => ErrorClass::Transient,
        }
    }

    /// Whether the error means PostgreSQL could not be reached.
    fn is_unreachable(&self) -> bool {
        matches!(
            self,
            Self::Connect(_) | Self::Stream(pgwire_replication::PgWireError::Io(_))
        )
    }
}

/// The replication actor (supervised).
pub struct ReplicationActor {
    config: Arc<PostgresConfig>,
    snapshot: Arc<SnapshotConfig>,
    snapshots: Addr<SnapshotActor>,
    marks: Watermarks,
    producer: Addr<KafkaProducerActor>,
    checkpoint: Addr<CheckpointActor>,
    budget: RestartBudget,
    session: u64,
    confirm: Option<watch::Sender<Lsn>>,
    stop: Option<watch::Sender<bool>>,
    stopped: Vec<oneshot::Sender<()>>,
    unreachable: bool,
    /// Shutting down: a restart must not start a new stream.
    stopping: bool,
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
            stop: stop_rx,
        };
        let handle = spawn_after_backoff(&self.budget, stream.run());
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
            c.send_if_modified(|cur| {
                let newer = msg.lsn > *cur;
                if newer {
                    *cur = msg.lsn;
                }
                newer
            });
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

/// Everything the streaming task needs; it runs detached from the actor so a
/// panic surfaces as a `JoinError`.
struct Stream {
    config: Arc<PostgresConfig>,
    snapshot: Arc<SnapshotConfig>,
    snapshots: Addr<SnapshotActor>,
    marks: Watermarks,
    producer: Addr<KafkaProducerActor>,
    checkpoint: Addr<CheckpointActor>,
    me: Addr<ReplicationActor>,
    session: u64,
    confirm: watch::Receiver<Lsn>,
    stop: watch::Receiver<bool>,
}

/// What `prepare` decided: where to start (`None`: snapshot first), the
/// tables, the slot identity, and the table copies to finish by backfill.
type Prepared = (
    Option<Lsn>,
    Vec<Arc<TableRef>>,
    SlotIdentity,
    Vec<TableProgress>,
);

/// Batches being built and the position marker bookkeeping.
struct Outbox {
    session: u64,
    seq: u64,
    batch: Vec<ChangeEvent>,
    /// Rows of the initial snapshot, published after `batch`.
    rows: Option<CopiedRows>,
    /// Copy progress to checkpoint with the next commit.
    progress: Vec<TableProgress>,
    /// Published commits (end LSN, commit time µs) not yet confirmed, for the lag metric.
    commits: std::collections::VecDeque<(Lsn, i64)>,
    max: usize,
    last_marker: (Lsn, Instant),
}

impl Stream {
    /// Prepare, then stream until stopped or failed.
    async fn run(mut self) -> Result<(), ReplicationError> {
        let (plan, tables, identity, mut pending) = self.prepare().await?;
        let mut out = Outbox {
            session: self.session,
            seq: 0,
            batch: Vec::new(),
            rows: None,
            progress: Vec::new(),
            commits: std::collections::VecDeque::new(),
            max: self.config.max_batch_events,
            last_marker: (Lsn::ZERO, Instant::now()),
        };
        let client = match plan {
            Some(start) => {
                out.last_marker.0 = start;
                ReplicationClient::connect(self.replication_config(start)).await?
            }
            None => {
                pending.clear(); // the snapshot copies everything
                let mut stop = self.stop.clone();
                tokio::select! {
                    client = self.snapshot(&tables, identity, &mut out) => client?,
                    _ = stop.changed() => {
                        tracing::info!("stopped during the initial snapshot; it is taken again on the next start");
                        return Ok(());
                    }
                }
            }
        };
        tracing::info!(session = self.session, lsn = %out.last_marker.0, "streaming");
        let epoch = self.marks.new_epoch();
        self.snapshots.do_send(StreamStarted {
            epoch,
            tables: tables.clone(),
            pending,
        });
        self.stream(client, &tables, &mut out).await
    }

    /// Read the replication stream until stopped or failed.
    async fn stream(
        &mut self,
        mut client: ReplicationClient,
        tables: &[Arc<TableRef>],
        out: &mut Outbox,
    ) -> Result<(), ReplicationError> {
        let mut asm = Assembler::new(tables);
        let mut windows = Windows::new(&self.config.slot, self.marks.clone());
        loop {
            tokio::select! {
                biased;
                _ = self.stop.changed() => {
                    client.stop();
                    tracing::info!(session = self.session, "replication stream stopped");
                    return Ok(());
                }
                Ok(()) = self.confirm.changed() => {
                    let lsn = *self.confirm.borrow_and_update();
                    client.update_applied_lsn(lsn.into());
                    let mut time = None;
                    while out.commits.front().is_some_and(|(end, _)| *end <= lsn) {
                        time = out.commits.pop_front().map(|(_, t)| t);
                    }
                    crate::metrics::metrics().confirmed(lsn, time);
                }
                ev = client.recv() => {
                    let ev = ev?.ok_or(ReplicationError::StreamEnded)?;
                    self.on_event(ev, &mut asm, &mut windows, out).await?;
                }
            }
        }
    }

    /// Create the slot with an exported snapshot on a gated replication
    /// session, copy every table as of that snapshot, then start replication on
    /// the same session at the consistent point.
    async fn snapshot(
        &self,
        tables: &[Arc<TableRef>],
        identity: SlotIdentity,
        out: &mut Outbox,
    ) -> Result<ReplicationClient, ReplicationError> {
        let cfg = &self.config;
        let mut client =
            ReplicationClient::connect_gated(self.replication_config(Lsn::ZERO)).await?;
        let create = format!(
            "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput (SNAPSHOT 'export')",
            quote_ident(&cfg.slot)
        );
        let rows = client.simple_query(&create).await?;
        let col = |i: usize| {
            rows.first()
                .and_then(|r| r.get(i).cloned().flatten())
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .ok_or_else(|| {
                    ReplicationError::NotReady(
                        "CREATE_REPLICATION_SLOT returned no snapshot".into(),
                    )
                })
        };
        let at: Lsn = col(1)?
            .parse()
            .map_err(|e| ReplicationError::NotReady(format!("{e}")))?;
        let name = col(2)?;
        let readers = crate::snapshot::import_snapshot(cfg, &self.snapshot, &name).await?;
        let plan = readers.plan(tables, &self.snapshot).await?;
        let mut progress: Vec<TableProgress> = plan.iter().map(|(_, p)| p.clone()).collect();
        self.checkpoint
            .send(PersistSlotIdentity {
                identity,
                lsn: at,
                progress: progress.clone(),
            })
            .await??;
        let ranges: usize = progress.iter().map(|p| p.ranges.len()).sum();
        tracing::info!(slot = %cfg.slot, lsn = %at, snapshot = %name, tables = tables.len(), ranges, "snapshot started");
        let (tx, mut rx) = tokio::sync::mpsc::channel(2 * self.snapshot.parallelism);
        let copy = readers.copy(&plan, self.snapshot.chunk_rows, at, tx);
        let publish = async {
            while let Some(chunk) = rx.recv().await {
                let p = &mut progress[chunk.table];
                p.ranges[chunk.range].after = chunk.after;
                p.ranges[chunk.range].done = chunk.done;
                p.rows += chunk.rows.rows.len() as u64;
                crate::metrics::metrics()
                    .snapshot_rows
                    .with_label_values(&[&format!("{}.{}", p.schema, p.name)])
                    .inc_by(chunk.rows.rows.len() as u64);
                out.rows = Some(chunk.rows);
                out.progress.push(p.clone());
                self.publish(out, Some(at)).await?;
            }
            Ok::<(), ReplicationError>(())
        };
        let (rows, ()) = tokio::try_join!(copy, publish)?;
        tracing::info!(rows, lsn = %at, "snapshot copied; starting the stream");
        client.start().await?;
        client.wait_started().await?;
        Ok(client)
    }

    /// Check the server, tables, publication and slot; decide where to start
    /// (`None`: take an initial snapshot first) and which table
    /// copies are left to finish by backfill.
    async fn prepare(&self) -> Result<Prepared, ReplicationError> {
        let cfg = &self.config;
        let sql = slot::connect(cfg).await?;
        slot::check_server(&sql).await?;
        let tables = slot::resolve_tables(&sql, &cfg.tables).await?;
        slot::ensure_publication(&sql, &cfg.publication, &tables).await?;
        let identity = SlotIdentity {
            system_id: slot::system_id(&sql).await?,
            database: cfg.database.clone(),
            slot_name: cfg.slot.clone(),
        };
        let checkpoint = self.checkpoint.send(GetCheckpoint).await??;
        let state = slot::inspect_slot(&sql, &cfg.slot).await?;
        let want_snapshot = self.snapshot.mode == SnapshotMode::Initial;
        let start_point =
            slot::decide_start(&checkpoint, state.as_ref(), &identity, want_snapshot)?;
        let progress_of = |copy: bool| -> Vec<TableProgress> {
            tables
                .iter()
                .map(|t| match copy {
                    true => TableProgress::fresh(&t.schema, &t.name),
                    false => TableProgress::finished(&t.schema, &t.name),
                })
                .collect()
        };
        let mut pending: Vec<TableProgress> = Vec::new();
        let start = match start_point {
            slot::StartPoint::Resume(lsn) => {
                pending.extend(checkpoint.pending().cloned());
                if !pending.is_empty() {
                    tracing::info!(
                        tables = pending.len(),
                        "resuming interrupted table copies by backfill"
                    );
                }
                if want_snapshot {
                    let extra: Vec<TableProgress> = progress_of(true)
                        .into_iter()
                        .filter(|t| {
                            !checkpoint
                                .progress
                                .iter()
                                .any(|p| (&p.schema, &p.name) == (&t.schema, &t.name))
                        })
                        .collect();
                    for t in &extra {
                        tracing::info!(table = %format!("{}.{}", t.schema, t.name), "table added to the configuration; copying it by backfill");
                    }
                    pending.extend(extra);
                }
                Some(lsn)
            }
            slot::StartPoint::CreateSlot | slot::StartPoint::AdoptSlot(_) => {
                let lsn = match start_point {
                    slot::StartPoint::AdoptSlot(lsn) => {
                        tracing::warn!(slot = %cfg.slot, lsn = %lsn, backfill = want_snapshot, "no checkpoint: taking over the existing slot at its confirmed position");
                        lsn
                    }
                    _ => slot::create_slot(&sql, &cfg.slot).await?,
                };
                let progress = progress_of(want_snapshot);
                pending.extend(progress.iter().filter(|p| !p.done()).cloned());
                let persist = PersistSlotIdentity {
                    identity: identity.clone(),
                    lsn,
                    progress,
                };
                self.checkpoint.send(persist).await??;
                Some(lsn)
            }
            slot::StartPoint::Snapshot => None,
        };
        let me = self.me.clone();
        let open = OpenSession {
            session: self.session,
            on_broken: me.clone().recipient(),
            on_persisted: me.recipient(),
        };
        self.producer.send(open).await?;
        Ok((start, tables, identity, pending))
    }

    fn replication_config(&self, start: Lsn) -> ReplicationConfig {
        let c = &self.config;
        ReplicationConfig::new(
            c.host.clone(),
            c.user.clone(),
            c.password.expose(),
            c.database.clone(),
            c.slot.clone(),
            c.publication.as_str(),
        )
        .with_port(c.port)
        .with_tls(TlsConfig::disabled())
        .with_start_lsn(start.into())
        .with_ack_lsn(start.into())
        .with_status_interval(Duration::from_secs(c.status_interval_secs))
        .with_wakeup_interval(Duration::from_secs(c.status_interval_secs))
        .with_buffer_size(4096)
        .with_options(SESSION_OPTIONS)
        .with_max_message_size(256 << 20)
        .with_application_name("pgcdc")
    }

    async fn on_event(
        &self,
        ev: ReplicationEvent,
        asm: &mut Assembler,
        windows: &mut Windows,
        out: &mut Outbox,
    ) -> Result<(), ReplicationError> {
        match ev {
            ReplicationEvent::Begin {
                final_lsn,
                xid,
                commit_time_micros,
            } => {
                asm.begin(xid, final_lsn.into(), commit_time_micros);
            }
            ReplicationEvent::XLogData {
                wal_start,
                wal_end,
                data,
                ..
            } => {
                let lsn = Lsn::from(wal_start);
                crate::metrics::metrics().server_wal_end(Lsn::from(wal_end));
                let msg = decode::decode(&data)
                    .map_err(|source| ReplicationError::Decode { lsn, source })?;
                let from = out.batch.len();
                asm.apply(msg, lsn, &mut out.batch)
                    .map_err(|source| ReplicationError::Assemble { lsn, source })?;
                windows.observe(&out.batch[from..]);
                if out.batch.len() >= out.max {
                    self.publish(out, None).await?;
                }
            }
            ReplicationEvent::Commit {
                end_lsn,
                commit_time_micros,
                ..
            } => {
                if out.commits.len() < 100_000 {
                    let unix_us = commit_time_micros.saturating_add(assembler::PG_EPOCH_OFFSET_US);
                    out.commits.push_back((end_lsn.into(), unix_us));
                }
                // A transaction with no published change only moves the
                // position; such markers are sent at most once a second.
                let empty = asm.commit() == 0 && out.progress.is_empty();
                if !empty || out.last_marker.1.elapsed() >= Duration::from_secs(1) {
                    self.publish(out, Some(end_lsn.into())).await?;
                }
            }
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                let wal_end = Lsn::from(wal_end);
                crate::metrics::metrics().server_wal_end(wal_end);
                let quiet = !asm.in_transaction() && out.batch.is_empty();
                if quiet
                    && wal_end > out.last_marker.0
                    && out.last_marker.1.elapsed() >= Duration::from_secs(1)
                {
                    self.publish(out, Some(wal_end)).await?;
                }
            }
            ReplicationEvent::Message {
                prefix,
                content,
                lsn,
                ..
            } => match windows.on_message(&prefix, &content) {
                MessageAction::Ignore => {}
                MessageAction::Emit(mut rows, progress) => {
                    crate::metrics::metrics()
                        .snapshot_rows
                        .with_label_values(&[&format!("{}.{}", progress.schema, progress.name)])
                        .inc_by(rows.len() as u64);
                    let lsn = Lsn::from(lsn);
                    asm.place(&mut rows, lsn)
                        .map_err(|source| ReplicationError::Assemble { lsn, source })?;
                    out.batch.extend(rows);
                    out.progress.push(progress);
                    if out.batch.len() >= out.max {
                        self.publish(out, None).await?;
                    }
                }
                MessageAction::Backfill(progress) => {
                    out.progress.push(progress.clone());
                    self.snapshots.do_send(BackfillTable { progress });
                }
            },
            ReplicationEvent::StoppedAt { .. } => {}
        }
        Ok(())
    }

    /// Hand the current batch to the producer; waits while it is full.
    async fn publish(
        &self,
        out: &mut Outbox,
        commit_end: Option<Lsn>,
    ) -> Result<(), ReplicationError> {
        let events = std::mem::replace(&mut out.batch, Vec::with_capacity(out.max.min(1024)));
        let progress = match commit_end {
            Some(_) => std::mem::take(&mut out.progress),
            None => Vec::new(),
        };
        let msg = PublishBatch {
            session: out.session,
            seq: out.seq,
            events,
            rows: out.rows.take(),
            commit_end,
            progress,
        };
        let counted = &crate::metrics::metrics().events_in;
        for ((table, op), n) in msg.counts() {
            counted.with_label_values(&[table.as_str(), op]).inc_by(n);
        }
        out.seq += 1;
        if let Some(lsn) = commit_end {
            out.last_marker = (lsn, Instant::now());
        }
        self.producer.send(msg).await??;
        fail::fail_point!(crate::wire::failpoint::REPLICATION_PUBLISH);
        Ok(())
    }
}
