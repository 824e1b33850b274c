//! `[kafka]`: where and how change events are published.

use std::collections::BTreeMap;

use crate::error::ConfigError;
use serde::Deserialize;

use crate::secret::Properties;

/// How events are routed to topics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TopicMode {
    /// Every event to `kafka.topic`.
    Single,
    /// Each table to `<topic_prefix>.<schema>.<table>`.
    PerTable,
}

/// What happens to a record larger than Kafka accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Oversized {
    /// Stop (exit 4) with an error naming the record and the settings to raise.
    #[default]
    Fail,
    /// Send a description of it (table, key, LSN, size, reason) to the
    /// dead-letter topic instead, and go on.
    DeadLetter,
}

/// `source.connector` of the records pgcdc writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceConnector {
    /// `"pgcdc"`.
    #[default]
    Pgcdc,
    /// `"postgresql"`, as Debezium's connector writes, for consumers that branch on it.
    Postgresql,
}

impl SourceConnector {
    /// The text written in `source.connector`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Pgcdc => crate::wire::CONNECTOR,
            Self::Postgresql => "postgresql",
        }
    }
}

/// How records are written (`kafka.format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// The envelope as JSON without schemas (Debezium with `schemas.enable=false`).
    #[default]
    Json,
    /// Key and value as `{"schema", "payload"}` (Kafka Connect's `JsonConverter`
    /// with `schemas.enable=true`).
    ConnectJson,
    /// The new row only; a delete is a tombstone, a truncate writes nothing
    /// (Debezium's "new record state" extraction).
    Row,
}

impl Format {
    /// The name in the configuration.
    pub fn name(self) -> &'static str {
        match self {
            Self::Json => "json",
            Self::ConnectJson => "connect-json",
            Self::Row => "row",
        }
    }
}

/// How numeric and money values are written (`kafka.decimal_handling_mode`,
/// Debezium's `decimal.handling.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecimalMode {
    /// Exact decimal strings (`"12.50"`).
    #[default]
    String,
    /// JSON numbers (`12.5`), rounded to a double; NaN and infinities stay strings.
    Double,
}

/// How date and time values are written (`kafka.time_precision_mode`,
/// Debezium's `time.precision.mode`); `timestamptz` and `timetz` are ISO
/// strings in every mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeMode {
    /// ISO 8601 strings (`"2024-02-29"`, `"13:14:15"`, `"2024-01-02T03:04:05.5"`).
    #[default]
    Iso,
    /// Debezium's `adaptive`: date as days since the epoch, time as
    /// microseconds past midnight, timestamp as microseconds since the epoch.
    Adaptive,
    /// Debezium's `connect`: Kafka Connect's `Date` (days), `Time`
    /// (milliseconds past midnight) and `Timestamp` (milliseconds since the epoch).
    Connect,
}

impl TimeMode {
    /// The name in the configuration.
    pub fn name(self) -> &'static str {
        match self {
            Self::Iso => "iso",
            Self::Adaptive => "adaptive",
            Self::Connect => "connect",
        }
    }
}

/// Default `topic_partitions`: lets up to three sinks share the load without
/// spreading a small database's changes thin.
const DEFAULT_TOPIC_PARTITIONS: i32 = 3;
/// Default `delivery_timeout_ms` (5 min): rides out a broker restart or a
/// leader election before the stream restarts from the checkpoint.
const DEFAULT_DELIVERY_TIMEOUT_MS: u64 = 300_000;
/// Default `max_inflight_records`: enough to keep Kafka busy at high change
/// rates (10,000 records per round trip), a bounded amount of memory (a few
/// hundred bytes each): 50,000 streamed no faster on loopback and cost
/// about 30-50 MiB more peak RSS in the pipeline benchmark.
const DEFAULT_MAX_INFLIGHT_RECORDS: usize = 10_000;
/// Default `max_inflight_bytes` (64 MiB): above what ordinary rows reach at
/// `max_inflight_records`, while one huge value is enough to pause WAL
/// reading instead of filling memory.
const DEFAULT_MAX_INFLIGHT_BYTES: usize = 64 << 20;
/// The librdkafka property choosing the partition of a keyed record.
const PARTITIONER: &str = "partitioner";
/// Default `partitioner`: murmur2 of the key bytes, positive part modulo the
/// partition count, as the Java client (and so Debezium, Kafka Streams and
/// ksqlDB) computes it; keyless records go to a random partition.
pub const JAVA_PARTITIONER: &str = "murmur2_random";
/// librdkafka's property (and its alias) for how long a partition's records
/// wait to fill a produce request.
const LINGER: [&str; 2] = ["linger.ms", "queue.buffering.max.ms"];
/// Default `linger.ms`, instead of librdkafka's 5. The idempotent producer
/// sends one request per partition at a time (its limit of five counts
/// messages, not requests); while one is unacknowledged and the next has
/// waited `linger.ms`, its I/O thread polls without sleeping. At 5 ms, a
/// backlog drained into tansu made 1.1-1.3 million polls for about 900
/// requests. 20 ms brought pgcdc's CPU per row from 9.5-10.9 to 8.8-9.2 µs;
/// at 5,000 commits/s the larger requests cut the broker's CPU by a third
/// and the p99 commit → read back by a consumer from 573-2,049 ms to 74-149
/// ms. 50 ms polls less still, but put p99 commit → acknowledged at the
/// 100 ms target; and the longer the wait, the more huge values librdkafka
/// holds at once.
const DEFAULT_LINGER_MS: &str = "20";
/// librdkafka's property (and its alias) for how produce requests are
/// compressed.
const COMPRESSION: [&str; 2] = ["compression.type", "compression.codec"];
/// Default `compression.type`, instead of librdkafka's none. Change records
/// are JSON with repeated field names, so lz4 shrinks a request several
/// times for little CPU: a backlog drained into tansu took 7.0-7.7 instead
/// of 9.7-10.6 µs of pgcdc's CPU per row (librdkafka's part 1.5-1.7 instead
/// of 3.7-4.8, since the broker answers sooner) and tansu's CPU fell by
/// three quarters. Kafka's clients read lz4 (kafka-python with its `lz4`
/// package).
const DEFAULT_COMPRESSION: &str = "lz4";
/// The librdkafka properties pgcdc sets unless `[kafka.properties]` sets
/// them under any of their names, the first of which pgcdc uses.
const DEFAULTS: [(&[&str], &str); 3] = [
    (&[PARTITIONER], JAVA_PARTITIONER),
    (&LINGER, DEFAULT_LINGER_MS),
    (&COMPRESSION, DEFAULT_COMPRESSION),
];
/// librdkafka's default `message.max.bytes`: the largest record the producer sends.
const DEFAULT_MESSAGE_MAX_BYTES: usize = 1_000_000;
/// The librdkafka property limiting one record's size.
pub const MESSAGE_MAX_BYTES: &str = "message.max.bytes";
/// The librdkafka property pgcdc sets from `max_inflight_bytes`.
const QUEUE_MAX_KBYTES: &str = "queue.buffering.max.kbytes";

/// `[kafka]` configuration section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma-separated `host:port`.
    pub brokers: String,
    /// `single` (all events to `topic`) or `per_table` (`<topic_prefix>.<schema>.<table>`).
    pub topic_mode: TopicMode,
    /// The topic in `single` mode.
    pub topic: String,
    /// Topic name prefix in `per_table` mode.
    pub topic_prefix: String,
    /// Follow each delete with a tombstone (same key, null value) so compacted topics forget the row.
    pub tombstones: bool,
    /// Create missing topics at start (with the partition and replication counts below).
    pub create_topics: bool,
    /// Partitions of topics pgcdc creates.
    pub topic_partitions: i32,
    /// Replication factor of topics pgcdc creates; unset: min(3, brokers).
    pub topic_replication_factor: Option<i32>,
    /// How long librdkafka keeps retrying one record before the stream restarts from the checkpoint, in ms.
    pub delivery_timeout_ms: u64,
    /// Records queued or in flight before reading the WAL pauses (the memory bound).
    pub max_inflight_records: usize,
    /// Bytes of record values queued or in flight in librdkafka before
    /// reading the WAL pauses (the memory bound for wide rows). Raised to
    /// `message.max.bytes` when that is larger, so any record that Kafka
    /// accepts fits.
    pub max_inflight_bytes: usize,
    /// `fail` (stop, exit 4) or `dead_letter` (describe it on the
    /// dead-letter topic and go on) for a record above `message.max.bytes`.
    pub oversized: Oversized,
    /// Extra librdkafka properties (e.g. `security.protocol`, `sasl.*`);
    /// sensitive values never show in `Debug` or errors.
    pub properties: Properties,
    /// `json`, `connect-json` or `row`.
    pub format: Format,
    /// `string` or `double`: numeric and money values.
    pub decimal_handling_mode: DecimalMode,
    /// `iso`, `adaptive` or `connect`: date, time and timestamp values.
    pub time_precision_mode: TimeMode,
    /// `source.connector`: `pgcdc` or `postgresql`.
    pub source_connector: SourceConnector,
    /// Write the `transaction` block on every streamed change and BEGIN/END
    /// events on `<topic_prefix>.transaction`, as Debezium's
    /// `provide.transaction.metadata` does.
    pub transaction_metadata: bool,
    /// Publish a heartbeat record (the LSN reached) every `wal.heartbeat_secs`.
    pub heartbeats: bool,
    /// The heartbeat topic; unset: `__debezium-heartbeat.<topic_prefix>`.
    pub heartbeat_topic: Option<String>,
    /// Topic configs (`cleanup.policy`, `retention.ms`, …) given to the topics pgcdc creates.
    pub topic_config: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "localhost:9092".into(),
            topic_mode: TopicMode::Single,
            topic: "cdc-events".into(),
            topic_prefix: "pgcdc".into(),
            tombstones: true,
            create_topics: true,
            topic_partitions: DEFAULT_TOPIC_PARTITIONS,
            topic_replication_factor: None,
            delivery_timeout_ms: DEFAULT_DELIVERY_TIMEOUT_MS,
            max_inflight_records: DEFAULT_MAX_INFLIGHT_RECORDS,
            max_inflight_bytes: DEFAULT_MAX_INFLIGHT_BYTES,
            oversized: Oversized::Fail,
            properties: Properties::default(),
            format: Format::Json,
            decimal_handling_mode: DecimalMode::String,
            time_precision_mode: TimeMode::Iso,
            source_connector: SourceConnector::Pgcdc,
            transaction_metadata: false,
            heartbeats: false,
            heartbeat_topic: None,
            topic_config: BTreeMap::new(),
        }
    }
}

/// Kafka's longest topic name is 249 characters; pgcdc keeps well under it,
/// leaving room for a suffix an operator may add (mirrors, retries).
const MAX_TOPIC_LEN: usize = 200;
/// Shortest `delivery_timeout_ms` accepted: below a second, ordinary broker
/// latency would already fail deliveries.
const MIN_DELIVERY_TIMEOUT_MS: u64 = 1000;
/// librdkafka's local queue holds twice the in-flight bound plus this much
/// slack, so `max_inflight_records` (not librdkafka) is what applies backpressure.
const QUEUE_SLACK: usize = 10_000;

/// Copies of each record that survive one broker loss while another is
/// down for maintenance; fewer is warned about.
pub const DURABLE_REPLICAS: i32 = 3;
/// `min.insync.replicas` of durable topics.
const DURABLE_MIN_INSYNC: i32 = 2;

/// Properties pgcdc's guarantees depend on; users may not override them.
const PINNED: &[&str] = &[
    "enable.idempotence",
    "acks",
    "bootstrap.servers",
    "message.timeout.ms",
];

impl KafkaConfig {
    /// Every invalid field, by path.
    pub fn validate(&self, errors: &mut Vec<ConfigError>) {
        if self.brokers.trim().is_empty() {
            errors.push(ConfigError::new("kafka.brokers", "must not be empty"));
        }
        let bad_topic = |t: &str| {
            t.is_empty()
                || t.len() > MAX_TOPIC_LEN
                || !t
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        };
        if self.topic_mode == TopicMode::Single && bad_topic(&self.topic) {
            errors.push(ConfigError::new(
                "kafka.topic",
                format!("{:?} is not a valid topic name", self.topic),
            ));
        }
        let prefixed = self.topic_mode == TopicMode::PerTable
            || self.transaction_metadata
            || (self.heartbeats && self.heartbeat_topic.is_none());
        if prefixed && bad_topic(&self.topic_prefix) {
            errors.push(ConfigError::new(
                "kafka.topic_prefix",
                format!("{:?} is not a valid topic name", self.topic_prefix),
            ));
        }
        if let Some(t) = self.heartbeat_topic.as_deref().filter(|t| bad_topic(t)) {
            errors.push(ConfigError::new(
                "kafka.heartbeat_topic",
                format!("{t:?} is not a valid topic name"),
            ));
        }
        if self.topic_partitions < 1 {
            errors.push(ConfigError::new(
                "kafka.topic_partitions",
                "must be at least 1",
            ));
        }
        if self.topic_replication_factor.is_some_and(|n| n < 1) {
            errors.push(ConfigError::new(
                "kafka.topic_replication_factor",
                "must be at least 1",
            ));
        }
        if self.delivery_timeout_ms < MIN_DELIVERY_TIMEOUT_MS {
            errors.push(ConfigError::new(
                "kafka.delivery_timeout_ms",
                format!("must be at least {MIN_DELIVERY_TIMEOUT_MS}"),
            ));
        }
        if self.max_inflight_records < 1 {
            errors.push(ConfigError::new(
                "kafka.max_inflight_records",
                "must be at least 1",
            ));
        }
        for key in self
            .properties
            .keys()
            .filter(|k| PINNED.contains(&k.as_str()))
        {
            errors.push(ConfigError::new(
                format!("kafka.properties.{key}"),
                "set by pgcdc (its guarantees depend on it)",
            ));
        }
        self.validate_sizes(errors);
    }

    /// `message.max.bytes` must be a number; librdkafka's queue limit is
    /// pgcdc's to set.
    fn validate_sizes(&self, errors: &mut Vec<ConfigError>) {
        if self.properties.contains_key(QUEUE_MAX_KBYTES) {
            errors.push(ConfigError::new(
                format!("kafka.properties.{QUEUE_MAX_KBYTES}"),
                "set by pgcdc from kafka.max_inflight_bytes",
            ));
        }
        if self.max_message_bytes().is_none() {
            errors.push(ConfigError::new(
                format!("kafka.properties.{MESSAGE_MAX_BYTES}"),
                "must be a whole number of bytes",
            ));
        }
    }

    /// The `partitioner` set in `[kafka.properties]`; `None`: pgcdc's
    /// default, the Java client's.
    pub fn partitioner(&self) -> Option<&str> {
        self.properties.get(PARTITIONER).map(String::as_str)
    }

    /// The largest record the producer sends (`message.max.bytes`);
    /// `None` if the property is set to something that is not a number.
    pub fn max_message_bytes(&self) -> Option<usize> {
        match self.properties.get(MESSAGE_MAX_BYTES) {
            Some(v) => v.trim().parse().ok(),
            None => Some(DEFAULT_MESSAGE_MAX_BYTES),
        }
    }

    /// Bytes of records librdkafka may hold: `max_inflight_bytes`, or
    /// `message.max.bytes` when that is larger, so one record always fits.
    pub fn queue_bytes(&self) -> usize {
        let one_record = self
            .max_message_bytes()
            .unwrap_or(DEFAULT_MESSAGE_MAX_BYTES);
        self.max_inflight_bytes.max(one_record)
    }

    /// What every Kafka client pgcdc opens is configured from: the user's
    /// `kafka.properties` (security settings such as TLS and SASL among
    /// them), the brokers, and `client_id`.
    pub fn client_base(&self, client_id: &str) -> rdkafka::ClientConfig {
        let mut cfg = rdkafka::ClientConfig::new();
        for (k, v) in &self.properties {
            cfg.set(k, v);
        }
        cfg.set("bootstrap.servers", &self.brokers)
            .set("client.id", client_id);
        cfg
    }

    /// The librdkafka client configuration for the producer.
    pub fn client_config(&self) -> rdkafka::ClientConfig {
        let mut cfg = self.client_base("pgcdc");
        let queue = (self.max_inflight_records * 2 + QUEUE_SLACK).to_string();
        let kbytes = self.queue_bytes().div_ceil(1024).min(i32::MAX as usize);
        cfg.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", self.delivery_timeout_ms.to_string())
            .set("queue.buffering.max.messages", queue)
            .set(QUEUE_MAX_KBYTES, kbytes.to_string());
        for (names, value) in DEFAULTS {
            if !names.iter().any(|k| self.properties.contains_key(*k)) {
                cfg.set(names[0], value);
            }
        }
        cfg
    }

    /// The replication factor of a topic pgcdc creates on a cluster of
    /// `brokers` brokers: the configured one, else min(3, brokers).
    pub fn replication_factor(&self, brokers: usize) -> i32 {
        let available = i32::try_from(brokers).unwrap_or(i32::MAX).max(1);
        self.topic_replication_factor
            .unwrap_or(available.min(DURABLE_REPLICAS))
    }

    /// `min.insync.replicas` for a topic of `replication_factor` copies: 2
    /// from 3 copies on, so `acks=all` means two brokers have each record.
    pub fn min_insync_replicas(replication_factor: i32) -> Option<i32> {
        (replication_factor >= DURABLE_REPLICAS).then_some(DURABLE_MIN_INSYNC)
    }

    /// The transaction metadata topic, when `transaction_metadata` is on.
    pub fn transaction_topic(&self) -> Option<String> {
        self.transaction_metadata
            .then(|| format!("{}.transaction", self.topic_prefix))
    }

    /// The heartbeat topic, when `heartbeats` is on.
    pub fn heartbeat_topic(&self) -> Option<String> {
        self.heartbeats.then(|| {
            self.heartbeat_topic
                .clone()
                .unwrap_or_else(|| format!("__debezium-heartbeat.{}", self.topic_prefix))
        })
    }

    /// The topic of events of `schema.table`.
    pub fn topic_for(&self, schema: &str, table: &str) -> String {
        match self.topic_mode {
            TopicMode::Single => self.topic.clone(),
            TopicMode::PerTable => format!("{}.{}.{}", self.topic_prefix, schema, table),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let mut errors = Vec::new();
        KafkaConfig::default().validate(&mut errors);
        assert!(errors.is_empty(), "{errors:?}");
    }

    #[test]
    fn pinned_properties_and_bad_names_are_refused() {
        let mut c = KafkaConfig {
            topic: "bad topic".into(),
            ..Default::default()
        };
        c.properties.insert("acks".into(), "1".into());
        let mut errors = Vec::new();
        c.validate(&mut errors);
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors.iter().any(|e| e.key == "kafka.topic"));
        assert!(errors.iter().any(|e| e.key == "kafka.properties.acks"));
    }

    #[test]
    fn librdkafka_holds_one_record_of_the_largest_size_at_least() {
        let keys = |c: &KafkaConfig| {
            let mut errors = Vec::new();
            c.validate(&mut errors);
            errors.into_iter().map(|e| e.key).collect::<Vec<_>>()
        };
        let kbytes = |c: &KafkaConfig| c.client_config().get(QUEUE_MAX_KBYTES).map(String::from);
        let mut c = KafkaConfig::default();
        assert_eq!(kbytes(&c).as_deref(), Some("65536"));
        c.max_inflight_bytes = 500_000;
        assert!(keys(&c).is_empty());
        assert_eq!(
            kbytes(&c).as_deref(),
            Some("977"),
            "message.max.bytes, 1,000,000"
        );
        c.properties
            .insert(MESSAGE_MAX_BYTES.into(), "100000000".into());
        assert_eq!(c.max_message_bytes(), Some(100_000_000));
        assert_eq!(kbytes(&c).as_deref(), Some("97657"));
        c.properties.insert(MESSAGE_MAX_BYTES.into(), "big".into());
        c.properties.insert(QUEUE_MAX_KBYTES.into(), "1".into());
        assert_eq!(
            keys(&c),
            [
                "kafka.properties.queue.buffering.max.kbytes",
                "kafka.properties.message.max.bytes"
            ]
        );
    }

    #[test]
    fn librdkafka_is_built_with_tls_and_every_sasl_mechanism() {
        use rdkafka::producer::BaseProducer;
        for mechanism in ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "GSSAPI"] {
            let mut c = KafkaConfig::default();
            for (k, v) in [
                ("security.protocol", "sasl_ssl"),
                ("sasl.mechanism", mechanism),
                ("sasl.username", "pgcdc"),
                ("sasl.password", "secret"),
            ] {
                c.properties.insert(k.into(), v.into());
            }
            if mechanism == "GSSAPI" {
                // Kerberos takes a principal and keytab (kinit runs on first use).
                c.properties
                    .insert("sasl.kerberos.principal".into(), "pgcdc".into());
                c.properties
                    .insert("sasl.kerberos.keytab".into(), "/pgcdc.keytab".into());
            }
            let created = c.client_config().create::<BaseProducer>();
            assert!(created.is_ok(), "{mechanism}: {:?}", created.err());
        }
    }

    #[test]
    fn pgcdc_defaults_hold_unless_a_property_sets_them_under_any_name() {
        let cfg = KafkaConfig::default().client_config();
        assert_eq!(cfg.get(PARTITIONER), Some(JAVA_PARTITIONER));
        assert_eq!(cfg.get("linger.ms"), Some("20"));
        assert_eq!(cfg.get("compression.type"), Some("lz4"));
        let mine = [
            (PARTITIONER, "consistent_random"),
            (LINGER[0], "7"),
            (LINGER[1], "7"),
            (COMPRESSION[0], "none"),
            (COMPRESSION[1], "gzip"),
        ];
        for (key, value) in mine {
            let mut c = KafkaConfig::default();
            c.properties.insert(key.into(), value.into());
            let cfg = c.client_config();
            assert_eq!(cfg.get(key), Some(value));
            let (names, _) = DEFAULTS.iter().find(|(n, _)| n.contains(&key)).unwrap();
            for other in names.iter().filter(|n| **n != key) {
                assert_eq!(cfg.get(other), None, "{other} set next to {key}");
            }
            let created = cfg.create::<rdkafka::producer::BaseProducer>();
            assert!(created.is_ok(), "{key} = {value}: {:?}", created.err());
        }
    }

    #[test]
    fn created_topics_get_three_copies_where_brokers_allow() {
        let mut c = KafkaConfig::default();
        assert_eq!([1, 2, 3, 5].map(|b| c.replication_factor(b)), [1, 2, 3, 3]);
        assert_eq!(KafkaConfig::min_insync_replicas(3), Some(2));
        assert_eq!(KafkaConfig::min_insync_replicas(2), None);
        c.topic_replication_factor = Some(1);
        assert_eq!(c.replication_factor(5), 1);
    }

    #[test]
    fn routing_follows_topic_mode() {
        let mut c = KafkaConfig::default();
        assert_eq!(c.topic_for("public", "users"), "cdc-events");
        c.topic_mode = TopicMode::PerTable;
        assert_eq!(c.topic_for("public", "users"), "pgcdc.public.users");
    }
}
