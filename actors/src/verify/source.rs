//! The table side: one REPEATABLE READ snapshot, its WAL position, and rows
//! read inside it in keyset chunks or by key, rendered as events render them.

use std::collections::HashSet;

use serde_json::{Map, Value};
use tokio_postgres::{Client, SimpleQueryMessage};

use super::compare::Cut;
use super::VerifyError;
use crate::checkpoint::{KeyRange, KeyText};
use crate::es_writer::doc_id;
use crate::event::{ChangeEvent, TableRef, TxMeta};
use crate::lsn::Lsn;
use crate::pg::{catalog, session, PostgresConfig};
use crate::snapshot::shape::{trailing_xids, Shape};

/// A row as the comparison needs it: its document id, key text and rendered columns.
pub(crate) struct Row {
    /// The mirror document id of its key.
    pub id: String,
    /// Its key as text (to read it again or copy it).
    pub key: KeyText,
    /// Its columns, rendered as the events carry them.
    pub after: Map<String, Value>,
    /// Whether a transaction the snapshot does not see has changed or
    /// deleted it (its `xmax`): such a change can be in the mirror although
    /// the snapshot still has the row. A row lock sets `xmax` too, so this
    /// can hold for rows nothing changed. Read by key lookups only.
    pub held: bool,
}

/// A connection inside one REPEATABLE READ, READ ONLY transaction.
pub(crate) struct Snapshot {
    /// The connection.
    pub sql: Client,
    /// Which committed transactions the snapshot holds.
    pub cut: Cut,
}

impl Snapshot {
    /// Open a connection (with pgcdc's session settings) and a snapshot.
    pub async fn open(pg: &PostgresConfig) -> Result<Self, VerifyError> {
        let sql = crate::pg::connect(pg).await?;
        session::apply(&sql).await?;
        sql.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await?;
        // The snapshot is taken by this first query, before the position is read.
        let row = sql
            .query_one(
                "SELECT pg_current_wal_insert_lsn()::text, pg_current_snapshot()::text",
                &[],
            )
            .await?;
        let (at, snapshot): (String, String) = (row.get(0), row.get(1));
        let cut = at
            .parse()
            .ok()
            .and_then(|at| Cut::new(at, &snapshot))
            .ok_or_else(|| VerifyError::Internal(format!("unreadable snapshot {at} {snapshot}")))?;
        Ok(Self { sql, cut })
    }

    /// `count` connections more in this snapshot (exported to them), so key
    /// ranges can be read in parallel; `self` must stay open meanwhile.
    pub async fn share(&self, pg: &PostgresConfig, count: usize) -> Result<Vec<Self>, VerifyError> {
        if count == 0 {
            return Ok(Vec::new());
        }
        let row = self
            .sql
            .query_one("SELECT pg_export_snapshot()", &[])
            .await?;
        let name: String = row.get(0);
        let joins = (0..count).map(|_| Self::join(pg, &name, self.cut.clone()));
        futures::future::try_join_all(joins).await
    }

    /// A connection in the exported snapshot `name`, cut at `cut`.
    async fn join(pg: &PostgresConfig, name: &str, cut: Cut) -> Result<Self, VerifyError> {
        let sql = crate::pg::connect(pg).await?;
        session::apply(&sql).await?;
        let set = format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
            crate::pg::quote::quote_literal(name)
        );
        sql.batch_execute(&set).await?;
        Ok(Self { sql, cut })
    }

    /// The shape of `schema.table` as `publication` sends it (refused
    /// without a unique key).
    pub async fn shape(
        &self,
        schema: &str,
        table: &str,
        publication: &str,
    ) -> Result<Shape, VerifyError> {
        let keyed: TableRef = catalog::table_key(&self.sql, schema, table).await?;
        let shape = Shape::load(&self.sql, &keyed, publication).await?;
        if shape.keyless() {
            return Err(VerifyError::Keyless(format!("{schema}.{table}")));
        }
        Ok(shape)
    }

    /// How many rows the table has in this snapshot.
    pub async fn count(&self, shape: &Shape) -> Result<u64, VerifyError> {
        let query = format!("SELECT count(*) FROM {}", shape.from);
        let n: i64 = self.sql.query_one(&query, &[]).await?.get(0);
        Ok(n.unsigned_abs())
    }

    /// The next `limit` rows of `range`, in key order.
    pub async fn chunk(
        &self,
        shape: &Shape,
        range: &KeyRange,
        limit: usize,
    ) -> Result<Vec<Row>, VerifyError> {
        let messages = self
            .sql
            .simple_query(&shape.chunk_query(range, limit))
            .await?;
        Ok(rows(shape, &messages, None))
    }

    /// The next `limit` rows of `range`, in key order, as `op=r` events.
    pub async fn chunk_events(
        &self,
        shape: &Shape,
        range: &KeyRange,
        limit: usize,
    ) -> Result<Vec<(KeyText, ChangeEvent)>, VerifyError> {
        let messages = self
            .sql
            .simple_query(&shape.chunk_query(range, limit))
            .await?;
        Ok(shape.events(&messages, TxMeta::default(), Lsn::ZERO, &mut 0))
    }

    /// The rows whose key is one of `keys`. A key whose text is not a valid
    /// value of its column (a stray document's) names no row.
    pub async fn lookup(&self, shape: &Shape, keys: &[KeyText]) -> Result<Vec<Row>, VerifyError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        if let Some(found) = self.try_lookup(shape, keys).await? {
            return Ok(found);
        }
        let mut found = Vec::new();
        for k in keys {
            found.extend(
                self.try_lookup(shape, std::slice::from_ref(k))
                    .await?
                    .unwrap_or_default(),
            );
        }
        Ok(found)
    }

    /// The document ids of the rows whose key is one of `keys` (key columns
    /// only, rendered as events render them); a key whose text is not a
    /// valid value of its column names no row.
    pub async fn existing(
        &self,
        shape: &Shape,
        keys: &[KeyText],
    ) -> Result<HashSet<String>, VerifyError> {
        let mut ids = HashSet::new();
        if keys.is_empty() {
            return Ok(ids);
        }
        let query = shape.existing_keys_query(keys);
        let messages = match self.guarded(&query).await? {
            Some(m) => m,
            // A stray key that does not cast: one key at a time.
            None => {
                let mut all = Vec::new();
                for k in keys {
                    let one = shape.existing_keys_query(std::slice::from_ref(k));
                    all.extend(self.guarded(&one).await?.unwrap_or_default());
                }
                all
            }
        };
        for m in &messages {
            if let SimpleQueryMessage::Row(row) = m {
                ids.insert(doc_id(&shape.key_map(&shape.key_text_of(row))));
            }
        }
        Ok(ids)
    }

    /// `query` inside a savepoint: `None` if PostgreSQL refused it (a
    /// literal that does not cast), the snapshot kept.
    async fn guarded(&self, query: &str) -> Result<Option<Vec<SimpleQueryMessage>>, VerifyError> {
        self.sql.batch_execute("SAVEPOINT pgcdc_lookup").await?;
        match self.sql.simple_query(query).await {
            Ok(messages) => {
                self.sql
                    .batch_execute("RELEASE SAVEPOINT pgcdc_lookup")
                    .await?;
                Ok(Some(messages))
            }
            Err(e) if e.as_db_error().is_some() => {
                self.sql
                    .batch_execute("ROLLBACK TO SAVEPOINT pgcdc_lookup")
                    .await?;
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// [`Self::lookup`] inside a savepoint: `None` if PostgreSQL refused the
    /// query (a literal that does not cast), the snapshot kept.
    async fn try_lookup(
        &self,
        shape: &Shape,
        keys: &[KeyText],
    ) -> Result<Option<Vec<Row>>, VerifyError> {
        let query = shape.keys_query_with(keys, Some("xmax::text"));
        let messages = self.guarded(&query).await?;
        Ok(messages.map(|m| rows(shape, &m, Some(&self.cut))))
    }

    /// End the transaction.
    pub async fn close(self) -> Result<(), VerifyError> {
        self.sql.batch_execute("COMMIT").await?;
        Ok(())
    }
}

/// Query rows as [`Row`]s; with `cut`, the query's last column is `xmax`
/// and marks the rows it holds.
fn rows(shape: &Shape, messages: &[SimpleQueryMessage], cut: Option<&Cut>) -> Vec<Row> {
    let xids = match cut {
        Some(_) => trailing_xids(messages),
        None => Vec::new(),
    };
    let held = |i: usize| {
        let xmax = xids.get(i).copied().unwrap_or(0);
        xmax != 0 && cut.is_some_and(|c| !c.sees(xmax))
    };
    shape
        .events(messages, TxMeta::default(), Lsn::ZERO, &mut 0)
        .into_iter()
        .enumerate()
        .filter_map(|(i, (key, e))| {
            let id = doc_id(&e.key.as_ref()?.to_map());
            Some(Row {
                id,
                key,
                after: e.after?.to_map().into_owned(),
                held: held(i),
            })
        })
        .collect()
}
