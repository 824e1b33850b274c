//! KafkaProducerActor: publishes change batches with an idempotent, acks=all
//! producer and reports, strictly in order, which commit LSNs are fully
//! acknowledged so the checkpoint can advance.
//!
//! Batches are tracked in a queue in session order. A batch is *done* when
//! every one of its records is acknowledged; the checkpoint only ever moves to
//! the `commit_end` of the last batch of a done prefix, so an LSN is never
//! persisted while anything before it is still unacknowledged.

mod acks;
mod config;
mod connect;
mod envelope;
mod format;
mod heartbeat;
mod modes;
mod partition;
mod persist;
mod polled;
mod refusal;
mod send;
mod transaction;

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::oneshot;

pub use crate::error::ProducerError;
pub use config::{
    DecimalMode, Format, KafkaConfig, Oversized, SourceConnector, TimeMode, TopicMode,
    DURABLE_REPLICAS,
};
pub use envelope::{EncodedRecord, Encoder};
pub use partition::{java_partition, murmur2, Partitioning};
pub(crate) use polled::{PolledProducer, Reply};
pub use refusal::{metadata_or_refusal, prober, Prober};
pub(crate) use refusal::{running_error, running_log};

use crate::checkpoint::CheckpointActor;
use crate::error::{ErrorClass, ExitCode};
use crate::lsn::Lsn;
use crate::messages::{
    DrainProducer, LsnPersisted, OpenSession, PublishBatch, SessionBreak, SessionBroken,
};
use crate::supervision::{task_outcome, RestartBudget, TaskError};
use acks::{AckPrefix, PendingBatch};
use heartbeat::Heartbeats;
use persist::{GroupCommit, Pending};
use send::{await_deliveries, AckContext, BatchAck, BatchJob, Producer};
use transaction::{TxPlan, TxTracker};

/// The open replication session.
struct Session {
    id: u64,
    next_seq: u64,
    on_broken: Recipient<SessionBroken>,
    on_persisted: Recipient<LsnPersisted>,
}

/// A batch finished delivering (or failed to).
#[derive(Message)]
#[rtype(result = "()")]
struct BatchDelivered {
    session: u64,
    seq: u64,
    outcome: Result<(), TaskError<ProducerError>>,
}

/// The Kafka producer actor (supervised).
pub struct KafkaProducerActor {
    config: Arc<KafkaConfig>,
    database: Arc<str>,
    checkpoint: Addr<CheckpointActor>,
    budget: RestartBudget,
    producer: Option<Arc<Producer>>,
    session: Option<Session>,
    inflight: AckPrefix,
    capacity_waiters: Vec<oneshot::Sender<()>>,
    drain_waiters: Vec<oneshot::Sender<Option<Lsn>>>,
    last_persist: Option<Lsn>,
    /// Checkpoint writes: one in flight, the rest merged behind it.
    persist: GroupCommit,
    /// The dead-letter topic, for `kafka.oversized = "dead_letter"`.
    dead_letter_topic: Option<Arc<str>>,
    /// Transaction metadata, when `kafka.transaction_metadata` is on.
    transactions: Option<TxTracker>,
    /// Heartbeat records and their interval, when `kafka.heartbeats` is on.
    heartbeats: Option<(Heartbeats, Duration)>,
    /// The partition of each change record.
    partitioning: Arc<Partitioning>,
}

impl KafkaProducerActor {
    /// A producer publishing for `database`, checkpointing through `checkpoint`.
    pub fn new(
        config: Arc<KafkaConfig>,
        database: &str,
        checkpoint: Addr<CheckpointActor>,
        budget: RestartBudget,
    ) -> Self {
        Self {
            database: database.into(),
            checkpoint,
            budget,
            producer: None,
            session: None,
            inflight: AckPrefix::default(),
            capacity_waiters: Vec::new(),
            drain_waiters: Vec::new(),
            last_persist: None,
            persist: GroupCommit::default(),
            dead_letter_topic: None,
            transactions: config.transaction_topic().map(|t| TxTracker::new(&t)),
            heartbeats: None,
            partitioning: Partitioning::new(config.partitioner()),
            config,
        }
    }

    /// Place change records by `partitioning`'s pinned partition counts.
    pub fn with_partitioning(mut self, partitioning: Arc<Partitioning>) -> Self {
        self.partitioning = partitioning;
        self
    }

    /// Send descriptions of records above `message.max.bytes` to `topic`
    /// when `kafka.oversized = "dead_letter"` (without a topic they are fatal).
    pub fn with_dead_letter_topic(mut self, topic: &str) -> Self {
        self.dead_letter_topic = Some(topic.into());
        self
    }

    /// Publish a heartbeat record every `every` when `kafka.heartbeats` is on.
    pub fn with_heartbeats(mut self, every: Duration) -> Self {
        self.heartbeats = self.config.heartbeat_topic().map(|topic| {
            let h = Heartbeats {
                topic: topic.into(),
                server: self.config.topic_prefix.as_str().into(),
            };
            (h, every)
        });
        self
    }

    /// Publish a heartbeat record with the LSN reached.
    fn heartbeat(&mut self) {
        if let (Some((h, _)), Some(producer)) = (&self.heartbeats, &self.producer) {
            h.publish(producer.clone(), self.last_persist, now_ms());
        }
    }

    /// Where records above `message.max.bytes` go; `None`: they are fatal.
    fn oversized_to(&self) -> Option<Arc<str>> {
        match self.config.oversized {
            Oversized::DeadLetter => self.dead_letter_topic.clone(),
            Oversized::Fail => None,
        }
    }

    /// Forget the session and everything in flight; tell the stream.
    fn break_session(&mut self, reason: SessionBreak) {
        if let Some(s) = self.session.take() {
            s.on_broken.do_send(SessionBroken {
                session: s.id,
                reason,
            });
        }
        self.inflight.clear();
        if let Some(t) = &mut self.transactions {
            t.reset();
        }
        self.capacity_waiters.clear();
        self.drain_waiters.clear();
    }

    /// Mark `seq` done and move the checkpoint over the done prefix.
    fn complete(&mut self, seq: u64, ctx: &mut Context<Self>) {
        let released = self.inflight.acked(seq);
        let out = &crate::metrics::metrics().events_out;
        for ((table, op), n) in released.counts.iter().flatten() {
            out.with_label_values(&[table.as_str(), op]).inc_by(*n);
        }
        if let (Some(persist), Some(s)) = (released.persist, &self.session) {
            self.last_persist = Some(persist.lsn);
            let pending = Pending {
                lsn: persist.lsn,
                progress: persist.progress,
                notify: s.on_persisted.clone(),
            };
            if let Some(now) = self.persist.offer(pending) {
                self.write_checkpoint(now, ctx);
            }
        }
        if self.inflight.records() < self.config.max_inflight_records {
            self.capacity_waiters.drain(..).for_each(|w| {
                let _ = w.send(());
            });
        }
        if self.inflight.is_empty() {
            let last = self.last_persist;
            self.drain_waiters.drain(..).for_each(|w| {
                let _ = w.send(last);
            });
        }
    }

    /// Send a checkpoint write (the checkpoint tells the stream once it is
    /// durable); when the checkpoint actor is done with it (written, failed,
    /// or its actor restarted), send the one merged behind it.
    fn write_checkpoint(&self, pending: Pending, ctx: &mut Context<Self>) {
        let write = self.checkpoint.send(pending.message());
        ctx.spawn(write.into_actor(self).map(|_, act, ctx| {
            crate::metrics::metrics().checkpoint_writes.inc();
            if let Some(next) = act.persist.done() {
                act.write_checkpoint(next, ctx);
            }
        }));
    }

    /// Check the batch belongs to the open session, in order; register it.
    fn admit(&mut self, msg: &mut PublishBatch, records: usize) -> Result<(), ProducerError> {
        let session = self.session.as_mut().filter(|s| s.id == msg.session);
        let Some(session) = session.filter(|_| !self.budget.is_stopping()) else {
            return Err(ProducerError::SessionClosed(msg.session));
        };
        if session.next_seq != msg.seq {
            let expected = session.next_seq;
            return Err(ProducerError::OutOfOrder {
                session: msg.session,
                got: msg.seq,
                expected,
            });
        }
        session.next_seq += 1;
        self.inflight.push(PendingBatch {
            seq: msg.seq,
            commit_end: msg.commit_end,
            progress: std::mem::take(&mut msg.progress),
            counts: msg.counts(),
            records,
        });
        Ok(())
    }
}

impl Actor for KafkaProducerActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        if let Some((_, every)) = &self.heartbeats {
            ctx.run_interval(*every, |act, _ctx| act.heartbeat());
        }
        if self.producer.is_none() {
            match self.config.client_config().create_with_context(AckContext) {
                Ok(producer) => self.producer = Some(Arc::new(producer)),
                // Without a producer every batch is refused (`SessionClosed`).
                Err(e) => {
                    self.budget
                        .fatal(ExitCode::Config, "invalid kafka producer configuration", &e)
                }
            }
        }
    }
}

impl Supervised for KafkaProducerActor {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        self.budget.record();
        self.producer = None;
        // The write in flight was the context's future, gone with it.
        self.persist = GroupCommit::default();
        self.break_session(SessionBreak::ProducerRestarted);
    }
}

impl Handler<OpenSession> for KafkaProducerActor {
    type Result = ();

    fn handle(&mut self, msg: OpenSession, _ctx: &mut Self::Context) {
        self.break_session(SessionBreak::Superseded);
        self.session = Some(Session {
            id: msg.session,
            next_seq: 0,
            on_broken: msg.on_broken,
            on_persisted: msg.on_persisted,
        });
    }
}

impl Handler<PublishBatch> for KafkaProducerActor {
    type Result = ResponseActFuture<Self, Result<(), ProducerError>>;

    fn handle(&mut self, mut msg: PublishBatch, ctx: &mut Self::Context) -> Self::Result {
        let now = now_ms();
        let encoder = Encoder::new(&self.config, &self.database, now);
        let events: usize = msg.events.iter().map(|e| encoder.records_of(e)).sum();
        let tx = match &mut self.transactions {
            Some(t) => t.plan(&msg.events, msg.commit_end),
            None => TxPlan::default(),
        };
        let count = events + msg.rows.as_ref().map_or(0, |r| r.rows.len()) + tx.records();
        if let Err(e) = self.admit(&mut msg, count) {
            return Box::pin(fut::ready(Err(e)));
        }
        let Some(producer) = self.producer.clone() else {
            return Box::pin(fut::ready(Err(ProducerError::SessionClosed(msg.session))));
        };
        let job = BatchJob {
            producer,
            config: self.config.clone(),
            partitioning: self.partitioning.clone(),
            database: self.database.clone(),
            dead_letters: self.oversized_to(),
            now_ms: now,
            session: msg.session,
            events: std::mem::take(&mut msg.events),
            rows: msg.rows.take(),
            records: count,
            tx,
        };
        let (session, seq, me) = (msg.session, msg.seq, ctx.address());
        let committed = job
            .events
            .iter()
            .find(|e| !e.snapshot && e.tx.commit_time_us > 0)
            .map(|e| e.tx.commit_time_us);
        let enqueue = async move {
            let ack = job.enqueue().await?;
            watch_deliveries(ack, (session, seq, committed), me);
            Ok::<(), ProducerError>(())
        };
        Box::pin(enqueue.into_actor(self).then(move |res, act, _ctx| {
            let wait = (res.is_ok() && act.inflight.records() >= act.config.max_inflight_records)
                .then(|| {
                    let (tx, rx) = oneshot::channel();
                    act.capacity_waiters.push(tx);
                    rx
                });
            async move {
                res?;
                if let Some(rx) = wait {
                    rx.await
                        .map_err(|_| ProducerError::SessionClosed(session))?;
                }
                Ok(())
            }
            .into_actor(act)
        }))
    }
}

impl Handler<BatchDelivered> for KafkaProducerActor {
    type Result = ();

    fn handle(&mut self, msg: BatchDelivered, ctx: &mut Self::Context) {
        if self.session.as_ref().map(|s| s.id) != Some(msg.session) {
            return; // a batch of a session already abandoned
        }
        let err = match msg.outcome {
            Ok(()) => return self.complete(msg.seq, ctx),
            Err(err) => err,
        };
        // Nothing after a failed batch may be checkpointed.
        self.inflight.fail();
        if let TaskError::Failed(e) = &err {
            if let ErrorClass::Fatal(code) = e.class() {
                self.budget
                    .fatal(code, "kafka refused a record permanently", e);
                // The stream is told; no new work starts once a fatal is reported.
                self.break_session(SessionBreak::Refused);
                return;
            }
        }
        crate::metrics::metrics().kafka_errors.inc();
        tracing::warn!(session = msg.session, seq = msg.seq, error = %err, "delivery failed; restarting from checkpoint");
        ctx.stop();
    }
}

impl Handler<DrainProducer> for KafkaProducerActor {
    type Result = ResponseFuture<Result<Option<Lsn>, ProducerError>>;

    fn handle(&mut self, _msg: DrainProducer, _ctx: &mut Self::Context) -> Self::Result {
        let session = self.session.as_ref().map_or(0, |s| s.id);
        if self.inflight.is_empty() {
            let last = self.last_persist;
            return Box::pin(async move { Ok(last) });
        }
        let (tx, rx) = oneshot::channel();
        self.drain_waiters.push(tx);
        Box::pin(async move { rx.await.map_err(|_| ProducerError::SessionClosed(session)) })
    }
}

/// Wait for the acknowledgements of batch `seq` of `session` in the
/// background, then tell the actor `me` how it went; a batch of streamed
/// changes whose oldest transaction committed at `committed` (µs) is
/// counted in `pgcdc_kafka_ack_seconds`.
fn watch_deliveries(
    ack: Arc<BatchAck>,
    (session, seq, committed): (u64, u64, Option<i64>),
    me: Addr<KafkaProducerActor>,
) {
    actix::spawn(async move {
        let handle = actix::spawn(await_deliveries(ack));
        let outcome = match handle.await {
            // Reported as fatal by the actor; not logged as a crash here.
            Ok(Err(e)) if matches!(e.class(), ErrorClass::Fatal(_)) => Err(TaskError::Failed(e)),
            other => task_outcome("kafka_producer", other),
        };
        if let (Ok(()), Some(t)) = (&outcome, committed) {
            crate::metrics::metrics().acknowledged(t);
        }
        me.do_send(BatchDelivered {
            session,
            seq,
            outcome,
        });
    });
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
