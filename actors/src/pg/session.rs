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

/// Settings the replication session does not need: it never parses a
/// literal pgcdc built nor reads a table, so only SQL sessions get these.
const SQL_ONLY: [&str; 2] = ["standard_conforming_strings", "row_security"];

/// The startup `options` of the replication session (`-c name=value …`).
pub(crate) fn startup_options() -> String {
    SETTINGS
        .iter()
        .filter(|(name, _)| !SQL_ONLY.contains(name))
        .map(|(name, value)| format!("-c {name}={value}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The settings as one batch of `SET` statements.
fn set_statements() -> String {
    SETTINGS
        .iter()
        .map(|(name, value)| format!("SET {name} = '{value}';"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Apply the settings to a SQL session.
pub(crate) async fn apply(sql: &Client) -> Result<(), PgError> {
    sql.batch_execute(&set_statements()).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replication_options_are_the_rendering_settings() {
        assert_eq!(
            startup_options(),
            "-c datestyle=ISO,YMD -c timezone=UTC -c intervalstyle=iso_8601 \
             -c extra_float_digits=3 -c bytea_output=hex -c lc_monetary=C"
        );
    }

    #[test]
    fn sql_sessions_get_every_setting() {
        let sql = set_statements();
        for (name, value) in SETTINGS {
            assert!(sql.contains(&format!("SET {name} = '{value}';")), "{sql}");
        }
        assert_eq!(sql.matches("SET ").count(), SETTINGS.len());
    }
}
