//! pgoutput tuples as rows ([`TextRow`]): their values stay in
//! PostgreSQL's text format, rendered by their column type's rule
//! ([`crate::pg::values`]) only as the row is written.

use std::sync::Arc;

use super::decode::{Relation, Tuple, TupleValue};
use crate::event::{Columns, TextRow};
use crate::pg::types::Rule;

/// The columns of `relation` with their rendering `rules` (in column
/// order; a column without one renders as text).
pub fn columns(relation: &Relation, rules: &[Rule]) -> Columns {
    let names = relation.columns.iter().map(|c| c.name.clone()).collect();
    Columns::new(names, rules)
}

/// A whole tuple as a row of `columns`, and the names of its
/// unchanged-TOAST columns: they are absent from the row, so a marker can
/// never masquerade as a real value. The caller checks that the tuple's
/// width matches the relation's.
pub fn text_row(columns: &Arc<Columns>, tuple: Tuple) -> (TextRow, Vec<String>) {
    let unchanged = (tuple.0.iter().zip(columns.names()))
        .filter(|(v, _)| matches!(v, TupleValue::UnchangedToast))
        .map(|(_, name)| name.clone())
        .collect();
    let row = TextRow {
        columns: columns.clone(),
        values: tuple.0,
    };
    (row, unchanged)
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use serde_json::{json, Value};

    use super::super::decode::Column;
    use super::*;
    use crate::event::Row;

    /// Built-in type OIDs, from PostgreSQL's `pg_type.dat`.
    mod oid {
        /// `bytea`.
        pub const BYTEA: u32 = 17;
        /// `int4` (integer).
        pub const INT4: u32 = 23;
        /// `text`.
        pub const TEXT: u32 = 25;
    }

    fn relation(types: &[(&str, u32)]) -> Relation {
        Relation {
            oid: 1,
            namespace: "public".into(),
            name: "t".into(),
            replica_identity: b'd',
            columns: types
                .iter()
                .map(|(name, type_oid)| Column {
                    is_key: false,
                    name: (*name).into(),
                    type_oid: *type_oid,
                    type_modifier: -1,
                })
                .collect(),
        }
    }

    #[test]
    fn tuples_become_objects_without_unchanged_toast() {
        let rel = relation(&[
            ("id", oid::INT4),
            ("note", oid::TEXT),
            ("big", oid::TEXT),
            ("raw", oid::BYTEA),
        ]);
        let tuple = Tuple(vec![
            TupleValue::Text(Bytes::from_static(b"7")),
            TupleValue::Null,
            TupleValue::UnchangedToast,
            TupleValue::Binary(Bytes::from_static(b"ab")),
        ]);
        let rules: Vec<Rule> = rel
            .columns
            .iter()
            .map(|c| Rule::builtin(c.type_oid).unwrap_or(Rule::Text))
            .collect();
        let columns = Arc::new(columns(&rel, &rules));
        let (row, unchanged) = text_row(&columns, tuple);
        let row = Row::Text(row);
        let expected = json!({"id": 7, "note": null, "raw": "YWI="});
        assert_eq!(Value::Object(row.to_map().into_owned()), expected);
        let mut written = Vec::new();
        row.write_json(&mut written);
        assert_eq!(written, serde_json::to_vec(&expected).unwrap());
        assert_eq!(unchanged, vec!["big".to_owned()]);
    }
}
