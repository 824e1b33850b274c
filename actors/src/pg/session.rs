//! Session settings pgcdc relies on, in one list, for both connection kinds:
//! the replication session gets them as startup options, SQL sessions that
//! read rows get them as `SET` statements.
//!
//! The value renderer ([`super::values`]) expects these text forms (ISO dates,
//! UTC, ISO 8601 intervals, round-trip floats, hex bytea, `C` money), and the literal
//! quoting ([`super::quote`]) expects standard-conforming strings. SQL
//! sessions also turn `row_security` off: a read that a row-level security
//! policy would filter then fails instead of returning fewer rows (the
//! stream sends every row's changes whatever the policies say).
//!
//! Every session, the replication one and every SQL one, also turns
//! PostgreSQL's statement, lock and idle-in-transaction timeouts off
//! ([`TIMEOUTS`]): a database or role default meant for applications
//! (`ALTER DATABASE … SET statement_timeout = '30s'`) would otherwise cancel
//! a slot creation waiting for open transactions, a copy waiting for a table
//! lock, or end a snapshot reader idle in its transaction while Kafka is
//! slow, and each retry would meet the same fate. pgcdc names what it waits
//! for instead ([`super::waits`]).

use tokio_postgres::Client;

use super::PgError;

/// The settings as (name, value). Values contain no whitespace or quotes, so
/// they need no escaping in either form.
const SETTINGS: [(&str, &str); 8] = [
    ("datestyle", "ISO,YMD"),
    ("timezone", "UTC"),
    ("intervalstyle", "iso_8601"),
    ("extra_float_digits", "3"),
    ("bytea_output", "hex"),
    // money text without locale-specific symbols or separators: `-$1,000.00`.
    ("lc_monetary", "C"),
    ("standard_conforming_strings", "on"),
    ("row_security", "off"),
];

/// The timeouts pgcdc's sessions turn off (see the module doc).
const TIMEOUTS: [(&str, &str); 3] = [
    ("statement_timeout", "0"),
    ("lock_timeout", "0"),
    ("idle_in_transaction_session_timeout", "0"),
];

/// Settings the replication session does not need: it never parses a
/// literal pgcdc built nor reads a table, so only SQL sessions get these.
const SQL_ONLY: [&str; 2] = ["standard_conforming_strings", "row_security"];

/// The startup `options` of the replication session (`-c name=value …`).
pub(crate) fn startup_options() -> String {
    SETTINGS
        .iter()
        .filter(|(name, _)| !SQL_ONLY.contains(name))
        .chain(&TIMEOUTS)
        .map(|(name, value)| format!("-c {name}={value}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `settings` as one batch of `SET` statements.
fn set_statements(settings: &[(&str, &str)]) -> String {
    settings
        .iter()
        .map(|(name, value)| format!("SET {name} = '{value}';"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Apply the settings to a SQL session that reads rows.
pub(crate) async fn apply(sql: &Client) -> Result<(), PgError> {
    sql.batch_execute(&set_statements(&SETTINGS)).await?;
    Ok(())
}

/// Turn the timeouts off on a new SQL session (every one [`super::connect`] opens).
pub(super) async fn without_timeouts(sql: &Client) -> Result<(), tokio_postgres::Error> {
    sql.batch_execute(&set_statements(&TIMEOUTS)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replication_options_are_the_rendering_settings_and_no_timeouts() {
        assert_eq!(
            startup_options(),
            "-c datestyle=ISO,YMD -c timezone=UTC -c intervalstyle=iso_8601 \
             -c extra_float_digits=3 -c bytea_output=hex -c lc_monetary=C \
             -c statement_timeout=0 -c lock_timeout=0 -c idle_in_transaction_session_timeout=0"
        );
    }

    #[test]
    fn sql_sessions_get_every_setting() {
        let sql = set_statements(&SETTINGS);
        for (name, value) in SETTINGS {
            assert!(sql.contains(&format!("SET {name} = '{value}';")), "{sql}");
        }
        assert_eq!(sql.matches("SET ").count(), SETTINGS.len());
        assert_eq!(
            set_statements(&TIMEOUTS),
            "SET statement_timeout = '0'; SET lock_timeout = '0'; \
             SET idle_in_transaction_session_timeout = '0';"
        );
    }
}
