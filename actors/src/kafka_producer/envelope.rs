//! Kafka record encoding: key = the row's key as JSON, value = a
//! Debezium-shaped envelope, headers = table, op and commit LSN.
//!
//! Snapshot rows are encoded straight from PostgreSQL's text format
//! ([`Encoder::rows`]), byte for byte as [`Encoder::event`] would encode the
//! same row as a [`ChangeEvent`], without building JSON values first.

use std::sync::Arc;

use super::connect::{wrap, TableSchema};
use super::format::{copied_events, row_value, Rows};
use super::modes::{apply, conversions, Convert};
use super::{Format, KafkaConfig};
use crate::event::{Cell, ChangeEvent, Columns, CopiedRows, Op, Row, TableRef, TxMeta};
use crate::lsn::Lsn;
use crate::pg::types::Rule;
use crate::pg::values::to_json_bytes;
use crate::snapshot::row_cell;
use crate::wire::{SnapshotMark, TxBlock, VERSION};

/// Microseconds per millisecond (commit times are µs, the envelope's ms).
const US_PER_MS: i64 = 1000;
/// Nanoseconds per microsecond.
const NS_PER_US: i64 = 1000;
/// Room for an envelope's fields besides the row data (source, op, JSON
/// punctuation), reserved with the row so a wide row is written without
/// growing its buffer step by step (each step would hold it twice).
const ENVELOPE_BYTES: usize = 512;
/// Largest buffer kept for the next record once its record is with
/// librdkafka: ordinary rows reuse their buffers, while a huge value's is
/// freed at once.
const RECYCLE_MAX: usize = 64 << 10;
/// Room a snapshot record's buffers get beyond the sizes of the record
/// before it: rows of one table differ by a few bytes.
const ROW_ROOM: usize = 64;
/// Most buffers kept for reuse (a key and a value, a tombstone's key, a
/// transaction mark).
const SPARE_MAX: usize = 4;

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
    /// The table's `source` texts, escaped once.
    frame: Arc<SourceFrame>,
}

/// The texts of a `source` block that are the same for every change of one
/// table, escaped once per table and batch: [`Encoder::envelope_bytes`]
/// writes the change's own numbers between them. The bytes are those
/// serializing [`Envelope`](crate::wire::Envelope) gives (pinned by a test).
struct SourceFrame {
    /// `{"version":…,"connector":…,"name":…,"ts_ms":`
    head: Vec<u8>,
    /// `,"db":…,"sequence":"[\"` (the sequence is a JSON string).
    db: Vec<u8>,
    /// `\"]","schema":…,"table":…,"txId":`
    table: Vec<u8>,
}

impl SourceFrame {
    fn new(kafka: &KafkaConfig, db: &str, table: &TableRef) -> Self {
        let text = |parts: &[(&[u8], &str)], end: &[u8]| {
            let mut out = Vec::new();
            for (label, value) in parts {
                out.extend_from_slice(label);
                to_json_bytes(value, &mut out);
            }
            out.extend_from_slice(end);
            out
        };
        Self {
            head: text(
                &[
                    (b"{\"version\":", VERSION),
                    (b",\"connector\":", kafka.source_connector.name()),
                    (b",\"name\":", &kafka.topic_prefix),
                ],
                b",\"ts_ms\":",
            ),
            db: text(&[(b",\"db\":", db)], b",\"sequence\":\"[\\\""),
            table: text(
                &[
                    (b"\\\"]\",\"schema\":", &table.schema),
                    (b",\"table\":", &table.name),
                ],
                b",\"txId\":",
            ),
        }
    }
}

/// The texts of a `source` block that are the same for every change of one
/// table in one transaction with one snapshot mark: a change's own numbers
/// (its LSN, twice, and its `seq`) go between them.
#[derive(Default)]
struct TxFrame {
    /// Whose texts these are: the table's frame, the transaction, the mark.
    of: Option<(Arc<SourceFrame>, TxMeta, SnapshotMark)>,
    /// From `{"version":` to the sequence's second element.
    open: Vec<u8>,
    /// From the end of the sequence to `"lsn":`.
    middle: Vec<u8>,
    /// From `,"xmin":` to `"seq":`.
    close: Vec<u8>,
}

impl TxFrame {
    /// Write the texts for `frame`'s table, `tx` and `snapshot`, into the
    /// buffers of the transaction before.
    fn refill(&mut self, frame: &Arc<SourceFrame>, tx: TxMeta, snapshot: SnapshotMark) {
        let Self {
            open,
            middle,
            close,
            ..
        } = self;
        open.clear();
        open.extend_from_slice(&frame.head);
        number(tx.commit_time_us.div_euclid(US_PER_MS), open);
        open.extend_from_slice(b",\"ts_us\":");
        number(tx.commit_time_us, open);
        open.extend_from_slice(b",\"ts_ns\":");
        number(tx.commit_time_us.saturating_mul(NS_PER_US), open);
        open.extend_from_slice(b",\"snapshot\":");
        to_json_bytes(&snapshot, open);
        open.extend_from_slice(&frame.db);
        number(tx.commit_lsn.0, open);
        open.extend_from_slice(b"\\\",\\\"");
        middle.clear();
        middle.extend_from_slice(&frame.table);
        number(tx.xid, middle);
        middle.extend_from_slice(b",\"lsn\":");
        close.clear();
        close.extend_from_slice(b",\"xmin\":null,\"commit_lsn\":");
        number(tx.commit_lsn.0, close);
        close.extend_from_slice(b",\"seq\":");
        self.of = Some((frame.clone(), tx, snapshot));
    }

    fn is_for(&self, frame: &Arc<SourceFrame>, tx: TxMeta, snapshot: SnapshotMark) -> bool {
        self.of
            .as_ref()
            .is_some_and(|(f, t, s)| Arc::ptr_eq(f, frame) && *t == tx && *s == snapshot)
    }
}

/// Append the decimal text of `n` to `out`.
fn number(n: impl itoa::Integer, out: &mut Vec<u8>) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// Encodes one batch: shares topic, table and LSN texts between records.
pub struct Encoder<'a> {
    kafka: &'a KafkaConfig,
    db: &'a str,
    names: Option<(Arc<TableRef>, Names)>,
    lsn: Option<(Lsn, Arc<str>)>,
    /// The `source` texts of the last transaction encoded.
    tx_frame: TxFrame,
    /// `","ts_ms":…,"ts_us":…,"ts_ns":…` of `now_ms`: what follows the op.
    stamp: Vec<u8>,
    /// Buffers of records librdkafka has copied, cleared, for the next ones.
    spare: Vec<Vec<u8>>,
}

impl<'a> Encoder<'a> {
    /// An encoder for database `db`, stamping records with `now_ms`.
    pub fn new(kafka: &'a KafkaConfig, db: &'a str, now_ms: i64) -> Self {
        let mut stamp = b"\",\"ts_ms\":".to_vec();
        number(now_ms, &mut stamp);
        stamp.extend_from_slice(b",\"ts_us\":");
        number(now_ms.saturating_mul(US_PER_MS), &mut stamp);
        stamp.extend_from_slice(b",\"ts_ns\":");
        number(now_ms.saturating_mul(US_PER_MS * NS_PER_US), &mut stamp);
        Self {
            kafka,
            db,
            names: None,
            lsn: None,
            tx_frame: TxFrame::default(),
            stamp,
            spare: Vec::new(),
        }
    }

    /// Keep `record`'s buffers, once librdkafka has its copy, to write the
    /// next records into: a record then costs no allocation of its own.
    pub fn recycle(&mut self, record: EncodedRecord) {
        for mut buf in [record.key, record.value].into_iter().flatten() {
            if buf.capacity() <= RECYCLE_MAX && self.spare.len() < SPARE_MAX {
                buf.clear();
                self.spare.push(buf);
            }
        }
    }

    /// An empty buffer with room for `bytes`: a recycled one if any.
    fn buffer(&mut self, bytes: usize) -> Vec<u8> {
        let mut buf = self.spare.pop().unwrap_or_default();
        buf.reserve(bytes);
        buf
    }

    /// The JSON key of `event`, if it has one.
    fn key(&mut self, event: &ChangeEvent) -> Option<Vec<u8>> {
        let key = event.key.as_ref()?;
        let mut buf = self.buffer(0);
        key.write_json(&mut buf);
        Some(buf)
    }

    fn names(&mut self, table: &Arc<TableRef>) -> &Names {
        if !matches!(&self.names, Some((t, _)) if Arc::ptr_eq(t, table)) {
            self.names = None;
        }
        let (kafka, db) = (self.kafka, self.db);
        let (_, names) = self.names.get_or_insert_with(|| {
            let names = Names {
                topic: kafka.topic_for(&table.schema, &table.name).into(),
                table: format!("{}.{}", table.schema, table.name).into(),
                types: table.column_types.as_str().into(),
                schema: (kafka.format == Format::ConnectJson)
                    .then(|| Arc::new(TableSchema::new(kafka, table))),
                converted: conversions(kafka, &table.column_types).into(),
                frame: Arc::new(SourceFrame::new(kafka, db, table)),
            };
            (table.clone(), names)
        });
        names
    }

    /// The `source` texts of `frame`'s table in transaction `tx` with mark `snapshot`.
    fn tx_frame(
        &mut self,
        frame: &Arc<SourceFrame>,
        tx: TxMeta,
        snapshot: SnapshotMark,
    ) -> &TxFrame {
        if !self.tx_frame.is_for(frame, tx, snapshot) {
            self.tx_frame.refill(frame, tx, snapshot);
        }
        &self.tx_frame
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

    /// The envelope of `event` with rows `before` and `after`, snapshot
    /// mark `snapshot` and its `transaction` block if any, as JSON written
    /// into `v`: the bytes serializing [`Envelope`](crate::wire::Envelope)
    /// gives, written with the table's `source` texts escaped once (`frame`)
    /// instead of per change.
    fn envelope_bytes(
        &mut self,
        mut v: Vec<u8>,
        event: &ChangeEvent,
        rows: Rows<'_>,
        snapshot: SnapshotMark,
        transaction: Option<TxBlock<'_>>,
        frame: &Arc<SourceFrame>,
    ) -> Vec<u8> {
        let lsn = event.lsn.0;
        let row = |row: Option<&Row>, v: &mut Vec<u8>| match row {
            Some(row) => row.write_json(v),
            None => v.extend_from_slice(NULL),
        };
        v.extend_from_slice(b"{\"before\":");
        row(rows.0, &mut v);
        v.extend_from_slice(b",\"after\":");
        row(rows.1, &mut v);
        v.extend_from_slice(b",\"source\":");
        let source = self.tx_frame(frame, event.tx, snapshot);
        v.extend_from_slice(&source.open);
        number(lsn, &mut v);
        v.extend_from_slice(&source.middle);
        number(lsn, &mut v);
        v.extend_from_slice(&source.close);
        number(event.seq, &mut v);
        v.extend_from_slice(b"},\"transaction\":");
        match &transaction {
            Some(block) => to_json_bytes(block, &mut v),
            None => v.extend_from_slice(NULL),
        }
        v.extend_from_slice(b",\"op\":\"");
        v.extend_from_slice(event.op.code().as_bytes());
        v.extend_from_slice(&self.stamp);
        if !event.unchanged_toast.is_empty() {
            v.extend_from_slice(b",\"unchanged_toast\":");
            to_json_bytes(&event.unchanged_toast, &mut v);
        }
        v.push(b'}');
        v
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
        let converted = &self.names(&event.table).converted;
        if converted.is_empty() {
            return self.change(event, snapshot, transaction, out);
        }
        let converted = converted.clone();
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
        let names = self.names(&event.table).clone();
        let records = self.records_of(event);
        let (key, value) = match self.kafka.format {
            Format::Json => {
                let rows = (event.before.as_ref(), event.after.as_ref());
                let buf = self.buffer(event.row_bytes() + ENVELOPE_BYTES);
                let value =
                    self.envelope_bytes(buf, event, rows, snapshot, transaction, &names.frame);
                (self.key(event), Some(value))
            }
            Format::ConnectJson => self.connect_json(event, snapshot, transaction, &names),
            Format::Row if records == 0 => return,
            Format::Row => {
                let value = row_value(event, self.buffer(event.row_bytes()));
                (self.key(event), value)
            }
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
        &mut self,
        event: &ChangeEvent,
        snapshot: SnapshotMark,
        transaction: Option<TxBlock<'_>>,
        names: &Names,
    ) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
        let Some(schema) = &names.schema else {
            return (self.key(event), None);
        };
        let conform = |r: &Row| Row::Json(schema.conform(&r.to_map()));
        let before = event.before.as_ref().map(conform);
        let after = event.after.as_ref().map(conform);
        let rows = (before.as_ref(), after.as_ref());
        let payload =
            self.envelope_bytes(Vec::new(), event, rows, snapshot, transaction, &names.frame);
        let key = event.key.as_ref().map(|k| {
            let mut payload = Vec::new();
            to_json_bytes(&schema.conform(&k.to_map()), &mut payload);
            wrap(&schema.key, &payload)
        });
        (key, Some(wrap(&schema.value, &payload)))
    }

    /// What a snapshot row's envelope holds between its `after` object and
    /// its `source.seq` value, and after that value: cut from the envelope
    /// [`Self::event`] would write, so both encoders write the same bytes.
    fn row_frame(&mut self, table: &Arc<TableRef>, tx: TxMeta) -> (Vec<u8>, Vec<u8>) {
        let frame = self.names(table).frame.clone();
        let event = ChangeEvent {
            op: Op::Read,
            table: table.clone(),
            key: None,
            before: None,
            after: None,
            unchanged_toast: Vec::new(),
            lsn: tx.commit_lsn,
            seq: 0,
            tx,
            snapshot: true,
        };
        let text = self.envelope_bytes(
            Vec::new(),
            &event,
            (None, None),
            SnapshotMark::True,
            None,
            &frame,
        );
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
        let converted = self.names(&copied.table).converted.clone();
        if self.kafka.format != Format::Json || !converted.is_empty() {
            for mut event in copied_events(copied) {
                apply(&mut event, &converted);
                self.change(&event, SnapshotMark::True, None, out);
            }
            return;
        }
        let table = &copied.table;
        let tx = copied.tx;
        let (names, rules): (Vec<String>, Vec<Rule>) = copied.columns.iter().cloned().unzip();
        let after = Columns::new(names, &rules);
        let (key_columns, key) = after.select(&table.key_columns);
        let cell = |row, i| row_cell(row, i, copied.raw).map_or(Cell::Null, Cell::Text);
        let (middle, tail) = self.row_frame(table, tx);
        let names = self.names(table).clone();
        let commit_lsn = self.lsn(tx.commit_lsn);
        out.reserve(copied.rows.len());
        let mut seq = copied.first_seq;
        // Each buffer is sized by the record before it (rows of a table are
        // alike), so it seldom grows, and a huge row's size is not kept.
        let slack = |len: usize| len.min(RECYCLE_MAX) + ROW_ROOM;
        let mut room = (slack(0), slack(ROW_OPEN.len() + middle.len() + tail.len()));
        for row in &copied.rows {
            let mut k = Vec::with_capacity(room.0);
            key_columns.write_object(|n| cell(row, key[n]), &mut k);
            let mut v = Vec::with_capacity(room.1);
            v.extend_from_slice(ROW_OPEN);
            after.write_object(|i| cell(row, i), &mut v);
            v.extend_from_slice(&middle);
            to_json_bytes(&seq, &mut v);
            v.extend_from_slice(&tail);
            room = (slack(k.len()), slack(v.len()));
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
    use std::borrow::Cow;
    use std::sync::Arc;

    use proptest::prelude::*;
    use serde_json::{json, Map, Value};

    use super::*;
    use crate::event::{TableRef, TxMeta};
    use crate::lsn::Lsn;
    use crate::wire::{Envelope, Sequence, Source};

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
        let row = |v: Value| obj(v).map(Row::from);
        ChangeEvent {
            op,
            table: Arc::new(TableRef {
                schema: "public".into(),
                name: "users".into(),
                key_columns: vec!["id".into()],
                key_source: Default::default(),
                column_types: String::new(),
            }),
            key: row(json!({"id": 42})),
            before: row(json!({"id": 42, "name": "old"})),
            after: if op == Op::Delete {
                None
            } else {
                row(json!({"id": 42, "name": "new"}))
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
    fn records_written_into_recycled_buffers_are_the_records_fresh_ones_make() {
        let wide = |op: Op, n: usize| {
            let mut e = event(op);
            let row = json!({"id": 42, "name": "x".repeat(n)});
            e.after = (op != Op::Delete).then(|| row.as_object().cloned().unwrap().into());
            e
        };
        // A wide row, a narrow one after it, a delete with its tombstone,
        // and a row too wide to keep the buffer of, in each format.
        let events = [
            wide(Op::Create, 5000),
            wide(Op::Update, 1),
            wide(Op::Delete, 0),
            wide(Op::Create, RECYCLE_MAX + 1),
            wide(Op::Create, 3),
        ];
        for format in [Format::Json, Format::Row, Format::ConnectJson] {
            let kafka = KafkaConfig {
                format,
                ..KafkaConfig::default()
            };
            let mut recycling = Encoder::new(&kafka, "shop", 5);
            for e in &events {
                let (mut reused, mut fresh) = (Vec::new(), Vec::new());
                recycling.event(e, None, &mut reused);
                Encoder::new(&kafka, "shop", 5).event(e, None, &mut fresh);
                assert_eq!(reused, fresh, "{format:?} {:?}", e.op);
                for r in reused {
                    recycling.recycle(r);
                }
                assert!(recycling.spare.len() <= SPARE_MAX);
                let kept = recycling.spare.iter().map(Vec::capacity);
                assert!(kept.max().unwrap_or(0) <= RECYCLE_MAX, "{format:?}");
            }
        }
    }

    #[test]
    fn a_wide_row_is_written_into_a_buffer_reserved_for_it_once() {
        let mut e = event(Op::Create);
        let row = json!({"id": 42, "name": "x".repeat(8 << 20)});
        e.after = row.as_object().cloned().map(Row::from);
        let kafka = KafkaConfig::default();
        let mut encoder = Encoder::new(&kafka, "shop", 5);
        // Also after a narrow row's buffer was recycled.
        for _ in 0..2 {
            let mut out = Vec::new();
            encoder.event(&event(Op::Create), None, &mut out);
            out.drain(..).for_each(|r| encoder.recycle(r));
            encoder.event(&e, None, &mut out);
            let value = out.pop().and_then(|r| r.value).unwrap();
            // Grown step by step, it would have twice its length at last.
            assert!(value.len() > 8 << 20);
            assert!(value.capacity() - value.len() < ENVELOPE_BYTES);
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

    /// What serializing [`Envelope`] gives for `event`: the reference the
    /// hand-written envelope must match byte for byte.
    fn serialized(
        kafka: &KafkaConfig,
        db: &str,
        now_ms: i64,
        event: &ChangeEvent,
        snapshot: SnapshotMark,
        transaction: Option<TxBlock<'_>>,
    ) -> Vec<u8> {
        let tx = event.tx;
        let envelope = Envelope {
            before: event.before.as_ref(),
            after: event.after.as_ref(),
            source: Source {
                version: Cow::Borrowed(VERSION),
                connector: Cow::Borrowed(kafka.source_connector.name()),
                name: Cow::Borrowed(&kafka.topic_prefix),
                ts_ms: tx.commit_time_us.div_euclid(US_PER_MS),
                ts_us: tx.commit_time_us,
                ts_ns: tx.commit_time_us.saturating_mul(NS_PER_US),
                snapshot,
                db: Cow::Borrowed(db),
                sequence: Sequence {
                    commit_lsn: tx.commit_lsn.0,
                    lsn: event.lsn.0,
                },
                schema: Cow::Borrowed(&event.table.schema),
                table: Cow::Borrowed(&event.table.name),
                tx_id: tx.xid,
                lsn: event.lsn.0,
                xmin: None,
                commit_lsn: tx.commit_lsn.0,
                seq: event.seq,
            },
            transaction,
            op: Cow::Borrowed(event.op.code()),
            ts_ms: now_ms,
            ts_us: now_ms.saturating_mul(US_PER_MS),
            ts_ns: now_ms.saturating_mul(US_PER_MS * NS_PER_US),
            unchanged_toast: Cow::Borrowed(&event.unchanged_toast),
        };
        serde_json::to_vec(&envelope).unwrap()
    }

    proptest! {
        #[test]
        fn the_written_envelope_is_what_the_serializer_writes(
            names in proptest::array::uniform4("\\PC{0,6}|[\"\\\\\\x00-\\x1f]{0,3}"),
            numbers in (any::<i64>(), any::<u64>(), any::<u64>(), any::<u32>(), any::<u32>(), any::<i64>()),
            op in prop_oneof![Just(Op::Create), Just(Op::Update), Just(Op::Delete), Just(Op::Truncate)],
            snapshot in prop_oneof![Just(SnapshotMark::False), Just(SnapshotMark::Incremental), Just(SnapshotMark::True)],
            with_tx in any::<bool>(),
            toast in proptest::collection::vec("\\PC{0,4}", 0..3),
        ) {
            let [schema, table, prefix, db] = names;
            let (time, commit, lsn, xid, seq, now) = numbers;
            let kafka = KafkaConfig { topic_prefix: prefix, ..KafkaConfig::default() };
            let mut e = event(op);
            e.table = Arc::new(TableRef { schema, name: table, ..(*e.table).clone() });
            e.tx = TxMeta { xid, commit_lsn: Lsn(commit), commit_time_us: time };
            (e.lsn, e.seq, e.unchanged_toast) = (Lsn(lsn), seq, toast);
            let block = with_tx.then(|| TxBlock { id: "7:9".into(), total_order: 2, data_collection_order: 1 });
            let mut encoder = Encoder::new(&kafka, &db, now);
            let frame = encoder.names(&e.table).frame.clone();
            let rows = (e.before.as_ref(), e.after.as_ref());
            // A change of another transaction before: its texts must not stay.
            let mut other = e.clone();
            other.tx = TxMeta { xid: xid ^ 1, commit_lsn: Lsn(commit ^ 1), commit_time_us: time ^ 1 };
            encoder.envelope_bytes(Vec::new(), &other, rows, snapshot, None, &frame);
            let written =
                encoder.envelope_bytes(Vec::new(), &e, rows, snapshot, block.clone(), &frame);
            prop_assert_eq!(
                String::from_utf8(written).unwrap(),
                String::from_utf8(serialized(&kafka, &db, now, &e, snapshot, block)).unwrap()
            );
        }
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
        let map = |r: &Option<Row>| r.as_ref().map(|r| r.to_map().into_owned());
        assert_eq!(read.after, map(&e.after));
        assert_eq!(read.before, map(&e.before));
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
