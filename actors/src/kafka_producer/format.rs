//! The record formats besides the `json` envelope's bytes (`kafka.format`):
//! the `row` format's value, keys, and copied rows as changes for the
//! formats the byte-level snapshot encoder does not write.

use crate::event::{ChangeEvent, CopiedRows, Row};
use crate::snapshot::read_event;

/// A change's `before` and `after` rows.
pub(super) type Rows<'r> = (Option<&'r Row>, Option<&'r Row>);

/// The `row` format's value, written into `buf`: the new row; `None` (a
/// tombstone) for a delete.
pub(super) fn row_value(event: &ChangeEvent, mut buf: Vec<u8>) -> Option<Vec<u8>> {
    event.after.as_ref()?.write_json(&mut buf);
    Some(buf)
}

/// Copied rows as `op=r` changes, for the formats the byte-level snapshot
/// encoder does not write.
pub(super) fn copied_events(copied: &CopiedRows) -> impl Iterator<Item = ChangeEvent> + '_ {
    copied.rows.iter().enumerate().map(|(n, row)| {
        let seq = copied.first_seq.wrapping_add(n as u32);
        let (tx, lsn) = (copied.tx, copied.tx.commit_lsn);
        read_event(
            &copied.table,
            &copied.columns,
            copied.raw,
            row,
            tx,
            lsn,
            seq,
        )
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::DecimalMode;

    use serde_json::{json, Map, Value};

    use crate::event::Op;

    use super::super::envelope::tests::event;
    use super::super::{Encoder, Format, KafkaConfig};
    use super::*;
    use crate::wire::Envelope;

    #[test]
    fn row_format_writes_the_new_row_a_tombstone_for_a_delete_and_nothing_for_a_truncate() {
        let kafka = KafkaConfig {
            format: Format::Row,
            ..KafkaConfig::default()
        };
        let encode = |op: Op| {
            let mut out = Vec::new();
            let mut enc = Encoder::new(&kafka, "shop", 5);
            let e = event(op);
            enc.event(&e, None, &mut out);
            assert_eq!(enc.records_of(&e), out.len(), "{op:?}");
            out
        };
        let update = encode(Op::Update);
        assert_eq!(
            update[0].value.as_deref(),
            Some(br#"{"id":42,"name":"new"}"#.as_slice())
        );
        assert_eq!(update[0].key.as_deref(), Some(br#"{"id":42}"#.as_slice()));
        let delete = encode(Op::Delete);
        assert_eq!(
            (delete.len(), delete[0].value.is_none(), delete[0].op),
            (1, true, "d")
        );
        assert!(encode(Op::Truncate).is_empty());
    }

    #[test]
    fn connect_json_wraps_key_and_envelope_in_schema_and_payload() {
        let kafka = KafkaConfig {
            format: Format::ConnectJson,
            ..KafkaConfig::default()
        };
        let mut e = event(Op::Update);
        Arc::make_mut(&mut e.table).column_types = r#"{"id":"int4","name":"text"}"#.into();
        let mut out = Vec::new();
        Encoder::new(&kafka, "shop", 5).event(&e, None, &mut out);
        let key: Value = serde_json::from_slice(out[0].key.as_ref().unwrap()).unwrap();
        assert_eq!(key["payload"], json!({"id": 42}));
        assert_eq!(key["schema"]["name"], "pgcdc.public.users.Key");
        let value: Value = serde_json::from_slice(out[0].value.as_ref().unwrap()).unwrap();
        assert_eq!(value["schema"]["name"], "pgcdc.public.users.Envelope");
        let payload: Envelope<'_, Map<String, Value>> =
            serde_json::from_value(value["payload"].clone()).unwrap();
        assert_eq!(
            payload.after.as_ref(),
            e.after.as_ref().map(|r| r.to_map()).as_deref()
        );
        assert_eq!(payload.source.commit_lsn, 0x1_0000_0200);
    }

    #[test]
    fn decimals_become_doubles_in_double_mode_and_stay_exact_strings_by_default() {
        let mut e = event(Op::Update);
        let table = Arc::make_mut(&mut e.table);
        table.column_types = r#"{"id":"int4","name":"numeric"}"#.into();
        e.after = json!({"id": 42, "name": "12.50"})
            .as_object()
            .cloned()
            .map(Row::from);
        e.before = json!({"id": 42, "name": "NaN"})
            .as_object()
            .cloned()
            .map(Row::from);
        let encode = |mode: DecimalMode| {
            let kafka = KafkaConfig {
                decimal_handling_mode: mode,
                ..KafkaConfig::default()
            };
            let mut out = Vec::new();
            Encoder::new(&kafka, "shop", 5).event(&e, None, &mut out);
            let v: Value = serde_json::from_slice(out[0].value.as_ref().unwrap()).unwrap();
            (v["after"]["name"].clone(), v["before"]["name"].clone())
        };
        assert_eq!(encode(DecimalMode::String), (json!("12.50"), json!("NaN")));
        assert_eq!(encode(DecimalMode::Double), (json!(12.5), json!("NaN")));
    }
}
