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
mod envelope;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use rdkafka::client::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, ProducerContext, ThreadedProducer};
use tokio::sync::{oneshot, Notify};

pub use crate::error::ProducerError;
pub use config::{KafkaConfig, TopicMode, DURABLE_REPLICAS};
pub use envelope::{EncodedRecord, Encoder};

use crate::checkpoint::CheckpointActor;
use crate::error::{ErrorClass, ExitCode};
use crate::lsn::Lsn;
use crate::messages::{
    DrainProducer, LsnPersisted, OpenSession, PersistLsn, PublishBatch, SessionBreak, SessionBroken,
};
use crate::supervision::{task_outcome, RestartBudget, TaskError};
use acks::{AckPrefix, PendingBatch};

/// Headers on every record: table, op, commit LSN, column types.
const HEADERS_PER_RECORD: usize = 4;
/// How long to wait before offering a record again when librdkafka's local
/// queue is full: long enough for its I/O thread to drain some, short enough
/// not to idle the pipeline.
const QUEUE_FULL_WAIT: Duration = Duration::from_millis(5);

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

/// The acknowledgements one batch still waits for. Every record of the batch
/// carries the same `Arc` as its delivery opaque, so an acknowledgement costs
/// a counter decrement instead of a channel per record.
struct BatchAck {
    remaining: AtomicUsize,
    /// The first delivery error of the batch.
    error: Mutex<Option<KafkaError>>,
    done: Notify,
}

impl BatchAck {
    fn new(records: usize) -> Arc<Self> {
        let ack = Arc::new(Self {
            remaining: AtomicUsize::new(records),
            error: Mutex::new(None),
            done: Notify::new(),
        });
        if records == 0 {
            ack.done.notify_one();
        }
        ack
    }

    /// One record's delivery report; the last one wakes [`BatchAck::wait`].
    fn delivered(&self, error: Option<&KafkaError>) {
        if let Some(e) = error {
            if let Ok(mut first) = self.error.lock() {
                first.get_or_insert_with(|| e.clone());
            }
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.done.notify_one();
        }
    }

    /// Wait until every record is acknowledged; the first error, if any.
    async fn wait(&self) -> Result<(), KafkaError> {
        self.done.notified().await;
        match self.error.lock().map(|mut e| e.take()) {
            Ok(Some(e)) => Err(e),
            Ok(None) => Ok(()),
            Err(_) => Err(KafkaError::Canceled),
        }
    }
}

/// Counts each batch's acknowledgements down (librdkafka's delivery
/// callback, on the producer's polling thread).
struct AckContext;

impl ClientContext for AckContext {}

impl ProducerContext for AckContext {
    type DeliveryOpaque = Arc<BatchAck>;

    fn delivery(&self, result: &DeliveryResult<'_>, ack: Arc<BatchAck>) {
        ack.delivered(result.as_ref().err().map(|(e, _)| e));
    }
}

type Producer = ThreadedProducer<AckContext>;

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
            config,
            database: database.into(),
            checkpoint,
            budget,
            producer: None,
            session: None,
            inflight: AckPrefix::default(),
            capacity_waiters: Vec::new(),
            drain_waiters: Vec::new(),
            last_persist: None,
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
        self.capacity_waiters.clear();
        self.drain_waiters.clear();
    }

    /// Mark `seq` done and move the checkpoint over the done prefix.
    fn complete(&mut self, seq: u64) {
        let released = self.inflight.acked(seq);
        let out = &crate::metrics::metrics().events_out;
        for ((table, op), n) in released.counts.iter().flatten() {
            out.with_label_values(&[table.as_str(), op]).inc_by(*n);
        }
        if let (Some(persist), Some(s)) = (released.persist, &self.session) {
            self.last_persist = Some(persist.lsn);
            self.checkpoint.do_send(PersistLsn {
                lsn: persist.lsn,
                progress: persist.progress,
                notify: s.on_persisted.clone(),
            });
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

    fn started(&mut self, _ctx: &mut Self::Context) {
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
        let mut records = Vec::with_capacity(msg.events.len());
        let mut encoder = Encoder::new(&self.config, &self.database, now);
        for e in &msg.events {
            encoder.event(e, &mut records);
        }
        // Snapshot rows (one `op=r` record each) are encoded on the blocking
        // pool, off this thread, while the readers fetch the next chunks.
        let count = records.len() + msg.rows.as_ref().map_or(0, |r| r.rows.len());
        if let Err(e) = self.admit(&mut msg, count) {
            return Box::pin(fut::ready(Err(e)));
        }
        let rows = msg.rows.take();
        let Some(producer) = self.producer.clone() else {
            return Box::pin(fut::ready(Err(ProducerError::SessionClosed(msg.session))));
        };
        let (config, database) = (self.config.clone(), self.database.clone());
        let (session, seq, me) = (msg.session, msg.seq, ctx.address());
        let enqueue = async move {
            if let Some(rows) = rows {
                records = tokio::task::spawn_blocking(move || {
                    Encoder::new(&config, &database, now).rows(&rows, &mut records);
                    records
                })
                .await
                .map_err(|e| {
                    tracing::error!(error = %e, "encoding snapshot rows failed");
                    ProducerError::SessionClosed(session)
                })?;
            }
            let ack = enqueue_all(&producer, &records, now).await?;
            actix::spawn(async move {
                let handle = actix::spawn(await_deliveries(ack));
                let outcome = match handle.await {
                    // Reported as fatal by the actor; not logged as a crash here.
                    Ok(Err(e)) if matches!(e.class(), ErrorClass::Fatal(_)) => {
                        Err(TaskError::Failed(e))
                    }
                    other => task_outcome("kafka_producer", other),
                };
                me.do_send(BatchDelivered {
                    session,
                    seq,
                    outcome,
                });
            });
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
            Ok(()) => return self.complete(msg.seq),
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

/// Hand every record to librdkafka, waiting out a full local queue. The
/// records' timestamp is `now_ms`, when the batch was encoded (librdkafka
/// would otherwise read the clock once per record).
async fn enqueue_all(
    producer: &Producer,
    records: &[EncodedRecord],
    now_ms: i64,
) -> Result<Arc<BatchAck>, ProducerError> {
    let ack = BatchAck::new(records.len());
    for r in records {
        let headers = OwnedHeaders::new_with_capacity(HEADERS_PER_RECORD)
            .insert(Header {
                key: crate::wire::header::TABLE,
                value: Some(&*r.table),
            })
            .insert(Header {
                key: crate::wire::header::OP,
                value: Some(r.op),
            })
            .insert(Header {
                key: crate::wire::header::COMMIT_LSN,
                value: Some(&*r.commit_lsn),
            })
            .insert(Header {
                key: crate::wire::header::TYPES,
                value: Some(&*r.types),
            });
        let mut record: BaseRecord<'_, [u8], [u8], Arc<BatchAck>> =
            BaseRecord::with_opaque_to(&r.topic, ack.clone())
                .headers(headers)
                .timestamp(now_ms);
        if let Some(k) = &r.key {
            record = record.key(k.as_slice());
        }
        if let Some(v) = &r.value {
            record = record.payload(v.as_slice());
        }
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    tokio::time::sleep(QUEUE_FULL_WAIT).await;
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
    }
    Ok(ack)
}

/// Wait for every acknowledgement of one batch.
async fn await_deliveries(ack: Arc<BatchAck>) -> Result<(), ProducerError> {
    ack.wait().await?;
    fail::fail_point!(crate::wire::failpoint::PRODUCER_AFTER_ACK);
    Ok(())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use futures::FutureExt;

    use super::*;

    #[test]
    fn a_batch_is_done_at_its_last_report_with_its_first_error() {
        assert_eq!(BatchAck::new(0).wait().now_or_never(), Some(Ok(())));

        let ack = BatchAck::new(3);
        ack.delivered(None);
        ack.delivered(Some(&KafkaError::Canceled));
        assert!(ack.wait().now_or_never().is_none(), "one report missing");
        ack.delivered(Some(&KafkaError::NoMessageReceived));
        assert_eq!(ack.wait().now_or_never(), Some(Err(KafkaError::Canceled)));

        let ok = BatchAck::new(2);
        ok.delivered(None);
        ok.delivered(None);
        assert_eq!(ok.wait().now_or_never(), Some(Ok(())));
    }
}
