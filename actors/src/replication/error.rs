//! Replication failures and their one classification point.

use actix::MailboxError;

use super::assembler::AssembleError;
use super::decode::DecodeError;
use crate::checkpoint::CheckpointError;
use crate::error::{ErrorClass, ExitCode};
use crate::kafka_producer::ProducerError;
use crate::lsn::Lsn;
use crate::pg::PgError;
use crate::snapshot::SnapshotError;

/// Replication failures.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    /// PostgreSQL is not set up for pgcdc; the message says how to fix it.
    #[error("postgresql is not ready: {0}")]
    NotReady(String),
    /// Streaming would leave a gap; refused.
    #[error("refusing to stream: {0}. Recreate the slot and re-snapshot (delete the state dir) only if a gap is acceptable")]
    SlotGap(String),
    /// Connecting, a server check or a catalog lookup failed.
    #[error(transparent)]
    Pg(#[from] PgError),
    /// A SQL statement failed.
    #[error("postgresql: {}", crate::pg::chain(.0))]
    Sql(#[from] tokio_postgres::Error),
    /// The replication connection failed.
    #[error("replication stream: {0}")]
    Stream(#[from] pgwire_replication::PgWireError),
    /// The server ended the stream.
    #[error("replication stream ended by the server")]
    StreamEnded,
    /// A pgoutput message could not be decoded.
    #[error("undecodable pgoutput message at {lsn}: {source}")]
    Decode {
        /// Where.
        lsn: Lsn,
        /// Why.
        #[source]
        source: DecodeError,
    },
    /// A decoded message does not fit the stream state.
    #[error("inconsistent stream at {lsn}: {source}")]
    Assemble {
        /// Where.
        lsn: Lsn,
        /// Why.
        #[source]
        source: AssembleError,
    },
    /// The initial copy failed.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// The checkpoint store failed.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The producer refused a batch (session broken).
    #[error(transparent)]
    Producer(#[from] ProducerError),
    /// Another actor is gone.
    #[error("actor mailbox: {0}")]
    Mailbox(#[from] MailboxError),
}

impl ReplicationError {
    /// The one classification point for replication errors.
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::NotReady(_) => ErrorClass::Fatal(ExitCode::SourceNotReady),
            Self::SlotGap(_) => ErrorClass::Fatal(ExitCode::SlotGap),
            Self::Decode { .. } | Self::Assemble { .. } => ErrorClass::Fatal(ExitCode::Internal),
            Self::Pg(e) => e.class(),
            Self::Snapshot(e) => e.class(),
            Self::Checkpoint(e) => e.class(),
            Self::Producer(e) => e.class(),
            Self::Sql(_) | Self::Stream(_) | Self::StreamEnded | Self::Mailbox(_) => {
                ErrorClass::Transient
            }
        }
    }

    /// Whether the source side failed (the connection, a query, the server
    /// ending the stream) while the producer session is intact.
    pub(super) fn is_source_lost(&self) -> bool {
        matches!(
            self,
            Self::Stream(_) | Self::StreamEnded | Self::Sql(_) | Self::Pg(_)
        )
    }

    /// Whether the error means PostgreSQL could not be reached.
    pub(super) fn is_unreachable(&self) -> bool {
        match self {
            Self::Pg(e) => e.is_unreachable(),
            Self::Snapshot(e) => e.is_unreachable(),
            Self::Stream(pgwire_replication::PgWireError::Io(_)) => true,
            _ => false,
        }
    }
}
