//! Comparing one row with its mirror document: pure, no I/O.

use serde_json::{Map, Value};

use crate::es_writer::naming::{column, field};
use crate::lsn::Lsn;

/// The field the sink adds to every mirror document (not a column).
pub(crate) const CDC_FIELD: &str = "_cdc";

/// What a comparison found.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// The row is in the table, its document is not in the mirror.
    Missing,
    /// A document is in the mirror, its row is not in the table.
    Extra,
    /// Both exist and these columns differ.
    Stale,
    /// The document holds a change committed after the snapshot: not comparable, not drift.
    Newer,
    /// An apparent difference that could not be checked again: the
    /// pipeline did not apply the snapshot's position within the fence
    /// timeout. Neither drift nor equal.
    Unconfirmed,
}

/// The verdict on one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Row and document agree (or neither exists).
    Equal,
    /// They differ: how, and the columns that differ (stale only).
    Differs(Kind, Vec<String>),
}

/// Which committed transactions a REPEATABLE READ snapshot holds.
///
/// A WAL position alone cannot say: a transaction becomes visible only
/// after its commit record is written, so one still finishing (flushing,
/// or waiting for a synchronous standby) can have a commit record below a
/// position read after the snapshot, and be decoded and published, while
/// the snapshot does not see it. Its transaction id says it was running.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cut {
    /// The WAL insert position read just after the snapshot was taken:
    /// every transaction it holds committed (ended) at or below it.
    pub at: Lsn,
    /// The snapshot's `xmin` (`xid8`): every transaction below it ended.
    xmin: u64,
    /// The snapshot's `xmax` (`xid8`): no transaction from it on is held.
    xmax: u64,
    /// The transactions running when it was taken (`xid8`).
    running: std::collections::HashSet<u64>,
}

impl Cut {
    /// The cut of a snapshot whose `pg_current_snapshot()` reads `snapshot`
    /// (`xmin:xmax:xip,...`), with `at` read after it; `None` if unreadable.
    pub fn new(at: Lsn, snapshot: &str) -> Option<Self> {
        let mut parts = snapshot.split(':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let running = match parts.next()? {
            "" => Default::default(),
            list => list
                .split(',')
                .map(str::parse)
                .collect::<Result<_, _>>()
                .ok()?,
        };
        Some(Self {
            at,
            xmin,
            xmax,
            running,
        })
    }

    /// A cut that holds everything committed up to `at`, by position only.
    pub fn at(at: Lsn) -> Self {
        Self {
            at,
            xmin: u64::MAX,
            xmax: u64::MAX,
            running: Default::default(),
        }
    }

    /// Whether the snapshot holds a committed change with commit LSN `lsn`
    /// of transaction `xid` (32 bits, as the stream carries it; `None` or
    /// zero for a row copied from a snapshot, judged by position only).
    pub fn holds(&self, lsn: Lsn, xid: Option<u32>) -> bool {
        if lsn > self.at {
            return false;
        }
        match xid.filter(|x| *x != 0) {
            Some(x) => self.sees(x),
            None => true,
        }
    }

    /// Whether the snapshot sees the (committed) transaction `xid`.
    pub fn sees(&self, xid: u32) -> bool {
        let x = self.widen(xid);
        x < self.xmin || (x < self.xmax && !self.running.contains(&x))
    }

    /// The `xid8` of a 32-bit `xid` near the snapshot's `xmax` (within 2³¹).
    fn widen(&self, xid: u32) -> u64 {
        if self.xmax == u64::MAX {
            return 0;
        }
        let near = (self.xmax & !0xffff_ffff) | u64::from(xid);
        match near {
            n if n > self.xmax.saturating_add(1 << 31) => n.saturating_sub(1 << 32),
            n if n.saturating_add(1 << 31) < self.xmax => n + (1 << 32),
            n => n,
        }
    }
}

/// The commit LSN of the change a document holds (`_cdc.lsn`); zero if absent.
pub(crate) fn doc_lsn(doc: &Map<String, Value>) -> Lsn {
    let lsn = doc.get(CDC_FIELD).and_then(|c| c.get("lsn"));
    Lsn(lsn.and_then(Value::as_u64).unwrap_or(0))
}

/// The transaction id of the change a document holds (`_cdc.xid`).
fn doc_xid(doc: &Map<String, Value>) -> Option<u32> {
    let xid = doc.get(CDC_FIELD).and_then(|c| c.get("xid"))?;
    xid.as_u64().and_then(|x| u32::try_from(x).ok())
}

/// Compare the `row` of a table read in the snapshot `cut` (rendered as
/// events render it) with its mirror `doc`; either may be absent.
pub fn compare(
    row: Option<&Map<String, Value>>,
    doc: Option<&Map<String, Value>>,
    cut: &Cut,
) -> Verdict {
    let doc = match doc {
        None if row.is_none() => return Verdict::Equal,
        None => return Verdict::Differs(Kind::Missing, Vec::new()),
        Some(d) if !cut.holds(doc_lsn(d), doc_xid(d)) => {
            return Verdict::Differs(Kind::Newer, Vec::new())
        }
        Some(d) => d,
    };
    let Some(row) = row else {
        return Verdict::Differs(Kind::Extra, Vec::new());
    };
    // A field the document lacks holds NULL: a nullable column added
    // after it was written is mapped, not written into older documents.
    let mut columns: Vec<String> = row
        .iter()
        .filter(|(c, v)| match doc.get(field(c).as_ref()) {
            Some(d) => d != *v,
            None => !v.is_null(),
        })
        .map(|(c, _)| c.clone())
        .collect();
    columns.extend(
        doc.keys()
            .filter(|f| column(f).is_some_and(|c| !row.contains_key(c)))
            .cloned(),
    );
    match columns.is_empty() {
        true => Verdict::Equal,
        false => Verdict::Differs(Kind::Stale, columns),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn equal_rows_ignore_the_cdc_field() {
        let row = map(json!({"id": 1, "n": "a"}));
        let doc = map(json!({"id": 1, "n": "a", "_cdc": {"lsn": 10, "seq": 0}}));
        assert_eq!(
            compare(Some(&row), Some(&doc), &Cut::at(Lsn(10))),
            Verdict::Equal
        );
        assert_eq!(compare(None, None, &Cut::at(Lsn(10))), Verdict::Equal);
    }

    #[test]
    fn differences_are_classified_and_name_the_columns() {
        let row = map(json!({"id": 1, "n": "a", "m": 2}));
        let doc = map(json!({"id": 1, "n": "b", "old": 1, "_cdc": {"lsn": 5}}));
        assert_eq!(
            compare(Some(&row), Some(&doc), &Cut::at(Lsn(10))),
            Verdict::Differs(Kind::Stale, vec!["m".into(), "n".into(), "old".into()])
        );
        assert_eq!(
            compare(Some(&row), None, &Cut::at(Lsn(10))),
            Verdict::Differs(Kind::Missing, vec![])
        );
        assert_eq!(
            compare(None, Some(&doc), &Cut::at(Lsn(10))),
            Verdict::Differs(Kind::Extra, vec![])
        );
    }

    #[test]
    fn a_field_the_document_lacks_equals_a_null_column_only() {
        let row = map(json!({"id": 1, "added": null, "n": "a"}));
        let doc = map(json!({"id": 1, "n": "a", "_cdc": {"lsn": 10}}));
        assert_eq!(
            compare(Some(&row), Some(&doc), &Cut::at(Lsn(10))),
            Verdict::Equal
        );
        let row = map(json!({"id": 1, "added": 0, "n": "a"}));
        assert_eq!(
            compare(Some(&row), Some(&doc), &Cut::at(Lsn(10))),
            Verdict::Differs(Kind::Stale, vec!["added".into()])
        );
    }

    #[test]
    fn reserved_columns_are_compared_with_their_shifted_fields() {
        let row = map(json!({"_id": "m1", "_cdc": "user data", "n": "a"}));
        let doc = map(json!({"_id_": "m1", "_cdc_": "user data", "n": "a", "_cdc": {"lsn": 10}}));
        assert_eq!(
            compare(Some(&row), Some(&doc), &Cut::at(Lsn(10))),
            Verdict::Equal
        );
        let stale = map(json!({"_id_": "m1", "n": "a", "_cdc": {"lsn": 10}}));
        assert_eq!(
            compare(Some(&row), Some(&stale), &Cut::at(Lsn(10))),
            Verdict::Differs(Kind::Stale, vec!["_cdc".into()])
        );
    }

    #[test]
    fn a_document_newer_than_the_snapshot_is_not_compared() {
        let row = map(json!({"id": 1, "n": "a"}));
        let doc = map(json!({"id": 1, "n": "z", "_cdc": {"lsn": 11}}));
        assert_eq!(
            compare(Some(&row), Some(&doc), &Cut::at(Lsn(10))),
            Verdict::Differs(Kind::Newer, vec![])
        );
        assert_eq!(
            compare(None, Some(&doc), &Cut::at(Lsn(10))),
            Verdict::Differs(Kind::Newer, vec![])
        );
    }
}
