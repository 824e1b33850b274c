//! Folding a change topic to the last change of each key, and judging it
//! against the table: pure, no I/O. A key keeps its document id, the
//! commit LSN and transaction id of its last change and a hash of that
//! change's row, never the row itself.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use serde_json::{Map, Value};

use super::compare::{Cut, Kind};
use crate::es_writer::naming::doc_id;
use crate::kafka_producer::Format;
use crate::lsn::Lsn;

/// A key's last change in the topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Last {
    /// Its commit LSN.
    pub lsn: Lsn,
    /// Its transaction id (`source.txId`; `None` in the row format, zero
    /// for a row copied from a snapshot).
    pub xid: Option<u32>,
    /// The hash of its row ([`row_hash`]); `None`: deleted.
    pub row: Option<u64>,
    /// Columns the change left out (unchanged TOAST values), not hashed.
    pub omitted: Vec<String>,
}

/// What one record says.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Change {
    /// The key `id` has this row (or, `None`, is deleted) as of `lsn`.
    Key {
        /// The document id of the key.
        id: String,
        /// Its last change.
        last: Last,
    },
    /// The table was truncated by this transaction (commit LSN, id).
    Truncate(Lsn, Option<u32>),
    /// Nothing for the fold (a tombstone after a delete, another table's record).
    Skip,
}

/// One table's topic, folded.
#[derive(Debug, Default)]
pub(crate) struct Folded {
    /// The last change per document id.
    pub keys: HashMap<String, Last>,
    /// The last truncate's commit LSN (zero: none) and transaction id.
    pub truncated: (Lsn, Option<u32>),
    /// Records read.
    pub records: u64,
}

impl Folded {
    /// Fold one change in (records arrive in offset order; a key's changes
    /// in commit order, so a later record wins).
    pub fn add(&mut self, change: Change) {
        self.records += 1;
        match change {
            Change::Key { id, last } => {
                self.keys.insert(id, last);
            }
            Change::Truncate(lsn, xid) => {
                if lsn >= self.truncated.0 {
                    self.truncated = (lsn, xid);
                }
            }
            Change::Skip => {}
        }
    }

    /// The key's last change, a truncate after it counting as its delete.
    pub fn take(&mut self, id: &str) -> Option<Last> {
        let last = self.keys.remove(id);
        self.effective(last)
    }

    /// `last` with a later truncate applied; a truncate alone for an unknown key.
    pub fn effective(&self, last: Option<Last>) -> Option<Last> {
        let (lsn, xid) = self.truncated;
        let deleted = Last {
            lsn,
            xid,
            row: None,
            omitted: Vec::new(),
        };
        match last {
            Some(l) if l.lsn >= lsn => Some(l),
            _ if lsn > Lsn::ZERO => Some(deleted),
            None => None,
            Some(l) => Some(l),
        }
    }
}

/// What a record of `format` with headers `table`, `op`, `commit_lsn`
/// says about table `want` (`schema.table`).
pub(crate) fn read_record(
    format: Format,
    want: &str,
    headers: (&str, &str, &str),
    key: Option<&[u8]>,
    value: Option<&[u8]>,
) -> Change {
    let (table, op, lsn) = headers;
    let Ok(lsn) = lsn.parse::<Lsn>() else {
        return Change::Skip;
    };
    if table != want {
        return Change::Skip;
    }
    let value = value.and_then(|v| serde_json::from_slice::<Value>(v).ok());
    let xid = value.as_ref().and_then(|v| tx_id(format, v));
    if op == "t" {
        return Change::Truncate(lsn, xid);
    }
    let Some(id) = key.and_then(|k| key_id(format, k)) else {
        return Change::Skip;
    };
    let row = match (op, value) {
        ("d", _) => None,
        (_, None) => return Change::Skip,
        (_, Some(v)) => match after_of_value(format, v) {
            Some(after) => Some(after),
            None => return Change::Skip,
        },
    };
    let (row, omitted) = match row {
        Some((after, omitted)) => (Some(row_hash(&after, &omitted)), omitted),
        None => (None, Vec::new()),
    };
    Change::Key {
        id,
        last: Last {
            lsn,
            xid,
            row,
            omitted,
        },
    }
}

/// `source.txId` of a record value of `format` (the row format has none).
fn tx_id(format: Format, value: &Value) -> Option<u32> {
    let envelope = match format {
        Format::Row => return None,
        Format::Json => value,
        Format::ConnectJson => value.get("payload")?,
    };
    let xid = envelope.get("source")?.get("txId")?.as_u64()?;
    u32::try_from(xid).ok()
}

/// The document id of a record key of `format`.
fn key_id(format: Format, key: &[u8]) -> Option<String> {
    let key: Value = serde_json::from_slice(key).ok()?;
    let key = match (format, key) {
        (Format::ConnectJson, Value::Object(mut k)) => k.remove("payload")?,
        (_, k) => k,
    };
    match key {
        Value::Object(k) if !k.is_empty() => Some(doc_id(&k)),
        _ => None,
    }
}

/// The row a record value of `format` carries and the columns it leaves
/// out (unchanged TOAST values); `None` without a row.
pub(crate) fn after_of(format: Format, value: &[u8]) -> Option<(Map<String, Value>, Vec<String>)> {
    after_of_value(format, serde_json::from_slice(value).ok()?)
}

/// [`after_of`] of a parsed value.
fn after_of_value(format: Format, value: Value) -> Option<(Map<String, Value>, Vec<String>)> {
    let mut envelope = match (format, value) {
        (Format::Row, Value::Object(row)) => return Some((row, Vec::new())),
        (Format::Json, Value::Object(e)) => e,
        (Format::ConnectJson, Value::Object(mut v)) => match v.remove("payload")? {
            Value::Object(e) => e,
            _ => return None,
        },
        _ => return None,
    };
    let omitted = match envelope.remove("unchanged_toast") {
        Some(Value::Array(cols)) => cols
            .into_iter()
            .filter_map(|c| c.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    };
    match envelope.remove("after")? {
        Value::Object(after) => Some((after, omitted)),
        _ => None,
    }
}

/// A hash of `row` without the `omitted` columns, independent of column
/// order. NULLs are left out: a record written before a nullable column was
/// added lacks it, and holds what the row holds.
pub(crate) fn row_hash(row: &Map<String, Value>, omitted: &[String]) -> u64 {
    let mut columns: Vec<(&String, &Value)> = row
        .iter()
        .filter(|(c, v)| !omitted.contains(c) && !v.is_null())
        .collect();
    columns.sort_by(|a, b| a.0.cmp(b.0));
    let mut h = DefaultHasher::new();
    for (c, v) in columns {
        c.hash(&mut h);
        v.to_string().hash(&mut h);
    }
    h.finish()
}

/// How the table's `row` (as the producer would write it now, `None`: no
/// row) compares with the key's `last` change, for the snapshot `cut`;
/// `None`: they agree.
pub(crate) fn judge(
    row: Option<&Map<String, Value>>,
    last: Option<&Last>,
    cut: &Cut,
) -> Option<Kind> {
    match (row, last) {
        (_, Some(l)) if !cut.holds(l.lsn, l.xid) => Some(Kind::Newer),
        (None, None) => None,
        (None, Some(l)) => l.row.map(|_| Kind::Extra),
        (Some(_), None) => Some(Kind::Missing),
        (Some(_), Some(Last { row: None, .. })) => Some(Kind::Missing),
        (Some(r), Some(l)) => (l.row != Some(row_hash(r, &l.omitted))).then_some(Kind::Stale),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const T: &str = "public.items";

    fn bytes(v: Value) -> Vec<u8> {
        v.to_string().into_bytes()
    }

    fn read(format: Format, op: &str, lsn: &str, key: Value, value: Option<Value>) -> Change {
        let value = value.map(bytes);
        read_record(format, T, (T, op, lsn), Some(&bytes(key)), value.as_deref())
    }

    #[test]
    fn the_three_formats_fold_to_the_same_row() {
        let row = json!({"id": 1, "n": "a"});
        let env = json!({"before": null, "after": row, "op": "c", "source": {}});
        let json = read(
            Format::Json,
            "c",
            "0/10",
            json!({"id": 1}),
            Some(env.clone()),
        );
        let connect = read(
            Format::ConnectJson,
            "c",
            "0/10",
            json!({"schema": {}, "payload": {"id": 1}}),
            Some(json!({"schema": {}, "payload": env})),
        );
        let plain = read(
            Format::Row,
            "c",
            "0/10",
            json!({"id": 1}),
            Some(row.clone()),
        );
        assert_eq!(json, connect);
        assert_eq!(json, plain);
        let Change::Key { id, last } = json else {
            panic!("a key change")
        };
        assert_eq!(id, "1");
        let table_row = row.as_object().cloned().unwrap_or_default();
        assert_eq!(
            judge(Some(&table_row), Some(&last), &Cut::at(Lsn(0x10))),
            None
        );
    }

    #[test]
    fn deletes_tombstones_and_truncates_fold() {
        let mut f = Folded::default();
        let row = Some(json!({"after": {"id": 1}}));
        f.add(read(
            Format::Json,
            "c",
            "0/10",
            json!({"id": 1}),
            row.clone(),
        ));
        f.add(read(Format::Json, "c", "0/11", json!({"id": 2}), row));
        f.add(read(
            Format::Json,
            "d",
            "0/20",
            json!({"id": 1}),
            Some(json!({})),
        ));
        f.add(read(Format::Json, "", "0/20", json!({"id": 1}), None));
        f.add(read(Format::Row, "d", "0/21", json!({"id": 3}), None));
        assert_eq!(f.records, 5);
        assert_eq!(f.keys["1"].row, None, "deleted; the tombstone is skipped");
        assert_eq!(
            f.keys["3"].row, None,
            "a row-format tombstone is the delete"
        );
        f.add(read_record(Format::Json, T, (T, "t", "0/30"), None, None));
        assert_eq!(f.take("2").map(|l| (l.lsn, l.row)), Some((Lsn(0x30), None)));
        let truncate = json!({"op": "t", "source": {"txId": 9}});
        f.add(read(Format::Json, "t", "0/40", json!(null), Some(truncate)));
        assert_eq!(
            f.take("2").map(|l| (l.lsn, l.xid)),
            Some((Lsn(0x40), Some(9)))
        );
        let other = read_record(Format::Json, T, ("public.other", "c", "0/1"), None, None);
        assert_eq!(other, Change::Skip);
    }

    #[test]
    fn the_last_change_is_judged_against_the_row() {
        let row = json!({"id": 1, "n": "a", "big": "x"})
            .as_object()
            .cloned()
            .unwrap_or_default();
        let same = Last {
            lsn: Lsn(5),
            xid: Some(7),
            row: Some(row_hash(&row, &[])),
            omitted: vec![],
        };
        assert_eq!(judge(Some(&row), Some(&same), &Cut::at(Lsn(10))), None);
        assert_eq!(
            judge(Some(&row), Some(&same), &Cut::at(Lsn(4))),
            Some(Kind::Newer)
        );
        assert_eq!(
            judge(None, Some(&same), &Cut::at(Lsn(10))),
            Some(Kind::Extra)
        );
        assert_eq!(
            judge(Some(&row), None, &Cut::at(Lsn(10))),
            Some(Kind::Missing)
        );
        let gone = Last {
            row: None,
            ..same.clone()
        };
        assert_eq!(
            judge(Some(&row), Some(&gone), &Cut::at(Lsn(10))),
            Some(Kind::Missing)
        );
        assert_eq!(judge(None, Some(&gone), &Cut::at(Lsn(10))), None);
        let mut other = row.clone();
        other.insert("n".into(), json!("b"));
        assert_eq!(
            judge(Some(&other), Some(&same), &Cut::at(Lsn(10))),
            Some(Kind::Stale)
        );
        let mut added = row.clone();
        added.insert("added".into(), Value::Null);
        assert_eq!(
            judge(Some(&added), Some(&same), &Cut::at(Lsn(10))),
            None,
            "a nullable column added after the record"
        );
        added.insert("added".into(), json!(0));
        assert_eq!(
            judge(Some(&added), Some(&same), &Cut::at(Lsn(10))),
            Some(Kind::Stale)
        );
        let toast = Last {
            row: Some(row_hash(&row, &["big".into()])),
            omitted: vec!["big".into()],
            ..same
        };
        let mut changed_big = row.clone();
        changed_big.insert("big".into(), json!("y"));
        assert_eq!(
            judge(Some(&changed_big), Some(&toast), &Cut::at(Lsn(10))),
            None,
            "omitted columns are not compared"
        );
    }

    #[test]
    fn a_change_of_a_transaction_the_snapshot_does_not_see_is_newer() {
        let env = |xid: u32| json!({"after": {"id": 1, "n": "b"}, "source": {"txId": xid}});
        let change = |xid| read(Format::Json, "u", "0/10", json!({"id": 1}), Some(env(xid)));
        let (Change::Key { last: running, .. }, Change::Key { last: seen, .. }) =
            (change(102), change(101))
        else {
            panic!("key changes")
        };
        assert_eq!(running.xid, Some(102));
        // Both committed below the snapshot's position; 102 was still finishing.
        let cut = Cut::new(Lsn(0x20), "100:103:102").unwrap();
        let row = json!({"id": 1, "n": "a"})
            .as_object()
            .cloned()
            .unwrap_or_default();
        assert_eq!(judge(Some(&row), Some(&running), &cut), Some(Kind::Newer));
        assert_eq!(judge(Some(&row), Some(&seen), &cut), Some(Kind::Stale));
    }
}
