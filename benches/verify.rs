//! `pgcdc verify` throughput (not a timed test): a table of `ROWS` rows
//! (`VERIFY_BENCH_ROWS`, default 2,000,000) and its mirror, loaded directly
//! (`_bulk`, documents as the sink writes them), compared by the
//! verification library; in the same run the raw cost of reading both
//! sides: the table through a cursor (10,000-row fetches) and the index
//! through `search_after` pages of every document.
//!
//! Run with `cargo bench --bench verify`.

#![allow(clippy::unwrap_used)]

use std::time::Instant;

use pgcdc_testkit::oracle::verify_now;
use pgcdc_testkit::search::all_hits;
use pgcdc_testkit::{PgCluster, SearchServer};
use serde_json::json;
use tokio_postgres::SimpleQueryMessage;

/// Documents per `_bulk` request while loading.
const BULK: u64 = 5000;

fn rows() -> u64 {
    std::env::var("VERIFY_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000_000)
}

/// Load `n` rows and their mirror documents.
async fn load(pg: &PgCluster, es: &SearchServer, n: u64) {
    let db = pg.client().await.unwrap();
    db.batch_execute(&format!(
        "CREATE TABLE items (id int8 PRIMARY KEY, name text, n int4);
         INSERT INTO items SELECT g, 'item ' || g, g % 1000 FROM generate_series(1, {n}) g;"
    ))
    .await
    .unwrap();
    let http = reqwest::Client::new();
    let mut start = 1;
    while start <= n {
        let mut body = String::new();
        for i in start..(start + BULK).min(n + 1) {
            body.push_str(
                &json!({"index": {"_index": "cdc_public_items", "_id": i.to_string()}}).to_string(),
            );
            body.push('\n');
            let doc = json!({"id": i, "name": format!("item {i}"), "n": i % 1000,
                             "_cdc": {"op": "r", "lsn": 1, "seq": 0, "ts_ms": 1}});
            body.push_str(&doc.to_string());
            body.push('\n');
        }
        let resp = http
            .post(format!("{}/_bulk", es.url))
            .header("content-type", "application/x-ndjson")
            .body(body)
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success());
        start += BULK;
    }
}

/// Seconds to read the table through a cursor, 10,000 rows a fetch.
async fn read_table(pg: &PgCluster) -> f64 {
    let db = pg.client().await.unwrap();
    let t = Instant::now();
    db.batch_execute("BEGIN; DECLARE c NO SCROLL CURSOR FOR SELECT * FROM items")
        .await
        .unwrap();
    let is_row = |m: &SimpleQueryMessage| matches!(m, SimpleQueryMessage::Row(_));
    while db
        .simple_query("FETCH 10000 FROM c")
        .await
        .unwrap()
        .iter()
        .any(is_row)
    {}
    db.batch_execute("COMMIT").await.unwrap();
    t.elapsed().as_secs_f64()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n = rows();
    let (pg, es) = (PgCluster::start().unwrap(), SearchServer::start().unwrap());
    eprintln!("bench: loading {n} rows and documents");
    load(&pg, &es, n).await;
    eprintln!("bench: loaded; reading both sides");
    let raw_pg = read_table(&pg).await;
    let t = Instant::now();
    let hits = all_hits(&es.url, "cdc_public_items").await.unwrap();
    let raw_es = t.elapsed().as_secs_f64();
    assert_eq!(hits.len() as u64, n);
    eprintln!("bench: verifying");
    let report = verify_now(&pg, &es.url, "public.items").await.unwrap();
    assert!(!report.drifted(), "{}", report.text());
    assert_eq!(report.compared, n);
    let raw = raw_pg + raw_es;
    println!(
        "verify: {n} rows in {:.1}s = {:.0} rows/s; raw read of both sides {raw:.1}s (table {raw_pg:.1}s, index {raw_es:.1}s) = {:.0} rows/s; ratio {:.2}",
        report.elapsed_secs,
        report.rows_per_sec,
        n as f64 / raw,
        raw / report.elapsed_secs,
    );
}
