//! Command-line interface.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tracing::Level;

use pgcdc_actors::audit::parse_level;

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
    /// Print the audit log (`<state_dir>/audit.db`), oldest first; works while pgcdc runs.
    Logs(LogsArgs),
    /// Compare tables with their mirror indices on a live system; exit 1 on drift.
    Verify(VerifyArgs),
}

/// Flags of `pgcdc verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// A configured table, `schema.table` (repeatable; default: every configured table).
    #[arg(long = "table")]
    pub tables: Vec<String>,
    /// Copy the drifted keys again through the watermark backfill (extra
    /// documents are deleted), then verify again.
    #[arg(long)]
    pub repair: bool,
    /// Also read each table's change topic from the beginning and check
    /// that the last change of every key equals the table (a Kafka section
    /// per table).
    #[arg(long)]
    pub kafka: bool,
    /// Output: `text` or `json` (one object per line and table).
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    pub format: String,
    /// Compare only this fraction (0 < f ≤ 1) of each table's key ranges, picked at random.
    #[arg(long, value_parser = parse_fraction)]
    pub sample: Option<f64>,
}

/// `--sample`: a fraction above 0 and at most 1.
pub fn parse_fraction(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(f) if f > 0.0 && f <= 1.0 => Ok(f),
        _ => Err(format!(
            "{text:?} is not a fraction above 0 and at most 1 (0.1 is 10%)"
        )),
    }
}

/// Flags of `pgcdc logs`.
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// Least severe level shown: trace, debug, info, warn or error (default: all).
    #[arg(long, value_parser = parse_level_arg)]
    pub level: Option<Level>,
    /// Only records from this recent past: a number and s, m, h or d (`90s`, `15m`, `1h`, `7d`).
    #[arg(long, value_parser = parse_since)]
    pub since: Option<Duration>,
    /// Print at most this many records: the newest ones.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub limit: u32,
    /// Print the dead letters (records the ES sink could not index) instead.
    #[arg(long)]
    pub dead_letters: bool,
}

/// `--since`: a whole number followed by `s`, `m`, `h` or `d`.
pub fn parse_since(text: &str) -> Result<Duration, String> {
    let bad = || {
        format!(
            "{text:?} is not a duration: use a whole number and s, m, h or d (90s, 15m, 1h, 7d)"
        )
    };
    let unit_secs: u64 = match text.chars().last() {
        Some('s') => 1,
        Some('m') => 60,
        Some('h') => 3600,
        Some('d') => 86_400,
        _ => return Err(bad()),
    };
    // The unit is one ASCII byte.
    let digits = &text[..text.len() - 1];
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    n.checked_mul(unit_secs)
        .map(Duration::from_secs)
        .ok_or_else(bad)
}

/// `--level`: a level name, any case.
pub fn parse_level_arg(text: &str) -> Result<Level, String> {
    parse_level(text)
        .ok_or_else(|| format!("{text:?} is not one of trace, debug, info, warn, error"))
}
