//! The key of a mirror document whose row may not exist: read back from
//! its id (see [`naming`](crate::es_writer::naming)), else from its source.

use serde_json::{Map, Value};

use crate::checkpoint::KeyText;
use crate::es_writer::naming::field;

/// Prefix of a hashed (too long) document id: its key cannot be read back from it.
const HASHED: &str = "sha256:";

/// The text of one key value as PostgreSQL reads it back: a string as is,
/// a number or boolean as its JSON text; `None` for anything else.
pub(crate) fn text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(_) | Value::Bool(_) => Some(v.to_string()),
        _ => None,
    }
}

/// The key text of the document `id` with `source`, for a table keyed by
/// `names` (in key order): a one-column key is the id itself; a wider key
/// is the id's JSON array, whose values are in the order of the column
/// names sorted (the id is made from a JSON object, whose keys are kept
/// sorted); a hashed id's key comes from the source's key columns. `None`
/// when neither says (such a document is reported, never repaired).
pub(crate) fn key_of_doc(id: &str, source: &Map<String, Value>, names: &[&str]) -> Option<KeyText> {
    if !id.starts_with(HASHED) {
        if names.len() == 1 {
            return Some(vec![id.to_owned()]);
        }
        if let Ok(Value::Array(values)) = serde_json::from_str::<Value>(id) {
            if values.len() == names.len() {
                let mut sorted: Vec<&str> = names.to_vec();
                sorted.sort_unstable();
                return names
                    .iter()
                    .map(|n| {
                        let at = sorted.binary_search(n).ok()?;
                        text(&values[at])
                    })
                    .collect();
            }
        }
    }
    names
        .iter()
        .map(|n| source.get(field(n).as_ref()).and_then(text))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_are_read_back_from_ids_or_sources() {
        let none = Map::new();
        assert_eq!(key_of_doc("42", &none, &["id"]), Some(vec!["42".into()]));
        assert_eq!(
            key_of_doc(r#"[7,"a b"]"#, &none, &["a", "b"]),
            Some(vec!["7".into(), "a b".into()])
        );
        let source = json!({"a": 7, "b": "x"}).as_object().cloned().unwrap();
        assert_eq!(
            key_of_doc("sha256:00", &source, &["a", "b"]),
            Some(vec!["7".into(), "x".into()])
        );
        assert_eq!(key_of_doc("not json", &none, &["a", "b"]), None);
        let shifted = json!({"_id_": "m", "b": 1}).as_object().cloned().unwrap();
        assert_eq!(
            key_of_doc("sha256:00", &shifted, &["_id", "b"]),
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
            key_of_doc(&id, &Map::new(), &["region", "code"]),
            Some(vec!["eu".into(), "c1's".into()])
        );
    }
}
