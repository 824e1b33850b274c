//! The key of a mirror document whose row may not exist: read back from
//! its id (see [`naming`](crate::es_writer::naming)), else from its source.

use serde_json::{Map, Value};

use crate::checkpoint::KeyText;

/// Prefix of a hashed (too long) document id: its key cannot be read back from it.
const HASHED: &str = "sha256:";

/// The text of one key value as PostgreSQL reads it back: a string as is,
/// a number or boolean as its JSON text; `None` for anything else.
fn text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(_) | Value::Bool(_) => Some(v.to_string()),
        _ => None,
    }
}

/// The key text of the document `id` with `source`, for a table keyed by
/// `names`: a one-column key is the id itself; a wider key is the id's JSON
/// array; a hashed id's key comes from the source's key columns. `None`
/// when neither says (such a document is reported, never repaired).
pub(crate) fn key_of_doc(id: &str, source: &Map<String, Value>, names: &[&str]) -> Option<KeyText> {
    if !id.starts_with(HASHED) {
        if names.len() == 1 {
            return Some(vec![id.to_owned()]);
        }
        if let Ok(Value::Array(values)) = serde_json::from_str::<Value>(id) {
            if values.len() == names.len() {
                return values.iter().map(text).collect();
            }
        }
    }
    names
        .iter()
        .map(|n| source.get(*n).and_then(text))
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
    }
}
