//! The key of a mirror document whose row may not exist: read back from
//! its id (see [`naming`](crate::es_writer::naming)), else from its source.

use serde_json::{Map, Value};

use tokio_postgres::types::Type;

use crate::checkpoint::KeyText;
use crate::es_writer::naming::field;
use crate::pg::types::Rule;
use crate::pg::values::bytea_text;

/// Prefix of a hashed (too long) document id: its key cannot be read back from it.
const HASHED: &str = "sha256:";

/// The text of one key value rendered by `rule`, as PostgreSQL reads it
/// back: bytea's base64 as hex (`\x…`), an array as an array literal, a
/// string as is, a number or boolean as its JSON text; `None` for anything
/// else (objects: json, composites).
pub(crate) fn text(rule: &Rule, v: &Value) -> Option<String> {
    match (rule, v) {
        (Rule::Builtin(oid), Value::String(s)) if *oid == Type::BYTEA.oid() => bytea_text(s),
        (Rule::Array { elem, delim }, Value::Array(items)) => {
            let mut out = String::from("{");
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(char::from(*delim));
                }
                match item {
                    Value::Null => out.push_str("NULL"),
                    Value::Array(_) => out.push_str(&text(rule, item)?),
                    _ => {
                        out.push('"');
                        for c in text(elem, item)?.chars() {
                            if matches!(c, '"' | '\\') {
                                out.push('\\');
                            }
                            out.push(c);
                        }
                        out.push('"');
                    }
                }
            }
            out.push('}');
            Some(out)
        }
        (_, Value::String(s)) => Some(s.clone()),
        (_, Value::Number(_) | Value::Bool(_)) => Some(v.to_string()),
        _ => None,
    }
}

/// The key text of the document `id` with `source`, for a table keyed by
/// `columns` (names and rules, in key order): a one-column key is the id
/// itself (an array's JSON text for an array); a wider key
/// is the id's JSON array, whose values are in the order of the column
/// names sorted (the id is made from a JSON object, whose keys are kept
/// sorted); a hashed id's key comes from the source's key columns. `None`
/// when neither says (such a document is reported, never repaired).
pub(crate) fn key_of_doc(
    id: &str,
    source: &Map<String, Value>,
    columns: &[(&str, &Rule)],
) -> Option<KeyText> {
    if !id.starts_with(HASHED) {
        if let [(_, rule)] = columns {
            let value = match rule {
                Rule::Array { .. } => serde_json::from_str(id).ok()?,
                _ => Value::String(id.to_owned()),
            };
            return Some(vec![text(rule, &value)?]);
        }
        if let Ok(Value::Array(values)) = serde_json::from_str::<Value>(id) {
            if values.len() == columns.len() {
                let mut sorted: Vec<&str> = columns.iter().map(|(n, _)| *n).collect();
                sorted.sort_unstable();
                return columns
                    .iter()
                    .map(|(n, rule)| {
                        let at = sorted.binary_search(n).ok()?;
                        text(rule, &values[at])
                    })
                    .collect();
            }
        }
    }
    columns
        .iter()
        .map(|(n, rule)| source.get(field(n).as_ref()).and_then(|v| text(rule, v)))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use serde_json::json;

    /// Text-rendered key columns named `names`.
    fn texts<'a>(names: &[&'a str]) -> Vec<(&'a str, &'static Rule)> {
        names.iter().map(|n| (*n, &Rule::Text)).collect()
    }

    #[test]
    fn keys_are_read_back_from_ids_or_sources() {
        let none = Map::new();
        let ab = texts(&["a", "b"]);
        assert_eq!(
            key_of_doc("42", &none, &texts(&["id"])),
            Some(vec!["42".into()])
        );
        assert_eq!(
            key_of_doc(r#"[7,"a b"]"#, &none, &ab),
            Some(vec!["7".into(), "a b".into()])
        );
        let source = json!({"a": 7, "b": "x"}).as_object().cloned().unwrap();
        assert_eq!(
            key_of_doc("sha256:00", &source, &ab),
            Some(vec!["7".into(), "x".into()])
        );
        assert_eq!(key_of_doc("not json", &none, &ab), None);
        let shifted = json!({"_id_": "m", "b": 1}).as_object().cloned().unwrap();
        assert_eq!(
            key_of_doc("sha256:00", &shifted, &texts(&["_id", "b"])),
            Some(vec!["m".into(), "1".into()]),
            "a reserved key column is read from its field"
        );
    }

    #[test]
    fn a_wide_id_is_read_back_in_key_order_whatever_the_names_sort_to() {
        let key = json!({"region": "eu", "code": "c1's"});
        let id = crate::es_writer::doc_id(key.as_object().unwrap());
        assert_eq!(
            id, r#"["c1's","eu"]"#,
            "the id lists the values by column name"
        );
        assert_eq!(
            key_of_doc(&id, &Map::new(), &texts(&["region", "code"])),
            Some(vec!["eu".into(), "c1's".into()])
        );
    }

    #[test]
    fn bytea_and_array_keys_are_read_back_as_postgresql_text() {
        let bytea = Rule::Builtin(Type::BYTEA.oid());
        let none = Map::new();
        assert_eq!(
            key_of_doc("AP8=", &none, &[("k", &bytea)]),
            Some(vec![r"\x00ff".into()])
        );
        let ints = Rule::Array {
            elem: Arc::new(Rule::Builtin(Type::INT4.oid())),
            delim: b',',
        };
        assert_eq!(
            key_of_doc("[[1,null],[3,4]]", &none, &[("k", &ints)]),
            Some(vec![r#"{{"1",NULL},{"3","4"}}"#.into()])
        );
        let words = Rule::Array {
            elem: Arc::new(Rule::Text),
            delim: b',',
        };
        let id = r#"["AP8=",["a \"q\" \\ b"]]"#;
        assert_eq!(
            key_of_doc(id, &none, &[("w", &words), ("b", &bytea)]),
            Some(vec![r#"{"a \"q\" \\ b"}"#.into(), r"\x00ff".into()]),
            "bytea sorts before w in the id"
        );
        assert_eq!(
            key_of_doc(r#"{"g":1}"#, &none, &[("j", &Rule::Text)]),
            Some(vec![r#"{"g":1}"#.into()])
        );
        assert_eq!(
            text(&Rule::Text, &json!({"g": 1})),
            None,
            "an object has no key text"
        );
    }
}
