//! Mirror generations: every mirror is served through an alias
//! (`cdc_public_users`) pointing at a concrete index
//! (`cdc_public_users~3`), so an incompatible schema change can be met with
//! a new index, filled while the old one keeps serving, then swapped in
//! atomically ([`fill`](super::fill) copies the rows).
//!
//! A generation's `_meta` holds the table shape it was built for: the
//! column types (`pgcdc.types`) and the key columns, and the commit LSN from
//! which that shape holds. A record whose shape differs is:
//! - *compatible* when it only adds columns, or changes a column's type to
//!   one with the same mapping: the index gets the new mappings;
//! - *incompatible* when it drops (or renames) a column, changes a column's
//!   mapping, or changes the key: a new generation is built.
//!
//! Records older than the shape's LSN (another partition's backlog) never
//! change the shape.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::bulk::field_mapping;

/// The separator between a mirror's alias and its generation number. `~`
/// is valid in Elasticsearch index names but never part of a mirror name
/// ([`naming`](super::naming) maps it), so a generation never collides with
/// another table's mirror.
pub const GENERATION_SEPARATOR: char = '~';

/// The concrete index of `alias`'s generation `n`.
pub fn generation_index(alias: &str, n: u64) -> String {
    format!("{alias}{GENERATION_SEPARATOR}{n}")
}

/// The alias every write to the generation `index` goes through while it
/// is filled: a write (with `require_alias`) after the generation was
/// dropped is refused instead of creating an index under its name. Its
/// `~w` suffix is no generation number.
pub fn filling_alias(index: &str) -> String {
    format!("{index}{GENERATION_SEPARATOR}w")
}

/// The generation number of a concrete index of `alias`, if it is one.
pub fn generation_of(alias: &str, index: &str) -> Option<u64> {
    index
        .strip_prefix(alias)?
        .strip_prefix(GENERATION_SEPARATOR)?
        .parse()
        .ok()
}

/// The table shape a generation is built for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableShape {
    /// Column name → PostgreSQL type name.
    pub columns: BTreeMap<String, String>,
    /// Key column names.
    pub key: Vec<String>,
}

impl TableShape {
    /// The shape of a record: its `pgcdc.types` header and its key's column names.
    pub fn of_record(types: &str, key: &Map<String, Value>) -> Option<Self> {
        let columns: BTreeMap<String, Value> = serde_json::from_str(types).ok()?;
        let columns = columns
            .into_iter()
            .map(|(c, t)| (c, t.as_str().unwrap_or_default().to_owned()))
            .collect();
        Some(Self {
            columns,
            key: key.keys().cloned().collect(),
        })
    }
}

/// How a record's shape relates to a generation's.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    /// The same shape.
    Same,
    /// Only columns the generation can take: these need mappings (possibly
    /// none, when a type changed to one with the same mapping).
    Compatible(Map<String, Value>),
    /// A new generation is needed; why.
    Incompatible(String),
}

/// Compare a record's shape with the generation's.
pub fn compare(generation: &TableShape, record: &TableShape) -> Change {
    if generation == record {
        return Change::Same;
    }
    if generation.key != record.key {
        return Change::Incompatible(format!(
            "key changed from {:?} to {:?}",
            generation.key, record.key
        ));
    }
    if let Some(gone) = generation
        .columns
        .keys()
        .find(|c| !record.columns.contains_key(*c))
    {
        return Change::Incompatible(format!("column {gone} dropped or renamed"));
    }
    let mut added = Map::new();
    for (column, ty) in &record.columns {
        match generation.columns.get(column) {
            None => {
                added.insert(column.clone(), field_mapping(ty));
            }
            Some(old) if field_mapping(old) != field_mapping(ty) => {
                return Change::Incompatible(format!(
                    "column {column} changed type from {old} to {ty}"
                ));
            }
            Some(_) => {}
        }
    }
    Change::Compatible(added)
}

/// What a generation's `_meta` records.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerationMeta {
    /// Always [`CREATED_BY`](super::mapping::CREATED_BY).
    pub created_by: String,
    /// The alias it serves.
    #[serde(default)]
    pub alias: String,
    /// The table shape.
    #[serde(default)]
    pub shape: TableShape,
    /// The commit LSN from which the shape holds.
    #[serde(default)]
    pub since: u64,
    /// For a generation filled from PostgreSQL: a commit LSN up to which it
    /// holds every change (the fill's snapshot was taken after the sink had
    /// read the records up to it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filled: Option<u64>,
    /// The topic of the record that created it; empty if unknown (created
    /// by an older pgcdc).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub topic: String,
    /// Its table (schema, name), where the record that created it named one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<(String, String)>,
}

impl GenerationMeta {
    /// The `_meta` of a generation of `alias` for `shape`, from `since`.
    pub fn new(alias: &str, shape: TableShape, since: u64) -> Self {
        Self {
            created_by: super::mapping::CREATED_BY.to_owned(),
            alias: alias.to_owned(),
            shape,
            since,
            filled: None,
            topic: String::new(),
            table: None,
        }
    }

    /// Whether the generation holds every change committed at or before `lsn`
    /// (it was filled from PostgreSQL after the sink read them).
    pub fn holds_up_to(&self, lsn: u64) -> bool {
        self.filled.is_some_and(|f| f >= lsn)
    }

    /// Read from an index's `mappings`; `None` for an index without a shape
    /// (created by an older pgcdc, or not by pgcdc).
    pub fn read(mappings: &Value) -> Option<Self> {
        let meta: Self = serde_json::from_value(mappings["_meta"].clone()).ok()?;
        (!meta.alias.is_empty()).then_some(meta)
    }

    /// As a `_meta` value.
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or_else(|_| json!({}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(columns: &[(&str, &str)], key: &[&str]) -> TableShape {
        TableShape {
            columns: columns
                .iter()
                .map(|(c, t)| (c.to_string(), t.to_string()))
                .collect(),
            key: key.iter().map(|k| k.to_string()).collect(),
        }
    }

    #[test]
    fn generations_are_named_apart_from_every_mirror() {
        assert_eq!(
            generation_index("cdc_public_users", 3),
            "cdc_public_users~3"
        );
        assert_eq!(
            generation_of("cdc_public_users", "cdc_public_users~3"),
            Some(3)
        );
        assert_eq!(
            generation_of("cdc_public_users", "cdc_public_users_v3"),
            None
        );
        assert_eq!(generation_of("cdc_public_u", "cdc_public_users~3"), None);
        let writer = filling_alias("cdc_public_users~3");
        assert_eq!(generation_of("cdc_public_users", &writer), None);
        let mapped = super::super::naming::mirror_index("cdc_", "public", "users~3");
        assert!(!mapped.contains(GENERATION_SEPARATOR), "{mapped}");
    }

    #[test]
    fn added_columns_and_same_mapping_types_are_compatible() {
        let g = shape(&[("id", "int4"), ("name", "varchar")], &["id"]);
        assert_eq!(compare(&g, &g.clone()), Change::Same);
        let added = shape(&[("id", "int4"), ("name", "text"), ("n", "int8")], &["id"]);
        let Change::Compatible(new) = compare(&g, &added) else {
            panic!("an added column is compatible");
        };
        assert_eq!(new.keys().collect::<Vec<_>>(), ["n"]);
    }

    #[test]
    fn drops_mapping_changes_and_key_changes_are_incompatible() {
        let g = shape(&[("id", "int4"), ("name", "text")], &["id"]);
        let cases = [
            shape(&[("id", "int4")], &["id"]),
            shape(&[("id", "int4"), ("name", "jsonb")], &["id"]),
            shape(&[("id", "int8"), ("name", "text")], &["id"]),
            shape(&[("id", "int4"), ("name", "text")], &["name"]),
        ];
        for c in cases {
            assert!(
                matches!(compare(&g, &c), Change::Incompatible(_)),
                "{c:?} must need a new generation"
            );
        }
    }

    #[test]
    fn meta_round_trips_and_older_indices_have_none() {
        let mut meta = GenerationMeta::new("a", shape(&[("id", "int4")], &["id"]), 42);
        let mappings = json!({"_meta": meta.to_value()});
        assert_eq!(GenerationMeta::read(&mappings), Some(meta.clone()));
        assert!(!meta.holds_up_to(1), "not filled from PostgreSQL");
        meta.filled = Some(90);
        meta.topic = "cdc-events".into();
        meta.table = Some(("public".into(), "users".into()));
        let mappings = json!({"_meta": meta.to_value()});
        assert_eq!(GenerationMeta::read(&mappings), Some(meta.clone()));
        assert!(meta.holds_up_to(90) && !meta.holds_up_to(91));
        assert_eq!(
            GenerationMeta::read(&json!({"_meta": {"created_by": "pgcdc"}})),
            None
        );
        assert_eq!(GenerationMeta::read(&json!({})), None);
    }
}
