//! Unchanged TOAST columns, merged by a versioned write.
//!
//! An update that leaves a TOASTed column unchanged does not carry its value
//! (unless REPLICA IDENTITY FULL). Before such a write is sent, the sink takes
//! the value from the document as it stands at that point: from the last
//! write to the same document earlier in the batch, else from the stored
//! document (`_mget`). The merged document is then written like every other,
//! versioned by commit LSN, so:
//! - a stored document holding this change or a later one (by `_cdc` commit
//!   LSN and seq, so also within one transaction) makes the merge
//!   superseded: it is dropped, nothing regresses;
//! - a document deleted since (its version kept for `gc_deletes`) refuses
//!   the write with 409: a replay never brings a deleted row back;
//! - a document that does not exist yet (its creation was before the
//!   topic's retention, or on a key that changed), or that lacks a column,
//!   leaves the columns missing: the action is marked `lacking`, and they
//!   are read from PostgreSQL before the write ([`toast`](super::toast)).

use std::collections::{HashMap, HashSet};

use serde_json::{Map, Value};

use super::bulk::{Action, Merge};
use super::truncate::Position;

/// A document: its index and id.
pub type DocRef = (String, String);
/// A stored document: its version and source.
pub type Stored = (u64, Map<String, Value>);

/// The documents to read before `actions` can be sent: those merges need
/// whose document no earlier action of the batch writes.
pub fn to_fetch(actions: &[Action]) -> Vec<DocRef> {
    let mut written: HashSet<(&str, &str)> = HashSet::new();
    let mut fetch = Vec::new();
    for a in actions.iter().filter(|a| !a.history) {
        let key = (a.index.as_str(), a.id.as_str());
        if a.merge.is_some() && !written.contains(&key) {
            fetch.push((a.index.clone(), a.id.clone()));
        }
        written.insert(key);
    }
    fetch.sort();
    fetch.dedup();
    fetch
}

/// What became of the merges.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Resolved {
    /// Dropped: the stored document is newer.
    pub superseded: usize,
    /// Left lacking some unchanged columns: no document held them.
    pub lacking: usize,
}

/// The position of the change a stored document holds: its `_cdc` (commit
/// LSN, seq), else its version.
fn position((version, source): &Stored) -> Position {
    let cdc = &source.get("_cdc");
    let lsn = cdc.and_then(|c| c["lsn"].as_u64()).unwrap_or(*version);
    let seq = cdc.and_then(|c| c["seq"].as_u64()).unwrap_or(0);
    (lsn, u32::try_from(seq).unwrap_or(u32::MAX))
}

/// Fill every merge in `actions` (in order) from the batch or from `stored`.
pub fn resolve(actions: &mut Vec<Action>, stored: &HashMap<DocRef, Stored>) -> Resolved {
    let needed: HashSet<DocRef> = actions
        .iter()
        .filter(|a| a.merge.is_some())
        .map(|a| (a.index.clone(), a.id.clone()))
        .collect();
    let mut latest: HashMap<DocRef, Option<Map<String, Value>>> = HashMap::new();
    let mut out = Resolved::default();
    actions.retain_mut(|a| {
        if a.history {
            return true;
        }
        let key = (a.index.clone(), a.id.clone());
        if !needed.contains(&key) {
            return true;
        }
        if let Some(merge) = a.merge.take() {
            let from = match latest.get(&key) {
                Some(earlier) => earlier.clone(),
                None => match stored.get(&key) {
                    Some(doc) if position(doc) >= a.at => {
                        out.superseded += 1;
                        return false;
                    }
                    Some((_, source)) => Some(source.clone()),
                    None => None,
                },
            };
            let Merge {
                columns,
                mut doc,
                table,
                key: row_key,
            } = *merge;
            let mut missing = Vec::new();
            for c in columns {
                match from.as_ref().and_then(|source| source.get(&c)) {
                    Some(v) => {
                        doc.insert(c, v.clone());
                    }
                    None => missing.push(c),
                }
            }
            a.doc = Some(Value::Object(doc.clone()).to_string());
            if !missing.is_empty() {
                out.lacking += 1;
                a.lacking = Some(Box::new(Merge {
                    columns: missing,
                    doc: doc.clone(),
                    table,
                    key: row_key,
                }));
            }
            latest.insert(key, Some(doc));
        } else {
            latest.insert(key, a.source());
        }
        true
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::es_writer::bulk::{plan, Planned};
    use crate::es_writer::EsConfig;
    use serde_json::json;

    fn action(id: i64, lsn: u64, op: &str, row: Value, toast: &[&str]) -> Action {
        let env = json!({"op": op, "before": null, "after": row, "unchanged_toast": toast,
            "source": {"schema": "public", "table": "t", "commit_lsn": lsn, "seq": 0, "ts_ms": 1}});
        let key = json!({ "id": id }).to_string();
        match plan(
            &EsConfig::default(),
            Some(key.as_bytes()),
            Some(env.to_string().as_bytes()),
            0,
        ) {
            Planned::Actions(mut a) => a.remove(0),
            other => panic!("{other:?}"),
        }
    }

    fn doc(a: &Action) -> Value {
        serde_json::from_str(a.doc.as_deref().unwrap()).unwrap()
    }

    #[test]
    fn a_merge_takes_the_column_from_an_earlier_write_in_the_batch() {
        let mut actions = vec![
            action(1, 10, "c", json!({"id": 1, "blob": "big", "n": 1}), &[]),
            action(1, 20, "u", json!({"id": 1, "n": 2}), &["blob"]),
        ];
        assert!(to_fetch(&actions).is_empty());
        let r = resolve(&mut actions, &HashMap::new());
        assert_eq!(r, Resolved::default());
        assert_eq!(doc(&actions[1])["blob"], json!("big"));
        assert_eq!(doc(&actions[1])["n"], json!(2));
    }

    #[test]
    fn a_merge_takes_the_column_from_the_stored_document_unless_that_is_newer() {
        let key = ("cdc_public_t".to_owned(), "1".to_owned());
        let mut actions = vec![action(1, 20, "u", json!({"id": 1, "n": 2}), &["blob"])];
        assert_eq!(to_fetch(&actions), vec![key.clone()]);
        let stored_doc = json!({"id": 1, "blob": "big", "n": 1})
            .as_object()
            .cloned()
            .unwrap();
        let mut stored = HashMap::from([(key.clone(), (10, stored_doc.clone()))]);
        resolve(&mut actions, &stored);
        assert_eq!(doc(&actions[0])["blob"], json!("big"));

        let mut replayed = vec![action(1, 20, "u", json!({"id": 1, "n": 2}), &["blob"])];
        stored.insert(key.clone(), (30, stored_doc));
        let r = resolve(&mut replayed, &stored);
        assert_eq!(
            (r.superseded, replayed.len()),
            (1, 0),
            "a newer document wins"
        );
    }

    #[test]
    fn a_merge_without_a_document_is_marked_lacking_the_column() {
        let mut actions = vec![
            action(1, 20, "u", json!({"id": 1, "n": 2}), &["blob"]),
            action(1, 30, "u", json!({"id": 1, "n": 3}), &["blob"]),
        ];
        let r = resolve(&mut actions, &HashMap::new());
        assert_eq!(r.lacking, 2, "the second takes its document from the first");
        for a in &actions {
            assert!(doc(a).get("blob").is_none());
            let lacking = a.lacking.as_ref().expect("lacking");
            assert_eq!(lacking.columns, ["blob"]);
            assert_eq!(lacking.key, *json!({"id": 1}).as_object().unwrap());
            assert_eq!(lacking.table, ("public".into(), "t".into()));
        }
        assert!(
            actions[0].meta.contains("\"version\":20"),
            "still versioned"
        );
    }

    #[test]
    fn a_stored_document_without_the_column_leaves_it_lacking() {
        let key = ("cdc_public_t".to_owned(), "1".to_owned());
        let stored_doc = json!({"id": 1, "n": 1, "note": "x"})
            .as_object()
            .cloned()
            .unwrap();
        let stored = HashMap::from([(key, (10, stored_doc))]);
        let toast = ["blob", "note"];
        let mut actions = vec![action(1, 20, "u", json!({"id": 1, "n": 2}), &toast)];
        let r = resolve(&mut actions, &stored);
        assert_eq!(r.lacking, 1);
        assert_eq!(doc(&actions[0])["note"], json!("x"));
        let lacking = actions[0].lacking.as_ref().expect("lacking");
        assert_eq!(lacking.columns, ["blob"], "note was found");
    }
}
