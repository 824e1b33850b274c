//! The contract between pgcdc's parts and its consumers: the Kafka record
//! envelope, Kafka header names, the prefixes of the logical messages pgcdc
//! writes into the WAL, and the failpoint names the engine, the
//! fault-injection harness and the tests share.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

/// The value of a change record: a Debezium-shaped envelope. The producer
/// writes it (`R` = a borrowed row), the ES sink reads it (`R` = an owned
/// row). Field order is the order on the wire.
///
/// Reading is lenient where the sink does not need a field: only `op`,
/// `source.schema`, `source.table` and `source.commit_lsn` are required.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope<'a, R> {
    /// The row before the change (key columns only unless `REPLICA IDENTITY FULL`).
    pub before: Option<R>,
    /// The row after the change; `None` for deletes and truncates.
    pub after: Option<R>,
    /// `c` insert, `u` update, `d` delete, `r` snapshot read, `t` truncate.
    pub op: Cow<'a, str>,
    /// When pgcdc encoded the record (ms since the epoch).
    #[serde(default)]
    pub ts_ms: i64,
    /// Where the change comes from.
    pub source: Source<'a>,
    /// Columns left out because their TOAST value did not change (omitted when none).
    #[serde(default, skip_serializing_if = "<[String]>::is_empty")]
    pub unchanged_toast: Cow<'a, [String]>,
}

/// The `source` block of an [`Envelope`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Source<'a> {
    /// Always [`CONNECTOR`] for records pgcdc writes.
    #[serde(default)]
    pub connector: Cow<'a, str>,
    /// Database name.
    #[serde(default)]
    pub db: Cow<'a, str>,
    /// Schema name, unquoted.
    pub schema: Cow<'a, str>,
    /// Table name, unquoted.
    pub table: Cow<'a, str>,
    /// LSN of the change itself.
    #[serde(default)]
    pub lsn: u64,
    /// End LSN of the transaction's commit: the document version in the sink.
    pub commit_lsn: u64,
    /// Position of the change in its transaction.
    #[serde(default)]
    pub seq: u32,
    /// Transaction id.
    #[serde(default, rename = "txId")]
    pub tx_id: u32,
    /// Commit time (ms since the epoch).
    #[serde(default)]
    pub ts_ms: i64,
    /// Whether the record comes from a snapshot copy.
    #[serde(default)]
    pub snapshot: bool,
}

/// `source.connector` of every record pgcdc writes.
pub const CONNECTOR: &str = "pgcdc";

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
    /// The WAL monitor, at the start of each check.
    pub const WAL_MONITOR_PASS: &str = "wal-monitor-pass";
    /// The ES sink, when its consumer was assigned partitions; `return`
    /// drops the assignment, as a broker that assigned nothing would.
    pub const ES_ASSIGNED: &str = "es-assigned";
    /// Every failpoint, for harnesses that list or configure them.
    pub const ALL: [&str; 8] = [
        REPLICATION_PUBLISH,
        PRODUCER_AFTER_ACK,
        CHECKPOINT_BEFORE_CONFIRM,
        ES_AFTER_BULK,
        SNAPSHOT_CHUNK,
        SNAPSHOT_COPY_CHUNK,
        WAL_MONITOR_PASS,
        ES_ASSIGNED,
    ];
}
