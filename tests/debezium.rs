//! Drop-in for Debezium's consumers: records land on the partitions the
//! Java client would choose (pgcdc's murmur2 is checked against the Java
//! client's published values in its unit test).

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::Duration;

use pgcdc_actors::kafka_producer::java_partition;
use pgcdc_actors::wire::header;
use serde_json::{json, Map, Value};

use crate::support::{config, pg_and_tansu, wait_slot_active, Broker, Record};

const TOPIC: &str = "cdc-events";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_land_on_the_partitions_the_java_client_would_choose() {
    let (pg, tansu, dir, db) = pg_and_tansu().await;
    db.batch_execute("CREATE TABLE accounts (id int PRIMARY KEY, region text, note text)")
        .await
        .unwrap();
    let state = dir.path().join("state");
    let cfg = config(&pg, &tansu, &state, &["accounts"], "")
        .replace("topic_partitions = 1\n", "topic_partitions = 3\n");
    let mut daemon = crate::support::daemon(dir.path(), &cfg, &[]);
    wait_slot_active(&db, &mut daemon, "pgcdc").await;
    db.batch_execute(
        "INSERT INTO accounts SELECT g, 'r' || (g % 7), md5(g::text) FROM generate_series(1, 60) g",
    )
    .await
    .unwrap();
    let records =
        crate::support::read_until(&tansu, TOPIC, Duration::from_secs(60), |r| r.len() >= 60);
    assert_eq!(records.len(), 60);
    let mut used = BTreeSet::new();
    for r in &records {
        let key = r.key_bytes.as_deref().unwrap();
        assert_eq!(
            r.partition,
            java_partition(key, 3),
            "key {}",
            String::from_utf8_lossy(key)
        );
        used.insert(r.partition);
    }
    assert_eq!(used.len(), 3, "60 keys should use every partition");
    let status = daemon.terminate(Duration::from_secs(30)).unwrap();
    assert_eq!(status.code(), Some(0), "log:\n{}", daemon.log_text());
}

/// Each key's partition in `records`; fails if a key is on two.
fn partitions_by_key(records: &[Record]) -> BTreeMap<String, i32> {
    let mut at = BTreeMap::new();
    for r in records.iter().filter(|r| r.op() != "t") {
        let key = String::from_utf8_lossy(r.key_bytes.as_deref().unwrap()).into_owned();
        let first = *at.entry(key.clone()).or_insert(r.partition);
        assert_eq!(r.partition, first, "key {key} moved");
    }
    at
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_added_to_the_topic_leave_every_row_on_its_partition() {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;

    let (pg, tansu, dir, db) = pg_and_tansu().await;
    db.batch_execute("CREATE TABLE accounts (id int PRIMARY KEY, n int)")
        .await
        .unwrap();
    let state = dir.path().join("state");
    let port = crate::support::free_port();
    let cfg = config(&pg, &tansu, &state, &["accounts"], "")
        .replace("topic_partitions = 1\n", "topic_partitions = 3\n");
    let cfg = pgcdc_testkit::config::with_metrics(&cfg, port);
    let mut daemon = crate::support::daemon(dir.path(), &cfg, &[]);
    wait_slot_active(&db, &mut daemon, "pgcdc").await;
    db.batch_execute("INSERT INTO accounts SELECT g, 0 FROM generate_series(1, 60) g")
        .await
        .unwrap();
    let read = |n: usize| {
        crate::support::read_until(&tansu, TOPIC, Duration::from_secs(60), |r| r.len() >= n)
    };
    let first = partitions_by_key(&read(60));
    let java = |k: &String, n| java_partition(k.as_bytes(), n);
    assert!(first.iter().all(|(k, p)| *p == java(k, 3)));
    // Under six partitions most keys would move.
    let moving = first.keys().filter(|k| java(k, 6) != java(k, 3));
    assert!(moving.count() > 20);
    let status = daemon.terminate(Duration::from_secs(30)).unwrap();
    assert_eq!(status.code(), Some(0), "log:\n{}", daemon.log_text());

    // tansu cannot add partitions to a topic: the topic is made again with
    // six instead, which pgcdc sees as partitions added.
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", tansu.brokers())
        .create()
        .unwrap();
    let opts = AdminOptions::new();
    let deleted = admin.delete_topics(&[TOPIC], &opts).await.unwrap();
    assert!(deleted.iter().all(Result::is_ok), "{deleted:?}");
    let six = NewTopic::new(TOPIC, 6, TopicReplication::Fixed(1));
    let created = admin.create_topics(&[six], &opts).await.unwrap();
    assert!(created.iter().all(Result::is_ok), "{created:?}");

    let path = dir.path().join("one-shot.toml");
    std::fs::write(&path, &cfg).unwrap();
    let out = crate::support::pgcdc(&path, &["check"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let said = "cdc-events has 6 partitions, 3 when pgcdc first wrote to it";
    assert!(
        text.contains("WARN  kafka:") && text.contains(said),
        "{text}"
    );

    let mut daemon = crate::support::daemon(dir.path(), &cfg, &[]);
    wait_slot_active(&db, &mut daemon, "pgcdc").await;
    let log = daemon.log_text();
    assert!(log.contains("partitions were added to the topic"), "{log}");
    let probe = crate::support::Probe::on(port);
    let added = crate::support::sample(
        &probe.metrics().await,
        "pgcdc_kafka_partitions_added",
        &[("topic", TOPIC)],
    );
    assert_eq!(added, Some(3.0));
    db.batch_execute("UPDATE accounts SET n = 1; TRUNCATE accounts")
        .await
        .unwrap();
    let all = read(61);
    assert_eq!(partitions_by_key(&all), first);
    let truncate = all.iter().find(|r| r.op() == "t").unwrap();
    assert!(truncate.partition < 3, "{}", truncate.partition);
    let status = daemon.terminate(Duration::from_secs(30)).unwrap();
    assert_eq!(status.code(), Some(0), "log:\n{}", daemon.log_text());
}

/// The `transaction` block of a data record: (id, total_order, data_collection_order).
fn place(r: &Record) -> (String, u64, u64) {
    let t = &r.value.as_ref().unwrap()["transaction"];
    (
        t["id"].as_str().unwrap().to_string(),
        t["total_order"].as_u64().unwrap(),
        t["data_collection_order"].as_u64().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_metadata_counts_match_the_events_on_the_data_topics() {
    let (pg, tansu, dir, db) = pg_and_tansu().await;
    db.batch_execute(
        "CREATE TABLE a (id int PRIMARY KEY, v text); CREATE TABLE b (id int PRIMARY KEY, v text);",
    )
    .await
    .unwrap();
    let state = dir.path().join("state");
    let cfg = config(
        &pg,
        &tansu,
        &state,
        &["a", "b"],
        "transaction_metadata = true\n",
    );
    let mut daemon = crate::support::daemon(dir.path(), &cfg, &[]);
    wait_slot_active(&db, &mut daemon, "pgcdc").await;
    db.batch_execute(
        "BEGIN; INSERT INTO a VALUES (1, 'x'), (2, 'y'); INSERT INTO b VALUES (1, 'z');
         UPDATE a SET v = 'w' WHERE id = 1; DELETE FROM b WHERE id = 1; COMMIT;
         INSERT INTO b VALUES (7, 'solo');",
    )
    .await
    .unwrap();
    let meta =
        crate::support::read_until(&tansu, "pgcdc.transaction", Duration::from_secs(60), |r| {
            r.len() >= 4
        });
    let status: Vec<&str> = meta
        .iter()
        .map(|r| r.value.as_ref().unwrap()["status"].as_str().unwrap())
        .collect();
    assert_eq!(status, ["BEGIN", "END", "BEGIN", "END"]);
    let data: Vec<Record> =
        crate::support::read_until(&tansu, TOPIC, Duration::from_secs(60), |r| {
            r.iter().filter(|r| r.value.is_some()).count() >= 6
        })
        .into_iter()
        .filter(|r| r.value.is_some())
        .collect();
    check_ends(&meta, &data);
    let first = &meta[1].value.as_ref().unwrap()["data_collections"];
    assert_eq!(
        *first,
        json!([{"data_collection": "public.a", "event_count": 3},
               {"data_collection": "public.b", "event_count": 2}])
    );
    let status = daemon.terminate(Duration::from_secs(30)).unwrap();
    assert_eq!(status.code(), Some(0), "log:\n{}", daemon.log_text());
}

/// Every END event of `meta` counts exactly the changes of `data` placed in
/// its transaction, whose places run 1, 2, … in total and per table.
fn check_ends(meta: &[Record], data: &[Record]) {
    for end in meta
        .iter()
        .filter_map(|r| r.value.as_ref())
        .filter(|v| v["status"] == "END")
    {
        let id = end["id"].as_str().unwrap();
        let mine: Vec<&Record> = data.iter().filter(|r| place(r).0 == id).collect();
        assert_eq!(
            end["event_count"].as_u64(),
            Some(mine.len() as u64),
            "{end}"
        );
        let xid = mine[0].value.as_ref().unwrap()["source"]["txId"]
            .as_u64()
            .unwrap();
        let commit = mine[0].value.as_ref().unwrap()["source"]["commit_lsn"]
            .as_u64()
            .unwrap();
        assert_eq!(id, format!("{xid}:{commit}"));
        let totals: Vec<u64> = mine.iter().map(|r| place(r).1).collect();
        assert_eq!(totals, (1..=mine.len() as u64).collect::<Vec<_>>());
        for c in end["data_collections"].as_array().unwrap() {
            let table = c["data_collection"].as_str().unwrap();
            let orders: Vec<u64> = mine
                .iter()
                .filter(|r| r.header(header::TABLE) == table)
                .map(|r| place(r).2)
                .collect();
            assert_eq!(
                orders,
                (1..=c["event_count"].as_u64().unwrap()).collect::<Vec<_>>(),
                "{table}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_transactions_sharing_batches_keeps_each_ones_metadata() {
    let (pg, tansu, dir, db) = pg_and_tansu().await;
    db.batch_execute("CREATE TABLE a (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let cfg = config(
        &pg,
        &tansu,
        &dir.path().join("state"),
        &["a"],
        "transaction_metadata = true\n",
    );
    let mut daemon = crate::support::daemon(dir.path(), &cfg, &[]);
    // Stopped before its initial snapshot is over, pgcdc would copy the table
    // again on the next start, and the rows below would arrive twice.
    daemon
        .wait_streaming(Duration::from_secs(60))
        .await
        .unwrap();
    daemon.terminate(Duration::from_secs(30)).unwrap();
    // Small transactions share batches; the big one is split over several.
    let singles = |from: i32, to: i32| {
        format!("DO $$ BEGIN FOR i IN {from}..{to} LOOP INSERT INTO a VALUES (i, 's'); COMMIT; END LOOP; END $$")
    };
    db.batch_execute(&singles(1, 300)).await.unwrap();
    db.batch_execute("INSERT INTO a SELECT g, 'big' FROM generate_series(1001, 3500) g")
        .await
        .unwrap();
    db.batch_execute(&singles(4001, 4300)).await.unwrap();
    daemon.spawn().unwrap();
    const TXS: usize = 601;
    let meta =
        crate::support::read_until(&tansu, "pgcdc.transaction", Duration::from_secs(120), |r| {
            r.len() >= 2 * TXS
        });
    let status: Vec<&str> = meta
        .iter()
        .map(|r| r.value.as_ref().unwrap()["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        status,
        ["BEGIN", "END"].repeat(TXS),
        "one BEGIN and END each, in order"
    );
    let data: Vec<Record> =
        crate::support::read_until(&tansu, TOPIC, Duration::from_secs(120), |r| r.len() >= 3100)
            .into_iter()
            .filter(|r| r.value.is_some())
            .collect();
    let offsets: HashSet<(i32, i64)> = data.iter().map(|r| (r.partition, r.offset)).collect();
    let keys: HashSet<String> = data.iter().map(|r| format!("{:?}", r.key)).collect();
    assert_eq!(
        data.len(),
        3100,
        "each change once: {} records at {} offsets of {} keys; pgcdc log tail:\n{}",
        data.len(),
        offsets.len(),
        keys.len(),
        daemon.log_tail()
    );
    check_ends(&meta, &data);
    let big = meta
        .iter()
        .filter_map(|r| r.value.as_ref())
        .filter(|v| v["event_count"] == 2500);
    assert_eq!(big.count(), 1, "the big transaction ends once, whole");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_pipeline_publishes_heartbeats_with_the_lsn_reached() {
    let (pg, tansu, dir, db) = pg_and_tansu().await;
    db.batch_execute("CREATE TABLE quiet (id int PRIMARY KEY)")
        .await
        .unwrap();
    let state = dir.path().join("state");
    let cfg = config(&pg, &tansu, &state, &["quiet"], "heartbeats = true\n")
        + "\n[wal]\nheartbeat_secs = 1\ncheck_interval_secs = 1\n";
    let mut daemon = crate::support::daemon(dir.path(), &cfg, &[]);
    wait_slot_active(&db, &mut daemon, "pgcdc").await;
    let lsn = |r: &Record| r.value.as_ref().unwrap()["lsn"].as_u64();
    let beats = crate::support::read_until(
        &tansu,
        "__debezium-heartbeat.pgcdc",
        Duration::from_secs(60),
        |r| {
            let reached: BTreeSet<u64> = r.iter().filter_map(lsn).collect();
            reached.len() >= 2
        },
    );
    assert!(beats
        .iter()
        .all(|r| r.key == Some(json!({"serverName": "pgcdc"}))));
    let lsns: Vec<u64> = beats.iter().filter_map(lsn).collect();
    assert!(lsns.windows(2).all(|w| w[0] <= w[1]), "{lsns:?}");
    let times: Vec<i64> = beats
        .iter()
        .map(|r| r.value.as_ref().unwrap()["ts_ms"].as_i64().unwrap())
        .collect();
    assert!(times.windows(2).all(|w| w[0] < w[1]), "{times:?}");
    // The WAL heartbeats move the slot: the LSN reached moves on while idle.
    assert!(beats.len() >= 2 && lsns.last() > lsns.first(), "{lsns:?}");
    let status = daemon.terminate(Duration::from_secs(30)).unwrap();
    assert_eq!(status.code(), Some(0), "log:\n{}", daemon.log_text());
}

/// The configs of `topic` as the broker describes them.
async fn describe_topic(brokers: &str, topic: &str) -> BTreeMap<String, String> {
    use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let described = admin
        .describe_configs(&[ResourceSpecifier::Topic(topic)], &AdminOptions::new())
        .await
        .unwrap();
    let resource = described.into_iter().next().unwrap().unwrap();
    resource
        .entries
        .into_iter()
        .filter_map(|e| Some((e.name, e.value?)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_configs_are_applied_and_retention_outliving_gc_deletes_is_warned_about() {
    let (pg, tansu, dir, db) = pg_and_tansu().await;
    db.batch_execute("CREATE TABLE kept (id int PRIMARY KEY)")
        .await
        .unwrap();
    let state = dir.path().join("state");
    let extra =
        "[kafka.topic_config]\n\"cleanup.policy\" = \"compact,delete\"\n\"retention.ms\" = \"-1\"\n";
    let cfg = config(&pg, &tansu, &state, &["kept"], extra);
    let mut daemon = crate::support::daemon(dir.path(), &cfg, &[]);
    wait_slot_active(&db, &mut daemon, "pgcdc").await;
    let configs = describe_topic(&tansu.brokers(), TOPIC).await;
    assert_eq!(
        configs.get("cleanup.policy").map(String::as_str),
        Some("compact,delete"),
        "{configs:?}"
    );
    assert_eq!(
        configs.get("retention.ms").map(String::as_str),
        Some("-1"),
        "{configs:?}"
    );
    // Kept forever, the topic outlives the mirror's 30 days of delete versions.
    let warning = "topic retention is longer than elasticsearch.gc_deletes";
    assert!(daemon.log_text().contains(warning), "{}", daemon.log_tail());
    let status = daemon.terminate(Duration::from_secs(30)).unwrap();
    assert_eq!(status.code(), Some(0), "log:\n{}", daemon.log_text());
}

/// A column's value rebuilt from its Connect schema alone, as PostgreSQL
/// input: bytes decoded from base64 (as bytea text), JSON text parsed.
fn from_connect(schema: &Value, value: &Value) -> Value {
    use base64::Engine;
    match (schema["type"].as_str(), schema["name"].as_str(), value) {
        (_, _, Value::Null) => Value::Null,
        (Some("bytes"), _, Value::String(b64)) => {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap();
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            Value::String(format!("\\x{hex}"))
        }
        (_, Some("io.debezium.data.Json"), Value::String(text)) => {
            serde_json::from_str(text).unwrap()
        }
        (Some("array"), _, Value::Array(items)) => Value::Array(
            items
                .iter()
                .map(|i| from_connect(&schema["items"], i))
                .collect(),
        ),
        _ => value.clone(),
    }
}

/// Whether `value` is of the Connect type `schema` declares (as
/// `JsonConverter` checks it before any sink connector sees it).
fn conforms(schema: &Value, value: &Value) -> bool {
    match (schema["type"].as_str().unwrap(), value) {
        (_, Value::Null) => schema["optional"] == json!(true),
        ("int16" | "int32" | "int64", v) => v.is_i64(),
        ("float" | "double", v) => v.is_number(),
        ("boolean", v) => v.is_boolean(),
        ("string" | "bytes", v) => v.is_string(),
        ("array", Value::Array(items)) => items.iter().all(|i| conforms(&schema["items"], i)),
        _ => false,
    }
}

/// The `after` row of a connect-json record, rebuilt from its schema and payload.
fn connect_row(value: &Value) -> Map<String, Value> {
    let fields = value["schema"]["fields"].as_array().unwrap();
    let after = fields.iter().find(|f| f["field"] == "after").unwrap();
    let payload = &value["payload"]["after"];
    after["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let name = f["field"].as_str().unwrap();
            assert!(conforms(f, &payload[name]), "{name}: {}", payload[name]);
            (name.to_string(), from_connect(f, &payload[name]))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_json_rows_rebuilt_from_schema_and_payload_equal_postgres() {
    let (pg, tansu, dir, db) = pg_and_tansu().await;
    db.batch_execute(
        "CREATE TABLE shapes (id int PRIMARY KEY, i2 smallint, i8 bigint, n numeric(10,2), f8 float8,
            b bool, t text, j jsonb, js json, ts timestamptz, d date, tm time, by bytea, u uuid,
            ai int[], aj jsonb[], iv interval);
         INSERT INTO shapes VALUES (1, 7, 9000000000, 12.50, 0.25, true, 'snap', '{\"a\": [1, {\"b\": null}]}',
            '[1, 2]', '2024-01-02 03:04:05.5+02', '2024-02-29', '13:14:15', '\\x00ff10',
            'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{1,NULL,3}', ARRAY['{\"k\": 1}'::jsonb], '1 day 2 hours');",
    )
    .await
    .unwrap();
    let state = dir.path().join("state");
    let cfg = config(
        &pg,
        &tansu,
        &state,
        &["shapes"],
        "format = \"connect-json\"\n",
    );
    let mut daemon = crate::support::daemon(dir.path(), &cfg, &[]);
    wait_slot_active(&db, &mut daemon, "pgcdc").await;
    db.batch_execute(
        "INSERT INTO shapes VALUES (2, NULL, -1, -0.01, -1.5e10, false, 'héllo \"q\"', 'null', '{}',
            '1999-12-31 23:59:59.999999-08', '0044-03-15 BC', '00:00:00', '\\x', NULL, '{}', '{}', '-3 mons');",
    )
    .await
    .unwrap();
    let records =
        crate::support::read_until(&tansu, TOPIC, Duration::from_secs(60), |r| r.len() >= 2);
    assert_eq!(records.len(), 2);
    for r in &records {
        let key = r.key.as_ref().unwrap();
        assert_eq!(key["schema"]["name"], "pgcdc.public.shapes.Key");
        let id = key["payload"]["id"].as_i64().unwrap();
        let value = r.value.as_ref().unwrap();
        let row = Value::Object(connect_row(value)).to_string();
        let equal: bool = db
            .query_one(
                "SELECT to_jsonb(jsonb_populate_record(NULL::shapes, $1::text::jsonb)) = to_jsonb(s)
                 FROM shapes s WHERE id = $2",
                &[&row, &(id as i32)],
            )
            .await
            .unwrap()
            .get(0);
        assert!(equal, "row {id} rebuilt as {row}");
    }
    let snapshot = &records[0].value.as_ref().unwrap()["payload"]["source"]["snapshot"];
    assert_eq!(*snapshot, json!("true"));
    let status = daemon.terminate(Duration::from_secs(30)).unwrap();
    assert_eq!(status.code(), Some(0), "log:\n{}", daemon.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_format_is_the_latest_row_per_key_with_tombstones_for_deletes() {
    let (pg, tansu, dir, db) = pg_and_tansu().await;
    db.batch_execute("CREATE TABLE latest (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let state = dir.path().join("state");
    let cfg = config(&pg, &tansu, &state, &["latest"], "format = \"row\"\n");
    let mut daemon = crate::support::daemon(dir.path(), &cfg, &[]);
    wait_slot_active(&db, &mut daemon, "pgcdc").await;
    db.batch_execute(
        "INSERT INTO latest VALUES (1, 'a'), (2, 'b'); UPDATE latest SET v = 'c' WHERE id = 1;
         DELETE FROM latest WHERE id = 2; TRUNCATE latest; INSERT INTO latest VALUES (3, 'd');",
    )
    .await
    .unwrap();
    let records = crate::support::read_until(&tansu, TOPIC, Duration::from_secs(60), |r| {
        r.iter().any(|r| r.key == Some(json!({"id": 3})))
    });
    let seen: Vec<(Value, Option<Value>)> = records
        .iter()
        .map(|r| (r.key.clone().unwrap(), r.value.clone()))
        .collect();
    assert_eq!(
        seen,
        [
            (json!({"id": 1}), Some(json!({"id": 1, "v": "a"}))),
            (json!({"id": 2}), Some(json!({"id": 2, "v": "b"}))),
            (json!({"id": 1}), Some(json!({"id": 1, "v": "c"}))),
            (json!({"id": 2}), None),
            (json!({"id": 3}), Some(json!({"id": 3, "v": "d"}))),
        ]
    );
    let status = daemon.terminate(Duration::from_secs(30)).unwrap();
    assert_eq!(status.code(), Some(0), "log:\n{}", daemon.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decimals_are_numbers_in_double_mode_in_the_snapshot_and_the_stream() {
    let (pg, tansu, dir, db) = pg_and_tansu().await;
    db.batch_execute(
        "CREATE TABLE prices (id int PRIMARY KEY, p numeric(10,2), m money);
         INSERT INTO prices VALUES (1, 12.50, 3.25);",
    )
    .await
    .unwrap();
    let state = dir.path().join("state");
    let extra = "decimal_handling_mode = \"double\"\n";
    let cfg = config(&pg, &tansu, &state, &["prices"], extra);
    let mut daemon = crate::support::daemon(dir.path(), &cfg, &[]);
    wait_slot_active(&db, &mut daemon, "pgcdc").await;
    db.batch_execute("INSERT INTO prices VALUES (2, 'NaN', -1)")
        .await
        .unwrap();
    let records =
        crate::support::read_until(&tansu, TOPIC, Duration::from_secs(60), |r| r.len() >= 2);
    let rows: Vec<&Value> = records.iter().map(Record::after).collect();
    assert_eq!(*rows[0], json!({"id": 1, "p": 12.5, "m": 3.25}));
    assert_eq!(*rows[1], json!({"id": 2, "p": "NaN", "m": -1.0}));
    let status = daemon.terminate(Duration::from_secs(30)).unwrap();
    assert_eq!(status.code(), Some(0), "log:\n{}", daemon.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adaptive_time_mode_writes_epoch_numbers_in_the_snapshot_and_the_stream() {
    let (pg, tansu, dir, db) = pg_and_tansu().await;
    db.batch_execute(
        "CREATE TABLE times (id int PRIMARY KEY, d date, t time, ts timestamp, tstz timestamptz,
            ds date[]);
         INSERT INTO times VALUES (1, '2024-02-29', '13:14:15.5', '2018-06-20 15:13:16.945104',
            '2024-01-02 03:04:05.5+02', '{1970-01-02,NULL}');",
    )
    .await
    .unwrap();
    let state = dir.path().join("state");
    let extra = "time_precision_mode = \"adaptive\"\n";
    let cfg = config(&pg, &tansu, &state, &["times"], extra);
    let mut daemon = crate::support::daemon(dir.path(), &cfg, &[]);
    wait_slot_active(&db, &mut daemon, "pgcdc").await;
    db.batch_execute(
        "INSERT INTO times VALUES (2, '1969-12-31', '00:00:00', '1969-12-31 23:59:59.9995',
            'infinity', '{}'), (3, 'infinity', '24:00:00', '0044-03-15 12:00:00 BC', NULL, NULL);",
    )
    .await
    .unwrap();
    let records =
        crate::support::read_until(&tansu, TOPIC, Duration::from_secs(60), |r| r.len() >= 3);
    assert_eq!(records.len(), 3);
    // PostgreSQL's own arithmetic is the reference: days and microseconds since the epoch.
    let expected = db
        .query(
            "SELECT jsonb_build_object('id', id,
                'd', CASE WHEN isfinite(d) THEN to_jsonb(d - DATE '1970-01-01') ELSE to_jsonb(d::text) END,
                't', (extract(epoch FROM t) * 1000000)::bigint,
                'ts', (extract(epoch FROM ts) * 1000000)::bigint,
                'tstz', to_jsonb(tstz),
                'ds', (SELECT jsonb_agg(x - DATE '1970-01-01') FROM unnest(ds) x))::text
             FROM times ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    for (r, row) in records.iter().zip(&expected) {
        let mut want: Value = serde_json::from_str(row.get::<_, &str>(0)).unwrap();
        // to_jsonb writes an offset (+00:00) where pgcdc writes Z; both are RFC 3339 UTC.
        if let Some(s) = want["tstz"].as_str() {
            want["tstz"] = json!(s.replace("+00:00", "Z"));
        }
        let id = want["id"].clone();
        if id == json!(2) {
            want["ds"] = json!([]);
        }
        assert_eq!(*r.after(), want, "row {id}");
    }
    let snapshot = &records[0].value.as_ref().unwrap()["source"]["snapshot"];
    assert_eq!(*snapshot, json!("true"));
    let status = daemon.terminate(Duration::from_secs(30)).unwrap();
    assert_eq!(status.code(), Some(0), "log:\n{}", daemon.log_text());
}
