//! Error classification shared by every actor: each error is either worth a
//! restart (`Transient`) or ends the process with a documented exit code (`Fatal`).

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

/// Log one clear line and end the process with `code`: the single exit path for
/// fatal conditions found inside actors.
pub fn exit_fatal(code: ExitCode, what: &str, error: &dyn std::fmt::Display) -> ! {
    tracing::error!(exit_code = code.code(), error = %error, "fatal: {what}");
    // `exit` runs no destructors: write this line and what precedes it to the audit log first.
    crate::audit::flush_before_exit();
    std::process::exit(code.code())
}
