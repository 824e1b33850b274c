//! The contract between pgcdc's parts and its consumers: the Kafka record
//! envelope, Kafka header names, the prefixes of the logical messages pgcdc
//! writes into the WAL, and the failpoint names the engine, the
//! fault-injection harness and the tests share.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

/// The value of a change record: Debezium's PostgreSQL envelope, with
/// pgcdc's additions (`source.commit_lsn`, `source.seq`, `unchanged_toast`).
/// The producer writes its bytes directly (a property test holds them to
/// this type's serialization, `R` = a borrowed row); the ES sink reads it
/// (`R` = an owned row). Field order is the order on the wire.
///
/// Reading is lenient where the sink does not need a field: only `op`,
/// `source.schema`, `source.table` and `source.commit_lsn` are required.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope<'a, R> {
    /// The row before the change (key columns only unless `REPLICA IDENTITY FULL`).
    pub before: Option<R>,
    /// The row after the change; `None` for deletes and truncates.
    pub after: Option<R>,
    /// Where the change comes from.
    pub source: Source<'a>,
    /// The change's place in its transaction (`kafka.transaction_metadata`),
    /// else `null`.
    #[serde(default)]
    pub transaction: Option<TxBlock<'a>>,
    /// `c` insert, `u` update, `d` delete, `r` snapshot read, `t` truncate.
    pub op: Cow<'a, str>,
    /// When pgcdc encoded the record (ms since the epoch).
    #[serde(default)]
    pub ts_ms: i64,
    /// `ts_ms` in microseconds.
    #[serde(default)]
    pub ts_us: i64,
    /// `ts_ms` in nanoseconds.
    #[serde(default)]
    pub ts_ns: i64,
    /// Columns left out because their TOAST value did not change (omitted when none).
    #[serde(default, skip_serializing_if = "<[String]>::is_empty")]
    pub unchanged_toast: Cow<'a, [String]>,
}

/// The `source` block of an [`Envelope`]: Debezium's PostgreSQL fields in
/// its order, then pgcdc's `commit_lsn` and `seq` (`seq` last: the
/// snapshot encoder writes everything before it once per chunk).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Source<'a> {
    /// pgcdc's version.
    #[serde(default)]
    pub version: Cow<'a, str>,
    /// [`CONNECTOR`], or `postgresql` (`kafka.source_connector`).
    #[serde(default)]
    pub connector: Cow<'a, str>,
    /// The logical server name: `kafka.topic_prefix`.
    #[serde(default)]
    pub name: Cow<'a, str>,
    /// Commit time (ms since the epoch).
    #[serde(default)]
    pub ts_ms: i64,
    /// Commit time (µs since the epoch).
    #[serde(default)]
    pub ts_us: i64,
    /// Commit time (ns since the epoch; µs precision).
    #[serde(default)]
    pub ts_ns: i64,
    /// Whether and how the record comes from a snapshot.
    #[serde(default)]
    pub snapshot: SnapshotMark,
    /// Database name.
    #[serde(default)]
    pub db: Cow<'a, str>,
    /// `["<commit lsn>","<lsn>"]` as a JSON string of decimal LSNs: orders
    /// changes as Debezium's sequence does.
    #[serde(default)]
    pub sequence: Sequence,
    /// Schema name, unquoted.
    pub schema: Cow<'a, str>,
    /// Table name, unquoted.
    pub table: Cow<'a, str>,
    /// Transaction id.
    #[serde(default, rename = "txId")]
    pub tx_id: u32,
    /// LSN of the change itself.
    #[serde(default)]
    pub lsn: u64,
    /// Always `null` (Debezium's `xmin.fetch.interval.ms` is not offered).
    #[serde(default)]
    pub xmin: Option<u64>,
    /// End LSN of the transaction's commit: the document version in the sink.
    pub commit_lsn: u64,
    /// Position of the change in its transaction.
    #[serde(default)]
    pub seq: u32,
}

/// `source.sequence`: `["<commit lsn>","<lsn>"]`, written as a JSON string
/// of decimal LSNs without building it first; read leniently (zeros if malformed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sequence {
    /// The transaction's commit LSN.
    pub commit_lsn: u64,
    /// The change's LSN.
    pub lsn: u64,
}

impl std::fmt::Display for Sequence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[\"{}\",\"{}\"]", self.commit_lsn, self.lsn)
    }
}

impl Serialize for Sequence {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Sequence {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = Cow::<'de, str>::deserialize(d)?;
        let pair: Option<(String, String)> = serde_json::from_str(&text).ok();
        let number = |t: &str| t.parse::<u64>().unwrap_or_default();
        Ok(pair.map_or_else(Self::default, |(c, l)| Self {
            commit_lsn: number(&c),
            lsn: number(&l),
        }))
    }
}

/// `source.snapshot`: Debezium's strings. Read also from the booleans
/// earlier pgcdc versions wrote (`true` = an initial-snapshot row).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotMark {
    /// A row of the initial snapshot.
    True,
    /// The last row of an initial snapshot (pgcdc does not write it).
    Last,
    /// A streamed change.
    #[default]
    False,
    /// A row copied by a backfill (`pgcdc snapshot --table`, new tables).
    Incremental,
}

impl<'de> Deserialize<'de> for SnapshotMark {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw<'a> {
            Flag(bool),
            Text(Cow<'a, str>),
        }
        Ok(match Raw::deserialize(d)? {
            Raw::Flag(false) => Self::False,
            Raw::Flag(true) => Self::True,
            Raw::Text(t) => match &*t {
                "false" => Self::False,
                "last" => Self::Last,
                "incremental" => Self::Incremental,
                _ => Self::True, // "true", "first", "last_in_data_collection", …
            },
        })
    }
}

/// The `transaction` block of an [`Envelope`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TxBlock<'a> {
    /// `"<txId>:<commit lsn>"`, the id of the transaction's BEGIN and END events.
    pub id: Cow<'a, str>,
    /// Position of the change among the transaction's changes, from 1.
    pub total_order: u64,
    /// Position among the transaction's changes of the same table, from 1.
    pub data_collection_order: u64,
}

/// `source.connector` of every record pgcdc writes unless
/// `kafka.source_connector` says otherwise.
pub const CONNECTOR: &str = "pgcdc";

/// `source.version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Kafka record headers written by the producer and read by the sink.
pub mod header {
    /// `schema.table` of the row.
    pub const TABLE: &str = "pgcdc.table";
    /// The envelope's `op` (`c`, `u`, `d`, `r`, `t`).
    pub const OP: &str = "pgcdc.op";
    /// The commit LSN of the record's transaction (`X/Y`).
    pub const COMMIT_LSN: &str = "pgcdc.commit_lsn";
    /// The table's column types as JSON (`{"column": "type"}`).
    pub const TYPES: &str = "pgcdc.types";
    /// Why a record went to the dead-letter topic.
    pub const REASON: &str = "pgcdc.reason";
}

/// Prefixes of the logical messages (`pg_logical_emit_message`) pgcdc writes.
pub mod message {
    /// Low/high marks around a backfill chunk.
    pub const WATERMARK: &str = "pgcdc.watermark";
    /// A request to copy tables again (`pgcdc snapshot --table`).
    pub const SIGNAL: &str = "pgcdc.signal";
    /// Heartbeats that move the confirmed position of an idle database.
    pub const HEARTBEAT: &str = "pgcdc.heartbeat";
    /// Freshness canaries: the daemon's wall-clock time, through the pipeline.
    pub const CANARY: &str = "pgcdc.canary";
}

/// Failpoints compiled in with the `failpoints` feature.
pub mod failpoint {
    /// The replication stream, before it hands a batch to the producer.
    pub const REPLICATION_PUBLISH: &str = "replication-publish";
    /// The producer, after a batch was acknowledged by Kafka.
    pub const PRODUCER_AFTER_ACK: &str = "producer-after-ack";
    /// The checkpoint actor, after the synced write and before it confirms the LSN.
    pub const CHECKPOINT_BEFORE_CONFIRM: &str = "checkpoint-before-confirm";
    /// The ES sink, after a bulk request succeeded and before the offset commit.
    pub const ES_AFTER_BULK: &str = "es-after-bulk";
    /// The snapshot actor, between backfill chunks.
    pub const SNAPSHOT_CHUNK: &str = "snapshot-chunk";
    /// The initial copy, between chunks.
    pub const SNAPSHOT_COPY_CHUNK: &str = "snapshot-copy-chunk";
    /// The initial snapshot, after the readers imported it and before the
    /// copy is planned.
    pub const SNAPSHOT_PLAN: &str = "snapshot-plan";
    /// The WAL monitor, at the start of each check.
    pub const WAL_MONITOR_PASS: &str = "wal-monitor-pass";
    /// The ES sink, when its consumer was assigned partitions; `return`
    /// drops the assignment, as a broker that assigned nothing would.
    pub const ES_ASSIGNED: &str = "es-assigned";
    /// The ES sink, when a batch was read; `return` drops the records
    /// between its first and its last, as a broker that never delivered
    /// them would (retention, compaction); `return(head)` all but the last.
    pub const ES_RECORDS_LOST: &str = "es-records-lost";
    /// The ES sink's fill of a new mirror generation, once its snapshot is
    /// taken: `return(ms)` waits that long before the rows are copied.
    pub const ES_FILL_COPY: &str = "es-fill-copy";
    /// The ES sink's look-up of whether columns a record adds have
    /// defaults: `return` fails it, as an unreachable PostgreSQL would.
    pub const ES_COLUMN_DEFAULTS: &str = "es-column-defaults";
    /// The ES sink's read of unchanged TOAST columns no document holds
    /// from PostgreSQL: `return` fails it as an unreachable server would,
    /// `return(refused)` as a server refusing the read.
    pub const ES_TOAST_READ: &str = "es-toast-read";
    /// The daemon's end, once its outcome is known and before its clients
    /// close: `sleep(ms)` holds it there, as a Kafka client whose close
    /// waits on the broker would.
    pub const TEARDOWN: &str = "teardown";
    /// Every failpoint, for harnesses that list or configure them.
    pub const ALL: [&str; 14] = [
        REPLICATION_PUBLISH,
        PRODUCER_AFTER_ACK,
        CHECKPOINT_BEFORE_CONFIRM,
        ES_AFTER_BULK,
        SNAPSHOT_CHUNK,
        SNAPSHOT_COPY_CHUNK,
        SNAPSHOT_PLAN,
        WAL_MONITOR_PASS,
        ES_ASSIGNED,
        ES_RECORDS_LOST,
        ES_FILL_COPY,
        ES_COLUMN_DEFAULTS,
        ES_TOAST_READ,
        TEARDOWN,
    ];
}
