//! pgoutput (logical replication protocol version 1) message decoder.
//!
//! Pure and total: any byte string decodes to a message or an error, never a
//! panic, and allocations are bounded by the input's length. Tuple values are
//! zero-copy slices of the input.

use bytes::Bytes;

/// One decoded pgoutput message.
#[derive(Debug, Clone, PartialEq)]
pub enum PgOutputMessage {
    /// `B`: a transaction begins.
    Begin {
        /// LSN of the commit record.
        final_lsn: u64,
        /// Commit time, microseconds since 2000-01-01.
        commit_time_micros: i64,
        /// Transaction id.
        xid: u32,
    },
    /// `C`: the transaction committed.
    Commit {
        /// Flags (unused, 0).
        flags: u8,
        /// LSN of the commit record.
        commit_lsn: u64,
        /// End LSN of the transaction.
        end_lsn: u64,
        /// Commit time, microseconds since 2000-01-01.
        commit_time_micros: i64,
    },
    /// `O`: the transaction came from another origin.
    Origin {
        /// Commit LSN on the origin server.
        commit_lsn: u64,
        /// Origin name.
        name: String,
    },
    /// `R`: describes a relation before its first change (and after DDL).
    Relation(Relation),
    /// `Y`: describes a non-built-in type.
    Type {
        /// Type OID.
        oid: u32,
        /// Schema of the type.
        namespace: String,
        /// Type name.
        name: String,
    },
    /// `I`: a row was inserted.
    Insert {
        /// Relation OID.
        relation_oid: u32,
        /// The new row.
        new: Tuple,
    },
    /// `U`: a row was updated.
    Update {
        /// Relation OID.
        relation_oid: u32,
        /// The old key (`K`) or old row (`O`), when sent.
        old: Option<OldTuple>,
        /// The new row.
        new: Tuple,
    },
    /// `D`: a row was deleted.
    Delete {
        /// Relation OID.
        relation_oid: u32,
        /// The old key (`K`) or old row (`O`).
        old: OldTuple,
    },
    /// `T`: relations were truncated.
    Truncate {
        /// Bit 1: CASCADE, bit 2: RESTART IDENTITY.
        options: u8,
        /// The truncated relations.
        relation_oids: Vec<u32>,
    },
    /// `M`: a logical decoding message (`pg_logical_emit_message`).
    Message {
        /// Emitted inside a transaction.
        transactional: bool,
        /// LSN of the message.
        lsn: u64,
        /// Application prefix.
        prefix: String,
        /// Payload.
        content: Bytes,
    },
}

/// A relation (table) description.
#[derive(Debug, Clone, PartialEq)]
pub struct Relation {
    /// Relation OID.
    pub oid: u32,
    /// Schema name.
    pub namespace: String,
    /// Table name.
    pub name: String,
    /// Replica identity: `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    /// Columns in order.
    pub columns: Vec<Column>,
}

/// One column of a relation.
#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    /// Part of the replica identity key.
    pub is_key: bool,
    /// Column name.
    pub name: String,
    /// Type OID.
    pub type_oid: u32,
    /// Type modifier (`atttypmod`).
    pub type_modifier: i32,
}

/// The old side of an update or delete.
#[derive(Debug, Clone, PartialEq)]
pub enum OldTuple {
    /// `K`: only the key columns are set.
    Key(Tuple),
    /// `O`: the whole old row (REPLICA IDENTITY FULL).
    Full(Tuple),
}

/// A row's column values, in relation column order.
#[derive(Debug, Clone, PartialEq)]
pub struct Tuple(pub Vec<TupleValue>);

/// One column value.
#[derive(Debug, Clone, PartialEq)]
pub enum TupleValue {
    /// `n`: SQL NULL.
    Null,
    /// `u`: an unchanged TOASTed value that was not sent.
    UnchangedToast,
    /// `t`: the value in text format.
    Text(Bytes),
    /// `b`: the value in binary format.
    Binary(Bytes),
}

/// Why a message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The message ended inside `what`.
    #[error("message truncated while reading {what}")]
    Truncated {
        /// The field being read.
        what: &'static str,
    },
    /// An unknown message tag.
    #[error("unknown message tag {0:#04x}")]
    UnknownTag(u8),
    /// An unknown tuple or sub-message marker.
    #[error("unexpected {what} marker {marker:#04x}")]
    BadMarker {
        /// Where.
        what: &'static str,
        /// The byte found.
        marker: u8,
    },
    /// A negative length or count.
    #[error("invalid length {len} for {what}")]
    BadLength {
        /// Where.
        what: &'static str,
        /// The value found.
        len: i64,
    },
    /// A name that is not UTF-8.
    #[error("{what} is not valid utf-8")]
    InvalidUtf8 {
        /// Which field.
        what: &'static str,
    },
    /// Bytes left after the message.
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
}

/// A cursor over the message bytes.
struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .ok_or(DecodeError::Truncated { what })?;
        let slice = &self.buf[self.pos..end];
        self.pos = end;
        Ok(slice)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        Ok(self.u32(what)? as i32)
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        Ok(self.u64(what)? as i64)
    }

    /// A NUL-terminated string.
    fn cstr(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let rest = &self.buf[self.pos..];
        let nul = rest
            .iter()
            .position(|b| *b == 0)
            .ok_or(DecodeError::Truncated { what })?;
        let s = std::str::from_utf8(&rest[..nul])
            .map_err(|_| DecodeError::InvalidUtf8 { what })?
            .to_owned();
        self.pos += nul + 1;
        Ok(s)
    }

    /// `n` bytes as a zero-copy slice of the input.
    fn bytes(&mut self, n: usize, what: &'static str) -> Result<Bytes, DecodeError> {
        let start = self.pos;
        self.take(n, what)?;
        Ok(self.buf.slice(start..self.pos))
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        let n = self.u16("tuple column count")? as usize;
        // Each column takes at least one byte: never reserve more than the input can hold.
        let mut values = Vec::with_capacity(n.min(self.remaining()));
        for _ in 0..n {
            let v = match self.u8("tuple value kind")? {
                b'n' => TupleValue::Null,
                b'u' => TupleValue::UnchangedToast,
                kind @ (b't' | b'b') => {
                    let len = self.i32("value length")?;
                    let len = usize::try_from(len).map_err(|_| DecodeError::BadLength {
                        what: "value",
                        len: len.into(),
                    })?;
                    let data = self.bytes(len, "value")?;
                    if kind == b't' {
                        TupleValue::Text(data)
                    } else {
                        TupleValue::Binary(data)
                    }
                }
                marker => {
                    return Err(DecodeError::BadMarker {
                        what: "tuple value",
                        marker,
                    })
                }
            };
            values.push(v);
        }
        Ok(Tuple(values))
    }

    fn relation(&mut self) -> Result<Relation, DecodeError> {
        let oid = self.u32("relation oid")?;
        let namespace = self.cstr("relation namespace")?;
        let name = self.cstr("relation name")?;
        let replica_identity = self.u8("replica identity")?;
        let n = self.u16("relation column count")? as usize;
        let mut columns = Vec::with_capacity(n.min(self.remaining() / 10));
        for _ in 0..n {
            let flags = self.u8("column flags")?;
            let name = self.cstr("column name")?;
            let type_oid = self.u32("column type")?;
            let type_modifier = self.i32("column type modifier")?;
            columns.push(Column {
                is_key: flags & 1 == 1,
                name,
                type_oid,
                type_modifier,
            });
        }
        Ok(Relation {
            oid,
            namespace,
            name,
            replica_identity,
            columns,
        })
    }

    fn old_tuple(&mut self, marker: u8) -> Result<OldTuple, DecodeError> {
        match marker {
            b'K' => Ok(OldTuple::Key(self.tuple()?)),
            b'O' => Ok(OldTuple::Full(self.tuple()?)),
            marker => Err(DecodeError::BadMarker {
                what: "old tuple",
                marker,
            }),
        }
    }

    fn new_marker(&mut self, marker: u8) -> Result<(), DecodeError> {
        if marker == b'N' {
            Ok(())
        } else {
            Err(DecodeError::BadMarker {
                what: "new tuple",
                marker,
            })
        }
    }
}

/// Decode one pgoutput message (the payload of an XLogData).
pub fn decode(buf: &Bytes) -> Result<PgOutputMessage, DecodeError> {
    let mut r = Reader { buf, pos: 0 };
    let msg = match r.u8("message tag")? {
        b'B' => PgOutputMessage::Begin {
            final_lsn: r.u64("begin final lsn")?,
            commit_time_micros: r.i64("begin timestamp")?,
            xid: r.u32("begin xid")?,
        },
        b'C' => PgOutputMessage::Commit {
            flags: r.u8("commit flags")?,
            commit_lsn: r.u64("commit lsn")?,
            end_lsn: r.u64("commit end lsn")?,
            commit_time_micros: r.i64("commit timestamp")?,
        },
        b'O' => PgOutputMessage::Origin {
            commit_lsn: r.u64("origin lsn")?,
            name: r.cstr("origin name")?,
        },
        b'R' => PgOutputMessage::Relation(r.relation()?),
        b'Y' => PgOutputMessage::Type {
            oid: r.u32("type oid")?,
            namespace: r.cstr("type namespace")?,
            name: r.cstr("type name")?,
        },
        b'I' => {
            let relation_oid = r.u32("insert relation")?;
            let marker = r.u8("insert marker")?;
            r.new_marker(marker)?;
            PgOutputMessage::Insert {
                relation_oid,
                new: r.tuple()?,
            }
        }
        b'U' => {
            let relation_oid = r.u32("update relation")?;
            let marker = r.u8("update marker")?;
            let old = if marker == b'N' {
                None
            } else {
                Some(r.old_tuple(marker)?)
            };
            if old.is_some() {
                let marker = r.u8("update new marker")?;
                r.new_marker(marker)?;
            }
            PgOutputMessage::Update {
                relation_oid,
                old,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let relation_oid = r.u32("delete relation")?;
            let marker = r.u8("delete marker")?;
            PgOutputMessage::Delete {
                relation_oid,
                old: r.old_tuple(marker)?,
            }
        }
        b'T' => {
            let n = r.u32("truncate relation count")? as usize;
            let options = r.u8("truncate options")?;
            let mut relation_oids = Vec::with_capacity(n.min(r.remaining() / 4));
            for _ in 0..n {
                relation_oids.push(r.u32("truncate relation")?);
            }
            PgOutputMessage::Truncate {
                options,
                relation_oids,
            }
        }
        b'M' => {
            let transactional = r.u8("message flags")? & 1 == 1;
            let lsn = r.u64("message lsn")?;
            let prefix = r.cstr("message prefix")?;
            let len = r.i32("message length")?;
            let len = usize::try_from(len).map_err(|_| DecodeError::BadLength {
                what: "message",
                len: len.into(),
            })?;
            PgOutputMessage::Message {
                transactional,
                lsn,
                prefix,
                content: r.bytes(len, "message content")?,
            }
        }
        tag => return Err(DecodeError::UnknownTag(tag)),
    };
    match r.remaining() {
        0 => Ok(msg),
        n => Err(DecodeError::Trailing(n)),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use proptest::prelude::*;

    use super::*;

    /// A test-only encoder: the inverse of `decode`.
    pub(crate) fn encode(msg: &PgOutputMessage) -> Bytes {
        let mut b = Vec::new();
        let cstr = |b: &mut Vec<u8>, s: &str| {
            b.extend_from_slice(s.as_bytes());
            b.push(0);
        };
        let tuple = |b: &mut Vec<u8>, t: &Tuple| {
            b.extend_from_slice(&(t.0.len() as u16).to_be_bytes());
            for v in &t.0 {
                match v {
                    TupleValue::Null => b.push(b'n'),
                    TupleValue::UnchangedToast => b.push(b'u'),
                    TupleValue::Text(d) | TupleValue::Binary(d) => {
                        b.push(if matches!(v, TupleValue::Text(_)) {
                            b't'
                        } else {
                            b'b'
                        });
                        b.extend_from_slice(&(d.len() as i32).to_be_bytes());
                        b.extend_from_slice(d);
                    }
                }
            }
        };
        let old = |b: &mut Vec<u8>, o: &OldTuple| match o {
            OldTuple::Key(t) => {
                b.push(b'K');
                tuple(b, t);
            }
            OldTuple::Full(t) => {
                b.push(b'O');
                tuple(b, t);
            }
        };
        match msg {
            PgOutputMessage::Begin {
                final_lsn,
                commit_time_micros,
                xid,
            } => {
                b.push(b'B');
                b.extend_from_slice(&final_lsn.to_be_bytes());
                b.extend_from_slice(&commit_time_micros.to_be_bytes());
                b.extend_from_slice(&xid.to_be_bytes());
            }
            PgOutputMessage::Commit {
                flags,
                commit_lsn,
                end_lsn,
                commit_time_micros,
            } => {
                b.push(b'C');
                b.push(*flags);
                b.extend_from_slice(&commit_lsn.to_be_bytes());
                b.extend_from_slice(&end_lsn.to_be_bytes());
                b.extend_from_slice(&commit_time_micros.to_be_bytes());
            }
            PgOutputMessage::Origin { commit_lsn, name } => {
                b.push(b'O');
                b.extend_from_slice(&commit_lsn.to_be_bytes());
                cstr(&mut b, name);
            }
            PgOutputMessage::Relation(r) => {
                b.push(b'R');
                b.extend_from_slice(&r.oid.to_be_bytes());
                cstr(&mut b, &r.namespace);
                cstr(&mut b, &r.name);
                b.push(r.replica_identity);
                b.extend_from_slice(&(r.columns.len() as u16).to_be_bytes());
                for c in &r.columns {
                    b.push(u8::from(c.is_key));
                    cstr(&mut b, &c.name);
                    b.extend_from_slice(&c.type_oid.to_be_bytes());
                    b.extend_from_slice(&c.type_modifier.to_be_bytes());
                }
            }
            PgOutputMessage::Type {
                oid,
                namespace,
                name,
            } => {
                b.push(b'Y');
                b.extend_from_slice(&oid.to_be_bytes());
                cstr(&mut b, namespace);
                cstr(&mut b, name);
            }
            PgOutputMessage::Insert { relation_oid, new } => {
                b.push(b'I');
                b.extend_from_slice(&relation_oid.to_be_bytes());
                b.push(b'N');
                tuple(&mut b, new);
            }
            PgOutputMessage::Update {
                relation_oid,
                old: o,
                new,
            } => {
                b.push(b'U');
                b.extend_from_slice(&relation_oid.to_be_bytes());
                if let Some(o) = o {
                    old(&mut b, o);
                }
                b.push(b'N');
                tuple(&mut b, new);
            }
            PgOutputMessage::Delete {
                relation_oid,
                old: o,
            } => {
                b.push(b'D');
                b.extend_from_slice(&relation_oid.to_be_bytes());
                old(&mut b, o);
            }
            PgOutputMessage::Truncate {
                options,
                relation_oids,
            } => {
                b.push(b'T');
                b.extend_from_slice(&(relation_oids.len() as u32).to_be_bytes());
                b.push(*options);
                for oid in relation_oids {
                    b.extend_from_slice(&oid.to_be_bytes());
                }
            }
            PgOutputMessage::Message {
                transactional,
                lsn,
                prefix,
                content,
            } => {
                b.push(b'M');
                b.push(u8::from(*transactional));
                b.extend_from_slice(&lsn.to_be_bytes());
                cstr(&mut b, prefix);
                b.extend_from_slice(&(content.len() as i32).to_be_bytes());
                b.extend_from_slice(content);
            }
        }
        Bytes::from(b)
    }

    fn text(s: &str) -> TupleValue {
        TupleValue::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn samples() -> Vec<PgOutputMessage> {
        let t = Tuple(vec![
            text("1"),
            TupleValue::Null,
            TupleValue::UnchangedToast,
            TupleValue::Binary(Bytes::from_static(b"\x00\x01")),
        ]);
        vec![
            PgOutputMessage::Begin {
                final_lsn: 0x16_B374_D848,
                commit_time_micros: 7,
                xid: 42,
            },
            PgOutputMessage::Commit {
                flags: 0,
                commit_lsn: 1,
                end_lsn: 2,
                commit_time_micros: -3,
            },
            PgOutputMessage::Origin {
                commit_lsn: 9,
                name: "node_a".into(),
            },
            PgOutputMessage::Relation(Relation {
                oid: 16384,
                namespace: "public".into(),
                name: "users".into(),
                replica_identity: b'd',
                columns: vec![
                    Column {
                        is_key: true,
                        name: "id".into(),
                        type_oid: 23,
                        type_modifier: -1,
                    },
                    Column {
                        is_key: false,
                        name: "name".into(),
                        type_oid: 1043,
                        type_modifier: 14,
                    },
                ],
            }),
            PgOutputMessage::Type {
                oid: 99999,
                namespace: "public".into(),
                name: "mood".into(),
            },
            PgOutputMessage::Insert {
                relation_oid: 16384,
                new: t.clone(),
            },
            PgOutputMessage::Update {
                relation_oid: 16384,
                old: None,
                new: t.clone(),
            },
            PgOutputMessage::Update {
                relation_oid: 16384,
                old: Some(OldTuple::Key(t.clone())),
                new: t.clone(),
            },
            PgOutputMessage::Update {
                relation_oid: 16384,
                old: Some(OldTuple::Full(t.clone())),
                new: t.clone(),
            },
            PgOutputMessage::Delete {
                relation_oid: 16384,
                old: OldTuple::Key(t.clone()),
            },
            PgOutputMessage::Delete {
                relation_oid: 16384,
                old: OldTuple::Full(t),
            },
            PgOutputMessage::Truncate {
                options: 3,
                relation_oids: vec![1, 2, 3],
            },
            PgOutputMessage::Message {
                transactional: true,
                lsn: 5,
                prefix: "pgcdc".into(),
                content: Bytes::from_static(b"hi"),
            },
        ]
    }

    #[test]
    fn every_message_kind_round_trips() {
        for msg in samples() {
            assert_eq!(decode(&encode(&msg)), Ok(msg));
        }
    }

    #[test]
    fn every_truncation_is_an_error() {
        for msg in samples() {
            let full = encode(&msg);
            for cut in 0..full.len() {
                assert!(
                    decode(&full.slice(..cut)).is_err(),
                    "{msg:?} cut at {cut} decoded"
                );
            }
        }
    }

    #[test]
    fn values_are_zero_copy_slices() {
        let bytes = encode(&PgOutputMessage::Insert {
            relation_oid: 1,
            new: Tuple(vec![text("abc")]),
        });
        let PgOutputMessage::Insert { new, .. } = decode(&bytes).unwrap() else {
            panic!("not an insert")
        };
        let TupleValue::Text(v) = &new.0[0] else {
            panic!("not text")
        };
        assert_eq!(v.as_ptr(), bytes[bytes.len() - 3..].as_ptr());
    }

    #[test]
    fn malformed_input_is_refused() {
        let bad = |b: &[u8]| decode(&Bytes::copy_from_slice(b)).unwrap_err();
        assert_eq!(bad(b"Z"), DecodeError::UnknownTag(b'Z'));
        assert!(matches!(
            bad(b"I\0\0\0\x01X\0\0"),
            DecodeError::BadMarker { .. }
        ));
        assert!(matches!(
            bad(b"I\0\0\0\x01N\0\x01t\xff\xff\xff\xff"),
            DecodeError::BadLength { .. }
        ));
        // A huge column count with no data must fail, not allocate.
        assert!(matches!(
            bad(b"I\0\0\0\x01N\xff\xff"),
            DecodeError::Truncated { .. }
        ));
        assert!(matches!(
            bad(b"T\xff\xff\xff\xff\0"),
            DecodeError::Truncated { .. }
        ));
        assert!(matches!(
            bad(b"Y\0\0\0\x01\xff\0x\0"),
            DecodeError::InvalidUtf8 { .. }
        ));
        assert_eq!(
            bad(b"B\0\0\0\0\0\0\0\x01\0\0\0\0\0\0\0\x02\0\0\0\x03!"),
            DecodeError::Trailing(1)
        );
    }

    fn arb_value() -> impl Strategy<Value = TupleValue> {
        prop_oneof![
            Just(TupleValue::Null),
            Just(TupleValue::UnchangedToast),
            proptest::collection::vec(any::<u8>(), 0..20)
                .prop_map(|v| TupleValue::Text(Bytes::from(v))),
            proptest::collection::vec(any::<u8>(), 0..20)
                .prop_map(|v| TupleValue::Binary(Bytes::from(v))),
        ]
    }

    fn arb_tuple() -> impl Strategy<Value = Tuple> {
        proptest::collection::vec(arb_value(), 0..8).prop_map(Tuple)
    }

    fn arb_message() -> impl Strategy<Value = PgOutputMessage> {
        let name = "[a-zA-Z_é ]{0,12}";
        let column = (any::<bool>(), name, any::<u32>(), any::<i32>()).prop_map(
            |(is_key, name, type_oid, type_modifier)| Column {
                is_key,
                name,
                type_oid,
                type_modifier,
            },
        );
        let old = prop_oneof![
            arb_tuple().prop_map(OldTuple::Key),
            arb_tuple().prop_map(OldTuple::Full)
        ];
        prop_oneof![
            (any::<u32>(), arb_tuple())
                .prop_map(|(relation_oid, new)| PgOutputMessage::Insert { relation_oid, new }),
            (any::<u32>(), proptest::option::of(old.clone()), arb_tuple()).prop_map(
                |(relation_oid, old, new)| PgOutputMessage::Update {
                    relation_oid,
                    old,
                    new
                }
            ),
            (any::<u32>(), old)
                .prop_map(|(relation_oid, old)| PgOutputMessage::Delete { relation_oid, old }),
            (
                any::<u32>(),
                name,
                name,
                any::<u8>(),
                proptest::collection::vec(column, 0..6)
            )
                .prop_map(|(oid, namespace, name, replica_identity, columns)| {
                    PgOutputMessage::Relation(Relation {
                        oid,
                        namespace,
                        name,
                        replica_identity,
                        columns,
                    })
                }),
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&Bytes::from(data));
        }

        #[test]
        fn arbitrary_bytes_after_each_tag_never_panic(
            tag in prop::sample::select(b"BCORYIUDTM".to_vec()),
            data in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let mut b = vec![tag];
            b.extend(data);
            let _ = decode(&Bytes::from(b));
        }

        #[test]
        fn generated_messages_round_trip(msg in arb_message()) {
            prop_assert_eq!(decode(&encode(&msg)), Ok(msg));
        }
    }
}
