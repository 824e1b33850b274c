//! The oracle every scenario ends with: nothing committed is missing from
//! Kafka (duplicates counted), the slot's `confirmed_flush_lsn` never moved
//! backwards and never passed data Kafka lacks, and the ES mirror index
//! equals the table row for row.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::{json, Value};
use tokio::task::block_in_place;
use tokio_postgres::Client;

use super::services::connect;
use super::workload::{Committed, Expect};

/// How often each expected-event shape was seen on the topic.
pub type Seen = HashMap<Expect, usize>;

fn consumer(brokers: &str) -> Result<BaseConsumer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "pgcdc-chaos-oracle")
        .set("enable.auto.commit", "false")
        .create()?)
}

/// Wait until the broker answers a metadata request.
pub fn wait_broker(brokers: &str, timeout: Duration) -> Result<()> {
    let c = consumer(brokers)?;
    let deadline = Instant::now() + timeout;
    while c.fetch_metadata(None, Duration::from_secs(1)).is_err() {
        if Instant::now() >= deadline {
            return Err(anyhow!("kafka broker at {brokers} did not come up"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// The event shape of one record; `None` for tombstones and foreign records.
fn shape(key: Option<&[u8]>, payload: Option<&[u8]>) -> Option<Expect> {
    let value: Value = serde_json::from_slice(payload?).ok()?;
    if value["op"] == "d" {
        let key: Value = serde_json::from_slice(key?).ok()?;
        return Some(Expect::Delete {
            id: key["id"].as_i64()?,
        });
    }
    let after = &value["after"];
    Some(Expect::After {
        id: after["id"].as_i64()?,
        n: after["n"].as_i64()?,
    })
}

/// What a read of the whole topic found.
#[derive(Debug, Default)]
pub struct TopicScan {
    /// How often each change was seen.
    pub seen: Seen,
    /// Records read (tombstones included).
    pub records: usize,
    /// Per id, the highest `source.commit_lsn` of a change that wrote the row:
    /// the `_version` its mirror document must have.
    pub versions: HashMap<i64, u64>,
    /// Per id, the partition and highest offset of its records (an id's
    /// records all go to one partition): where a missing document's change was.
    pub last_at: HashMap<i64, (i32, i64)>,
}

impl TopicScan {
    fn add(&mut self, key: Option<&[u8]>, payload: Option<&[u8]>, at: (i32, i64)) {
        self.records += 1;
        let Some(s) = shape(key, payload) else { return };
        *self.seen.entry(s).or_default() += 1;
        let (Expect::After { id, .. } | Expect::Delete { id }) = s;
        let last = self.last_at.entry(id).or_insert(at);
        last.1 = last.1.max(at.1);
        let lsn = payload
            .and_then(|p| serde_json::from_slice::<Value>(p).ok())
            .and_then(|v| v["source"]["commit_lsn"].as_u64());
        if let (Expect::After { id, .. }, Some(lsn)) = (s, lsn) {
            let v = self.versions.entry(id).or_default();
            *v = (*v).max(lsn);
        }
    }
}

/// Read `topic` from the beginning with a fresh consumer: at least the high
/// watermarks' worth, then until nothing new arrives for 2 s (tansu's high
/// watermark can lag what a fetch returns).
pub fn read_topic(brokers: &str, topic: &str) -> Result<TopicScan> {
    let c = consumer(brokers)?;
    let md = c.fetch_metadata(Some(topic), Duration::from_secs(5))?;
    let partitions = md.topics().first().map_or(0, |t| t.partitions().len());
    let mut want = 0i64;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions as i32 {
        let (lo, hi) = c.fetch_watermarks(topic, p, Duration::from_secs(5))?;
        want += hi - lo;
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    c.assign(&tpl)?;
    let mut scan = TopicScan::default();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut quiet_since = Instant::now();
    while (scan.records as i64) < want || quiet_since.elapsed() < Duration::from_secs(2) {
        if Instant::now() >= deadline {
            return Err(anyhow!(
                "reading {topic} timed out after {} records",
                scan.records
            ));
        }
        if let Some(msg) = c.poll(Duration::from_millis(100)) {
            let msg = msg?;
            scan.add(msg.key(), msg.payload(), (msg.partition(), msg.offset()));
            quiet_since = Instant::now();
        }
    }
    Ok(scan)
}

/// The ES sink group's committed offsets on `cdc-events`, one per partition
/// (`-1` where it committed none); an OffsetFetch, the reader does not join
/// the group.
pub fn sink_offsets(brokers: &str) -> Result<Vec<i64>> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "pgcdc-es-sink")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..super::PARTITIONS {
        tpl.add_partition("cdc-events", p);
    }
    let got = c.committed_offsets(tpl, Duration::from_secs(5))?;
    Ok(got
        .elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => o,
            _ => -1,
        })
        .collect())
}

/// Where the changes of documents missing from (or different in) the mirror
/// sit on Kafka, per partition, beside the sink's committed offsets: tells a
/// sink that skipped records from one that stopped consuming.
pub async fn explain_mirror(db: &Client, es_url: &str, scan: &TopicScan, brokers: &str) -> String {
    let (Ok(want), Ok((got, _))) = (
        pg_rows(db).await,
        es_rows(es_url, "cdc_public_chaos_items").await,
    ) else {
        return String::new();
    };
    let wrong = want
        .iter()
        .filter(|(id, row)| got.get(id) != Some(row))
        .map(|(id, _)| *id)
        .chain(got.keys().filter(|id| !want.contains_key(id)).copied());
    let mut at: BTreeMap<i32, (usize, i64, i64)> = BTreeMap::new();
    let mut first = Vec::new();
    for id in wrong {
        if first.len() < 5 {
            first.push(id);
        }
        let (p, o) = scan.last_at.get(&id).copied().unwrap_or((-1, -1));
        let e = at.entry(p).or_insert((0, i64::MAX, i64::MIN));
        *e = (e.0 + 1, e.1.min(o), e.2.max(o));
    }
    let committed = block_in_place(|| sink_offsets(brokers)).unwrap_or_default();
    let parts: Vec<String> = at
        .iter()
        .map(|(p, (n, lo, hi))| format!("partition {p}: {n} at offsets {lo}..={hi}"))
        .collect();
    format!(
        "; first ids {first:?}; their last changes: {}; sink committed {committed:?}",
        parts.join(", ")
    )
}

/// Mirror documents whose `_version` is not the commit LSN of their row's last change.
pub fn stale_versions(es: &Versions, kafka: &HashMap<i64, u64>) -> usize {
    es.iter().filter(|(id, v)| kafka.get(id) != Some(v)).count()
}

/// Committed transactions with an expected event missing from `seen`.
pub fn missing<'a>(committed: &'a [Committed], seen: &Seen) -> Vec<&'a Committed> {
    committed
        .iter()
        .filter(|c| c.expect.iter().any(|e| !seen.contains_key(e)))
        .collect()
}

/// Records beyond the first of each event shape.
pub fn duplicates(seen: &Seen) -> usize {
    seen.values().map(|n| n.saturating_sub(1)).sum()
}

/// Transactions at or below `confirmed` that are not wholly on Kafka.
pub fn confirmed_but_missing(confirmed: u64, committed: &[Committed], seen: &Seen) -> Vec<i64> {
    missing(committed, seen)
        .into_iter()
        .filter(|c| c.lsn_after <= confirmed)
        .map(|c| c.n)
        .collect()
}

/// What the slot poller saw.
#[derive(Debug, Default, Clone, Copy)]
pub struct SlotWatch {
    /// Highest confirmed_flush_lsn seen.
    pub max_confirmed: u64,
    /// The first backwards move (from, to), if any.
    pub backwards: Option<(u64, u64)>,
}

/// Poll `pg_replication_slots` every 100 ms until `stop`; reconnects when
/// PostgreSQL restarts. PostgreSQL itself may report an older position after
/// a restart: the slot is written to disk only when it is dirty, and before
/// PostgreSQL 17 an advance of `confirmed_flush` alone does not make it dirty
/// (not even for the shutdown checkpoint of `-m fast`). So after a restart
/// announced through `restarted`, the first value becomes the new baseline;
/// a move back at any other time counts.
pub fn watch_slot(
    url: String,
    stop: Arc<AtomicBool>,
    restarted: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<SlotWatch> {
    tokio::spawn(async move {
        let mut w = SlotWatch::default();
        let (mut last, mut started) = (0u64, 0f64);
        let mut client: Option<Client> = None;
        let q = "SELECT (confirmed_flush_lsn - '0/0')::bigint, \
                 extract(epoch FROM pg_postmaster_start_time())::float8 \
                 FROM pg_replication_slots WHERE slot_name = 'pgcdc'";
        while !stop.load(Ordering::SeqCst) {
            if client.as_ref().is_none_or(Client::is_closed) {
                client = connect(&url, Duration::from_millis(500)).await.ok();
            }
            let row = match &client {
                Some(db) => db.query_opt(q, &[]).await.ok().flatten(),
                None => None,
            };
            if let Some(row) = row {
                let start: f64 = row.get(1);
                if let Some(v) = row.get::<_, Option<i64>>(0).map(|v| v as u64) {
                    if start != started && started != 0.0 && restarted.swap(false, Ordering::SeqCst)
                    {
                        last = v;
                    }
                    started = start;
                    if v < last && w.backwards.is_none() {
                        w.backwards = Some((last, v));
                    }
                    last = last.max(v);
                    w.max_confirmed = w.max_confirmed.max(v);
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        w
    })
}

/// A row as both sides hold it: id → (n, v).
pub type Rows = BTreeMap<i64, (i64, Option<String>)>;

/// The table's rows.
pub async fn pg_rows(db: &Client) -> Result<Rows> {
    let rows = db.query("SELECT id, n, v FROM chaos_items", &[]).await?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect())
}

/// Mirror documents' `_version`s by id.
pub type Versions = BTreeMap<i64, u64>;

/// Every hit of `index` (with `_version`), paged with `search_after`; none
/// if the index does not exist. Also used by the tests' search server.
pub async fn all_hits(url: &str, index: &str) -> Result<Vec<Value>> {
    let http = reqwest::Client::new();
    let _ = http.post(format!("{url}/{index}/_refresh")).send().await;
    let mut all = Vec::new();
    let mut after: Option<Value> = None;
    loop {
        let mut body = json!({"size": 5000, "version": true, "sort": [{"_id": "asc"}], "query": {"match_all": {}}});
        if let Some(a) = &after {
            body["search_after"] = a.clone();
        }
        let resp = http
            .post(format!("{url}/{index}/_search"))
            .json(&body)
            .send()
            .await?;
        if resp.status().as_u16() == 404 {
            return Ok(all);
        }
        let v: Value = resp.json().await?;
        let hits = v["hits"]["hits"].as_array().cloned().unwrap_or_default();
        let Some(last) = hits.last() else {
            return Ok(all);
        };
        after = Some(last["sort"].clone());
        all.extend(hits);
    }
}

/// Every document of `index` as [`Rows`] and their versions.
pub async fn es_rows(url: &str, index: &str) -> Result<(Rows, Versions)> {
    let (mut docs, mut versions) = (Rows::new(), Versions::new());
    for h in all_hits(url, index).await? {
        let s = &h["_source"];
        let id = s["id"].as_i64().unwrap_or(i64::MIN);
        let v = s["v"].as_str().map(str::to_owned);
        docs.insert(id, (s["n"].as_i64().unwrap_or(i64::MIN), v));
        versions.insert(id, h["_version"].as_u64().unwrap_or(0));
    }
    Ok((docs, versions))
}

/// How two row sets differ, or `None` if they are equal.
pub fn diff(want: &Rows, got: &Rows) -> Option<String> {
    if want == got {
        return None;
    }
    let missing = want.keys().filter(|k| !got.contains_key(k)).count();
    let extra = got.keys().filter(|k| !want.contains_key(k)).count();
    let wrong = want
        .iter()
        .filter(|(k, v)| got.get(k).is_some_and(|g| g != *v))
        .count();
    Some(format!(
        "{} docs vs {} rows: {missing} missing, {extra} extra, {wrong} different",
        got.len(),
        want.len()
    ))
}

/// Poll until the mirror index equals the table, or `timeout` passes; the documents' versions.
pub async fn es_converges(
    db: &Client,
    es_url: &str,
    timeout: Duration,
) -> Result<Versions, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let want = pg_rows(db).await.map_err(|e| format!("read table: {e}"))?;
        let got = es_rows(es_url, "cdc_public_chaos_items").await;
        let problem = match got {
            Ok((got, versions)) => match diff(&want, &got) {
                None => return Ok(versions),
                d => d,
            },
            Err(e) => Some(format!("read index: {e}")),
        };
        match problem {
            None => return Err("no difference and no documents".into()),
            Some(p) if Instant::now() >= deadline => return Err(p),
            Some(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// Poll until every mirror document's `_version` is its row's last commit
/// LSN on Kafka, or `timeout` passes; the last versions read. The rows can
/// already be equal while the sink still works through records that only
/// repeat values (a backfill after a slot takeover), so equality of values
/// alone does not mean the sink is done.
pub async fn es_versions_settle(
    es_url: &str,
    kafka: &HashMap<i64, u64>,
    timeout: Duration,
) -> Result<Versions, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let (_, versions) = es_rows(es_url, "cdc_public_chaos_items")
            .await
            .map_err(|e| format!("read index: {e}"))?;
        if stale_versions(&versions, kafka) == 0 || Instant::now() >= deadline {
            return Ok(versions);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tx(n: i64, lsn_after: u64, expect: Vec<Expect>) -> Committed {
        Committed {
            n,
            lsn_after,
            expect,
        }
    }

    #[test]
    fn missing_and_duplicates_are_counted_per_event() {
        let committed = vec![
            tx(
                1,
                100,
                vec![Expect::After { id: 1, n: 1 }, Expect::After { id: 2, n: 1 }],
            ),
            tx(
                2,
                200,
                vec![Expect::After { id: 1, n: 2 }, Expect::Delete { id: 2 }],
            ),
            tx(3, 300, vec![Expect::Delete { id: 1 }]),
        ];
        let mut seen = Seen::new();
        seen.insert(Expect::After { id: 1, n: 1 }, 2);
        seen.insert(Expect::After { id: 2, n: 1 }, 1);
        seen.insert(Expect::After { id: 1, n: 2 }, 3);
        // tx 2 lacks its delete, tx 3 is absent entirely.
        let gone: Vec<i64> = missing(&committed, &seen).iter().map(|c| c.n).collect();
        assert_eq!(gone, vec![2, 3]);
        assert_eq!(duplicates(&seen), 1 + 2);
        assert_eq!(confirmed_but_missing(250, &committed, &seen), vec![2]);
        assert!(confirmed_but_missing(150, &committed, &seen).is_empty());
    }

    #[test]
    fn records_map_to_event_shapes() {
        let c = br#"{"op":"c","before":null,"after":{"id":7,"n":3,"v":"x"}}"#;
        let d = br#"{"op":"d","before":{"id":7},"after":null}"#;
        let key = br#"{"id":7}"#;
        assert_eq!(
            shape(Some(key), Some(c)),
            Some(Expect::After { id: 7, n: 3 })
        );
        assert_eq!(shape(Some(key), Some(d)), Some(Expect::Delete { id: 7 }));
        assert_eq!(shape(Some(key), None), None, "tombstone");
    }

    #[test]
    fn a_document_version_must_be_the_last_commit_lsn_of_its_row() {
        let mut scan = TopicScan::default();
        let key = br#"{"id":1}"#;
        let change = |n: i64, lsn: u64| {
            format!(r#"{{"op":"u","after":{{"id":1,"n":{n}}},"source":{{"commit_lsn":{lsn}}}}}"#)
        };
        scan.add(Some(key), Some(change(2, 900).as_bytes()), (1, 40));
        scan.add(Some(key), Some(change(1, 500).as_bytes()), (1, 41));
        scan.add(Some(key), None, (1, 42));
        assert_eq!(scan.records, 3);
        assert_eq!(scan.versions.get(&1), Some(&900));
        assert_eq!(scan.last_at.get(&1), Some(&(1, 41)));
        let mut es = Versions::new();
        es.insert(1, 900);
        assert_eq!(stale_versions(&es, &scan.versions), 0);
        es.insert(1, 500);
        es.insert(2, 7);
        assert_eq!(stale_versions(&es, &scan.versions), 2);
    }

    #[test]
    fn row_sets_are_compared_by_id_and_values() {
        let mut a = Rows::new();
        a.insert(1, (1, Some("x".into())));
        let mut b = a.clone();
        assert!(diff(&a, &b).is_none());
        b.insert(1, (2, Some("x".into())));
        b.insert(2, (2, None));
        let d = diff(&a, &b).unwrap_or_default();
        assert!(d.contains("1 extra") && d.contains("1 different"), "{d}");
    }
}
