//! Snapshot failures and their one classification point.

use actix::MailboxError;

use crate::checkpoint::CheckpointError;
use crate::error::{ErrorClass, ExitCode};
use crate::pg::PgError;

/// Failures of the initial copy and of backfills.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Connecting or a catalog lookup failed.
    #[error(transparent)]
    Pg(#[from] PgError),
    /// A SQL statement failed.
    #[error("postgresql: {}", crate::pg::chain(.0))]
    Sql(#[from] tokio_postgres::Error),
    /// A table without a primary key cannot be copied while streaming: its
    /// rows cannot be matched against the changes between the watermarks.
    #[error("refusing to stream: table {0} has no primary key, so it cannot be copied while streaming (its initial snapshot was interrupted or it was added later). Recreate the slot and re-snapshot (delete the state dir) only if a gap is acceptable")]
    Keyless(String),
    /// A partition of a table being copied was dropped after the slot's
    /// snapshot was taken: its rows can no longer be read as of it.
    #[error("partition (oid {oid}) of {table} was dropped after the snapshot was taken, so the initial copy cannot read it; the copy is retried and what is left is copied from the table's current rows")]
    PartitionDropped {
        /// The partitioned table.
        table: String,
        /// The dropped partition's OID.
        oid: i64,
    },
    /// The stream stopped taking copied chunks (it failed or was stopped).
    #[error("the replication stream stopped taking copied rows")]
    CopyAbandoned,
    /// The checkpoint store failed.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// Another actor is gone.
    #[error("actor mailbox: {0}")]
    Mailbox(#[from] MailboxError),
}

impl SnapshotError {
    /// The one classification point for snapshot errors.
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Pg(e) => e.class(),
            Self::Keyless(_) => ErrorClass::Fatal(ExitCode::SlotGap),
            Self::Checkpoint(e) => e.class(),
            Self::Sql(_)
            | Self::PartitionDropped { .. }
            | Self::CopyAbandoned
            | Self::Mailbox(_) => ErrorClass::Transient,
        }
    }

    /// Whether the error means PostgreSQL could not be reached.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Self::Pg(e) if e.is_unreachable())
    }
}
