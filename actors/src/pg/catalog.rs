//! Catalog lookups: is the server ready, which tables and keys exist, what
//! columns a table has. Queries only; what to do with the answers is up to
//! the caller.

use std::sync::Arc;

use tokio_postgres::Client;

use super::quote::{qualified, quote_ident};
use super::{parse_table_name, PgError};
use crate::event::TableRef;

/// `wal_level` must be `logical` and the role must be allowed to replicate.
pub async fn check_server(sql: &Client) -> Result<(), PgError> {
    let wal_level: String = sql.query_one("SHOW wal_level", &[]).await?.get(0);
    if wal_level != "logical" {
        return Err(PgError::NotReady(format!(
            "wal_level is {wal_level:?}; set wal_level = logical in postgresql.conf and restart PostgreSQL"
        )));
    }
    let row = sql
        .query_one("SELECT rolreplication OR rolsuper, current_user::text FROM pg_roles WHERE rolname = current_user", &[])
        .await?;
    if !row.get::<_, bool>(0) {
        let user: String = row.get(1);
        return Err(PgError::NotReady(format!(
            "role {user:?} lacks the REPLICATION attribute; run ALTER ROLE {} REPLICATION",
            quote_ident(&user)
        )));
    }
    Ok(())
}

/// A table's replica identity, primary key columns (in key order) and all
/// columns (in table order).
const TABLE_KEYS: &str = "SELECT c.relreplident::text, \
       (SELECT array_agg(a.attname::text ORDER BY k.ord) \
          FROM pg_index i \
          CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) \
          JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
         WHERE i.indrelid = c.oid AND i.indisprimary), \
       (SELECT array_agg(a.attname::text ORDER BY a.attnum) FROM pg_attribute a \
         WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped) \
     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
    WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')";

/// Look up each configured table and its key; refuse tables that do not
/// exist, or have neither a primary key nor REPLICA IDENTITY FULL.
pub async fn resolve_tables(sql: &Client, names: &[String]) -> Result<Vec<Arc<TableRef>>, PgError> {
    let mut tables = Vec::with_capacity(names.len());
    for name in names {
        let (schema, table) = parse_table_name(name).map_err(PgError::NotReady)?;
        let Some(row) = sql.query_opt(TABLE_KEYS, &[&schema, &table]).await? else {
            return Err(PgError::NotReady(format!(
                "table {schema}.{table} does not exist"
            )));
        };
        let identity: String = row.get(0);
        let pk: Option<Vec<String>> = row.get(1);
        let all: Vec<String> = row.get::<_, Option<Vec<String>>>(2).unwrap_or_default();
        let key_columns = match (pk, identity.as_str()) {
            (Some(pk), _) => pk,
            (None, "f") => all,
            (None, _) => {
                return Err(PgError::NotReady(format!(
                    "table {schema}.{table} has no primary key: add one, or run ALTER TABLE {} REPLICA IDENTITY FULL",
                    qualified(&schema, &table)
                )))
            }
        };
        tables.push(Arc::new(TableRef {
            schema,
            name: table,
            key_columns,
            column_types: String::new(),
        }));
    }
    Ok(tables)
}

/// The cluster's system identifier, to tell one server from another.
pub async fn system_id(sql: &Client) -> Result<String, PgError> {
    let row = sql
        .query_one(
            "SELECT system_identifier::text FROM pg_control_system()",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// One column of a table, as the catalog describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ColumnInfo {
    /// Column name, unquoted.
    pub name: String,
    /// Type OID.
    pub type_oid: u32,
    /// The type as SQL (`format_type`), e.g. `character varying(20)`: what a
    /// literal of this column is cast to.
    pub sql_type: String,
    /// Whether the column is part of the primary key.
    pub in_primary_key: bool,
}

/// The live columns of the table `qualified` (quoted `schema.name`), in order.
pub(crate) async fn table_columns(
    sql: &Client,
    qualified: &str,
) -> Result<Vec<ColumnInfo>, PgError> {
    let rows = sql
        .query(
            "SELECT a.attname::text, a.atttypid, format_type(a.atttypid, a.atttypmod), \
                    COALESCE(a.attnum = ANY(i.indkey), false) \
               FROM pg_attribute a \
               LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary \
              WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped \
              ORDER BY a.attnum",
            &[&qualified],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| ColumnInfo {
            name: r.get(0),
            type_oid: r.get(1),
            sql_type: r.get(2),
            in_primary_key: r.get(3),
        })
        .collect())
}

/// The planner's row estimate of the table `qualified`; negative if the
/// table was never analyzed.
pub(crate) async fn row_estimate(sql: &Client, qualified: &str) -> Result<f64, PgError> {
    let row = sql
        .query_one(
            "SELECT reltuples::float8 FROM pg_class WHERE oid = $1::text::regclass",
            &[&qualified],
        )
        .await?;
    Ok(row.get(0))
}
