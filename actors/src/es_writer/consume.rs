//! The sink's consuming loop: collect a batch from Kafka, check offset
//! continuity, plan and write it to Elasticsearch (truncates as barriers,
//! concurrent lanes by document, poison to the dead-letter topic), then commit
//! the offsets. Between batches, and whenever no record came for a while, it
//! probes its group's progress and rejoins the group when stalled (`stall`).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};

use super::bulk::{index_body, outcomes, plan, render, Action, Outcome, Planned};
use super::client::EsClient;
use super::config::EsConfig;
use super::continuity::Continuity;
use super::dead_letter::{header, DeadLetters};
use super::error::EsError;
use super::group::{Prober, SinkConsumer};
use super::remedy::Membership;
use super::retry::{backoff, with_retry};
use super::stall::StallWatch;
use crate::kafka_producer::KafkaConfig;
use crate::lsn::Lsn;

/// The status a `_bulk` response with unreadable items is reported under (the request itself succeeded).
const OK: u16 = 200;

/// The consuming loop, detached from the actor so panics surface as `JoinError`s.
pub(super) struct Sink {
    /// Where to write.
    pub(super) es: Arc<EsConfig>,
    /// What to read.
    pub(super) kafka: Arc<KafkaConfig>,
}

/// Clients and caches of one run.
pub(super) struct Clients {
    /// The group member; replaced when the sink rejoins.
    pub(super) consumer: SinkConsumer,
    /// Looks up the group's progress.
    pub(super) prober: Prober,
    /// The offset-continuity check.
    pub(super) continuity: Continuity,
    /// The stall check.
    pub(super) watch: StallWatch,
    /// Whether it reads as a group member or directly.
    pub(super) membership: Membership,
    /// When the group was last probed.
    pub(super) probed_at: Instant,
    /// Probes failed in a row.
    pub(super) probe_failures: u32,
    dlq: DeadLetters,
    es: EsClient,
    /// Indices known to exist.
    indices: HashSet<String>,
}

impl Sink {
    /// Consume, write and commit until an error ends the run.
    pub(super) async fn run(self) -> Result<(), EsError> {
        let mut c = self.connect()?;
        loop {
            let Some(mut batch) = self.collect(&c.consumer).await? else {
                self.check_group(&mut c, true).await?;
                continue;
            };
            c.continuity.check(&c.consumer, &mut batch).await;
            if batch.is_empty() {
                continue; // every record is to be read again (a seek back)
            }
            self.write_batch(&mut c, &batch).await?;
            fail::fail_point!(crate::wire::failpoint::ES_AFTER_BULK);
            commit(&c.consumer, &batch)?;
            self.written(&mut c, &batch);
            if c.probed_at.elapsed() >= super::PROBE_EVERY {
                self.check_group(&mut c, false).await?;
            }
        }
    }

    /// Join the group, and build the dead-letter producer and the ES client.
    fn connect(&self) -> Result<Clients, EsError> {
        let dlq = DeadLetters {
            producer: self.kafka.client_config().create()?,
            topic: self.es.dead_letter_topic.clone(),
        };
        let bound = Duration::from_secs(self.es.stall_timeout_secs);
        Ok(Clients {
            consumer: super::group::join(&self.es, &self.kafka)?,
            prober: super::group::prober(&self.es, &self.kafka)?,
            continuity: Continuity::default(),
            watch: StallWatch::new(bound, Instant::now()),
            membership: Membership::Group,
            probed_at: Instant::now(),
            probe_failures: 0,
            dlq,
            es: EsClient::new(&self.es)?,
            indices: HashSet::new(),
        })
    }

    /// Wait for one record, then gather more until the batch is full or the
    /// flush interval passes; `None` when no record came for [`super::PROBE_EVERY`].
    async fn collect(&self, consumer: &SinkConsumer) -> Result<Option<Vec<OwnedMessage>>, EsError> {
        let Ok(first) = tokio::time::timeout(super::PROBE_EVERY, consumer.recv()).await else {
            return Ok(None);
        };
        let first = first?.detach();
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
        Ok(Some(batch))
    }

    /// After a committed batch: progress for the stall check and readiness,
    /// and the highest commit LSN applied per table.
    fn written(&self, c: &mut Clients, batch: &[OwnedMessage]) {
        let now = Instant::now();
        for ((topic, partition), offset) in next_offsets(batch) {
            c.watch.committed(topic, partition, offset, now);
        }
        let mut applied: HashMap<String, Lsn> = HashMap::new();
        for msg in batch {
            let lsn = header(msg, crate::wire::header::COMMIT_LSN).and_then(|l| l.parse().ok());
            if let (Some(table), Some(lsn)) = (header(msg, crate::wire::header::TABLE), lsn) {
                let at = applied.entry(table).or_insert(lsn);
                *at = (*at).max(lsn);
            }
        }
        let m = crate::metrics::metrics();
        for (table, lsn) in applied {
            m.sink_applied(&table, lsn);
        }
        m.sink_wrote();
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
                    c.dlq.send(msg, &reason).await?
                }
            }
        }
        self.flush(c, pending, batch).await
    }

    /// Create `index` (mapped from the record's column types) unless known.
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
                status: OK,
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
                        c.dlq.send(&batch[action.origin], &reason).await?;
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

/// The offset after the last record of each partition in the batch.
fn next_offsets(batch: &[OwnedMessage]) -> HashMap<(&str, i32), i64> {
    let mut next: HashMap<(&str, i32), i64> = HashMap::new();
    for m in batch {
        let e = next.entry((m.topic(), m.partition())).or_insert(0);
        *e = (*e).max(m.offset() + 1);
    }
    next
}

/// Commit the offset after the last record of each partition in the batch.
fn commit(consumer: &SinkConsumer, batch: &[OwnedMessage]) -> Result<(), EsError> {
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), offset) in next_offsets(batch) {
        tpl.add_partition_offset(topic, partition, Offset::Offset(offset))?;
    }
    // Asynchronous: a synchronous commit would block the actor thread (the
    // whole pipeline when the sink runs in the daemon) for a broker round
    // trip. A commit that fails only means these records are written again.
    consumer.commit(&tpl, CommitMode::Async)?;
    Ok(())
}
