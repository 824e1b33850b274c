//! What a scenario checks on Kafka: nothing committed is missing
//! (duplicates counted), the slot never confirmed data Kafka lacks, and each
//! mirror document's `_version` is its row's last commit LSN. The mirror
//! itself is compared by [`crate::oracle`].

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use anyhow::Result;
use serde_json::Value;

use super::workload::{Committed, Expect};
use super::{INDEX, PARTITIONS, SINK_GROUP, TOPIC};
use crate::kafka::{committed_offsets, Record, TopicReader};
use crate::search::Documents;
use crate::wait::{self, Poll};

/// How long the topic must stay quiet before a read of it ends (tansu's
/// high watermark can lag what a fetch returns).
const QUIET: Duration = Duration::from_secs(2);
/// How long reading the whole topic may take.
const READ_TIMEOUT: Duration = Duration::from_secs(120);
/// Pause between two reads of the mirror's versions.
const EVERY: Duration = Duration::from_millis(250);

/// How often each expected-event shape was seen on the topic.
pub type Seen = HashMap<Expect, usize>;

/// The event shape of one record; `None` for tombstones and foreign records.
fn shape(key: Option<&Value>, value: Option<&Value>) -> Option<Expect> {
    let value = value?;
    if value["op"] == "d" {
        return Some(Expect::Delete {
            id: key?["id"].as_i64()?,
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
    pub versions: HashMap<String, u64>,
    /// Per id, the partition and highest offset of its records (an id's
    /// records all go to one partition): where a missing document's change was.
    pub last_at: HashMap<String, (i32, i64)>,
}

impl TopicScan {
    /// Count one record.
    pub fn add(&mut self, r: &Record) {
        self.records += 1;
        let Some(s) = shape(r.key.as_ref(), r.value.as_ref()) else {
            return;
        };
        *self.seen.entry(s).or_default() += 1;
        let (Expect::After { id, .. } | Expect::Delete { id }) = s;
        let last = self
            .last_at
            .entry(id.to_string())
            .or_insert((r.partition, r.offset));
        last.1 = last.1.max(r.offset);
        let lsn = r
            .value
            .as_ref()
            .and_then(|v| v["source"]["commit_lsn"].as_u64());
        if let (Expect::After { id, .. }, Some(lsn)) = (s, lsn) {
            let v = self.versions.entry(id.to_string()).or_default();
            *v = (*v).max(lsn);
        }
    }
}

/// Read the whole change topic.
pub fn read_topic(brokers: &str) -> Result<TopicScan> {
    let mut scan = TopicScan::default();
    for r in TopicReader::new(brokers)?.read_all(TOPIC, QUIET, READ_TIMEOUT)? {
        scan.add(&r);
    }
    Ok(scan)
}

/// The ES sink group's committed offsets on the change topic.
pub fn sink_offsets(brokers: &str) -> Result<Vec<i64>> {
    committed_offsets(brokers, SINK_GROUP, TOPIC, PARTITIONS)
}

/// Where the changes of the documents `wrong` sit on Kafka, per partition,
/// beside the sink's committed offsets: tells a sink that skipped records
/// from one that stopped consuming.
pub fn explain_mirror(wrong: &[String], scan: &TopicScan, brokers: &str) -> String {
    let mut at: BTreeMap<i32, (usize, i64, i64)> = BTreeMap::new();
    for id in wrong {
        let (p, o) = scan.last_at.get(id).copied().unwrap_or((-1, -1));
        let e = at.entry(p).or_insert((0, i64::MAX, i64::MIN));
        *e = (e.0 + 1, e.1.min(o), e.2.max(o));
    }
    let committed = sink_offsets(brokers).unwrap_or_default();
    let parts: Vec<String> = at
        .iter()
        .map(|(p, (n, lo, hi))| format!("partition {p}: {n} at offsets {lo}..={hi}"))
        .collect();
    let first = &wrong[..wrong.len().min(5)];
    format!(
        "; first ids {first:?}; their last changes: {}; sink committed {committed:?}",
        parts.join(", ")
    )
}

/// Mirror documents whose `_version` is not the commit LSN of their row's
/// last change; with `filled`, older than it (a row a fill copied, and
/// that did not change since, has the fill's snapshot position, which is
/// newer).
pub fn stale_versions(es: &Documents, kafka: &HashMap<String, u64>, filled: bool) -> usize {
    es.iter()
        .filter(|(id, (v, _))| match kafka.get(*id) {
            Some(k) if filled => v < k,
            k => k != Some(v),
        })
        .count()
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

/// Poll until every mirror document's `_version` is its row's last commit
/// LSN on Kafka, or `timeout` passes; the last documents read. The rows can
/// already be equal while the sink still works through records that only
/// repeat values (a backfill after a slot takeover), so equality of values
/// alone does not mean the sink is done.
pub async fn versions_settle(
    es_url: &str,
    kafka: &HashMap<String, u64>,
    filled: bool,
    timeout: Duration,
) -> Result<Documents, String> {
    let read = || async {
        crate::search::documents(es_url, INDEX)
            .await
            .map_err(|e| format!("read index: {e:#}"))
    };
    let settled = wait::poll(
        "the mirror's versions to settle",
        timeout,
        EVERY,
        || async {
            match read().await {
                Ok(docs) => {
                    let stale = stale_versions(&docs, kafka, filled);
                    Poll::when(stale == 0, docs, || format!("{stale} stale"))
                }
                Err(e) => Poll::Abort(e),
            }
        },
    )
    .await;
    match settled {
        Ok(docs) => Ok(docs),
        // Not settled: the caller counts the stale versions of what is there now.
        Err(wait::WaitError::Timeout { .. }) => read().await,
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tx(n: i64, lsn_after: u64, expect: Vec<Expect>) -> Committed {
        Committed {
            n,
            lsn_after,
            expect,
        }
    }

    fn record(key: Value, value: Option<Value>, partition: i32, offset: i64) -> Record {
        Record {
            key: Some(key),
            key_bytes: None,
            value,
            headers: HashMap::new(),
            partition,
            offset,
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
        let c = json!({"op":"c","before":null,"after":{"id":7,"n":3,"v":"x"}});
        let d = json!({"op":"d","before":{"id":7},"after":null});
        let key = json!({"id":7});
        assert_eq!(
            shape(Some(&key), Some(&c)),
            Some(Expect::After { id: 7, n: 3 })
        );
        assert_eq!(shape(Some(&key), Some(&d)), Some(Expect::Delete { id: 7 }));
        assert_eq!(shape(Some(&key), None), None, "tombstone");
    }

    #[test]
    fn a_document_version_must_be_the_last_commit_lsn_of_its_row() {
        let mut scan = TopicScan::default();
        let key = json!({"id":1});
        let change =
            |n: i64, lsn: u64| json!({"op":"u","after":{"id":1,"n":n},"source":{"commit_lsn":lsn}});
        scan.add(&record(key.clone(), Some(change(2, 900)), 1, 40));
        scan.add(&record(key.clone(), Some(change(1, 500)), 1, 41));
        scan.add(&record(key, None, 1, 42));
        assert_eq!(scan.records, 3);
        assert_eq!(scan.versions.get("1"), Some(&900));
        assert_eq!(scan.last_at.get("1"), Some(&(1, 41)));
        let mut es = Documents::new();
        es.insert("1".into(), (900, Value::Null));
        assert_eq!(stale_versions(&es, &scan.versions, false), 0);
        es.insert("1".into(), (500, Value::Null));
        es.insert("2".into(), (7, Value::Null));
        assert_eq!(stale_versions(&es, &scan.versions, false), 2);
        assert_eq!(stale_versions(&es, &scan.versions, true), 2);
        // Copied by a fill at a newer snapshot position.
        es.insert("1".into(), (1200, Value::Null));
        assert_eq!(stale_versions(&es, &scan.versions, false), 2);
        assert_eq!(stale_versions(&es, &scan.versions, true), 1);
    }
}
