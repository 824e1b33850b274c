//! The sink's consumer group membership: joining (a subscribed consumer),
//! leaving, and probing the group's progress (high watermarks against
//! committed offsets) for the stall check in `stall`. Every broker round
//! trip runs on a blocking thread: the sink may share its thread with the
//! whole pipeline.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Offset, TopicPartitionList};

use super::config::EsConfig;
use super::consume::{Clients, Sink};
use super::context::SinkContext;
use super::continuity::Continuity;
use super::error::EsError;
use super::stall::{PartitionLag, Verdict};
use crate::kafka_producer::{KafkaConfig, TopicMode};

/// A killed sink's partitions move to its successor after this long (Kafka's default is 45 s).
const SESSION_TIMEOUT_MS: &str = "10000";
/// Heartbeats well inside the session timeout, as Kafka recommends (a third or less).
const HEARTBEAT_INTERVAL_MS: &str = "2000";
/// Timeout of each metadata, watermark and offset request of a probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for a consumer to leave its group; past it the sink joins
/// anyway (the old member then times out on the broker).
const LEAVE_TIMEOUT: Duration = Duration::from_secs(15);

/// The sink's consumer.
pub(super) type SinkConsumer = Arc<StreamConsumer<SinkContext>>;

impl Sink {
    /// Probe the group's progress: update the lag metrics and readiness,
    /// and rejoin the group when the sink is stalled and the backoff allows.
    pub(super) async fn check_group(&self, c: &mut Clients, idle: bool) -> Result<(), EsError> {
        c.probed_at = Instant::now();
        let partitions = match probe(&c.consumer, &self.kafka).await {
            Ok(p) => {
                c.probe_failures = 0;
                p
            }
            Err(e) => {
                c.probe_failures += 1;
                if c.probe_failures == 1 {
                    tracing::warn!(error = %e, "es sink: cannot look up its group's progress; lag and stall are unknown until it can");
                }
                return Ok(());
            }
        };
        let m = crate::metrics::metrics();
        for l in &partitions {
            m.es_sink_lag
                .with_label_values(&[&l.topic, &l.partition.to_string()])
                .set(l.lag());
        }
        let owned = partitions.iter().filter(|l| l.owned).count();
        m.es_sink_partitions.set(owned as i64);
        let verdict = c.watch.observe(&partitions, idle, Instant::now());
        let Verdict::Stalled {
            lag,
            stuck,
            stalled_for,
            rejoin,
        } = verdict
        else {
            if m.sink_stalled(None) {
                tracing::info!(group = %self.es.consumer_group, "es sink no longer stalled: the group consumes again");
            }
            if verdict == Verdict::CaughtUp {
                m.sink_caught_up();
            }
            return Ok(());
        };
        let group = &self.es.consumer_group;
        m.sink_stalled(Some(format!(
            "es sink stalled: {lag} records wait in consumer group {group:?} on {stuck} partitions whose committed offsets have not moved for {}s or more; this sink owns {} partitions",
            stalled_for.as_secs() + self.es.stall_timeout_secs,
            owned
        )));
        if rejoin {
            tracing::error!(%group, lag, stuck, owned, stalled_secs = stalled_for.as_secs(), rejoins = c.watch.rejoins(), "es sink stalled: changes wait that no group member consumes; leaving the group and joining again");
            self.rejoin(c).await?;
        }
        Ok(())
    }

    /// Leave the group, then join it again as a new member.
    async fn rejoin(&self, c: &mut Clients) -> Result<(), EsError> {
        let new = consumer(&self.es, &self.kafka)?;
        leave(std::mem::replace(&mut c.consumer, new)).await;
        subscribe(&c.consumer, &self.kafka)?;
        c.continuity = Continuity::default();
        c.watch.rejoined(Instant::now());
        crate::metrics::metrics().es_sink_rejoins.inc();
        Ok(())
    }
}

/// Join the sink's group: a new consumer (a new member), subscribed to the change topics.
pub(super) fn join(es: &EsConfig, kafka: &KafkaConfig) -> Result<SinkConsumer, EsError> {
    let consumer = consumer(es, kafka)?;
    subscribe(&consumer, kafka)?;
    Ok(consumer)
}

/// A consumer in the sink's group, not subscribed yet (not a member yet).
fn consumer(es: &EsConfig, kafka: &KafkaConfig) -> Result<SinkConsumer, EsError> {
    let mut cc = rdkafka::ClientConfig::new();
    cc.set("session.timeout.ms", SESSION_TIMEOUT_MS)
        .set("heartbeat.interval.ms", HEARTBEAT_INTERVAL_MS);
    for (k, v) in &kafka.properties {
        cc.set(k, v);
    }
    cc.set("bootstrap.servers", &kafka.brokers)
        .set("group.id", &es.consumer_group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("client.id", "pgcdc-es-sink");
    let consumer: StreamConsumer<SinkContext> = cc.create_with_context(SinkContext::default())?;
    Ok(Arc::new(consumer))
}

/// Subscribe to the change topics: the consumer joins the group.
fn subscribe(consumer: &SinkConsumer, kafka: &KafkaConfig) -> Result<(), EsError> {
    match kafka.topic_mode {
        TopicMode::Single => consumer.subscribe(&[kafka.topic.as_str()])?,
        TopicMode::PerTable => consumer.subscribe(&[topic_pattern(kafka).as_str()])?,
    }
    Ok(())
}

/// The subscription pattern of per-table topics.
fn topic_pattern(kafka: &KafkaConfig) -> String {
    format!("^{}\\..*", kafka.topic_prefix.replace('.', "\\."))
}

/// Whether `topic` is one the sink subscribes to.
fn subscribed(kafka: &KafkaConfig, topic: &str) -> bool {
    match kafka.topic_mode {
        TopicMode::Single => topic == kafka.topic,
        TopicMode::PerTable => topic
            .strip_prefix(kafka.topic_prefix.as_str())
            .is_some_and(|rest| rest.starts_with('.')),
    }
}

/// Leave the group: close `consumer` (revoking its partitions and sending
/// LeaveGroup), waiting at most [`LEAVE_TIMEOUT`].
pub(super) async fn leave(consumer: SinkConsumer) {
    let closing = tokio::task::spawn_blocking(move || drop(consumer));
    match tokio::time::timeout(LEAVE_TIMEOUT, closing).await {
        Ok(_) => tracing::info!("es sink left its group"),
        Err(_) => tracing::warn!(
            timeout_secs = LEAVE_TIMEOUT.as_secs(),
            "es sink: the old consumer did not leave its group in time; joining anyway"
        ),
    }
}

/// Look up every partition of the sink's topics: its watermarks, its
/// group's committed offset, and whether this member owns it.
pub(super) async fn probe(
    consumer: &SinkConsumer,
    kafka: &Arc<KafkaConfig>,
) -> Result<Vec<PartitionLag>, EsError> {
    let (consumer, kafka) = (consumer.clone(), kafka.clone());
    tokio::task::spawn_blocking(move || probe_blocking(&consumer, &kafka))
        .await
        .map_err(|_| EsError::Kafka(rdkafka::error::KafkaError::Canceled))?
}

/// [`probe`], with four requests however many partitions: metadata, both
/// watermarks of every partition at once, and the committed offsets.
fn probe_blocking(
    consumer: &StreamConsumer<SinkContext>,
    kafka: &KafkaConfig,
) -> Result<Vec<PartitionLag>, EsError> {
    let only = match kafka.topic_mode {
        TopicMode::Single => Some(kafka.topic.as_str()),
        TopicMode::PerTable => None,
    };
    let metadata = consumer.fetch_metadata(only, PROBE_TIMEOUT)?;
    let mut tpl = TopicPartitionList::new();
    for topic in metadata
        .topics()
        .iter()
        .filter(|t| subscribed(kafka, t.name()))
    {
        for p in topic.partitions() {
            tpl.add_partition(topic.name(), p.id());
        }
    }
    if tpl.count() == 0 {
        return Ok(Vec::new());
    }
    // ListOffsets by timestamp, with the special timestamps for the end and the start.
    let offsets_at = |end: Offset| -> Result<TopicPartitionList, EsError> {
        let mut at = tpl.clone();
        at.set_all_offsets(end)?;
        Ok(consumer.offsets_for_times(at, PROBE_TIMEOUT)?)
    };
    let (high, low) = (offsets_at(Offset::End)?, offsets_at(Offset::Beginning)?);
    let committed = consumer.committed_offsets(tpl.clone(), PROBE_TIMEOUT)?;
    let owned = consumer.assignment()?;
    Ok(tpl
        .elements()
        .iter()
        .map(|e| {
            let at = |list: &TopicPartitionList| offset_of(list, e.topic(), e.partition());
            PartitionLag {
                topic: e.topic().to_owned(),
                partition: e.partition(),
                committed: at(&committed),
                low: at(&low).unwrap_or(0),
                high: at(&high).unwrap_or(0),
                owned: owned.find_partition(e.topic(), e.partition()).is_some(),
            }
        })
        .collect())
}

/// The offset `list` holds for a partition, if it holds a real one.
fn offset_of(list: &TopicPartitionList, topic: &str, partition: i32) -> Option<i64> {
    match list.find_partition(topic, partition)?.offset() {
        Offset::Offset(o) => Some(o),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sink_probes_the_topics_it_subscribes_to() {
        let mut kafka = KafkaConfig::default();
        assert!(subscribed(&kafka, &kafka.topic.clone()));
        assert!(!subscribed(&kafka, "pgcdc-dead-letters"));
        kafka.topic_mode = TopicMode::PerTable;
        kafka.topic_prefix = "cdc".into();
        assert!(subscribed(&kafka, "cdc.public.users"));
        assert!(!subscribed(&kafka, "cdcx.public.users"));
        assert!(!subscribed(&kafka, "cdc"));
        assert_eq!(topic_pattern(&kafka), "^cdc\\..*");
    }
}
