//! The topics pgcdc creates at start, and the durability it gives them:
//! min(3, brokers) copies, `min.insync.replicas` = 2 from 3 copies on, and
//! a warning for every topic (created or found) that keeps fewer than 3.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use pgcdc_actors::checkpoint::CheckpointActor;
use pgcdc_actors::error::ConfigError;
use pgcdc_actors::es_writer::duration_secs;
use pgcdc_actors::kafka_producer::{
    metadata_or_refusal, prober, KafkaConfig, Partitioning, DURABLE_REPLICAS,
};
use pgcdc_actors::pg::parse_table_name;
use rdkafka::admin::{
    AdminClient, AdminOptions, NewTopic, OwnedResourceSpecifier, ResourceSpecifier,
    TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;

use crate::error::AppError;
use crate::settings::Settings;

/// The topic config pgcdc sets on durable topics.
const MIN_INSYNC: &str = "min.insync.replicas";
/// Partitions of the canary topic: one, so its records stay in order.
const CANARY_PARTITIONS: i32 = 1;
/// How long a metadata or admin request may take at start.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a refused client's configuration is tried again ([`heal_refusals`]).
const REFUSAL_RECHECK: Duration = Duration::from_secs(5);
/// How often the change topics' partition counts are read while running.
const PARTITION_WATCH: Duration = Duration::from_secs(10);

/// Read the cluster's metadata (its broker count) before anything else
/// uses Kafka: a broker that refuses pgcdc (SASL, TLS) stops the start at
/// once, naming librdkafka's reason, instead of looking unreachable.
pub fn reach(settings: &Settings) -> Result<usize, AppError> {
    let k = &settings.kafka;
    let prober = prober(k, "pgcdc-start").map_err(|e| not_created(k, &e))?;
    let metadata = metadata_or_refusal(&prober, REQUEST_TIMEOUT);
    // Dropped aside, as the admin client is (see `create_topics`).
    std::thread::spawn(move || drop(prober));
    Ok(metadata
        .map_err(|e| upstream(k, &format!("cannot read metadata: {e}")))?
        .brokers()
        .len())
}

/// While a broker refuses one of pgcdc's running Kafka clients (a changed
/// password, an expired certificate), read the cluster's metadata every
/// [`REFUSAL_RECHECK`] through a new client of the same configuration.
/// Once one gets through, the brokers accept pgcdc again: `/ready` stops
/// naming the refusal (librdkafka's own clients reconnect by themselves).
pub async fn heal_refusals(kafka: KafkaConfig) {
    let kafka = Arc::new(kafka);
    let m = pgcdc_actors::metrics::metrics();
    loop {
        tokio::time::sleep(REFUSAL_RECHECK).await;
        if !m.kafka_refusing() {
            continue;
        }
        let k = kafka.clone();
        let read = tokio::task::spawn_blocking(move || {
            let prober = prober(&k, "pgcdc-refusal-check").map_err(|e| e.to_string())?;
            metadata_or_refusal(&prober, REFUSAL_RECHECK).map(drop)
        });
        match read.await {
            Ok(Ok(())) => {
                tracing::info!("the kafka brokers accept pgcdc again");
                m.kafka_accepted();
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "kafka still refuses pgcdc"),
            Err(e) => tracing::warn!(error = %e, "kafka refusal check failed"),
        }
    }
}

/// Create the topics events go to on a cluster of `brokers` brokers;
/// existing ones are left alone. Topics with fewer than 3 copies are warned
/// about.
pub async fn create_topics(settings: &Settings, brokers: usize) -> Result<(), AppError> {
    let admin = admin(&settings.kafka)?;
    let created = create_with(&admin, settings, brokers).await;
    // Dropping the client joins its poll thread, which wakes only every
    // 100 ms: a tenth of a second of every start, spent elsewhere.
    std::thread::spawn(move || drop(admin));
    created
}

/// [`create_topics`] through `admin`.
async fn create_with(
    admin: &AdminClient<DefaultClientContext>,
    settings: &Settings,
    brokers: usize,
) -> Result<(), AppError> {
    let k = &settings.kafka;
    let names = topic_names(settings);
    let factor = k.replication_factor(brokers);
    let min_insync = KafkaConfig::min_insync_replicas(factor).map(|n| n.to_string());
    let canary = canary_topic(settings);
    let topics: Vec<NewTopic<'_>> = names
        .iter()
        .map(|n| {
            let partitions = match Some(n) == canary.as_ref() {
                true => CANARY_PARTITIONS,
                false => k.topic_partitions,
            };
            new_topic(k, n, (partitions, factor), min_insync.as_deref())
        })
        .collect();
    let opts = AdminOptions::new()
        .operation_timeout(Some(REQUEST_TIMEOUT))
        .request_timeout(Some(REQUEST_TIMEOUT));
    let results = admin
        .create_topics(&topics, &opts)
        .await
        .map_err(|e| upstream(k, &format!("cannot create topics: {e}")))?;
    for r in results {
        match r {
            Ok(topic) => tracing::info!(topic, replication_factor = factor, "created topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(upstream(k, &format!("cannot create topic {topic}: {code}")))
            }
        }
    }
    warn_weak_topics(admin, &names, brokers);
    let es = &settings.elasticsearch;
    warn_long_retention(admin, &change_topics(settings), &es.gc_deletes, &opts).await;
    Ok(())
}

/// Pin each change topic's records to the partition count it had when
/// pgcdc first wrote to it (kept in the checkpoint), before the first
/// record; then read the counts every [`PARTITION_WATCH`] and say when
/// partitions are added ([`Partitioning`]). A topic that does not exist yet
/// is pinned once it does.
pub async fn pin_partitions(
    settings: &Settings,
    checkpoint: Addr<CheckpointActor>,
) -> Result<Arc<Partitioning>, AppError> {
    let k = &settings.kafka;
    let partitioning = Partitioning::new(k.partitioner());
    let admin = Arc::new(admin(k)?);
    let topics = change_topics(settings);
    let mut seen = HashMap::new();
    let observed = partition_counts(&admin, &topics).await.map_err(|e| {
        upstream(
            k,
            &format!("cannot read the change topics' partitions: {e}"),
        )
    })?;
    partitioning
        .observe(observed, &checkpoint, &mut seen)
        .await
        .map_err(|e| AppError::LocalIo(e.to_string()))?;
    let watched = partitioning.clone();
    actix::spawn(async move {
        loop {
            tokio::time::sleep(PARTITION_WATCH).await;
            let observed = match partition_counts(&admin, &topics).await {
                Ok(o) => o,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot read the change topics' partitions");
                    continue;
                }
            };
            // A checkpoint that fails is reported as fatal by its actor.
            if watched
                .observe(observed, &checkpoint, &mut seen)
                .await
                .is_err()
            {
                break;
            }
        }
    });
    Ok(partitioning)
}

/// The partition count of each of `topics` that exists.
async fn partition_counts(
    admin: &Arc<AdminClient<DefaultClientContext>>,
    topics: &[String],
) -> Result<Vec<(String, i32)>, rdkafka::error::KafkaError> {
    let (admin, topics) = (admin.clone(), topics.to_vec());
    let read = tokio::task::spawn_blocking(move || {
        let mut counts = Vec::with_capacity(topics.len());
        for topic in topics {
            let md = admin
                .inner()
                .fetch_metadata(Some(&topic), REQUEST_TIMEOUT)?;
            let partitions = md
                .topics()
                .iter()
                .filter(|t| t.name() == topic && t.error().is_none())
                .map(|t| t.partitions().len())
                .next();
            if let Some(n) = partitions.filter(|n| *n > 0) {
                counts.push((topic, i32::try_from(n).unwrap_or(i32::MAX)));
            }
        }
        Ok::<_, rdkafka::error::KafkaError>(counts)
    });
    read.await
        .unwrap_or(Err(rdkafka::error::KafkaError::Canceled))
}

/// Warn about each change topic whose records outlive the mirror's memory
/// of deletes (`elasticsearch.gc_deletes`): a sink replaying it from the
/// start would write rows back whose delete Elasticsearch forgot, until the
/// replay reaches the delete again. Compacted topics keep no superseded row.
async fn warn_long_retention(
    admin: &AdminClient<DefaultClientContext>,
    topics: &[String],
    gc_deletes: &str,
    opts: &AdminOptions,
) {
    let Some(gc_secs) = duration_secs(gc_deletes) else {
        return;
    };
    let specs: Vec<ResourceSpecifier<'_>> =
        topics.iter().map(|t| ResourceSpecifier::Topic(t)).collect();
    let Ok(described) = admin.describe_configs(&specs, opts).await else {
        return;
    };
    for resource in described.into_iter().flatten() {
        let OwnedResourceSpecifier::Topic(topic) = &resource.specifier else {
            continue;
        };
        let value = |k: &str| resource.get(k).and_then(|e| e.value.as_deref());
        let compacted = value("cleanup.policy") == Some("compact");
        let Some(retention_ms) = value("retention.ms").and_then(|v| v.parse::<i64>().ok()) else {
            continue;
        };
        let outlives = retention_ms < 0 || retention_ms as u64 / 1000 > gc_secs;
        if outlives && !compacted {
            tracing::warn!(
                topic,
                retention_ms,
                gc_deletes,
                "topic retention is longer than elasticsearch.gc_deletes: a sink replaying it can bring deleted rows back until the replay reaches their delete; keep retention.ms below it or compact the topic"
            );
        }
    }
}

/// The change topics: one per table, or the single topic.
pub(crate) fn change_topics(settings: &Settings) -> Vec<String> {
    let k = &settings.kafka;
    let mut names: Vec<String> = settings
        .postgres
        .tables
        .iter()
        .filter_map(|t| parse_table_name(t).ok())
        .map(|(s, t)| k.topic_for(&s, &t))
        .collect();
    names.sort();
    names.dedup();
    names
}

/// The creation request of topic `name`: `kafka.topic_config`, and
/// `min.insync.replicas` unless that sets it.
fn new_topic<'a>(
    k: &'a KafkaConfig,
    name: &'a str,
    (partitions, factor): (i32, i32),
    min_insync: Option<&'a str>,
) -> NewTopic<'a> {
    let mut topic = NewTopic::new(name, partitions, TopicReplication::Fixed(factor));
    if let Some(m) = min_insync.filter(|_| !k.topic_config.contains_key(MIN_INSYNC)) {
        topic = topic.set(MIN_INSYNC, m);
    }
    for (key, value) in &k.topic_config {
        topic = topic.set(key, value);
    }
    topic
}

/// The freshness canary's topic, when canaries are on.
fn canary_topic(settings: &Settings) -> Option<String> {
    (settings.canary.interval_secs > 0)
        .then(|| pgcdc_actors::canary::record::topic(&settings.kafka.topic_prefix))
}

/// Every topic pgcdc writes: one per table (or the single topic), the dead
/// letters, the transaction and heartbeat topics when they are on, and the
/// canary topic when canaries are.
fn topic_names(settings: &Settings) -> Vec<String> {
    let k = &settings.kafka;
    let mut names = change_topics(settings);
    names.push(settings.elasticsearch.dead_letter_topic.clone());
    names.extend(k.transaction_topic());
    names.extend(k.heartbeat_topic());
    names.extend(canary_topic(settings));
    names.sort();
    names.dedup();
    names
}

/// An admin client with the user's properties.
fn admin(k: &KafkaConfig) -> Result<AdminClient<DefaultClientContext>, AppError> {
    k.client_base("pgcdc-admin")
        .create()
        .map_err(|e| not_created(k, &e))
}

/// A client librdkafka would not create: a property it does not know, or a
/// value it refuses.
fn not_created(k: &KafkaConfig, e: &rdkafka::error::KafkaError) -> AppError {
    let message = k.properties.redact(&e.to_string());
    AppError::Config(vec![ConfigError::new("kafka.properties", message)])
}

/// Warn about each of `names` whose partitions keep fewer than 3 copies.
fn warn_weak_topics(admin: &AdminClient<DefaultClientContext>, names: &[String], brokers: usize) {
    for topic in names {
        let Ok(md) = admin.inner().fetch_metadata(Some(topic), REQUEST_TIMEOUT) else {
            continue;
        };
        let copies = md
            .topics()
            .iter()
            .flat_map(|t| t.partitions())
            .map(|p| p.replicas().len())
            .min();
        if let Some(copies) = copies.filter(|c| (*c as i32) < DURABLE_REPLICAS) {
            tracing::warn!(
                topic,
                copies,
                brokers,
                "topic keeps fewer than 3 copies: acks=all waits for only these, so losing a broker can lose acknowledged changes"
            );
        }
    }
}

fn upstream(k: &KafkaConfig, what: &str) -> AppError {
    AppError::Upstream(format!(
        "kafka at {}: {}",
        k.brokers,
        k.properties.redact(what)
    ))
}
