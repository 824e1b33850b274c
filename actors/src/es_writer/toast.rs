//! Unchanged TOAST columns no document held ([`merge`](super::merge)),
//! read from the row in PostgreSQL as it is now.
//!
//! Under the default replica identity a key change reaches the sink as a
//! delete and a create whose unchanged TOAST columns carry no value, so the
//! new key's document has nothing to take them from. A value read now is
//! never older than the change being written: a later change that set the
//! column carries it in full and is written after, with a higher version,
//! and a later delete removes the document. A row not found (deleted or
//! re-keyed since) is written without the columns, as are rows of a table
//! whose key cannot be looked up or that PostgreSQL refuses to read. While
//! PostgreSQL cannot be reached, the batch waits and the read is tried
//! again: written without them, the documents would stay wrong.

use std::collections::{BTreeMap, HashMap};

use serde_json::{Map, Value};

use super::bulk::Action;
use super::naming::{doc_id, fields};
use crate::checkpoint::KeyText;
use crate::event::{TableRef, TxMeta};
use crate::lsn::Lsn;
use crate::pg::types::Rule;
use crate::pg::{PgError, PostgresConfig};
use crate::snapshot::{reader, Shape, SnapshotError};
use crate::verify::keys::text;

/// Keys per query.
const CHUNK_KEYS: usize = 1000;

/// Why the columns could not be read.
#[derive(Debug)]
pub(super) enum ReadError {
    /// PostgreSQL could not be reached or the connection broke: worth
    /// trying again.
    Unreachable(String),
    /// PostgreSQL answered with an error (a privilege, a dropped table).
    Refused(String),
}

impl From<SnapshotError> for ReadError {
    fn from(e: SnapshotError) -> Self {
        let answered = match &e {
            SnapshotError::Sql(s) | SnapshotError::Pg(PgError::Sql(s)) => s.as_db_error().is_some(),
            SnapshotError::Pg(p) => !p.is_unreachable(),
            _ => true,
        };
        match answered {
            true => ReadError::Refused(e.to_string()),
            false => ReadError::Unreachable(e.to_string()),
        }
    }
}

/// What became of the actions looked up.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Read {
    /// Got every lacking column.
    pub filled: usize,
    /// No row under their key now: written without the columns (a later
    /// change removes the document).
    pub gone: usize,
}

/// Fill the `lacking` columns of `actions` from PostgreSQL, counting in
/// `read` what became of them. Those left keep `lacking` (after an error,
/// every one not reached yet).
pub(super) async fn fill(
    pg: &PostgresConfig,
    actions: &mut [Action],
    read: &mut Read,
) -> Result<(), ReadError> {
    let mut tables: BTreeMap<(String, String), Vec<usize>> = BTreeMap::new();
    for (i, a) in actions.iter().enumerate() {
        if let Some(l) = &a.lacking {
            tables.entry(l.table.clone()).or_default().push(i);
        }
    }
    if tables.is_empty() {
        return Ok(());
    }
    fail::fail_point!(crate::wire::failpoint::ES_TOAST_READ, |arg| {
        let why = "failpoint es-toast-read".to_owned();
        Err(match arg.as_deref() {
            Some("refused") => ReadError::Refused(why),
            _ => ReadError::Unreachable(why),
        })
    });
    let sql = reader(pg).await?;
    for ((schema, name), at) in tables {
        let table = TableRef::named(schema, name);
        let shape = Shape::load(&sql, &table, &pg.publication).await?;
        if shape.keyless() {
            continue;
        }
        let columns = shape.key_columns();
        let looked: Vec<(usize, KeyText)> = at
            .iter()
            .filter_map(|&i| Some((i, key_text(&columns, &actions[i].lacking.as_ref()?.key)?)))
            .collect();
        let mut keys: Vec<KeyText> = looked.iter().map(|(_, k)| k.clone()).collect();
        keys.sort();
        keys.dedup();
        let mut rows: HashMap<String, Map<String, Value>> = HashMap::new();
        // The rows are only read for their values: no transaction of theirs.
        let tx = TxMeta {
            xid: 0,
            commit_lsn: Lsn(0),
            commit_time_us: 0,
        };
        for chunk in keys.chunks(CHUNK_KEYS) {
            let found =
                (sql.simple_query(&shape.keys_query(chunk)).await).map_err(SnapshotError::from)?;
            for (_, event) in shape.events(&found, tx, Lsn(0), &mut 0) {
                if let (Some(key), Some(after)) = (&event.key, &event.after) {
                    rows.insert(doc_id(&key.to_map()), fields(after.to_map().into_owned()));
                }
            }
        }
        for (i, _) in looked {
            let a = &mut actions[i];
            let Some(mut l) = a.lacking.take() else {
                continue;
            };
            let Some(row) = rows.get(&a.id) else {
                read.gone += 1;
                continue;
            };
            l.columns.retain(|c| match row.get(c) {
                Some(v) => {
                    l.doc.insert(c.clone(), v.clone());
                    false
                }
                None => true,
            });
            a.doc = Some(Value::Object(l.doc.clone()).to_string());
            match l.columns.is_empty() {
                true => read.filled += 1,
                false => a.lacking = Some(l),
            }
        }
    }
    Ok(())
}

/// The key's text in `columns`' order, as a key query takes it; `None`
/// when a column is missing, or its value has no text ([`text`]).
fn key_text(columns: &[(&str, &Rule)], key: &Map<String, Value>) -> Option<KeyText> {
    columns
        .iter()
        .map(|(c, rule)| text(rule, key.get(*c)?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn key_texts_follow_the_key_columns_order() {
        let key = json!({"b": "x'y", "a": 7, "c": true});
        let key = key.as_object().unwrap();
        let columns = [("a", &Rule::Text), ("b", &Rule::Text), ("c", &Rule::Text)];
        assert_eq!(
            key_text(&columns, key),
            Some(vec!["7".into(), "x'y".into(), "true".into()])
        );
        assert_eq!(key_text(&[("d", &Rule::Text)], key), None);
        let null = json!({"a": null});
        assert_eq!(
            key_text(&[("a", &Rule::Text)], null.as_object().unwrap()),
            None
        );
    }
}
