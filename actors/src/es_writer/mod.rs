//! EsWriterActor: consumes the change topics in a consumer group and keeps
//! one mirror index per table (plus an optional history index) in step, over
//! the `_bulk` REST API.
//!
//! Versions are commit LSNs with `version_type=external_gte`, so replaying any
//! part of Kafka leaves the mirror as one in-order pass would: a 409 means a
//! newer (or the same) version is already there and counts as success. Kafka
//! offsets are committed only after every record of the batch is written,
//! dead-lettered, or known to be superseded.

mod bulk;
mod client;
mod config;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::json;

pub use bulk::{
    doc_id, field_mapping, index_body, mirror_index, outcomes, plan, render, Action, Outcome,
    Planned,
};
pub use client::EsClient;
pub use config::EsConfig;

use crate::error::{exit_fatal, ErrorClass, ExitCode};
use crate::kafka_producer::{KafkaConfig, TopicMode};
use crate::supervision::{spawn_after_backoff, task_outcome, RestartBudget};

/// ES sink failures.
#[derive(Debug, thiserror::Error)]
pub enum EsError {
    /// Invalid settings found while building clients.
    #[error("{0}")]
    Config(String),
    /// Kafka consumer or dead-letter producer failure.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// HTTP transport failure (connection refused, reset, timeout).
    #[error("elasticsearch request: {0}")]
    Http(#[from] reqwest::Error),
    /// A whole request was refused.
    #[error("elasticsearch answered {status}: {body}")]
    Status {
        /// HTTP status.
        status: u16,
        /// Start of the body.
        body: String,
    },
}

impl EsError {
    /// The one classification point for sink errors.
    pub fn class(&self) -> ErrorClass {
        match self {
            EsError::Config(_) => ErrorClass::Fatal(ExitCode::Config),
            EsError::Status {
                status: 401 | 403, ..
            } => ErrorClass::Fatal(ExitCode::Upstream),
            _ => ErrorClass::Transient,
        }
    }

    /// Whether retrying the same request can help.
    fn retryable(&self) -> bool {
        match self {
            EsError::Http(_) => true,
            EsError::Status { status, .. } => *status == 429 || *status >= 500,
            _ => false,
        }
    }
}

/// The ES sink actor (supervised).
pub struct EsWriterActor {
    es: Arc<EsConfig>,
    kafka: Arc<KafkaConfig>,
    budget: RestartBudget,
    task: Option<tokio::task::AbortHandle>,
}

impl EsWriterActor {
    /// A sink reading the topics of `kafka` into `es`.
    pub fn new(es: Arc<EsConfig>, kafka: Arc<KafkaConfig>, budget: RestartBudget) -> Self {
        Self {
            es,
            kafka,
            budget,
            task: None,
        }
    }
}

impl Actor for EsWriterActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let sink = Sink {
            es: self.es.clone(),
            kafka: self.kafka.clone(),
        };
        let handle = spawn_after_backoff(&self.budget, sink.run());
        self.task = Some(handle.abort_handle());
        ctx.spawn(handle.into_actor(self).map(|res, _act, ctx| {
            if let Ok(Err(e)) = &res {
                if let ErrorClass::Fatal(code) = e.class() {
                    exit_fatal(code, "es sink cannot continue", e);
                }
            }
            if task_outcome("es_writer", res).is_err() {
                ctx.stop();
            }
        }));
    }
}

impl Supervised for EsWriterActor {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        self.budget.record();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The consuming loop, detached from the actor so panics surface as `JoinError`s.
struct Sink {
    es: Arc<EsConfig>,
    kafka: Arc<KafkaConfig>,
}

/// Logs the sink's partition assignments and failed offset commits: which
/// partitions this sink owns is the first question when a mirror lags.
/// Counts rebalances, so the continuity check knows when to start over.
#[derive(Default)]
struct SinkContext {
    rebalances: AtomicU64,
}

impl ClientContext for SinkContext {}

impl ConsumerContext for SinkContext {
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let parts = |tpl: &TopicPartitionList| {
            tpl.elements()
                .iter()
                .map(|e| format!("{}[{}]", e.topic(), e.partition()))
                .collect::<Vec<_>>()
                .join(",")
        };
        self.rebalances.fetch_add(1, Ordering::SeqCst);
        match rebalance {
            Rebalance::Assign(tpl) => tracing::info!(partitions = parts(tpl), "es sink assigned"),
            Rebalance::Revoke(tpl) => tracing::info!(partitions = parts(tpl), "es sink revoked"),
            Rebalance::Error(e) => tracing::warn!(error = %e, "es sink rebalance failed"),
        }
    }

    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        _offsets: &TopicPartitionList,
    ) {
        if let Err(e) = result {
            // The records are written again after a restart: no loss, but worth seeing.
            tracing::warn!(error = %e, "es sink offset commit failed");
        }
    }
}

/// Per-batch clients and caches.
struct Clients {
    consumer: Arc<StreamConsumer<SinkContext>>,
    /// The offset each partition's next record must have, since the last rebalance.
    next: NextOffsets,
    /// The rebalance count `next` belongs to.
    rebalances: u64,
    dlq: FutureProducer,
    dlq_topic: String,
    es: EsClient,
    indices: HashSet<String>,
}

impl Sink {
    async fn run(self) -> Result<(), EsError> {
        let mut c = self.connect()?;
        loop {
            let batch = self.collect(&c.consumer).await?;
            check_continuity(&mut c, &batch).await;
            self.write_batch(&mut c, &batch).await?;
            fail::fail_point!(crate::wire::failpoint::ES_AFTER_BULK);
            commit(&c.consumer, &batch)?;
        }
    }

    fn connect(&self) -> Result<Clients, EsError> {
        let mut cc = rdkafka::ClientConfig::new();
        // A killed sink's partitions move to its successor after this long (Kafka's default is 45 s).
        cc.set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "2000");
        for (k, v) in &self.kafka.properties {
            cc.set(k, v);
        }
        cc.set("bootstrap.servers", &self.kafka.brokers)
            .set("group.id", &self.es.consumer_group)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("client.id", "pgcdc-es-sink");
        let consumer: StreamConsumer<SinkContext> =
            cc.create_with_context(SinkContext::default())?;
        match self.kafka.topic_mode {
            TopicMode::Single => consumer.subscribe(&[self.kafka.topic.as_str()])?,
            TopicMode::PerTable => {
                let pattern = format!("^{}\\..*", self.kafka.topic_prefix.replace('.', "\\."));
                consumer.subscribe(&[pattern.as_str()])?
            }
        }
        let dlq = self.kafka.client_config().create()?;
        let dlq_topic = self.es.dead_letter_topic.clone();
        Ok(Clients {
            consumer: Arc::new(consumer),
            next: HashMap::new(),
            rebalances: 0,
            dlq,
            dlq_topic,
            es: EsClient::new(&self.es)?,
            indices: HashSet::new(),
        })
    }

    /// Wait for one record, then gather more until the batch is full or the flush interval passes.
    async fn collect(
        &self,
        consumer: &StreamConsumer<SinkContext>,
    ) -> Result<Vec<OwnedMessage>, EsError> {
        let first = consumer.recv().await?.detach();
        let deadline = Instant::now() + Duration::from_millis(self.es.flush_interval_ms);
        let mut bytes = first.payload().map_or(0, <[u8]>::len);
        let mut batch = vec![first];
        while batch.len() < self.es.bulk_max_actions && bytes < self.es.bulk_max_bytes {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, consumer.recv()).await {
                Ok(msg) => {
                    let msg = msg?.detach();
                    bytes += msg.payload().map_or(0, <[u8]>::len);
                    batch.push(msg);
                }
                Err(_) => break,
            }
        }
        Ok(batch)
    }

    /// Write a batch: records in order, truncates as barriers, poison to the dead-letter topic.
    async fn write_batch(&self, c: &mut Clients, batch: &[OwnedMessage]) -> Result<(), EsError> {
        let mut pending = Vec::new();
        for (i, msg) in batch.iter().enumerate() {
            match plan(&self.es, msg.key(), msg.payload(), i) {
                Planned::Skip => {}
                Planned::Actions(actions) => {
                    for a in &actions {
                        self.ensure_index(c, &a.index, msg).await?;
                    }
                    pending.extend(actions);
                }
                Planned::Truncate { index, below_lsn } => {
                    self.flush(c, std::mem::take(&mut pending), batch).await?;
                    with_retry(&self.es, || c.es.delete_older_than(&index, below_lsn)).await?;
                    tracing::info!(index, lsn = below_lsn, "truncate applied");
                }
                Planned::Poison(reason) => {
                    crate::metrics::metrics().dead_letters.inc();
                    dead_letter(c, msg, &reason).await?
                }
            }
        }
        self.flush(c, pending, batch).await
    }

    async fn ensure_index(
        &self,
        c: &mut Clients,
        index: &str,
        msg: &OwnedMessage,
    ) -> Result<(), EsError> {
        if c.indices.contains(index) {
            return Ok(());
        }
        let types = header(msg, crate::wire::header::TYPES);
        let body = index_body(&self.es, types.as_deref(), index.ends_with("_history"));
        with_retry(&self.es, || c.es.ensure_index(index, &body)).await?;
        c.indices.insert(index.to_owned());
        Ok(())
    }

    /// Send actions in `max_in_flight` concurrent lanes (by document), each until
    /// every action is done, superseded, or dead-lettered.
    async fn flush(
        &self,
        c: &Clients,
        pending: Vec<Action>,
        batch: &[OwnedMessage],
    ) -> Result<(), EsError> {
        let lanes = self.es.max_in_flight.max(1);
        if lanes == 1 || pending.len() < 2 * lanes {
            return self.flush_lane(c, pending, batch).await;
        }
        let mut split: Vec<Vec<Action>> = (0..lanes).map(|_| Vec::new()).collect();
        for a in pending {
            split[(a.lane % lanes as u64) as usize].push(a);
        }
        let results =
            futures::future::join_all(split.into_iter().map(|p| self.flush_lane(c, p, batch)))
                .await;
        results.into_iter().collect()
    }

    /// Send one lane's actions, in order, until each is handled.
    async fn flush_lane(
        &self,
        c: &Clients,
        mut pending: Vec<Action>,
        batch: &[OwnedMessage],
    ) -> Result<(), EsError> {
        let mut attempt = 0u32;
        while !pending.is_empty() {
            let resp = with_retry(&self.es, || c.es.bulk(render(&pending))).await?;
            let results = outcomes(&resp, pending.len()).map_err(|e| EsError::Status {
                status: 200,
                body: e,
            })?;
            let mut retry = Vec::new();
            let mut counts: HashMap<&str, usize> = HashMap::new();
            for (action, outcome) in pending.into_iter().zip(results) {
                match outcome {
                    Outcome::Done => *counts.entry("done").or_default() += 1,
                    Outcome::Conflict => *counts.entry("superseded").or_default() += 1,
                    Outcome::Retry(_) => retry.push(action),
                    Outcome::Reject(reason) => {
                        *counts.entry("dead_lettered").or_default() += 1;
                        dead_letter(c, &batch[action.origin], &reason).await?;
                    }
                }
            }
            tracing::debug!(?counts, retry = retry.len(), "bulk written");
            let m = crate::metrics::metrics();
            for (outcome, n) in &counts {
                m.es_items.with_label_values(&[outcome]).inc_by(*n as u64);
            }
            m.es_items
                .with_label_values(&["retried"])
                .inc_by(retry.len() as u64);
            m.dead_letters
                .inc_by(counts.get("dead_lettered").copied().unwrap_or(0) as u64);
            if !retry.is_empty() {
                attempt += 1;
                tracing::warn!(
                    items = retry.len(),
                    attempt,
                    "bulk items rejected with 429/5xx; retrying"
                );
                tokio::time::sleep(backoff(&self.es, attempt)).await;
            }
            pending = retry;
        }
        Ok(())
    }
}

/// Run `op` until it succeeds or fails with a non-retryable error, backing off in between.
async fn with_retry<T, F, Fut>(cfg: &EsConfig, mut op: F) -> Result<T, EsError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, EsError>>,
{
    let mut attempt = 0;
    loop {
        match op().await {
            Err(e) if e.retryable() => {
                attempt += 1;
                tracing::warn!(error = %e, attempt, "elasticsearch request failed; retrying");
                tokio::time::sleep(backoff(cfg, attempt)).await;
            }
            other => return other,
        }
    }
}

/// Capped exponential backoff with jitter (50–100% of the step).
fn backoff(cfg: &EsConfig, attempt: u32) -> Duration {
    let step = cfg
        .retry_initial_ms
        .saturating_mul(1 << attempt.min(16))
        .min(cfg.retry_max_ms);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let jitter = u64::from(nanos % 1000) * step / 2000;
    Duration::from_millis(step / 2 + jitter)
}

fn header(msg: &OwnedMessage, key: &str) -> Option<String> {
    let headers = msg.headers()?;
    (0..headers.count())
        .map(|i| headers.get(i))
        .find(|h| h.key == key)
        .and_then(|h| h.value.map(|v| String::from_utf8_lossy(v).into_owned()))
}

/// Park a record on the dead-letter topic with the reason; waits for the acknowledgement.
async fn dead_letter(c: &Clients, msg: &OwnedMessage, reason: &str) -> Result<(), EsError> {
    let table = header(msg, crate::wire::header::TABLE).unwrap_or_default();
    tracing::warn!(
        topic = msg.topic(),
        partition = msg.partition(),
        offset = msg.offset(),
        table,
        reason,
        "record dead-lettered"
    );
    // The audit log's `dead_letters` table (this target never reaches the console: row values).
    let key = msg.key().map(String::from_utf8_lossy);
    let lsn = header(msg, crate::wire::header::COMMIT_LSN);
    let payload = msg.payload().map(String::from_utf8_lossy);
    tracing::warn!(
        target: crate::audit::DEAD_LETTER_TARGET,
        table,
        key = key.as_deref(),
        lsn = lsn.as_deref(),
        reason,
        payload = payload.as_deref(),
        "record dead-lettered"
    );
    let value = json!({
        "reason": reason,
        "table": table,
        "topic": msg.topic(),
        "partition": msg.partition(),
        "offset": msg.offset(),
        "payload": payload,
    })
    .to_string();
    let headers = OwnedHeaders::new().insert(Header {
        key: crate::wire::header::REASON,
        value: Some(reason),
    });
    let mut record: FutureRecord<'_, [u8], str> = FutureRecord::to(&c.dlq_topic)
        .payload(value.as_str())
        .headers(headers);
    if let Some(k) = msg.key() {
        record = record.key(k);
    }
    c.dlq
        .send(record, Duration::from_secs(30))
        .await
        .map_err(|(e, _)| EsError::Kafka(e))?;
    Ok(())
}

/// Every record of a partition must follow the previous one, and the first
/// after a (re)assignment must be at the group's committed offset: pgcdc's
/// topics have no gaps (no transactions, no compaction unless the operator
/// set it). A jump means records were never delivered: deleted by retention
/// before the sink read them, compacted away, or skipped by the broker
/// (tansu 0.6 answers a fetch from the middle of a record batch with the
/// next batch). The mirror may then miss changes, so it is logged as an
/// error and counted; a backfill (`pgcdc snapshot --table`) repairs it.
async fn check_continuity(c: &mut Clients, batch: &[OwnedMessage]) {
    let rebalances = c.consumer.context().rebalances.load(Ordering::SeqCst);
    if rebalances != c.rebalances {
        c.next.clear();
        c.rebalances = rebalances;
    }
    let unseen: HashSet<(&str, i32)> = batch
        .iter()
        .map(|m| (m.topic(), m.partition()))
        .filter(|&(topic, partition)| {
            c.next
                .get(topic)
                .is_none_or(|parts| !parts.contains_key(&partition))
        })
        .collect();
    if !unseen.is_empty() {
        let mut tpl = TopicPartitionList::new();
        for (topic, partition) in &unseen {
            tpl.add_partition(topic, *partition);
        }
        let consumer = c.consumer.clone();
        let committed = tokio::task::spawn_blocking(move || {
            consumer.committed_offsets(tpl, Duration::from_secs(5))
        })
        .await;
        match committed {
            Ok(Ok(tpl)) => {
                for e in tpl.elements() {
                    if let Offset::Offset(o) = e.offset() {
                        c.next
                            .entry(e.topic().to_owned())
                            .or_default()
                            .insert(e.partition(), o);
                    }
                }
            }
            // Unchecked this time; the records themselves are still written.
            other => tracing::debug!(?other, "es sink: no committed offsets to check against"),
        }
    }
    let at = batch.iter().map(|m| (m.topic(), m.partition(), m.offset()));
    for g in skipped_offsets(&mut c.next, at) {
        crate::metrics::metrics()
            .es_skipped_offsets
            .inc_by(g.skipped() as u64);
        tracing::error!(
            topic = g.topic,
            partition = g.partition,
            expected = g.expected,
            got = g.got,
            skipped = g.skipped(),
            "es sink: kafka skipped offsets; the mirror may miss changes (backfill the table with `pgcdc snapshot --table`)"
        );
    }
}

/// A jump in one partition's offsets.
#[derive(Debug, PartialEq, Eq)]
struct Gap {
    topic: String,
    partition: i32,
    expected: i64,
    got: i64,
}

impl Gap {
    fn skipped(&self) -> i64 {
        self.got - self.expected
    }
}

/// Topic → partition → the offset its next record must have. Keyed by topic
/// first so a record is looked up by `&str`, without allocating.
type NextOffsets = HashMap<String, HashMap<i32, i64>>;

/// Walk `(topic, partition, offset)`s in delivery order against `next` and
/// update it. A record later than expected is a gap; an earlier one is a
/// re-delivery (no gap); a partition `next` does not know is taken as it comes.
fn skipped_offsets<'a>(
    next: &mut NextOffsets,
    at: impl IntoIterator<Item = (&'a str, i32, i64)>,
) -> Vec<Gap> {
    let mut gaps = Vec::new();
    for (topic, partition, offset) in at {
        if !next.contains_key(topic) {
            next.insert(topic.to_owned(), HashMap::new());
        }
        let Some(parts) = next.get_mut(topic) else {
            continue;
        };
        if let Some(&expected) = parts.get(&partition) {
            if offset > expected {
                gaps.push(Gap {
                    topic: topic.to_owned(),
                    partition,
                    expected,
                    got: offset,
                });
            }
        }
        parts.insert(partition, offset + 1);
    }
    gaps
}

/// Commit the offset after the last record of each partition in the batch.
fn commit(consumer: &StreamConsumer<SinkContext>, batch: &[OwnedMessage]) -> Result<(), EsError> {
    let mut next: HashMap<(&str, i32), i64> = HashMap::new();
    for m in batch {
        let e = next.entry((m.topic(), m.partition())).or_insert(0);
        *e = (*e).max(m.offset() + 1);
    }
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), offset) in next {
        tpl.add_partition_offset(topic, partition, Offset::Offset(offset))?;
    }
    // Asynchronous: a synchronous commit would block the actor thread (the
    // whole pipeline when the sink runs in the daemon) for a broker round
    // trip. A commit that fails only means these records are written again.
    consumer.commit(&tpl, CommitMode::Async)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_forward_jumps_in_one_partition_are_gaps() {
        let mut next = NextOffsets::new();
        next.entry("t".to_owned()).or_default().insert(0, 10);
        let at = [
            ("t", 0, 10),
            ("t", 0, 11),
            ("t", 1, 500), // unknown partition: taken as it comes
            ("t", 1, 501),
            ("t", 0, 15), // 12..=14 never delivered
            ("t", 0, 3),  // re-delivery after a rebalance
            ("t", 0, 4),
            ("t", 1, 503), // 502 never delivered
        ];
        let gaps = skipped_offsets(&mut next, at);
        let g = |partition, expected, got| Gap {
            topic: "t".into(),
            partition,
            expected,
            got,
        };
        assert_eq!(gaps, vec![g(0, 12, 15), g(1, 502, 503)]);
        assert_eq!(gaps[0].skipped(), 3);
        assert_eq!(next["t"][&0], 5);
        assert_eq!(next["t"][&1], 504);
    }
}
