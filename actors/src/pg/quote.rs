//! Quoting names and values into SQL text, for the statements that cannot
//! take parameters (DDL, replication commands, keyset queries).

/// Quote an identifier for SQL.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Quote a string literal for SQL (standard-conforming strings, which
/// [`super::session`] turns on: only `'` needs doubling).
pub(crate) fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// `"schema"."name"`.
pub(crate) fn qualified(schema: &str, name: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident(r#"we"ird"#), r#""we""ird""#);
    }

    #[test]
    fn literals_double_single_quotes_only() {
        assert_eq!(quote_literal(r"o'k\n"), r"'o''k\n'");
        assert_eq!(qualified("Sales", "a\"b"), r#""Sales"."a""b""#);
    }
}
