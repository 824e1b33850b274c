//! The table side: one REPEATABLE READ snapshot, its WAL position, and rows
//! read inside it in keyset chunks or by key, rendered as events render them.

use serde_json::{Map, Value};
use tokio_postgres::{Client, SimpleQueryMessage};

use super::VerifyError;
use crate::checkpoint::{KeyRange, KeyText};
use crate::es_writer::doc_id;
use crate::event::{TableRef, TxMeta};
use crate::lsn::Lsn;
use crate::pg::{catalog, session, PostgresConfig};
use crate::snapshot::shape::Shape;

/// A row as the comparison needs it: its document id, key text and rendered columns.
pub(crate) struct Row {
    /// The mirror document id of its key.
    pub id: String,
    /// Its key as text (to read it again or copy it).
    pub key: KeyText,
    /// Its columns, rendered as the events carry them.
    pub after: Map<String, Value>,
}

/// A connection inside one REPEATABLE READ, READ ONLY transaction.
pub(crate) struct Snapshot {
    /// The connection.
    pub sql: Client,
    /// `pg_current_wal_lsn()` inside the snapshot: every change it sees
    /// committed below this position.
    pub at: Lsn,
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
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await?;
        let text: String = row.get(0);
        let at = text
            .parse()
            .map_err(|_| VerifyError::Internal(format!("unreadable lsn {text:?}")))?;
        Ok(Self { sql, at })
    }

    /// The shape of `schema.table` (refused without a unique key).
    pub async fn shape(&self, schema: &str, table: &str) -> Result<Shape, VerifyError> {
        let keyed: TableRef = catalog::table_key(&self.sql, schema, table).await?;
        let shape = Shape::load(&self.sql, &keyed).await?;
        if shape.keyless() {
            return Err(VerifyError::Keyless(format!("{schema}.{table}")));
        }
        Ok(shape)
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
        Ok(rows(shape, &messages))
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

    /// [`Self::lookup`] inside a savepoint: `None` if PostgreSQL refused the
    /// query (a literal that does not cast), the snapshot kept.
    async fn try_lookup(
        &self,
        shape: &Shape,
        keys: &[KeyText],
    ) -> Result<Option<Vec<Row>>, VerifyError> {
        self.sql.batch_execute("SAVEPOINT pgcdc_lookup").await?;
        match self.sql.simple_query(&shape.keys_query(keys)).await {
            Ok(messages) => {
                self.sql
                    .batch_execute("RELEASE SAVEPOINT pgcdc_lookup")
                    .await?;
                Ok(Some(rows(shape, &messages)))
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

    /// End the transaction.
    pub async fn close(self) -> Result<(), VerifyError> {
        self.sql.batch_execute("COMMIT").await?;
        Ok(())
    }
}

/// Query rows as [`Row`]s.
fn rows(shape: &Shape, messages: &[SimpleQueryMessage]) -> Vec<Row> {
    shape
        .events(messages, TxMeta::default(), Lsn::ZERO, &mut 0)
        .into_iter()
        .filter_map(|(key, e)| {
            let id = doc_id(e.key.as_ref()?);
            Some(Row {
                id,
                key,
                after: e.after?,
            })
        })
        .collect()
}
