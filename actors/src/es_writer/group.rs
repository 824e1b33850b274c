//! The sink's consumer and its group: joining (a subscribed consumer),
//! reading partitions directly (assigned by the sink itself, outside the
//! group), leaving, and probing the group's progress (high watermarks
//! against committed offsets) for the stall check in `stall`. Every broker
//! round trip runs on a blocking thread: the sink may share its thread with
//! the whole pipeline.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};

use super::config::EsConfig;
use super::context::SinkContext;
use super::error::EsError;
use super::stall::PartitionLag;
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

/// Join the sink's group: a new consumer (a new member), subscribed to the
/// change topics (and the `canary` topic, if given).
pub(super) fn join(
    es: &EsConfig,
    kafka: &KafkaConfig,
    canary: Option<&str>,
) -> Result<SinkConsumer, EsError> {
    let consumer = consumer(es, kafka)?;
    subscribe(&consumer, kafka, canary)?;
    Ok(consumer)
}

/// A consumer in the sink's group, not subscribed yet (not a member yet).
pub(super) fn consumer(es: &EsConfig, kafka: &KafkaConfig) -> Result<SinkConsumer, EsError> {
    let mut cc = kafka.client_base(super::context::CLIENT);
    let timeouts = [
        ("session.timeout.ms", SESSION_TIMEOUT_MS),
        ("heartbeat.interval.ms", HEARTBEAT_INTERVAL_MS),
    ];
    for (k, v) in timeouts {
        if !kafka.properties.contains_key(k) {
            cc.set(k, v);
        }
    }
    cc.set("group.id", &es.consumer_group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest");
    let consumer: StreamConsumer<SinkContext> = cc.create_with_context(SinkContext::default())?;
    Ok(Arc::new(consumer))
}

/// Subscribe to the change topics (and the `canary` topic, if given): the
/// consumer joins the group.
pub(super) fn subscribe(
    consumer: &SinkConsumer,
    kafka: &KafkaConfig,
    canary: Option<&str>,
) -> Result<(), EsError> {
    let topics = subscription(kafka, canary);
    let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    Ok(())
}

/// The topics (names and patterns) the sink subscribes to. The canary topic
/// is a pattern: a subscribed name that does not exist (canaries off, or
/// not created yet) is a consumer error, a pattern matching nothing is not.
fn subscription(kafka: &KafkaConfig, canary: Option<&str>) -> Vec<String> {
    let mut topics = vec![match kafka.topic_mode {
        TopicMode::Single => kafka.topic.clone(),
        TopicMode::PerTable => topic_pattern(kafka),
    }];
    topics.extend(canary.map(|t| format!("^{}$", t.replace('.', "\\."))));
    topics
}

/// The subscription pattern of per-table topics: `<prefix>.<schema>.<table>`
/// (not `<prefix>.transaction`, the transaction metadata topic).
fn topic_pattern(kafka: &KafkaConfig) -> String {
    format!("^{}\\.[^.]+\\..+", kafka.topic_prefix.replace('.', "\\."))
}

/// Whether `topic` is one the sink subscribes to.
fn subscribed(kafka: &KafkaConfig, topic: &str) -> bool {
    match kafka.topic_mode {
        TopicMode::Single => topic == kafka.topic,
        TopicMode::PerTable => topic
            .strip_prefix(kafka.topic_prefix.as_str())
            .and_then(|rest| rest.strip_prefix('.'))
            .is_some_and(|rest| rest.contains('.')),
    }
}

/// Read `partitions` directly: assign them to `consumer` (not a group
/// member), each from its group's committed offset. The canary topic is not
/// read meanwhile (the search stage ages through the spell).
pub(super) fn read_directly(
    consumer: &SinkConsumer,
    partitions: &[PartitionLag],
) -> Result<(), EsError> {
    let mut tpl = TopicPartitionList::new();
    for l in partitions {
        tpl.add_partition(&l.topic, l.partition);
    }
    consumer.assign(&tpl)?;
    let names: Vec<String> = partitions
        .iter()
        .map(|l| format!("{}[{}]", l.topic, l.partition))
        .collect();
    tracing::info!(partitions = names.join(","), "es sink reading directly");
    Ok(())
}

/// Close `consumer` (revoking its partitions and, for a group member,
/// sending LeaveGroup), waiting at most [`LEAVE_TIMEOUT`].
pub(super) async fn leave(consumer: SinkConsumer) {
    let closing = tokio::task::spawn_blocking(move || drop(consumer));
    match tokio::time::timeout(LEAVE_TIMEOUT, closing).await {
        Ok(_) => tracing::info!("es sink consumer closed"),
        Err(_) => tracing::warn!(
            timeout_secs = LEAVE_TIMEOUT.as_secs(),
            "es sink: the old consumer did not leave its group in time; joining anyway"
        ),
    }
}

/// The client that probes the group's progress: a consumer of the sink's
/// group that never joins it, so a join or sync the broker holds on the
/// member's connections does not hold the probe too.
pub(super) type Prober = Arc<BaseConsumer>;

/// A [`Prober`] for the sink's group.
pub(super) fn prober(es: &EsConfig, kafka: &KafkaConfig) -> Result<Prober, EsError> {
    let mut cc = kafka.client_base("pgcdc-es-sink-probe");
    cc.set("group.id", &es.consumer_group)
        .set("enable.auto.commit", "false");
    Ok(Arc::new(cc.create()?))
}

/// Look up every partition of the sink's topics: its watermarks, its
/// group's committed offset, and whether `consumer` reads it.
pub(super) async fn probe(
    prober: &Prober,
    consumer: &SinkConsumer,
    kafka: &Arc<KafkaConfig>,
) -> Result<Vec<PartitionLag>, EsError> {
    let (prober, kafka) = (prober.clone(), kafka.clone());
    let mut partitions = tokio::task::spawn_blocking(move || probe_blocking(&prober, &kafka))
        .await
        .map_err(|_| EsError::Kafka(rdkafka::error::KafkaError::Canceled))??;
    let owned = consumer.assignment()?;
    for l in &mut partitions {
        l.owned = owned.find_partition(&l.topic, l.partition).is_some();
    }
    Ok(partitions)
}

/// [`probe`], with four requests however many partitions: metadata, both
/// watermarks of every partition at once, and the committed offsets.
fn probe_blocking(
    prober: &BaseConsumer,
    kafka: &KafkaConfig,
) -> Result<Vec<PartitionLag>, EsError> {
    let consumer = prober;
    let tpl = change_partitions(consumer, kafka)?;
    if tpl.count() == 0 {
        return Ok(Vec::new());
    }
    let (high, low) = (
        offsets_at(consumer, &tpl, Offset::End)?,
        offsets_at(consumer, &tpl, Offset::Beginning)?,
    );
    let committed = consumer.committed_offsets(tpl.clone(), PROBE_TIMEOUT)?;
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
                owned: false,
            }
        })
        .collect())
}

/// Every partition of the change topics the sink subscribes to (one metadata request).
fn change_partitions<C: Consumer>(
    consumer: &C,
    kafka: &KafkaConfig,
) -> Result<TopicPartitionList, KafkaError> {
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
    Ok(tpl)
}

/// ListOffsets of every partition of `tpl` at once, with the special
/// timestamps for the end and the start.
fn offsets_at<C: Consumer>(
    consumer: &C,
    tpl: &TopicPartitionList,
    at: Offset,
) -> Result<TopicPartitionList, KafkaError> {
    let mut list = tpl.clone();
    list.set_all_offsets(at)?;
    consumer.offsets_for_times(list, PROBE_TIMEOUT)
}

/// The high watermark (the next offset to be written) of every non-empty
/// partition of the change topics, in two requests; for the canary record.
pub(crate) fn change_topic_ends<C: Consumer>(
    consumer: &C,
    kafka: &KafkaConfig,
) -> Result<Vec<(String, i32, i64)>, KafkaError> {
    let tpl = change_partitions(consumer, kafka)?;
    if tpl.count() == 0 {
        return Ok(Vec::new());
    }
    let high = offsets_at(consumer, &tpl, Offset::End)?;
    Ok(tpl
        .elements()
        .iter()
        .filter_map(|e| {
            let end = offset_of(&high, e.topic(), e.partition()).filter(|&o| o > 0)?;
            Some((e.topic().to_owned(), e.partition(), end))
        })
        .collect())
}

/// Each partition of the sink's topics as its group stands now: (topic,
/// partition, committed offset, high watermark). For `pgcdc verify`, which
/// waits for the group to pass the high watermarks.
pub(crate) async fn group_offsets(
    es: &EsConfig,
    kafka: &KafkaConfig,
) -> Result<Vec<(String, i32, Option<i64>, i64)>, EsError> {
    let (prober, kafka) = (prober(es, kafka)?, kafka.clone());
    let lags = tokio::task::spawn_blocking(move || probe_blocking(&prober, &kafka))
        .await
        .map_err(|_| EsError::Kafka(rdkafka::error::KafkaError::Canceled))??;
    Ok(lags
        .into_iter()
        .map(|l| (l.topic, l.partition, l.committed, l.high))
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
        assert!(!subscribed(&kafka, "cdc.transaction"));
        assert_eq!(topic_pattern(&kafka), "^cdc\\.[^.]+\\..+");
        let canary = crate::canary::record::topic("cdc");
        assert!(
            !subscribed(&kafka, &canary),
            "canaries are not change records"
        );
        assert_eq!(
            subscription(&kafka, Some(&canary)),
            ["^cdc\\.[^.]+\\..+", "^__pgcdc-canary\\.cdc$"]
        );
    }
}
