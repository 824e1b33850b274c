//! Catalog lookups: is the server ready, which tables and keys exist, what
//! columns a table has. Queries only; what to do with the answers is up to
//! the caller.

use std::sync::Arc;

use tokio_postgres::Client;

use super::quote::{qualified, quote_ident};
use super::{parse_table_name, PgError};
use crate::event::{KeySource, TableRef};

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

/// A table's replica identity, its primary key columns (in key order), the
/// columns of its replica identity index (in index order) and its published
/// columns (in table order; generated columns are not published before
/// PostgreSQL 18).
const TABLE_KEYS: &str = "SELECT c.relreplident::text, \
       (SELECT array_agg(a.attname::text ORDER BY k.ord) \
          FROM pg_index i \
          CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) \
          JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
         WHERE i.indrelid = c.oid AND i.indisprimary), \
       (SELECT array_agg(a.attname::text ORDER BY k.ord) \
          FROM pg_index i \
          CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) \
          JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
         WHERE i.indrelid = c.oid AND i.indisreplident), \
       (SELECT array_agg(a.attname::text ORDER BY a.attnum) FROM pg_attribute a \
         WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
           AND a.attgenerated = '') \
     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
    WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')";

/// What the catalog says about a table's keys, as input to [`key_rule`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct KeyFacts {
    /// `pg_class.relreplident`: `d`efault, `i`ndex, `f`ull or `n`othing.
    pub identity: String,
    /// The primary key's columns, if there is one.
    pub primary_key: Option<Vec<String>>,
    /// The replica identity index's columns, if one is set and exists.
    pub identity_index: Option<Vec<String>>,
    /// Every published column.
    pub columns: Vec<String>,
}

/// The row key by the replica identity rule: the primary key for DEFAULT,
/// the index columns for USING INDEX, the primary key for FULL when there is
/// one and every column for FULL without one. A table PostgreSQL cannot send
/// a key for (NOTHING, DEFAULT without a primary key, USING INDEX of a
/// dropped index) is refused with the command that fixes it (`qualified` is
/// the quoted table name); nothing is changed on the user's table.
pub(crate) fn key_rule(
    facts: KeyFacts,
    qualified: &str,
) -> Result<(Vec<String>, KeySource), String> {
    let has_pk = facts.primary_key.is_some();
    let fix_identity = |what: &str| {
        match has_pk {
        true => format!(
            "table {qualified} has {what}, so PostgreSQL sends no key for its UPDATEs and DELETEs (and refuses them once it is published); run ALTER TABLE {qualified} REPLICA IDENTITY DEFAULT"
        ),
        false => format!(
            "table {qualified} has {what}, so PostgreSQL sends no key for its UPDATEs and DELETEs (and refuses them once it is published); add a primary key, or run ALTER TABLE {qualified} REPLICA IDENTITY FULL"
        ),
    }
    };
    match (
        facts.identity.as_str(),
        facts.primary_key,
        facts.identity_index,
    ) {
        ("d" | "f", Some(pk), _) => Ok((pk, KeySource::PrimaryKey)),
        ("f", None, _) => Ok((facts.columns, KeySource::WholeRow)),
        ("i", _, Some(index)) => Ok((index, KeySource::IdentityIndex)),
        ("d", None, _) => Err(fix_identity("no primary key and REPLICA IDENTITY DEFAULT")),
        ("i", _, None) => Err(fix_identity(
            "REPLICA IDENTITY USING INDEX of an index that no longer exists",
        )),
        (other, _, _) => Err(fix_identity(&format!(
            "REPLICA IDENTITY {}",
            if other == "n" { "NOTHING" } else { other }
        ))),
    }
}

/// The key of the table `schema.table` by [`key_rule`], as a [`TableRef`]
/// (without column types); a missing or keyless table is
/// [`PgError::NotReady`].
pub async fn table_key(sql: &Client, schema: &str, table: &str) -> Result<TableRef, PgError> {
    let Some(row) = sql.query_opt(TABLE_KEYS, &[&schema, &table]).await? else {
        return Err(PgError::NotReady(format!(
            "table {schema}.{table} does not exist"
        )));
    };
    let facts = KeyFacts {
        identity: row.get(0),
        primary_key: row.get(1),
        identity_index: row.get(2),
        columns: row.get::<_, Option<Vec<String>>>(3).unwrap_or_default(),
    };
    let (key_columns, key_source) =
        key_rule(facts, &qualified(schema, table)).map_err(PgError::NotReady)?;
    Ok(TableRef {
        schema: schema.to_owned(),
        name: table.to_owned(),
        key_columns,
        key_source,
        column_types: String::new(),
    })
}

/// Look up each configured table and its key (by [`key_rule`]); refuse
/// tables that do not exist or that PostgreSQL cannot send a key for.
pub async fn resolve_tables(sql: &Client, names: &[String]) -> Result<Vec<Arc<TableRef>>, PgError> {
    let mut tables = Vec::with_capacity(names.len());
    for name in names {
        let (schema, table) = parse_table_name(name).map_err(PgError::NotReady)?;
        tables.push(Arc::new(table_key(sql, &schema, &table).await?));
    }
    Ok(tables)
}

/// The current role and those of `tables` it may not SELECT from, quoted:
/// streaming needs no SELECT, but the initial snapshot, backfills, repairs
/// and verify read the tables.
pub async fn unreadable_tables(
    sql: &Client,
    tables: &[Arc<TableRef>],
) -> Result<(String, Vec<String>), PgError> {
    let role: String = sql
        .query_one("SELECT current_user::text", &[])
        .await?
        .get(0);
    let mut unreadable = Vec::new();
    for t in tables {
        let name = qualified(&t.schema, &t.name);
        let q = "SELECT has_table_privilege($1::text::regclass, 'SELECT')";
        if !sql.query_one(q, &[&name]).await?.get::<_, bool>(0) {
            unreadable.push(name);
        }
    }
    Ok((quote_ident(&role), unreadable))
}

/// `tables` as quoted `schema.name`, for a `regclass[]` parameter.
fn qualified_names(tables: &[Arc<TableRef>]) -> Vec<String> {
    tables
        .iter()
        .map(|t| qualified(&t.schema, &t.name))
        .collect()
}

/// Those of `tables` whose rows row-level security filters for the current
/// role (enabled on the table, and the role neither a superuser, nor
/// `BYPASSRLS`, nor the owner of a table that does not force it), quoted.
/// pgcdc's SQL sessions turn `row_security` off, so reading them fails.
pub async fn rls_limited(sql: &Client, tables: &[Arc<TableRef>]) -> Result<Vec<String>, PgError> {
    let names = qualified_names(tables);
    let rows = sql
        .query(
            "SELECT c.oid::regclass::text FROM pg_class c, pg_roles r \
              WHERE c.oid = ANY($1::text[]::regclass[]) AND r.rolname = current_user \
                AND c.relrowsecurity AND NOT r.rolsuper AND NOT r.rolbypassrls \
                AND (c.relforcerowsecurity OR NOT pg_has_role(c.relowner, 'USAGE')) \
              ORDER BY 1",
            &[&names],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// What a publication sends of one table besides its name (PostgreSQL 15
/// and later): a column list and a row filter. Every read of the table's
/// rows (the initial copy, backfills, repairs, verify, the ES sink's fill)
/// must read the columns and rows the stream sends, or the mirror would
/// hold columns the publication leaves out and rows that no change ever
/// updates or deletes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Published {
    /// The column list, in table order, if the publication has one for the table.
    pub columns: Option<Vec<String>>,
    /// The row filter, as SQL on the table's columns, if any.
    pub filter: Option<String>,
}

/// Whether the server's publications may have column lists and row filters.
async fn filters_publications(sql: &Client) -> Result<bool, PgError> {
    let version: i32 = sql
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await?
        .get(0);
    Ok(version >= 150_000)
}

/// What `publication` sends of the table `schema.name`: its column list
/// and row filter. No entry in `pg_publication_rel` (`FOR ALL TABLES`, `FOR
/// TABLES IN SCHEMA`): the whole table.
pub async fn published(
    sql: &Client,
    publication: &str,
    schema: &str,
    name: &str,
) -> Result<Published, PgError> {
    const PUBLISHED: &str = "SELECT (SELECT array_agg(a.attname::text ORDER BY a.attnum) \
                FROM pg_attribute a \
               WHERE a.attrelid = r.prrelid AND a.attnum = ANY(r.prattrs::int2[])), \
            pg_get_expr(r.prqual, r.prrelid) \
       FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid \
      WHERE p.pubname = $1 AND r.prrelid = $2::text::regclass";
    if !filters_publications(sql).await? {
        return Ok(Published::default());
    }
    let table = qualified(schema, name);
    let row = sql.query_opt(PUBLISHED, &[&publication, &table]).await?;
    Ok(row.map_or_else(Published::default, |r| Published {
        columns: r.get(0),
        filter: r.get(1),
    }))
}

/// For each of `tables` (schema, name), what identifies the table and what
/// `publication` sends of it: its OID (a table created again under the name
/// has another), the attribute numbers of its column list and the parse
/// tree of its row filter (so renaming a column changes nothing), and for a
/// partitioned table each leaf partition's OID and file node (`oid.node`)
/// after [`PARTITIONS`]: a partition truncated by itself gets another file
/// node, and its truncate is not published under the table's name.
pub(crate) async fn published_fingerprints(
    sql: &Client,
    publication: &str,
    tables: &[(String, String)],
) -> Result<Vec<String>, PgError> {
    let filters = match filters_publications(sql).await? {
        true => {
            "(SELECT concat_ws('|', r.prattrs::text, r.prqual::text) \
               FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid \
              WHERE p.pubname = $1 AND r.prrelid = c.oid)"
        }
        false => "nullif($1, $1)",
    };
    let query = format!(
        "SELECT concat_ws('|', c.oid::text, {filters}, \
                CASE WHEN c.relkind = 'p' THEN '{PARTITIONS}' || coalesce( \
                  (SELECT string_agg(l.oid::text || '.' || l.relfilenode::text, ',' ORDER BY l.oid) \
                     FROM pg_partition_tree(c.oid) p JOIN pg_class l ON l.oid = p.relid \
                    WHERE p.isleaf), '') END) \
           FROM unnest($2::text[], $3::text[]) WITH ORDINALITY AS t(s, n, i) \
           LEFT JOIN pg_class c ON c.oid = to_regclass(format('%I.%I', s, n)) \
          ORDER BY i"
    );
    let (schemas, names): (Vec<&str>, Vec<&str>) =
        tables.iter().map(|(s, n)| (s.as_str(), n.as_str())).unzip();
    let rows = sql.query(&query, &[&publication, &schemas, &names]).await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// What precedes the leaf partitions (`oid.node,oid.node`) in a
/// partitioned table's fingerprint ([`published_fingerprints`]).
pub(crate) const PARTITIONS: &str = "parts:";

/// Those of the partitions `oids` that hold rows (their heap is not
/// empty), by name. A partition created by `CREATE TABLE … PARTITION OF`
/// starts empty, while one attached holds the rows it had.
pub(crate) async fn partitions_with_rows(
    sql: &Client,
    oids: &[u32],
) -> Result<Vec<String>, PgError> {
    let rows = sql
        .query(
            "SELECT p::regclass::text FROM unnest($1::oid[]) AS p \
              WHERE coalesce(pg_relation_size(p), 0) > 0 ORDER BY 1",
            &[&oids],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// For each of `tables` (schema, name) that is partitioned, its leaf
/// partitions whose changes PostgreSQL does not decode, quoted, each with
/// why: an unlogged table writes no WAL for its rows, and a foreign
/// table's rows live on another server.
pub async fn undecoded_partitions(
    sql: &Client,
    tables: &[(String, String)],
) -> Result<Vec<((String, String), Vec<String>)>, PgError> {
    let (schemas, names): (Vec<&str>, Vec<&str>) =
        tables.iter().map(|(s, n)| (s.as_str(), n.as_str())).unzip();
    let rows = sql
        .query(
            "SELECT s, n, array_agg(l.oid::regclass::text || \
                      CASE l.relkind WHEN 'f' THEN ' (foreign table)' ELSE ' (unlogged)' END \
                      ORDER BY l.oid::regclass::text) \
               FROM unnest($1::text[], $2::text[]) AS t(s, n) \
               JOIN pg_class c ON c.oid = to_regclass(format('%I.%I', s, n)) AND c.relkind = 'p' \
              CROSS JOIN LATERAL pg_partition_tree(c.oid) p \
               JOIN pg_class l ON l.oid = p.relid \
              WHERE p.isleaf AND (l.relkind = 'f' OR l.relpersistence <> 'p') \
              GROUP BY s, n",
            &[&schemas, &names],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect())
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
}

/// The live columns of the table `qualified` (quoted `schema.name`), in
/// order, without generated columns: the stream does not publish them
/// (before PostgreSQL 18), so a copy must not read them either.
pub(crate) async fn table_columns(
    sql: &Client,
    qualified: &str,
) -> Result<Vec<ColumnInfo>, PgError> {
    let rows = sql
        .query(
            "SELECT a.attname::text, a.atttypid, format_type(a.atttypid, a.atttypmod) \
               FROM pg_attribute a \
              WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped \
                AND a.attgenerated = '' \
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
        })
        .collect())
}

/// Which of `columns` of `schema.table` existing rows may hold a value in
/// (a default: `atthasmissing` after `ADD COLUMN … DEFAULT`, `atthasdef`
/// otherwise), as opposed to columns that are NULL in every older row.
pub(crate) async fn columns_with_defaults(
    sql: &Client,
    schema: &str,
    table: &str,
    columns: &[String],
) -> Result<Vec<String>, PgError> {
    let rows = sql
        .query(
            "SELECT attname::text FROM pg_attribute WHERE attrelid = $1::text::regclass \
             AND attname = ANY($2) AND NOT attisdropped AND (atthasmissing OR atthasdef)",
            &[&qualified(schema, table), &columns],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Those of `tables` that have inheritance children (`INHERITS`, not
/// partitions), with their children, quoted. PostgreSQL publishes a
/// child's changes under the child's name, even an UPDATE or DELETE
/// through the parent, so a parent's records hold its own rows only.
pub async fn inheritance_children(
    sql: &Client,
    tables: &[Arc<TableRef>],
) -> Result<Vec<(String, String)>, PgError> {
    let names = qualified_names(tables);
    let rows = sql
        .query(
            "SELECT i.inhparent::regclass::text, \
                    string_agg(i.inhrelid::regclass::text, ', ' ORDER BY i.inhrelid::regclass::text) \
               FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent \
              WHERE p.relkind = 'r' AND i.inhparent = ANY($1::text[]::regclass[]) \
              GROUP BY 1 ORDER BY 1",
            &[&names],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Whether the table `qualified` is an ordinary table (not partitioned,
/// not a view): its rows are read with `ONLY`, without those of
/// inheritance children, which the stream does not send as its changes.
pub(crate) async fn is_ordinary(sql: &Client, qualified: &str) -> Result<bool, PgError> {
    let row = sql
        .query_one(
            "SELECT relkind = 'r' FROM pg_class WHERE oid = $1::text::regclass",
            &[&qualified],
        )
        .await?;
    Ok(row.get(0))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(identity: &str, pk: Option<&[&str]>, index: Option<&[&str]>) -> KeyFacts {
        let names = |c: &[&str]| c.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        KeyFacts {
            identity: identity.into(),
            primary_key: pk.map(names),
            identity_index: index.map(names),
            columns: names(&["id", "code", "body"]),
        }
    }

    fn key(f: KeyFacts) -> Result<(Vec<String>, KeySource), String> {
        key_rule(f, "\"public\".\"t\"")
    }

    #[test]
    fn key_follows_the_replica_identity() {
        let pk = Some(&["id"][..]);
        let index = Some(&["code"][..]);
        assert_eq!(
            key(facts("d", pk, None)).unwrap(),
            (vec!["id".into()], KeySource::PrimaryKey)
        );
        assert_eq!(
            key(facts("i", pk, index)).unwrap(),
            (vec!["code".into()], KeySource::IdentityIndex)
        );
        assert_eq!(
            key(facts("f", pk, None)).unwrap(),
            (vec!["id".into()], KeySource::PrimaryKey)
        );
        let (all, source) = key(facts("f", None, None)).unwrap();
        assert_eq!((all.len(), source), (3, KeySource::WholeRow));
    }

    #[test]
    fn tables_without_a_sendable_key_are_refused_with_the_fix() {
        let err = key(facts("n", Some(&["id"]), None)).unwrap_err();
        assert!(err.contains("REPLICA IDENTITY NOTHING"), "{err}");
        assert!(
            err.contains("ALTER TABLE \"public\".\"t\" REPLICA IDENTITY DEFAULT"),
            "{err}"
        );
        let err = key(facts("n", None, None)).unwrap_err();
        assert!(err.contains("REPLICA IDENTITY FULL"), "{err}");
        let err = key(facts("d", None, None)).unwrap_err();
        assert!(err.contains("no primary key"), "{err}");
        assert!(key(facts("i", Some(&["id"]), None)).is_err());
    }
}
