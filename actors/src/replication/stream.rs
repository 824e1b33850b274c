//! The streaming task of one replication session: reads pgoutput, assembles
//! transactions, hands batches to the producer and reports persisted
//! positions back to PostgreSQL (by the policy in [`super::flush`]). It runs
//! detached from the actor, so a panic surfaces as a `JoinError`.

use std::sync::Arc;
use std::time::Instant;

use actix::Addr;
use futures::FutureExt;
use pgwire_replication::{ReplicationClient, ReplicationEvent};
use tokio::sync::watch;

use super::assembler::{self, Assembler};
use super::batch::{BatchLimit, BatchSize};
use super::flush::FlushPolicy;
use super::scope::ScopeWatch;
use super::{decode, ReplicationActor, ReplicationError};
use crate::checkpoint::{CheckpointActor, TableProgress};
use crate::event::{ChangeEvent, CopiedRows, TableRef};
use crate::kafka_producer::KafkaProducerActor;
use crate::lsn::Lsn;
use crate::messages::{DrainProducer, PublishBatch};
use crate::metrics::metrics;
use crate::pg::types::TypeSource;
use crate::pg::{waits, PostgresConfig};
use crate::snapshot::watermark::{MessageAction, Signal, Watermarks, Windows};
use crate::snapshot::{BackfillTable, RepairKeys, SnapshotActor, SnapshotConfig, StreamStarted};

/// Largest batch buffer allocated up front: a large `max_batch_events`
/// should not reserve memory that small transactions never use.
const BATCH_CAPACITY_MAX: usize = 1024;
/// Bytes of a pgoutput insert, update or delete message that are not row
/// data (tag, relation OID, tuple markers): left out of a batch's size.
const CHANGE_HEADER_BYTES: usize = 16;
/// How long committed transactions wait in a batch for more to join it
/// (see [`Stream::coalesce`]): at a steady rate of small transactions,
/// several share a batch; librdkafka waits longer (`linger.ms`, 20 ms by
/// default) anyway.
const LINGER: std::time::Duration = std::time::Duration::from_millis(5);
/// Longest time committed transactions wait in a batch for more to join
/// it while more keep arriving (see [`Stream::coalesce`]).
const COALESCE_MAX: std::time::Duration = std::time::Duration::from_millis(20);
/// Longest wait, after the replication connection was lost, for the records
/// in flight to be acknowledged and checkpointed before streaming again
/// (Kafka answering slower than this costs duplicates, never losses).
const SETTLE_MAX: std::time::Duration = std::time::Duration::from_secs(30);
/// Most events already received that are handled one after the other
/// before the stream loop looks at a stop or a confirmed position again:
/// going round its `select!` costs more than a small change does.
const DRAIN_MAX: usize = 256;

/// Everything the streaming task needs.
pub(super) struct Stream {
    /// The `[postgres]` section.
    pub config: Arc<PostgresConfig>,
    /// The `[snapshot]` section.
    pub snapshot: Arc<SnapshotConfig>,
    /// The snapshot actor, for backfills.
    pub snapshots: Addr<SnapshotActor>,
    /// Backfill chunks between their watermarks.
    pub marks: Watermarks,
    /// Where batches go.
    pub producer: Addr<KafkaProducerActor>,
    /// The checkpoint store.
    pub checkpoint: Addr<CheckpointActor>,
    /// The actor, for the producer session's notifications.
    pub me: Addr<ReplicationActor>,
    /// This stream's producer session.
    pub session: u64,
    /// Persisted positions, from the actor.
    pub confirm: watch::Receiver<Lsn>,
    /// Set when the stream must stop.
    pub stop: watch::Receiver<bool>,
}

/// Batches being built and the flush/marker policy.
pub(super) struct Outbox {
    session: u64,
    seq: u64,
    batch: Vec<ChangeEvent>,
    /// What `batch` holds.
    size: BatchSize,
    /// The last commit whose events `batch` holds but that was not handed
    /// over yet: its end LSN, the batch's length at it, and when the first
    /// such commit came (see [`Stream::coalesce`]).
    pending: Option<(Lsn, usize, Instant)>,
    /// Rows of the initial snapshot, published after `batch`.
    pub rows: Option<CopiedRows>,
    /// Copy progress to checkpoint with the next commit.
    pub progress: Vec<TableProgress>,
    /// The newest WAL end the server sent with data, not yet in the metrics.
    wal_end: Option<Lsn>,
    limit: BatchLimit,
    /// What to report and when.
    pub flush: FlushPolicy,
}

impl Outbox {
    /// An empty outbox for `session` with batches up to `limit`, whose
    /// position starts at `start`.
    fn new(session: u64, limit: BatchLimit, start: Lsn) -> Self {
        Self {
            session,
            seq: 0,
            batch: Vec::new(),
            size: BatchSize::default(),
            pending: None,
            rows: None,
            progress: Vec::new(),
            wal_end: None,
            limit,
            flush: FlushPolicy::new(start, Instant::now()),
        }
    }

    /// Count events appended to `batch` from index `from`, `bytes` of row data.
    fn added(&mut self, from: usize, bytes: usize) {
        let events = self.batch.len().saturating_sub(from);
        if events > 0 {
            self.size.events += events;
            self.size.bytes = self.size.bytes.saturating_add(bytes);
        }
    }
}

impl Stream {
    /// Prepare, then stream until stopped or failed.
    pub async fn run(mut self) -> Result<(), ReplicationError> {
        let (plan, tables, identity, mut pending) =
            waits::reported(&self.config, "starting the stream", self.prepare()).await?;
        let limit = BatchLimit {
            events: self.config.max_batch_events,
            bytes: self.config.max_batch_bytes,
        };
        let mut out = Outbox::new(self.session, limit, plan.unwrap_or(Lsn::ZERO));
        let client = match plan {
            Some(start) => self.resume_stream(start).await?,
            None => {
                pending.clear(); // the snapshot copies everything
                let mut stop = self.stop.clone();
                tokio::select! {
                    client = waits::reported(
                        &self.config,
                        "the initial snapshot",
                        self.initial_snapshot(&tables, identity, &mut out),
                    ) => client?,
                    _ = stop.changed() => {
                        tracing::info!("stopped during the initial snapshot; it is taken again on the next start");
                        return Ok(());
                    }
                }
            }
        };
        tracing::info!(session = self.session, lsn = %out.flush.position(), "streaming");
        let epoch = self.marks.new_epoch();
        self.snapshots.do_send(StreamStarted {
            epoch,
            tables: tables.clone(),
            pending,
        });
        let res = self.stream(client, &tables, &mut out).await;
        if matches!(&res, Err(e) if e.is_source_lost()) {
            self.settle(&out).await;
        }
        res
    }

    /// The replication connection was lost while the producer session goes
    /// on: let the records already handed to Kafka be acknowledged and
    /// checkpointed, so the next stream starts after them instead of
    /// sending them again. Bounded by [`SETTLE_MAX`]; a stop ends it early.
    /// Only the open transaction's records (not checkpointable) are sent again.
    async fn settle(&mut self, out: &Outbox) {
        let started = Instant::now();
        tracing::info!(
            session = self.session,
            "replication connection lost; letting records in flight finish before streaming again"
        );
        let mut stop = self.stop.clone();
        let drained = async {
            let last = self.producer.send(DrainProducer).await.ok()?.ok()??;
            let mut confirm = self.confirm.clone();
            confirm.wait_for(|at| *at >= last).await.ok()?;
            Some(last)
        };
        tokio::select! {
            r = tokio::time::timeout(SETTLE_MAX, drained) => match r {
                Ok(Some(lsn)) => tracing::info!(session = self.session, lsn = %lsn, ms = started.elapsed().as_millis() as u64, "records in flight acknowledged and checkpointed"),
                Ok(None) => tracing::info!(session = self.session, position = %out.flush.position(), "nothing in flight to checkpoint"),
                Err(_) => tracing::warn!(session = self.session, secs = SETTLE_MAX.as_secs(), "records in flight not acknowledged in time; the next stream sends them again"),
            },
            _ = stop.changed() => {}
        }
    }

    /// Read the replication stream until stopped or failed.
    async fn stream(
        &mut self,
        mut client: ReplicationClient,
        tables: &[Arc<TableRef>],
        out: &mut Outbox,
    ) -> Result<(), ReplicationError> {
        let mut asm = Assembler::new(tables);
        let mut windows = Windows::new(&self.config.slot, self.marks.clone(), tables);
        let mut types = TypeSource::default();
        let key = self.marks.key().clone();
        let scope =
            ScopeWatch::new(self.config.clone(), tables, key, self.checkpoint.clone()).run();
        tokio::pin!(scope);
        // Armed while commits wait in the batch: fires [`LINGER`] after the first.
        let linger = tokio::time::sleep(LINGER);
        tokio::pin!(linger);
        let mut armed = false;
        loop {
            match out.pending {
                Some((_, _, since)) if !armed => {
                    linger.as_mut().reset((since + LINGER).into());
                    armed = true;
                }
                None => armed = false,
                Some(_) => {}
            }
            tokio::select! {
                biased;
                _ = self.stop.changed() => {
                    client.stop();
                    tracing::info!(session = self.session, "replication stream stopped");
                    return Ok(());
                }
                Ok(()) = self.confirm.changed() => {
                    let lsn = *self.confirm.borrow_and_update();
                    if let Some(c) = out.flush.persisted(lsn) {
                        client.update_applied_lsn(c.lsn.into());
                        metrics().confirmed(c.lsn, c.commit_time_us);
                        crate::canary::confirmed(c.lsn);
                    }
                }
                ev = client.recv() => {
                    let ev = ev?.ok_or(ReplicationError::StreamEnded)?;
                    self.on_event(ev, (&mut asm, &mut types), &mut windows, out).await?;
                    // Then what was received meanwhile, without the select.
                    for _ in 1..DRAIN_MAX {
                        let Some(ev) = client.recv().now_or_never() else {
                            break;
                        };
                        let ev = ev?.ok_or(ReplicationError::StreamEnded)?;
                        self.on_event(ev, (&mut asm, &mut types), &mut windows, out).await?;
                    }
                    if let Some(end) = out.wal_end.take() {
                        metrics().server_wal_end(end);
                    }
                }
                () = &mut scope => {}
                // Nothing else came for a while: hand over the commits coalesced so far.
                () = &mut linger, if armed => {
                    self.publish_pending(out).await?;
                }
            }
        }
    }

    /// Handle one replication event.
    async fn on_event(
        &self,
        ev: ReplicationEvent,
        (asm, types): (&mut Assembler, &mut TypeSource),
        windows: &mut Windows,
        out: &mut Outbox,
    ) -> Result<(), ReplicationError> {
        match ev {
            ReplicationEvent::Begin {
                final_lsn,
                xid,
                commit_time_micros,
            } => {
                windows.began(xid, final_lsn.into());
                asm.begin(xid, final_lsn.into(), commit_time_micros);
            }
            ReplicationEvent::XLogData {
                wal_start,
                wal_end,
                data,
                ..
            } => {
                let lsn = Lsn::from(wal_start);
                out.wal_end = out.wal_end.max(Some(Lsn::from(wal_end)));
                let msg = decode::decode(&data)
                    .map_err(|source| ReplicationError::Decode { lsn, source })?;
                if let decode::PgOutputMessage::Relation(rel) = &msg {
                    let missing = asm.missing_types(rel);
                    if !missing.is_empty() {
                        types
                            .resolve(&self.config, &missing, asm.types_mut())
                            .await?;
                    }
                }
                let bytes = data.len().saturating_sub(CHANGE_HEADER_BYTES);
                if is_change(&msg) && out.limit.closes_before(out.size, bytes) {
                    self.publish_full(out).await?;
                }
                let from = out.batch.len();
                asm.apply(msg, lsn, &mut out.batch)
                    .map_err(|source| ReplicationError::Assemble { lsn, source })?;
                let ignored = asm.take_ignored();
                if !ignored.is_empty() {
                    self.copy_roots_again(&ignored, windows).await?;
                }
                drop(data); // the row's bytes, before the next message arrives
                windows.observe(&out.batch[from..]);
                out.added(from, bytes);
                self.publish_if_full(out).await?;
            }
            ReplicationEvent::Commit {
                end_lsn,
                commit_time_micros,
                ..
            } => {
                let unix_us = commit_time_micros.saturating_add(assembler::PG_EPOCH_OFFSET_US);
                let empty = asm.commit() == 0 && out.progress.is_empty();
                let end = Lsn::from(end_lsn);
                let now = Instant::now();
                if out.flush.committed(end, unix_us, empty, now) || out.pending.is_some() {
                    self.coalesce(out, end, now).await?;
                }
            }
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                let wal_end = Lsn::from(wal_end);
                metrics().server_wal_end(wal_end);
                let idle = !asm.in_transaction() && out.batch.is_empty();
                if let Some(at) = out.flush.keepalive(wal_end, idle, Instant::now()) {
                    self.publish(out, Some(at)).await?;
                }
            }
            ReplicationEvent::Message {
                prefix,
                content,
                lsn,
                ..
            } => {
                let action = windows.on_message(&prefix, &content, Lsn::from(lsn));
                self.on_message(action, Lsn::from(lsn), asm, out).await?;
            }
            ReplicationEvent::StoppedAt { .. } => {}
        }
        Ok(())
    }

    /// Unconfigured relations were seen: any that is a partition of a
    /// configured table came under its own name, so PostgreSQL decoded it
    /// with `publish_via_partition_root` off (it was off when the change was
    /// made, e.g. while pgcdc was stopped) and the table's records lack it.
    /// Copy such tables again (a reset signal: truncate, backfill), once per
    /// session; while the option is still off the scope watch says so and
    /// copies them once it is on.
    async fn copy_roots_again(
        &self,
        relations: &[u32],
        windows: &mut Windows,
    ) -> Result<(), ReplicationError> {
        let sql = crate::pg::connect(&self.config).await?;
        let publication = &self.config.publication;
        if let Some((false, _)) = super::slot::publish_options(&sql, publication).await? {
            return Ok(());
        }
        let rows = sql
            .query(
                "SELECT l.relname::text, n.nspname::text, r.relname::text \
                   FROM unnest($1::oid[]) AS u(o) \
                   JOIN pg_class l ON l.oid = u.o \
                   JOIN pg_class r ON r.oid = pg_partition_root(u.o) AND r.oid <> u.o \
                   JOIN pg_namespace n ON n.oid = r.relnamespace",
                &[&relations],
            )
            .await?;
        for row in rows {
            let (leaf, root): (String, (String, String)) = (row.get(0), (row.get(1), row.get(2)));
            if !windows.first_root_reset(&root) {
                continue;
            }
            let name = format!("{}.{}", root.0, root.1);
            tracing::error!(table = %name, partition = %leaf, "changes of a partition came under its own name, not as its table's (publish_via_partition_root was off when they were made): they are not captured; truncating the table's mirror and copying it again");
            metrics()
                .table_resets
                .with_label_values(&[name.as_str(), "partition_root_restored"])
                .inc();
            let signal =
                Signal::signed(self.marks.key(), &self.config.slot, &root.0, &root.1, true);
            let lsn = signal.write(&sql).await?;
            tracing::info!(table = %name, lsn = %lsn, "reset requested");
        }
        Ok(())
    }

    /// Act on a logical message: emit a backfill chunk or start a backfill.
    async fn on_message(
        &self,
        action: MessageAction,
        lsn: Lsn,
        asm: &mut Assembler,
        out: &mut Outbox,
    ) -> Result<(), ReplicationError> {
        match action {
            MessageAction::Ignore => {}
            MessageAction::Emit(mut rows, progress) => {
                if let Some(t) = rows.first().map(|e| e.table.clone()) {
                    metrics()
                        .snapshot_rows
                        .with_label_values(&[&format!("{}.{}", t.schema, t.name)])
                        .inc_by(rows.len() as u64);
                }
                asm.place(&mut rows, lsn)
                    .map_err(|source| ReplicationError::Assemble { lsn, source })?;
                let bytes = rows.iter().map(ChangeEvent::row_bytes).sum();
                if out.limit.closes_before(out.size, bytes) {
                    self.publish_full(out).await?;
                }
                let from = out.batch.len();
                out.batch.extend(rows);
                out.added(from, bytes);
                out.progress.extend(progress);
                self.publish_if_full(out).await?;
            }
            MessageAction::Backfill(progress) => self.backfill(progress, out),
            MessageAction::Canary(t_us) => {
                if let Some(tx) = asm.open_tx() {
                    crate::canary::seen(tx.commit_lsn, t_us);
                }
            }
            MessageAction::Repair { table, keys } => {
                self.snapshots.do_send(RepairKeys { table, keys });
            }
            MessageAction::Reset(truncate, copy) => {
                let mut rows = [truncate];
                asm.place(&mut rows, lsn)
                    .map_err(|source| ReplicationError::Assemble { lsn, source })?;
                out.batch.extend(rows);
                if let Some(progress) = copy {
                    self.backfill(progress, out);
                }
                self.publish_if_full(out).await?;
            }
        }
        Ok(())
    }

    /// Start copying a table again; its reset progress is checkpointed with the batch.
    fn backfill(&self, progress: TableProgress, out: &mut Outbox) {
        out.progress.push(progress.clone());
        self.snapshots.do_send(BackfillTable { progress });
    }

    /// A transaction committed at `end`: its events stay in the batch for
    /// more transactions to join, so a backlog or a steady stream of small
    /// transactions goes out in full batches (one producer hand-over and
    /// one checkpoint each) instead of one batch per transaction. The
    /// batch is handed over [`LINGER`] after its first waiting commit if
    /// nothing else is being received (the stream loop), once it is full,
    /// or [`COALESCE_MAX`] after that commit.
    async fn coalesce(
        &self,
        out: &mut Outbox,
        end: Lsn,
        now: Instant,
    ) -> Result<(), ReplicationError> {
        let since = out.pending.map_or(now, |(_, _, since)| since);
        out.pending = Some((end, out.batch.len(), since));
        if out.limit.is_full(out.size) || now.duration_since(since) >= COALESCE_MAX {
            self.publish_pending(out).await?;
        }
        Ok(())
    }

    /// Hand over the batch up to its last commit; the changes of the
    /// transaction open since then stay for the next batch.
    async fn publish_pending(&self, out: &mut Outbox) -> Result<(), ReplicationError> {
        let Some((end, len, _)) = out.pending else {
            return Ok(());
        };
        let open = out.batch.split_off(len.min(out.batch.len()));
        self.publish(out, Some(end)).await?;
        let bytes = open.iter().map(ChangeEvent::row_bytes).sum();
        out.batch.extend(open);
        out.added(0, bytes);
        Ok(())
    }

    /// Hand the batch over before it passes its size limit: with the
    /// position of its last commit if it ends there, else mid-transaction
    /// (the commits it holds are checkpointed with a later batch).
    async fn publish_full(&self, out: &mut Outbox) -> Result<(), ReplicationError> {
        let end = out
            .pending
            .filter(|(_, len, _)| *len == out.batch.len())
            .map(|(end, _, _)| end);
        self.publish(out, end).await
    }

    /// Hand the batch over mid-transaction once it reached its size limit.
    async fn publish_if_full(&self, out: &mut Outbox) -> Result<(), ReplicationError> {
        if out.limit.is_full(out.size) {
            self.publish_full(out).await?;
        }
        Ok(())
    }

    /// Hand the current batch to the producer; waits while it is full.
    pub(super) async fn publish(
        &self,
        out: &mut Outbox,
        commit_end: Option<Lsn>,
    ) -> Result<(), ReplicationError> {
        let capacity = out.limit.events.min(BATCH_CAPACITY_MAX);
        let events = std::mem::replace(&mut out.batch, Vec::with_capacity(capacity));
        out.size = BatchSize::default();
        out.pending = None;
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
        metrics().batches.inc();
        let counted = &metrics().events_in;
        for ((table, op), n) in msg.counts() {
            counted.with_label_values(&[table.as_str(), op]).inc_by(n);
        }
        out.seq += 1;
        if let Some(lsn) = commit_end {
            out.flush.published(lsn, Instant::now());
        }
        self.producer.send(msg).await??;
        fail::fail_point!(crate::wire::failpoint::REPLICATION_PUBLISH);
        Ok(())
    }
}

/// Whether `msg` carries a row (and may add events to the batch).
fn is_change(msg: &decode::PgOutputMessage) -> bool {
    use decode::PgOutputMessage as M;
    matches!(msg, M::Insert { .. } | M::Update { .. } | M::Delete { .. })
}
