//! Producing canary records: one task, in confirmation order. For each
//! confirmed canary it looks up the change partitions' high watermarks (every
//! change before the canary is acknowledged, so it sits below them), then
//! produces the signed record on the canary topic and, once Kafka
//! acknowledges it, counts the canary as having reached the Kafka stage.
//! A canary whose look-up or delivery fails is dropped (logged once per
//! streak): its stage ages until a later one gets through.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rdkafka::consumer::BaseConsumer;
use rdkafka::error::KafkaError;
use tokio::sync::mpsc;

use super::record::{self, CanaryRecord, Offsets};
use super::{now_us, Stage};
use crate::kafka_producer::{KafkaConfig, PolledProducer, Reply};
use crate::lsn::Lsn;
use crate::metrics::metrics;
use crate::snapshot::watermark::MessageKey;

/// The canary producer's `client.id`, and its name in refusals.
const CLIENT: &str = "pgcdc-canary";
/// Confirmed canaries waiting for their record, at most (more are dropped:
/// Kafka is not answering, and the ones queued already show it).
const QUEUE_MAX: usize = 64;

/// Where [`super::confirmed`] hands confirmed canaries: (written at µs, commit LSN).
static QUEUE: OnceLock<mpsc::Sender<(i64, Lsn)>> = OnceLock::new();

/// Hand a confirmed canary to the publisher, if one runs.
pub(super) fn offer(t_us: i64, commit: Lsn) {
    if let Some(tx) = QUEUE.get() {
        if tx.try_send((t_us, commit)).is_err() {
            tracing::debug!(lsn = %commit, "canary record queue full; canary dropped");
        }
    }
}

/// What the publishing task holds.
struct Publisher {
    kafka: Arc<KafkaConfig>,
    key: MessageKey,
    slot: String,
    topic: String,
    producer: PolledProducer<Reply>,
    /// Looks up high watermarks (a consumer outside any group).
    lookup: Arc<BaseConsumer>,
    /// Failures in a row (the first of a streak is logged).
    failures: u32,
}

/// Start publishing the records of `slot`'s confirmed canaries, signed with `key`.
pub fn spawn_publisher(
    kafka: Arc<KafkaConfig>,
    key: MessageKey,
    slot: &str,
) -> Result<(), KafkaError> {
    let mut producer = kafka.client_config();
    producer.set("client.id", CLIENT);
    let lookup = kafka.client_base("pgcdc-canary-offsets");
    let (tx, rx) = mpsc::channel(QUEUE_MAX);
    let p = Publisher {
        topic: record::topic(&kafka.topic_prefix),
        producer: producer.create_with_context(Reply(CLIENT))?,
        lookup: Arc::new(lookup.create()?),
        kafka,
        key,
        slot: slot.to_owned(),
        failures: 0,
    };
    if QUEUE.set(tx).is_err() {
        tracing::warn!("a canary publisher runs already; not starting another");
        return Ok(());
    }
    tokio::spawn(p.run(rx));
    Ok(())
}

impl Publisher {
    /// Publish each confirmed canary in turn.
    async fn run(mut self, mut rx: mpsc::Receiver<(i64, Lsn)>) {
        while let Some((t_us, commit)) = rx.recv().await {
            match self.publish(t_us, commit).await {
                Ok(()) => self.failures = 0,
                Err(e) => {
                    self.failures += 1;
                    if self.failures == 1 {
                        tracing::warn!(topic = %self.topic, error = %e, "canary record not published; the kafka stage ages until one is");
                    }
                }
            }
        }
    }

    /// Look up the high watermarks, produce the record, count the Kafka stage.
    async fn publish(&self, t_us: i64, commit: Lsn) -> Result<(), KafkaError> {
        let offsets = self.ends().await?;
        let record = CanaryRecord::signed(&self.key, &self.slot, (t_us, commit), offsets);
        let payload = serde_json::to_vec(&record).unwrap_or_default();
        let key = Some(self.slot.as_bytes());
        self.producer
            .deliver(&self.topic, key, &payload, None, Duration::ZERO)
            .await?;
        metrics()
            .freshness
            .reached(Stage::Kafka, t_us, now_us(), Duration::ZERO);
        tracing::debug!(lsn = %commit, "canary record acknowledged");
        Ok(())
    }

    /// The change partitions' high watermarks now.
    async fn ends(&self) -> Result<Offsets, KafkaError> {
        let (lookup, kafka) = (self.lookup.clone(), self.kafka.clone());
        let ends = tokio::task::spawn_blocking(move || {
            crate::es_writer::change_topic_ends(&*lookup, &kafka)
        })
        .await
        .map_err(|_| KafkaError::Canceled)??;
        let mut offsets = Offsets::new();
        for (topic, partition, end) in ends {
            offsets.entry(topic).or_default().insert(partition, end);
        }
        Ok(offsets)
    }
}
