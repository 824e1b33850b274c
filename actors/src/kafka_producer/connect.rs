//! `kafka.format = "connect-json"`: key and value as Kafka Connect's
//! `JsonConverter` writes them with `schemas.enable=true`
//! (`{"schema": …, "payload": …}`), with Debezium's schema names and
//! semantic types. Schemas come from the table's column types (the
//! `pgcdc.types` header); values keep pgcdc's rendering, and a value the
//! schema declares a string but pgcdc renders otherwise (json, composites,
//! hstore) is sent as its JSON text, as Debezium sends json.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use super::modes::Temporal;
use super::{DecimalMode, KafkaConfig, TimeMode};
use crate::event::TableRef;

/// `name` of the `source` block's schema.
const SOURCE_SCHEMA: &str = "io.debezium.connector.postgresql.Source";
/// `name` of the `transaction` block's schema.
const TRANSACTION_SCHEMA: &str = "event.block";
/// The values `source.snapshot` takes.
const SNAPSHOT_VALUES: &str = "true,last,false,incremental";

/// The Connect schemas of one table, and the Connect type of each column.
pub struct TableSchema {
    /// The key's schema, JSON text.
    pub key: String,
    /// The envelope's schema, JSON text.
    pub value: String,
    /// Connect type of each column, for [`TableSchema::conform`].
    kinds: BTreeMap<String, Value>,
}

impl TableSchema {
    /// The schemas of `table`, named `<topic_prefix>.<schema>.<table>.{Key,Value,Envelope}`.
    pub fn new(kafka: &KafkaConfig, table: &TableRef) -> Self {
        let prefix = &kafka.topic_prefix;
        let mut types: BTreeMap<String, String> =
            serde_json::from_str(&table.column_types).unwrap_or_default();
        if kafka.decimal_handling_mode == DecimalMode::Double {
            for t in types
                .values_mut()
                .filter(|t| matches!(t.as_str(), "numeric" | "money"))
            {
                *t = "float8".into();
            }
        }
        let time = kafka.time_precision_mode;
        let base = format!("{prefix}.{}.{}", table.schema, table.name);
        let mut key_columns = table.key_columns.clone();
        key_columns.sort();
        // Key columns are required in the row too (primary keys are NOT NULL).
        let kinds: BTreeMap<String, Value> = types
            .iter()
            .map(|(c, t)| {
                let optional = key_columns.binary_search(c).is_err();
                (c.clone(), column(t, c, optional, time))
            })
            .collect();
        let key_fields: Vec<Value> = key_columns
            .iter()
            .map(|c| {
                let t = types.get(c).map_or("unknown", String::as_str);
                column(t, c, false, time)
            })
            .collect();
        let key = json!({"type": "struct", "fields": key_fields, "optional": false,
                         "name": format!("{base}.Key")});
        let row = |field: &str| {
            json!({"type": "struct", "fields": kinds.values().collect::<Vec<_>>(), "optional": true,
                   "name": format!("{base}.Value"), "field": field})
        };
        let value = json!({
            "type": "struct",
            "fields": [row("before"), row("after"), source(), transaction(),
                       scalar("string", "op", false), scalar("int64", "ts_ms", true),
                       scalar("int64", "ts_us", true), scalar("int64", "ts_ns", true),
                       {"type": "array", "items": {"type": "string", "optional": false},
                        "optional": true, "field": "unchanged_toast"}],
            "optional": false,
            "name": format!("{base}.Envelope"),
        });
        Self {
            key: key.to_string(),
            value: value.to_string(),
            kinds,
        }
    }

    /// `row` with every value of the Connect type its schema declares.
    pub fn conform(&self, row: &Map<String, Value>) -> Map<String, Value> {
        row.iter()
            .map(|(c, v)| {
                let v = match self.kinds.get(c) {
                    Some(kind) => conform(kind, v),
                    None => v.clone(),
                };
                (c.clone(), v)
            })
            .collect()
    }
}

/// `{"schema": schema, "payload": payload}` as bytes.
pub fn wrap(schema: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(schema.len() + payload.len() + 24);
    out.extend_from_slice(b"{\"schema\":");
    out.extend_from_slice(schema.as_bytes());
    out.extend_from_slice(b",\"payload\":");
    out.extend_from_slice(payload);
    out.push(b'}');
    out
}

/// `v` as a value of Connect type `kind`: strings stay, anything else
/// declared a string becomes its JSON text; array items likewise.
fn conform(kind: &Value, v: &Value) -> Value {
    match (kind["type"].as_str(), v) {
        (_, Value::Null) => Value::Null,
        (Some("string"), Value::String(_)) => v.clone(),
        (Some("string"), other) => Value::String(other.to_string()),
        (Some("array"), Value::Array(items)) => {
            Value::Array(items.iter().map(|i| conform(&kind["items"], i)).collect())
        }
        _ => v.clone(),
    }
}

/// A schema of Connect type `ty` for `field`.
fn scalar(ty: &str, field: &str, optional: bool) -> Value {
    json!({"type": ty, "optional": optional, "field": field})
}

/// The schema of a column of PostgreSQL type `pg` (as `pgcdc.types` names
/// it; `_x` is an array of `x`) with date and time values as `time` writes
/// them, following Debezium's type mapping where pgcdc's rendering matches
/// it, else a string.
fn column(pg: &str, field: &str, optional: bool, time: TimeMode) -> Value {
    let mut schema = match pg.strip_prefix('_') {
        Some(elem) => {
            let mut items = column(elem, "", true, time);
            if let Some(o) = items.as_object_mut() {
                o.remove("field");
            }
            json!({"type": "array", "items": items})
        }
        None => {
            let temporal = Temporal::of(pg).and_then(|t| t.connect_type(time));
            let (ty, name) = temporal.map_or_else(|| connect_type(pg), |(t, n)| (t, Some(n)));
            match name {
                Some(n) => json!({"type": ty, "name": n, "version": 1}),
                None => json!({"type": ty}),
            }
        }
    };
    schema["optional"] = Value::Bool(optional);
    schema["field"] = Value::String(field.to_owned());
    schema
}

/// Connect type and semantic name of PostgreSQL type `pg`.
fn connect_type(pg: &str) -> (&'static str, Option<&'static str>) {
    match pg {
        "int2" => ("int16", None),
        "int4" => ("int32", None),
        "int8" | "oid" | "xid" => ("int64", None),
        "float4" => ("float", None),
        "float8" => ("double", None),
        "bool" => ("boolean", None),
        "bytea" => ("bytes", None),
        "json" | "jsonb" => ("string", Some("io.debezium.data.Json")),
        "uuid" => ("string", Some("io.debezium.data.Uuid")),
        "timestamptz" => ("string", Some("io.debezium.time.ZonedTimestamp")),
        "timetz" => ("string", Some("io.debezium.time.ZonedTime")),
        "interval" => ("string", Some("io.debezium.time.Interval")),
        // numeric and money: decimal.handling.mode = string; dates and
        // times in `iso` mode: pgcdc's ISO strings; the rest are text.
        _ => ("string", None),
    }
}

/// The `source` block's schema.
fn source() -> Value {
    json!({
        "type": "struct",
        "fields": [
            scalar("string", "version", false), scalar("string", "connector", false),
            scalar("string", "name", false), scalar("int64", "ts_ms", false),
            scalar("int64", "ts_us", true), scalar("int64", "ts_ns", true),
            {"type": "string", "optional": true, "name": "io.debezium.data.Enum", "version": 1,
             "parameters": {"allowed": SNAPSHOT_VALUES}, "default": "false", "field": "snapshot"},
            scalar("string", "db", false), scalar("string", "sequence", true),
            scalar("string", "schema", false), scalar("string", "table", false),
            scalar("int64", "txId", true), scalar("int64", "lsn", true),
            scalar("int64", "xmin", true), scalar("int64", "commit_lsn", false),
            scalar("int64", "seq", false),
        ],
        "optional": false,
        "name": SOURCE_SCHEMA,
        "field": "source",
    })
}

/// The `transaction` block's schema.
fn transaction() -> Value {
    json!({
        "type": "struct",
        "fields": [scalar("string", "id", false), scalar("int64", "total_order", false),
                   scalar("int64", "data_collection_order", false)],
        "optional": true,
        "name": TRANSACTION_SCHEMA,
        "version": 1,
        "field": "transaction",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Settings with topic prefix `shop`.
    fn shop() -> KafkaConfig {
        KafkaConfig {
            topic_prefix: "shop".into(),
            ..KafkaConfig::default()
        }
    }

    fn table() -> TableRef {
        TableRef {
            schema: "public".into(),
            name: "t".into(),
            key_columns: vec!["id".into()],
            key_source: Default::default(),
            column_types:
                r#"{"id":"int4","doc":"jsonb","at":"timestamptz","tags":"_text","n":"numeric"}"#
                    .into(),
        }
    }

    #[test]
    fn columns_get_debeziums_types_and_semantic_names() {
        let s = TableSchema::new(&shop(), &table());
        let key: Value = serde_json::from_str(&s.key).unwrap();
        assert_eq!(
            key,
            json!({"type": "struct", "optional": false, "name": "shop.public.t.Key",
                   "fields": [{"type": "int32", "optional": false, "field": "id"}]})
        );
        let value: Value = serde_json::from_str(&s.value).unwrap();
        assert_eq!(value["name"], "shop.public.t.Envelope");
        let after = &value["fields"][1];
        assert_eq!(
            (after["field"].as_str(), after["name"].as_str()),
            (Some("after"), Some("shop.public.t.Value"))
        );
        let by_field = |f: &str| {
            after["fields"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["field"] == f)
                .unwrap()
                .clone()
        };
        assert_eq!(by_field("doc")["name"], "io.debezium.data.Json");
        assert_eq!(by_field("at")["name"], "io.debezium.time.ZonedTimestamp");
        assert_eq!(
            by_field("tags")["items"],
            json!({"type": "string", "optional": true})
        );
        assert_eq!(by_field("n")["type"], "string");
        assert_eq!(value["fields"][2]["name"], SOURCE_SCHEMA);
    }

    #[test]
    fn values_declared_strings_are_sent_as_json_text() {
        let s = TableSchema::new(&shop(), &table());
        let row = json!({"id": 1, "doc": {"a": [1]}, "tags": ["x", null], "n": "1.50", "gone": 3});
        let out = s.conform(row.as_object().unwrap());
        assert_eq!(
            Value::Object(out),
            json!({"id": 1, "doc": "{\"a\":[1]}", "tags": ["x", null], "n": "1.50", "gone": 3})
        );
    }

    #[test]
    fn dates_and_times_get_debeziums_temporal_types_by_mode() {
        let mut t = table();
        t.column_types = r#"{"id":"int4","d":"date","t":"time","ts":"timestamp","ds":"_date","at":"timestamptz"}"#.into();
        let schema = |mode: TimeMode| {
            let kafka = KafkaConfig {
                time_precision_mode: mode,
                ..shop()
            };
            let value: Value = serde_json::from_str(&TableSchema::new(&kafka, &t).value).unwrap();
            let after = value["fields"][1]["fields"].as_array().unwrap().clone();
            let of = |f: &str| {
                let c = after.iter().find(|c| c["field"] == f).unwrap();
                let c = if c["type"] == "array" { &c["items"] } else { c };
                (
                    c["type"].as_str().unwrap().to_string(),
                    c["name"].as_str().map(str::to_string),
                )
            };
            ["d", "t", "ts", "ds", "at"].map(of)
        };
        let named = |ty: &str, name: &str| (ty.to_string(), Some(name.to_string()));
        let zoned = named("string", "io.debezium.time.ZonedTimestamp");
        assert_eq!(
            schema(TimeMode::Adaptive),
            [
                named("int32", "io.debezium.time.Date"),
                named("int64", "io.debezium.time.MicroTime"),
                named("int64", "io.debezium.time.MicroTimestamp"),
                named("int32", "io.debezium.time.Date"),
                zoned.clone(),
            ]
        );
        assert_eq!(
            schema(TimeMode::Connect),
            [
                named("int32", "org.apache.kafka.connect.data.Date"),
                named("int32", "org.apache.kafka.connect.data.Time"),
                named("int64", "org.apache.kafka.connect.data.Timestamp"),
                named("int32", "org.apache.kafka.connect.data.Date"),
                zoned.clone(),
            ]
        );
        let text = ("string".to_string(), None);
        assert_eq!(
            schema(TimeMode::Iso),
            [text.clone(), text.clone(), text.clone(), text, zoned]
        );
    }

    #[test]
    fn decimals_are_doubles_in_the_schema_in_double_mode() {
        let kafka = KafkaConfig {
            decimal_handling_mode: DecimalMode::Double,
            ..shop()
        };
        let value: Value = serde_json::from_str(&TableSchema::new(&kafka, &table()).value).unwrap();
        let after = value["fields"][1]["fields"].as_array().unwrap();
        let n = after.iter().find(|c| c["field"] == "n").unwrap();
        assert_eq!(n["type"], "double");
    }
}
