//! Command-line interface.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// pgcdc: stream committed PostgreSQL changes into Kafka, crash-safe.
#[derive(Debug, Parser)]
#[command(name = "pgcdc", version, about)]
pub struct Cli {
    /// Configuration file (TOML). Environment variables PGCDC_<SECTION>__<KEY> override it.
    #[arg(
        long,
        short,
        global = true,
        env = "PGCDC_CONFIG",
        default_value = "config/pgcdc.toml"
    )]
    pub config: PathBuf,
    /// Directory of local state; overrides `state_dir`.
    #[arg(long, global = true)]
    pub state_dir: Option<PathBuf>,
    /// Log level filter; overrides `log.level`.
    #[arg(long, global = true)]
    pub log_level: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Stream changes from PostgreSQL to Kafka until SIGTERM or SIGINT.
    Run,
    /// Consume the change topics and keep Elasticsearch/OpenSearch mirror indices in step.
    EsSink,
    /// Validate the configuration and check PostgreSQL, the slot and Kafka; print what is wrong.
    Check,
    /// Print the checkpoint, copy progress and the replication slot's state.
    Status,
    /// Copy tables again while streaming continues (watermark backfill); the
    /// running daemon picks the request up from the WAL.
    Snapshot {
        /// A configured table, `schema.table` (repeatable).
        #[arg(long = "table", required = true)]
        tables: Vec<String>,
    },
}
