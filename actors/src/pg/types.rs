//! What pgcdc knows about a column's type: the [`Rule`] its values are
//! rendered by ([`super::values::render`]).
//!
//! Built-in scalars and their arrays are known by OID (`postgres-types`).
//! Every other type (domains, enums, composites, ranges, extension types,
//! arrays of any of these) is looked up in `pg_type` by [`resolve`], the
//! same way for the snapshot and the stream, so both render a row alike:
//!
//! - a domain renders as its base type;
//! - an enum, range, multirange, `bit`, `tsvector`, geometric type,
//!   `citext`, or any type pgcdc does not know, as its text;
//! - a composite as an object of its (live) attributes, each by its type;
//! - `hstore` (by name, in any schema) as an object of strings;
//! - an array as an array of its element type's rule (with the element's
//!   delimiter: `;` for `box`).
//!
//! The catalog is read when a table is first seen (snapshot) or when a
//! Relation message names a type not seen yet or re-described by a Type
//! message (stream); it describes the type as it is *now*.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tokio_postgres::types::Type;
use tokio_postgres::Client;

use super::values::{known_array, known_scalar, type_name};
use super::{PgError, PostgresConfig};

/// Type resolution stops after this many levels of domains, arrays and
/// composite fields (PostgreSQL allows no cycles; real schemas nest a few).
const MAX_TYPE_DEPTH: usize = 16;

/// How the values of one type are rendered.
#[derive(Debug, Clone, PartialEq)]
pub enum Rule {
    /// A built-in scalar converted by its own rule, by OID (a `SCALARS` type).
    Builtin(u32),
    /// The text form as a JSON string.
    Text,
    /// `hstore`: an object of strings (and nulls).
    Hstore,
    /// An array: each element by `elem`, split at `delim`.
    Array {
        /// The element type's rule.
        elem: Arc<Rule>,
        /// The element type's delimiter (`typdelim`), `,` for all but `box`.
        delim: u8,
    },
    /// A composite: its attributes in order, each with its rule.
    Composite(Arc<[(String, Rule)]>),
}

impl Rule {
    /// The rule of a built-in scalar or array known by OID; `None` otherwise.
    pub fn builtin(type_oid: u32) -> Option<Rule> {
        if known_scalar(type_oid) {
            return Some(Rule::Builtin(type_oid));
        }
        known_array(type_oid).map(|elem| Rule::Array {
            elem: Arc::new(Rule::Builtin(elem)),
            delim: b',',
        })
    }

    /// What `pgcdc.types` names a type without a built-in name that renders
    /// by this rule: a domain as its base type, `hstore`, `record` for a
    /// composite, `_` and its element's for an array, else `unknown`.
    fn label(&self) -> String {
        match self {
            Rule::Builtin(oid) => type_name(*oid).unwrap_or(UNKNOWN).to_owned(),
            Rule::Text => UNKNOWN.to_owned(),
            Rule::Hstore => "hstore".to_owned(),
            Rule::Composite(_) => "record".to_owned(),
            Rule::Array { elem, .. } => format!("_{}", elem.label()),
        }
    }
}

/// Built-in scalars whose text has at most [`FIXED_TEXT_MAX`] bytes.
const FIXED_SIZE: [Type; 18] = [
    Type::BOOL,
    Type::CHAR,
    Type::INT2,
    Type::INT4,
    Type::INT8,
    Type::OID,
    Type::XID,
    Type::FLOAT4,
    Type::FLOAT8,
    Type::MONEY,
    Type::DATE,
    Type::TIME,
    Type::TIMETZ,
    Type::TIMESTAMP,
    Type::TIMESTAMPTZ,
    Type::INTERVAL,
    Type::UUID,
    Type::PG_LSN,
];
/// The longest text of a [`FIXED_SIZE`] value (an interval's, about 70).
pub const FIXED_TEXT_MAX: usize = 80;

impl Rule {
    /// Whether every value of this rule's type has a short text of at most
    /// [`FIXED_TEXT_MAX`] bytes (a fixed-size built-in scalar).
    pub fn fixed_size(&self) -> bool {
        matches!(self, Rule::Builtin(oid) if FIXED_SIZE.iter().any(|t| t.oid() == *oid))
    }
}

/// The `pgcdc.types` name of a type no other name fits.
const UNKNOWN: &str = "unknown";

/// What `pgcdc.types` names a column of type `type_oid` rendered by
/// `rule`: its built-in name (`int4`, `_text`, `timestamptz`), else by its
/// rendering ([`Rule::label`]), so a reader of the header knows a value's
/// shape: a domain over `integer` is `int4`, a composite `record`.
pub fn label(type_oid: u32, rule: &Rule) -> String {
    match type_name(type_oid) {
        Some(name) => name.to_owned(),
        None => rule.label(),
    }
}

/// One `pg_type` row, as [`resolve`] reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TypeRow {
    /// `typtype`: `b` base, `c` composite, `d` domain, `e` enum, `r` range, …
    pub typtype: u8,
    /// `typname`.
    pub name: String,
    /// `typbasetype` (domains).
    pub base: u32,
    /// `typelem` when the type is a true array (category `A`), else 0.
    pub elem: u32,
    /// The element's `typdelim`, for arrays.
    pub delim: u8,
    /// The live attributes of a composite: (name, type OID).
    pub fields: Vec<(String, u32)>,
}

impl TypeRow {
    /// The OIDs this type's rule depends on.
    fn refs(&self) -> Vec<u32> {
        let mut refs: Vec<u32> = self.fields.iter().map(|(_, t)| *t).collect();
        refs.extend([self.base, self.elem].into_iter().filter(|o| *o != 0));
        refs
    }
}

/// Resolved rules by type OID; built-in types are not stored.
#[derive(Debug, Clone, Default)]
pub struct TypeMap {
    /// Rules of the types the catalog described.
    rules: HashMap<u32, Rule>,
}

impl TypeMap {
    /// The rule of `type_oid`: built-in, resolved, or [`Rule::Text`].
    pub fn rule(&self, type_oid: u32) -> Rule {
        Rule::builtin(type_oid)
            .or_else(|| self.rules.get(&type_oid).cloned())
            .unwrap_or(Rule::Text)
    }

    /// The OIDs of `oids` that are neither built-in nor resolved.
    pub fn missing(&self, oids: impl IntoIterator<Item = u32>) -> Vec<u32> {
        let mut seen = HashSet::new();
        oids.into_iter()
            .filter(|o| Rule::builtin(*o).is_none() && !self.rules.contains_key(o))
            .filter(|o| seen.insert(*o))
            .collect()
    }

    /// Forget `type_oid` (its definition may have changed).
    pub fn forget(&mut self, type_oid: u32) {
        self.rules.remove(&type_oid);
    }

    /// Add the rules of `wanted`, built from catalog `rows`.
    pub(crate) fn extend(&mut self, wanted: &[u32], rows: &HashMap<u32, TypeRow>) {
        for oid in wanted {
            let rule = build(*oid, rows, self, 0);
            self.rules.insert(*oid, rule);
        }
    }
}

/// The rule of `oid` from catalog `rows` (and what `known` already holds).
fn build(oid: u32, rows: &HashMap<u32, TypeRow>, known: &TypeMap, depth: usize) -> Rule {
    if let Some(rule) = Rule::builtin(oid).or_else(|| known.rules.get(&oid).cloned()) {
        return rule;
    }
    let Some(row) = rows.get(&oid).filter(|_| depth < MAX_TYPE_DEPTH) else {
        return Rule::Text;
    };
    let next = |o: u32| build(o, rows, known, depth + 1);
    match row.typtype {
        b'd' => next(row.base),
        b'c' => Rule::Composite(
            row.fields
                .iter()
                .map(|(name, t)| (name.clone(), next(*t)))
                .collect(),
        ),
        _ if row.elem != 0 => Rule::Array {
            elem: Arc::new(next(row.elem)),
            delim: row.delim,
        },
        b'b' if row.name == "hstore" => Rule::Hstore,
        _ => Rule::Text,
    }
}

/// One query: the `pg_type` rows of `oids`.
const TYPE_ROWS: &str = "SELECT t.oid, t.typtype::text, t.typname::text, t.typbasetype, \
       CASE WHEN t.typcategory = 'A' THEN t.typelem ELSE 0::oid END, \
       COALESCE((SELECT e.typdelim::text FROM pg_type e WHERE e.oid = t.typelem), ','), \
       (SELECT array_agg(a.attname::text ORDER BY a.attnum) FROM pg_attribute a \
         WHERE a.attrelid = t.typrelid AND a.attnum > 0 AND NOT a.attisdropped), \
       (SELECT array_agg(a.atttypid ORDER BY a.attnum) FROM pg_attribute a \
         WHERE a.attrelid = t.typrelid AND a.attnum > 0 AND NOT a.attisdropped) \
     FROM pg_type t WHERE t.oid = ANY($1)";

/// Look `oids` (and every type they are built from) up in `pg_type` and add
/// their rules to `map`.
pub async fn resolve(sql: &Client, oids: &[u32], map: &mut TypeMap) -> Result<(), PgError> {
    let wanted = map.missing(oids.iter().copied());
    let mut rows: HashMap<u32, TypeRow> = HashMap::new();
    let mut next = wanted.clone();
    for _ in 0..MAX_TYPE_DEPTH {
        if next.is_empty() {
            break;
        }
        for r in sql.query(TYPE_ROWS, &[&next]).await? {
            let names: Vec<String> = r.get::<_, Option<Vec<String>>>(6).unwrap_or_default();
            let types: Vec<u32> = r.get::<_, Option<Vec<u32>>>(7).unwrap_or_default();
            let row = TypeRow {
                typtype: r.get::<_, String>(1).bytes().next().unwrap_or(b'b'),
                name: r.get(2),
                base: r.get(3),
                elem: r.get(4),
                delim: r.get::<_, String>(5).bytes().next().unwrap_or(b','),
                fields: names.into_iter().zip(types).collect(),
            };
            rows.insert(r.get(0), row);
        }
        let refs: Vec<u32> = rows.values().flat_map(TypeRow::refs).collect();
        next = map
            .missing(refs)
            .into_iter()
            .filter(|o| !rows.contains_key(o))
            .collect();
    }
    map.extend(&wanted, &rows);
    tracing::debug!(
        types = wanted.len(),
        "column types resolved from the catalog"
    );
    Ok(())
}

/// A SQL connection for type lookups, opened when first needed (the
/// stream sees new types rarely) and again after a failure.
#[derive(Default)]
pub struct TypeSource {
    /// The open connection, if any.
    sql: Option<Client>,
}

impl TypeSource {
    /// [`resolve`] `oids` into `map` over this source's connection to `pg`.
    pub async fn resolve(
        &mut self,
        pg: &PostgresConfig,
        oids: &[u32],
        map: &mut TypeMap,
    ) -> Result<(), PgError> {
        let sql = match self.sql.take() {
            Some(sql) if !sql.is_closed() => sql,
            _ => super::connect(pg).await?,
        };
        resolve(&sql, oids, map).await?;
        self.sql = Some(sql);
        Ok(())
    }
}

/// A catalog row of a domain over `base`, for other modules' tests.
#[cfg(test)]
pub(crate) fn tests_row_domain(base: u32) -> TypeRow {
    TypeRow {
        typtype: b'd',
        name: "domain".into(),
        base,
        elem: 0,
        delim: b',',
        fields: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// OIDs of the built-in types used here (`pg_type.dat`).
    const INT4: u32 = 23;
    /// `text`.
    const TEXT: u32 = 25;
    /// `float8`.
    const FLOAT8: u32 = 701;

    fn row(typtype: u8, name: &str, base: u32, elem: u32, fields: &[(&str, u32)]) -> TypeRow {
        TypeRow {
            typtype,
            name: name.into(),
            base,
            elem,
            delim: b',',
            fields: fields.iter().map(|(n, t)| (n.to_string(), *t)).collect(),
        }
    }

    fn resolved(rows: Vec<(u32, TypeRow)>, wanted: &[u32]) -> TypeMap {
        let mut map = TypeMap::default();
        map.extend(wanted, &rows.into_iter().collect());
        map
    }

    #[test]
    fn fixed_size_types_are_the_short_built_in_scalars() {
        for t in FIXED_SIZE {
            assert!(Rule::Builtin(t.oid()).fixed_size(), "{t}");
        }
        let unbounded = [Type::TEXT, Type::NUMERIC, Type::BYTEA, Type::JSONB];
        for t in unbounded {
            assert!(!Rule::Builtin(t.oid()).fixed_size(), "{t}");
        }
        assert!(!Rule::Text.fixed_size());
        let ints = Rule::builtin(Type::INT4_ARRAY.oid()).unwrap();
        assert!(!ints.fixed_size(), "an array of a fixed-size type");
        // The longest texts of the fixed-size types.
        for text in [
            "-178956970 years -8 mons -2147483648 days -2562047788:00:54.775807",
            "294276-12-31 23:59:59.999999+00 BC",
            "-$92,233,720,368,547,758.08",
            "-1.7976931348623157e+308",
        ] {
            assert!(text.len() <= FIXED_TEXT_MAX, "{text}");
        }
    }

    #[test]
    fn domains_render_as_their_base_type_and_arrays_follow_their_element() {
        let map = resolved(
            vec![
                (100, row(b'd', "posint", INT4, 0, &[])),
                (101, row(b'd', "posint2", 100, 0, &[])),
                (102, row(b'b', "_posint2", 0, 101, &[])),
                (103, row(b'e', "mood", 0, 0, &[])),
                (104, row(b'b', "_mood", 0, 103, &[])),
            ],
            &[101, 102, 104],
        );
        assert_eq!(map.rule(101), Rule::Builtin(INT4));
        assert_eq!(
            map.rule(102),
            Rule::Array {
                elem: Arc::new(Rule::Builtin(INT4)),
                delim: b','
            }
        );
        assert_eq!(
            map.rule(104),
            Rule::Array {
                elem: Arc::new(Rule::Text),
                delim: b','
            }
        );
    }

    #[test]
    fn composites_nest_and_unknown_types_are_text() {
        let map = resolved(
            vec![
                (
                    200,
                    row(b'c', "point2", 0, 0, &[("x", FLOAT8), ("y", FLOAT8)]),
                ),
                (
                    201,
                    row(b'c', "place", 0, 0, &[("name", TEXT), ("at", 200)]),
                ),
                (202, row(b'b', "hstore", 0, 0, &[])),
                (203, row(b'r', "int4range", 0, 0, &[])),
            ],
            &[201, 202, 203, 999],
        );
        let point = Rule::Composite(
            vec![
                ("x".to_owned(), Rule::Builtin(FLOAT8)),
                ("y".to_owned(), Rule::Builtin(FLOAT8)),
            ]
            .into(),
        );
        assert_eq!(
            map.rule(201),
            Rule::Composite(
                vec![
                    ("name".to_owned(), Rule::Builtin(TEXT)),
                    ("at".to_owned(), point)
                ]
                .into()
            )
        );
        assert_eq!(map.rule(202), Rule::Hstore);
        assert_eq!(map.rule(203), Rule::Text);
        assert_eq!(map.rule(999), Rule::Text);
        let labels: Vec<String> = [201, 202, 203, INT4].map(|o| label(o, &map.rule(o))).into();
        assert_eq!(labels, ["record", "hstore", "unknown", "int4"]);
        let places = Rule::Array {
            elem: Arc::new(map.rule(201)),
            delim: b',',
        };
        assert_eq!(label(999, &places), "_record");
        assert_eq!(label(999, &Rule::Builtin(INT4)), "int4", "a domain");
    }

    #[test]
    fn missing_lists_each_unresolved_type_once_and_forget_resolves_again() {
        let mut map = resolved(vec![(100, row(b'e', "mood", 0, 0, &[]))], &[100]);
        assert_eq!(map.missing([INT4, 100, 300, 300, 1007]), vec![300]);
        map.forget(100);
        assert_eq!(map.missing([100]), vec![100]);
    }

    #[test]
    fn a_self_referencing_catalog_stops_at_the_depth_limit() {
        let map = resolved(vec![(100, row(b'd', "loop", 100, 0, &[]))], &[100]);
        assert_eq!(map.rule(100), Rule::Text);
    }
}
