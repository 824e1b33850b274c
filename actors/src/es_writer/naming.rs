//! Index names and document ids that are always valid and never collide.
//!
//! A mirror index is named `<index_prefix><schema>_<table>`, lowercased,
//! when that is a valid Elasticsearch name made only of `a-z`, `0-9`, `_`,
//! `-` and `.`. Any other table name (upper case, `*`, `,`, `?`, `#`, `/`,
//! spaces, non-ASCII, a name starting with `_`, `-` or `+`, or longer than
//! [`INDEX_MAX_BYTES`]) is mapped: every other character becomes `_`, the
//! result is cut to leave room, and `-` plus the first 12 hex digits of the
//! SHA-256 of `schema.table` is appended, so two tables never share an
//! index and the name never changes between runs. Path segments are
//! percent-encoded anyway ([`path_segment`]).
//!
//! A document id is the value of a one-column key, else the JSON array of
//! the key's values; an id longer than Elasticsearch's 512-byte limit (wide
//! keys, or every column of a table without a primary key) becomes
//! `sha256:` and the hex SHA-256 of that text.
//!
//! A document field is the column's name, except for a name Elasticsearch
//! or OpenSearch keeps for itself (a document holding `_id`, `_source`,
//! `_routing`… is refused; one holding `_doc_count` changes aggregation
//! counts) or the sink's own `_cdc`: such a name, followed by any number
//! of `_`, gets one more `_` (column `_id` is field `_id_`, column `_id_`
//! is field `_id__`). Every other name is its own field, so the mapping
//! is one to one and read back by [`column`].

use std::borrow::Cow;

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// Elasticsearch's longest index name, in bytes.
pub const INDEX_MAX_BYTES: usize = 255;
/// Elasticsearch's longest document id, in bytes.
pub const ID_MAX_BYTES: usize = 512;
/// Hex digits of the hash appended to a mapped index name.
const NAME_HASH_HEX: usize = 12;
/// Room kept after a mapped mirror name for suffixes pgcdc appends
/// (`_history`, version numbers).
const SUFFIX_ROOM: usize = 24;

/// Field names a document cannot hold as columns (see the module docs):
/// the metadata fields of Elasticsearch 8 and OpenSearch 2, and `_cdc`.
const RESERVED_FIELDS: &[&str] = &[
    "_cdc",
    "_data_stream_timestamp",
    "_doc_count",
    "_feature",
    "_field_names",
    "_id",
    "_ignored",
    "_ignored_source",
    "_index",
    "_nested_path",
    "_primary_term",
    "_routing",
    "_seq_no",
    "_source",
    "_tier",
    "_ts_routing_hash",
    "_tsid",
    "_version",
];

/// Whether `name` is a reserved field followed by any number of `_`.
fn shifted(name: &str) -> bool {
    name.starts_with('_') && RESERVED_FIELDS.contains(&name.trim_end_matches('_'))
}

/// The document field of `column` (see the module docs).
pub fn field(column: &str) -> Cow<'_, str> {
    match shifted(column) {
        true => Cow::Owned(format!("{column}_")),
        false => Cow::Borrowed(column),
    }
}

/// The column of the document `field`; `None` for a reserved field
/// itself (`_cdc`), which is no column's.
pub fn column(field: &str) -> Option<&str> {
    match shifted(field) {
        true => field.strip_suffix('_').filter(|c| shifted(c)),
        false => Some(field),
    }
}

/// `row` (columns and values) with each column under its field.
pub fn fields(row: Map<String, Value>) -> Map<String, Value> {
    if !row.keys().any(|c| shifted(c)) {
        return row;
    }
    row.into_iter()
        .map(|(c, v)| (field(&c).into_owned(), v))
        .collect()
}

fn sha256_hex(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn plain(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-' | '.')
}

/// The mirror index of `schema.table` under `prefix` (see the module docs).
pub fn mirror_index(prefix: &str, schema: &str, table: &str) -> String {
    let raw = format!("{prefix}{schema}_{table}");
    let limit = INDEX_MAX_BYTES - SUFFIX_ROOM;
    let valid =
        raw.chars().all(plain) && !raw.starts_with(['_', '-', '+', '.']) && raw.len() <= limit;
    if valid {
        return raw;
    }
    let mut name: String = raw
        .to_lowercase()
        .chars()
        .map(|c| if plain(c) { c } else { '_' })
        .collect();
    if name.starts_with(['_', '-', '+', '.']) {
        name.insert(0, 'x');
    }
    name.truncate(limit - NAME_HASH_HEX - 1);
    let hash = sha256_hex(&format!("{schema}.{table}"));
    format!("{name}-{}", &hash[..NAME_HASH_HEX])
}

/// The document id of a key (see the module docs).
pub fn doc_id(key: &Map<String, Value>) -> String {
    let id = match key.values().collect::<Vec<_>>().as_slice() {
        [Value::String(s)] => s.clone(),
        [v] => v.to_string(),
        values => Value::Array(values.iter().map(|v| (*v).clone()).collect()).to_string(),
    };
    if id.len() > ID_MAX_BYTES {
        format!("sha256:{}", sha256_hex(&id))
    } else {
        id
    }
}

/// `segment` percent-encoded for a URL path (unreserved characters kept).
pub fn path_segment(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn plain_names_are_kept() {
        assert_eq!(mirror_index("cdc_", "public", "users"), "cdc_public_users");
        assert_eq!(
            mirror_index("cdc_", "app", "order-lines.v2"),
            "cdc_app_order-lines.v2"
        );
    }

    #[test]
    fn other_names_are_mapped_validly_and_never_collide() {
        let names = [
            "*", "a,b", "a_b", "Upper", "upper", "x?y#z/w", "_x", "été", "a b",
        ];
        let mapped: Vec<String> = names
            .iter()
            .map(|t| mirror_index("", "public", t))
            .collect();
        let distinct: std::collections::HashSet<_> = mapped.iter().collect();
        assert_eq!(distinct.len(), names.len(), "{mapped:?}");
        for m in &mapped {
            assert!(m.chars().all(plain), "{m}");
            assert!(!m.starts_with(['_', '-', '+', '.']), "{m}");
        }
        assert_eq!(mapped[2], "public_a_b", "a plain name is kept");
        assert_eq!(
            mirror_index("", "public", "Upper"),
            mapped[3],
            "deterministic"
        );
        let empty_prefix_underscore = mirror_index("", "_s", "t");
        assert!(
            empty_prefix_underscore.starts_with("x_s_t-"),
            "{empty_prefix_underscore}"
        );
    }

    #[test]
    fn long_names_are_shortened_with_room_for_suffixes() {
        let long = "t".repeat(200);
        let other = format!("{}u", "t".repeat(199));
        let (a, b) = (
            mirror_index("cdc_", "public", &long),
            mirror_index("cdc_", "public", &other),
        );
        assert_ne!(a, b);
        assert!(a.len() + SUFFIX_ROOM <= INDEX_MAX_BYTES, "{}", a.len());
        let history = format!("{a}_history");
        assert!(history.len() <= INDEX_MAX_BYTES);
    }

    #[test]
    fn long_ids_are_hashed_and_short_ones_kept() {
        let key = |v: Value| v.as_object().cloned().unwrap();
        assert_eq!(doc_id(&key(json!({"id": 7}))), "7");
        assert_eq!(doc_id(&key(json!({"id": "a/b"}))), "a/b");
        assert_eq!(doc_id(&key(json!({"a": 1, "b": "x"}))), r#"[1,"x"]"#);
        let wide = key(json!({"a": "x".repeat(600), "b": 1}));
        let id = doc_id(&wide);
        assert!(id.starts_with("sha256:") && id.len() == 7 + 64, "{id}");
        assert_eq!(id, doc_id(&wide));
    }

    #[test]
    fn reserved_columns_get_one_more_underscore_and_are_read_back() {
        for (c, f) in [
            ("id", "id"),
            ("_private", "_private"),
            ("_", "_"),
            ("_id", "_id_"),
            ("_id_", "_id__"),
            ("_cdc", "_cdc_"),
            ("_doc_count", "_doc_count_"),
            ("id_", "id_"),
        ] {
            assert_eq!(field(c), f, "{c}");
            assert_eq!(column(f), Some(c), "{f}");
        }
        assert_eq!(column("_cdc"), None, "the sink's own field");
        assert_eq!(column("_source"), None);
        let row = json!({"_id": 1, "_id_": 2, "n": 3})
            .as_object()
            .cloned()
            .unwrap();
        assert_eq!(
            Value::Object(fields(row)),
            json!({"_id_": 1, "_id__": 2, "n": 3})
        );
    }

    #[test]
    fn path_segments_are_percent_encoded() {
        assert_eq!(path_segment("cdc_a-b.c"), "cdc_a-b.c");
        assert_eq!(path_segment("a,b/*?#"), "a%2Cb%2F%2A%3F%23");
    }
}
