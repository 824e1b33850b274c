//! Comparing one row with its mirror document: pure, no I/O.

use serde_json::{Map, Value};

use crate::lsn::Lsn;

/// The field the sink adds to every mirror document (not a column).
pub(crate) const CDC_FIELD: &str = "_cdc";

/// What a comparison found.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// The row is in the table, its document is not in the mirror.
    Missing,
    /// A document is in the mirror, its row is not in the table.
    Extra,
    /// Both exist and these columns differ.
    Stale,
    /// The document holds a change committed after the snapshot: not comparable, not drift.
    Newer,
}

/// The verdict on one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Row and document agree (or neither exists).
    Equal,
    /// They differ: how, and the columns that differ (stale only).
    Differs(Kind, Vec<String>),
}

/// The commit LSN of the change a document holds (`_cdc.lsn`); zero if absent.
pub(crate) fn doc_lsn(doc: &Map<String, Value>) -> Lsn {
    let lsn = doc.get(CDC_FIELD).and_then(|c| c.get("lsn"));
    Lsn(lsn.and_then(Value::as_u64).unwrap_or(0))
}

/// Compare the `row` of a table read at `at` (rendered as events render it)
/// with its mirror `doc`; either may be absent.
pub fn compare(
    row: Option<&Map<String, Value>>,
    doc: Option<&Map<String, Value>>,
    at: Lsn,
) -> Verdict {
    let doc = match doc {
        None if row.is_none() => return Verdict::Equal,
        None => return Verdict::Differs(Kind::Missing, Vec::new()),
        Some(d) if doc_lsn(d) > at => return Verdict::Differs(Kind::Newer, Vec::new()),
        Some(d) => d,
    };
    let Some(row) = row else {
        return Verdict::Differs(Kind::Extra, Vec::new());
    };
    let mut columns: Vec<String> = row
        .iter()
        .filter(|(c, v)| doc.get(*c) != Some(*v))
        .map(|(c, _)| c.clone())
        .collect();
    columns.extend(
        doc.keys()
            .filter(|c| *c != CDC_FIELD && !row.contains_key(*c))
            .cloned(),
    );
    match columns.is_empty() {
        true => Verdict::Equal,
        false => Verdict::Differs(Kind::Stale, columns),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn equal_rows_ignore_the_cdc_field() {
        let row = map(json!({"id": 1, "n": "a"}));
        let doc = map(json!({"id": 1, "n": "a", "_cdc": {"lsn": 10, "seq": 0}}));
        assert_eq!(compare(Some(&row), Some(&doc), Lsn(10)), Verdict::Equal);
        assert_eq!(compare(None, None, Lsn(10)), Verdict::Equal);
    }

    #[test]
    fn differences_are_classified_and_name_the_columns() {
        let row = map(json!({"id": 1, "n": "a", "m": 2}));
        let doc = map(json!({"id": 1, "n": "b", "old": 1, "_cdc": {"lsn": 5}}));
        assert_eq!(
            compare(Some(&row), Some(&doc), Lsn(10)),
            Verdict::Differs(Kind::Stale, vec!["m".into(), "n".into(), "old".into()])
        );
        assert_eq!(
            compare(Some(&row), None, Lsn(10)),
            Verdict::Differs(Kind::Missing, vec![])
        );
        assert_eq!(
            compare(None, Some(&doc), Lsn(10)),
            Verdict::Differs(Kind::Extra, vec![])
        );
    }

    #[test]
    fn a_document_newer_than_the_snapshot_is_not_compared() {
        let row = map(json!({"id": 1, "n": "a"}));
        let doc = map(json!({"id": 1, "n": "z", "_cdc": {"lsn": 11}}));
        assert_eq!(
            compare(Some(&row), Some(&doc), Lsn(10)),
            Verdict::Differs(Kind::Newer, vec![])
        );
        assert_eq!(
            compare(None, Some(&doc), Lsn(10)),
            Verdict::Differs(Kind::Newer, vec![])
        );
    }
}
