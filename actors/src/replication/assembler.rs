//! Turns decoded pgoutput messages into [`ChangeEvent`]s: keeps the relation
//! cache, the open transaction, and splits key changes into delete + create.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{Map, Value};

use super::decode::{OldTuple, PgOutputMessage, Relation, Tuple};
use super::tuple::tuple_to_json;
use crate::event::{ChangeEvent, Op, TableRef, TxMeta};
use crate::lsn::Lsn;
use crate::pg::types::{Rule, TypeMap};
use crate::pg::values::type_name;

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

/// A cached relation, its columns' rendering rules and the table (with
/// key) it maps to.
pub(super) struct RelationInfo {
    relation: Relation,
    rules: Vec<Rule>,
    table: Arc<TableRef>,
}

/// State of the decoding stream between messages.
pub struct Assembler {
    known: HashMap<(String, String), Arc<TableRef>>,
    relations: HashMap<u32, RelationInfo>,
    /// Rendering rules of the non-built-in types seen so far.
    types: TypeMap,
    tx: Option<TxMeta>,
    seq: u32,
}

impl Assembler {
    /// An assembler that takes keys from `tables` (falling back to the
    /// relation's key flags for tables it does not know).
    pub fn new(tables: &[Arc<TableRef>]) -> Self {
        let known = tables
            .iter()
            .map(|t| ((t.schema.clone(), t.name.clone()), t.clone()))
            .collect();
        Self {
            known,
            relations: HashMap::new(),
            types: TypeMap::default(),
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
                let (rel, table) = self.lookup(relation_oid)?;
                let (after, unchanged) = row(rel, &new)?;
                let key = key_of(&table, &after);
                self.push(
                    out,
                    Op::Create,
                    table,
                    key,
                    None,
                    Some(after),
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
                let (rel, table) = self.lookup(relation_oid)?;
                let before = old_row(rel, &table, &old)?;
                let key = key_of(&table, &before);
                self.push(
                    out,
                    Op::Delete,
                    table,
                    key,
                    Some(before),
                    None,
                    Vec::new(),
                    lsn,
                )?;
            }
            PgOutputMessage::Truncate { relation_oids, .. } => {
                for oid in relation_oids {
                    let (_, table) = self.lookup(oid)?;
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

    fn relation(&mut self, relation: Relation) {
        let name = (relation.namespace.clone(), relation.name.clone());
        let key_columns = match self.known.get(&name) {
            Some(t) => t.key_columns.clone(),
            None => {
                let flagged: Vec<String> = relation
                    .columns
                    .iter()
                    .filter(|c| c.is_key)
                    .map(|c| c.name.clone())
                    .collect();
                if flagged.is_empty() {
                    relation.columns.iter().map(|c| c.name.clone()).collect()
                } else {
                    flagged
                }
            }
        };
        let types: Map<String, Value> = relation
            .columns
            .iter()
            .map(|c| {
                (
                    c.name.clone(),
                    Value::from(type_name(c.type_oid).unwrap_or("unknown")),
                )
            })
            .collect();
        let column_types = Value::Object(types).to_string();
        let rules = relation
            .columns
            .iter()
            .map(|c| self.types.rule(c.type_oid))
            .collect();
        let table = Arc::new(TableRef {
            schema: name.0,
            name: name.1,
            key_columns,
            column_types,
        });
        self.relations.insert(
            relation.oid,
            RelationInfo {
                relation,
                rules,
                table,
            },
        );
    }

    fn lookup(&self, oid: u32) -> Result<(&RelationInfo, Arc<TableRef>), AssembleError> {
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
        let (rel, table) = self.lookup(oid)?;
        let (mut after, mut unchanged) = row(rel, &new)?;
        let before = old.as_ref().map(|o| old_row(rel, &table, o)).transpose()?;
        if let (Some(OldTuple::Full(_)), Some(b)) = (&old, &before) {
            // With REPLICA IDENTITY FULL the old tuple carries the real value of
            // an unchanged TOASTed column: use it instead of leaving a hole.
            unchanged.retain(|c| match b.get(c) {
                Some(v) => {
                    after.insert(c.clone(), v.clone());
                    false
                }
                None => true,
            });
        }
        let new_key = key_of(&table, &after);
        let old_key = before.as_ref().and_then(|b| key_of(&table, b));
        match old_key {
            Some(old_key) if Some(&old_key) != new_key.as_ref() => {
                self.push(
                    out,
                    Op::Delete,
                    table.clone(),
                    Some(old_key),
                    before,
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
                    Some(after),
                    unchanged,
                    lsn,
                )
            }
            _ => self.push(
                out,
                Op::Update,
                table,
                new_key,
                before,
                Some(after),
                unchanged,
                lsn,
            ),
        }
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
        key: Option<Map<String, Value>>,
        before: Option<Map<String, Value>>,
        after: Option<Map<String, Value>>,
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

/// A tuple as a JSON row, checked against the relation's width.
fn row(
    info: &RelationInfo,
    tuple: &Tuple,
) -> Result<(Map<String, Value>, Vec<String>), AssembleError> {
    let rel = &info.relation;
    if tuple.0.len() != rel.columns.len() {
        let table = format!("{}.{}", rel.namespace, rel.name);
        return Err(AssembleError::ColumnCount {
            table,
            got: tuple.0.len(),
            expected: rel.columns.len(),
        });
    }
    Ok(tuple_to_json(rel, &info.rules, tuple))
}

/// The old row: the whole row for `O`, only the key columns for `K` (the rest are not sent).
fn old_row(
    rel: &RelationInfo,
    table: &TableRef,
    old: &OldTuple,
) -> Result<Map<String, Value>, AssembleError> {
    match old {
        OldTuple::Full(t) => Ok(row(rel, t)?.0),
        OldTuple::Key(t) => {
            let (mut m, _) = row(rel, t)?;
            m.retain(|k, _| table.key_columns.contains(k));
            Ok(m)
        }
    }
}

/// The key columns of `row` as an object; `None` if any is missing.
fn key_of(table: &TableRef, row: &Map<String, Value>) -> Option<Map<String, Value>> {
    table
        .key_columns
        .iter()
        .map(|c| row.get(c).map(|v| (c.clone(), v.clone())))
        .collect()
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use serde_json::json;

    use super::*;
    use crate::replication::decode::{Column, TupleValue};

    const INT4: u32 = 23;
    const TEXT: u32 = 25;

    fn relation() -> Relation {
        let col = |name: &str, type_oid, is_key| Column {
            is_key,
            name: name.into(),
            type_oid,
            type_modifier: -1,
        };
        Relation {
            oid: 16384,
            namespace: "public".into(),
            name: "users".into(),
            replica_identity: b'd',
            columns: vec![
                col("id", INT4, true),
                col("name", TEXT, false),
                col("bio", TEXT, false),
            ],
        }
    }

    fn tuple(vals: &[Option<&str>]) -> Tuple {
        Tuple(
            vals.iter()
                .map(|v| match v {
                    None => TupleValue::Null,
                    Some("<u>") => TupleValue::UnchangedToast,
                    Some(s) => TupleValue::Text(Bytes::copy_from_slice(s.as_bytes())),
                })
                .collect(),
        )
    }

    fn assembler() -> Assembler {
        let mut a = Assembler::new(&[]);
        a.apply(
            PgOutputMessage::Relation(relation()),
            Lsn(1),
            &mut Vec::new(),
        )
        .unwrap();
        a.begin(9, Lsn(500), 0);
        a
    }

    fn obj(v: Value) -> Option<Map<String, Value>> {
        v.as_object().cloned()
    }

    #[test]
    fn insert_carries_key_row_and_transaction() {
        let mut a = assembler();
        let mut out = Vec::new();
        let new = tuple(&[Some("1"), Some("ann"), None]);
        a.apply(
            PgOutputMessage::Insert {
                relation_oid: 16384,
                new,
            },
            Lsn(400),
            &mut out,
        )
        .unwrap();
        let e = &out[0];
        assert_eq!(
            (e.op, e.seq, e.lsn, e.tx.commit_lsn, e.tx.xid),
            (Op::Create, 0, Lsn(400), Lsn(500), 9)
        );
        assert_eq!(e.key, obj(json!({"id": 1})));
        assert_eq!(e.after, obj(json!({"id": 1, "name": "ann", "bio": null})));
        assert_eq!(e.tx.commit_time_us, PG_EPOCH_OFFSET_US);
    }

    #[test]
    fn key_change_becomes_delete_then_create() {
        let mut a = assembler();
        let mut out = Vec::new();
        let old = Some(OldTuple::Key(tuple(&[Some("1"), None, None])));
        let new = tuple(&[Some("2"), Some("ann"), Some("x")]);
        a.apply(
            PgOutputMessage::Update {
                relation_oid: 16384,
                old,
                new,
            },
            Lsn(400),
            &mut out,
        )
        .unwrap();
        let ops: Vec<_> = out.iter().map(|e| (e.op, e.key.clone(), e.seq)).collect();
        assert_eq!(
            ops,
            [
                (Op::Delete, obj(json!({"id": 1})), 0),
                (Op::Create, obj(json!({"id": 2})), 1)
            ]
        );
        assert_eq!(out[0].before, obj(json!({"id": 1})));
    }

    #[test]
    fn unchanged_toast_is_listed_not_invented() {
        let mut a = assembler();
        let mut out = Vec::new();
        let new = tuple(&[Some("1"), Some("bob"), Some("<u>")]);
        a.apply(
            PgOutputMessage::Update {
                relation_oid: 16384,
                old: None,
                new,
            },
            Lsn(400),
            &mut out,
        )
        .unwrap();
        assert_eq!(out[0].op, Op::Update);
        assert_eq!(out[0].after, obj(json!({"id": 1, "name": "bob"})));
        assert_eq!(out[0].unchanged_toast, ["bio"]);
    }

    #[test]
    fn full_identity_fills_unchanged_toast_from_old_row() {
        let mut a = assembler();
        let mut out = Vec::new();
        let old = Some(OldTuple::Full(tuple(&[
            Some("1"),
            Some("bob"),
            Some("long"),
        ])));
        let new = tuple(&[Some("1"), Some("bobby"), Some("<u>")]);
        a.apply(
            PgOutputMessage::Update {
                relation_oid: 16384,
                old,
                new,
            },
            Lsn(400),
            &mut out,
        )
        .unwrap();
        assert_eq!(
            out[0].after,
            obj(json!({"id": 1, "name": "bobby", "bio": "long"}))
        );
        assert!(out[0].unchanged_toast.is_empty());
    }

    #[test]
    fn changes_outside_transactions_and_unknown_relations_are_errors() {
        let mut a = assembler();
        let new = tuple(&[Some("1"), None, None]);
        let err = a.apply(
            PgOutputMessage::Insert {
                relation_oid: 7,
                new: new.clone(),
            },
            Lsn(1),
            &mut Vec::new(),
        );
        assert!(matches!(err, Err(AssembleError::UnknownRelation(7))));
        a.commit();
        let err = a.apply(
            PgOutputMessage::Insert {
                relation_oid: 16384,
                new,
            },
            Lsn(1),
            &mut Vec::new(),
        );
        assert!(matches!(err, Err(AssembleError::NoTransaction)));
        let short = tuple(&[Some("1")]);
        a.begin(1, Lsn(2), 0);
        let err = a.apply(
            PgOutputMessage::Insert {
                relation_oid: 16384,
                new: short,
            },
            Lsn(1),
            &mut Vec::new(),
        );
        assert!(matches!(
            err,
            Err(AssembleError::ColumnCount {
                got: 1,
                expected: 3,
                ..
            })
        ));
    }

    #[test]
    fn user_types_are_resolved_before_their_relation_and_again_after_a_type_message() {
        let mut a = Assembler::new(&[]);
        let mut rel = relation();
        rel.columns[2].type_oid = 70_000; // a domain over integer
        assert_eq!(a.missing_types(&rel), vec![70_000]);
        let rows = [(70_000, crate::pg::types::tests_row_domain(INT4))].into();
        a.types_mut().extend(&[70_000], &rows);
        assert!(a.missing_types(&rel).is_empty());
        a.apply(
            PgOutputMessage::Relation(rel.clone()),
            Lsn(1),
            &mut Vec::new(),
        )
        .unwrap();
        a.begin(9, Lsn(500), 0);
        let mut out = Vec::new();
        let new = tuple(&[Some("1"), Some("ann"), Some("42")]);
        a.apply(
            PgOutputMessage::Insert {
                relation_oid: 16384,
                new,
            },
            Lsn(400),
            &mut out,
        )
        .unwrap();
        assert_eq!(
            out[0].after,
            obj(json!({"id": 1, "name": "ann", "bio": 42}))
        );
        let announced = PgOutputMessage::Type {
            oid: 70_000,
            namespace: "public".into(),
            name: "posint".into(),
        };
        a.apply(announced, Lsn(401), &mut out).unwrap();
        assert_eq!(a.missing_types(&rel), vec![70_000]);
    }

    #[test]
    fn truncate_emits_one_event_per_table() {
        let mut a = assembler();
        let mut out = Vec::new();
        a.apply(
            PgOutputMessage::Truncate {
                options: 0,
                relation_oids: vec![16384],
            },
            Lsn(3),
            &mut out,
        )
        .unwrap();
        assert_eq!((out[0].op, out[0].key.clone()), (Op::Truncate, None));
    }
}
