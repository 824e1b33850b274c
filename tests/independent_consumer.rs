//! An independent client reads pgcdc's `connect-json` records: the
//! confluent-kafka Python consumer (`tests/connect_consumer.py`) rebuilds
//! rows from each record's Kafka Connect schema and payload alone, and the
//! rows equal PostgreSQL's.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::support::{config, pg_and_tansu, wait_slot_active, Broker};

const TOPIC: &str = "cdc-events";

/// The rows `tests/connect_consumer.py` prints for the first `count`
/// change records of `topic`.
fn python_consumer(brokers: &str, topic: &str, count: usize) -> Vec<Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/connect_consumer.py");
    let out = Command::new("python3")
        .arg(script)
        .args([brokers, topic, &count.to_string(), "60"])
        .output()
        .expect("python3 (scripts/install-deps.sh installs confluent-kafka)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "consumer failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confluent_kafka_rebuilds_connect_json_rows_equal_to_postgres() {
    let (pg, tansu, dir, db) = pg_and_tansu().await;
    db.batch_execute(
        "CREATE TABLE wares (id int PRIMARY KEY, qty smallint, big bigint, price numeric(10,2),
            ratio float8, ok bool, name text, blob bytea, doc jsonb, raw json, ref uuid, day date,
            at_time time, at timestamp, at_tz timestamptz, tags text[], nums int[]);
         INSERT INTO wares VALUES (1, 3, 9000000000, 12.50, 0.25, true, 'snap', '\\x00ff10',
            '{\"a\": [1, {\"b\": null}]}', '[1, 2]', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
            '2024-02-29', '13:14:15.5', '2018-06-20 15:13:16.945104', '2024-01-02 03:04:05+02',
            '{x,NULL}', '{1,2}');",
    )
    .await
    .unwrap();
    let state = dir.path().join("state");
    let extra = "format = \"connect-json\"\ntime_precision_mode = \"adaptive\"\n";
    let cfg = config(&pg, &tansu, &state, &["wares"], extra);
    let mut daemon = crate::support::daemon(dir.path(), &cfg, &[]);
    wait_slot_active(&db, &mut daemon, "pgcdc").await;
    db.batch_execute(
        "INSERT INTO wares VALUES (2, NULL, -1, -0.01, -1.5e10, false, 'héllo \"q\"', '\\x', 'null',
            '{}', NULL, '1969-12-31', '00:00:00', '1969-12-31 23:59:59.5', NULL, '{}', NULL);
         UPDATE wares SET name = 'changed', day = '2000-03-01' WHERE id = 1;",
    )
    .await
    .unwrap();
    let changes = python_consumer(&tansu.brokers(), TOPIC, 3);
    let ops: Vec<&str> = changes.iter().map(|c| c["op"].as_str().unwrap()).collect();
    assert_eq!(ops, ["r", "c", "u"]);
    // The latest row of each key, as the consumer rebuilt it, equals PostgreSQL's.
    for change in &changes[1..] {
        let id = change["key"]["id"].as_i64().unwrap();
        let row = change["row"].to_string();
        let equal: bool = db
            .query_one(
                "SELECT to_jsonb(jsonb_populate_record(NULL::wares, $1::text::jsonb)) = to_jsonb(w)
                 FROM wares w WHERE id = $2",
                &[&row, &(id as i32)],
            )
            .await
            .unwrap()
            .get(0);
        assert!(equal, "row {id} rebuilt as {row}");
    }
    assert_eq!(changes[0]["row"]["day"], "2024-02-29");
    assert_eq!(changes[0]["row"]["blob"], "\\x00ff10");
    let status = daemon.terminate(Duration::from_secs(30)).unwrap();
    assert_eq!(status.code(), Some(0), "log:\n{}", daemon.log_text());
}
