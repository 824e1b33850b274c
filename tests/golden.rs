//! Golden tests: the key and value pgcdc writes for one row of every type
//! family equal, field by field, the records Debezium's PostgreSQL connector
//! documents (`tests/golden/*.json`, written from its documented events and
//! type mappings), except where a golden file lists a documented difference.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::support::{config, pg_and_tansu, wait_slot_active};

const TOPIC: &str = "cdc-events";
/// The golden table and the row the golden files describe.
const TABLE_SQL: &str = include_str!("golden/table.sql");
const ROW_SQL: &str = include_str!("golden/row.sql");
/// Marks a field that exists on one side only.
const ABSENT: &str = "$absent";

/// A golden file.
fn golden(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// The `[kafka]` settings a golden file was written for.
fn kafka_settings(golden: &Value) -> String {
    golden["settings"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| format!("{k} = {v}\n"))
        .collect()
}

/// The slot of `path` (segments `/name`, or `/[field]` for the element of
/// a Connect `fields` array with that `field`) in `doc`.
fn slot<'v>(doc: &'v mut Value, path: &str) -> (&'v mut Value, String) {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (last, parents) = segments.split_last().unwrap();
    let mut at = doc;
    for s in parents {
        at = match s.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            Some(field) => at
                .as_array_mut()
                .unwrap()
                .iter_mut()
                .find(|f| f["field"] == *field)
                .unwrap_or_else(|| panic!("{path}: no field {field}")),
            None => at.get_mut(*s).unwrap_or_else(|| panic!("{path}: no {s}")),
        };
    }
    (at, (*last).to_string())
}

/// Read the value at `path`, `None` if absent.
fn get(doc: &mut Value, path: &str) -> Option<Value> {
    let (parent, last) = slot(doc, path);
    match last.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
        Some(field) => parent
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["field"] == field)
            .cloned(),
        None => parent.get(&last).cloned(),
    }
}

/// Set (or with `$absent` remove) the value at `path`.
fn set(doc: &mut Value, path: &str, value: &Value) {
    let (parent, last) = slot(doc, path);
    let absent = value == ABSENT;
    match last.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
        Some(field) => {
            let fields = parent.as_array_mut().unwrap();
            fields.retain(|f| f["field"] != field);
            if !absent {
                fields.push(value.clone());
            }
        }
        None => {
            let object = parent.as_object_mut().unwrap();
            object.remove(&last);
            if !absent {
                object.insert(last, value.clone());
            }
        }
    }
}

/// Debezium's record (`key`, `value`) with each documented difference of
/// the golden file applied, after checking that the golden file states
/// Debezium's side of it.
fn expected(golden: &Value) -> Value {
    let mut doc = serde_json::json!({"key": golden["key"], "value": golden["value"]});
    for d in golden["differences"].as_array().unwrap() {
        let path = d["path"].as_str().unwrap();
        assert!(
            d["why"].as_str().is_some_and(|w| !w.is_empty()),
            "{path}: a difference says why"
        );
        let debezium = get(&mut doc, path).unwrap_or_else(|| Value::String(ABSENT.into()));
        assert_eq!(
            debezium, d["debezium"],
            "{path}: golden value vs difference"
        );
        set(&mut doc, path, &d["pgcdc"]);
    }
    doc
}

/// Every mismatch between `want` (with `$int`/`$string` placeholders for
/// values that vary per run) and `got`, by path. Objects must have the same
/// keys; arrays of Connect fields are matched by `field` name.
fn compare(path: &str, want: &Value, got: &Value, out: &mut Vec<String>) {
    match (want, got) {
        (Value::String(p), _) if p == "$int" => {
            if !got.is_i64() && !got.is_u64() {
                out.push(format!("{path}: want an integer, got {got}"));
            }
        }
        (Value::String(p), _) if p == "$string" => {
            if !got.is_string() {
                out.push(format!("{path}: want a string, got {got}"));
            }
        }
        (Value::Object(w), Value::Object(g)) => compare_objects(path, w, g, out),
        (Value::Array(w), Value::Array(g)) if is_fields(w) && is_fields(g) => {
            let by_name = |a: &[Value]| -> Map<String, Value> {
                a.iter()
                    .map(|f| (f["field"].as_str().unwrap().to_string(), f.clone()))
                    .collect()
            };
            compare_objects(path, &by_name(w), &by_name(g), out);
        }
        (Value::Array(w), Value::Array(g)) if w.len() == g.len() => {
            for (i, (w, g)) in w.iter().zip(g).enumerate() {
                compare(&format!("{path}/{i}"), w, g, out);
            }
        }
        _ if want == got => {}
        _ => out.push(format!("{path}: want {want}, got {got}")),
    }
}

/// Whether `a` is a Connect struct's `fields` array.
fn is_fields(a: &[Value]) -> bool {
    !a.is_empty() && a.iter().all(|f| f["field"].is_string())
}

/// [`compare`] for two objects: the same keys, each value compared.
fn compare_objects(
    path: &str,
    w: &Map<String, Value>,
    g: &Map<String, Value>,
    out: &mut Vec<String>,
) {
    for (k, wv) in w {
        match g.get(k) {
            Some(gv) => compare(&format!("{path}/{k}"), wv, gv, out),
            None => out.push(format!("{path}/{k}: missing")),
        }
    }
    for k in g.keys().filter(|k| !w.contains_key(*k)) {
        out.push(format!("{path}/{k}: not in the golden record"));
    }
}

/// Run pgcdc with the golden file's settings, insert the golden row and
/// compare its record with the golden one.
async fn check(name: &str) {
    let golden = golden(name);
    let (pg, tansu, dir, db) = pg_and_tansu().await;
    db.batch_execute(TABLE_SQL).await.unwrap();
    let state = dir.path().join("state");
    let cfg = config(&pg, &tansu, &state, &["golden"], &kafka_settings(&golden));
    let mut daemon = crate::support::daemon(dir.path(), &cfg, &[]);
    wait_slot_active(&db, &mut daemon, "pgcdc").await;
    db.batch_execute(ROW_SQL).await.unwrap();
    let records =
        crate::support::read_until(&tansu, TOPIC, Duration::from_secs(60), |r| !r.is_empty());
    let got = serde_json::json!({"key": records[0].key, "value": records[0].value});
    let mut mismatches = Vec::new();
    compare("", &expected(&golden), &got, &mut mismatches);
    assert!(mismatches.is_empty(), "{name}:\n{}", mismatches.join("\n"));
    if golden["settings"]["format"] == "connect-json" {
        // Documented: row fields are ordered by column name, not position.
        let after = &got["value"]["schema"]["fields"][1]["fields"];
        let names: Vec<&str> = after
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["field"].as_str().unwrap())
            .collect();
        assert!(names.windows(2).all(|w| w[0] < w[1]), "{names:?}");
    }
    let status = daemon.terminate(Duration::from_secs(30)).unwrap();
    assert_eq!(status.code(), Some(0), "log:\n{}", daemon.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_adaptive_matches_debeziums_documented_record() {
    check("json-adaptive.json").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_json_adaptive_matches_debeziums_documented_record() {
    check("connect-json-adaptive.json").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_json_connect_double_matches_debeziums_documented_record() {
    check("connect-json-connect-double.json").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_adaptive_matches_debeziums_new_record_state() {
    check("row-adaptive.json").await;
}

#[test]
fn the_comparison_catches_a_wrong_type_a_missing_field_and_an_extra_field() {
    let want = serde_json::json!({"a": "$int", "f": [{"field": "x", "type": "int32"}], "b": 1});
    let got = serde_json::json!({"a": "1", "f": [{"field": "x", "type": "int64"}], "c": 1});
    let mut out = Vec::new();
    compare("", &want, &got, &mut out);
    assert_eq!(
        out,
        [
            "/a: want an integer, got \"1\"",
            "/b: missing",
            "/f/x/type: want \"int32\", got \"int64\"",
            "/c: not in the golden record"
        ]
    );
}
