//! TRUNCATE with any number of partitions and sink processes.
//!
//! A truncate record has no key, so it lands on any partition, and records
//! of the same table written before it may still wait on other partitions,
//! or in another sink process. Applied naively, those older records would
//! bring truncated rows back for good. So each truncate sets a *floor* for
//! its mirror index, the position `(commit LSN, seq)` of the truncate:
//!
//! 1. The floor is stored first, in the index `<index_prefix>_truncations`
//!    (one document per mirror index, written with the floor's LSN as an
//!    external version, so a floor only rises) where every sink and every
//!    replay finds it; then the mirror is refreshed and every document
//!    below the floor deleted by query.
//! 2. Each sink keeps the floors it knows and drops actions below them.
//! 3. After each batch the sink reads the floors of the indices it wrote
//!    again. If one rose meanwhile (another sink, or a truncate in the same
//!    batch on another lane), every document this batch left below it is
//!    deleted with a versioned delete at the version it wrote, so a newer
//!    write is never removed.
//!
//! Between 1 and 3, any order of the two sides' steps ends with the old rows
//! gone: a write that landed before the delete by query is deleted by it, a
//! write that landed after sees the stored floor in its sink's step 3.

use std::collections::HashMap;

use serde_json::{json, Value};

use super::bulk::Action;

/// The position of a change: commit LSN, then position in its transaction.
pub type Position = (u64, u32);

/// Name of the index holding the floors. A mirror name is
/// `<prefix><schema>_<table>` with a non-empty schema, so it never equals this.
pub fn floors_index(prefix: &str) -> String {
    format!("{prefix}_truncations")
}

/// The floors a sink knows, by mirror index.
#[derive(Debug, Default)]
pub struct Floors {
    known: HashMap<String, Position>,
}

impl Floors {
    /// Whether a write at `at` to `index` is older than the index's last truncate.
    pub fn below(&self, index: &str, at: Position) -> bool {
        self.known.get(index).is_some_and(|floor| at < *floor)
    }

    /// Learn `floor` for `index`; whether it rose.
    pub fn learn(&mut self, index: &str, floor: Position) -> bool {
        let known = self.known.entry(index.to_owned()).or_insert((0, 0));
        let rose = floor > *known;
        *known = (*known).max(floor);
        rose
    }
}

/// The floor document of a truncate at `at`.
pub fn floor_doc(index: &str, at: Position) -> Value {
    json!({"index": index, "lsn": at.0, "seq": at.1})
}

/// The floors in an `_mget` response of floor documents.
pub fn floors_of(resp: &Value) -> Vec<(String, Position)> {
    let docs = resp["docs"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    docs.iter()
        .filter(|d| d["found"].as_bool() == Some(true))
        .filter_map(|d| {
            let s = &d["_source"];
            let index = s["index"].as_str()?.to_owned();
            let seq = u32::try_from(s["seq"].as_u64()?).ok()?;
            Some((index, (s["lsn"].as_u64()?, seq)))
        })
        .collect()
}

/// The delete-by-query body for documents below `at`.
pub fn below_query(at: Position) -> Value {
    json!({"query": {"bool": {"should": [
        {"range": {"_cdc.lsn": {"lt": at.0}}},
        {"bool": {"filter": [
            {"term": {"_cdc.lsn": at.0}},
            {"range": {"_cdc.seq": {"lt": at.1}}}
        ]}}
    ], "minimum_should_match": 1}}})
}

/// A mirror write a batch sent, as the sweep needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct Written {
    index: String,
    id: String,
    at: Position,
    delete: bool,
    origin: usize,
}

impl Written {
    /// What `a` wrote; `None` for history entries.
    pub fn of(a: &Action) -> Option<Written> {
        (!a.history).then(|| Written {
            index: a.index.clone(),
            id: a.id.clone(),
            at: a.at,
            delete: a.is_delete(),
            origin: a.origin,
        })
    }

    /// The mirror index written.
    pub fn index(&self) -> &str {
        &self.index
    }
}

/// Versioned deletes of the documents `written` (a batch's mirror writes,
/// in order) last left below a floor of one of the `rose` indices.
pub fn sweep(written: &[Written], floors: &Floors, rose: &[String]) -> Vec<Action> {
    let mut last: HashMap<(&str, &str), &Written> = HashMap::new();
    for w in written.iter().filter(|w| rose.contains(&w.index)) {
        last.insert((&w.index, &w.id), w);
    }
    let mut sweep: Vec<Action> = last
        .into_values()
        .filter(|w| !w.delete && floors.below(&w.index, w.at))
        .map(|w| Action::versioned_delete(&w.index, &w.id, w.at, w.origin))
        .collect();
    sweep.sort_by_key(|a| a.origin);
    sweep
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floors_only_rise_and_compare_by_lsn_then_seq() {
        let mut f = Floors::default();
        assert!(!f.below("i", (1, 0)), "no floor, nothing is below");
        assert!(f.learn("i", (100, 5)));
        assert!(!f.learn("i", (90, 0)), "a lower floor is ignored");
        assert!(f.below("i", (99, 9)) && f.below("i", (100, 4)));
        assert!(!f.below("i", (100, 5)) && !f.below("i", (100, 6)) && !f.below("i", (101, 0)));
        assert!(!f.below("other", (1, 0)));
    }

    #[test]
    fn the_sweep_deletes_only_documents_last_written_below_a_risen_floor() {
        let w = |index: &str, id: &str, lsn: u64, delete: bool, origin: usize| Written {
            index: index.into(),
            id: id.into(),
            at: (lsn, 0),
            delete,
            origin,
        };
        let written = [
            w("i", "1", 10, false, 0),
            w("i", "2", 10, false, 1),
            w("i", "2", 30, false, 2),
            w("i", "3", 11, true, 3),
            w("j", "1", 10, false, 4),
        ];
        let mut floors = Floors::default();
        floors.learn("i", (20, 0));
        floors.learn("j", (20, 0));
        let sweep = sweep(&written, &floors, &["i".to_owned()]);
        let ids: Vec<(&str, &str)> = sweep
            .iter()
            .map(|a| (a.index.as_str(), a.id.as_str()))
            .collect();
        assert_eq!(
            ids,
            [("i", "1")],
            "2 was rewritten above the floor, 3 is a delete, j did not rise"
        );
        assert!(sweep[0].meta.contains("\"version\":10") && sweep[0].is_delete());
    }

    #[test]
    fn floor_documents_read_back() {
        let resp = json!({"docs": [
            {"_id": "a", "found": true, "_source": floor_doc("a", (7, 2))},
            {"_id": "b", "found": false}
        ]});
        assert_eq!(floors_of(&resp), vec![("a".to_owned(), (7, 2))]);
        assert!(floors_of(&json!({"error": "x"})).is_empty());
    }
}
