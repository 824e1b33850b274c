//! ES sink throughput (not a timed test): 500,000 change events already in
//! Kafka, timed until the mirror index holds them all; in the same run the
//! same documents posted by a plain bulk loader (pre-built NDJSON,
//! equal-size `_bulk` requests, unversioned) into an index of the same
//! mapping. Each side writes into a fresh osmem-server, and neither is
//! refreshed while it loads (see the sink's wait below).
//!
//! Run with `cargo bench --bench es_sink`.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use pgcdc_actors::es_writer::{index_body, EsConfig};
use pgcdc_actors::lsn::Lsn;
use pgcdc_actors::wire::header;
use pgcdc_testkit::bench::{self, Target};
use pgcdc_testkit::config::daemon_config as config;
use pgcdc_testkit::wait::{self, Poll};
use pgcdc_testkit::{Broker, Daemon, PgCluster, SearchServer, Tansu};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde_json::json;

/// The daemon under test.
const PGCDC: &str = env!("CARGO_BIN_EXE_pgcdc");

/// Change events in Kafka (`ES_SINK_BENCH_EVENTS` overrides it for a short run).
const EVENTS: u64 = 500_000;
const BULK: usize = 1000;
/// The ratio to the plain loader the sink should reach.
const TARGET: f64 = 0.9;
/// How long either loader may take (a stuck run fails instead of hanging).
const TIMEOUT: Duration = Duration::from_secs(1800);
const TYPES: &str = r#"{"id":"int8","name":"text","n":"int4","at":"timestamptz"}"#;

fn row(i: u64) -> serde_json::Value {
    json!({"id": i, "name": format!("item {i}"), "n": i % 1000, "at": "2026-11-24T10:00:00.123456Z"})
}

/// The document the mirror stores for row `i` (the row plus `_cdc`, as the
/// sink writes it), for the baseline.
fn mirror_doc(i: u64) -> serde_json::Value {
    let mut doc = row(i);
    doc["_cdc"] = json!({"op": "c", "lsn": 1000 + i, "seq": 0, "ts_ms": 1, "xid": 1});
    doc
}

async fn count(http: &reqwest::Client, url: &str, index: &str) -> u64 {
    let _ = http.post(format!("{url}/{index}/_refresh")).send().await;
    let Ok(resp) = http.get(format!("{url}/{index}/_count")).send().await else {
        return 0;
    };
    resp.json::<serde_json::Value>()
        .await
        .ok()
        .and_then(|v| v["count"].as_u64())
        .unwrap_or(0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let events: u64 = std::env::var("ES_SINK_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(EVENTS);
    let pg = PgCluster::start().unwrap();
    let tansu = Tansu::start().unwrap();
    tansu.create_topic("cdc-events", 1).unwrap();
    let es = SearchServer::start().unwrap();
    let http = reqwest::Client::new();

    eprintln!("bench: producing {events} change events");
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", tansu.brokers())
        .set("linger.ms", "20")
        .create()
        .unwrap();
    let mut pending = Vec::new();
    for i in 0..events {
        let lsn = 1000 + i;
        let value = json!({"before": null, "after": row(i), "op": "c", "ts_ms": 1,
            "source": {"connector": "pgcdc", "db": "db", "schema": "public", "table": "bench", "lsn": lsn,
                       "commit_lsn": lsn, "seq": 0, "txId": 1, "ts_ms": 1, "snapshot": false}})
        .to_string();
        let key = json!({"id": i}).to_string();
        let commit_lsn = Lsn(lsn).to_string();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: header::TABLE,
                value: Some("public.bench"),
            })
            .insert(Header {
                key: header::COMMIT_LSN,
                value: Some(&commit_lsn),
            })
            .insert(Header {
                key: header::TYPES,
                value: Some(TYPES),
            });
        let record = FutureRecord::to("cdc-events")
            .key(&key)
            .payload(&value)
            .headers(headers);
        pending.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
        if pending.len() >= 10_000 {
            for d in pending.drain(..) {
                d.await.unwrap().unwrap();
            }
        }
    }
    for d in pending.drain(..) {
        d.await.unwrap().unwrap();
    }

    // Baseline: pre-built NDJSON, equal-size bulk requests, one at a time.
    let bodies: Vec<String> = (0..events)
        .collect::<Vec<_>>()
        .chunks(BULK)
        .map(|chunk| {
            let mut body = String::new();
            for i in chunk {
                body.push_str(
                    &json!({"index": {"_index": "plain", "_id": i.to_string()}}).to_string(),
                );
                body.push('\n');
                body.push_str(&mirror_doc(*i).to_string());
                body.push('\n');
            }
            body
        })
        .collect();
    // The mapping the sink gives its mirror index.
    let es_config = EsConfig {
        number_of_replicas: 0,
        ..EsConfig::default()
    };
    http.put(format!("{}/plain", es.url))
        .json(&index_body(&es_config, Some(TYPES), false))
        .send()
        .await
        .unwrap();
    let t0 = Instant::now();
    for body in bodies {
        let resp = http
            .post(format!("{}/_bulk", es.url))
            .header("content-type", "application/x-ndjson")
            .body(body)
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success());
    }
    let every = Duration::from_millis(500);
    wait::until("the plain loader's documents", TIMEOUT, || async {
        count(&http, &es.url, "plain").await >= events
    })
    .await
    .unwrap();
    let plain = t0.elapsed().as_secs_f64();
    // A fresh server for the sink, so both runs start from the same state
    // (deleting the index leaves osmem-server's heap grown).
    drop(es);
    let es = SearchServer::start().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let metrics_port = pgcdc_testkit::free_port().unwrap();
    let cfg = config(&pg, &tansu, &dir.path().join("state"), &["bench"], "");
    let cfg = pgcdc_testkit::config::with_metrics(&cfg, metrics_port)
        .replace("info,pgcdc_actors=debug", "warn")
        + &format!(
            "\n[elasticsearch]\nurl = {:?}\nnumber_of_replicas = 0\nbulk_max_actions = {BULK}\n",
            es.url
        );
    let t0 = Instant::now();
    let mut sink = Daemon::start(
        std::path::Path::new(PGCDC),
        dir.path(),
        &cfg,
        "es-sink",
        &[],
    )
    .unwrap();
    // Progress is read from the sink's `/metrics`, not by refreshing the
    // index: a refresh costs osmem-server time that grows with the index,
    // and the loader above is not polled while it writes either.
    let metrics = format!("http://127.0.0.1:{metrics_port}/metrics");
    let last = format!(
        "pgcdc_es_applied_lsn{{table=\"public.bench\"}} {}",
        1000 + events - 1
    );
    wait::poll("the sink's last record applied", TIMEOUT, every, || async {
        if !sink.is_running() {
            return Poll::Abort(format!("sink exited:\n{}", sink.log_text()));
        }
        let page = match reqwest::get(&metrics).await {
            Ok(resp) => resp.text().await.unwrap_or_default(),
            Err(e) => return Poll::Pending(format!("{metrics}: {e}")),
        };
        Poll::when(page.lines().any(|l| l == last), (), || {
            format!("no `{last}` yet")
        })
    })
    .await
    .unwrap();
    wait::until("the sink's documents", TIMEOUT, || async {
        count(&http, &es.url, "cdc_public_bench").await >= events
    })
    .await
    .unwrap();
    let secs = t0.elapsed().as_secs_f64();
    let cpu = bench::cpu_secs(sink.pid().unwrap(), false);
    sink.terminate(Duration::from_secs(30)).unwrap();

    println!();
    println!("{events} documents into osmem-server on this machine, one run:");
    println!("{:<52} {:>10} {:>9}", "", "docs/s", "seconds");
    println!(
        "{:<52} {:>10.0} {:>9.2}",
        "plain bulk loader (pre-built NDJSON, 1000/request)",
        events as f64 / plain,
        plain
    );
    println!(
        "{:<52} {:>10.0} {:>9.2}",
        "pgcdc es-sink (from Kafka, versioned, offsets)",
        events as f64 / secs,
        secs
    );
    println!(
        "ratio es-sink / plain loader: {:.2} (target >= {TARGET})",
        plain / secs
    );
    let per_doc = cpu * 1e6 / events as f64;
    bench::figure(
        &format!("{events} events into the search mirror"),
        &format!(
            "{:.0} docs/s ({per_doc:.1} µs CPU/doc)",
            events as f64 / secs
        ),
        &format!("plain _bulk {:.0} docs/s", events as f64 / plain),
        plain / secs,
        Target::AtLeast(TARGET),
    );
}
