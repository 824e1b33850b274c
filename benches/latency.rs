//! Latency under a steady load (not a timed test): single-row transactions
//! committed at `LATENCY_BENCH_RATE` per second (default 5,000) for
//! `LATENCY_BENCH_SECS` seconds (default 30) into a table pgcdc streams to
//! tansu, with the ES sink inside the daemon writing osmem-server, all with
//! the default settings.
//!
//! - commit → acknowledged by Kafka: pgcdc's own `pgcdc_kafka_ack_seconds`
//!   histogram (per batch, from its oldest commit), read from `/metrics`
//!   once every row is acknowledged; quantiles are bucket upper bounds.
//! - commit → read back from Kafka: every record is read as it arrives (a
//!   consumer fetching with at most 5 ms of wait) and its `source.ts_us`, the
//!   commit time, subtracted from the time it was read: what a consumer
//!   sees, the broker's fetch path included.
//! - commit → searchable: every 50th row is a probe; a poller asks the
//!   search server every `POLL` for the probes not seen yet (an `ids`
//!   query, which sees only refreshed documents) and takes the time from
//!   the probe's commit returning to the first answer holding it.
//! - the search server alone (the baseline of searchable): then, documents
//!   shaped like the mirror's, due at the rate reached, sent straight to a
//!   fresh index as the sink sends them with its defaults (a `_bulk` of
//!   what is due every 200 ms), probes asked for the same way, each timed
//!   from its place in the schedule: the floor the search server sets.
//!
//! Prints p50, p99 and the maximum of each next to their targets
//! (acknowledged p99 ≤ 100 ms, searchable p99 ≤ 1 s) and pgcdc's CPU per
//! transaction. `LATENCY_BENCH_SEARCH=0` leaves the sink and the search
//! server out and measures the Kafka leg alone (on a small machine the
//! search server takes most of the CPU).
//!
//! Run with `cargo bench --bench latency` (scripts/bench.sh).

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgcdc_actors::es_writer::EsConfig;
use pgcdc_testkit::bench::{self, Target};
use pgcdc_testkit::config::daemon_config as config;
use pgcdc_testkit::daemon::now_us;
use pgcdc_testkit::wait::{self, Poll};
use pgcdc_testkit::{Broker, Daemon, PgCluster, SearchServer, Tansu};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde_json::{json, Value};

/// The daemon under test.
const PGCDC: &str = env!("CARGO_BIN_EXE_pgcdc");
/// Every `PROBE_EVERY`th row is looked for in the search server.
const PROBE_EVERY: u64 = 50;
/// How often the search server is asked for the outstanding probes.
const POLL: Duration = Duration::from_millis(50);
/// Commits are paced in slots of this length.
const SLOT: Duration = Duration::from_millis(10);
/// The change topic (the default, one for every table).
const TOPIC: &str = "cdc-events";
/// The mirror.
const INDEX: &str = "cdc_public_lat";
/// The index of the search server's own baseline.
const BASELINE_INDEX: &str = "baseline_lat";

/// The `q` quantile of sorted `xs` (nearest rank); 0 for none.
fn quantile(xs: &[f64], q: f64) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    let rank = ((q * xs.len() as f64).ceil() as usize).clamp(1, xs.len());
    xs[rank - 1]
}

/// Rows of `lat` inserted and acknowledged by Kafka, from pgcdc's `/metrics` page.
fn acknowledged_rows(page: &str) -> u64 {
    page.lines()
        .find(|l| {
            l.starts_with("pgcdc_events_out_total{")
                && l.contains("op=\"c\"")
                && l.contains("table=\"public.lat\"")
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

/// Commit `rate` single-row transactions per second for `secs` seconds;
/// the commit instants of the probes go to `probes`. The rows written.
async fn write(
    db: tokio_postgres::Client,
    rate: u64,
    secs: u64,
    probes: Arc<Mutex<HashMap<u64, Instant>>>,
) -> u64 {
    let per_slot = (rate * SLOT.as_millis() as u64 / 1000).max(1);
    let insert = db
        .prepare("INSERT INTO lat (id, v) VALUES ($1, 'x')")
        .await
        .unwrap();
    let started = Instant::now();
    let mut tick = tokio::time::interval(SLOT);
    let mut id = 0u64;
    while started.elapsed() < Duration::from_secs(secs) {
        tick.tick().await;
        for _ in 0..per_slot {
            id += 1;
            db.execute(&insert, &[&i64::try_from(id).unwrap()])
                .await
                .unwrap();
            if id % PROBE_EVERY == 0 {
                probes.lock().unwrap().insert(id, Instant::now());
            }
        }
    }
    id
}

/// Read `TOPIC` from its start (direct assignment, no group to join: only
/// the warm-up row is there yet) and say so on `ready`; until `done` and nothing arrived for 2 s, the latency
/// of each record read, seconds.
fn read_kafka(brokers: &str, ready: std::sync::mpsc::Sender<()>, done: &AtomicBool) -> Vec<f64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "latency-bench")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "5")
        .create()
        .unwrap();
    let meta = consumer
        .fetch_metadata(Some(TOPIC), Duration::from_secs(30))
        .unwrap();
    let mut list = TopicPartitionList::new();
    for p in meta.topics().iter().flat_map(|t| t.partitions()) {
        list.add_partition_offset(TOPIC, p.id(), Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&list).unwrap();
    assert!(list.count() > 0, "{TOPIC} has no partitions");
    // Connections and the first fetches, before the writes start.
    let warm = Instant::now();
    while warm.elapsed() < Duration::from_secs(2) {
        consumer.poll(Duration::from_millis(100));
    }
    ready.send(()).unwrap();
    let mut latencies = Vec::new();
    let mut last = Instant::now();
    loop {
        if done.load(Ordering::Relaxed) && last.elapsed() > Duration::from_secs(2) {
            return latencies;
        }
        let Some(Ok(msg)) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let read_at = now_us();
        last = Instant::now();
        let Some(value) = msg.payload() else { continue };
        let Ok(v) = serde_json::from_slice::<Value>(value) else {
            continue;
        };
        if let Some(ts_us) = v["source"]["ts_us"].as_i64() {
            latencies.push((read_at - ts_us) as f64 / 1e6);
        }
    }
}

/// Ask the search server for the outstanding probes every `POLL` until
/// `done` and none is left; the latency of each, seconds.
async fn poll_search(
    url: &str,
    index: &str,
    probes: &Mutex<HashMap<u64, Instant>>,
    done: &AtomicBool,
) -> Vec<f64> {
    let http = reqwest::Client::new();
    let mut latencies = Vec::new();
    let deadline = Duration::from_secs(120);
    let mut quiet_since: Option<Instant> = None;
    loop {
        tokio::time::sleep(POLL).await;
        let ids: Vec<String> = probes.lock().unwrap().keys().map(u64::to_string).collect();
        if ids.is_empty() {
            if done.load(Ordering::Relaxed) {
                return latencies;
            }
            continue;
        }
        if done.load(Ordering::Relaxed)
            && quiet_since.get_or_insert_with(Instant::now).elapsed() > deadline
        {
            panic!("{} probes never became searchable", ids.len());
        }
        let body = json!({"size": ids.len(), "_source": false, "query": {"ids": {"values": ids}}});
        let Ok(resp) = http
            .post(format!("{url}/{index}/_search"))
            .json(&body)
            .send()
            .await
        else {
            continue;
        };
        let seen_at = Instant::now();
        let Ok(answer) = resp.json::<Value>().await else {
            continue;
        };
        let hits = answer["hits"]["hits"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let mut probes = probes.lock().unwrap();
        for hit in hits {
            let Some(id) = hit["_id"].as_str().and_then(|i| i.parse::<u64>().ok()) else {
                continue;
            };
            if let Some(committed) = probes.remove(&id) {
                latencies.push(seen_at.duration_since(committed).as_secs_f64());
            }
        }
    }
}

/// The search server alone, the baseline of commit → searchable: documents
/// shaped like the mirror's, due at `rate` per second for `secs` seconds,
/// sent straight to `index` as the sink sends them with its defaults (a
/// `_bulk` request of what is due every `flush_interval_ms`, the next once
/// the last is answered); every `PROBE_EVERY`th document is a probe, due at its
/// place in the schedule. The latency of each probe, seconds.
async fn search_alone(url: &str, rate: u64, secs: u64) -> Vec<f64> {
    let http = reqwest::Client::new();
    let created = http
        .put(format!("{url}/{BASELINE_INDEX}"))
        .json(&json!({"settings": {"number_of_replicas": 0}}))
        .send()
        .await
        .unwrap();
    assert!(
        created.status().is_success(),
        "{BASELINE_INDEX}: {created:?}"
    );
    let probes = Arc::new(Mutex::new(HashMap::new()));
    let done = Arc::new(AtomicBool::new(false));
    let poller = {
        let (url, probes, done) = (url.to_owned(), probes.clone(), done.clone());
        tokio::spawn(async move { poll_search(&url, BASELINE_INDEX, &probes, &done).await })
    };
    let flush = Duration::from_millis(EsConfig::default().flush_interval_ms);
    let started = Instant::now();
    let total = rate * secs;
    let mut sent = 0u64;
    while sent < total {
        tokio::time::sleep(flush).await;
        let due = ((started.elapsed().as_secs_f64() * rate as f64) as u64).min(total);
        let mut body = String::new();
        for id in sent + 1..=due {
            if id % PROBE_EVERY == 0 {
                let at = started + Duration::from_secs_f64(id as f64 / rate as f64);
                probes.lock().unwrap().insert(id, at);
            }
            let action = json!({"index": {"_index": BASELINE_INDEX, "_id": id.to_string(),
                "version": id, "version_type": "external_gte"}});
            let doc = json!({"id": id, "v": "x", "_cdc": {"op": "c", "lsn": id, "seq": 0, "ts_ms": 0, "xid": id}});
            body.push_str(&format!("{action}\n{doc}\n"));
        }
        sent = due;
        if body.is_empty() {
            continue;
        }
        let answer = http
            .post(format!("{url}/_bulk"))
            .header("content-type", "application/x-ndjson")
            .body(body)
            .send()
            .await
            .unwrap();
        assert!(answer.status().is_success(), "_bulk: {answer:?}");
    }
    done.store(true, Ordering::Relaxed);
    let mut latencies = poller.await.unwrap();
    latencies.sort_by(f64::total_cmp);
    latencies
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let rate = bench::env_or("LATENCY_BENCH_RATE", 5000);
    let secs = bench::env_or("LATENCY_BENCH_SECS", 30);
    let with_search = bench::env_or("LATENCY_BENCH_SEARCH", 1) != 0;
    let (pg, tansu) = (PgCluster::start().unwrap(), Tansu::start().unwrap());
    let es = with_search.then(|| SearchServer::start().unwrap());
    let db = pg.client().await.unwrap();
    db.batch_execute("CREATE TABLE lat (id bigint PRIMARY KEY, v text)")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    // The kit's config pins one partition for the tests; this uses the default.
    let metrics_port = pgcdc_testkit::free_port().unwrap();
    let cfg = config(&pg, &tansu, &dir.path().join("state"), &["lat"], "")
        .replace("topic_partitions = 1\n", "")
        .replace("info,pgcdc_actors=debug", "warn");
    let mut cfg = pgcdc_testkit::config::with_metrics(&cfg, metrics_port);
    if let Some(es) = &es {
        cfg += &format!(
            "\n[elasticsearch]\nurl = {:?}\nnumber_of_replicas = 0\nrun_in_daemon = true\n",
            es.url
        );
    }
    let mut daemon =
        Daemon::start(std::path::Path::new(PGCDC), dir.path(), &cfg, "run", &[]).unwrap();
    // Warm up: a first row through to the search server (topics, index,
    // group), or without one, acknowledged by Kafka (its topic exists).
    db.execute("INSERT INTO lat VALUES (0, 'warm')", &[])
        .await
        .unwrap();
    let warm: String = db
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let confirmed = "SELECT confirmed_flush_lsn >= $1::text::pg_lsn FROM pg_replication_slots \
                     WHERE slot_name = 'pgcdc'";
    let http = reqwest::Client::new();
    let url = es.as_ref().map(|es| es.url.clone());
    wait::poll(
        "the first row to be searchable (or acknowledged)",
        Duration::from_secs(120),
        POLL,
        || async {
            if !daemon.is_running() {
                return Poll::Abort(format!("pgcdc exited:\n{}", daemon.log_text()));
            }
            let Some(url) = &url else {
                let row = db.query_opt(confirmed, &[&warm]).await.ok().flatten();
                let acked = row.is_some_and(|r| r.get::<_, Option<bool>>(0) == Some(true));
                return Poll::when(acked, (), || {
                    "the slot is not past the first row".to_owned()
                });
            };
            let found = http
                .get(format!("{url}/{INDEX}/_doc/0"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            Poll::when(found, (), || "not yet".to_owned())
        },
    )
    .await
    .unwrap();

    let pid = daemon.pid().unwrap();
    let cpu_before = bench::cpu_secs(pid, false);
    let (pg_before, tansu_before) = (bench::pg_cpu_secs(&pg), bench::cpu_secs(tansu.pid(), false));
    let search_cpu = || {
        es.as_ref()
            .map_or(0.0, |es| bench::cpu_secs(es.pid(), false))
    };
    let search_before = search_cpu();
    let probes = Arc::new(Mutex::new(HashMap::new()));
    let done = Arc::new(AtomicBool::new(false));
    let (ready, is_ready) = std::sync::mpsc::channel();
    let kafka = {
        let (brokers, done) = (tansu.brokers(), done.clone());
        std::thread::spawn(move || read_kafka(&brokers, ready, &done))
    };
    is_ready.recv_timeout(Duration::from_secs(60)).unwrap();
    let search = url.map(|url| {
        let (probes, done) = (probes.clone(), done.clone());
        tokio::spawn(async move { poll_search(&url, INDEX, &probes, &done).await })
    });
    eprintln!("bench: {rate} single-row commits/s for {secs} s");
    let started = Instant::now();
    let written = write(db, rate, secs, probes.clone()).await;
    let achieved = written as f64 / started.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    let mut search = match search {
        Some(task) => task.await.unwrap(),
        None => Vec::new(),
    };
    let mut kafka = tokio::task::spawn_blocking(move || kafka.join().unwrap())
        .await
        .unwrap();
    let cpu = bench::cpu_secs(pid, false) - cpu_before;
    let pg_cpu = bench::pg_cpu_secs(&pg) - pg_before;
    let tansu_cpu = bench::cpu_secs(tansu.pid(), false) - tansu_before;
    let search_cpu = search_cpu() - search_before;
    let elapsed = started.elapsed().as_secs_f64();
    // pgcdc's own figure, once every row written is acknowledged.
    let metrics = format!("http://127.0.0.1:{metrics_port}/metrics");
    let page = wait::poll(
        "every row acknowledged by kafka",
        Duration::from_secs(120),
        POLL,
        || async {
            let page = match reqwest::get(&metrics).await {
                Ok(r) => r.text().await.unwrap_or_default(),
                Err(e) => return Poll::Pending(format!("{metrics}: {e}")),
            };
            let out = acknowledged_rows(&page);
            Poll::when(out >= written, page, || {
                format!("{out} of {written} rows acknowledged")
            })
        },
    )
    .await
    .unwrap();
    daemon.terminate(Duration::from_secs(60)).unwrap();
    let acked = |q| bench::histogram_quantile(&page, "pgcdc_kafka_ack_seconds", q).unwrap();
    // A record written before the end offsets were resolved is not read.
    assert!(
        kafka.len() as u64 >= written * 9 / 10,
        "{} of {written} records read",
        kafka.len()
    );
    kafka.sort_by(f64::total_cmp);
    search.sort_by(f64::total_cmp);
    // The baseline, with pgcdc, PostgreSQL's writes and the Kafka reader done.
    let alone = match &es {
        Some(es) => search_alone(&es.url, achieved.round() as u64, secs).await,
        None => Vec::new(),
    };

    println!();
    println!("{written} single-row commits at {achieved:.0}/s (asked {rate}/s), one run on this machine:");
    println!(
        "{:<34} {:>8} {:>9} {:>9} {:>9}",
        "", "samples", "p50 ms", "p99 ms", "max ms"
    );
    let ((ack_p50, batches), (ack_p99, _)) = (acked(0.5), acked(0.99));
    println!(
        "{:<34} {:>8} {:>9} {:>9} {:>9}",
        "commit -> acknowledged (batches)",
        batches,
        format!("<= {:.0}", ack_p50 * 1e3),
        format!("<= {:.0}", ack_p99 * 1e3),
        "-"
    );
    let legs = [
        ("commit -> read from kafka", &kafka),
        ("commit -> searchable (probes)", &search),
        ("search server alone (probes)", &alone),
    ];
    for (what, xs) in &legs[..if with_search { 3 } else { 1 }] {
        println!(
            "{what:<34} {:>8} {:>9.1} {:>9.1} {:>9.1}",
            xs.len(),
            quantile(xs, 0.5) * 1e3,
            quantile(xs, 0.99) * 1e3,
            xs.last().copied().unwrap_or(0.0) * 1e3
        );
    }
    println!(
        "pgcdc CPU µs per transaction: {:.1}",
        cpu * 1e6 / written as f64
    );
    println!("CPU seconds meanwhile: pgcdc {cpu:.1}, PostgreSQL (writer's backend included) {pg_cpu:.1}, tansu {tansu_cpu:.1}, osmem-server {search_cpu:.1} in {elapsed:.1} s");
    let at = format!("{achieved:.0} commits/s");
    bench::figure(
        "p99 commit -> Kafka ack (ms)",
        &format!(
            "<= {:.0} ms (p50 <= {:.0}; read back: p99 {:.0})",
            ack_p99 * 1e3,
            ack_p50 * 1e3,
            quantile(&kafka, 0.99) * 1e3
        ),
        &at,
        ack_p99 * 1e3,
        Target::AtMost(100.0),
    );
    if !with_search {
        return;
    }
    let search_p99 = quantile(&search, 0.99) * 1e3;
    bench::figure(
        "p99 commit -> searchable (ms)",
        &format!(
            "{search_p99:.0} ms (p50 {:.0})",
            quantile(&search, 0.5) * 1e3
        ),
        &format!(
            "{at}; search server alone: p99 {:.0} ms",
            quantile(&alone, 0.99) * 1e3
        ),
        search_p99,
        Target::AtMost(1000.0),
    );
    assert!(
        !search.is_empty() && !alone.is_empty(),
        "no probe was measured"
    );
}
