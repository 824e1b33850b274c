//! `[postgres]`: the source database, its slot, publication and tables.
//!
//! It lives in the PostgreSQL layer because every connection (replication,
//! snapshot readers, the WAL monitor, `pgcdc check`) is built from it.

use crate::error::ConfigError;
use std::path::PathBuf;

use serde::Deserialize;

use super::tls::{self, SslMode};
use crate::secret::Secret;

/// PostgreSQL's default port.
const DEFAULT_PORT: u16 = 5432;
/// Default seconds to wait for a connection: long enough for a busy server,
/// short enough that a dead one is reported promptly.
const DEFAULT_CONNECT_TIMEOUT_SECS: u64 = 10;
/// Default seconds between standby status updates: well inside PostgreSQL's
/// default `wal_sender_timeout` of 60 s.
const DEFAULT_STATUS_INTERVAL_SECS: u64 = 10;
/// Default most events per batch: big enough to amortise a hand-over to the
/// producer, small enough to bound memory for huge transactions.
const DEFAULT_MAX_BATCH_EVENTS: usize = 1000;
/// Default most bytes of row data per batch (64 MiB): a few wide rows close
/// a batch long before `max_batch_events` would, so a batch of huge values
/// cannot take the memory of a thousand of them.
const DEFAULT_MAX_BATCH_BYTES: usize = 64 << 20;
/// Longest identifier PostgreSQL keeps (`NAMEDATALEN - 1`).
const IDENTIFIER_MAX_LEN: usize = 63;

/// `[postgres]` configuration section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// Host name, IP address, or a Unix socket directory (starting with `/`).
    pub host: String,
    /// Port.
    pub port: u16,
    /// Role with the REPLICATION attribute (and SELECT on the tables).
    pub user: String,
    /// Password of `user`; never logged.
    pub password: Secret,
    /// Database to capture.
    pub database: String,
    /// Transport security, as libpq's `sslmode`: `disable`, `prefer`,
    /// `require`, `verify-ca` or `verify-full`.
    pub sslmode: SslMode,
    /// PEM file of the CA(s) that verify the server (verify-ca, verify-full);
    /// unset: the Mozilla root set.
    pub sslrootcert: Option<PathBuf>,
    /// PEM client certificate, for servers that require one (with `sslkey`).
    pub sslcert: Option<PathBuf>,
    /// PEM private key of `sslcert`.
    pub sslkey: Option<PathBuf>,
    /// Logical replication slot (created with pgoutput if missing).
    pub slot: String,
    /// Publication (created for `tables` if missing, extended if it lacks some).
    pub publication: String,
    /// Tables to capture: `schema.table` or `table` (schema `public`); quote
    /// mixed-case names as in SQL: `"Sales"."Order"`.
    pub tables: Vec<String>,
    /// Seconds to wait for a connection.
    pub connect_timeout_secs: u64,
    /// Seconds between standby status updates to the server.
    pub status_interval_secs: u64,
    /// Most change events in one batch handed to Kafka (large transactions are split).
    pub max_batch_events: usize,
    /// Most bytes of row data (as received from PostgreSQL) in one batch; a
    /// single change larger than this is a batch of its own.
    pub max_batch_bytes: usize,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self {
            host: "localhost".into(),
            port: DEFAULT_PORT,
            user: "postgres".into(),
            password: Secret::default(),
            database: "postgres".into(),
            sslmode: SslMode::default(),
            sslrootcert: None,
            sslcert: None,
            sslkey: None,
            slot: "pgcdc".into(),
            publication: "pgcdc".into(),
            tables: Vec::new(),
            connect_timeout_secs: DEFAULT_CONNECT_TIMEOUT_SECS,
            status_interval_secs: DEFAULT_STATUS_INTERVAL_SECS,
            max_batch_events: DEFAULT_MAX_BATCH_EVENTS,
            max_batch_bytes: DEFAULT_MAX_BATCH_BYTES,
        }
    }
}

impl PostgresConfig {
    /// Every invalid field, by path.
    pub fn validate(&self, errors: &mut Vec<ConfigError>) {
        if self.host.is_empty() {
            errors.push(ConfigError::new("postgres.host", "must not be empty"));
        }
        if self.port == 0 {
            errors.push(ConfigError::new("postgres.port", "must not be 0"));
        }
        tls::validate(self, errors);
        let bad_name = |n: &str| {
            n.is_empty()
                || n.len() > IDENTIFIER_MAX_LEN
                || !n
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        };
        if bad_name(&self.slot) {
            errors.push(ConfigError::new(
                "postgres.slot",
                format!(
                    "{:?} must be 1-{IDENTIFIER_MAX_LEN} of [a-z0-9_]",
                    self.slot
                ),
            ));
        }
        if self.publication.is_empty() {
            errors.push(ConfigError::new(
                "postgres.publication",
                "must not be empty",
            ));
        }
        if self.tables.is_empty() {
            errors.push(ConfigError::new(
                "postgres.tables",
                "list at least one table to capture",
            ));
        }
        for (i, t) in self.tables.iter().enumerate() {
            if let Err(e) = parse_table_name(t) {
                errors.push(ConfigError::new(
                    format!("postgres.tables[{i}]"),
                    e.to_string(),
                ));
            }
        }
        if self.connect_timeout_secs == 0 {
            errors.push(ConfigError::new(
                "postgres.connect_timeout_secs",
                "must be at least 1",
            ));
        }
        if self.status_interval_secs == 0 {
            errors.push(ConfigError::new(
                "postgres.status_interval_secs",
                "must be at least 1",
            ));
        }
        if self.max_batch_events == 0 {
            errors.push(ConfigError::new(
                "postgres.max_batch_events",
                "must be at least 1",
            ));
        }
        if self.max_batch_bytes == 0 {
            errors.push(ConfigError::new(
                "postgres.max_batch_bytes",
                "must be at least 1",
            ));
        }
    }
}

/// Split `schema.table` into its two identifiers, folding unquoted names to
/// lower case and unescaping quoted ones, as PostgreSQL does.
pub fn parse_table_name(s: &str) -> Result<(String, String), String> {
    let mut parts = Vec::new();
    let mut chars = s.trim().chars().peekable();
    loop {
        let mut ident = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        ident.push('"');
                    }
                    Some('"') => break,
                    Some(c) => ident.push(c),
                    None => return Err(format!("{s:?}: unterminated quoted identifier")),
                }
            }
        } else {
            while let Some(c) = chars.peek().copied().filter(|c| *c != '.') {
                if !(c.is_alphanumeric() || c == '_' || c == '$') {
                    return Err(format!("{s:?}: {c:?} needs a quoted identifier"));
                }
                ident.push(c.to_ascii_lowercase());
                chars.next();
            }
        }
        if ident.is_empty() {
            return Err(format!("{s:?}: empty identifier"));
        }
        parts.push(ident);
        match chars.next() {
            None => break,
            Some('.') => continue,
            Some(c) => return Err(format!("{s:?}: unexpected {c:?}")),
        }
    }
    match <[String; 2]>::try_from(parts) {
        Ok([schema, table]) => Ok((schema, table)),
        Err(parts) if parts.len() == 1 => Ok((
            "public".into(),
            parts.into_iter().next().unwrap_or_default(),
        )),
        Err(_) => Err(format!("{s:?}: expected schema.table")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_parse_like_postgres() {
        let p = |s: &str| parse_table_name(s).unwrap();
        assert_eq!(p("users"), ("public".into(), "users".into()));
        assert_eq!(p("Shop.Users"), ("shop".into(), "users".into()));
        assert_eq!(
            p(r#""Sales"."Order ""x""""#),
            ("Sales".into(), r#"Order "x""#.into())
        );
        assert_eq!(p(r#"public."a.b""#), ("public".into(), "a.b".into()));
    }

    #[test]
    fn bad_table_names_are_refused() {
        for bad in ["", "a.b.c", "a..b", "\"open", "bad name", "a.\"\""] {
            assert!(parse_table_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn validation_names_every_bad_key() {
        let c = PostgresConfig {
            slot: "Bad-Slot".into(),
            tables: vec!["x.y.z".into()],
            port: 0,
            max_batch_bytes: 0,
            ..Default::default()
        };
        let mut errors = Vec::new();
        c.validate(&mut errors);
        let keys = crate::error_keys(&errors);
        assert_eq!(
            keys,
            [
                "postgres.port",
                "postgres.slot",
                "postgres.tables[0]",
                "postgres.max_batch_bytes"
            ]
        );
    }
}
