//! A table's shape as a copy sees it (columns, key, casts) and the SQL
//! built from it: keyset chunk queries, key-range splits, rows to events.

use std::borrow::Cow;
use std::pin::Pin;
use std::sync::Arc;

use futures::TryStreamExt;
use serde_json::{Map, Value};
use tokio_postgres::{Client, SimpleQueryMessage, SimpleQueryRow, SimpleQueryStream};

use super::SnapshotError;
use crate::checkpoint::{KeyRange, KeyText};
use crate::event::{ChangeEvent, KeySource, Op, Row, TableRef, TxMeta};
use crate::lsn::Lsn;
use crate::pg::catalog;
use crate::pg::quote::{qualified, quote_ident, quote_literal};
use crate::pg::types::{self, Rule, TypeMap, FIXED_TEXT_MAX};
use crate::pg::values::{hex_bytes, render};

/// A table estimated below this many chunks is copied as one range: splitting
/// it would not pay for the queries that find the split keys.
const SPLIT_MIN_CHUNKS: usize = 2;

/// What a copy needs to know about a table: its columns in order, which of
/// them form the key, and how to cast key literals.
pub(crate) struct Shape {
    /// The table, with `column_types` filled in.
    pub table: Arc<TableRef>,
    /// `"schema"."name"`, quoted for SQL.
    pub(crate) qualified: String,
    /// What row queries read: `qualified` (with `ONLY` for an ordinary
    /// table: not its inheritance children's rows), only the rows the
    /// publication's row filter passes, or for the initial copy of a
    /// partitioned table its partitions as the snapshot sees them
    /// ([`Self::pin_partitions`]).
    pub(crate) from: String,
    /// The publication's row filter for the table, as SQL.
    filter: Option<String>,
    /// Every published column in table order: (name, how its values render).
    pub(super) columns: Arc<[(String, Rule)]>,
    /// The key columns: (index in `columns`, SQL type to cast literals to).
    key: Vec<(usize, String)>,
    /// No usable primary key: copied whole, never by key range.
    keyless: bool,
    /// The database is `SQL_ASCII`: values are read as their bytes (hex),
    /// since their text need not be UTF-8 (see [`cell`]).
    pub(super) raw: bool,
}

impl Shape {
    /// Read the table's columns and its key (by the replica identity rule,
    /// as the catalog says now: a key changed since start is followed) from
    /// the catalog, and what `publication` sends of it: only the columns of
    /// its column list and the rows its row filter passes are read.
    pub async fn load(
        sql: &Client,
        table: &TableRef,
        publication: &str,
    ) -> Result<Self, SnapshotError> {
        let qualified = qualified(&table.schema, &table.name);
        let keyed = catalog::table_key(sql, &table.schema, &table.name).await?;
        let published = catalog::published(sql, publication, &table.schema, &table.name).await?;
        let mut found = catalog::table_columns(sql, &qualified).await?;
        if let Some(list) = &published.columns {
            found.retain(|c| list.contains(&c.name));
        }
        // An ordinary table's own rows: its inheritance children's changes
        // are published under their own names, never as the table's.
        let only = match catalog::is_ordinary(sql, &qualified).await? {
            true => format!("ONLY {qualified}"),
            false => qualified.clone(),
        };
        let from = match &published.filter {
            Some(f) => format!(
                "(SELECT * FROM {only} WHERE ({f})) AS {}",
                quote_ident(&table.name)
            ),
            None => only,
        };
        let encoding = sql.query_one("SHOW server_encoding", &[]).await?;
        let raw = encoding.get::<_, String>(0) == "SQL_ASCII";
        let key = keyed
            .key_columns
            .iter()
            .filter_map(|k| {
                let i = found.iter().position(|c| &c.name == k)?;
                Some((i, found[i].sql_type.clone()))
            })
            .collect::<Vec<_>>();
        let keyless =
            keyed.key_source == KeySource::WholeRow || key.len() != keyed.key_columns.len();
        let mut known = TypeMap::default();
        let oids: Vec<u32> = found.iter().map(|c| c.type_oid).collect();
        types::resolve(sql, &oids, &mut known).await?;
        let names: Map<String, Value> = found
            .iter()
            .map(|c| {
                let name = types::label(c.type_oid, &known.rule(c.type_oid));
                (c.name.clone(), Value::from(name))
            })
            .collect();
        let columns: Vec<(String, Rule)> = found
            .into_iter()
            .map(|c| (c.name, known.rule(c.type_oid)))
            .collect();
        let table = Arc::new(TableRef {
            column_types: Value::Object(names).to_string(),
            ..keyed
        });
        Ok(Self {
            table,
            from,
            filter: published.filter,
            qualified,
            columns: columns.into(),
            key,
            keyless,
            raw,
        })
    }

    /// For the initial copy: read a partitioned table's rows as of `sql`'s
    /// snapshot, whatever was attached or detached since. PostgreSQL finds
    /// a partitioned table's partitions in the current catalog, not in the
    /// transaction's snapshot: reading the root would miss the rows of a
    /// partition detached since the snapshot was taken, and read those of
    /// one attached since. `pg_inherits`, read by a query, is seen as of the
    /// snapshot. The root is locked first (`ACCESS SHARE`, held until the
    /// copy's transaction ends) so no partition is detached meanwhile.
    /// Unchanged partitions are read through the root, which needs SELECT
    /// on the root only; a detached one is read as the table it now is.
    /// Returns whether the table is partitioned. A backfill reads the
    /// current rows, so it keeps reading the root.
    pub(super) async fn pin_partitions(&mut self, sql: &Client) -> Result<bool, SnapshotError> {
        const TREE: &str = "WITH RECURSIVE tree(relid, relkind, depth) AS ( \
               SELECT c.oid, c.relkind, 0 FROM pg_class c WHERE c.oid = $1::text::regclass \
             UNION ALL \
               SELECT c.oid, c.relkind, t.depth + 1 FROM tree t \
               JOIN pg_inherits i ON i.inhparent = t.relid AND t.relkind = 'p' \
               JOIN pg_class c ON c.oid = i.inhrelid) \
             SELECT relid::regclass::text, relkind::text, relid::int8 FROM tree ORDER BY depth, 3";
        const NOW: &str =
            "SELECT relid::int8 FROM pg_partition_tree($1::text::regclass) WHERE isleaf";
        let then = sql.query(TREE, &[&self.qualified]).await?;
        if then.first().is_none_or(|r| r.get::<_, &str>(1) != "p") {
            return Ok(false);
        }
        lock_partitioned(sql, std::slice::from_ref(&self.qualified)).await?;
        let now: Vec<i64> = sql
            .query(NOW, &[&self.qualified])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let leaves: Vec<(&str, i64)> = then
            .iter()
            .filter(|r| r.get::<_, &str>(1) != "p")
            .map(|r| (r.get(0), r.get(2)))
            .collect();
        let (kept, detached): (Vec<_>, Vec<_>) =
            leaves.iter().partition(|(_, oid)| now.contains(oid));
        if detached.is_empty() && kept.len() == now.len() {
            return Ok(true);
        }
        tracing::info!(
            table = %self.qualified,
            detached = detached.len(),
            attached = now.len() - kept.len(),
            "partitions changed since the snapshot: copying those the table had"
        );
        let columns: Vec<String> = self.columns.iter().map(|(c, _)| quote_ident(c)).collect();
        let columns = columns.join(", ");
        // The publication's row filter, on each arm.
        let (also, passed) = match &self.filter {
            Some(f) => (format!(" AND ({f})"), format!(" WHERE ({f})")),
            None => Default::default(),
        };
        let mut arms = Vec::new();
        if !kept.is_empty() {
            let oids: Vec<String> = kept.iter().map(|(_, oid)| oid.to_string()).collect();
            arms.push(format!(
                "SELECT {columns} FROM {} WHERE tableoid IN ({}){also}",
                self.qualified,
                oids.join(", ")
            ));
        }
        for (name, oid) in detached {
            // `regclass` names a relation by the current catalog: a number means it is gone.
            if name.parse::<u32>().is_ok() {
                return Err(SnapshotError::PartitionDropped {
                    table: self.qualified.clone(),
                    oid,
                });
            }
            arms.push(format!("SELECT {columns} FROM ONLY {name}{passed}"));
        }
        if arms.is_empty() {
            arms.push(format!("SELECT {columns} FROM ONLY {}", self.qualified));
        }
        self.from = format!(
            "({}) AS {}",
            arms.join(" UNION ALL "),
            quote_ident(&self.table.name)
        );
        Ok(true)
    }

    /// The SELECT list of a copy: the columns the stream publishes by name
    /// (`*` would add generated columns), or in a `SQL_ASCII` database each
    /// column's text form as bytes, unconverted and unchecked (`format`
    /// prints it by its output function, `convert_to` to `SQL_ASCII` keeps
    /// the bytes; `textsend` would check them against the client encoding),
    /// NULL kept (`num_nulls`: a composite of NULL fields is not NULL).
    pub(super) fn select_list(&self) -> String {
        let items: Vec<String> = self
            .columns
            .iter()
            .map(|(c, _)| {
                let c = quote_ident(c);
                if !self.raw {
                    return c;
                }
                format!(
                    "CASE WHEN num_nulls({c}) = 1 THEN NULL \
                     ELSE convert_to(format('%s', {c}), 'SQL_ASCII') END"
                )
            })
            .collect();
        items.join(", ")
    }

    /// Whether the table has no unique key (REPLICA IDENTITY FULL without a
    /// primary key): it can only be copied whole, in one pass, and not backfilled by key.
    pub fn keyless(&self) -> bool {
        self.keyless
    }

    /// How the chunk cuts count the bytes of this table's rows.
    pub(crate) fn row_size(&self) -> RowSize {
        RowSize::new(&self.columns)
    }

    fn key_list(&self) -> String {
        let names: Vec<String> = self
            .key
            .iter()
            .map(|(i, _)| quote_ident(&self.columns[*i].0))
            .collect();
        names.join(", ")
    }

    fn key_literal(&self, key: &KeyText) -> String {
        let items: Vec<String> = self
            .key
            .iter()
            .zip(key)
            .map(|((_, cast), v)| format!("{}::{cast}", quote_literal(v)))
            .collect();
        format!("({})", items.join(", "))
    }

    fn range_filter(&self, after: Option<&KeyText>, upto: Option<&KeyText>) -> String {
        let cols = self.key_list();
        let mut conds = Vec::new();
        if let Some(a) = after {
            conds.push(format!("({cols}) > {}", self.key_literal(a)));
        }
        if let Some(u) = upto {
            conds.push(format!("({cols}) <= {}", self.key_literal(u)));
        }
        if conds.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", conds.join(" AND "))
        }
    }

    /// The keyset query for the next `limit` rows of `range`.
    pub fn chunk_query(&self, range: &KeyRange, limit: usize) -> String {
        format!(
            "SELECT {} FROM {}{} ORDER BY {} LIMIT {limit}",
            self.select_list(),
            self.from,
            self.range_filter(range.after.as_ref(), range.upto.as_ref()),
            self.key_list()
        )
    }

    /// The next `limit` rows after key `after`, in key order, with `extra`
    /// (an SQL expression) as one more column after the table's.
    pub(crate) fn rows_after(&self, after: Option<&KeyText>, limit: usize, extra: &str) -> String {
        format!(
            "SELECT {}, {extra} FROM {}{} ORDER BY {} LIMIT {limit}",
            self.select_list(),
            self.from,
            self.range_filter(after, None),
            self.key_list()
        )
    }

    /// The query for the rows whose key is one of `keys` (key texts, as
    /// [`Self::key_of`] gives them), in key order.
    pub fn keys_query(&self, keys: &[KeyText]) -> String {
        self.keys_query_with(keys, None)
    }

    /// [`Self::keys_query`] with `extra` (an SQL expression) as one more
    /// column after the table's.
    pub(crate) fn keys_query_with(&self, keys: &[KeyText], extra: Option<&str>) -> String {
        let list: Vec<String> = keys.iter().map(|k| self.key_literal(k)).collect();
        let extra = extra.map(|e| format!(", {e}")).unwrap_or_default();
        format!(
            "SELECT {}{extra} FROM {} WHERE ({}) IN ({}) ORDER BY {}",
            self.select_list(),
            self.from,
            self.key_list(),
            list.join(", "),
            self.key_list()
        )
    }

    /// The query for the key columns (text, in key order) of the rows whose
    /// key is one of `keys`: which of them exist.
    pub(crate) fn existing_keys_query(&self, keys: &[KeyText]) -> String {
        let list: Vec<String> = keys.iter().map(|k| self.key_literal(k)).collect();
        let texts: Vec<String> = self
            .key
            .iter()
            .map(|(i, _)| format!("{}::text", quote_ident(&self.columns[*i].0)))
            .collect();
        format!(
            "SELECT {} FROM {} WHERE ({}) IN ({})",
            texts.join(", "),
            self.from,
            self.key_list(),
            list.join(", ")
        )
    }

    /// The key text of a row of [`Self::existing_keys_query`].
    pub(crate) fn key_text_of(&self, row: &SimpleQueryRow) -> KeyText {
        (0..self.key.len())
            .map(|i| text(row, i).unwrap_or("").to_owned())
            .collect()
    }

    /// The key columns' names, in key order.
    pub fn key_names(&self) -> Vec<&str> {
        self.key
            .iter()
            .map(|(i, _)| self.columns[*i].0.as_str())
            .collect()
    }

    /// The key's columns with the rules their values render by, in key order.
    pub fn key_columns(&self) -> Vec<(&str, &Rule)> {
        self.key
            .iter()
            .map(|(i, _)| (self.columns[*i].0.as_str(), &self.columns[*i].1))
            .collect()
    }

    /// A key as events carry it (column name to rendered value) from its
    /// key text: each value rendered by its column's rule, as a row's is.
    pub fn key_map(&self, key: &KeyText) -> Map<String, Value> {
        self.key
            .iter()
            .zip(key)
            .map(|((i, _), text)| {
                let (name, rule) = &self.columns[*i];
                (name.clone(), render(rule, text.as_bytes()))
            })
            .collect()
    }

    /// Split the table into at most `parts` key ranges of similar size
    /// (one range for small or keyless tables).
    pub async fn split(
        &self,
        sql: &Client,
        parts: usize,
        chunk_rows: usize,
    ) -> Result<Vec<KeyRange>, SnapshotError> {
        if self.keyless || parts < 2 {
            return Ok(ranges_between(Vec::new()));
        }
        let estimate = self.estimate_rows(sql).await?;
        if estimate < (SPLIT_MIN_CHUNKS * chunk_rows) as f64 {
            return Ok(ranges_between(Vec::new()));
        }
        let step = (estimate / parts as f64).ceil().max(1.0) as u64;
        let bounds = self.bounds(sql, parts, step).await?;
        Ok(ranges_between(bounds))
    }

    /// The planner's row estimate, or a count if the table was never analyzed.
    async fn estimate_rows(&self, sql: &Client) -> Result<f64, SnapshotError> {
        let estimate = catalog::row_estimate(sql, &self.qualified).await?;
        if estimate >= 0.0 {
            return Ok(estimate);
        }
        // Never analyzed: count (cheaper than copying unsplit).
        let row = sql
            .query_one(&format!("SELECT count(*)::float8 FROM {}", self.from), &[])
            .await?;
        Ok(row.get::<_, f64>(0))
    }

    /// Up to `parts - 1` keys, `step` rows apart: the upper bounds of the
    /// ranges (fewer if the table ends first).
    async fn bounds(
        &self,
        sql: &Client,
        parts: usize,
        step: u64,
    ) -> Result<Vec<KeyText>, SnapshotError> {
        let mut bounds: Vec<KeyText> = Vec::new();
        for _ in 1..parts {
            let q = format!(
                "SELECT {} FROM {}{} ORDER BY {} OFFSET {} LIMIT 1",
                self.key_list(),
                self.from,
                self.range_filter(bounds.last(), None),
                self.key_list(),
                step - 1
            );
            let rows = sql.simple_query(&q).await?;
            let Some(row) = rows.iter().find_map(|m| match m {
                SimpleQueryMessage::Row(r) => Some(r),
                _ => None,
            }) else {
                break;
            };
            bounds.push(
                (0..self.key.len())
                    .map(|i| text(row, i).unwrap_or("").to_owned())
                    .collect(),
            );
        }
        Ok(bounds)
    }

    /// The key text of a row (for the last key and watermark filtering).
    pub(super) fn key_of(&self, row: &SimpleQueryRow) -> KeyText {
        self.key
            .iter()
            .map(|(i, _)| {
                cell(row, *i, self.raw)
                    .map_or_else(String::new, |b| String::from_utf8_lossy(&b).into_owned())
            })
            .collect()
    }

    /// Turn query rows into `op=r` events of transaction `tx`, positions from
    /// `seq`; also returns each row's key text (for the last key and for
    /// watermark filtering).
    pub fn events(
        &self,
        rows: &[SimpleQueryMessage],
        tx: TxMeta,
        lsn: Lsn,
        seq: &mut u32,
    ) -> Vec<(KeyText, ChangeEvent)> {
        rows.iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(row) => Some(row),
                _ => None,
            })
            .map(|row| {
                let event = self.event(row, tx, lsn, *seq);
                *seq = seq.wrapping_add(1);
                (self.key_of(row), event)
            })
            .collect()
    }

    fn event(&self, row: &SimpleQueryRow, tx: TxMeta, lsn: Lsn, seq: u32) -> ChangeEvent {
        read_event(&self.table, &self.columns, self.raw, row, tx, lsn, seq)
    }
}

/// A copied row of `table` (its `columns` in the row's order; `raw`: hex
/// bytes in a `SQL_ASCII` database) as an `op=r` change of transaction `tx`.
pub(crate) fn read_event(
    table: &Arc<TableRef>,
    columns: &[(String, Rule)],
    raw: bool,
    row: &SimpleQueryRow,
    tx: TxMeta,
    lsn: Lsn,
    seq: u32,
) -> ChangeEvent {
    let after: Map<String, Value> = columns
        .iter()
        .enumerate()
        .map(|(i, (c, rule))| {
            let v = cell(row, i, raw).map_or(Value::Null, |b| render(rule, &b));
            (c.clone(), v)
        })
        .collect();
    let key = table
        .key_columns
        .iter()
        .map(|c| after.get(c).map(|v| (c.clone(), v.clone())))
        .collect::<Option<Map<_, _>>>()
        .map(Row::from);
    ChangeEvent {
        op: Op::Read,
        table: table.clone(),
        key,
        before: None,
        after: Some(after.into()),
        unchanged_toast: Vec::new(),
        lsn,
        seq,
        tx,
        snapshot: true,
    }
}

/// The text of column `i` of `row`; `None` for SQL NULL.
///
/// `SimpleQueryRow::get` panics on text that is not valid UTF-8, which only
/// a `SQL_ASCII` database sends; there the copy reads bytes instead
/// ([`Shape::select_list`]), so this fallback (U+FFFD) is never expected.
/// The transaction id in the last column (`xmax::text`) of each row of
/// `messages`, in row order; 0 (none) where it does not read as one.
pub(crate) fn trailing_xids(messages: &[SimpleQueryMessage]) -> Vec<u32> {
    messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(
                r.len()
                    .checked_sub(1)
                    .and_then(|i| r.get(i))
                    .and_then(|x| x.parse().ok())
                    .unwrap_or(0),
            ),
            _ => None,
        })
        .collect()
}

fn text(row: &SimpleQueryRow, i: usize) -> Option<&str> {
    row.try_get(i).unwrap_or(Some(INVALID_TEXT))
}

/// What a value that cannot be read as text reads as (never expected).
const INVALID_TEXT: &str = "\u{FFFD}";

/// The bytes of column `i` of `row` (`None` for SQL NULL): its text, or
/// with `raw` (a `SQL_ASCII` database) the bytes its hex text spells. The
/// renderer decodes them as the stream does, each invalid UTF-8 sequence
/// becoming U+FFFD.
pub(crate) fn cell(row: &SimpleQueryRow, i: usize, raw: bool) -> Option<Cow<'_, [u8]>> {
    let text = text(row, i)?;
    if raw {
        if let Some(bytes) = hex_bytes(text) {
            return Some(Cow::Owned(bytes));
        }
    }
    Some(Cow::Borrowed(text.as_bytes()))
}

/// The bytes of a table's rows as text: each column of a fixed-size type
/// counted at its longest text, the others as read.
pub(crate) struct RowSize {
    /// What the fixed-size columns count for together.
    fixed: usize,
    /// The other columns, whose texts are measured.
    measured: Vec<usize>,
}

impl RowSize {
    fn new(columns: &[(String, Rule)]) -> Self {
        let fixed = columns.iter().filter(|(_, rule)| rule.fixed_size());
        Self {
            fixed: fixed.count() * FIXED_TEXT_MAX,
            measured: (columns.iter().enumerate())
                .filter(|(_, (_, rule))| !rule.fixed_size())
                .map(|(i, _)| i)
                .collect(),
        }
    }

    pub(crate) fn of(&self, row: &SimpleQueryRow) -> usize {
        let text = |i: usize| row.try_get(i).ok().flatten().map_or(0, str::len);
        self.fixed + self.measured.iter().map(|&i| text(i)).sum::<usize>()
    }
}

/// A query's rows, handed out as they arrive in pieces that end at the row
/// reaching `bound` bytes (as [`RowSize`] counts them). While a piece is
/// being used, the rest waits in PostgreSQL's socket.
pub(crate) struct Pieces {
    stream: Pin<Box<SimpleQueryStream>>,
    size: RowSize,
    bound: usize,
    /// Rows handed out so far.
    read: usize,
    /// The query ended (its stream may not be polled again).
    ended: bool,
}

impl Pieces {
    /// Send `query` (a single statement) and read its rows in pieces.
    pub(crate) async fn start(
        sql: &Client,
        query: &str,
        size: RowSize,
        bound: usize,
    ) -> Result<Self, tokio_postgres::Error> {
        let stream = Box::pin(sql.simple_query_raw(query).await?);
        Ok(Self {
            stream,
            size,
            bound,
            read: 0,
            ended: false,
        })
    }

    /// The next piece; `None` once every row was handed out.
    pub(crate) async fn next(
        &mut self,
    ) -> Result<Option<Vec<SimpleQueryRow>>, tokio_postgres::Error> {
        let (mut rows, mut bytes) = (Vec::new(), 0);
        while !self.ended && bytes < self.bound {
            match self.stream.try_next().await? {
                Some(SimpleQueryMessage::Row(row)) => {
                    bytes += self.size.of(&row);
                    rows.push(row);
                }
                Some(_) => {}
                None => self.ended = true,
            }
        }
        self.read += rows.len();
        Ok((!rows.is_empty()).then_some(rows))
    }

    /// Rows handed out so far.
    pub(crate) fn read(&self) -> usize {
        self.read
    }
}

/// The key ranges between consecutive `bounds`: from the start up to the
/// first bound, …, after the last bound to the end (one open range if none).
fn ranges_between(bounds: Vec<KeyText>) -> Vec<KeyRange> {
    let mut ranges = Vec::with_capacity(bounds.len() + 1);
    let mut after = None;
    for b in bounds {
        ranges.push(KeyRange {
            after: after.clone(),
            upto: Some(b.clone()),
            done: false,
        });
        after = Some(b);
    }
    ranges.push(KeyRange {
        after,
        upto: None,
        done: false,
    });
    ranges
}

/// Lock the partitioned tables `qualified` (their roots only) in `ACCESS
/// SHARE` mode for the rest of `sql`'s transaction: no partition can be
/// detached from them meanwhile (attaching one is filtered out by
/// [`Shape::pin_partitions`]).
pub(super) async fn lock_partitioned(
    sql: &Client,
    qualified: &[String],
) -> Result<(), SnapshotError> {
    if qualified.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = qualified.iter().map(|q| format!("ONLY {q}")).collect();
    sql.batch_execute(&format!(
        "LOCK TABLE {} IN ACCESS SHARE MODE",
        names.join(", ")
    ))
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(keys: &[(&str, &str)]) -> Shape {
        let columns: Arc<[(String, Rule)]> = keys
            .iter()
            .map(|(c, _)| (c.to_string(), Rule::Text))
            .collect();
        Shape {
            table: Arc::new(TableRef {
                schema: "public".into(),
                name: "t".into(),
                key_columns: keys.iter().map(|(c, _)| c.to_string()).collect(),
                key_source: Default::default(),
                column_types: String::new(),
            }),
            qualified: "public.t".into(),
            from: "public.t".into(),
            filter: None,
            key: keys
                .iter()
                .enumerate()
                .map(|(i, (_, cast))| (i, cast.to_string()))
                .collect(),
            columns,
            keyless: false,
            raw: false,
        }
    }

    #[test]
    fn keyset_queries_compare_rows_and_quote_literals() {
        let s = shape(&[("Id", "integer"), ("name", "text")]);
        let range = KeyRange {
            after: Some(vec!["5".into(), "o'k".into()]),
            upto: Some(vec!["9".into(), "z".into()]),
            done: false,
        };
        assert_eq!(
            s.chunk_query(&range, 100),
            "SELECT \"Id\", \"name\" FROM public.t WHERE (\"Id\", \"name\") > ('5'::integer, 'o''k'::text) \
             AND (\"Id\", \"name\") <= ('9'::integer, 'z'::text) ORDER BY \"Id\", \"name\" LIMIT 100"
        );
        let open = KeyRange {
            after: None,
            upto: None,
            done: false,
        };
        assert_eq!(
            s.chunk_query(&open, 7),
            "SELECT \"Id\", \"name\" FROM public.t ORDER BY \"Id\", \"name\" LIMIT 7"
        );
    }

    #[test]
    fn split_keys_make_adjacent_ranges_covering_the_table() {
        let whole = ranges_between(Vec::new());
        assert_eq!(whole.len(), 1);
        assert_eq!(
            (whole[0].after.clone(), whole[0].upto.clone()),
            (None, None)
        );
        let key = |k: &str| vec![k.to_owned()];
        let ranges = ranges_between(vec![key("10"), key("20")]);
        let bounds: Vec<_> = ranges
            .iter()
            .map(|r| (r.after.clone(), r.upto.clone()))
            .collect();
        assert_eq!(
            bounds,
            [
                (None, Some(key("10"))),
                (Some(key("10")), Some(key("20"))),
                (Some(key("20")), None),
            ]
        );
        assert!(ranges.iter().all(|r| !r.done));
    }
}
