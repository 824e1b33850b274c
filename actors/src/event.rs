//! The change event that flows from the replication (and snapshot) actors to Kafka.

use std::sync::Arc;

use crate::lsn::Lsn;
use crate::pg::types::Rule;

mod row;

pub use row::{Cell, Columns, Row, TextRow};

/// The kind of change, with Debezium's one-letter codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// A row was inserted (`c`).
    Create,
    /// A row was updated in place (`u`).
    Update,
    /// A row was deleted (`d`).
    Delete,
    /// A row read by a snapshot (`r`).
    Read,
    /// The table was truncated (`t`).
    Truncate,
}

impl Op {
    /// Debezium's code for the op.
    pub fn code(self) -> &'static str {
        match self {
            Op::Create => "c",
            Op::Update => "u",
            Op::Delete => "d",
            Op::Read => "r",
            Op::Truncate => "t",
        }
    }
}

/// Where a table's row key comes from: its replica identity, which is what
/// PostgreSQL sends as the old row of an UPDATE or DELETE.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum KeySource {
    /// The primary key (REPLICA IDENTITY DEFAULT, or FULL with a primary key).
    #[default]
    PrimaryKey,
    /// The columns of the REPLICA IDENTITY USING INDEX index.
    IdentityIndex,
    /// Every column (REPLICA IDENTITY FULL without a primary key): the key
    /// is not unique, so such a table is copied whole, never by key range.
    WholeRow,
}

/// A published table: its name and the columns that make its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableRef {
    /// Schema name, unquoted.
    pub schema: String,
    /// Table name, unquoted.
    pub name: String,
    /// Columns of the key, in order, by the replica identity rule (see
    /// [`KeySource`]); empty when the table has no key at the moment.
    pub key_columns: Vec<String>,
    /// Where the key columns come from.
    pub key_source: KeySource,
    /// Column name → PostgreSQL type name as a JSON object text, e.g.
    /// `{"id":"int4","name":"text"}` (empty before a Relation message is seen).
    /// Sent as the `pgcdc.types` header so sinks can derive index mappings.
    pub column_types: String,
}

impl TableRef {
    /// `schema.name`, its key and column types not yet known (for
    /// [`Shape::load`](crate::snapshot::Shape::load), which reads them).
    pub fn named(schema: String, name: String) -> TableRef {
        TableRef {
            schema,
            name,
            key_columns: Vec::new(),
            key_source: KeySource::default(),
            column_types: String::new(),
        }
    }
}

/// Where and when a change was committed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TxMeta {
    /// Transaction id.
    pub xid: u32,
    /// LSN of the transaction's commit record (pgoutput Begin's `final_lsn`),
    /// known from the first change on: the version of every change in the
    /// transaction, in Kafka headers and as the Elasticsearch `_version`.
    pub commit_lsn: Lsn,
    /// Commit time, microseconds since the Unix epoch.
    pub commit_time_us: i64,
}

/// One row change (or truncate) ready to be encoded for Kafka.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeEvent {
    /// What happened.
    pub op: Op,
    /// Which table.
    pub table: Arc<TableRef>,
    /// The key columns and their values; `None` for a truncate.
    pub key: Option<Row>,
    /// The row before the change, as far as the replica identity tells.
    pub before: Option<Row>,
    /// The row after the change.
    pub after: Option<Row>,
    /// Columns whose TOASTed value did not change and was not sent: absent
    /// from `after`, never replaced by a placeholder.
    pub unchanged_toast: Vec<String>,
    /// LSN of the change record itself.
    pub lsn: Lsn,
    /// Position of the change inside its transaction, from 0.
    pub seq: u32,
    /// The transaction the change belongs to.
    pub tx: TxMeta,
    /// Whether the row came from a snapshot rather than the stream.
    pub snapshot: bool,
}

impl ChangeEvent {
    /// The approximate size of the event's row data (`before` and `after`):
    /// the lengths of its texts, found without encoding anything.
    pub fn row_bytes(&self) -> usize {
        [&self.before, &self.after]
            .into_iter()
            .flatten()
            .map(Row::bytes)
            .sum()
    }
}

/// Rows a snapshot copied, still in PostgreSQL's text format: published as
/// `op=r` events and encoded straight from the text.
pub struct CopiedRows {
    /// Which table.
    pub table: Arc<TableRef>,
    /// The table's columns (name, how its values render), in the rows' order.
    pub columns: Arc<[(String, Rule)]>,
    /// Values are hex bytes, not text (a `SQL_ASCII` database).
    pub raw: bool,
    /// The rows.
    pub rows: Vec<tokio_postgres::SimpleQueryRow>,
    /// The snapshot's version: `commit_lsn` is the slot's consistent point.
    pub tx: TxMeta,
    /// Position of the first row, counting on per reader.
    pub first_seq: u32,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use serde_json::Value;

    use super::*;

    #[test]
    fn row_bytes_count_the_texts_of_the_row() {
        let obj = |v: Value| v.as_object().cloned();
        let row = |v: Value| obj(v).map(Row::from);
        let event = ChangeEvent {
            op: Op::Read,
            table: Arc::new(TableRef {
                schema: "public".into(),
                name: "t".into(),
                key_columns: vec!["id".into()],
                key_source: Default::default(),
                column_types: String::new(),
            }),
            key: row(json!({"id": 1})),
            before: None,
            after: row(json!({"id": 1, "body": "x".repeat(1000), "tags": ["ab", "cd"]})),
            unchanged_toast: Vec::new(),
            lsn: Lsn(1),
            seq: 0,
            tx: TxMeta {
                xid: 1,
                commit_lsn: Lsn(1),
                commit_time_us: 0,
            },
            snapshot: true,
        };
        // "id" + 8, "body" + 1000, "tags" + 2 + 2
        assert_eq!(event.row_bytes(), 2 + 8 + 4 + 1000 + 4 + 4);
    }
}
