//! `pgcdc verify` throughput (not a timed test): a table of `ROWS` rows
//! (`VERIFY_BENCH_ROWS`, default 2,000,000) and its mirror, loaded directly
//! (`_bulk`, documents as the sink writes them), compared by the
//! verification library (`VERIFY_BENCH_PARALLELISM`, default the
//! configuration's); in the same run the raw cost of reading both sides:
//! the table with `COPY … TO STDOUT` and the index with a paged
//! `match_all` (a scroll of whole documents), one after the other.
//!
//! Run with `cargo bench --bench verify` (see docs/benchmarks.md).

#![allow(clippy::unwrap_used)]

use std::time::Instant;

use futures::StreamExt;
use pgcdc_actors::verify::VerifyConfig;
use pgcdc_testkit::bench::{self, Target};
use pgcdc_testkit::oracle::verify_now_with;
use pgcdc_testkit::{PgCluster, SearchServer};
use serde_json::{json, Value};

// The daemon's allocator, so the comparison allocates as `pgcdc verify` does.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Documents per `_bulk` request while loading.
const BULK: u64 = 5000;
/// Documents per page of the raw index read.
const PAGE: usize = 5000;
/// The ratio of verify's rate to the raw read's that the issue asks for.
const TARGET: f64 = 0.5;
/// The mirror.
const INDEX: &str = "cdc_public_items";

/// One `_bulk` body: rows `from..to` as the sink writes them.
fn bulk_body(from: u64, to: u64) -> String {
    let mut body = String::new();
    for i in from..to {
        let action = json!({"index": {"_index": INDEX, "_id": i.to_string()}});
        let doc = json!({"id": i, "name": format!("item {i}"), "n": i % 1000,
                         "_cdc": {"op": "r", "lsn": 1, "seq": 0, "ts_ms": 1}});
        body.push_str(&format!("{action}\n{doc}\n"));
    }
    body
}

/// Load `n` rows and their mirror documents.
async fn load(pg: &PgCluster, es: &SearchServer, n: u64) {
    let db = pg.client().await.unwrap();
    db.batch_execute(&format!(
        "CREATE TABLE items (id int8 PRIMARY KEY, name text, n int4);
         INSERT INTO items SELECT g, 'item ' || g, g % 1000 FROM generate_series(1, {n}) g;
         ANALYZE items;"
    ))
    .await
    .unwrap();
    let http = reqwest::Client::new();
    let mut start = 1;
    while start <= n {
        let resp = http
            .post(format!("{}/_bulk", es.url))
            .header("content-type", "application/x-ndjson")
            .body(bulk_body(start, (start + BULK).min(n + 1)))
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success());
        start += BULK;
    }
}

/// Seconds to read the table with `COPY … TO STDOUT` (bytes discarded).
async fn read_table(pg: &PgCluster) -> f64 {
    let db = pg.client().await.unwrap();
    let t = Instant::now();
    let stream = db.copy_out("COPY items TO STDOUT").await.unwrap();
    let mut stream = std::pin::pin!(stream);
    let mut bytes = 0;
    while let Some(chunk) = stream.next().await {
        bytes += chunk.unwrap().len();
    }
    assert!(bytes > 0);
    t.elapsed().as_secs_f64()
}

/// Seconds to read every document of the index, `PAGE` at a time (a
/// scroll of `match_all`, whole sources); checks there are `n`.
async fn read_index(url: &str, n: u64) -> f64 {
    let http = reqwest::Client::new();
    let t = Instant::now();
    let body = json!({"size": PAGE, "sort": ["_doc"], "query": {"match_all": {}}});
    let mut page: Value = http
        .post(format!("{url}/{INDEX}/_search?scroll=2m"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut seen = 0;
    loop {
        let hits = page["hits"]["hits"].as_array().map_or(0, Vec::len);
        if hits == 0 {
            break;
        }
        seen += hits as u64;
        let next = json!({"scroll": "2m", "scroll_id": page["_scroll_id"]});
        page = http
            .post(format!("{url}/_search/scroll"))
            .json(&next)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    }
    assert_eq!(seen, n);
    t.elapsed().as_secs_f64()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n = bench::env_or("VERIFY_BENCH_ROWS", 2_000_000);
    let mut opts = VerifyConfig::default();
    opts.parallelism = bench::env_or("VERIFY_BENCH_PARALLELISM", opts.parallelism as u64) as usize;
    let (pg, es) = (PgCluster::start().unwrap(), SearchServer::start().unwrap());
    eprintln!("bench: loading {n} rows and documents");
    load(&pg, &es, n).await;
    eprintln!("bench: loaded; reading both sides");
    let raw_pg = read_table(&pg).await;
    let raw_es = read_index(&es.url, n).await;
    eprintln!("bench: verifying (parallelism {})", opts.parallelism);
    let report = verify_now_with(&pg, &es.url, "public.items", opts)
        .await
        .unwrap();
    assert!(!report.drifted(), "{}", report.text());
    assert_eq!((report.compared, report.documents), (n, n));
    let raw = raw_pg + raw_es;
    let ratio = raw / report.elapsed_secs;
    bench::figure(
        &format!("verify of {n} rows and their mirror"),
        &format!("{:.0} rows/s", report.rows_per_sec),
        &format!("COPY + scroll {:.0} rows/s", n as f64 / raw),
        ratio,
        Target::AtLeast(TARGET),
    );
    println!(
        "verify: {n} rows in {:.1}s = {:.0} rows/s; raw read of both sides {raw:.1}s (COPY {raw_pg:.1}s, index {raw_es:.1}s) = {:.0} rows/s; ratio {ratio:.2} (target >= {TARGET}: {})",
        report.elapsed_secs,
        report.rows_per_sec,
        n as f64 / raw,
        if ratio >= TARGET { "met" } else { "not met" },
    );
}
