//! pgoutput (logical replication protocol version 1) message decoder.
//!
//! Pure and total: any byte string decodes to a message or an error, never a
//! panic, and allocations are bounded by the input's length (a count read from
//! the wire only ever reserves what the remaining bytes could hold). Tuple
//! values and message contents are zero-copy slices of the input.
//!
//! Layouts follow PostgreSQL's "Logical Replication Message Formats"; all
//! integers are big-endian, strings are NUL-terminated UTF-8. One call decodes
//! exactly one message (the payload of one XLogData): bytes left over are an
//! error, because they mean the layout was misread.

use bytes::Bytes;

/// One decoded pgoutput message.
#[derive(Debug, Clone, PartialEq)]
pub enum PgOutputMessage {
    /// `B`: a transaction begins.
    Begin {
        /// LSN of the transaction's commit record.
        final_lsn: u64,
        /// Commit time, microseconds since 2000-01-01 (the PostgreSQL epoch).
        commit_time_micros: i64,
        /// Transaction id.
        xid: u32,
    },
    /// `C`: the transaction committed.
    Commit {
        /// Flags (currently unused, 0).
        flags: u8,
        /// LSN of the commit record.
        commit_lsn: u64,
        /// End LSN of the transaction.
        end_lsn: u64,
        /// Commit time, microseconds since 2000-01-01.
        commit_time_micros: i64,
    },
    /// `O`: the transaction came from another replication origin.
    Origin {
        /// Commit LSN on the origin server.
        commit_lsn: u64,
        /// Origin name.
        name: String,
    },
    /// `R`: describes a relation before its first change (and after DDL).
    Relation(Relation),
    /// `Y`: describes a non-built-in type used by a relation.
    Type {
        /// Type OID.
        oid: u32,
        /// Schema of the type (empty for `pg_catalog`).
        namespace: String,
        /// Type name.
        name: String,
    },
    /// `I`: a row was inserted.
    Insert {
        /// Relation OID, as in a preceding `Relation` message.
        relation_oid: u32,
        /// The new row.
        new: Tuple,
    },
    /// `U`: a row was updated.
    Update {
        /// Relation OID, as in a preceding `Relation` message.
        relation_oid: u32,
        /// The old key (`K`, when the key changed) or old row (`O`, REPLICA
        /// IDENTITY FULL); absent otherwise.
        old: Option<OldTuple>,
        /// The new row.
        new: Tuple,
    },
    /// `D`: a row was deleted.
    Delete {
        /// Relation OID, as in a preceding `Relation` message.
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
        /// Emitted inside a transaction (flag bit 1).
        transactional: bool,
        /// LSN of the message.
        lsn: u64,
        /// Application prefix.
        prefix: String,
        /// Payload, a zero-copy slice of the input.
        content: Bytes,
    },
}

/// A relation (table) description.
#[derive(Debug, Clone, PartialEq)]
pub struct Relation {
    /// Relation OID.
    pub oid: u32,
    /// Schema name (empty for `pg_catalog`).
    pub namespace: String,
    /// Table name.
    pub name: String,
    /// Replica identity (`relreplident`): `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    /// Columns in order (generated columns are not sent).
    pub columns: Vec<Column>,
}

/// One column of a relation.
#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    /// Part of the replica identity key (column flag bit 1).
    pub is_key: bool,
    /// Column name.
    pub name: String,
    /// Type OID.
    pub type_oid: u32,
    /// Type modifier (`atttypmod`, -1 when none).
    pub type_modifier: i32,
}

/// The old side of an update or delete.
#[derive(Debug, Clone, PartialEq)]
pub enum OldTuple {
    /// `K`: only the key columns are set; the others are sent as NULL.
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
    /// An unknown tuple, old-tuple or new-tuple marker.
    #[error("unexpected {what} marker {marker:#04x}")]
    BadMarker {
        /// Where.
        what: &'static str,
        /// The byte found.
        marker: u8,
    },
    /// A negative length.
    #[error("invalid length {len} for {what}")]
    BadLength {
        /// Where.
        what: &'static str,
        /// The value found.
        len: i64,
    },
    /// A string that is not UTF-8.
    #[error("{what} is not valid utf-8")]
    InvalidUtf8 {
        /// Which field.
        what: &'static str,
    },
    /// Bytes left after the message.
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
}

/// Decode one pgoutput message (the payload of one XLogData).
pub fn decode(buf: &Bytes) -> Result<PgOutputMessage, DecodeError> {
    let mut r = Reader { buf, pos: 0 };
    let msg = match r.u8("message tag")? {
        b'B' => begin(&mut r)?,
        b'C' => commit(&mut r)?,
        b'O' => origin(&mut r)?,
        b'R' => PgOutputMessage::Relation(relation(&mut r)?),
        b'Y' => type_message(&mut r)?,
        b'I' => insert(&mut r)?,
        b'U' => update(&mut r)?,
        b'D' => delete(&mut r)?,
        b'T' => truncate(&mut r)?,
        b'M' => logical_message(&mut r)?,
        tag => return Err(DecodeError::UnknownTag(tag)),
    };
    match r.remaining() {
        0 => Ok(msg),
        n => Err(DecodeError::Trailing(n)),
    }
}

/// `B`: final LSN, commit time, xid.
fn begin(r: &mut Reader<'_>) -> Result<PgOutputMessage, DecodeError> {
    Ok(PgOutputMessage::Begin {
        final_lsn: r.u64("begin final lsn")?,
        commit_time_micros: r.i64("begin timestamp")?,
        xid: r.u32("begin xid")?,
    })
}

/// `C`: flags, commit LSN, end LSN, commit time.
fn commit(r: &mut Reader<'_>) -> Result<PgOutputMessage, DecodeError> {
    Ok(PgOutputMessage::Commit {
        flags: r.u8("commit flags")?,
        commit_lsn: r.u64("commit lsn")?,
        end_lsn: r.u64("commit end lsn")?,
        commit_time_micros: r.i64("commit timestamp")?,
    })
}

/// `O`: origin commit LSN, origin name.
fn origin(r: &mut Reader<'_>) -> Result<PgOutputMessage, DecodeError> {
    Ok(PgOutputMessage::Origin {
        commit_lsn: r.u64("origin lsn")?,
        name: r.cstr("origin name")?,
    })
}

/// `R`: oid, namespace, name, replica identity, column count, then per column
/// flags, name, type oid and type modifier.
fn relation(r: &mut Reader<'_>) -> Result<Relation, DecodeError> {
    let oid = r.u32("relation oid")?;
    let namespace = r.cstr("relation namespace")?;
    let name = r.cstr("relation name")?;
    let replica_identity = r.u8("replica identity")?;
    let n = usize::from(r.u16("relation column count")?);
    // A column takes at least 10 bytes (flags, NUL, oid, typmod).
    let mut columns = Vec::with_capacity(n.min(r.remaining() / 10));
    for _ in 0..n {
        columns.push(Column {
            is_key: r.u8("column flags")? & 1 == 1,
            name: r.cstr("column name")?,
            type_oid: r.u32("column type")?,
            type_modifier: r.i32("column type modifier")?,
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

/// `Y`: oid, namespace, name.
fn type_message(r: &mut Reader<'_>) -> Result<PgOutputMessage, DecodeError> {
    Ok(PgOutputMessage::Type {
        oid: r.u32("type oid")?,
        namespace: r.cstr("type namespace")?,
        name: r.cstr("type name")?,
    })
}

/// `I`: relation oid, `N`, new tuple.
fn insert(r: &mut Reader<'_>) -> Result<PgOutputMessage, DecodeError> {
    let relation_oid = r.u32("insert relation")?;
    let marker = r.u8("insert new marker")?;
    expect_new(marker)?;
    Ok(PgOutputMessage::Insert {
        relation_oid,
        new: r.tuple()?,
    })
}

/// `U`: relation oid, optional `K`/`O` old tuple, `N`, new tuple.
fn update(r: &mut Reader<'_>) -> Result<PgOutputMessage, DecodeError> {
    let relation_oid = r.u32("update relation")?;
    let mut marker = r.u8("update marker")?;
    let old = match marker {
        b'N' => None,
        _ => {
            let old = old_tuple(r, marker)?;
            marker = r.u8("update new marker")?;
            Some(old)
        }
    };
    expect_new(marker)?;
    Ok(PgOutputMessage::Update {
        relation_oid,
        old,
        new: r.tuple()?,
    })
}

/// `D`: relation oid, `K`/`O` old tuple.
fn delete(r: &mut Reader<'_>) -> Result<PgOutputMessage, DecodeError> {
    let relation_oid = r.u32("delete relation")?;
    let marker = r.u8("delete marker")?;
    Ok(PgOutputMessage::Delete {
        relation_oid,
        old: old_tuple(r, marker)?,
    })
}

/// `T`: relation count, options, relation oids.
fn truncate(r: &mut Reader<'_>) -> Result<PgOutputMessage, DecodeError> {
    let n = r.u32("truncate relation count")?;
    let options = r.u8("truncate options")?;
    let n = usize::try_from(n).unwrap_or(usize::MAX);
    let mut relation_oids = Vec::with_capacity(n.min(r.remaining() / 4));
    for _ in 0..n {
        relation_oids.push(r.u32("truncate relation")?);
    }
    Ok(PgOutputMessage::Truncate {
        options,
        relation_oids,
    })
}

/// `M`: flags, LSN, prefix, content length, content.
fn logical_message(r: &mut Reader<'_>) -> Result<PgOutputMessage, DecodeError> {
    let transactional = r.u8("message flags")? & 1 == 1;
    let lsn = r.u64("message lsn")?;
    let prefix = r.cstr("message prefix")?;
    let len = r.len("message content")?;
    Ok(PgOutputMessage::Message {
        transactional,
        lsn,
        prefix,
        content: r.bytes(len, "message content")?,
    })
}

/// The old tuple announced by `marker` (`K` or `O`).
fn old_tuple(r: &mut Reader<'_>, marker: u8) -> Result<OldTuple, DecodeError> {
    match marker {
        b'K' => Ok(OldTuple::Key(r.tuple()?)),
        b'O' => Ok(OldTuple::Full(r.tuple()?)),
        marker => Err(DecodeError::BadMarker {
            what: "old tuple",
            marker,
        }),
    }
}

/// Checks the `N` marker that precedes a new tuple.
fn expect_new(marker: u8) -> Result<(), DecodeError> {
    match marker {
        b'N' => Ok(()),
        marker => Err(DecodeError::BadMarker {
            what: "new tuple",
            marker,
        }),
    }
}

/// A bounds-checked cursor over the message bytes.
struct Reader<'a> {
    /// The whole message.
    buf: &'a Bytes,
    /// Next byte to read; never beyond `buf.len()`.
    pos: usize,
}

impl<'a> Reader<'a> {
    /// The next `n` bytes, or `Truncated` if fewer are left.
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let buf: &'a [u8] = self.buf;
        let slice = self
            .pos
            .checked_add(n)
            .and_then(|end| buf.get(self.pos..end))
            .ok_or(DecodeError::Truncated { what })?;
        self.pos += n;
        Ok(slice)
    }

    /// The next `N` bytes as an array.
    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    /// An `Int8`/`Byte1`.
    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(u8::from_be_bytes(self.array(what)?))
    }

    /// An `Int16`.
    fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }

    /// An unsigned `Int32` (OIDs, xids, counts).
    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    /// A signed `Int32`.
    fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.array(what)?))
    }

    /// An unsigned `Int64` (LSNs).
    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }

    /// A signed `Int64` (timestamps).
    fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.array(what)?))
    }

    /// An `Int32` length that must not be negative.
    fn len(&mut self, what: &'static str) -> Result<usize, DecodeError> {
        let len = self.i32(what)?;
        usize::try_from(len).map_err(|_| DecodeError::BadLength {
            what,
            len: len.into(),
        })
    }

    /// A NUL-terminated UTF-8 string.
    fn cstr(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let rest = self.buf.get(self.pos..).unwrap_or_default();
        let nul = rest
            .iter()
            .position(|b| *b == 0)
            .ok_or(DecodeError::Truncated { what })?;
        let text = self.take(nul + 1, what)?;
        let s = std::str::from_utf8(&text[..nul]).map_err(|_| DecodeError::InvalidUtf8 { what })?;
        Ok(s.to_owned())
    }

    /// `n` bytes as a zero-copy slice of the input.
    fn bytes(&mut self, n: usize, what: &'static str) -> Result<Bytes, DecodeError> {
        let start = self.pos;
        self.take(n, what)?;
        Ok(self.buf.slice(start..self.pos))
    }

    /// Bytes not yet read.
    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    /// TupleData: column count, then per column a kind byte and, for `t`/`b`,
    /// a length and the value bytes.
    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        let n = usize::from(self.u16("tuple column count")?);
        // A column takes at least its kind byte.
        let mut values = Vec::with_capacity(n.min(self.remaining()));
        for _ in 0..n {
            values.push(self.tuple_value()?);
        }
        Ok(Tuple(values))
    }

    /// One TupleData column.
    fn tuple_value(&mut self) -> Result<TupleValue, DecodeError> {
        match self.u8("tuple value kind")? {
            b'n' => Ok(TupleValue::Null),
            b'u' => Ok(TupleValue::UnchangedToast),
            b't' => {
                let len = self.len("text value length")?;
                Ok(TupleValue::Text(self.bytes(len, "text value")?))
            }
            b'b' => {
                let len = self.len("binary value length")?;
                Ok(TupleValue::Binary(self.bytes(len, "binary value")?))
            }
            marker => Err(DecodeError::BadMarker {
                what: "tuple value",
                marker,
            }),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use proptest::prelude::*;

    use super::*;

    /// A test-only encoder: the inverse of `decode`.
    pub(crate) fn encode(msg: &PgOutputMessage) -> Bytes {
        let mut b = Vec::new();
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
                put_cstr(&mut b, name);
            }
            PgOutputMessage::Relation(r) => put_relation(&mut b, r),
            PgOutputMessage::Type {
                oid,
                namespace,
                name,
            } => {
                b.push(b'Y');
                b.extend_from_slice(&oid.to_be_bytes());
                put_cstr(&mut b, namespace);
                put_cstr(&mut b, name);
            }
            PgOutputMessage::Insert { .. }
            | PgOutputMessage::Update { .. }
            | PgOutputMessage::Delete { .. } => put_change(&mut b, msg),
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
                put_cstr(&mut b, prefix);
                b.extend_from_slice(&(content.len() as i32).to_be_bytes());
                b.extend_from_slice(content);
            }
        }
        Bytes::from(b)
    }

    /// Appends a NUL-terminated string.
    fn put_cstr(b: &mut Vec<u8>, s: &str) {
        b.extend_from_slice(s.as_bytes());
        b.push(0);
    }

    /// Appends a Relation message.
    fn put_relation(b: &mut Vec<u8>, r: &Relation) {
        b.push(b'R');
        b.extend_from_slice(&r.oid.to_be_bytes());
        put_cstr(b, &r.namespace);
        put_cstr(b, &r.name);
        b.push(r.replica_identity);
        b.extend_from_slice(&(r.columns.len() as u16).to_be_bytes());
        for c in &r.columns {
            b.push(u8::from(c.is_key));
            put_cstr(b, &c.name);
            b.extend_from_slice(&c.type_oid.to_be_bytes());
            b.extend_from_slice(&c.type_modifier.to_be_bytes());
        }
    }

    /// Appends an Insert, Update or Delete message.
    fn put_change(b: &mut Vec<u8>, msg: &PgOutputMessage) {
        match msg {
            PgOutputMessage::Insert { relation_oid, new } => {
                b.push(b'I');
                b.extend_from_slice(&relation_oid.to_be_bytes());
                b.push(b'N');
                put_tuple(b, new);
            }
            PgOutputMessage::Update {
                relation_oid,
                old,
                new,
            } => {
                b.push(b'U');
                b.extend_from_slice(&relation_oid.to_be_bytes());
                if let Some(old) = old {
                    put_old(b, old);
                }
                b.push(b'N');
                put_tuple(b, new);
            }
            PgOutputMessage::Delete { relation_oid, old } => {
                b.push(b'D');
                b.extend_from_slice(&relation_oid.to_be_bytes());
                put_old(b, old);
            }
            _ => unreachable!("not a row change"),
        }
    }

    /// Appends a `K`/`O` marker and its tuple.
    fn put_old(b: &mut Vec<u8>, old: &OldTuple) {
        let (marker, t) = match old {
            OldTuple::Key(t) => (b'K', t),
            OldTuple::Full(t) => (b'O', t),
        };
        b.push(marker);
        put_tuple(b, t);
    }

    /// Appends TupleData.
    fn put_tuple(b: &mut Vec<u8>, t: &Tuple) {
        b.extend_from_slice(&(t.0.len() as u16).to_be_bytes());
        for v in &t.0 {
            let (kind, data) = match v {
                TupleValue::Null => (b'n', None),
                TupleValue::UnchangedToast => (b'u', None),
                TupleValue::Text(d) => (b't', Some(d)),
                TupleValue::Binary(d) => (b'b', Some(d)),
            };
            b.push(kind);
            if let Some(d) = data {
                b.extend_from_slice(&(d.len() as i32).to_be_bytes());
                b.extend_from_slice(d);
            }
        }
    }

    fn text(s: &str) -> TupleValue {
        TupleValue::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn bad(b: &[u8]) -> DecodeError {
        decode(&Bytes::copy_from_slice(b)).unwrap_err()
    }

    fn users() -> Relation {
        Relation {
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
        }
    }

    /// One message of every kind and every optional shape.
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
            PgOutputMessage::Relation(users()),
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
    fn hand_built_bytes_decode_to_the_documented_fields() {
        let begin = b"B\0\0\0\x16\xb3\x74\xd8\x48\0\0\0\0\0\0\0\x07\0\0\0\x2a";
        assert_eq!(
            decode(&Bytes::from_static(begin)),
            Ok(PgOutputMessage::Begin {
                final_lsn: 0x16_B374_D848,
                commit_time_micros: 7,
                xid: 42
            })
        );
        let rel = b"R\0\0\x40\0public\0users\0d\0\x02\
            \x01id\0\0\0\0\x17\xff\xff\xff\xff\
            \0name\0\0\0\x04\x13\0\0\0\x0e";
        assert_eq!(
            decode(&Bytes::from_static(rel)),
            Ok(PgOutputMessage::Relation(users()))
        );
        let upd = b"U\0\0\x40\0K\0\x02t\0\0\0\x011nN\0\x02t\0\0\0\x012u";
        assert_eq!(
            decode(&Bytes::from_static(upd)),
            Ok(PgOutputMessage::Update {
                relation_oid: 16384,
                old: Some(OldTuple::Key(Tuple(vec![text("1"), TupleValue::Null]))),
                new: Tuple(vec![text("2"), TupleValue::UnchangedToast]),
            })
        );
    }

    #[test]
    fn column_flags_other_than_the_key_bit_are_ignored() {
        let rel = b"R\0\0\0\x01\0t\0f\0\x01\x03c\0\0\0\0\x17\0\0\0\0";
        let Ok(PgOutputMessage::Relation(r)) = decode(&Bytes::from_static(rel)) else {
            panic!("not a relation")
        };
        assert!(r.columns[0].is_key);
        assert_eq!(r.namespace, "", "pg_catalog is sent as an empty namespace");
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
    fn unknown_tags_and_markers_are_refused() {
        assert_eq!(bad(b"Z"), DecodeError::UnknownTag(b'Z'));
        assert_eq!(
            bad(b""),
            DecodeError::Truncated {
                what: "message tag"
            }
        );
        assert!(matches!(
            bad(b"I\0\0\0\x01X\0\0"),
            DecodeError::BadMarker { .. }
        ));
        assert!(matches!(
            bad(b"I\0\0\0\x01N\0\x01x"),
            DecodeError::BadMarker { .. }
        ));
        // An update's old tuple must be followed by `N`.
        assert!(matches!(
            bad(b"U\0\0\0\x01K\0\0K\0\0"),
            DecodeError::BadMarker { .. }
        ));
        assert!(matches!(
            bad(b"D\0\0\0\x01N\0\0"),
            DecodeError::BadMarker { .. }
        ));
    }

    #[test]
    fn negative_lengths_bad_utf8_and_trailing_bytes_are_refused() {
        assert!(matches!(
            bad(b"I\0\0\0\x01N\0\x01t\xff\xff\xff\xff"),
            DecodeError::BadLength { .. }
        ));
        assert!(matches!(
            bad(b"M\x01\0\0\0\0\0\0\0\x01p\0\x80\0\0\0"),
            DecodeError::BadLength { .. }
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

    #[test]
    fn huge_counts_in_short_input_fail_without_reserving() {
        // Counts of 65535 columns or 4 billion relations in a few bytes must
        // fail on the missing data, not allocate for the claimed count.
        for input in [
            &b"I\0\0\0\x01N\xff\xff"[..],
            b"R\0\0\0\x01s\0t\0d\xff\xff\x01",
            b"T\xff\xff\xff\xff\0",
            b"I\0\0\0\x01N\xff\xfft\x7f\xff\xff\xff",
        ] {
            assert!(
                matches!(bad(input), DecodeError::Truncated { .. }),
                "{input:?}"
            );
        }
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

    fn arb_old() -> impl Strategy<Value = OldTuple> {
        prop_oneof![
            arb_tuple().prop_map(OldTuple::Key),
            arb_tuple().prop_map(OldTuple::Full)
        ]
    }

    /// Names as PostgreSQL may send them: any UTF-8 without NUL.
    const NAME: &str = "[^\u{0}]{0,12}";

    fn arb_relation() -> impl Strategy<Value = PgOutputMessage> {
        let column = (any::<bool>(), NAME, any::<u32>(), any::<i32>()).prop_map(
            |(is_key, name, type_oid, type_modifier)| Column {
                is_key,
                name,
                type_oid,
                type_modifier,
            },
        );
        let parts = (
            any::<u32>(),
            NAME,
            NAME,
            prop::sample::select(b"dnfi".to_vec()),
        );
        (parts, proptest::collection::vec(column, 0..6)).prop_map(
            |((oid, namespace, name, replica_identity), columns)| {
                PgOutputMessage::Relation(Relation {
                    oid,
                    namespace,
                    name,
                    replica_identity,
                    columns,
                })
            },
        )
    }

    fn arb_message() -> impl Strategy<Value = PgOutputMessage> {
        prop_oneof![
            (any::<u32>(), arb_tuple())
                .prop_map(|(relation_oid, new)| PgOutputMessage::Insert { relation_oid, new }),
            (any::<u32>(), proptest::option::of(arb_old()), arb_tuple()).prop_map(
                |(relation_oid, old, new)| PgOutputMessage::Update {
                    relation_oid,
                    old,
                    new
                }
            ),
            (any::<u32>(), arb_old())
                .prop_map(|(relation_oid, old)| PgOutputMessage::Delete { relation_oid, old }),
            arb_relation(),
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

        #[test]
        fn generated_messages_cut_short_never_decode(msg in arb_message(), cut in any::<prop::sample::Index>()) {
            let full = encode(&msg);
            let cut = cut.index(full.len());
            prop_assert!(decode(&full.slice(..cut)).is_err());
        }
    }
}
