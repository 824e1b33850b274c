//! Turns decoded pgoutput messages into [`ChangeEvent`]s: keeps the relation
//! cache (whose key follows each Relation message's replica identity), the
//! open transaction, splits key changes into delete + create, and drops
//! changes of tables that are published but not configured.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde_json::{Map, Value};

use super::decode::{OldTuple, PgOutputMessage, Relation, Tuple, TupleValue};
use super::tuple::{columns, text_row};
use crate::event::{ChangeEvent, Columns, KeySource, Op, Row, TableRef, TextRow, TxMeta};
use crate::lsn::Lsn;
use crate::pg::types::{label, Rule, TypeMap};

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
pub(crate) const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// A stream message that cannot be applied.
#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    /// A change for a relation never described by a Relation message.
    #[error("change for unknown relation oid {0}")]
    UnknownRelation(u32),
    /// A change outside Begin … Commit.
    #[error("change outside a transaction")]
    NoTransaction,
    /// A tuple with a different column count than its relation.
    #[error("tuple of {got} columns for relation {table} of {expected}")]
    ColumnCount {
        /// Relation name.
        table: String,
        /// Columns in the tuple.
        got: usize,
        /// Columns in the relation.
        expected: usize,
    },
}

/// A cached relation and the table (with key) it maps to; `None` for a
/// table the publication has but the configuration does not.
struct RelationInfo {
    relation: Relation,
    /// The columns and how their values render (as text for an
    /// unconfigured table).
    columns: Arc<Columns>,
    /// The key columns and their positions in the rows (`None` without a
    /// key).
    key: Option<(Arc<Columns>, Vec<usize>)>,
    table: Option<Arc<TableRef>>,
}

/// State of the decoding stream between messages.
pub struct Assembler {
    /// The configured tables, with their keys as resolved at start.
    known: HashMap<(String, String), Arc<TableRef>>,
    relations: HashMap<u32, RelationInfo>,
    /// Rendering rules of the non-built-in types seen so far.
    types: TypeMap,
    /// Unconfigured tables already warned about.
    ignored: HashSet<(String, String)>,
    /// Unconfigured relations a change was seen for.
    changed_ignored: HashSet<u32>,
    /// Those first seen since the last [`Self::take_ignored`].
    newly_ignored: Vec<u32>,
    tx: Option<TxMeta>,
    seq: u32,
}

impl Assembler {
    /// An assembler for the configured `tables`: changes of other tables
    /// are dropped. Keys follow the Relation messages; the keys in `tables`
    /// only supply the primary key of REPLICA IDENTITY FULL tables.
    pub fn new(tables: &[Arc<TableRef>]) -> Self {
        let known = tables
            .iter()
            .map(|t| ((t.schema.clone(), t.name.clone()), t.clone()))
            .collect();
        Self {
            known,
            relations: HashMap::new(),
            types: TypeMap::default(),
            ignored: HashSet::new(),
            changed_ignored: HashSet::new(),
            newly_ignored: Vec::new(),
            tx: None,
            seq: 0,
        }
    }

    /// The column types of `relation` whose rendering rule is not known
    /// yet: the caller resolves them ([`crate::pg::types::resolve`] into
    /// [`Self::types_mut`]) before applying the Relation message.
    pub fn missing_types(&self, relation: &Relation) -> Vec<u32> {
        self.types
            .missing(relation.columns.iter().map(|c| c.type_oid))
    }

    /// The rendering rules, to add resolved types to.
    pub fn types_mut(&mut self) -> &mut TypeMap {
        &mut self.types
    }

    /// A transaction began.
    pub fn begin(&mut self, xid: u32, final_lsn: Lsn, commit_time_pg_us: i64) {
        let commit_time_us = commit_time_pg_us.saturating_add(PG_EPOCH_OFFSET_US);
        self.tx = Some(TxMeta {
            xid,
            commit_lsn: final_lsn,
            commit_time_us,
        });
        self.seq = 0;
    }

    /// The transaction committed; returns how many events it produced.
    pub fn commit(&mut self) -> u32 {
        self.tx = None;
        std::mem::take(&mut self.seq)
    }

    /// Whether a transaction is open.
    pub fn in_transaction(&self) -> bool {
        self.tx.is_some()
    }

    /// Apply one message at WAL position `lsn`, appending resulting events to `out`.
    pub fn apply(
        &mut self,
        msg: PgOutputMessage,
        lsn: Lsn,
        out: &mut Vec<ChangeEvent>,
    ) -> Result<(), AssembleError> {
        match msg {
            PgOutputMessage::Begin {
                final_lsn,
                commit_time_micros,
                xid,
            } => self.begin(xid, Lsn(final_lsn), commit_time_micros),
            PgOutputMessage::Commit { .. } => {
                self.commit();
            }
            PgOutputMessage::Relation(rel) => self.relation(rel),
            PgOutputMessage::Insert { relation_oid, new } => {
                let (rel, Some(table)) = self.lookup(relation_oid)? else {
                    self.note_ignored(relation_oid);
                    return Ok(());
                };
                let (after, unchanged) = row(rel, new)?;
                let key = key_of(rel, &after);
                self.push(
                    out,
                    Op::Create,
                    table,
                    key,
                    None,
                    Some(Row::Text(after)),
                    unchanged,
                    lsn,
                )?;
            }
            PgOutputMessage::Update {
                relation_oid,
                old,
                new,
            } => self.update(relation_oid, old, new, lsn, out)?,
            PgOutputMessage::Delete { relation_oid, old } => {
                let (rel, Some(table)) = self.lookup(relation_oid)? else {
                    self.note_ignored(relation_oid);
                    return Ok(());
                };
                let before = old_row(rel, &table, old)?;
                let key = key_of(rel, &before);
                self.push(
                    out,
                    Op::Delete,
                    table,
                    key,
                    Some(Row::Text(before)),
                    None,
                    Vec::new(),
                    lsn,
                )?;
            }
            PgOutputMessage::Truncate { relation_oids, .. } => {
                for oid in relation_oids {
                    let (_, Some(table)) = self.lookup(oid)? else {
                        self.note_ignored(oid);
                        continue;
                    };
                    self.push(out, Op::Truncate, table, None, None, None, Vec::new(), lsn)?;
                }
            }
            // A Type message precedes a Relation that uses the type: its
            // definition may have changed, so it is looked up again.
            PgOutputMessage::Type { oid, .. } => self.types.forget(oid),
            PgOutputMessage::Origin { .. } | PgOutputMessage::Message { .. } => {}
        }
        Ok(())
    }

    /// Note a change of relation `oid`, which is not configured: said once
    /// per table (not at its Relation message, which PostgreSQL also sends
    /// for a partition whose changes it publishes under its root's name).
    fn note_ignored(&mut self, oid: u32) {
        if !self.changed_ignored.insert(oid) {
            return;
        }
        self.newly_ignored.push(oid);
        let Some(info) = self.relations.get(&oid) else {
            return;
        };
        let name = (info.relation.namespace.clone(), info.relation.name.clone());
        if self.ignored.insert(name.clone()) {
            tracing::warn!(table = %format!("{}.{}", name.0, name.1), "the publication has a table that postgres.tables does not (or a configured table was renamed): its changes are not emitted");
        }
    }

    /// The OIDs of the unconfigured relations whose first change was seen
    /// since the last call (Relation messages alone do not count: PostgreSQL
    /// sends a partition's own with its root's).
    pub fn take_ignored(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.newly_ignored)
    }

    /// Cache a relation with its key as this Relation message states it.
    fn relation(&mut self, relation: Relation) {
        let name = (relation.namespace.clone(), relation.name.clone());
        let Some(start) = self.known.get(&name) else {
            let info = RelationInfo {
                columns: Arc::new(columns(&relation, &[])),
                key: None,
                relation,
                table: None,
            };
            self.relations.insert(info.relation.oid, info);
            return;
        };
        let (key_columns, key_source) = relation_key(&relation, start);
        let previous = self.relations.get(&relation.oid);
        if let Some(Some(before)) = previous.map(|p| &p.table) {
            if before.key_columns != key_columns {
                tracing::info!(table = %format!("{}.{}", name.0, name.1), key = ?key_columns, "the table's key changed");
            }
        }
        let rules: Vec<Rule> = (relation.columns.iter())
            .map(|c| self.types.rule(c.type_oid))
            .collect();
        let types: Map<String, Value> = (relation.columns.iter().zip(&rules))
            .map(|(c, rule)| (c.name.clone(), Value::from(label(c.type_oid, rule))))
            .collect();
        let table = Arc::new(TableRef {
            schema: name.0,
            name: name.1,
            key_columns: key_columns.clone(),
            key_source,
            column_types: Value::Object(types).to_string(),
        });
        let table = Some(table);
        let columns = Arc::new(columns(&relation, &rules));
        let info = RelationInfo {
            key: key_shape(&columns, &key_columns),
            columns,
            relation,
            table,
        };
        self.relations.insert(info.relation.oid, info);
    }

    /// The cached relation and its table (`None`: not configured).
    fn lookup(&self, oid: u32) -> Result<(&RelationInfo, Option<Arc<TableRef>>), AssembleError> {
        let info = self
            .relations
            .get(&oid)
            .ok_or(AssembleError::UnknownRelation(oid))?;
        Ok((info, info.table.clone()))
    }

    fn update(
        &mut self,
        oid: u32,
        old: Option<OldTuple>,
        new: Tuple,
        lsn: Lsn,
        out: &mut Vec<ChangeEvent>,
    ) -> Result<(), AssembleError> {
        let (rel, Some(table)) = self.lookup(oid)? else {
            self.note_ignored(oid);
            return Ok(());
        };
        let (mut after, mut unchanged) = row(rel, new)?;
        let full = matches!(old, Some(OldTuple::Full(_)));
        let before = old.map(|o| old_row(rel, &table, o)).transpose()?;
        if let (true, Some(b)) = (full, &before) {
            // With REPLICA IDENTITY FULL the old tuple carries the real value of
            // an unchanged TOASTed column: use it instead of leaving a hole.
            unchanged.retain(|c| {
                let Some(i) = after.columns.position(c) else {
                    return true;
                };
                match b.values.get(i) {
                    None | Some(TupleValue::UnchangedToast) => true,
                    Some(value) => {
                        after.values[i] = value.clone();
                        false
                    }
                }
            });
        }
        let new_key = key_of(rel, &after);
        let old_key = before.as_ref().and_then(|b| key_of(rel, b));
        match old_key {
            Some(old_key) if Some(&old_key) != new_key.as_ref() => {
                self.push(
                    out,
                    Op::Delete,
                    table.clone(),
                    Some(old_key),
                    before.map(Row::Text),
                    None,
                    Vec::new(),
                    lsn,
                )?;
                self.push(
                    out,
                    Op::Create,
                    table,
                    new_key,
                    None,
                    Some(Row::Text(after)),
                    unchanged,
                    lsn,
                )
            }
            _ => self.push(
                out,
                Op::Update,
                table,
                new_key,
                before.map(Row::Text),
                Some(Row::Text(after)),
                unchanged,
                lsn,
            ),
        }
    }

    /// The transaction being read, if any.
    pub fn open_tx(&self) -> Option<TxMeta> {
        self.tx
    }

    /// Place copied rows (a backfill chunk) in the open transaction at
    /// `lsn`: they take its commit as their version and the next positions.
    pub fn place(&mut self, rows: &mut [ChangeEvent], lsn: Lsn) -> Result<(), AssembleError> {
        let tx = self.tx.ok_or(AssembleError::NoTransaction)?;
        for e in rows {
            e.tx = tx;
            e.lsn = lsn;
            e.seq = self.seq;
            self.seq += 1;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn push(
        &mut self,
        out: &mut Vec<ChangeEvent>,
        op: Op,
        table: Arc<TableRef>,
        key: Option<Row>,
        before: Option<Row>,
        after: Option<Row>,
        unchanged_toast: Vec<String>,
        lsn: Lsn,
    ) -> Result<(), AssembleError> {
        let tx = self.tx.ok_or(AssembleError::NoTransaction)?;
        out.push(ChangeEvent {
            op,
            table,
            key,
            before,
            after,
            unchanged_toast,
            lsn,
            seq: self.seq,
            tx,
            snapshot: false,
        });
        self.seq += 1;
        Ok(())
    }
}

/// A tuple as a row, checked against the relation's width, and the names
/// of its unchanged-TOAST columns.
fn row(info: &RelationInfo, tuple: Tuple) -> Result<(TextRow, Vec<String>), AssembleError> {
    let rel = &info.relation;
    if tuple.0.len() != rel.columns.len() {
        let table = format!("{}.{}", rel.namespace, rel.name);
        return Err(AssembleError::ColumnCount {
            table,
            got: tuple.0.len(),
            expected: rel.columns.len(),
        });
    }
    Ok(text_row(&info.columns, tuple))
}

/// The old row: the whole row for `O`, only the key columns for `K` (the rest are not sent).
fn old_row(rel: &RelationInfo, table: &TableRef, old: OldTuple) -> Result<TextRow, AssembleError> {
    match old {
        OldTuple::Full(t) => Ok(row(rel, t)?.0),
        OldTuple::Key(t) => {
            let (mut r, _) = row(rel, t)?;
            for (value, name) in r.values.iter_mut().zip(rel.columns.names()) {
                if !table.key_columns.contains(name) {
                    *value = TupleValue::UnchangedToast;
                }
            }
            Ok(r)
        }
    }
}

/// The row key of a relation by the replica identity rule, from its
/// Relation message: the flagged columns for DEFAULT (the primary key) and
/// USING INDEX (the index columns). FULL flags every column, so its primary
/// key is the one resolved at `start`, while all its columns are still
/// there; otherwise (or without a primary key) every column.
fn relation_key(rel: &Relation, start: &TableRef) -> (Vec<String>, KeySource) {
    let names = |key_only: bool| {
        rel.columns
            .iter()
            .filter(|c| c.is_key || !key_only)
            .map(|c| c.name.clone())
            .collect::<Vec<_>>()
    };
    match rel.replica_identity {
        b'f' => {
            let has = |k: &String| rel.columns.iter().any(|c| &c.name == k);
            let pk = start.key_source == KeySource::PrimaryKey
                && !start.key_columns.is_empty()
                && start.key_columns.iter().all(has);
            match pk {
                true => (start.key_columns.clone(), KeySource::PrimaryKey),
                false => (names(false), KeySource::WholeRow),
            }
        }
        b'i' => (names(true), KeySource::IdentityIndex),
        _ => (names(true), KeySource::PrimaryKey),
    }
}

/// The key columns `key` of a relation's `columns` and their positions in
/// its rows; `None` if there are none or one is missing.
fn key_shape(columns: &Columns, key: &[String]) -> Option<(Arc<Columns>, Vec<usize>)> {
    if key.is_empty() || key.iter().any(|k| columns.position(k).is_none()) {
        return None;
    }
    let (key, positions) = columns.select(key);
    Some((Arc::new(key), positions))
}

/// The key columns of `row`, a row of `info`'s relation; `None` if any
/// is absent or the table has no key.
fn key_of(info: &RelationInfo, row: &TextRow) -> Option<Row> {
    let (columns, positions) = info.key.as_ref()?;
    let values = positions
        .iter()
        .map(|&i| match row.values.get(i)? {
            TupleValue::UnchangedToast => None,
            value => Some(value.clone()),
        })
        .collect::<Option<Vec<_>>>()?;
    Some(Row::Text(TextRow {
        columns: columns.clone(),
        values,
    }))
}

#[cfg(test)]
mod tests;
