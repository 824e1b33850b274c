//! `[audit]`: which events the audit log keeps and for how long.

use crate::error::ConfigError;
use serde::Deserialize;
use tracing::Level;

/// `[audit]` configuration section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Write the audit log (`<state_dir>/audit.db`) in `pgcdc run` and `pgcdc es-sink`.
    pub enabled: bool,
    /// Least severe level written to `logs`: trace, debug, info, warn or error.
    /// Dead letters are written whatever the level.
    pub level: String,
    /// Rows older than this many days are deleted from both tables.
    pub retention_days: u32,
    /// Most rows kept in `logs`; the oldest are deleted first.
    pub max_rows: u64,
    /// Keep each dead letter's whole payload (row data) in `dead_letters`;
    /// off: table, key, LSN and reason only (the dead-letter topic keeps the payload).
    pub dead_letter_payloads: bool,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            level: "info".into(),
            retention_days: 14,
            max_rows: 1_000_000,
            dead_letter_payloads: false,
        }
    }
}

impl AuditConfig {
    /// Every invalid field, by path.
    pub fn validate(&self, errors: &mut Vec<ConfigError>) {
        if parse_level(&self.level).is_none() {
            errors.push(ConfigError::new(
                "audit.level",
                format!(
                    "{:?} is not one of trace, debug, info, warn, error",
                    self.level
                ),
            ));
        }
        if self.retention_days == 0 {
            errors.push(ConfigError::new(
                "audit.retention_days",
                "must be at least 1",
            ));
        }
        if self.max_rows == 0 {
            errors.push(ConfigError::new("audit.max_rows", "must be at least 1"));
        }
    }

    /// The configured level; `info` if it does not parse (`validate` reports that).
    pub fn min_level(&self) -> Level {
        parse_level(&self.level).unwrap_or(Level::INFO)
    }
}

/// A level name as written in configuration and on the command line, any case.
pub fn parse_level(name: &str) -> Option<Level> {
    match name.to_ascii_lowercase().as_str() {
        "trace" => Some(Level::TRACE),
        "debug" => Some(Level::DEBUG),
        "info" => Some(Level::INFO),
        "warn" | "warning" => Some(Level::WARN),
        "error" => Some(Level::ERROR),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_named() {
        let mut errors = Vec::new();
        let defaults = AuditConfig::default();
        defaults.validate(&mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(defaults.min_level(), Level::INFO);
        let bad = AuditConfig {
            level: "loud".into(),
            retention_days: 0,
            max_rows: 0,
            ..Default::default()
        };
        bad.validate(&mut errors);
        let keys = crate::error_keys(&errors);
        assert_eq!(
            keys,
            ["audit.level", "audit.retention_days", "audit.max_rows"]
        );
        assert!(errors[0].message.contains("\"loud\""), "{errors:?}");
    }

    #[test]
    fn levels_parse_in_any_case() {
        assert_eq!(parse_level("WARN"), Some(Level::WARN));
        assert_eq!(parse_level("Error"), Some(Level::ERROR));
        assert_eq!(parse_level("trace"), Some(Level::TRACE));
        assert_eq!(parse_level("off"), None);
        assert_eq!(parse_level(""), None);
    }
}
