//! ES sink throughput (not a timed test): 250,000 change events already in
//! Kafka, timed until the mirror index holds them all, and judged after the
//! sink's start-up (its first batch written: mostly the broker's hold on a
//! new group's first join, printed on its own); in the same run the
//! same documents posted by a plain bulk loader (pre-built NDJSON,
//! equal-size `_bulk` requests, unversioned) into an index of the same
//! mapping. The sides take turns, twice each, every run on a fresh
//! osmem-server, and each side's faster run is judged. No index is
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
const EVENTS: u64 = 250_000;
/// Runs of each side, in turn.
const ROUNDS: u32 = 2;
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

/// The highest commit LSN the sink's `/metrics` page says it applied to
/// the bench table, once it is at least `at_least`; aborts if the sink exited.
async fn applied_lsn(sink: &Daemon, metrics: &str, at_least: u64) -> Poll<u64> {
    if !sink.is_running() {
        return Poll::Abort(format!("sink exited:\n{}", sink.log_text()));
    }
    let page = match reqwest::get(metrics).await {
        Ok(resp) => resp.text().await.unwrap_or_default(),
        Err(e) => return Poll::Pending(format!("{metrics}: {e}")),
    };
    let lsn =
        bench::sample(&page, "pgcdc_es_applied_lsn{table=\"public.bench\"}").map(|v| v as u64);
    match lsn {
        Some(lsn) if lsn >= at_least => Poll::Ready(lsn),
        _ => Poll::Pending(format!("applied {lsn:?}, waiting for {at_least}")),
    }
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
    let bodies: Vec<bytes::Bytes> = (0..events)
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
            body.into()
        })
        .collect();

    // The two sides take turns, each on a fresh server, and each side's
    // faster run counts: the search server's pace varies from run to run
    // by about as much as the target's margin.
    let mut plains = Vec::new();
    let mut sinks = Vec::new();
    for round in 1..=ROUNDS {
        plains.push(plain_run(&http, &bodies, events).await);
        sinks.push(sink_run(&http, &pg, &tansu, events, round).await);
    }
    let (plain, plain_server_cpu) = *plains.iter().min_by(|a, b| a.0.total_cmp(&b.0)).unwrap();
    let best = sinks
        .iter()
        .max_by(|a, b| a.steady.total_cmp(&b.steady))
        .unwrap();

    let plain_rate = events as f64 / plain;
    let steady = best.steady;
    println!();
    println!(
        "{events} documents into osmem-server on this machine, {ROUNDS} runs of each side in turn:"
    );
    println!("{:<68} {:>10} {:>9}", "", "docs/s", "seconds");
    let line = |what: &str, rate: f64, secs: f64| println!("{what:<68} {rate:>10.0} {secs:>9.2}");
    for (round, (p, s)) in plains.iter().zip(&sinks).enumerate() {
        let round = round + 1;
        line(
            &format!("run {round}: plain bulk loader (pre-built NDJSON, {BULK}/request)"),
            events as f64 / p.0,
            p.0,
        );
        line(
            &format!("run {round}: pgcdc es-sink (from Kafka, versioned, offsets), from start"),
            events as f64 / s.secs,
            s.secs,
        );
        println!(
            "{:<68} {:>10} {:>9.2}",
            "  of which start-up, until its first batch was written", "-", s.started
        );
        line("  after its first batch", s.steady, s.secs - s.started);
        println!(
            "  CPU seconds: plain run osmem-server {:.1}; sink run pgcdc {:.1}, osmem-server {:.1}, tansu {:.1}",
            p.1, s.cpu, s.server_cpu, s.tansu_cpu
        );
    }
    println!(
        "ratio es-sink / plain loader, faster run of each: {:.2} after start-up (target >= {TARGET}), {:.2} from start",
        steady / plain_rate,
        (events as f64 / best.secs) / plain_rate
    );
    let per_doc = best.cpu * 1e6 / events as f64;
    bench::figure(
        &format!("{events} events into the search mirror (faster of {ROUNDS} runs each)"),
        &format!(
            "{steady:.0} docs/s after a {:.1} s start ({per_doc:.1} µs CPU/doc; CPU s osmem {:.0}, tansu {:.0})",
            best.started, best.server_cpu, best.tansu_cpu
        ),
        &format!("plain _bulk {plain_rate:.0} docs/s (CPU s osmem {plain_server_cpu:.0})"),
        steady / plain_rate,
        Target::AtLeast(TARGET),
    );
}

/// Post `bodies` to a fresh server, one request at a time, until a count
/// finds every document: the seconds it took and the server's CPU seconds.
async fn plain_run(http: &reqwest::Client, bodies: &[bytes::Bytes], events: u64) -> (f64, f64) {
    let es = SearchServer::start().unwrap();
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
    let server_cpu = bench::cpu_secs(es.pid(), false);
    for body in bodies {
        let resp = http
            .post(format!("{}/_bulk", es.url))
            .header("content-type", "application/x-ndjson")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success());
    }
    wait::until("the plain loader's documents", TIMEOUT, || async {
        count(http, &es.url, "plain").await >= events
    })
    .await
    .unwrap();
    let secs = t0.elapsed().as_secs_f64();
    (secs, bench::cpu_secs(es.pid(), false) - server_cpu)
}

/// One run of the sink.
struct SinkRun {
    /// From its start until a count finds every document.
    secs: f64,
    /// From its start until its first batch was applied.
    started: f64,
    /// The sink's pace once it writes: the documents after its first batch
    /// over the time after it.
    steady: f64,
    /// CPU seconds of the sink, the search server and tansu.
    cpu: f64,
    server_cpu: f64,
    tansu_cpu: f64,
}

/// Run the sink (consumer group `bench-<round>`, so each run reads every
/// record) into a fresh server until it applied the last record and a count
/// finds every document.
async fn sink_run(
    http: &reqwest::Client,
    pg: &PgCluster,
    tansu: &Tansu,
    events: u64,
    round: u32,
) -> SinkRun {
    let es = SearchServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let metrics_port = pgcdc_testkit::free_port().unwrap();
    let cfg = config(pg, tansu, &dir.path().join("state"), &["bench"], "");
    let cfg = pgcdc_testkit::config::with_metrics(&cfg, metrics_port)
        .replace("info,pgcdc_actors=debug", "warn")
        + &format!(
            "\n[elasticsearch]\nurl = {:?}\nnumber_of_replicas = 0\nbulk_max_actions = {BULK}\nconsumer_group = \"bench-{round}\"\n",
            es.url
        );
    let (server_cpu, tansu_cpu) = (
        bench::cpu_secs(es.pid(), false),
        bench::cpu_secs(tansu.pid(), false),
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
    // Start-up (connecting, joining the group, creating the mirror) ends
    // at the first batch applied: the broker holds a new group's first
    // join a while (tansu half the session timeout, Kafka
    // `group.initial.rebalance.delay.ms`), which is not the sink's pace.
    let first_lsn = wait::poll(
        "the sink's first batch applied",
        TIMEOUT,
        wait::EVERY,
        || applied_lsn(&sink, &metrics, 0),
    )
    .await
    .unwrap();
    let started = t0.elapsed().as_secs_f64();
    // Documents written by then (record i has commit LSN 1000 + i).
    let first_docs = first_lsn + 1 - 1000;
    let last = 1000 + events - 1;
    let every = Duration::from_millis(500);
    wait::poll("the sink's last record applied", TIMEOUT, every, || {
        applied_lsn(&sink, &metrics, last)
    })
    .await
    .unwrap();
    wait::until("the sink's documents", TIMEOUT, || async {
        count(http, &es.url, "cdc_public_bench").await >= events
    })
    .await
    .unwrap();
    let secs = t0.elapsed().as_secs_f64();
    let cpu = bench::cpu_secs(sink.pid().unwrap(), false);
    let run = SinkRun {
        secs,
        started,
        steady: (events - first_docs) as f64 / (secs - started),
        cpu,
        server_cpu: bench::cpu_secs(es.pid(), false) - server_cpu,
        tansu_cpu: bench::cpu_secs(tansu.pid(), false) - tansu_cpu,
    };
    sink.terminate(Duration::from_secs(30)).unwrap();
    run
}
