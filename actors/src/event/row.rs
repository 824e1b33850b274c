//! A change's row: JSON values, or the values pgoutput sent, in PostgreSQL's
//! text format, rendered to JSON only as the row is written
//! ([`Row::write_json`]), with no JSON value built per column. The
//! snapshot's copied rows are written by the same [`Columns::write_object`].

use std::borrow::Cow;
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use serde_json::{Map, Value};

use crate::pg::types::Rule;
use crate::pg::values::{render, to_json_bytes, write_rendered};
use crate::replication::decode::TupleValue;

/// JSON null.
const NULL: &[u8] = b"null";

/// The columns of a relation, as its rows are rendered: built once per
/// Relation message and shared by the rows.
#[derive(Debug, PartialEq)]
pub struct Columns {
    /// Column names, in the relation's order.
    names: Vec<String>,
    /// How each column's values render, in the same order.
    rules: Vec<Rule>,
    /// Column positions in name order: objects are written with their keys
    /// sorted, as a `serde_json::Map` (a BTreeMap) serializes them.
    order: Vec<usize>,
    /// Each column's name as a JSON string followed by `:`, by position.
    labels: Vec<Vec<u8>>,
}

impl Columns {
    /// The columns `names` with their rendering `rules` (a column without
    /// one renders as text).
    pub fn new(names: Vec<String>, rules: &[Rule]) -> Self {
        let rules = (0..names.len())
            .map(|i| rules.get(i).cloned().unwrap_or(Rule::Text))
            .collect();
        let mut order: Vec<usize> = (0..names.len()).collect();
        order.sort_by(|a, b| names[*a].cmp(&names[*b]));
        let labels = names
            .iter()
            .map(|n| {
                let mut label = Vec::with_capacity(n.len() + 3);
                to_json_bytes(n, &mut label);
                label.push(b':');
                label
            })
            .collect();
        Self {
            names,
            rules,
            order,
            labels,
        }
    }

    /// Column names, in the relation's order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The position of column `name`.
    pub fn position(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }

    /// The columns named `names` that are here (each once), with their
    /// rules, and their positions among these columns.
    pub fn select(&self, names: &[String]) -> (Columns, Vec<usize>) {
        let mut positions: Vec<usize> = Vec::with_capacity(names.len());
        for i in names.iter().filter_map(|n| self.position(n)) {
            if !positions.contains(&i) {
                positions.push(i);
            }
        }
        let pick = |i: &usize| (self.names[*i].clone(), self.rules[*i].clone());
        let (names, rules): (Vec<String>, Vec<Rule>) = positions.iter().map(pick).unzip();
        (Columns::new(names, &rules), positions)
    }

    /// Append a row of these columns as a JSON object to `out`, `cell(i)`
    /// being its value at position `i`: keys in name order, absent values
    /// left out, each text rendered by its column's rule.
    pub fn write_object<'a>(&self, cell: impl Fn(usize) -> Cell<'a>, out: &mut Vec<u8>) {
        out.push(b'{');
        let mut first = true;
        for &i in &self.order {
            let value = cell(i);
            if matches!(value, Cell::Absent) {
                continue;
            }
            if !first {
                out.push(b',');
            }
            first = false;
            out.extend_from_slice(&self.labels[i]);
            match value {
                Cell::Text(text) => write_rendered(&self.rules[i], &text, out),
                Cell::Null => out.extend_from_slice(NULL),
                Cell::Binary(bytes) => to_json_bytes(&BASE64.encode(bytes), out),
                Cell::Absent => {}
            }
        }
        out.push(b'}');
    }
}

/// One value of a row written by [`Columns::write_object`].
pub enum Cell<'a> {
    /// Not sent (an unchanged TOASTed value, a non-key column of an old key
    /// tuple): left out of the object.
    Absent,
    /// SQL NULL.
    Null,
    /// The value in PostgreSQL's text format.
    Text(Cow<'a, [u8]>),
    /// The value in binary format (never requested): a base64 string.
    Binary(&'a [u8]),
}

/// A row as pgoutput sent it: one value per column of `columns`. A column
/// whose value is [`TupleValue::UnchangedToast`] was not sent (an unchanged
/// TOASTed value, or a non-key column of an old key tuple) and is absent
/// from the row, never a placeholder.
#[derive(Debug, Clone, PartialEq)]
pub struct TextRow {
    /// The relation's columns.
    pub columns: Arc<Columns>,
    /// The values, in column order.
    pub values: Vec<TupleValue>,
}

impl TextRow {
    /// The JSON value of the column at `i`; `None` if absent.
    pub fn value_at(&self, i: usize) -> Option<Value> {
        let rule = self.columns.rules.get(i)?;
        Some(match self.values.get(i)? {
            TupleValue::UnchangedToast => return None,
            TupleValue::Null => Value::Null,
            TupleValue::Text(text) => render(rule, text),
            // Never requested, but must not be lost or misread.
            TupleValue::Binary(bytes) => Value::String(BASE64.encode(bytes)),
        })
    }

    /// Append the row as a JSON object to `out`: the bytes serializing
    /// [`Self::to_map`]'s object gives.
    fn write_json(&self, out: &mut Vec<u8>) {
        let cell = |i: usize| match self.values.get(i) {
            None | Some(TupleValue::UnchangedToast) => Cell::Absent,
            Some(TupleValue::Null) => Cell::Null,
            Some(TupleValue::Text(text)) => Cell::Text(Cow::Borrowed(text)),
            Some(TupleValue::Binary(bytes)) => Cell::Binary(bytes),
        };
        self.columns.write_object(cell, out);
    }

    /// The row as a JSON object.
    fn to_map(&self) -> Map<String, Value> {
        (self.columns.names.iter().enumerate())
            .filter_map(|(i, name)| Some((name.clone(), self.value_at(i)?)))
            .collect()
    }

    /// About the bytes of the row's names and texts.
    fn bytes(&self) -> usize {
        self.values
            .iter()
            .zip(&self.columns.labels)
            .map(|(v, label)| match v {
                TupleValue::UnchangedToast => 0,
                TupleValue::Null => label.len() + NULL.len(),
                TupleValue::Text(b) | TupleValue::Binary(b) => label.len() + b.len(),
            })
            .sum()
    }
}

/// The row of a change (its `before` or `after`).
#[derive(Debug, Clone, PartialEq)]
pub enum Row {
    /// Values as JSON.
    Json(Map<String, Value>),
    /// Values as pgoutput sent them (the stream's rows).
    Text(TextRow),
}

impl serde::Serialize for Row {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.to_map().serialize(serializer)
    }
}

impl From<Map<String, Value>> for Row {
    fn from(map: Map<String, Value>) -> Self {
        Row::Json(map)
    }
}

/// Bytes counted for a JSON value that is not a string, array or object
/// (a number, a boolean, null): about its text length, enough for an estimate.
const SCALAR_BYTES: usize = 8;

impl Row {
    /// The value of column `name`; `None` if the row does not have it.
    pub fn get(&self, name: &str) -> Option<Value> {
        match self {
            Row::Json(map) => map.get(name).cloned(),
            Row::Text(row) => row.value_at(row.columns.position(name)?),
        }
    }

    /// The row as a JSON object.
    pub fn to_map(&self) -> Cow<'_, Map<String, Value>> {
        match self {
            Row::Json(map) => Cow::Borrowed(map),
            Row::Text(row) => Cow::Owned(row.to_map()),
        }
    }

    /// The row as a JSON object to change in place (a text row is rendered
    /// first).
    pub fn map_mut(&mut self) -> &mut Map<String, Value> {
        if let Row::Text(row) = self {
            *self = Row::Json(row.to_map());
        }
        match self {
            Row::Json(map) => map,
            Row::Text(_) => unreachable!("a text row was just rendered"),
        }
    }

    /// Append the row as a JSON object to `out`, keys in name order.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        match self {
            Row::Json(map) => to_json_bytes(map, out),
            Row::Text(row) => row.write_json(out),
        }
    }

    /// The approximate size of the row: the lengths of its names and
    /// texts, found without encoding anything.
    pub fn bytes(&self) -> usize {
        match self {
            Row::Json(map) => object_bytes(map),
            Row::Text(row) => row.bytes(),
        }
    }
}

/// Approximate bytes of a JSON object's keys and values.
fn object_bytes(object: &Map<String, Value>) -> usize {
    object.iter().map(|(k, v)| k.len() + value_bytes(v)).sum()
}

/// Approximate bytes of one JSON value.
fn value_bytes(value: &Value) -> usize {
    match value {
        Value::String(s) => s.len(),
        Value::Array(items) => items.iter().map(value_bytes).sum(),
        Value::Object(object) => object_bytes(object),
        Value::Null | Value::Bool(_) | Value::Number(_) => SCALAR_BYTES,
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use serde_json::json;
    use tokio_postgres::types::Type;

    use super::*;

    fn text(s: &[u8]) -> TupleValue {
        TupleValue::Text(Bytes::copy_from_slice(s))
    }

    #[test]
    fn a_text_row_is_written_as_its_object_serializes() {
        let builtin = |ty: Type| Rule::builtin(ty.oid()).unwrap();
        let point = Rule::Composite(
            vec![
                ("x".to_owned(), builtin(Type::INT4)),
                ("label".to_owned(), Rule::Text),
            ]
            .into(),
        );
        let columns: Vec<(&str, Rule, TupleValue)> = vec![
            ("id", builtin(Type::INT4), text(b"7")),
            ("b", builtin(Type::BOOL), text(b"t")),
            (
                "a \"quoted\"\n",
                Rule::Text,
                text("é \"x\"\\\u{1}".as_bytes()),
            ),
            ("Z", builtin(Type::FLOAT8), text(b"NaN")),
            (
                "aa",
                builtin(Type::NUMERIC),
                text(b"12345678901234567890.5"),
            ),
            ("doc", builtin(Type::JSONB), text(br#"{"k": [1, 2.50]}"#)),
            ("raw", builtin(Type::BYTEA), text(b"\\x6869")),
            (
                "at",
                builtin(Type::TIMESTAMPTZ),
                text(b"2026-12-01 10:00:00+00"),
            ),
            ("ints", builtin(Type::INT4_ARRAY), text(b"{1,NULL,3}")),
            ("p", point, text(b"(3,\"a b\")")),
            ("h", Rule::Hstore, text(br#""k"=>"v", "n"=>NULL"#)),
            ("bad utf8", Rule::Text, text(b"a\xffb")),
            ("none", Rule::Text, TupleValue::Null),
            (
                "bin",
                Rule::Text,
                TupleValue::Binary(Bytes::from_static(b"ab")),
            ),
            ("toast", Rule::Text, TupleValue::UnchangedToast),
        ];
        let names = columns.iter().map(|(n, ..)| n.to_string()).collect();
        let rules: Vec<Rule> = columns.iter().map(|(_, r, _)| r.clone()).collect();
        let row = Row::Text(TextRow {
            columns: Arc::new(Columns::new(names, &rules)),
            values: columns.into_iter().map(|(.., v)| v).collect(),
        });
        let object = row.to_map().into_owned();
        assert_eq!(object.len(), 14, "the unchanged TOAST column is absent");
        assert_eq!(object["id"], json!(7));
        assert_eq!(object["p"], json!({"x": 3, "label": "a b"}));
        assert_eq!(object["bin"], json!("YWI="));
        assert_eq!(row.get("ints"), Some(json!([1, null, 3])));
        assert_eq!(row.get("toast"), None);
        let mut written = Vec::new();
        row.write_json(&mut written);
        assert_eq!(
            String::from_utf8(written).unwrap(),
            serde_json::to_string(&object).unwrap()
        );
        assert!(row.bytes() > 100);
        // Rendered in place for the value modes, the same object.
        let mut changed = row.clone();
        assert_eq!(*changed.map_mut(), object);
    }

    #[test]
    fn selected_columns_keep_their_rules_and_positions_each_once() {
        let int4 = Rule::builtin(Type::INT4.oid()).unwrap();
        let columns = Columns::new(
            vec!["a".into(), "b".into(), "c".into()],
            &[Rule::Text, int4],
        );
        let names = ["c", "b", "missing", "c"].map(String::from);
        let (selected, positions) = columns.select(&names);
        assert_eq!(positions, [2, 1]);
        assert_eq!(selected.names(), ["c", "b"]);
        let row = TextRow {
            columns: Arc::new(selected),
            values: vec![text(b"x"), text(b"7")],
        };
        let mut written = Vec::new();
        Row::Text(row).write_json(&mut written);
        assert_eq!(written, br#"{"b":7,"c":"x"}"#);
    }

    #[test]
    fn a_row_without_values_or_with_only_absent_ones_is_an_empty_object() {
        let columns = Arc::new(Columns::new(vec!["a".into(), "b".into()], &[]));
        for values in [vec![], vec![TupleValue::UnchangedToast; 2]] {
            let mut written = Vec::new();
            let row = TextRow {
                columns: columns.clone(),
                values,
            };
            Row::Text(row).write_json(&mut written);
            assert_eq!(written, b"{}");
        }
    }
}
