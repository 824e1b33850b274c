//! The ES sink against a real tansu broker and a real OpenSearch-compatible
//! server (osmem-server), with an HTTP fault proxy in between where needed.
//! Every test ends with the oracle: the mirror index equals the expected
//! table state row for row, with `_version` = the last commit LSN of each row.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde_json::{json, Value};
use support::es::{FaultProxy, SearchServer};
use support::{config, Daemon, PgCluster, Tansu};

const TOPIC: &str = "cdc-events";
const TYPES: &str = r#"{"id":"int4","name":"text","n":"int4"}"#;

/// One synthetic change: key id, op, name, commit LSN.
#[derive(Clone, Debug)]
struct Change {
    id: i64,
    op: &'static str,
    name: String,
    lsn: u64,
}

fn envelope(c: &Change) -> Value {
    let row = json!({"id": c.id, "name": c.name, "n": c.lsn});
    let (before, after) = if c.op == "d" {
        (json!({"id": c.id}), Value::Null)
    } else {
        (Value::Null, row)
    };
    json!({"before": before, "after": after, "op": c.op, "ts_ms": 1,
           "source": {"connector": "pgcdc", "db": "db", "schema": "public", "table": "items",
                      "lsn": c.lsn, "commit_lsn": c.lsn, "seq": 0, "txId": 1, "ts_ms": 1_700_000_000_000u64, "snapshot": false}})
}

/// A deterministic history over `keys` keys: creates, updates, deletes and re-creates.
fn workload(keys: i64, changes: u64) -> Vec<Change> {
    let mut alive = BTreeMap::new();
    (1..=changes)
        .map(|lsn| {
            let mix = lsn.wrapping_mul(2_654_435_761);
            let id = ((mix >> 7) % keys as u64) as i64;
            let op = match alive.get(&id) {
                None => "c",
                Some(_) if (mix >> 17) % 5 == 0 => "d",
                Some(_) => "u",
            };
            if op == "d" {
                alive.remove(&id);
            } else {
                alive.insert(id, ());
            }
            Change {
                id,
                op,
                name: format!("name {lsn}"),
                lsn: 1000 + lsn,
            }
        })
        .collect()
}

/// The mirror a correct sink must end with: id → (version, row).
fn expected(changes: &[Change]) -> BTreeMap<String, (u64, Value)> {
    let mut m = BTreeMap::new();
    for c in changes {
        if c.op == "d" {
            m.remove(&c.id.to_string());
        } else {
            m.insert(
                c.id.to_string(),
                (c.lsn, json!({"id": c.id, "name": c.name, "n": c.lsn})),
            );
        }
    }
    m
}

async fn produce(tansu: &Tansu, changes: &[Change]) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", tansu.brokers())
        .create()
        .unwrap();
    for c in changes {
        let key = json!({"id": c.id}).to_string();
        let value = envelope(c).to_string();
        produce_raw(&producer, &key, Some(&value)).await;
    }
}

async fn produce_raw(producer: &FutureProducer, key: &str, value: Option<&str>) {
    let headers = OwnedHeaders::new()
        .insert(Header {
            key: "pgcdc.types",
            value: Some(TYPES),
        })
        .insert(Header {
            key: "pgcdc.table",
            value: Some("public.items"),
        });
    let mut r: FutureRecord<'_, str, str> = FutureRecord::to(TOPIC).key(key).headers(headers);
    if let Some(v) = value {
        r = r.payload(v);
    }
    producer.send(r, Duration::from_secs(30)).await.unwrap();
}

/// A sink config: the shared test config plus the `[elasticsearch]` section.
fn sink_config(pg: &PgCluster, tansu: &Tansu, dir: &Path, url: &str, extra: &str) -> String {
    let base = config(pg, tansu, &dir.join("state"), &["items"], "");
    format!(
        "{base}\n[elasticsearch]\nurl = {url:?}\nnumber_of_replicas = 0\nflush_interval_ms = 50\n\
         retry_initial_ms = 20\nretry_max_ms = 200\nbulk_max_actions = 100\n{extra}\n"
    )
}

/// Poll until the mirror equals `want`; panics with the difference after `timeout`.
async fn assert_mirror(
    es: &SearchServer,
    index: &str,
    want: &BTreeMap<String, (u64, Value)>,
    timeout: Duration,
    sink: &mut Daemon,
) {
    let deadline = Instant::now() + timeout;
    loop {
        let got = es.documents(index).await;
        if &got == want {
            return;
        }
        if Instant::now() > deadline {
            let missing: Vec<_> = want
                .keys()
                .filter(|k| !got.contains_key(*k))
                .take(5)
                .collect();
            let wrong: Vec<_> = want
                .iter()
                .filter(|(k, v)| got.get(*k).is_some_and(|g| g != *v))
                .take(3)
                .collect();
            let extra: Vec<_> = got
                .keys()
                .filter(|k| !want.contains_key(*k))
                .take(5)
                .collect();
            panic!(
                "mirror differs: {} docs, want {}; missing {missing:?}; wrong {wrong:?}; extra {extra:?}\nsink log:\n{}",
                got.len(),
                want.len(),
                sink.log_text()
            );
        }
        assert!(sink.is_running(), "sink exited:\n{}", sink.log_text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

struct Rig {
    pg: PgCluster,
    tansu: Tansu,
    es: SearchServer,
    dir: tempfile::TempDir,
}

async fn rig() -> Rig {
    let tansu = Tansu::start();
    tansu.create_topic(TOPIC).await;
    Rig {
        pg: PgCluster::start(),
        tansu,
        es: SearchServer::start(),
        dir: tempfile::tempdir().unwrap(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_the_topic_leaves_the_mirror_unchanged_and_deletes_stay_deleted() {
    let r = rig().await;
    let changes = workload(60, 400);
    produce(&r.tansu, &changes).await;
    let want = expected(&changes);
    let cfg = sink_config(&r.pg, &r.tansu, r.dir.path(), &r.es.url, "");
    let mut sink = Daemon::start_command(&r.dir.path().join("a"), &cfg, &[], "es-sink");
    assert_mirror(
        &r.es,
        "cdc_public_items",
        &want,
        Duration::from_secs(60),
        &mut sink,
    )
    .await;

    // An old update of a deleted row arrives again (a replay, a retry): it must not resurrect it.
    let stale = changes
        .iter()
        .find(|c| c.op == "u" && !want.contains_key(&c.id.to_string()))
        .unwrap()
        .clone();
    produce(&r.tansu, &[stale]).await;

    // A second sink in a new consumer group replays the whole topic from offset 0, twice over.
    let replay = cfg.replace(
        "bulk_max_actions = 100",
        "bulk_max_actions = 7\nconsumer_group = \"replay\"",
    );
    let mut second = Daemon::start_command(&r.dir.path().join("b"), &replay, &[], "es-sink");
    let mut replayed = changes.clone();
    replayed.extend(changes.iter().cloned());
    produce(&r.tansu, &changes).await;
    // A marker after everything: once it is indexed, both sinks have passed the replay.
    let marker = Change {
        id: 9999,
        op: "c",
        name: "marker".into(),
        lsn: 999_999,
    };
    produce(&r.tansu, std::slice::from_ref(&marker)).await;
    let mut want = want;
    want.insert(
        "9999".into(),
        (
            marker.lsn,
            json!({"id": 9999, "name": "marker", "n": marker.lsn}),
        ),
    );
    assert_mirror(
        &r.es,
        "cdc_public_items",
        &want,
        Duration::from_secs(60),
        &mut second,
    )
    .await;
    assert!(sink.is_running() && second.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_429_500_dropped_connections_and_partial_failures_lose_nothing() {
    let r = rig().await;
    let proxy = FaultProxy::start(&r.es.url).await;
    {
        let mut f = proxy.faults.lock().unwrap();
        f.drop = 2;
        f.reject_429 = 3;
        f.reject_500 = 2;
        f.partial = 6;
        f.partial_every = 3;
    }
    let changes = workload(80, 600);
    produce(&r.tansu, &changes).await;
    let cfg = sink_config(&r.pg, &r.tansu, r.dir.path(), &proxy.url, "");
    let mut sink = Daemon::start_command(&r.dir.path().join("a"), &cfg, &[], "es-sink");
    assert_mirror(
        &r.es,
        "cdc_public_items",
        &expected(&changes),
        Duration::from_secs(90),
        &mut sink,
    )
    .await;
    let f = proxy.faults.lock().unwrap().clone();
    assert_eq!(
        (f.drop, f.reject_429, f.reject_500, f.partial),
        (0, 0, 0, 0),
        "not every fault fired: {f:?}"
    );
    assert!(sink.log_text().contains("retrying"), "no retry was logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_records_go_to_the_dead_letter_topic_and_the_rest_continue() {
    let r = rig().await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", r.tansu.brokers())
        .create()
        .unwrap();
    let good = workload(10, 30);
    produce(&r.tansu, &good[..15]).await;
    produce_raw(&producer, "{\"id\":500}", Some("this is not json")).await;
    let mut bad = envelope(&Change {
        id: 501,
        op: "c",
        name: String::new(),
        lsn: 5000,
    });
    bad["after"]["name"] = json!({"nested": "object where text is mapped"});
    produce_raw(&producer, "{\"id\":501}", Some(&bad.to_string())).await;
    produce(&r.tansu, &good[15..]).await;

    let cfg = sink_config(&r.pg, &r.tansu, r.dir.path(), &r.es.url, "");
    let mut sink = Daemon::start_command(&r.dir.path().join("a"), &cfg, &[], "es-sink");
    assert_mirror(
        &r.es,
        "cdc_public_items",
        &expected(&good),
        Duration::from_secs(60),
        &mut sink,
    )
    .await;
    let dead = r
        .tansu
        .read_until("pgcdc-dead-letters", Duration::from_secs(60), |d| {
            d.len() >= 2
        });
    let reasons: Vec<String> = dead
        .iter()
        .map(|d| d.value.as_ref().unwrap()["reason"].to_string())
        .collect();
    assert!(reasons[0].contains("not json"), "{reasons:?}");
    assert!(
        reasons[1].contains("mapper_parsing") || reasons[1].contains("parse"),
        "{reasons:?}"
    );
    assert_eq!(
        dead[1].value.as_ref().unwrap()["table"],
        json!("public.items")
    );
    assert!(dead[1].value.as_ref().unwrap()["offset"].as_i64().is_some());
    assert_dead_letters_audited(&sink).await;
}

/// `pgcdc logs --dead-letters` (the audit log) lists both poison records with table, key and reason.
async fn assert_dead_letters_audited(sink: &Daemon) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgcdc"))
            .args(["--config", sink.config.to_str().unwrap()])
            .args(["logs", "--dead-letters"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let lines: Vec<&str> = text.lines().collect();
        if out.status.success() && lines.len() >= 2 {
            assert!(
                lines[0].contains(r#"public.items key={"id":500}"#)
                    && lines[0].contains("not json")
                    && lines[0].ends_with("payload=this is not json"),
                "{text}"
            );
            assert!(
                lines[1].contains(r#"public.items key={"id":501}"#)
                    && lines[1].contains("parse")
                    && lines[1].contains("object where text is mapped"),
                "{text}"
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "dead letters not in the audit log: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_sink_mid_stream_loses_nothing() {
    let r = rig().await;
    let changes = workload(300, 3000);
    produce(&r.tansu, &changes).await;
    let cfg = sink_config(&r.pg, &r.tansu, r.dir.path(), &r.es.url, "").replace(
        "\n[supervision]",
        &format!(
            "\n{}\"group.instance.id\" = \"sink-under-test\"\n[supervision]",
            support::FAST_REBALANCE
        ),
    );
    let mut sink = Daemon::start_command(&r.dir.path().join("a"), &cfg, &[], "es-sink");
    // Kill it twice, each time after it wrote something since its last start.
    let mut seen = BTreeMap::new();
    for _ in 0..2 {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let now = r.es.documents("cdc_public_items").await;
            if !now.is_empty() && now != seen {
                seen = now;
                break;
            }
            assert!(
                Instant::now() < deadline,
                "sink made no progress:\n{}",
                sink.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        sink.kill9();
        sink.spawn();
    }
    assert_mirror(
        &r.es,
        "cdc_public_items",
        &expected(&changes),
        Duration::from_secs(120),
        &mut sink,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_pipeline_mirror_equals_postgres_row_for_row() {
    let r = rig().await;
    let db = r.pg.client().await;
    db.batch_execute(
        "CREATE TABLE items (id int PRIMARY KEY, name text, n int); CREATE TABLE gone (id int PRIMARY KEY, v text);",
    )
    .await
    .unwrap();
    let cfg = config(&r.pg, &r.tansu, &r.dir.path().join("state"), &["items", "gone"], "")
        + &format!("\n[elasticsearch]\nrun_in_daemon = true\nurl = {:?}\nnumber_of_replicas = 0\nflush_interval_ms = 50\nhistory = true\n", r.es.url);
    let mut daemon = Daemon::start(r.dir.path(), &cfg, &[]);
    support::wait_slot_active(&db, &mut daemon, "pgcdc").await;
    db.batch_execute(
        "INSERT INTO items SELECT g, 'item ' || g, g FROM generate_series(1, 200) g;
         UPDATE items SET name = name || ' updated', n = n * 10 WHERE id % 3 = 0;
         UPDATE items SET id = id + 1000 WHERE id % 10 = 0;
         DELETE FROM items WHERE id % 7 = 0;
         BEGIN; UPDATE items SET n = -1 WHERE id = 1; UPDATE items SET n = -2 WHERE id = 1; COMMIT;
         INSERT INTO gone SELECT g, 'x' FROM generate_series(1, 20) g;",
    )
    .await
    .unwrap();
    db.batch_execute("TRUNCATE gone").await.unwrap();
    db.batch_execute("INSERT INTO gone VALUES (5000, 'after truncate')")
        .await
        .unwrap();

    // Versions: the last commit LSN of each key, as published on Kafka.
    let records = r.tansu.read_until(TOPIC, Duration::from_secs(60), |rs| {
        rs.iter().any(|r| r.key == Some(json!({"id": 5000})))
    });
    let mut version = BTreeMap::new();
    for rec in records
        .iter()
        .filter(|r| r.value.is_some() && r.headers["pgcdc.table"] == "public.items")
    {
        let id = rec.key.as_ref().unwrap()["id"].to_string();
        version.insert(
            id,
            rec.value.as_ref().unwrap()["source"]["commit_lsn"]
                .as_u64()
                .unwrap(),
        );
    }
    let rows = db
        .query("SELECT id, name, n FROM items", &[])
        .await
        .unwrap();
    let want: BTreeMap<String, (u64, Value)> = rows
        .iter()
        .map(|row| {
            let id: i32 = row.get(0);
            let doc = json!({"id": id, "name": row.get::<_, Option<String>>(1), "n": row.get::<_, Option<i32>>(2)});
            let v = version.get(&id.to_string()).copied().unwrap_or_else(|| panic!("no kafka record for id {id}"));
            (id.to_string(), (v, doc))
        })
        .collect();
    assert_eq!(want.len(), 171, "20 keys moved, 29 rows deleted");
    assert_mirror(
        &r.es,
        "cdc_public_items",
        &want,
        Duration::from_secs(60),
        &mut daemon,
    )
    .await;
    // The defence against resurrection after a delete: indices remember deletes for gc_deletes.
    let settings: Value = reqwest::get(format!("{}/cdc_public_items/_settings", r.es.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        settings["cdc_public_items"]["settings"]["index"]["gc_deletes"],
        json!("30d")
    );
    let after_truncate: BTreeMap<String, (u64, Value)> = r.es.documents("cdc_public_gone").await;
    assert_eq!(
        after_truncate.keys().collect::<Vec<_>>(),
        ["5000"],
        "truncate left rows behind"
    );
    let history = r.es.documents("cdc_public_items_history").await;
    let changes = records
        .iter()
        .filter(|r| r.value.is_some() && r.headers["pgcdc.table"] == "public.items")
        .count();
    assert_eq!(history.len(), changes, "history is one document per change");
}

/// A sink never misses records after its committed offset quietly: it
/// mirrors every one of them or reports the offsets Kafka never delivered
/// (as retention would cause). Here 200 records go out as one batch, one
/// more after it, and the group's offset is committed in the first batch's
/// middle: tansu 0.6 answers that fetch with the next batch, real Kafka with
/// the whole batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_reports_offsets_kafka_never_delivered() {
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
    use rdkafka::{Offset, TopicPartitionList};
    let r = rig().await;
    let changes: Vec<Change> = (0..201)
        .map(|id| Change {
            id,
            op: "c",
            name: format!("name {id}"),
            lsn: 1000 + id as u64,
        })
        .collect();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", r.tansu.brokers())
        .set("linger.ms", "500")
        .create()
        .unwrap();
    let (keys, values): (Vec<String>, Vec<String>) = changes
        .iter()
        .map(|c| (json!({"id": c.id}).to_string(), envelope(c).to_string()))
        .unzip();
    // The last record is a batch of its own, after the one the offset is in.
    let sent: Vec<_> = keys[..200]
        .iter()
        .zip(&values)
        .map(|(k, v)| {
            let headers = OwnedHeaders::new().insert(Header {
                key: "pgcdc.types",
                value: Some(TYPES),
            });
            let record = FutureRecord::to(TOPIC).key(k).payload(v).headers(headers);
            producer.send_result(record).unwrap()
        })
        .collect();
    for s in sent {
        s.await.unwrap().unwrap();
    }
    produce(&r.tansu, &changes[200..]).await;
    let group: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", r.tansu.brokers())
        .set("group.id", "pgcdc-es-sink")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(TOPIC, 0, Offset::Offset(100))
        .unwrap();
    group.commit(&tpl, CommitMode::Sync).unwrap();

    let want = expected(&changes[100..]);
    let cfg = sink_config(&r.pg, &r.tansu, r.dir.path(), &r.es.url, "");
    let sink = Daemon::start_command(&r.dir.path().join("a"), &cfg, &[], "es-sink");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let docs = r.es.documents("cdc_public_items").await;
        assert!(
            docs.keys().all(|id| want.contains_key(id)),
            "the sink must start at the committed offset: {:?}",
            docs.keys().collect::<Vec<_>>()
        );
        let log = sink.log_text();
        if log.contains("kafka skipped offsets") {
            assert!(log.contains("expected=100 got=200"), "{log}");
            return;
        }
        if docs == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} documents and no skip reported:\n{log}",
            docs.len(),
            want.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
