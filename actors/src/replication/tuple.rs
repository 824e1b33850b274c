//! pgoutput tuples to JSON rows, each value by its column type's rule
//! ([`crate::pg::values`]).

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use serde_json::{Map, Value};

use super::decode::{Relation, Tuple, TupleValue};
use crate::pg::types::Rule;
use crate::pg::values::render;

/// Convert a whole tuple to a JSON object keyed by column name, using the
/// relation's columns and their rendering `rules` (in column order; a
/// column without one renders as text). Unchanged-TOAST columns are left out of the object and
/// returned by name, so a marker can never masquerade as a real value.
/// Columns and values are paired in order; the caller checks that the
/// tuple's width matches the relation's.
pub fn tuple_to_json(
    relation: &Relation,
    rules: &[Rule],
    tuple: &Tuple,
) -> (Map<String, Value>, Vec<String>) {
    let mut row = Map::new();
    let mut unchanged = Vec::new();
    for (i, (col, val)) in relation.columns.iter().zip(&tuple.0).enumerate() {
        let v = match val {
            TupleValue::Null => Value::Null,
            TupleValue::UnchangedToast => {
                unchanged.push(col.name.clone());
                continue;
            }
            TupleValue::Text(t) => render(rules.get(i).unwrap_or(&Rule::Text), t),
            // Never requested, but must not be lost or misread.
            TupleValue::Binary(b) => Value::String(BASE64.encode(b)),
        };
        row.insert(col.name.clone(), v);
    }
    (row, unchanged)
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use serde_json::json;

    use super::super::decode::Column;
    use super::*;

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
        let (row, unchanged) = tuple_to_json(&rel, &rules, &tuple);
        assert_eq!(
            Value::Object(row),
            json!({"id": 7, "note": null, "raw": "YWI="})
        );
        assert_eq!(unchanged, vec!["big".to_owned()]);
    }
}
