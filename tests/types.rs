//! Every type family renders by its documented rule (`docs/events.md`),
//! the same in the snapshot and in the stream: a "type zoo" table is
//! copied, then updated and inserted again while streaming, and each field
//! of the `r`, `u` and `c` records is compared with the others and with the
//! expected JSON. A `SQL_ASCII` database holding bytes that are not UTF-8
//! is copied without a panic (each invalid sequence becomes U+FFFD) and its
//! valid rows stream as they were copied.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use pgcdc_actors::wire::header;
use serde_json::{json, Value};

use crate::support::{config, Record};

const TOPIC: &str = "cdc-events";
/// How long a topic read may wait for the records a test expects.
const READ: Duration = Duration::from_secs(120);
/// How long a clean shutdown may take.
const STOP: Duration = Duration::from_secs(30);

/// The types, the table and two rows: edge values, then NULLs and empties.
pub(crate) const ZOO: &str = r#"
CREATE EXTENSION hstore; CREATE EXTENSION citext;
CREATE DOMAIN posint AS integer CHECK (VALUE > 0);
CREATE DOMAIN money2 AS numeric(10,2);
CREATE TYPE mood AS ENUM ('sad', 'happy');
CREATE TYPE point2 AS (x float8, y float8);
CREATE TYPE place AS (name text, at point2, tags text[], n posint);
CREATE TABLE zoo (
  id int PRIMARY KEY, dom posint, doms posint[], dnum money2, mood mood, moods mood[],
  moods2 mood[], place place, places place[], nullf place, m money, mmin money, h hstore,
  ci citext, r int4range, er int4range, tr tstzrange, b bit(4), vb varbit, tsv tsvector,
  pt point, bx box, bxs box[], x xml, jb jsonb, d date, tsz timestamptz, f8s float8[],
  ea int[], i2d int[], c char(3));
INSERT INTO zoo VALUES (1, 42, '{1,2}', 1.5, 'happy', '{happy,sad}', '{{happy,sad},{sad,NULL}}',
  ROW(E'a "q" \\ b, c', ROW(1.5, 'NaN'), '{x,"y z"}', 7),
  ARRAY[ROW('p', ROW(1, 2), '{}', NULL)::place, NULL], ROW(NULL, NULL, NULL, NULL),
  -1234567.89, '-92233720368547758.08', 'a=>1, "b c"=>NULL, "q\""=>"x"', 'MiXed', '[1,5)', 'empty',
  '[2024-01-01 00:00:00+00,infinity)', B'1010', B'101', 'a fat cat', '(1,2)', '((0,0),(2,2))',
  '{(1,1),(0,0);(3,3),(2,2)}', '<a>1</a>',
  '{"big": 123456789012345678901234567890, "f": 1.50, "n": [null, 0.1]}',
  'infinity', '-infinity', '{NaN,Infinity,-Infinity,0.5}', '{}', '{{1,2},{3,4}}', 'ab');
INSERT INTO zoo (id, moods, h, ea) VALUES (2, '{}', '', '{}');
"#;

/// Columns rendered as PostgreSQL's text form: the expected value is what
/// `::text` gives.
const TEXT_COLUMNS: [&str; 12] = [
    "ci", "r", "er", "tr", "b", "vb", "tsv", "pt", "bx", "x", "d", "tsz",
];

/// The expected `after` of row 1, except the text-form columns.
fn expected_row_1() -> Value {
    json!({
        "id": 1, "dom": 42, "doms": [1, 2], "dnum": "1.50", "mood": "happy",
        "moods": ["happy", "sad"], "moods2": [["happy", "sad"], ["sad", null]],
        "place": {"name": "a \"q\" \\ b, c", "at": {"x": 1.5, "y": "NaN"}, "tags": ["x", "y z"], "n": 7},
        "places": [{"name": "p", "at": {"x": 1.0, "y": 2.0}, "tags": [], "n": null}, null],
        "nullf": {"name": null, "at": null, "tags": null, "n": null},
        "m": "-1234567.89", "mmin": "-92233720368547758.08",
        "h": {"a": "1", "b c": null, "q\"": "x"},
        "bxs": ["(1,1),(0,0)", "(3,3),(2,2)"],
        "f8s": ["NaN", "Infinity", "-Infinity", 0.5], "ea": [], "i2d": [[1, 2], [3, 4]], "c": "ab ",
    })
}

/// The record of `op` for row `id`.
fn record<'a>(records: &'a [Record], op: &str, id: i64) -> &'a Record {
    records
        .iter()
        .find(|r| r.op() == op && r.after()["id"] == json!(id))
        .unwrap_or_else(|| panic!("no {op} record for id {id}"))
}

/// `a` and `b` agree field by field (named on failure) and as bytes.
fn assert_same_after(a: &Record, b: &Record, what: &str) {
    let (a, b) = (
        a.after().as_object().unwrap(),
        b.after().as_object().unwrap(),
    );
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "{what}"
    );
    for (k, v) in a {
        assert_eq!(v, &b[k], "{what}: column {k}");
    }
    assert_eq!(
        serde_json::to_vec(a).unwrap(),
        serde_json::to_vec(b).unwrap(),
        "{what}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_family_renders_by_its_rule_alike_in_snapshot_and_stream() {
    let (pg, tansu, dir, db) = crate::support::pg_and_tansu().await;
    db.batch_execute(ZOO).await.unwrap();
    // The text forms as pgcdc's sessions print them.
    db.batch_execute("SET timezone = 'UTC'; SET datestyle = 'ISO,YMD'")
        .await
        .unwrap();
    let mut texts = serde_json::Map::new();
    for c in TEXT_COLUMNS {
        let q = format!("SELECT {c}::text FROM zoo WHERE id = 1");
        let text: String = db.query_one(&q, &[]).await.unwrap().get(0);
        texts.insert(c.to_owned(), Value::String(text));
    }
    let cfg = config(&pg, &tansu, &dir.path().join("state"), &["zoo"], "");
    let mut daemon = crate::support::daemon(dir.path(), &cfg, &[]);
    crate::support::wait_slot_active(&db, &mut daemon, "pgcdc").await;
    db.batch_execute(
        "UPDATE zoo SET id = id; INSERT INTO zoo SELECT 3, dom, doms, dnum, mood, moods, moods2, \
         place, places, nullf, m, mmin, h, ci, r, er, tr, b, vb, tsv, pt, bx, bxs, x, jb, d, tsz, \
         f8s, ea, i2d, c FROM zoo WHERE id = 1",
    )
    .await
    .unwrap();
    let records = crate::support::read_until(&tansu, TOPIC, READ, |rs| {
        rs.iter().filter(|r| r.op() == "u").count() == 2 && rs.iter().any(|r| r.op() == "c")
    });
    for id in [1, 2] {
        let (read, update) = (record(&records, "r", id), record(&records, "u", id));
        assert_same_after(read, update, &format!("row {id}, snapshot vs stream"));
        assert_eq!(read.key_bytes, update.key_bytes, "row {id}");
        assert_eq!(read.header(header::TYPES), update.header(header::TYPES));
    }
    let read = record(&records, "r", 1).after().as_object().unwrap();
    let mut want = expected_row_1().as_object().unwrap().clone();
    want.extend(texts);
    for (k, v) in read {
        if k == "jb" {
            continue;
        }
        assert_eq!(Some(v), want.get(k), "column {k}");
    }
    assert_eq!(read.len(), want.len() + 1, "every column is checked");
    let jb = serde_json::to_string(&read["jb"]).unwrap();
    assert_eq!(
        jb,
        r#"{"big":123456789012345678901234567890,"f":1.50,"n":[null,0.1]}"#
    );
    // A type's name says its values' shape: a domain its base type's.
    let types: Value =
        serde_json::from_str(record(&records, "c", 3).header(header::TYPES)).unwrap();
    let named = |c: &str| types[c].as_str().unwrap_or("absent").to_owned();
    let names: Vec<String> = [
        "dom", "doms", "dnum", "mood", "moods", "place", "places", "h", "ci", "pt", "id",
    ]
    .map(named)
    .to_vec();
    assert_eq!(
        names,
        [
            "int4", "_int4", "numeric", "unknown", "_unknown", "record", "_record", "hstore",
            "unknown", "unknown", "int4"
        ]
    );
    let mut inserted = record(&records, "c", 3).after().clone();
    inserted["id"] = json!(1);
    assert_eq!(&inserted, record(&records, "r", 1).after());
    let empty = record(&records, "r", 2).after();
    assert_eq!(
        (&empty["moods"], &empty["h"], &empty["ea"], &empty["place"]),
        (&json!([]), &json!({}), &json!([]), &Value::Null)
    );
    assert_eq!(daemon.terminate(STOP).unwrap().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sql_ascii_database_with_invalid_utf8_is_copied_lossily_without_a_panic() {
    let (pg, tansu, dir, admin) = crate::support::pg_and_tansu().await;
    admin
        .batch_execute(
            "CREATE DATABASE ascii ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0",
        )
        .await
        .unwrap();
    let url = pg.url().replace("dbname=postgres", "dbname=ascii");
    let db = pgcdc_testkit::pg::connect(&url, Duration::from_secs(30))
        .await
        .unwrap();
    db.batch_execute(
        "CREATE TYPE pair AS (a text, b text);
         CREATE TABLE latin (id int PRIMARY KEY, t text, tags text[], p pair, n int);
         INSERT INTO latin VALUES (1, E'caf\\xe9 ok', ARRAY[E'\\xff', 'x'], ROW(E'\\xe9', 'b'), 5),
                                  (2, 'plain', '{}', NULL, NULL);",
    )
    .await
    .unwrap();
    let cfg = config(&pg, &tansu, &dir.path().join("state"), &["latin"], "")
        .replace("database = \"postgres\"", "database = \"ascii\"");
    let mut daemon = crate::support::daemon(dir.path(), &cfg, &[]);
    crate::support::wait_slot_active(&db, &mut daemon, "pgcdc").await;
    // Only the valid row is changed: PostgreSQL refuses to send text that
    // is not UTF-8 over the stream's UTF8 connection (SQLSTATE 22021).
    db.batch_execute("UPDATE latin SET id = id WHERE id = 2")
        .await
        .unwrap();
    let records =
        crate::support::read_until(&tansu, TOPIC, READ, |rs| rs.iter().any(|r| r.op() == "u"));
    let (read, update) = (record(&records, "r", 2), record(&records, "u", 2));
    assert_same_after(read, update, "row 2, snapshot vs stream");
    assert_eq!(
        record(&records, "r", 1).after(),
        &json!({"id": 1, "t": "caf\u{fffd} ok", "tags": ["\u{fffd}", "x"],
                "p": {"a": "\u{fffd}", "b": "b"}, "n": 5})
    );
    assert!(daemon.is_running(), "the daemon is still running");
    assert!(!daemon.log_text().contains("panicked"), "no panic");
    assert_eq!(daemon.terminate(STOP).unwrap().code(), Some(0));
}
