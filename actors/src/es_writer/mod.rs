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
struct SinkContext;

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
    consumer: StreamConsumer<SinkContext>,
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
            self.write_batch(&mut c, &batch).await?;
            fail::fail_point!("es-after-bulk");
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
        let consumer: StreamConsumer<SinkContext> = cc.create_with_context(SinkContext)?;
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
            consumer,
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
        let types = header(msg, "pgcdc.types");
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
    let table = header(msg, "pgcdc.table").unwrap_or_default();
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
    let lsn = header(msg, "pgcdc.commit_lsn");
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
        key: "pgcdc.reason",
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
