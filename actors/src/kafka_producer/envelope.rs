//! Kafka record encoding: key = the row's key as JSON, value = a
//! Debezium-shaped envelope, headers = table, op and commit LSN.

use serde::Serialize;
use serde_json::{Map, Value};

use crate::event::{ChangeEvent, Op};

/// One record ready for the producer.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedRecord {
    /// Destination topic.
    pub topic: String,
    /// JSON key; `None` for a truncate, which has no row key.
    pub key: Option<Vec<u8>>,
    /// JSON envelope; `None` for a tombstone.
    pub value: Option<Vec<u8>>,
    /// `schema.table`.
    pub table: String,
    /// Debezium op code (`c`, `u`, `d`, `r`, `t`), or empty for a tombstone.
    pub op: &'static str,
    /// Commit LSN in PostgreSQL notation.
    pub commit_lsn: String,
    /// Column types of the table, JSON object text.
    pub types: String,
}

#[derive(Serialize)]
struct Envelope<'a> {
    before: Option<&'a Map<String, Value>>,
    after: Option<&'a Map<String, Value>>,
    op: &'static str,
    ts_ms: i64,
    source: Source<'a>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    unchanged_toast: &'a [String],
}

#[derive(Serialize)]
struct Source<'a> {
    connector: &'static str,
    db: &'a str,
    schema: &'a str,
    table: &'a str,
    lsn: u64,
    commit_lsn: u64,
    seq: u32,
    #[serde(rename = "txId")]
    tx_id: u32,
    ts_ms: i64,
    snapshot: bool,
}

/// Encode `event` into its record(s): the change, and after a delete a
/// tombstone when `tombstones` is set.
pub fn encode(
    event: &ChangeEvent,
    topic: String,
    db: &str,
    tombstones: bool,
    now_ms: i64,
) -> Vec<EncodedRecord> {
    let key = event
        .key
        .as_ref()
        .map(|k| serde_json::to_vec(k).unwrap_or_default());
    let envelope = Envelope {
        before: event.before.as_ref(),
        after: event.after.as_ref(),
        op: event.op.code(),
        ts_ms: now_ms,
        source: Source {
            connector: "pgcdc",
            db,
            schema: &event.table.schema,
            table: &event.table.name,
            lsn: event.lsn.0,
            commit_lsn: event.tx.commit_lsn.0,
            seq: event.seq,
            tx_id: event.tx.xid,
            ts_ms: event.tx.commit_time_us.div_euclid(1000),
            snapshot: event.snapshot,
        },
        unchanged_toast: &event.unchanged_toast,
    };
    // Serializing maps of JSON values to a Vec cannot fail.
    let value = serde_json::to_vec(&envelope).unwrap_or_default();
    let record = EncodedRecord {
        topic,
        key,
        value: Some(value),
        table: format!("{}.{}", event.table.schema, event.table.name),
        op: event.op.code(),
        commit_lsn: event.tx.commit_lsn.to_string(),
        types: event.table.column_types.clone(),
    };
    if event.op == Op::Delete && tombstones && record.key.is_some() {
        let tombstone = EncodedRecord {
            value: None,
            op: "",
            ..record.clone()
        };
        vec![record, tombstone]
    } else {
        vec![record]
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;

    use super::*;
    use crate::event::{TableRef, TxMeta};
    use crate::lsn::Lsn;

    fn event(op: Op) -> ChangeEvent {
        let obj = |v: Value| v.as_object().cloned();
        ChangeEvent {
            op,
            table: Arc::new(TableRef {
                schema: "public".into(),
                name: "users".into(),
                key_columns: vec!["id".into()],
                column_types: String::new(),
            }),
            key: obj(json!({"id": 42})),
            before: obj(json!({"id": 42, "name": "old"})),
            after: if op == Op::Delete {
                None
            } else {
                obj(json!({"id": 42, "name": "new"}))
            },
            unchanged_toast: vec![],
            lsn: Lsn(0x100),
            seq: 3,
            tx: TxMeta {
                xid: 777,
                commit_lsn: Lsn(0x1_0000_0200),
                commit_time_us: 1_700_000_000_123_456,
            },
            snapshot: false,
        }
    }

    #[test]
    fn update_envelope_has_debezium_shape() {
        let recs = encode(&event(Op::Update), "t".into(), "shop", true, 5);
        assert_eq!(recs.len(), 1);
        let r = &recs[0];
        assert_eq!(r.key.as_deref(), Some(br#"{"id":42}"#.as_slice()));
        assert_eq!(
            (r.table.as_str(), r.op, r.commit_lsn.as_str()),
            ("public.users", "u", "1/200")
        );
        let v: Value = serde_json::from_slice(r.value.as_ref().unwrap()).unwrap();
        assert_eq!(
            v,
            json!({
                "before": {"id": 42, "name": "old"},
                "after": {"id": 42, "name": "new"},
                "op": "u",
                "ts_ms": 5,
                "source": {"connector": "pgcdc", "db": "shop", "schema": "public", "table": "users",
                           "lsn": 256, "commit_lsn": 0x1_0000_0200u64, "seq": 3, "txId": 777,
                           "ts_ms": 1_700_000_000_123i64, "snapshot": false}
            })
        );
    }

    #[test]
    fn delete_is_followed_by_a_tombstone_unless_disabled() {
        let recs = encode(&event(Op::Delete), "t".into(), "shop", true, 5);
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[1].value, None);
        assert_eq!(recs[1].key, recs[0].key);
        assert_eq!(
            encode(&event(Op::Delete), "t".into(), "shop", false, 5).len(),
            1
        );
    }

    #[test]
    fn unchanged_toast_columns_are_listed() {
        let mut e = event(Op::Update);
        e.unchanged_toast = vec!["blob".into()];
        let recs = encode(&e, "t".into(), "shop", true, 5);
        let v: Value = serde_json::from_slice(recs[0].value.as_ref().unwrap()).unwrap();
        assert_eq!(v["unchanged_toast"], json!(["blob"]));
    }
}
