//! The PostgreSQL layer: everything the engine says to PostgreSQL that is
//! not specific to one actor.
//!
//! - `config`: the `[postgres]` section every connection is built from ([`PostgresConfig`]);
//! - `connect`: SQL and replication connections (the one place they are opened);
//! - [`tls`]: `postgres.sslmode` and certificates, what a connection negotiated;
//!   `server_name`: the certificate's DNS name (verify-ca on the replication connection);
//! - `session`: the settings the value renderer and the quoting rely on,
//!   applied to both connection kinds from one list;
//! - [`catalog`]: server checks and table, key and column lookups;
//! - [`types`]: each column type's rendering rule, built-in or from `pg_type`;
//! - [`values`]: text-format values to JSON, by `postgres-types`' [`Type`] and [`types::Rule`];
//! - [`quote`]: identifier and literal quoting;
//! - [`waits`]: naming the sessions that keep a slot creation or a copy waiting.
//!
//! # Dependency direction
//!
//! Arrows read "uses"; there are no cycles:
//!
//! ```text
//! replication ──▶ snapshot ──▶ pg
//!      └───────────────────────▲
//! wal_monitor ─────────────────┤
//! src/check.rs ────────────────┘  (plus replication::slot for the start decision)
//! ```
//!
//! `pg` uses none of the actor modules (`waits` counts in
//! [`crate::metrics`]). `snapshot` uses `pg` and never `replication`;
//! `replication` uses both (it runs the initial copy and hands backfills to
//! the snapshot actor). The WAL monitor and `pgcdc check` reach PostgreSQL
//! through `pg` only.
//!
//! [`Type`]: tokio_postgres::types::Type

pub mod catalog;
mod config;
mod connect;
pub(crate) mod quote;
mod server_name;
pub(crate) mod session;
pub mod tls;
pub mod types;
pub(crate) mod values;
pub mod waits;

pub use config::{parse_table_name, PostgresConfig};
pub(crate) use connect::chain;
pub use connect::{connect, connect_replication, sql_security};
pub use tls::{Security, SslMode, TlsError};

use crate::error::{ErrorClass, ExitCode};

/// What can go wrong talking to PostgreSQL outside the replication stream.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// PostgreSQL is not set up for pgcdc; the message says how to fix it.
    #[error("postgresql is not ready: {0}")]
    NotReady(String),
    /// Could not connect.
    #[error("cannot connect to postgresql: {}", connect::chain(.0))]
    Connect(#[source] tokio_postgres::Error),
    /// A SQL statement failed.
    #[error("postgresql: {}", connect::chain(.0))]
    Sql(#[from] tokio_postgres::Error),
    /// TLS failed or was refused, in words that say what to change.
    #[error("cannot connect to postgresql securely: {0}")]
    Tls(#[from] TlsError),
    /// The replication session could not be opened.
    #[error("cannot open a replication session: {0}")]
    Replication(#[source] pgwire_replication::PgWireError),
}

impl PgError {
    /// The one classification point for PostgreSQL errors: a setup problem
    /// ends the process, anything else is worth a retry.
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::NotReady(_) => ErrorClass::Fatal(ExitCode::SourceNotReady),
            Self::Tls(e) => e.class(),
            Self::Connect(_) | Self::Sql(_) | Self::Replication(_) => ErrorClass::Transient,
        }
    }

    /// Whether the error means PostgreSQL could not be reached.
    pub fn is_unreachable(&self) -> bool {
        match self {
            Self::Connect(_) => true,
            Self::Replication(e) => e.is_io(),
            _ => false,
        }
    }
}
