//! Kafka record encoding: key = the row's key as JSON, value = a
//! Debezium-shaped envelope, headers = table, op and commit LSN.
//!
//! Snapshot rows are encoded straight from PostgreSQL's text format
//! ([`Encoder::rows`]), byte for byte as [`Encoder::event`] would encode the
//! same row as a [`ChangeEvent`], without building JSON values first.

use std::borrow::Cow;
use std::sync::Arc;

use super::connect::{wrap, TableSchema};
use super::format::{copied_events, json_key, row_value, Rows};
use super::modes::{apply, conversions, Convert};
use super::{Format, KafkaConfig};
use crate::event::{ChangeEvent, CopiedRows, Op, TableRef, TxMeta};
use crate::lsn::Lsn;
use crate::pg::values::{to_json_bytes, write_rendered};
use crate::snapshot::row_cell;
use crate::wire::{Envelope, Sequence, SnapshotMark, Source, TxBlock, VERSION};

/// Microseconds per millisecond (commit times are µs, the envelope's ms).
const US_PER_MS: i64 = 1000;
/// Nanoseconds per microsecond.
const NS_PER_US: i64 = 1000;
/// Room for an envelope's fields besides the row data (source, op, JSON
/// punctuation), reserved with the row so a wide row is written without
/// growing its buffer step by step.
const ENVELOPE_BYTES: usize = 512;

/// How every snapshot row's envelope starts, before its `after` object.
const ROW_OPEN: &[u8] = b"{\"before\":null,\"after\":";
/// JSON null.
const NULL: &[u8] = b"null";
/// `source.seq` of 0 closing the `source` block.
const SEQ_ZERO: &[u8] = b"\"seq\":0}";

/// One record ready for the producer.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedRecord {
    /// Destination topic.
    pub topic: Arc<str>,
    /// JSON key; `None` for a truncate, which has no row key.
    pub key: Option<Vec<u8>>,
    /// JSON envelope; `None` for a tombstone.
    pub value: Option<Vec<u8>>,
    /// `schema.table`.
    pub table: Arc<str>,
    /// Debezium op code (`c`, `u`, `d`, `r`, `t`), or empty for a tombstone.
    pub op: &'static str,
    /// Commit LSN in PostgreSQL notation.
    pub commit_lsn: Arc<str>,
    /// Column types of the table, JSON object text.
    pub types: Arc<str>,
}

/// What every record of one table shares.
#[derive(Clone)]
struct Names {
    topic: Arc<str>,
    table: Arc<str>,
    types: Arc<str>,
    /// The table's Connect schemas (`connect-json` only).
    schema: Option<Arc<TableSchema>>,
    /// The columns whose values `decimal_handling_mode` and
    /// `time_precision_mode` rewrite (none under the defaults).
    converted: Arc<[(String, Convert)]>,
}

/// Encodes one batch: shares topic, table and LSN texts between records.
pub struct Encoder<'a> {
    kafka: &'a KafkaConfig,
    db: &'a str,
    now_ms: i64,
    names: Option<(Arc<TableRef>, Names)>,
    lsn: Option<(Lsn, Arc<str>)>,
}

impl<'a> Encoder<'a> {
    /// An encoder for database `db`, stamping records with `now_ms`.
    pub fn new(kafka: &'a KafkaConfig, db: &'a str, now_ms: i64) -> Self {
        Self {
            kafka,
            db,
            now_ms,
            names: None,
            lsn: None,
        }
    }

    fn names(&mut self, table: &Arc<TableRef>) -> Names {
        match &self.names {
            Some((t, n)) if Arc::ptr_eq(t, table) => n.clone(),
            _ => {
                let names = Names {
                    topic: self.kafka.topic_for(&table.schema, &table.name).into(),
                    table: format!("{}.{}", table.schema, table.name).into(),
                    types: table.column_types.as_str().into(),
                    schema: (self.kafka.format == Format::ConnectJson)
                        .then(|| Arc::new(TableSchema::new(self.kafka, table))),
                    converted: conversions(self.kafka, &table.column_types).into(),
                };
                self.names = Some((table.clone(), names.clone()));
                names
            }
        }
    }

    fn lsn(&mut self, lsn: Lsn) -> Arc<str> {
        match &self.lsn {
            Some((l, text)) if *l == lsn => text.clone(),
            _ => {
                let text: Arc<str> = lsn.to_string().into();
                self.lsn = Some((lsn, text.clone()));
                text
            }
        }
    }

    /// How many records [`Self::event`] makes of `event`: 2 for a delete
    /// followed by a tombstone, else 1 (in `row` format 0 for a truncate).
    pub fn records_of(&self, event: &ChangeEvent) -> usize {
        if self.kafka.format == Format::Row {
            // The new row, or a tombstone for a delete; nothing for a truncate.
            return usize::from(event.op != Op::Truncate);
        }
        let tombstone = event.op == Op::Delete && self.kafka.tombstones && event.key.is_some();
        1 + usize::from(tombstone)
    }

    /// The `source` block of a change in `table` at `lsn`, position `seq`
    /// of transaction `tx`.
    fn source<'s>(
        &'s self,
        table: &'s TableRef,
        tx: TxMeta,
        lsn: Lsn,
        seq: u32,
        snapshot: SnapshotMark,
    ) -> Source<'s> {
        Source {
            version: Cow::Borrowed(VERSION),
            connector: Cow::Borrowed(self.kafka.source_connector.name()),
            name: Cow::Borrowed(&self.kafka.topic_prefix),
            ts_ms: tx.commit_time_us.div_euclid(US_PER_MS),
            ts_us: tx.commit_time_us,
            ts_ns: tx.commit_time_us.saturating_mul(NS_PER_US),
            snapshot,
            db: Cow::Borrowed(self.db),
            sequence: Sequence {
                commit_lsn: tx.commit_lsn.0,
                lsn: lsn.0,
            },
            schema: Cow::Borrowed(&table.schema),
            table: Cow::Borrowed(&table.name),
            tx_id: tx.xid,
            lsn: lsn.0,
            xmin: None,
            commit_lsn: tx.commit_lsn.0,
            seq,
        }
    }

    /// The envelope of `event` with rows `before` and `after`, snapshot
    /// mark `snapshot` and its `transaction` block if any, as JSON.
    pub(super) fn envelope_bytes(
        &self,
        event: &ChangeEvent,
        rows: Rows<'_>,
        snapshot: SnapshotMark,
        transaction: Option<TxBlock<'_>>,
    ) -> Vec<u8> {
        let envelope = Envelope {
            before: rows.0,
            after: rows.1,
            source: self.source(&event.table, event.tx, event.lsn, event.seq, snapshot),
            transaction,
            op: Cow::Borrowed(event.op.code()),
            ts_ms: self.now_ms,
            ts_us: self.now_ms.saturating_mul(US_PER_MS),
            ts_ns: self.now_ms.saturating_mul(US_PER_MS * NS_PER_US),
            unchanged_toast: Cow::Borrowed(&event.unchanged_toast),
        };
        let mut value = Vec::with_capacity(event.row_bytes() + ENVELOPE_BYTES);
        to_json_bytes(&envelope, &mut value);
        value
    }

    /// Append `event`'s record(s) to `out`: the change (with its
    /// `transaction` block, if given), and after a delete a tombstone when
    /// tombstones are on.
    pub fn event(
        &mut self,
        event: &ChangeEvent,
        transaction: Option<TxBlock<'_>>,
        out: &mut Vec<EncodedRecord>,
    ) {
        let snapshot = if event.snapshot {
            SnapshotMark::Incremental
        } else {
            SnapshotMark::False
        };
        let converted = self.names(&event.table).converted;
        if converted.is_empty() {
            return self.change(event, snapshot, transaction, out);
        }
        let mut event = event.clone();
        apply(&mut event, &converted);
        self.change(&event, snapshot, transaction, out);
    }

    /// [`Self::event`] with the snapshot mark given, in `kafka.format`.
    fn change(
        &mut self,
        event: &ChangeEvent,
        snapshot: SnapshotMark,
        transaction: Option<TxBlock<'_>>,
        out: &mut Vec<EncodedRecord>,
    ) {
        let names = self.names(&event.table);
        let records = self.records_of(event);
        let (key, value) = match self.kafka.format {
            Format::Json => {
                let rows = (event.before.as_ref(), event.after.as_ref());
                let value = self.envelope_bytes(event, rows, snapshot, transaction);
                (json_key(event), Some(value))
            }
            Format::ConnectJson => self.connect_json(event, snapshot, transaction, &names),
            Format::Row if records == 0 => return,
            Format::Row => (json_key(event), row_value(event)),
        };
        let record = EncodedRecord {
            topic: names.topic,
            key,
            value,
            table: names.table,
            op: event.op.code(),
            commit_lsn: self.lsn(event.tx.commit_lsn),
            types: names.types,
        };
        if records == 2 {
            let tombstone = EncodedRecord {
                value: None,
                op: "",
                ..record.clone()
            };
            out.push(record);
            out.push(tombstone);
        } else {
            out.push(record);
        }
    }

    /// The `connect-json` key and value of `event`: schema and payload,
    /// row values conformed to the schema.
    fn connect_json(
        &self,
        event: &ChangeEvent,
        snapshot: SnapshotMark,
        transaction: Option<TxBlock<'_>>,
        names: &Names,
    ) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
        let Some(schema) = &names.schema else {
            return (json_key(event), None);
        };
        let before = event.before.as_ref().map(|r| schema.conform(r));
        let after = event.after.as_ref().map(|r| schema.conform(r));
        let rows = (before.as_ref(), after.as_ref());
        let payload = self.envelope_bytes(event, rows, snapshot, transaction);
        let key = event.key.as_ref().map(|k| {
            let mut payload = Vec::new();
            to_json_bytes(&schema.conform(k), &mut payload);
            wrap(&schema.key, &payload)
        });
        (key, Some(wrap(&schema.value, &payload)))
    }

    /// What a snapshot row's envelope holds between its `after` object and
    /// its `source.seq` value, and after that value: cut from the envelope
    /// [`Self::event`] would write, so both encoders write the same bytes.
    fn row_frame(&self, table: &TableRef, tx: TxMeta) -> (Vec<u8>, Vec<u8>) {
        let envelope: Envelope<'_, ()> = Envelope {
            before: None,
            after: None,
            source: self.source(table, tx, tx.commit_lsn, 0, SnapshotMark::True),
            transaction: None,
            op: Cow::Borrowed(Op::Read.code()),
            ts_ms: self.now_ms,
            ts_us: self.now_ms.saturating_mul(US_PER_MS),
            ts_ns: self.now_ms.saturating_mul(US_PER_MS * NS_PER_US),
            unchanged_toast: Cow::Borrowed(&[]),
        };
        let mut text = Vec::new();
        to_json_bytes(&envelope, &mut text);
        // `seq` is the last field of `source`; string quotes inside are escaped.
        let seq = SEQ_ZERO.len() - 2;
        let at = text
            .windows(SEQ_ZERO.len())
            .rposition(|w| w == SEQ_ZERO)
            .unwrap_or(text.len());
        let start = (ROW_OPEN.len() + NULL.len()).min(at);
        let middle = text[start..at + seq].to_vec();
        let tail = text.get(at + seq + 1..).unwrap_or_default().to_vec();
        (middle, tail)
    }

    /// Append one `op=r` record per copied row to `out`.
    pub fn rows(&mut self, copied: &CopiedRows, out: &mut Vec<EncodedRecord>) {
        let converted = self.names(&copied.table).converted;
        if self.kafka.format != Format::Json || !converted.is_empty() {
            for mut event in copied_events(copied) {
                apply(&mut event, &converted);
                self.change(&event, SnapshotMark::True, None, out);
            }
            return;
        }
        let table = &copied.table;
        let tx = copied.tx;
        // Objects are written with their keys in name order, as a
        // `serde_json::Map` (a BTreeMap) serializes them.
        let mut after: Vec<usize> = (0..copied.columns.len()).collect();
        after.sort_by(|a, b| copied.columns[*a].0.cmp(&copied.columns[*b].0));
        let mut key: Vec<usize> = table
            .key_columns
            .iter()
            .filter_map(|k| copied.columns.iter().position(|(c, _)| c == k))
            .collect();
        key.sort_by(|a, b| copied.columns[*a].0.cmp(&copied.columns[*b].0));
        key.dedup();
        let label = |i: usize, first: bool| {
            let mut l = if first { Vec::new() } else { vec![b','] };
            to_json_bytes(&copied.columns[i].0, &mut l);
            l.push(b':');
            l
        };
        let after: Vec<(usize, Vec<u8>)> = after
            .iter()
            .enumerate()
            .map(|(n, &i)| (i, label(i, n == 0)))
            .collect();
        let key: Vec<(usize, Vec<u8>)> = key
            .iter()
            .enumerate()
            .map(|(n, &i)| (i, label(i, n == 0)))
            .collect();
        let (middle, tail) = self.row_frame(table, tx);
        let names = self.names(table);
        let commit_lsn = self.lsn(tx.commit_lsn);
        let object =
            |row: &tokio_postgres::SimpleQueryRow, cols: &[(usize, Vec<u8>)], buf: &mut Vec<u8>| {
                buf.push(b'{');
                for (i, label) in cols {
                    buf.extend_from_slice(label);
                    match row_cell(row, *i, copied.raw) {
                        Some(bytes) => write_rendered(&copied.columns[*i].1, &bytes, buf),
                        None => buf.extend_from_slice(b"null"),
                    }
                }
                buf.push(b'}');
            };
        out.reserve(copied.rows.len());
        let mut seq = copied.first_seq;
        for row in &copied.rows {
            let mut k = Vec::with_capacity(16);
            object(row, &key, &mut k);
            let mut v = Vec::with_capacity(256);
            v.extend_from_slice(ROW_OPEN);
            object(row, &after, &mut v);
            v.extend_from_slice(&middle);
            to_json_bytes(&seq, &mut v);
            v.extend_from_slice(&tail);
            seq = seq.wrapping_add(1);
            out.push(EncodedRecord {
                topic: names.topic.clone(),
                key: Some(k),
                value: Some(v),
                table: names.table.clone(),
                op: Op::Read.code(),
                commit_lsn: commit_lsn.clone(),
                types: names.types.clone(),
            });
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::sync::Arc;

    use serde_json::{json, Map, Value};

    use super::*;
    use crate::event::{TableRef, TxMeta};
    use crate::lsn::Lsn;

    /// Encode with `tombstones` on or off, at time 5, for database `shop`.
    fn encode(event: &ChangeEvent, tombstones: bool) -> Vec<EncodedRecord> {
        let kafka = KafkaConfig {
            tombstones,
            ..KafkaConfig::default()
        };
        let mut out = Vec::new();
        Encoder::new(&kafka, "shop", 5).event(event, None, &mut out);
        out
    }

    /// A change of `public.users` row 42 in transaction 777.
    pub(in crate::kafka_producer) fn event(op: Op) -> ChangeEvent {
        let obj = |v: Value| v.as_object().cloned();
        ChangeEvent {
            op,
            table: Arc::new(TableRef {
                schema: "public".into(),
                name: "users".into(),
                key_columns: vec!["id".into()],
                key_source: Default::default(),
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
    fn update_envelope_has_every_debezium_field() {
        let recs = encode(&event(Op::Update), true);
        assert_eq!(recs.len(), 1);
        let r = &recs[0];
        assert_eq!(r.key.as_deref(), Some(br#"{"id":42}"#.as_slice()));
        assert_eq!(
            (&*r.table, r.op, &*r.commit_lsn),
            ("public.users", "u", "1/200")
        );
        let v: Value = serde_json::from_slice(r.value.as_ref().unwrap()).unwrap();
        assert_eq!(
            v,
            json!({
                "before": {"id": 42, "name": "old"},
                "after": {"id": 42, "name": "new"},
                "source": {"version": VERSION, "connector": "pgcdc", "name": "pgcdc",
                           "ts_ms": 1_700_000_000_123i64, "ts_us": 1_700_000_000_123_456i64,
                           "ts_ns": 1_700_000_000_123_456_000i64, "snapshot": "false",
                           "db": "shop", "sequence": "[\"4294967808\",\"256\"]",
                           "schema": "public", "table": "users", "txId": 777, "lsn": 256,
                           "xmin": null, "commit_lsn": 0x1_0000_0200u64, "seq": 3},
                "transaction": null,
                "op": "u",
                "ts_ms": 5,
                "ts_us": 5000,
                "ts_ns": 5_000_000,
            })
        );
    }

    #[test]
    fn envelope_bytes_are_pinned() {
        let source = |snapshot: &str| {
            format!(
                concat!(
                    r#""source":{{"version":"{}","connector":"postgresql","name":"pgcdc","#,
                    r#""ts_ms":1700000000123,"ts_us":1700000000123456,"ts_ns":1700000000123456000,"#,
                    r#""snapshot":"{}","db":"shop","sequence":"[\"4294967808\",\"256\"]","#,
                    r#""schema":"public","table":"users","txId":777,"lsn":256,"xmin":null,"#,
                    r#""commit_lsn":4294967808,"seq":3}}"#
                ),
                VERSION, snapshot
            )
        };
        let kafka = KafkaConfig {
            source_connector: super::super::SourceConnector::Postgresql,
            ..KafkaConfig::default()
        };
        let encode = |e: &ChangeEvent, tx: Option<TxBlock<'_>>| {
            let mut out = Vec::new();
            Encoder::new(&kafka, "shop", 5).event(e, tx, &mut out);
            String::from_utf8(out.remove(0).value.unwrap()).unwrap()
        };
        let block = TxBlock {
            id: "777:4294967808".into(),
            total_order: 4,
            data_collection_order: 2,
        };
        assert_eq!(
            encode(&event(Op::Update), Some(block)),
            format!(
                r#"{{"before":{{"id":42,"name":"old"}},"after":{{"id":42,"name":"new"}},{},"transaction":{{"id":"777:4294967808","total_order":4,"data_collection_order":2}},"op":"u","ts_ms":5,"ts_us":5000,"ts_ns":5000000}}"#,
                source("false")
            )
        );
        let mut e = event(Op::Delete);
        e.unchanged_toast = vec!["blob".into()];
        e.snapshot = true;
        assert_eq!(
            encode(&e, None),
            format!(
                r#"{{"before":{{"id":42,"name":"old"}},"after":null,{},"transaction":null,"op":"d","ts_ms":5,"ts_us":5000,"ts_ns":5000000,"unchanged_toast":["blob"]}}"#,
                source("incremental")
            )
        );
    }

    #[test]
    fn snapshot_rows_are_framed_as_the_serializer_writes_them() {
        let kafka = KafkaConfig::default();
        let e = event(Op::Read);
        let (middle, tail) = Encoder::new(&kafka, "shop", 5).row_frame(&e.table, e.tx);
        let mut v = ROW_OPEN.to_vec();
        v.extend_from_slice(br#"{"id":42}"#);
        v.extend_from_slice(&middle);
        v.extend_from_slice(b"17");
        v.extend_from_slice(&tail);
        let read: Envelope<'_, Map<String, Value>> = serde_json::from_slice(&v).unwrap();
        assert_eq!(read.source.seq, 17);
        assert_eq!(read.source.snapshot, SnapshotMark::True);
        assert_eq!((&*read.op, read.ts_ms), ("r", 5));
        assert_eq!(read.source.lsn, e.tx.commit_lsn.0);
        assert_eq!(serde_json::to_vec(&read).unwrap(), v);
    }

    #[test]
    fn snapshot_marks_are_read_from_strings_and_from_older_booleans() {
        for (text, mark) in [
            ("true", SnapshotMark::True),
            ("false", SnapshotMark::False),
            ("\"true\"", SnapshotMark::True),
            ("\"last\"", SnapshotMark::Last),
            ("\"false\"", SnapshotMark::False),
            ("\"incremental\"", SnapshotMark::Incremental),
        ] {
            assert_eq!(serde_json::from_str::<SnapshotMark>(text).unwrap(), mark);
        }
        assert_eq!(
            serde_json::to_string(&SnapshotMark::Incremental).unwrap(),
            "\"incremental\""
        );
    }

    #[test]
    fn the_sink_reads_back_what_the_producer_writes() {
        let mut e = event(Op::Update);
        e.unchanged_toast = vec!["blob".into()];
        let recs = encode(&e, true);
        let read: Envelope<'_, Map<String, Value>> =
            serde_json::from_slice(recs[0].value.as_ref().unwrap()).unwrap();
        assert_eq!(read.op, "u");
        assert_eq!(read.after.as_ref(), e.after.as_ref());
        assert_eq!(read.before.as_ref(), e.before.as_ref());
        assert_eq!(
            (&*read.source.schema, &*read.source.table),
            ("public", "users")
        );
        assert_eq!(read.source.commit_lsn, 0x1_0000_0200);
        assert_eq!((read.source.seq, read.source.tx_id), (3, 777));
        let sequence = read.source.sequence;
        assert_eq!((sequence.commit_lsn, sequence.lsn), (0x1_0000_0200, 0x100));
        assert_eq!(&*read.unchanged_toast, ["blob".to_string()]);
        // Written again, it is the same bytes.
        assert_eq!(
            serde_json::to_vec(&read).unwrap(),
            *recs[0].value.as_ref().unwrap()
        );
    }

    #[test]
    fn delete_is_followed_by_a_tombstone_unless_disabled() {
        let recs = encode(&event(Op::Delete), true);
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[1].value, None);
        assert_eq!(recs[1].key, recs[0].key);
        assert_eq!(encode(&event(Op::Delete), false).len(), 1);
        for (op, tombstones) in [(Op::Delete, true), (Op::Delete, false), (Op::Update, true)] {
            let kafka = KafkaConfig {
                tombstones,
                ..KafkaConfig::default()
            };
            let counted = Encoder::new(&kafka, "shop", 5).records_of(&event(op));
            assert_eq!(counted, encode(&event(op), tombstones).len(), "{op:?}");
        }
    }

    #[test]
    fn unchanged_toast_columns_are_listed() {
        let mut e = event(Op::Update);
        e.unchanged_toast = vec!["blob".into()];
        let recs = encode(&e, true);
        let v: Value = serde_json::from_slice(recs[0].value.as_ref().unwrap()).unwrap();
        assert_eq!(v["unchanged_toast"], json!(["blob"]));
    }
}
