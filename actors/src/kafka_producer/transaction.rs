//! Debezium's transaction metadata (`kafka.transaction_metadata`): the
//! `transaction` block of every streamed change, and a BEGIN event before a
//! transaction's first change and an END event (its event counts per table)
//! after its last, on `<topic_prefix>.transaction`.
//!
//! Transactions arrive whole and in commit order, possibly split over
//! batches; the batch carrying `commit_end` ends the open one. Snapshot and
//! backfill rows belong to no transaction. A new session starts afresh: it
//! replays from a checkpoint, which is always between transactions.

use std::sync::Arc;

use serde_json::json;

use super::EncodedRecord;
use crate::event::{ChangeEvent, TxMeta};
use crate::lsn::Lsn;
use crate::pg::values::to_json_bytes;
use crate::wire::TxBlock;

/// Microseconds per millisecond.
const US_PER_MS: i64 = 1000;

/// The transaction being published.
struct OpenTx {
    meta: TxMeta,
    id: Arc<str>,
    events: u64,
    /// Events per `schema.table`, in order of first appearance.
    tables: Vec<(String, u64)>,
}

impl OpenTx {
    /// Count one more event of `table`; its position among the table's.
    fn count(&mut self, table: String) -> u64 {
        self.events += 1;
        let i = match self.tables.iter().position(|(t, _)| *t == table) {
            Some(i) => i,
            None => {
                self.tables.push((table, 0));
                self.tables.len() - 1
            }
        };
        self.tables[i].1 += 1;
        self.tables[i].1
    }
}

/// A change's place in its transaction: id, total and per-table order.
pub type Place = (Arc<str>, u64, u64);

/// What one batch adds to its records.
#[derive(Default)]
pub struct TxPlan {
    /// The place of each of the batch's events (`None`: a snapshot row).
    places: Vec<Option<Place>>,
    /// BEGIN and END records, each with the index of the event it precedes
    /// (the batch's length: after the last), in order.
    marks: Vec<(usize, EncodedRecord)>,
}

impl TxPlan {
    /// The `transaction` block of event `i`.
    pub fn block(&self, i: usize) -> Option<TxBlock<'_>> {
        self.places
            .get(i)?
            .as_ref()
            .map(|(id, total, table)| TxBlock {
                id: id.as_ref().into(),
                total_order: *total,
                data_collection_order: *table,
            })
    }

    /// How many BEGIN and END records the batch gets.
    pub fn records(&self) -> usize {
        self.marks.len()
    }

    /// Take the marks that go before event `i`.
    pub fn marks_before(&mut self, i: usize) -> Vec<EncodedRecord> {
        let n = self.marks.iter().take_while(|(at, _)| *at <= i).count();
        self.marks.drain(..n).map(|(_, r)| r).collect()
    }
}

/// Follows transactions across the batches of one session.
pub struct TxTracker {
    topic: Arc<str>,
    open: Option<OpenTx>,
}

impl TxTracker {
    /// A tracker writing BEGIN and END events to `topic`.
    pub fn new(topic: &str) -> Self {
        Self {
            topic: topic.into(),
            open: None,
        }
    }

    /// Forget the open transaction (a new session replays it whole).
    pub fn reset(&mut self) {
        self.open = None;
    }

    /// Place `events`, and end the open transaction if `commit_end` is set.
    pub fn plan(&mut self, events: &[ChangeEvent], commit_end: Option<Lsn>) -> TxPlan {
        let mut plan = TxPlan::default();
        for (i, e) in events.iter().enumerate() {
            if e.snapshot {
                plan.places.push(None);
                continue;
            }
            if self.open.as_ref().is_some_and(|o| o.meta != e.tx) {
                self.end(i, &mut plan);
            }
            if self.open.is_none() {
                let open = OpenTx {
                    meta: e.tx,
                    id: format!("{}:{}", e.tx.xid, e.tx.commit_lsn.0).into(),
                    events: 0,
                    tables: Vec::new(),
                };
                plan.marks.push((i, self.mark(&open, "BEGIN")));
                self.open = Some(open);
            }
            let Some(open) = self.open.as_mut() else {
                plan.places.push(None);
                continue;
            };
            let n = open.count(format!("{}.{}", e.table.schema, e.table.name));
            plan.places.push(Some((open.id.clone(), open.events, n)));
        }
        if commit_end.is_some() {
            self.end(events.len(), &mut plan);
        }
        plan
    }

    /// Close the open transaction, if any, with an END before event `at`.
    fn end(&mut self, at: usize, plan: &mut TxPlan) {
        if let Some(open) = self.open.take() {
            let end = self.mark(&open, "END");
            plan.marks.push((at, end));
        }
    }

    /// The BEGIN or END record of `tx`, keyed by its id as Debezium does.
    fn mark(&self, tx: &OpenTx, status: &str) -> EncodedRecord {
        let end = status == "END";
        let collections: Vec<_> = tx
            .tables
            .iter()
            .map(|(t, n)| json!({"data_collection": t, "event_count": n}))
            .collect();
        let value = json!({
            "status": status,
            "id": &*tx.id,
            "event_count": end.then_some(tx.events),
            "data_collections": end.then_some(collections),
            "ts_ms": tx.meta.commit_time_us.div_euclid(US_PER_MS),
        });
        let (mut key, mut bytes) = (Vec::new(), Vec::new());
        to_json_bytes(&json!({ "id": &*tx.id }), &mut key);
        to_json_bytes(&value, &mut bytes);
        EncodedRecord {
            topic: self.topic.clone(),
            key: Some(key),
            value: Some(bytes),
            table: "".into(),
            op: "",
            commit_lsn: tx.meta.commit_lsn.to_string().into(),
            types: "{}".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;
    use crate::event::{Op, TableRef};

    /// A change of `table` in the transaction committed at `commit`.
    fn change(table: &str, commit: u64) -> ChangeEvent {
        ChangeEvent {
            op: Op::Create,
            table: Arc::new(TableRef {
                schema: "public".into(),
                name: table.into(),
                key_columns: vec![],
                key_source: Default::default(),
                column_types: String::new(),
            }),
            key: None,
            before: None,
            after: None,
            unchanged_toast: vec![],
            lsn: Lsn(commit - 1),
            seq: 0,
            tx: TxMeta {
                xid: 9,
                commit_lsn: Lsn(commit),
                commit_time_us: 2_000_000,
            },
            snapshot: false,
        }
    }

    fn value(r: &EncodedRecord) -> Value {
        serde_json::from_slice(r.value.as_ref().unwrap()).unwrap()
    }

    #[test]
    fn a_transaction_split_over_batches_is_counted_whole() {
        let mut t = TxTracker::new("p.transaction");
        let first = [change("a", 100), change("b", 100)];
        let mut plan = t.plan(&first, None);
        assert_eq!(plan.records(), 1);
        let begin = plan.marks_before(0);
        assert_eq!(value(&begin[0])["status"], "BEGIN");
        assert_eq!(
            begin[0].key.as_deref(),
            Some(br#"{"id":"9:100"}"#.as_slice())
        );
        let b = plan.block(1).unwrap();
        assert_eq!(
            (&*b.id, b.total_order, b.data_collection_order),
            ("9:100", 2, 1)
        );
        // The rest of it, then the next transaction, in one batch that ends both.
        let second = [change("a", 100), change("a", 200)];
        let mut plan = t.plan(&second, Some(Lsn(201)));
        let b = plan.block(0).unwrap();
        assert_eq!((b.total_order, b.data_collection_order), (3, 2));
        assert!(plan.marks_before(0).is_empty());
        let at_next: Vec<Value> = plan.marks_before(1).iter().map(value).collect();
        assert_eq!(at_next[0]["status"], "END");
        assert_eq!(at_next[0]["event_count"], 3);
        assert_eq!(
            at_next[0]["data_collections"],
            serde_json::json!([{"data_collection": "public.a", "event_count": 2},
                               {"data_collection": "public.b", "event_count": 1}])
        );
        assert_eq!(
            (at_next[1]["status"].as_str(), at_next[1]["id"].as_str()),
            (Some("BEGIN"), Some("9:200"))
        );
        let end = plan.marks_before(2);
        assert_eq!(
            (
                value(&end[0])["status"].as_str(),
                value(&end[0])["event_count"].as_u64()
            ),
            (Some("END"), Some(1))
        );
        assert_eq!(value(&end[0])["ts_ms"], 2000);
    }

    #[test]
    fn snapshot_rows_have_no_transaction_and_a_new_session_starts_afresh() {
        let mut t = TxTracker::new("p.transaction");
        let mut row = change("a", 100);
        row.snapshot = true;
        let plan = t.plan(&[row], Some(Lsn(101)));
        assert_eq!((plan.records(), plan.block(0).is_none()), (0, true));
        let _ = t.plan(&[change("a", 300)], None);
        t.reset();
        let plan = t.plan(&[change("a", 300)], None);
        assert_eq!(
            plan.records(),
            1,
            "only a BEGIN: the replayed transaction starts over"
        );
        assert_eq!(plan.block(0).unwrap().total_order, 1);
    }
}
