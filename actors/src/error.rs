//! Error classification shared by every actor, and the one way a fatal
//! condition stops the process.
//!
//! Each error is either worth a restart (`Transient`) or ends the process with a
//! documented exit code (`Fatal`). An actor that meets a fatal condition does
//! not exit: it hands a [`Fatal`] to its [`FatalReporter`] and stops working.
//! The daemon waits for the first report, stops the pipeline in order, flushes
//! the logs and exits with the report's code.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use tokio::sync::mpsc;

/// What to do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Retry or restart the actor; the restart budget bounds how often.
    Transient,
    /// Stop the process with this exit code.
    Fatal(ExitCode),
}

/// The process exit codes pgcdc documents (README, "Exit codes").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum ExitCode {
    /// Configuration is invalid.
    Config = 2,
    /// PostgreSQL is not set up for pgcdc (wal_level, privileges, tables, keys).
    SourceNotReady = 3,
    /// PostgreSQL or Kafka could not be reached, or a permanent delivery error.
    Upstream = 4,
    /// The replication slot is missing, lost or ahead of our checkpoint: a gap.
    SlotGap = 5,
    /// Local state (RocksDB checkpoint) could not be read or synced.
    LocalIo = 6,
    /// An actor kept crashing: more restarts than the budget allows.
    RestartBudget = 7,
    /// A bug: an invariant did not hold.
    Internal = 70,
}

impl ExitCode {
    /// The numeric code passed to `exit`.
    pub fn code(self) -> i32 {
        self as i32
    }
}

/// Producer failures (replies of `PublishBatch` and `DrainProducer`).
#[derive(Debug, thiserror::Error)]
pub enum ProducerError {
    /// The session is not (or no longer) open here.
    #[error("replication session {0} is closed (producer restarted or a delivery failed)")]
    SessionClosed(u64),
    /// A batch number was skipped or repeated.
    #[error("batch {got} of session {session} is out of order, expected {expected}")]
    OutOfOrder {
        /// The session.
        session: u64,
        /// The batch number received.
        got: u64,
        /// The batch number expected.
        expected: u64,
    },
    /// librdkafka refused or failed a record.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// A record is larger than the producer or the broker accepts.
    #[error("{0}")]
    TooLarge(Box<OversizedRecord>),
}

/// Which limit refused a record as too large.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeLimit {
    /// The producer's `message.max.bytes`, of this many bytes.
    Producer(usize),
    /// The broker (its `message.max.bytes` or the topic's `max.message.bytes`).
    Broker,
}

/// A record Kafka refused as too large, named so the operator can find the
/// row and knows which setting to raise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OversizedRecord {
    /// `schema.table`.
    pub table: String,
    /// The row key as JSON, cut to a few hundred bytes.
    pub key: String,
    /// The transaction's commit LSN.
    pub commit_lsn: String,
    /// Key, value and header bytes of the record.
    pub size: usize,
    /// What refused it.
    pub limit: SizeLimit,
}

impl std::fmt::Display for OversizedRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Self {
            table,
            key,
            commit_lsn,
            size,
            ..
        } = self;
        let what = format!("{table} key {key} at commit lsn {commit_lsn}, {size} bytes");
        match self.limit {
            SizeLimit::Producer(limit) => write!(
                f,
                "record too large for kafka: {what}, above kafka.properties.\"message.max.bytes\" ({limit}); \
                 raise it (and the broker's message.max.bytes or the topic's max.message.bytes to match), \
                 or set kafka.oversized = \"dead_letter\" to send such records' descriptions to the dead-letter topic"
            ),
            SizeLimit::Broker => write!(
                f,
                "the broker refused a record as too large: {what}; raise the broker's message.max.bytes \
                 or the topic's max.message.bytes, or set kafka.properties.\"message.max.bytes\" below \
                 them so pgcdc refuses such records itself (and kafka.oversized applies)"
            ),
        }
    }
}

impl ProducerError {
    /// The one classification point for producer errors.
    pub fn class(&self) -> ErrorClass {
        let code = match self {
            ProducerError::Kafka(e) => e.rdkafka_error_code(),
            ProducerError::TooLarge(_) => return ErrorClass::Fatal(ExitCode::Upstream),
            _ => None,
        };
        match code {
            Some(
                RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::MessageBatchTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::ClusterAuthorizationFailed
                | RDKafkaErrorCode::TransactionalIdAuthorizationFailed
                | RDKafkaErrorCode::InvalidRecord
                | RDKafkaErrorCode::InvalidConfig,
            ) => ErrorClass::Fatal(ExitCode::Upstream),
            _ => ErrorClass::Transient,
        }
    }
}

/// Checkpoint store failures (replies of `GetCheckpoint` and
/// `PersistSlotIdentity`). All are fatal: local state we cannot trust.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// RocksDB failed to open, read or write.
    #[error("checkpoint store {path}: {source}")]
    Store {
        /// The database directory.
        path: PathBuf,
        /// RocksDB's error.
        #[source]
        source: rocksdb::Error,
    },
    /// A stored value does not decode.
    #[error("checkpoint store {path}: corrupt value for {key}: {detail}")]
    Corrupt {
        /// The database directory.
        path: PathBuf,
        /// Which key.
        key: &'static str,
        /// What is wrong with it.
        detail: String,
    },
    /// The checkpoint actor reported a fatal condition earlier and does no more work.
    #[error("the checkpoint store failed earlier; the process is stopping")]
    Stopped,
}

impl CheckpointError {
    /// The one classification point for checkpoint errors.
    pub fn class(&self) -> ErrorClass {
        ErrorClass::Fatal(ExitCode::LocalIo)
    }
}

/// A condition the process cannot continue from: the code it exits with and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}: {reason}")]
pub struct Fatal {
    /// The exit code.
    pub code: ExitCode,
    /// What could not continue (`"checkpoint write failed"`).
    pub what: String,
    /// The error behind it.
    pub reason: String,
}

/// Where actors report fatal conditions; cheap to clone, one per process.
///
/// Only the first report counts: it is logged (`fatal: …` with `exit_code`)
/// and handed to the [`FatalReceiver`]. Later ones, typically from actors
/// failing because the first one stopped working, are logged at debug level.
#[derive(Debug, Clone)]
pub struct FatalReporter {
    tx: Option<mpsc::UnboundedSender<Fatal>>,
    reported: Arc<AtomicBool>,
}

/// The daemon's end of a [`FatalReporter`]: yields the first fatal report.
#[derive(Debug)]
pub struct FatalReceiver(mpsc::UnboundedReceiver<Fatal>);

impl FatalReporter {
    /// A reporter and the receiver the daemon waits on.
    pub fn channel() -> (Self, FatalReceiver) {
        let (tx, rx) = mpsc::unbounded_channel();
        let reporter = Self {
            tx: Some(tx),
            reported: Arc::default(),
        };
        (reporter, FatalReceiver(rx))
    }

    /// A reporter nobody waits on: reports are only logged (tools and tests
    /// that run an actor without the daemon).
    pub fn detached() -> Self {
        Self {
            tx: None,
            reported: Arc::default(),
        }
    }

    /// Report that `what` cannot continue because of `error`, to end the
    /// process with `code`. The caller stops its work afterwards.
    pub fn report(&self, code: ExitCode, what: &str, error: &dyn std::fmt::Display) {
        let fatal = Fatal {
            code,
            what: what.to_owned(),
            reason: error.to_string(),
        };
        if self.reported.swap(true, Ordering::SeqCst) {
            // Not a second `fatal: …` line: exactly one names the exit code.
            tracing::debug!(exit_code = code.code(), error = %fatal.reason, "already stopping; {what} also cannot continue");
            return;
        }
        tracing::error!(exit_code = code.code(), error = %fatal.reason, "fatal: {what}");
        if let Some(tx) = &self.tx {
            // The receiver is gone only when the daemon already stops.
            let _ = tx.send(fatal);
        }
    }

    /// Whether a fatal condition was reported: the process is stopping.
    pub fn is_reported(&self) -> bool {
        self.reported.load(Ordering::SeqCst)
    }
}

impl FatalReceiver {
    /// The first fatal report; `None` once every reporter is dropped without one.
    pub async fn recv(&mut self) -> Option<Fatal> {
        self.0.recv().await
    }

    /// The first fatal report, if one arrived already.
    pub fn try_recv(&mut self) -> Option<Fatal> {
        self.0.try_recv().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_the_first_fatal_report_counts() {
        let (reporter, mut rx) = FatalReporter::channel();
        assert!(!reporter.is_reported());
        reporter
            .clone()
            .report(ExitCode::LocalIo, "disk", &"fsync failed");
        reporter.report(ExitCode::Upstream, "kafka", &"gone");
        assert!(reporter.is_reported());
        let first = rx.recv().await.expect("a report");
        assert_eq!(first.code, ExitCode::LocalIo);
        assert_eq!(first.to_string(), "disk: fsync failed");
        assert_eq!(rx.try_recv(), None, "a second report must not be delivered");
    }
}

/// One invalid configuration setting: the key it names (`postgres.port`,
/// `kafka.properties.acks`, `--table x`) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct ConfigError {
    /// The setting's path in the configuration (or the flag).
    pub key: String,
    /// What is wrong, in words the operator can act on.
    pub message: String,
}

impl ConfigError {
    /// The error for `key`.
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}
