//! The pgcdc engine: actors that move committed PostgreSQL changes into Kafka
//! without losing any.
//!
//! ```text
//! PostgreSQL ──pgoutput──▶ ReplicationActor ──PublishBatch──▶ KafkaProducerActor ──▶ Kafka
//!     ▲                          ▲                                   │ all acks of a prefix
//!     │ standby status           │ LsnPersisted                      ▼
//!     └──────────────────────────┴──────────────────────────── CheckpointActor (RocksDB)
//!
//! every actor ──tracing──▶ LogActor (audit.db: logs, dead_letters)
//! ```
//!
//! # The LSN / acknowledgement protocol
//!
//! 1. The replication actor numbers its batches within a *session* (one per
//!    start); a batch that ends a transaction carries the commit's end LSN.
//! 2. The producer accepts only the next batch of the open session, sends its
//!    records (idempotent, `acks=all`) and tracks batches in order. When a
//!    prefix of batches is fully acknowledged, it asks the checkpoint actor to
//!    persist the last commit LSN in that prefix.
//! 3. The checkpoint actor writes it with a synced RocksDB write, then tells
//!    the replication actor, which only then reports it to PostgreSQL as
//!    flushed.
//! 4. Any failure breaks the session; the replication actor restarts from the
//!    checkpoint. Records after the checkpoint may be sent twice, never lost.
//!
//! # Stopping
//!
//! Nothing in this crate exits the process. An actor that meets a fatal
//! condition (`ErrorClass::Fatal`, or a spent restart budget) reports an
//! [`error::Fatal`] (exit code and reason) through the
//! [`error::FatalReporter`] its [`supervision::RestartBudget`] carries, and
//! stops working; no supervised work starts after that. The daemon waits for
//! the first report (or a signal), stops the pipeline in order and exits with
//! the report's code.
//!
//! # Module dependencies
//!
//! Types the actors exchange live in the leaf modules `messages`, `event`,
//! `lsn` and `error` (errors returned in message replies); actor modules
//! depend on them, never the other way round.

pub mod audit;
pub mod canary;
pub mod checkpoint;
pub mod error;
pub mod es_writer;
pub mod event;
pub mod kafka_producer;
pub mod lsn;
pub mod messages;
pub mod metrics;
pub mod pg;
pub mod replication;
pub mod secret;
pub mod snapshot;
pub mod supervision;
pub mod verify;
pub mod wal_monitor;
pub mod wire;

/// The config key each validation error names (the text before its `:`).
#[cfg(test)]
pub(crate) fn error_keys(errors: &[error::ConfigError]) -> Vec<&str> {
    errors.iter().map(|e| e.key.as_str()).collect()
}
