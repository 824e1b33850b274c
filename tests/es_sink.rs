//! The ES sink against a real Kafka broker (tansu, and for the kill and
//! resume tests also librdkafka's mock cluster with multi-record batches)
//! and a real OpenSearch-compatible server (osmem-server), with an HTTP
//! fault proxy in between where needed.
//! Every test ends with the oracle: the mirror index equals the expected
//! table state row for row, with `_version` = the last commit LSN of each row.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use pgcdc_actors::wire::header;
use pgcdc_testkit::oracle::{self, Want};
use pgcdc_testkit::proxy::bulk::{BulkFaultProxy, Fault, Refuse};
use pgcdc_testkit::search::Documents;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde_json::{json, Value};

use crate::support::{config, wait, Broker, Daemon, PgCluster, SearchServer, Tansu};
use wait::Poll;

const TOPIC: &str = "cdc-events";
const TYPES: &str = r#"{"id":"int4","name":"text","n":"int4"}"#;
/// SQL for a text of random hex for row `g` of a `generate_series(…) g`:
/// it compresses to well over the 2 kB TOAST threshold, so it is stored
/// out of line.
const TOASTED: &str =
    "(SELECT string_agg(md5(random()::text || i || g), '') FROM generate_series(1, 300) i)";

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

/// `count` creates of ids 0.. named `name <id>`, at LSNs 1000 + id.
fn creates(count: i64) -> Vec<Change> {
    (0..count)
        .map(|id| Change {
            id,
            op: "c",
            name: format!("name {id}"),
            lsn: 1000 + id as u64,
        })
        .collect()
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

fn producer(broker: &dyn Broker) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", broker.brokers())
        .create()
        .unwrap()
}

/// Produce `changes` one at a time (each waits for its acknowledgement: one record per batch).
async fn produce(broker: &dyn Broker, changes: &[Change]) {
    let producer = producer(broker);
    for c in changes {
        let key = json!({"id": c.id}).to_string();
        let value = envelope(c).to_string();
        produce_raw(&producer, &key, Some(&value)).await;
    }
}

/// Produce `changes` all at once, then wait: the producer packs them into multi-record batches.
async fn produce_batched(broker: &dyn Broker, changes: &[Change]) {
    let producer = producer(broker);
    let records: Vec<(String, String)> = changes
        .iter()
        .map(|c| (json!({"id": c.id}).to_string(), envelope(c).to_string()))
        .collect();
    let sent: Vec<_> = records
        .iter()
        .map(|(k, v)| producer.send_result(record(k, Some(v))).unwrap())
        .collect();
    for s in sent {
        s.await.unwrap().unwrap();
    }
}

/// A change record with the headers the producer writes.
fn record<'a>(key: &'a str, value: Option<&'a str>) -> FutureRecord<'a, str, str> {
    let headers = OwnedHeaders::new()
        .insert(Header {
            key: header::TYPES,
            value: Some(TYPES),
        })
        .insert(Header {
            key: header::TABLE,
            value: Some("public.items"),
        });
    let r: FutureRecord<'_, str, str> = FutureRecord::to(TOPIC).key(key).headers(headers);
    match value {
        Some(v) => r.payload(v),
        None => r,
    }
}

async fn produce_raw(producer: &FutureProducer, key: &str, value: Option<&str>) {
    producer
        .send(record(key, value), Duration::from_secs(30))
        .await
        .unwrap();
}

/// A sink config: the shared test config plus the `[elasticsearch]` section.
fn sink_config(pg: &PgCluster, broker: &dyn Broker, dir: &Path, url: &str, extra: &str) -> String {
    let base = config(pg, broker, &dir.join("state"), &["items"], "");
    format!(
        "{base}\n[elasticsearch]\nurl = {url:?}\nnumber_of_replicas = 0\nflush_interval_ms = 50\n\
         retry_initial_ms = 20\nretry_max_ms = 200\nbulk_max_actions = 100\n{extra}\n"
    )
}

/// A daemon config for `tables` (state in the rig's directory) that runs
/// the ES sink in the daemon against the rig's search server, with
/// `es_extra` added to its `[elasticsearch]` section.
fn in_daemon(r: &Rig, tables: &[&str], es_extra: &str) -> String {
    let base = config(&r.pg, &*r.broker, &r.dir.path().join("state"), tables, "");
    format!(
        "{base}\n[elasticsearch]\nrun_in_daemon = true\nurl = {:?}\nnumber_of_replicas = 0\n{es_extra}",
        r.es.url
    )
}

/// Poll until the mirror equals `want`; panics with the difference after `timeout`.
async fn assert_mirror(
    es: &SearchServer,
    index: &str,
    want: &Documents,
    timeout: Duration,
    sink: &mut Daemon,
) {
    oracle::mirror_equals(&es.url, index, Want::Documents(want), timeout, Some(sink))
        .await
        .unwrap();
}

/// Poll until mirror `index` equals the PostgreSQL table `table` (by `pgcdc
/// verify`'s comparison); panics with the difference after `timeout`.
async fn assert_mirrors_table(r: &Rig, table: &str, index: &str, timeout: Duration, sink: &Daemon) {
    let want = Want::Verified { pg: &r.pg, table };
    oracle::mirror_equals(&r.es.url, index, want, timeout, Some(sink))
        .await
        .unwrap();
}

struct Rig {
    pg: PgCluster,
    broker: Box<dyn Broker>,
    es: SearchServer,
    dir: tempfile::TempDir,
}

/// PostgreSQL, osmem-server and tansu with the change topic.
async fn rig() -> Rig {
    rig_on(Box::new(Tansu::start().unwrap()))
}

/// PostgreSQL, osmem-server and `broker` with the change and dead-letter topics.
fn rig_on(broker: Box<dyn Broker>) -> Rig {
    broker.create_topic(TOPIC, 1).unwrap();
    if broker.name() == "mock" {
        broker.create_topic("pgcdc-dead-letters", 1).unwrap();
    }
    Rig {
        pg: PgCluster::start().unwrap(),
        broker,
        es: SearchServer::start().unwrap(),
        dir: tempfile::tempdir().unwrap(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_the_topic_leaves_the_mirror_unchanged_and_deletes_stay_deleted() {
    let r = rig().await;
    let changes = workload(60, 400);
    produce(&*r.broker, &changes).await;
    let want = expected(&changes);
    let cfg = sink_config(&r.pg, &*r.broker, r.dir.path(), &r.es.url, "");
    let mut sink = crate::support::daemon_cmd(&r.dir.path().join("a"), &cfg, &[], "es-sink");
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
    produce(&*r.broker, &[stale]).await;

    // A second sink in a new consumer group replays the whole topic from offset 0, twice over.
    let replay = cfg.replace(
        "bulk_max_actions = 100",
        "bulk_max_actions = 7\nconsumer_group = \"replay\"",
    );
    let mut second = crate::support::daemon_cmd(&r.dir.path().join("b"), &replay, &[], "es-sink");
    let mut replayed = changes.clone();
    replayed.extend(changes.iter().cloned());
    produce(&*r.broker, &changes).await;
    // A marker after everything: once it is indexed, both sinks have passed the replay.
    let marker = Change {
        id: 9999,
        op: "c",
        name: "marker".into(),
        lsn: 999_999,
    };
    produce(&*r.broker, std::slice::from_ref(&marker)).await;
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
    let proxy = BulkFaultProxy::start(&r.es.url).await.unwrap();
    let partial = Fault::Partial {
        every: 3,
        status: 429,
    };
    proxy.push([Fault::Drop; 2]);
    proxy.push([Fault::Reject(429); 3]);
    proxy.push([Fault::Reject(500); 2]);
    proxy.push([partial; 6]);
    let changes = workload(80, 600);
    produce(&*r.broker, &changes).await;
    let cfg = sink_config(&r.pg, &*r.broker, r.dir.path(), &proxy.url, "");
    let mut sink = crate::support::daemon_cmd(&r.dir.path().join("a"), &cfg, &[], "es-sink");
    assert_mirror(
        &r.es,
        "cdc_public_items",
        &expected(&changes),
        Duration::from_secs(90),
        &mut sink,
    )
    .await;
    assert_eq!(
        (proxy.pending(), proxy.fired()),
        (0, 13),
        "not every fault fired ({} bulk requests seen)",
        proxy.seen()
    );
    assert!(sink.log_text().contains("retrying"), "no retry was logged");
}

/// Records that are not JSON, or that Elasticsearch refuses, go to the
/// dead-letter topic and the rest continue; a row whose update is refused
/// loses its older document (the mirror never shows it as current).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_records_go_to_the_dead_letter_topic_and_the_rest_continue() {
    let r = rig().await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", r.broker.brokers())
        .create()
        .unwrap();
    let good = workload(10, 30);
    produce(&*r.broker, &good[..15]).await;
    produce_raw(&producer, "{\"id\":500}", Some("this is not json")).await;
    // A row whose update Elasticsearch refuses: its older document must
    // not stay in the mirror as if it were current.
    let first = envelope(&Change {
        id: 501,
        op: "c",
        name: "first".into(),
        lsn: 4000,
    });
    produce_raw(&producer, "{\"id\":501}", Some(&first.to_string())).await;
    let mut bad = envelope(&Change {
        id: 501,
        op: "u",
        name: String::new(),
        lsn: 5000,
    });
    bad["after"]["name"] = json!({"nested": "object where text is mapped"});
    produce_raw(&producer, "{\"id\":501}", Some(&bad.to_string())).await;
    produce(&*r.broker, &good[15..]).await;

    let keep = "[audit]\ndead_letter_payloads = true\n";
    let cfg = sink_config(&r.pg, &*r.broker, r.dir.path(), &r.es.url, keep);
    let mut sink = crate::support::daemon_cmd(&r.dir.path().join("a"), &cfg, &[], "es-sink");
    assert_mirror(
        &r.es,
        "cdc_public_items",
        &expected(&good),
        Duration::from_secs(60),
        &mut sink,
    )
    .await;
    let (dead, reasons) = dead_letters(&*r.broker, 2);
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

/// Read the dead-letter topic until it holds `n` records; them and their reasons.
fn dead_letters(broker: &dyn Broker, n: usize) -> (Vec<crate::support::Record>, Vec<String>) {
    let dead =
        crate::support::read_until(broker, "pgcdc-dead-letters", Duration::from_secs(60), |d| {
            d.len() >= n
        });
    let reasons = dead
        .iter()
        .map(|d| d.value.as_ref().unwrap()["reason"].to_string())
        .collect();
    (dead, reasons)
}

/// `pgcdc logs --dead-letters` (the audit log) lists both poison records with table, key and reason.
async fn assert_dead_letters_audited(sink: &Daemon) {
    let every = Duration::from_millis(100);
    let text = wait::poll(
        "dead letters in the audit log",
        Duration::from_secs(30),
        every,
        || async {
            let out = crate::support::pgcdc(&sink.config, &["logs", "--dead-letters"]);
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let listed = out.status.success() && text.lines().count() >= 2;
            Poll::when(listed, text.clone(), || {
                format!("{text}{}", String::from_utf8_lossy(&out.stderr))
            })
        },
    )
    .await
    .unwrap();
    let lines: Vec<&str> = text.lines().collect();
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
}

/// On tansu, with the changes in multi-record batches: a sink killed
/// mid-batch resumes inside one, where tansu 0.6 answers with the next batch
/// and the sink must seek back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_sink_mid_stream_loses_nothing() {
    kill_9_mid_batch_loses_nothing(rig().await).await;
}

/// The same on librdkafka's mock cluster, which returns whole batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_sink_mid_stream_loses_nothing_on_the_mock_broker_with_multi_record_batches()
{
    kill_9_mid_batch_loses_nothing(rig_on(Box::new(crate::support::mock_broker()))).await;
}

/// Produce a workload in multi-record batches, kill the sink twice, and
/// require the mirror to be complete with no gap left unhealed.
async fn kill_9_mid_batch_loses_nothing(r: Rig) {
    let changes = workload(300, 3000);
    produce_batched(&*r.broker, &changes).await;
    let sink = kill_9_twice_loses_nothing(&r, &changes).await;
    let log = sink.log_text();
    assert!(
        !log.contains("kafka skipped offsets"),
        "a gap the sink did not heal:\n{log}"
    );
}

/// Start a sink on `r`'s topic, kill it twice, each time after it wrote
/// something since its last start; the mirror must end equal to `changes`.
/// Returns the sink, still running.
async fn kill_9_twice_loses_nothing(r: &Rig, changes: &[Change]) -> Daemon {
    let cfg = sink_config(&r.pg, &*r.broker, r.dir.path(), &r.es.url, "");
    let mut sink = crate::support::daemon_cmd(&r.dir.path().join("a"), &cfg, &[], "es-sink");
    let mut seen = BTreeMap::new();
    for _ in 0..2 {
        let every = Duration::from_millis(50);
        seen = wait::poll(
            "the sink to make progress",
            Duration::from_secs(90),
            every,
            || async {
                let now = r.es.documents("cdc_public_items").await.unwrap();
                let progressed = !now.is_empty() && now != seen;
                Poll::when(progressed, now, || {
                    format!("no progress; sink log:\n{}", sink.log_tail())
                })
            },
        )
        .await
        .unwrap();
        sink.kill9();
        sink.spawn().unwrap();
    }
    assert_mirror(
        &r.es,
        "cdc_public_items",
        &expected(changes),
        Duration::from_secs(120),
        &mut sink,
    )
    .await;
    sink
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_pipeline_mirror_equals_postgres_row_for_row() {
    let r = rig().await;
    let db = r.pg.client().await.unwrap();
    db.batch_execute(
        "CREATE TABLE items (id int PRIMARY KEY, name text, n int); CREATE TABLE gone (id int PRIMARY KEY, v text);",
    )
    .await
    .unwrap();
    let cfg = in_daemon(
        &r,
        &["items", "gone"],
        "flush_interval_ms = 50\nhistory = true\n",
    );
    let mut daemon = crate::support::daemon(r.dir.path(), &cfg, &[]);
    crate::support::wait_slot_active(&db, &mut daemon, "pgcdc").await;
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
    let records = crate::support::read_until(&*r.broker, TOPIC, Duration::from_secs(60), |rs| {
        rs.iter().any(|r| r.key == Some(json!({"id": 5000})))
    });
    let mut version = BTreeMap::new();
    for rec in records
        .iter()
        .filter(|r| r.value.is_some() && r.header(header::TABLE) == "public.items")
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
        settings["cdc_public_items~1"]["settings"]["index"]["gc_deletes"],
        json!("30d"),
        "the mirror is served by its first generation"
    );
    let after_truncate: BTreeMap<String, (u64, Value)> =
        r.es.documents("cdc_public_gone").await.unwrap();
    assert_eq!(
        after_truncate.keys().collect::<Vec<_>>(),
        ["5000"],
        "truncate left rows behind"
    );
    let history = r.es.documents("cdc_public_items_history").await.unwrap();
    let changes = records
        .iter()
        .filter(|r| r.value.is_some() && r.header(header::TABLE) == "public.items")
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
    let r = rig().await;
    // tansu skips the rest of the batch (reported) or, if fixed, returns it (mirrored).
    resume_inside_a_batch(&r).await;
}

/// Real Kafka, and the mock cluster, return the whole batch a committed
/// offset falls into: the sink mirrors all of it and reports no skip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_resuming_inside_a_batch_on_the_mock_broker_mirrors_all_of_it() {
    let r = rig_on(Box::new(crate::support::mock_broker()));
    assert!(
        !resume_inside_a_batch(&r).await,
        "the mock broker returns whole batches"
    );
}

/// The table the gap tests fill from: the rows of [`creates`]`(200)`.
#[cfg(feature = "failpoints")]
const ITEMS: &str = "CREATE TABLE items (id int PRIMARY KEY, name text, n int);
    INSERT INTO items SELECT g, 'name ' || g, 1000 + g FROM generate_series(0, 199) g;";

/// Records Kafka never delivered to the sink (deleted by retention before
/// it read them, or compacted away; here a failpoint drops them from the
/// sink's first batch) are not left missing: the sink reports the gap and
/// fills the mirrors again from PostgreSQL, also the mirror of a table
/// whose only changes were lost.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_lacking_records_kafka_never_delivered_is_filled_again_from_postgres() {
    let r = rig().await;
    let db = r.pg.client().await.unwrap();
    db.batch_execute(&format!(
        "{ITEMS} CREATE TABLE other (id int PRIMARY KEY, name text, n int);
         INSERT INTO other VALUES (0, 'new 0', 2000), (1, 'new 1', 2001);"
    ))
    .await
    .unwrap();
    let cfg = sink_config(&r.pg, &*r.broker, r.dir.path(), &r.es.url, "");
    // `other`'s mirror as it was: then its only changes are lost.
    let old = |id: i64, name: &str, lsn: u64| Change {
        id,
        op: "c",
        name: format!("{name} {id}"),
        lsn,
    };
    let before = [old(0, "old", 900), old(1, "old", 901)];
    produce_other(&*r.broker, &before).await;
    let mut sink = crate::support::daemon_cmd(&r.dir.path().join("a"), &cfg, &[], "es-sink");
    let timeout = Duration::from_secs(60);
    let want = expected(&before);
    let mirror = "cdc_public_other";
    oracle::mirror_equals(
        &r.es.url,
        mirror,
        Want::Documents(&want),
        timeout,
        Some(&sink),
    )
    .await
    .unwrap();
    sink.terminate(timeout).unwrap();

    let changes = creates(200);
    produce(&*r.broker, &changes[..1]).await;
    let updates = [old(0, "new", 2000), old(1, "new", 2001)].map(|c| Change { op: "u", ..c });
    produce_other(&*r.broker, &updates).await;
    produce(&*r.broker, &changes[1..]).await;
    let lost = records_lost("return");
    let dir = r.dir.path().join("b");
    let sink = crate::support::daemon_cmd(&dir, &cfg, &[("FAILPOINTS", &lost)], "es-sink");
    sink.wait_log("kafka skipped offsets", timeout)
        .await
        .unwrap();
    for (table, mirror) in [
        ("public.items", "cdc_public_items"),
        ("public.other", mirror),
    ] {
        assert_mirrors_table(&r, table, mirror, timeout, &sink).await;
    }
    let log = sink.log_text();
    assert!(
        log.contains("kafka never delivered some records of topic cdc-events"),
        "{log}"
    );
}

/// Produce `changes` as changes of table `public.other` (same columns as `items`).
#[cfg(feature = "failpoints")]
async fn produce_other(broker: &dyn Broker, changes: &[Change]) {
    let producer = producer(broker);
    for c in changes {
        let mut value = envelope(c);
        value["source"]["table"] = json!("other");
        let key = json!({"id": c.id}).to_string();
        produce_raw(&producer, &key, Some(&value.to_string())).await;
    }
}

/// A gap found just before a crash is not forgotten: the first sink notes
/// it, commits past it, says the mirror lacks changes (`/ready`, gauge) and
/// is killed while its fill waits for a table lock; the next sink finds the
/// note at its start and fills the mirror without waiting for a change,
/// once, and is then ready.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_found_before_a_crash_is_still_filled_after_it() {
    let r = rig().await;
    let db = r.pg.client().await.unwrap();
    db.batch_execute(ITEMS).await.unwrap();
    let changes = creates(201);
    produce(&*r.broker, &changes[..200]).await;
    let locker = r.pg.client().await.unwrap();
    locker
        .batch_execute("BEGIN; LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let port = crate::support::free_port();
    let cfg = sink_config(&r.pg, &*r.broker, r.dir.path(), &r.es.url, "");
    let cfg = pgcdc_testkit::config::with_metrics(&cfg, port);
    let probe = crate::support::Probe::on(port);
    let lost = records_lost("return");
    let dir = r.dir.path().join("a");
    let mut first = crate::support::daemon_cmd(&dir, &cfg, &[("FAILPOINTS", &lost)], "es-sink");
    first
        .wait_log(
            "filling a new index from PostgreSQL",
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    let lacking = |text: &str, n: u32| {
        let line = format!("pgcdc_es_mirrors_lacking_changes {n}");
        text.contains(&line)
    };
    probe
        .until(
            "not ready while the mirror lacks changes",
            &mut first,
            |text, ready| ready == 503 && lacking(text, 1),
        )
        .await;
    let (_, why) = probe.ready().await;
    let named = "cdc_public_items (kafka never delivered some records of topic cdc-events)";
    assert!(why.contains(named), "{why}");
    wait::until(
        "the sink committed past the gap",
        Duration::from_secs(30),
        || async { sink_group_offset(&*r.broker) >= 200 },
    )
    .await
    .unwrap();
    first.kill9();
    locker.batch_execute("ROLLBACK").await.unwrap();

    // No change comes: the next sink fills from the note alone.
    let dir = r.dir.path().join("b");
    let mut second = crate::support::daemon_cmd(&dir, &cfg, &[], "es-sink");
    let timeout = Duration::from_secs(60);
    assert_mirrors_table(&r, "public.items", "cdc_public_items", timeout, &second).await;
    assert!(
        second
            .log_text()
            .contains("kafka never delivered some records of topic cdc-events"),
        "{}",
        second.log_text()
    );

    // Filled once: a later change is only applied.
    db.batch_execute("INSERT INTO items VALUES (200, 'name 200', 1200)")
        .await
        .unwrap();
    produce(&*r.broker, &changes[200..]).await;
    assert_mirrors_table(&r, "public.items", "cdc_public_items", timeout, &second).await;
    let fills = second.log_text().matches("filling a new index").count();
    assert_eq!(fills, 1, "{}", second.log_text());
    probe
        .until("ready once the fill is in", &mut second, |text, ready| {
            ready == 200 && lacking(text, 0)
        })
        .await;
}

/// A new sink group on a topic whose oldest records are gone (deleted by
/// retention; here a failpoint drops all but the last record of the first
/// batch) cannot build the mirrors from Kafka alone: the group committed
/// nothing, so the first record must be at offset 0; it is not, and the
/// mirrors are filled from PostgreSQL, also that of a configured table
/// none of whose records is left (tried again until the table can be read).
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_sink_on_a_topic_whose_oldest_records_are_gone_fills_from_postgres() {
    let r = rig().await;
    let db = r.pg.client().await.unwrap();
    db.batch_execute(&format!(
        "{ITEMS} CREATE TABLE quiet (id int PRIMARY KEY, label text);
         INSERT INTO quiet VALUES (1, 'a'), (2, 'b');
         ALTER TABLE quiet RENAME TO quiet_away;"
    ))
    .await
    .unwrap();
    produce(&*r.broker, &creates(200)).await;
    // `quiet`'s records are all gone: no record names it.
    let cfg = sink_config(&r.pg, &*r.broker, r.dir.path(), &r.es.url, "");
    let both = "tables = [\"items\", \"quiet\"]";
    let cfg = cfg.replace("tables = [\"items\"]", both);
    assert!(cfg.contains(both), "{cfg}");
    let lost = records_lost("return(head)");
    let dir = r.dir.path().join("a");
    let sink = crate::support::daemon_cmd(&dir, &cfg, &[("FAILPOINTS", &lost)], "es-sink");
    sink.wait_log("kafka skipped offsets", Duration::from_secs(60))
        .await
        .unwrap();
    let log = sink.log_text();
    assert!(log.contains("expected=0"), "{log}");
    let timeout = Duration::from_secs(60);
    assert_mirrors_table(&r, "public.items", "cdc_public_items", timeout, &sink).await;
    // `quiet` cannot be read yet (renamed away): its fill is tried again.
    sink.wait_log("cannot read the table's shape", timeout)
        .await
        .unwrap();
    db.batch_execute("ALTER TABLE quiet_away RENAME TO quiet")
        .await
        .unwrap();
    assert_mirrors_table(&r, "public.quiet", "cdc_public_quiet", timeout, &sink).await;
}

/// `FAILPOINTS` for a sink whose first batch loses records (`action`:
/// `return`, `return(head)`; see `wire::failpoint::ES_RECORDS_LOST`).
#[cfg(feature = "failpoints")]
fn records_lost(action: &str) -> String {
    let name = pgcdc_actors::wire::failpoint::ES_RECORDS_LOST;
    format!("{name}=1*{action}->off")
}

/// A client of the sink's consumer group (not a member), to read or set
/// its committed offsets.
fn sink_group(broker: &dyn Broker) -> rdkafka::consumer::BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", broker.brokers())
        .set("group.id", "pgcdc-es-sink")
        .create()
        .unwrap()
}

/// The offset the sink's group committed on partition 0 of the change topic (-1: none).
fn sink_group_offset(broker: &dyn Broker) -> i64 {
    use rdkafka::consumer::Consumer;
    use rdkafka::{Offset, TopicPartitionList};
    let group = sink_group(broker);
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(TOPIC, 0);
    let committed = group.committed_offsets(tpl, Duration::from_secs(5));
    let offset = committed
        .ok()
        .and_then(|t| t.find_partition(TOPIC, 0).map(|p| p.offset()));
    match offset {
        Some(Offset::Offset(o)) => o,
        _ => -1,
    }
}

/// 200 records as one batch, one more after it, the sink group's offset
/// committed in the first batch's middle; start a sink. Whether it reported
/// skipped offsets (else it mirrored every record from the offset on).
async fn resume_inside_a_batch(r: &Rig) -> bool {
    use rdkafka::consumer::{CommitMode, Consumer};
    use rdkafka::{Offset, TopicPartitionList};
    let changes = creates(201);
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", r.broker.brokers())
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
                key: header::TYPES,
                value: Some(TYPES),
            });
            let record = FutureRecord::to(TOPIC).key(k).payload(v).headers(headers);
            producer.send_result(record).unwrap()
        })
        .collect();
    for s in sent {
        s.await.unwrap().unwrap();
    }
    produce(&*r.broker, &changes[200..]).await;
    let group = sink_group(&*r.broker);
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(TOPIC, 0, Offset::Offset(100))
        .unwrap();
    group.commit(&tpl, CommitMode::Sync).unwrap();

    let want = expected(&changes[100..]);
    let cfg = sink_config(&r.pg, &*r.broker, r.dir.path(), &r.es.url, "");
    let sink = crate::support::daemon_cmd(&r.dir.path().join("a"), &cfg, &[], "es-sink");
    let every = Duration::from_millis(100);
    wait::poll(
        "the sink to mirror or report a skip",
        Duration::from_secs(60),
        every,
        || async {
            let docs = r.es.documents("cdc_public_items").await.unwrap();
            let log = sink.log_text();
            if !docs.keys().all(|id| want.contains_key(id)) {
                let ids: Vec<&String> = docs.keys().collect();
                return Poll::Abort(format!(
                    "the sink must start at the committed offset: {ids:?}"
                ));
            }
            if log.contains("kafka skipped offsets") {
                assert!(log.contains("expected=100 got=200"), "{log}");
                return Poll::Ready(true);
            }
            Poll::when(docs == want, false, || {
                format!(
                    "{} of {} documents and no skip reported:\n{log}",
                    docs.len(),
                    want.len()
                )
            })
        },
    )
    .await
    .unwrap()
}

/// Table names Elasticsearch forbids or would merge map to distinct valid
/// indices (a TRUNCATE of `*` empties only its own mirror); a keyless
/// table's 1 kB rows get hashed ids under the 512-byte limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_table_name_gets_its_own_valid_index_and_long_keys_get_hashed_ids() {
    use pgcdc_actors::es_writer::naming::mirror_index;
    let r = rig().await;
    let db = r.pg.client().await.unwrap();
    let long = "l".repeat(63);
    let names = ["*", "a,b", "a_b", "Upper", "upper", long.as_str()];
    for n in names {
        let q = format!(
            "CREATE TABLE \"{n}\" (id int PRIMARY KEY, v text); INSERT INTO \"{n}\" VALUES (1, '{n}'), (2, 'two');"
        );
        db.batch_execute(&q).await.unwrap();
    }
    db.batch_execute(
        "CREATE TABLE bag (a text, b text); ALTER TABLE bag REPLICA IDENTITY FULL;
         INSERT INTO bag SELECT repeat('x', 1000) || g, 'b' FROM generate_series(1, 3) g;",
    )
    .await
    .unwrap();
    let mut tables: Vec<String> = names.iter().map(|n| format!("\"{n}\"")).collect();
    tables.push("bag".into());
    let listed: Vec<&str> = tables.iter().map(String::as_str).collect();
    let cfg = in_daemon(&r, &listed, "flush_interval_ms = 50\n");
    let mut daemon = crate::support::daemon(r.dir.path(), &cfg, &[]);
    crate::support::wait_slot_active(&db, &mut daemon, "pgcdc").await;
    db.batch_execute(
        "TRUNCATE \"*\"; INSERT INTO \"*\" VALUES (3, 'after truncate');
         UPDATE bag SET b = 'changed' WHERE a LIKE '%1'; DELETE FROM bag WHERE a LIKE '%2';",
    )
    .await
    .unwrap();
    let indices: Vec<String> = names
        .iter()
        .map(|n| mirror_index("cdc_", "public", n))
        .collect();
    for (n, index) in names.iter().zip(&indices) {
        let table = format!("public.\"{n}\"");
        assert_mirrors_table(&r, &table, index, Duration::from_secs(90), &daemon).await;
    }
    let bag = mirror_index("cdc_", "public", "bag");
    let rows: Vec<Value> = db
        .query("SELECT to_jsonb(bag)::text FROM bag ORDER BY b", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| serde_json::from_str(r.get(0)).unwrap())
        .collect();
    let docs = wait::poll(
        "the keyless mirror equals its table",
        Duration::from_secs(60),
        Duration::from_millis(200),
        || async {
            let docs = r.es.documents(&bag).await.unwrap();
            let mut got: Vec<Value> = docs.values().map(|(_, v)| v.clone()).collect();
            got.sort_by_key(|v| v["b"].to_string());
            if got == rows {
                Poll::Ready(docs)
            } else {
                Poll::Pending(format!("{got:?}"))
            }
        },
    )
    .await
    .unwrap();
    assert!(
        docs.keys().all(|id| id.starts_with("sha256:")),
        "{:?}",
        docs.keys()
    );
    assert!(daemon.is_running(), "{}", daemon.log_tail());
}

/// Answers that used to wedge the sink: 200s that are not JSON and items
/// without a status are retried a bounded number of times; a request the
/// server refuses as a whole (400) or finds too large (413) is split until
/// the one record it refuses is found, which is dead-lettered; the rest is
/// written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_answers_400_and_413_dead_letter_only_the_refused_record() {
    let r = rig().await;
    let proxy = BulkFaultProxy::start(&r.es.url).await.unwrap();
    proxy.push([Fault::NotJson; 2]);
    proxy.push(
        [Fault::Partial {
            every: 2,
            status: 0,
        }; 2],
    );
    proxy.refuse(Refuse::Containing("refused-by-the-server".into()));
    proxy.refuse(Refuse::LongerThan(16 * 1024));
    let changes = workload(40, 200);
    let odd = |id: i64, name: String| Change {
        id,
        op: "c",
        name,
        lsn: 900_000 + id as u64,
    };
    let refused = odd(1000, "refused-by-the-server".into());
    let huge = odd(1001, "h".repeat(20 * 1024));
    produce(&*r.broker, &changes[..100]).await;
    produce(&*r.broker, &[refused, huge]).await;
    produce(&*r.broker, &changes[100..]).await;
    let cfg = sink_config(&r.pg, &*r.broker, r.dir.path(), &proxy.url, "");
    let mut sink = crate::support::daemon_cmd(&r.dir.path().join("a"), &cfg, &[], "es-sink");
    assert_mirror(
        &r.es,
        "cdc_public_items",
        &expected(&changes),
        Duration::from_secs(90),
        &mut sink,
    )
    .await;
    let (_, reasons) = dead_letters(&*r.broker, 2);
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(reasons[0].contains("bad_request"), "{reasons:?}");
    assert!(reasons[1].contains("too_large"), "{reasons:?}");
    let log = sink.log_text();
    assert!(log.contains("splitting it"), "no split was logged");
    assert!(
        log.contains("unreadable body"),
        "the unreadable answer was not logged"
    );
    assert_eq!(proxy.pending(), 0, "not every queued fault fired");
    assert!(sink.is_running(), "{}", sink.log_tail());
}

/// Send `c` to `partition` (a truncate without a key, as pgcdc sends it).
async fn produce_to(producer: &FutureProducer, c: &Change, partition: i32) {
    let key = json!({"id": c.id}).to_string();
    let value = envelope(c).to_string();
    let mut rec = record(&key, Some(&value)).partition(partition);
    if c.op == "t" {
        rec.key = None;
    }
    producer.send(rec, Duration::from_secs(30)).await.unwrap();
}

/// Wait until the mirror holds exactly the ids in `ids`.
async fn until_ids(r: &Rig, ids: impl IntoIterator<Item = i64>, sink: &Daemon) {
    let want: Vec<String> = ids.into_iter().map(|i| i.to_string()).collect();
    wait::poll(
        "the mirror to hold exactly the ids",
        Duration::from_secs(60),
        Duration::from_millis(100),
        || async {
            let got: Vec<String> =
                r.es.documents("cdc_public_items")
                    .await
                    .unwrap()
                    .into_keys()
                    .collect();
            let mut got = got;
            got.sort_by_key(|id| id.parse::<i64>().unwrap_or(0));
            if got == want {
                Poll::Ready(())
            } else if !sink.is_running() {
                Poll::Abort(format!("sink exited:\n{}", sink.log_tail()))
            } else {
                Poll::Pending(format!("{got:?}"))
            }
        },
    )
    .await
    .unwrap();
}

/// A truncate lands on one partition; records older than it that wait on
/// other partitions (or are read again after a sink restart) never bring
/// truncated rows back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncate_on_one_partition_is_not_undone_by_older_records_on_others() {
    let broker = Tansu::start().unwrap();
    broker.create_topic(TOPIC, 3).unwrap();
    let r = Rig {
        pg: PgCluster::start().unwrap(),
        broker: Box::new(broker),
        es: SearchServer::start().unwrap(),
        dir: tempfile::tempdir().unwrap(),
    };
    let producer = producer(&*r.broker);
    let create = |id: i64, lsn: u64| Change {
        id,
        op: "c",
        name: format!("row {id}"),
        lsn,
    };
    for id in 1..=20 {
        produce_to(&producer, &create(id, 1000 + id as u64), (id % 3) as i32).await;
    }
    let cfg = sink_config(&r.pg, &*r.broker, r.dir.path(), &r.es.url, "");
    let mut sink = crate::support::daemon_cmd(&r.dir.path().join("a"), &cfg, &[], "es-sink");
    until_ids(&r, 1..=20, &sink).await;

    let truncate = Change {
        id: 0,
        op: "t",
        name: String::new(),
        lsn: 2000,
    };
    produce_to(&producer, &truncate, 0).await;
    until_ids(&r, [], &sink).await;
    // Records committed before the truncate, read only now from other partitions.
    for id in 21..=40 {
        produce_to(
            &producer,
            &create(id, 1500 + id as u64),
            1 + (id % 2) as i32,
        )
        .await;
    }
    for id in 41..=50 {
        produce_to(&producer, &create(id, 3000 + id as u64), (id % 3) as i32).await;
    }
    until_ids(&r, 41..=50, &sink).await;

    // A restart knows the truncate too: it is stored, not remembered.
    sink.terminate(Duration::from_secs(30)).unwrap();
    for id in 60..=70 {
        produce_to(&producer, &create(id, 1900), (id % 3) as i32).await;
    }
    for id in 51..=55 {
        produce_to(&producer, &create(id, 4000 + id as u64), (id % 3) as i32).await;
    }
    sink.spawn().unwrap();
    until_ids(&r, 41..=55, &sink).await;
}

/// Updates that leave a TOASTed column unchanged keep it in the mirror, and
/// are versioned: the same records delivered again after newer changes (a
/// producer retry, a replay) neither regress a document nor bring a deleted
/// row back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_toast_merges_are_versioned_and_survive_a_replay() {
    let r = rig().await;
    let db = r.pg.client().await.unwrap();
    db.batch_execute(&format!(
        "CREATE TABLE docs (id int PRIMARY KEY, n int, blob text);
         INSERT INTO docs SELECT g, 0, {TOASTED} FROM generate_series(1, 10) g;"
    ))
    .await
    .unwrap();
    let cfg = in_daemon(&r, &["docs"], "flush_interval_ms = 50\n");
    let mut daemon = crate::support::daemon(r.dir.path(), &cfg, &[]);
    crate::support::wait_slot_active(&db, &mut daemon, "pgcdc").await;
    for change in [
        "UPDATE docs SET n = 1",
        "UPDATE docs SET n = 2 WHERE id <= 5",
        "DELETE FROM docs WHERE id = 3",
    ] {
        db.batch_execute(change).await.unwrap();
    }
    let index = "cdc_public_docs";
    assert_mirrors_table(&r, "public.docs", index, Duration::from_secs(90), &daemon).await;

    // The first UPDATE's records (unchanged blob) delivered again, then a sentinel row.
    let records = crate::support::read_all(&*r.broker, TOPIC);
    let again: Vec<&crate::support::Record> = records
        .iter()
        .filter(|rec| rec.op() == "u" && rec.after()["n"] == json!(1))
        .collect();
    assert_eq!(again.len(), 10);
    assert!(again
        .iter()
        .all(|rec| rec.value.as_ref().unwrap()["unchanged_toast"] == json!(["blob"])));
    let producer = producer(&*r.broker);
    for rec in again {
        let value = rec.value.as_ref().unwrap().to_string();
        let mut headers = OwnedHeaders::new();
        for (k, v) in &rec.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        let key = rec.key_bytes.as_deref().unwrap();
        let out: FutureRecord<'_, [u8], str> = FutureRecord::to(TOPIC)
            .key(key)
            .payload(value.as_str())
            .headers(headers);
        producer.send(out, Duration::from_secs(30)).await.unwrap();
    }
    db.batch_execute("INSERT INTO docs VALUES (99, 9, 'sentinel')")
        .await
        .unwrap();
    assert_mirrors_table(&r, "public.docs", index, Duration::from_secs(90), &daemon).await;
    let docs = r.es.documents(index).await.unwrap();
    assert!(!docs.contains_key("3"), "a deleted row came back");
    assert_eq!(docs["4"].1["n"], json!(2), "a document regressed");
    assert!(
        docs["4"].1["blob"]
            .as_str()
            .is_some_and(|b| b.len() == 9600),
        "the blob was lost"
    );
}

/// A key change under the default replica identity reaches the sink as a
/// delete and a create whose unchanged TOAST column carries no value, and
/// no document holds one under the new key: the sink reads it from the row
/// in PostgreSQL. Also when the same batch updates the new row again, for
/// a row deleted before the sink reads it (written without, then deleted),
/// and for a composite text key of a unique index (REPLICA IDENTITY USING
/// INDEX) with a quote in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_change_keeps_an_unchanged_toast_column_from_postgres() {
    let r = rig().await;
    let db = r.pg.client().await.unwrap();
    db.batch_execute(&format!(
        "CREATE TABLE docs (id int PRIMARY KEY, n int, blob text);
         INSERT INTO docs SELECT g, 0, {TOASTED} FROM generate_series(1, 6) g;
         CREATE TABLE tagged (region text NOT NULL, code text NOT NULL, blob text);
         CREATE UNIQUE INDEX tagged_key ON tagged (region, code);
         ALTER TABLE tagged REPLICA IDENTITY USING INDEX tagged_key;
         INSERT INTO tagged SELECT 'eu', 'c' || g, {TOASTED} FROM generate_series(1, 2) g;"
    ))
    .await
    .unwrap();
    let cfg = in_daemon(&r, &["docs", "tagged"], "");
    let mut daemon = crate::support::daemon(r.dir.path(), &cfg, &[]);
    crate::support::wait_slot_active(&db, &mut daemon, "pgcdc").await;
    db.batch_execute(
        "UPDATE docs SET id = id + 100 WHERE id <= 3;
         UPDATE docs SET n = 5 WHERE id = 103;
         UPDATE docs SET id = 200 WHERE id = 4; DELETE FROM docs WHERE id = 200;
         UPDATE tagged SET code = code || '''s' WHERE code = 'c1';",
    )
    .await
    .unwrap();
    let index = "cdc_public_docs";
    let tagged = "cdc_public_tagged";
    let wait = Duration::from_secs(90);
    assert_mirrors_table(&r, "public.docs", index, wait, &daemon).await;
    assert_mirrors_table(&r, "public.tagged", tagged, wait, &daemon).await;

    let records = crate::support::read_all(&*r.broker, TOPIC);
    let moved = records
        .iter()
        .filter(|rec| rec.op() == "c")
        .filter(|rec| rec.value.as_ref().unwrap()["unchanged_toast"] == json!(["blob"]))
        .count();
    assert_eq!(moved, 5, "the creates of the new keys carry no blob");
    let docs = r.es.documents(index).await.unwrap();
    for id in ["101", "102", "103"] {
        let blob = docs[id].1["blob"].as_str().map(str::len);
        assert_eq!(blob, Some(9600), "document {id}");
    }
    assert_eq!(docs["103"].1["n"], json!(5));
    assert!(!docs.contains_key("200"));
    let docs = r.es.documents(tagged).await.unwrap();
    let blobs: Vec<Option<usize>> = docs
        .values()
        .filter(|(_, d)| d["code"] == "c1's")
        .map(|(_, d)| d["blob"].as_str().map(str::len))
        .collect();
    assert_eq!(blobs, [Some(9600)]);
}

/// A table wider than Elasticsearch's default total fields limit (1,000)
/// is mirrored, and so are columns added to it later, in the mirror and
/// its history index.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_wider_than_the_default_field_limit_is_mirrored() {
    let r = rig().await;
    let db = r.pg.client().await.unwrap();
    let columns: Vec<String> = (0..600).map(|i| format!("c{i} text")).collect();
    db.batch_execute(&format!(
        "CREATE TABLE wide (id int PRIMARY KEY, {});
         INSERT INTO wide (id, c0, c599) SELECT g, 'a' || g, 'z' || g FROM generate_series(1, 3) g;",
        columns.join(", ")
    ))
    .await
    .unwrap();
    let cfg = in_daemon(&r, &["wide"], "history = true\n");
    let mut daemon = crate::support::daemon(r.dir.path(), &cfg, &[]);
    crate::support::wait_slot_active(&db, &mut daemon, "pgcdc").await;
    db.batch_execute("INSERT INTO wide (id, c1) VALUES (4, 'streamed')")
        .await
        .unwrap();
    let index = "cdc_public_wide";
    let wait = Duration::from_secs(90);
    assert_mirrors_table(&r, "public.wide", index, wait, &daemon).await;
    let added: Vec<String> = (0..300).map(|i| format!("ADD COLUMN d{i} int")).collect();
    db.batch_execute(&format!(
        "ALTER TABLE wide {}; UPDATE wide SET d0 = 1, d299 = 2 WHERE id = 2;",
        added.join(", ")
    ))
    .await
    .unwrap();
    assert_mirrors_table(&r, "public.wide", index, wait, &daemon).await;
    let history = r.es.documents(&format!("{index}_history")).await.unwrap();
    assert_eq!(
        history.len(),
        5,
        "three copied rows, an insert and an update"
    );
}

/// A history index maps `before`, `after` and `key` by the column types, and
/// columns added later when they appear: a text that first looks like a
/// date, a json value of changing shape and an added column are never
/// refused by a guessed mapping.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_documents_of_any_values_are_kept_and_searchable() {
    let r = rig().await;
    let db = r.pg.client().await.unwrap();
    db.batch_execute("CREATE TABLE notes (id int PRIMARY KEY, note text, j jsonb)")
        .await
        .unwrap();
    let cfg = in_daemon(&r, &["notes"], "history = true\n");
    let mut daemon = crate::support::daemon(r.dir.path(), &cfg, &[]);
    crate::support::wait_slot_active(&db, &mut daemon, "pgcdc").await;
    db.batch_execute(
        r#"INSERT INTO notes VALUES (1, '2024-01-01', '{"a": 1}');
           UPDATE notes SET note = 'hello', j = '{"a": "text"}';
           UPDATE notes SET j = '[1, 2]';
           ALTER TABLE notes ADD COLUMN tag text;
           UPDATE notes SET tag = 'blue';
           INSERT INTO notes VALUES (2, 'x', '7', 'green');
           DELETE FROM notes WHERE id = 2;"#,
    )
    .await
    .unwrap();
    let index = "cdc_public_notes";
    assert_mirrors_table(&r, "public.notes", index, Duration::from_secs(90), &daemon).await;
    let history = format!("{index}_history");
    let count = |query: Value| {
        let url = format!("{}/{history}/_search", r.es.url);
        async move {
            let body = json!({"query": query, "size": 0, "track_total_hits": true});
            let answer: Value = reqwest::Client::new()
                .post(url)
                .json(&body)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            answer["hits"]["total"]["value"].as_u64()
        }
    };
    pgcdc_testkit::wait::poll(
        "a history document per change",
        Duration::from_secs(60),
        Duration::from_millis(200),
        || async {
            let refresh = format!("{}/{history}/_refresh", r.es.url);
            let _ = reqwest::Client::new().post(refresh).send().await;
            let n = count(json!({"match_all": {}})).await;
            pgcdc_testkit::wait::Poll::when(n == Some(6), (), || format!("{n:?} documents"))
        },
    )
    .await
    .unwrap();
    assert_eq!(
        count(json!({"match": {"after.note": "hello"}})).await,
        Some(3)
    );
    assert_eq!(
        count(json!({"term": {"after.tag.keyword": "blue"}})).await,
        Some(1)
    );
    assert_eq!(count(json!({"term": {"key.id": 2}})).await, Some(2));
}

/// Table `docs (id, n, blob)` with four rows of TOASTed blobs, and a daemon
/// streaming it into the rig's search server, its metrics on the port
/// returned, with the TOAST read's failpoint set to `action`.
#[cfg(feature = "failpoints")]
async fn toasted_docs(r: &Rig, action: &str) -> (tokio_postgres::Client, Daemon, u16) {
    let db = r.pg.client().await.unwrap();
    db.batch_execute(&format!(
        "CREATE TABLE docs (id int PRIMARY KEY, n int, blob text);
         INSERT INTO docs SELECT g, 0, {TOASTED} FROM generate_series(1, 4) g;"
    ))
    .await
    .unwrap();
    let port = crate::support::free_port();
    let cfg = pgcdc_testkit::config::with_metrics(&in_daemon(r, &["docs"], ""), port);
    let fail = format!("{}={action}", pgcdc_actors::wire::failpoint::ES_TOAST_READ);
    let mut daemon = crate::support::daemon(r.dir.path(), &cfg, &[("FAILPOINTS", &fail)]);
    crate::support::wait_slot_active(&db, &mut daemon, "pgcdc").await;
    (db, daemon, port)
}

/// While PostgreSQL cannot be read, a change whose unchanged TOAST column
/// no document holds waits for it rather than being written without it; a
/// row gone by then is counted as such, not as missing.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_toast_column_read_waits_until_postgres_answers() {
    let r = rig().await;
    let (db, daemon, port) = toasted_docs(&r, "3*return").await;
    // One transaction: the read comes after its commit.
    db.batch_execute(
        "UPDATE docs SET id = id + 100 WHERE id <= 3;
         UPDATE docs SET id = 200 WHERE id = 4; DELETE FROM docs WHERE id = 200;",
    )
    .await
    .unwrap();
    let index = "cdc_public_docs";
    assert_mirrors_table(&r, "public.docs", index, Duration::from_secs(90), &daemon).await;
    let log = daemon.log_text();
    let retries = log.matches("cannot read unchanged TOAST columns from PostgreSQL; retrying");
    assert_eq!(retries.count(), 3, "one WARN per failed read");
    let metrics = crate::support::Probe::on(port).metrics().await;
    let outcome =
        |o: &str| crate::support::sample(&metrics, "pgcdc_es_bulk_items_total", &[("outcome", o)]);
    assert_eq!(outcome("toast_from_postgres"), Some(3.0));
    assert_eq!(outcome("toast_row_gone"), Some(1.0));
    assert_eq!(outcome("toast_missing").unwrap_or(0.0), 0.0);
}

/// When PostgreSQL refuses the read of unchanged TOAST columns (here a
/// failpoint), the documents written without them are not left so: the
/// mirror is reported and filled again from PostgreSQL.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_written_without_toast_columns_postgres_refused_are_filled_again() {
    let r = rig().await;
    let (db, mut daemon, port) = toasted_docs(&r, "1*return(refused)").await;
    db.batch_execute("UPDATE docs SET id = id + 100 WHERE id <= 3")
        .await
        .unwrap();
    let index = "cdc_public_docs";
    assert_mirrors_table(&r, "public.docs", index, Duration::from_secs(90), &daemon).await;
    let probe = crate::support::Probe::on(port);
    probe
        .until("ready once the fill is in", &mut daemon, |_, ready| {
            ready == 200
        })
        .await;
    let metrics = probe.metrics().await;
    let missing = crate::support::sample(
        &metrics,
        "pgcdc_es_bulk_items_total",
        &[("outcome", "toast_missing")],
    );
    assert_eq!(missing, Some(3.0), "{metrics}");
    let log = daemon.log_text();
    assert!(
        log.contains("filling a new index from PostgreSQL")
            && log.contains("documents were written without unchanged TOAST columns"),
        "{log}"
    );
}

/// Tables keyed by types whose JSON form differs from their text (bytea,
/// timestamptz, float, numeric, uuid, an array, a composite key of them)
/// are mirrored, and `pgcdc verify` finds them equal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_of_any_type_are_mirrored_and_verified_equal() {
    let r = rig().await;
    let db = r.pg.client().await.unwrap();
    let kinds = [
        ("kb", "bytea", "decode(md5(g::text), 'hex')"),
        (
            "kt",
            "timestamptz",
            "'2024-02-29 23:59:59.123456+05:30'::timestamptz + g * interval '1 day'",
        ),
        ("kf", "float8", "g / 3.0"),
        ("kn", "numeric", "g * 1.10"),
        ("ku", "uuid", "md5(g::text)::uuid"),
        ("ka", "int[]", "ARRAY[g, g + 1]"),
        ("kj", "jsonb", "jsonb_build_object('g', g)"),
        ("kd", "date", "'2024-01-01'::date + g"),
    ];
    let mut tables = Vec::new();
    for (name, ty, value) in kinds {
        db.batch_execute(&format!(
            "CREATE TABLE {name} (k {ty} PRIMARY KEY, v int);
             INSERT INTO {name} SELECT {value}, g FROM generate_series(1, 5) g;"
        ))
        .await
        .unwrap();
        tables.push(name);
    }
    db.batch_execute(
        "CREATE TABLE kc (t timestamptz, b bytea, v int, PRIMARY KEY (t, b));
         INSERT INTO kc SELECT now() + g * interval '1 s', decode(md5(g::text), 'hex'), g FROM generate_series(1, 5) g;",
    )
    .await
    .unwrap();
    tables.push("kc");
    let cfg = in_daemon(&r, &tables, "");
    let mut daemon = crate::support::daemon(r.dir.path(), &cfg, &[]);
    crate::support::wait_slot_active(&db, &mut daemon, "pgcdc").await;
    for t in &tables {
        db.batch_execute(&format!(
            "UPDATE {t} SET v = v + 10 WHERE v <= 2; DELETE FROM {t} WHERE v = 5;"
        ))
        .await
        .unwrap();
    }
    for t in &tables {
        let index = format!("cdc_public_{t}");
        let table = format!("public.{t}");
        assert_mirrors_table(&r, &table, &index, Duration::from_secs(90), &daemon).await;
    }
    // A delete decoded while the table is outside the publication never
    // reaches the mirror: verify finds the extra document by its key and
    // its repair removes it.
    daemon.terminate(Duration::from_secs(30)).unwrap();
    for t in &tables {
        db.batch_execute(&format!(
            "ALTER PUBLICATION pgcdc DROP TABLE {t}; DELETE FROM {t} WHERE v = 3;
             ALTER PUBLICATION pgcdc ADD TABLE {t};"
        ))
        .await
        .unwrap();
    }
    daemon.spawn().unwrap();
    crate::support::wait_slot_active(&db, &mut daemon, "pgcdc").await;
    let verify = |args: &[&str]| {
        let out = daemon.run(&[&["verify"], args].concat()).unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (out.status.code(), text)
    };
    let (code, text) = verify(&[]);
    assert_eq!(code, Some(1), "{text}");
    assert_eq!(text.matches("extra 1,").count(), tables.len(), "{text}");
    let (code, text) = verify(&["--repair"]);
    assert_eq!(code, Some(0), "the pass after the repair is equal: {text}");
}

/// Names and values real schemas have: a quoted mixed-case schema and
/// table, column names with spaces, quotes, non-ASCII and 63 characters, a
/// padded char key, money, interval, time, and texts, arrays and a
/// tsvector longer than any keyword Elasticsearch indexes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusual_names_and_long_values_are_mirrored() {
    let r = rig().await;
    let db = r.pg.client().await.unwrap();
    db.batch_execute(
        r#"CREATE SCHEMA "Sales";
           CREATE TABLE "Sales"."Order" ("Order Id" char(6) PRIMARY KEY, "Total €" money, "wi""th" text,
              "a_very_long_column_name_that_is_exactly_sixty_three_characters_" int,
              big text, tsv tsvector, iv interval, t time, tags text[]);
           INSERT INTO "Sales"."Order" VALUES ('a1', 12.5, 'q', 1, repeat('x', 40000),
              to_tsvector(repeat('word ', 3000) || 'end'), '1 day 2 hours', '13:14:15', ARRAY[repeat('y', 40000)]);"#,
    )
    .await
    .unwrap();
    let cfg = in_daemon(&r, &[r#""Sales"."Order""#], "");
    let mut daemon = crate::support::daemon(r.dir.path(), &cfg, &[]);
    crate::support::wait_slot_active(&db, &mut daemon, "pgcdc").await;
    db.batch_execute(
        r#"INSERT INTO "Sales"."Order" SELECT 'b' || g, g, 'w', g, repeat('z', 50000), NULL, '-3 days', '00:00', NULL FROM generate_series(1, 3) g;
           UPDATE "Sales"."Order" SET "Total €" = 99 WHERE "Order Id" = 'a1';"#,
    )
    .await
    .unwrap();
    let index = pgcdc_actors::es_writer::naming::mirror_index("cdc_", "Sales", "Order");
    assert_mirrors_table(
        &r,
        r#""Sales"."Order""#,
        &index,
        Duration::from_secs(90),
        &daemon,
    )
    .await;
}

/// A partitioned table with a TOASTed column: a row moved to another
/// partition, a key change (its unchanged column read from PostgreSQL
/// through the root) and an update keep the mirror equal to the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_table_with_toast_columns_is_mirrored_through_row_moves() {
    let r = rig().await;
    let db = r.pg.client().await.unwrap();
    db.batch_execute(&format!(
        "CREATE TABLE p (id int, region text, n int, blob text, PRIMARY KEY (id, region)) PARTITION BY LIST (region);
         CREATE TABLE p_eu PARTITION OF p FOR VALUES IN ('eu');
         CREATE TABLE p_us PARTITION OF p FOR VALUES IN ('us');
         INSERT INTO p SELECT g, 'eu', 0, {TOASTED} FROM generate_series(1, 4) g;"
    ))
    .await
    .unwrap();
    let cfg = in_daemon(&r, &["p"], "");
    let mut daemon = crate::support::daemon(r.dir.path(), &cfg, &[]);
    crate::support::wait_slot_active(&db, &mut daemon, "pgcdc").await;
    db.batch_execute(
        "UPDATE p SET region = 'us' WHERE id = 1;
         UPDATE p SET id = id + 10 WHERE id = 2;
         UPDATE p SET n = 5 WHERE id = 3;",
    )
    .await
    .unwrap();
    let wait = Duration::from_secs(90);
    assert_mirrors_table(&r, "public.p", "cdc_public_p", wait, &daemon).await;
}

/// Every type family of the type zoo (`types.rs`) is mirrored as it is
/// rendered, copied and streamed: none is refused by its mapping.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_family_is_mirrored_without_a_refusal() {
    let r = rig().await;
    let db = r.pg.client().await.unwrap();
    db.batch_execute(crate::types::ZOO).await.unwrap();
    let cfg = in_daemon(&r, &["zoo"], "");
    let port = crate::support::free_port();
    let cfg = pgcdc_testkit::config::with_metrics(&cfg, port);
    let mut daemon = crate::support::daemon(r.dir.path(), &cfg, &[]);
    crate::support::wait_slot_active(&db, &mut daemon, "pgcdc").await;
    db.batch_execute(
        "INSERT INTO zoo SELECT id + 10, dom, doms, dnum, mood, moods, moods2, place, places, nullf, m, mmin, h, ci, r, er, tr, b, vb, tsv, pt, bx, bxs, x, jb, d, tsz, f8s, ea, i2d, c FROM zoo;
         UPDATE zoo SET jb = '[1, \"two\", {\"three\": 3}]', dnum = 'NaN' WHERE id = 1;
         UPDATE zoo SET jb = '7' WHERE id = 2;",
    )
    .await
    .unwrap();
    let index = "cdc_public_zoo";
    assert_mirrors_table(&r, "public.zoo", index, Duration::from_secs(90), &daemon).await;
    let metrics = crate::support::Probe::on(port).metrics().await;
    let dead = metrics
        .lines()
        .find(|l| l.starts_with("pgcdc_dead_letters_total"))
        .unwrap_or_default()
        .to_owned();
    assert!(dead.is_empty() || dead.ends_with(" 0"), "{dead}");
}

/// Columns named like Elasticsearch's metadata fields (`_id`, `_source`,
/// `_routing`) or the sink's `_cdc` are written under their shifted fields
/// (`_id_`, …): through the stream, a merge of an unchanged TOAST column, a
/// key change read from PostgreSQL, and a fill for a column added with a
/// default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn columns_named_like_metadata_fields_are_mirrored_under_shifted_fields() {
    let r = rig().await;
    let db = r.pg.client().await.unwrap();
    db.batch_execute(&format!(
        "CREATE TABLE legacy (_id text PRIMARY KEY, _cdc text, _source text, n int);
         INSERT INTO legacy SELECT 'm' || g, 'mine ' || g, {TOASTED}, 0 FROM generate_series(1, 4) g;"
    ))
    .await
    .unwrap();
    let cfg = in_daemon(&r, &["legacy"], "");
    let mut daemon = crate::support::daemon(r.dir.path(), &cfg, &[]);
    crate::support::wait_slot_active(&db, &mut daemon, "pgcdc").await;
    db.batch_execute(&format!(
        "INSERT INTO legacy SELECT 'm5', 'mine 5', {TOASTED}, 0 FROM generate_series(5, 5) g;
         UPDATE legacy SET n = 1, _cdc = 'changed' WHERE _id = 'm1';
         UPDATE legacy SET _id = 'm2x' WHERE _id = 'm2';
         DELETE FROM legacy WHERE _id = 'm3';"
    ))
    .await
    .unwrap();
    let index = "cdc_public_legacy";
    let wait = Duration::from_secs(90);
    assert_mirrors_table(&r, "public.legacy", index, wait, &daemon).await;
    let rows = db
        .query("SELECT _id, _cdc, length(_source), n FROM legacy", &[])
        .await
        .unwrap();
    // `documents` also fails on a `_cdc` that is not the sink's (its LSN the version).
    let docs = r.es.documents(index).await.unwrap();
    assert_eq!(docs.len(), rows.len(), "{:?}", docs.keys());
    for row in &rows {
        let id: String = row.get(0);
        let (_, doc) = &docs[&id];
        assert_eq!(doc["_id_"], json!(id));
        assert_eq!(
            doc["_cdc_"],
            json!(row.get::<_, String>(1)),
            "document {id}"
        );
        let blob = doc["_source_"].as_str().map(str::len);
        assert_eq!(blob, Some(row.get::<_, i32>(2) as usize), "document {id}");
        assert_eq!(doc["n"], json!(row.get::<_, i32>(3)), "document {id}");
    }

    db.batch_execute("ALTER TABLE legacy ADD COLUMN _routing int NOT NULL DEFAULT 7")
        .await
        .unwrap();
    db.batch_execute("UPDATE legacy SET n = 2 WHERE _id = 'm4'")
        .await
        .unwrap();
    assert_mirrors_table(&r, "public.legacy", index, wait, &daemon).await;
    let docs = r.es.documents(index).await.unwrap();
    for (id, (_, doc)) in &docs {
        assert_eq!(doc["_routing_"], json!(7), "document {id}");
    }
    assert_eq!(docs["m4"].1["n"], json!(2));
}

/// A column added while streaming is mapped from its PostgreSQL type before
/// its first document; an existing mirror index that would forget deletes
/// too soon is refused with the setting to change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_columns_get_explicit_mappings_and_unsafe_existing_indices_are_refused() {
    let r = rig().await;
    let db = r.pg.client().await.unwrap();
    db.batch_execute(
        "CREATE TABLE items (id int PRIMARY KEY); CREATE TABLE legacy (id int PRIMARY KEY);",
    )
    .await
    .unwrap();
    let fast = "flush_interval_ms = 50\n";
    let cfg = in_daemon(&r, &["items"], fast);
    let mut daemon = crate::support::daemon(r.dir.path(), &cfg, &[]);
    crate::support::wait_slot_active(&db, &mut daemon, "pgcdc").await;
    db.batch_execute("INSERT INTO items VALUES (1); ALTER TABLE items ADD COLUMN qty int4; INSERT INTO items VALUES (2, 5); UPDATE items SET qty = 1 WHERE id = 1;")
        .await
        .unwrap();
    assert_mirrors_table(
        &r,
        "public.items",
        "cdc_public_items",
        Duration::from_secs(60),
        &daemon,
    )
    .await;
    let mapping: Value = reqwest::get(format!("{}/cdc_public_items/_mapping", r.es.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let qty = &mapping["cdc_public_items~1"]["mappings"]["properties"]["qty"];
    assert_eq!(
        qty,
        &json!({"type": "integer", "ignore_malformed": true}),
        "{mapping}"
    );
    daemon.terminate(Duration::from_secs(30)).unwrap();

    // An index made by hand, without gc_deletes (Elasticsearch's 60 s).
    let http = reqwest::Client::new();
    http.put(format!("{}/cdc_public_legacy", r.es.url))
        .send()
        .await
        .unwrap();
    let cfg = in_daemon(&r, &["items", "legacy"], fast);
    let mut daemon = crate::support::daemon(r.dir.path(), &cfg, &[]);
    crate::support::wait_slot_active(&db, &mut daemon, "pgcdc").await;
    db.batch_execute("INSERT INTO legacy VALUES (1)")
        .await
        .unwrap();
    let status = daemon.wait_exit(Duration::from_secs(60)).unwrap();
    assert_eq!(status.code(), Some(2), "{}", daemon.log_tail());
    assert!(
        daemon
            .log_text()
            .contains("PUT cdc_public_legacy/_settings"),
        "{}",
        daemon.log_tail()
    );
}

/// A table whose mirror Elasticsearch refuses (columns `a` and `a.b`: it
/// cannot map both) does not hold up the other mirrors. It is reported
/// until it is filled: at the start of a sink after a kill -9, though its
/// records were committed and no change comes, once the table is fixed;
/// and in the running sink when a later schema change is refused again.
/// Its history documents, which no fill makes again, are dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_elasticsearch_refuses_does_not_hold_up_the_others_and_is_filled_once_accepted() {
    let r = rig().await;
    let db = r.pg.client().await.unwrap();
    db.batch_execute(
        r#"CREATE TABLE good (id int PRIMARY KEY, v text);
           CREATE TABLE bad (id int PRIMARY KEY, a int, "a.b" int);
           INSERT INTO good VALUES (1, 'x');
           INSERT INTO bad VALUES (1, 1, 2);"#,
    )
    .await
    .unwrap();
    let port = crate::support::free_port();
    let cfg = in_daemon(&r, &["good", "bad"], "history = true\n");
    let cfg = pgcdc_testkit::config::with_metrics(&cfg, port);
    let probe = crate::support::Probe::on(port);
    let mut daemon = crate::support::daemon(r.dir.path(), &cfg, &[]);
    crate::support::wait_slot_active(&db, &mut daemon, "pgcdc").await;
    db.batch_execute("INSERT INTO bad VALUES (2, 1, 2); INSERT INTO good VALUES (2, 'y');")
        .await
        .unwrap();
    let timeout = Duration::from_secs(60);
    let (good, bad) = ("cdc_public_good", "cdc_public_bad");
    assert_mirrors_table(&r, "public.good", good, timeout, &daemon).await;
    let refused = |text: &str| {
        crate::support::sample(text, "pgcdc_es_mirrors_refused_total", &[("mirror", bad)])
            .is_some_and(|n| n >= 1.0)
    };
    probe
        .until("the refused mirror reported", &mut daemon, |text, ready| {
            ready == 503 && refused(text)
        })
        .await;
    let (_, why) = probe.ready().await;
    assert!(
        why.contains(bad) && why.contains("Elasticsearch refuses its index"),
        "{why}"
    );
    assert!(
        why.contains("cdc_public_bad_history") && why.contains("refuses the history index"),
        "{why}"
    );
    assert!(!why.contains(good), "{why}");
    let (dead, reasons) = dead_letters(&*r.broker, 2);
    assert!(
        reasons.iter().all(|r| r.contains("history index refused")),
        "{reasons:?}"
    );
    let mut keys: Vec<String> = dead
        .iter()
        .filter_map(|d| Some(d.key.as_ref()?.to_string()))
        .collect();
    keys.sort();
    assert_eq!(keys, [r#"{"id":1}"#, r#"{"id":2}"#]);
    let history = r.es.documents("cdc_public_good_history").await.unwrap();
    assert_eq!(history.len(), 2, "{history:?}");
    wait::until(
        "the sink committed past the refused records",
        timeout,
        || async { sink_group_offset(&*r.broker) >= 4 },
    )
    .await
    .unwrap();
    daemon.kill9();

    // Fixed while no sink runs, and no change of it comes: filled from the note.
    db.batch_execute(r#"ALTER TABLE bad RENAME COLUMN "a.b" TO a_b"#)
        .await
        .unwrap();
    let mut daemon = crate::support::daemon(r.dir.path(), &cfg, &[]);
    assert_mirrors_table(&r, "public.bad", bad, timeout, &daemon).await;
    probe
        .until("ready once it is filled", &mut daemon, |_, ready| {
            ready == 200
        })
        .await;

    // Refused again while the sink runs, and fixed with no change after
    // the fix: both indices are tried again and accepted on their own.
    db.batch_execute(
        r#"ALTER TABLE bad RENAME COLUMN a_b TO "a.b";
           INSERT INTO bad VALUES (4, 4, 4);"#,
    )
    .await
    .unwrap();
    probe
        .until(
            "the history index refused again",
            &mut daemon,
            |_, ready| ready == 503,
        )
        .await;
    let (_, why) = probe.ready().await;
    assert!(why.contains("cdc_public_bad_history"), "{why}");
    let (dead, reasons) = dead_letters(&*r.broker, 3);
    assert_eq!(dead.len(), 3, "{reasons:?}");
    assert_eq!(
        dead[2].key.as_ref().map(ToString::to_string).as_deref(),
        Some(r#"{"id":4}"#)
    );
    assert!(reasons[2].contains("history index refused"), "{reasons:?}");
    db.batch_execute(r#"ALTER TABLE bad RENAME COLUMN "a.b" TO a_b"#)
        .await
        .unwrap();
    assert_mirrors_table(&r, "public.bad", bad, Duration::from_secs(120), &daemon).await;
    probe
        .until("ready once both are accepted", &mut daemon, |_, ready| {
            ready == 200
        })
        .await;
    let history = reqwest::get(format!("{}/cdc_public_bad_history", r.es.url))
        .await
        .unwrap();
    assert_eq!(history.status(), 200, "the history index was not created");

    // A column Elasticsearch cannot map next to `id`: its changes are
    // skipped, the others go on, and once it is dropped the mirror is filled.
    db.batch_execute(
        r#"ALTER TABLE bad ADD COLUMN "id.x" int;
           INSERT INTO bad VALUES (3, 3, 3, 3);
           INSERT INTO good VALUES (3, 'z');"#,
    )
    .await
    .unwrap();
    assert_mirrors_table(&r, "public.good", good, timeout, &daemon).await;
    probe
        .until("the refused mapping reported", &mut daemon, |_, ready| {
            ready == 503
        })
        .await;
    let (_, why) = probe.ready().await;
    assert!(
        why.contains(bad) && why.contains("Elasticsearch refuses its index"),
        "{why}"
    );
    db.batch_execute(r#"ALTER TABLE bad DROP COLUMN "id.x"; UPDATE bad SET a = 9 WHERE id = 1;"#)
        .await
        .unwrap();
    assert_mirrors_table(&r, "public.bad", bad, Duration::from_secs(120), &daemon).await;
    probe
        .until("ready once it is filled again", &mut daemon, |_, ready| {
            ready == 200
        })
        .await;
}
