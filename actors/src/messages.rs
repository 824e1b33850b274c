//! Typed messages between actors. Commands are verb-noun, notifications past
//! tense, queries `Get*`.
//!
//! The replication → producer protocol is a *session*: each start of the
//! replication stream opens a new session (from the checkpoint LSN) and numbers
//! its batches 0, 1, 2, … The producer accepts only the next number of the
//! current session, so a producer restart or a failed delivery can never be
//! skipped over: the stream is told the session broke and restarts from the
//! checkpoint.

use std::collections::BTreeMap;

use actix::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{CheckpointError, ProducerError};
use crate::event::{ChangeEvent, CopiedRows};
use crate::lsn::Lsn;

/// Start a new replication session on the producer, dropping any older one.
#[derive(Message)]
#[rtype(result = "()")]
pub struct OpenSession {
    /// Session number, increasing with every stream start.
    pub session: u64,
    /// Told when the session can no longer deliver (producer restart, failed delivery).
    pub on_broken: Recipient<SessionBroken>,
    /// Told each time a commit LSN is durably checkpointed.
    pub on_persisted: Recipient<LsnPersisted>,
}

/// Publish these events; the response comes once they are queued in the
/// producer and the in-flight bound allows more (backpressure).
#[derive(Message)]
#[rtype(result = "Result<(), ProducerError>")]
pub struct PublishBatch {
    /// Session the batch belongs to.
    pub session: u64,
    /// Position of the batch in the session, from 0, without gaps.
    pub seq: u64,
    /// Events in commit order; may be empty (a pure position marker).
    pub events: Vec<ChangeEvent>,
    /// Rows a snapshot copied, published after `events`.
    pub rows: Option<CopiedRows>,
    /// Set on the batch that ends a transaction (or marks an idle position):
    /// once this batch and all before it are acknowledged, this LSN may be
    /// checkpointed and confirmed.
    pub commit_end: Option<Lsn>,
    /// Copy progress made by this batch's rows, checkpointed with `commit_end`
    /// (only set on batches that have one).
    pub progress: Vec<TableProgress>,
}

impl PublishBatch {
    /// Events per (`schema.table`, op), for the metrics.
    pub fn counts(&self) -> Vec<((String, &'static str), u64)> {
        let mut counts = crate::metrics::count_events(&self.events);
        if let Some(r) = self.rows.as_ref().filter(|r| !r.rows.is_empty()) {
            let table = format!("{}.{}", r.table.schema, r.table.name);
            counts.push(((table, crate::event::Op::Read.code()), r.rows.len() as u64));
        }
        counts
    }
}

/// The session can no longer deliver; the stream must restart from the checkpoint.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct SessionBroken {
    /// The session that broke.
    pub session: u64,
    /// Why.
    pub reason: SessionBreak,
}

/// Why a producer session broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SessionBreak {
    /// The producer restarted (a delivery failed or it crashed): what was in flight is gone.
    #[error("kafka producer restarted")]
    ProducerRestarted,
    /// The stream opened a newer session.
    #[error("superseded by a new session")]
    Superseded,
    /// Kafka refused a record for good; the process is stopping.
    #[error("kafka refused a record permanently")]
    Refused,
}

/// Wait until everything published so far is acknowledged and checkpointed;
/// returns the last LSN handed to the checkpoint.
#[derive(Message)]
#[rtype(result = "Result<Option<Lsn>, ProducerError>")]
pub struct DrainProducer;

/// Persist `lsn` (a commit end LSN, every record before it acknowledged) with a synced write.
#[derive(Message)]
#[rtype(result = "()")]
pub struct PersistLsn {
    /// The LSN to store.
    pub lsn: Lsn,
    /// Copy progress to store in the same write.
    pub progress: Vec<TableProgress>,
    /// Told after the write is synced.
    pub notify: Recipient<LsnPersisted>,
}

/// `lsn` is durably checkpointed: PostgreSQL may be told it is flushed.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct LsnPersisted {
    /// The checkpointed LSN.
    pub lsn: Lsn,
}

/// Read the checkpoint.
#[derive(Message)]
#[rtype(result = "Result<Checkpoint, CheckpointError>")]
pub struct GetCheckpoint;

/// Record the slot pgcdc streams from and the LSN it starts at (first start only).
#[derive(Message)]
#[rtype(result = "Result<(), CheckpointError>")]
pub struct PersistSlotIdentity {
    /// Which slot on which server.
    pub identity: SlotIdentity,
    /// The slot's consistent point.
    pub lsn: Lsn,
    /// Each table's starting copy progress (fresh when a snapshot starts now).
    pub progress: Vec<TableProgress>,
}

/// Record what some tables' mirrors are copied from: (schema, name) and
/// the fingerprint of the table and of what the publication sends of it.
#[derive(Message)]
#[rtype(result = "Result<(), CheckpointError>")]
pub struct PersistCopiedFrom(pub Vec<((String, String), String)>);

/// Pin each change topic's records to a partition count: (topic, its
/// partitions now). Replies with the count each is pinned to.
#[derive(Message)]
#[rtype(result = "Result<Vec<PartitionPin>, CheckpointError>")]
pub struct PinPartitions(pub Vec<(String, i32)>);

/// The partitions a change topic has and those its records are spread over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionPin {
    /// The topic.
    pub topic: String,
    /// Its partitions now.
    pub now: i32,
    /// The count its records are spread over.
    pub pinned: i32,
    /// The count it was pinned to before; `None` the first time it is seen.
    pub before: Option<i32>,
}

/// Stop reading the replication stream (graceful shutdown); replies once stopped.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopStreaming;

/// Which slot on which server the checkpoint belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotIdentity {
    /// `IDENTIFY_SYSTEM`'s system identifier of the PostgreSQL cluster.
    pub system_id: String,
    /// Database name.
    pub database: String,
    /// Replication slot name.
    pub slot_name: String,
}

/// A primary-key value as PostgreSQL prints it: one text per key column.
pub type KeyText = Vec<String>;

/// One key range of a table's copy: rows with `after < key <= upto`
/// (`None`: unbounded on that side) still to be copied unless `done`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRange {
    /// Last key copied (exclusive lower bound of what is left).
    pub after: Option<KeyText>,
    /// Inclusive upper bound of the range.
    pub upto: Option<KeyText>,
    /// Every row of the range is copied.
    pub done: bool,
}

/// How far the copy (initial snapshot or backfill) of one table has come.
/// Stored in the same synced write as the LSN of the commit that carried the
/// copied rows, so it never runs ahead of what Kafka acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableProgress {
    /// Schema name, unquoted.
    pub schema: String,
    /// Table name, unquoted.
    pub name: String,
    /// The key ranges the copy is split into.
    pub ranges: Vec<KeyRange>,
    /// Rows copied so far.
    pub rows: u64,
}

impl TableProgress {
    /// A copy of `schema.name` not started yet: one unbounded range.
    pub fn fresh(schema: &str, name: &str) -> Self {
        Self {
            schema: schema.to_owned(),
            name: name.to_owned(),
            ranges: vec![KeyRange {
                after: None,
                upto: None,
                done: false,
            }],
            rows: 0,
        }
    }

    /// A table whose copy is complete (or never wanted).
    pub fn finished(schema: &str, name: &str) -> Self {
        let mut p = Self::fresh(schema, name);
        p.ranges[0].done = true;
        p
    }

    /// Whether every range is copied.
    pub fn done(&self) -> bool {
        self.ranges.iter().all(|r| r.done)
    }
}

/// What the checkpoint holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checkpoint {
    /// Highest commit end LSN whose records are all acknowledged by Kafka; zero if none yet.
    pub lsn: Lsn,
    /// The slot the LSN refers to; `None` before the first start.
    pub slot: Option<SlotIdentity>,
    /// Copy progress of every table pgcdc has seen (ordered by schema, table).
    pub progress: Vec<TableProgress>,
    /// What each table's mirror was last copied from: the fingerprint of
    /// the table (its OID) and of what the publication sends of it (column
    /// list and row filter); empty while the table is gone.
    pub copied_from: BTreeMap<(String, String), String>,
}

impl Checkpoint {
    /// Tables whose copy is not complete.
    pub fn pending(&self) -> impl Iterator<Item = &TableProgress> {
        self.progress.iter().filter(|p| !p.done())
    }
}
