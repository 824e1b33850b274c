//! Unit tests of the assembler.

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

fn users() -> Arc<TableRef> {
    Arc::new(TableRef {
        schema: "public".into(),
        name: "users".into(),
        key_columns: vec!["id".into()],
        key_source: KeySource::PrimaryKey,
        column_types: String::new(),
    })
}

fn assembler() -> Assembler {
    let mut a = Assembler::new(&[users()]);
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

/// A change's row as an object, checking that the row is written as
/// JSON byte for byte as its object serializes.
fn map(row: &Option<Row>) -> Option<Map<String, Value>> {
    let row = row.as_ref()?;
    let object = row.to_map().into_owned();
    let mut written = Vec::new();
    row.write_json(&mut written);
    assert_eq!(
        String::from_utf8(written).unwrap(),
        serde_json::to_string(&object).unwrap()
    );
    Some(object)
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
    assert_eq!(map(&e.key), obj(json!({"id": 1})));
    assert_eq!(
        map(&e.after),
        obj(json!({"id": 1, "name": "ann", "bio": null}))
    );
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
    let ops: Vec<_> = out.iter().map(|e| (e.op, map(&e.key), e.seq)).collect();
    assert_eq!(
        ops,
        [
            (Op::Delete, obj(json!({"id": 1})), 0),
            (Op::Create, obj(json!({"id": 2})), 1)
        ]
    );
    assert_eq!(map(&out[0].before), obj(json!({"id": 1})));
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
    assert_eq!(map(&out[0].after), obj(json!({"id": 1, "name": "bob"})));
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
        map(&out[0].after),
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

/// `relation()` re-described: identity `identity`, key flags on `keys`,
/// column `id` renamed to `rename_id` when given.
fn described(identity: u8, keys: &[&str], rename_id: Option<&str>) -> Relation {
    let mut rel = relation();
    rel.replica_identity = identity;
    for c in &mut rel.columns {
        if c.name == "id" {
            if let Some(n) = rename_id {
                c.name = n.into();
            }
        }
        c.is_key = identity == b'f' || keys.contains(&c.name.as_str());
    }
    rel
}

fn delete_key(a: &mut Assembler, old: OldTuple) -> Option<Map<String, Value>> {
    let mut out = Vec::new();
    a.apply(
        PgOutputMessage::Delete {
            relation_oid: 16384,
            old,
        },
        Lsn(400),
        &mut out,
    )
    .unwrap();
    map(&out[0].key)
}

#[test]
fn using_index_keys_rows_by_the_index_columns() {
    let mut a = assembler();
    let rel = described(b'i', &["name"], None);
    a.apply(PgOutputMessage::Relation(rel), Lsn(2), &mut Vec::new())
        .unwrap();
    let old = OldTuple::Key(tuple(&[None, Some("ann"), None]));
    assert_eq!(delete_key(&mut a, old), obj(json!({"name": "ann"})));
    assert_eq!(
        a.relations[&16384].table.as_ref().unwrap().key_source,
        KeySource::IdentityIndex
    );
}

#[test]
fn key_follows_a_renamed_key_column() {
    let mut a = assembler();
    let rel = described(b'd', &["uid"], Some("uid"));
    a.apply(PgOutputMessage::Relation(rel), Lsn(2), &mut Vec::new())
        .unwrap();
    let old = OldTuple::Key(tuple(&[Some("7"), None, None]));
    assert_eq!(delete_key(&mut a, old), obj(json!({"uid": 7})));
}

#[test]
fn full_identity_keeps_the_primary_key_while_it_exists() {
    let mut a = assembler();
    let full = described(b'f', &[], None);
    a.apply(PgOutputMessage::Relation(full), Lsn(2), &mut Vec::new())
        .unwrap();
    let row = || OldTuple::Full(tuple(&[Some("7"), Some("ann"), None]));
    assert_eq!(delete_key(&mut a, row()), obj(json!({"id": 7})));
    let renamed = described(b'f', &[], Some("uid"));
    a.apply(PgOutputMessage::Relation(renamed), Lsn(3), &mut Vec::new())
        .unwrap();
    assert_eq!(
        delete_key(&mut a, row()),
        obj(json!({"uid": 7, "name": "ann", "bio": null}))
    );
}

#[test]
fn unconfigured_tables_are_dropped_and_a_keyless_relation_has_no_key() {
    let mut a = assembler();
    let mut other = relation();
    other.oid = 99;
    other.name = "audit".into();
    a.apply(PgOutputMessage::Relation(other), Lsn(2), &mut Vec::new())
        .unwrap();
    assert!(
        a.take_ignored().is_empty(),
        "a Relation message alone is no change"
    );
    let mut out = Vec::new();
    let new = tuple(&[Some("1"), None, None]);
    let insert = |oid| PgOutputMessage::Insert {
        relation_oid: oid,
        new: new.clone(),
    };
    a.apply(insert(99), Lsn(3), &mut out).unwrap();
    assert_eq!(a.take_ignored(), vec![99], "its first change is noted");
    let truncate = PgOutputMessage::Truncate {
        options: 0,
        relation_oids: vec![99, 16384],
    };
    a.apply(truncate, Lsn(4), &mut out).unwrap();
    assert!(a.take_ignored().is_empty(), "once");
    assert_eq!(out.len(), 1, "only the configured table's truncate");
    assert_eq!(out[0].table.name, "users");
    let keyless = described(b'd', &[], None);
    a.apply(PgOutputMessage::Relation(keyless), Lsn(5), &mut Vec::new())
        .unwrap();
    out.clear();
    a.apply(insert(16384), Lsn(6), &mut out).unwrap();
    assert_eq!(out[0].key, None);
}

#[test]
fn user_types_are_resolved_before_their_relation_and_again_after_a_type_message() {
    let mut a = Assembler::new(&[users()]);
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
        map(&out[0].after),
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
