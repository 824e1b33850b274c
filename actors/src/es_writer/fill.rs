//! Filling a new mirror generation from PostgreSQL while the sink keeps
//! writing every change it applies to both generations.
//!
//! The copy reads the table in key order inside one REPEATABLE READ
//! snapshot and writes each row with `version = S`, `version_type =
//! external`, where `S` is the WAL insert position read just before the
//! snapshot is taken. Against the changes the sink writes meanwhile
//! (versioned by their commit LSN), whichever comes second:
//! - a change committed below `S` is one the snapshot holds: the copy's row
//!   is at least as new and wins;
//! - a change committed above `S` is newer than `S` and wins (if the
//!   snapshot saw it, the copy held the same row);
//! - a delete leaves its version behind (`index.gc_deletes`), so a copied
//!   row of a deleted key is refused.
//!
//! The exception is a transaction the snapshot does not see although its
//! commit record lies below `S` (it was still finishing, e.g. waiting for a
//! synchronous standby). Rows it changed carry its xid in `xmax`: they are
//! not copied in this pass but read again, in a new snapshot, once it ended.
//! So that every such transaction is in the snapshot's list of running
//! ones, the copy ends a transaction of its own between reading `S` and
//! taking the snapshot: those listed from the snapshot's `xmax` on started
//! after `S`. Rows it inserted are invisible to the snapshot; they reach the
//! new generation through the sink, unless a sink process applied that
//! transaction before it knew of the generation: the snapshot waits for
//! those ([`shared::settle`](super::shared::settle)).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio_postgres::{Client, SimpleQueryMessage};

use super::bulk::{outcomes, render, Action, Outcome};
use super::client::EsClient;
use super::config::EsConfig;
use super::error::EsError;
use super::naming::{doc_id, fields};
use super::retry::with_retry;
use crate::checkpoint::KeyText;
use crate::event::{TableRef, TxMeta};
use crate::lsn::Lsn;
use crate::metrics::metrics;
use crate::pg::PostgresConfig;
use crate::snapshot::shape::Pieces;
use crate::snapshot::{reader, Shape};

/// Rows read per query. They are written as they arrive, a bulk request
/// each time `elasticsearch.bulk_max_bytes` of row text was read, so a
/// query of wide rows is neither held whole nor sent as one request larger
/// than Elasticsearch takes.
const CHUNK_ROWS: usize = 1000;
/// Snapshots tried before rows held by transactions are given up on.
const MAX_PASSES: usize = 8;
/// How often the copy checks whether a holding transaction has ended.
const HELD_POLL: Duration = Duration::from_millis(100);
/// Bits of a 64-bit transaction id (`xid8`) that the stream's `txId` keeps.
const XID_MASK: u64 = 0xffff_ffff;

/// One copy of a table into a new generation.
pub(super) struct Fill {
    /// Where the table is.
    pub pg: Arc<PostgresConfig>,
    /// The `[elasticsearch]` section.
    pub es: Arc<EsConfig>,
    /// Where to write.
    pub client: EsClient,
    /// The table's schema and name.
    pub schema: String,
    /// The table's name.
    pub table: String,
    /// The new generation.
    pub index: String,
    /// The generation's key columns (the catalog must agree).
    pub key: Vec<String>,
}

/// One snapshot's view: the position read before it, and the transactions it does not see.
struct Snap {
    lsn: u64,
    /// In progress at the snapshot: 32-bit xid → `xid8` text.
    running: HashMap<u32, String>,
}

impl Fill {
    /// Copy the table; the rows written.
    pub(super) async fn run(self) -> Result<u64, EsError> {
        let sql = reader(&self.pg).await.map_err(fill_error)?;
        let table = TableRef::named(self.schema.clone(), self.table.clone());
        let shape = Shape::load(&sql, &table, &self.pg.publication)
            .await
            .map_err(fill_error)?;
        let (mut now, mut want) = (shape.table.key_columns.clone(), self.key.clone());
        now.sort();
        want.sort();
        if shape.keyless() || now != want {
            return Err(EsError::Fill(format!(
                "{}.{} has key {:?} now, not {:?}",
                self.schema, self.table, shape.table.key_columns, self.key
            )));
        }
        super::shared::settle(&sql, &self.index).await?;
        let mut held: Option<Vec<KeyText>> = None;
        let mut copied = 0;
        for _ in 0..MAX_PASSES {
            let (rows, waiting) = self.pass(&sql, &shape, held.as_deref()).await?;
            copied += rows;
            if waiting.is_empty() {
                return Ok(copied);
            }
            let (keys, xids): (Vec<KeyText>, HashSet<String>) = waiting.into_iter().unzip();
            wait_ended(&sql, &xids).await?;
            held = Some(keys);
        }
        Err(EsError::Fill(format!(
            "rows of {}.{} stayed held by running transactions through {MAX_PASSES} snapshots",
            self.schema, self.table
        )))
    }

    /// One snapshot: copy the table (or the `keys` rows); the rows written
    /// and the rows held by running transactions (key, `xid8`).
    async fn pass(
        &self,
        sql: &Client,
        shape: &Shape,
        keys: Option<&[KeyText]>,
    ) -> Result<(u64, Vec<(KeyText, String)>), EsError> {
        let q = |e| fill_error(crate::pg::PgError::from(e));
        let lsn = insert_position(sql).await?;
        // Ends after every transaction that can commit below `lsn` began:
        // the snapshot lists each of those still running.
        sql.batch_execute(
            "BEGIN READ WRITE; SET LOCAL synchronous_commit = off; SELECT pg_current_xact_id(); COMMIT",
        )
        .await
        .map_err(q)?;
        sql.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .map_err(q)?;
        let snap = Snap {
            lsn,
            running: running(sql).await?,
        };
        tracing::debug!(index = %self.index, lsn = %Lsn(snap.lsn), "snapshot taken: copying the table into the new index");
        pause_before_copy().await;
        let mut written = 0;
        let mut held = Vec::new();
        let mut after: Option<KeyText> = None;
        let mut remaining = keys.map(|k| k.chunks(CHUNK_ROWS));
        loop {
            let query = match remaining.as_mut() {
                Some(chunks) => match chunks.next() {
                    Some(chunk) => shape.keys_query_with(chunk, Some("xmax::text")),
                    None => break,
                },
                None => shape.rows_after(after.as_ref(), CHUNK_ROWS, "xmax::text"),
            };
            let bound = self.es.bulk_max_bytes;
            let mut pieces = Pieces::start(sql, &query, shape.row_size(), bound)
                .await
                .map_err(q)?;
            let mut seq = 0;
            while let Some(piece) = pieces.next().await.map_err(q)? {
                let rows: Vec<_> = piece.into_iter().map(SimpleQueryMessage::Row).collect();
                let tx = TxMeta {
                    xid: 0,
                    commit_lsn: Lsn(snap.lsn),
                    commit_time_us: chrono_now_us(),
                };
                let events = shape.events(&rows, tx, Lsn(snap.lsn), &mut seq);
                let xmax = crate::snapshot::shape::trailing_xids(&rows);
                let mut actions = Vec::with_capacity(events.len());
                for ((key, event), xmax) in events.iter().zip(xmax) {
                    if let Some(xid8) = snap.running.get(&xmax) {
                        held.push((key.clone(), xid8.clone()));
                        continue;
                    }
                    actions.extend(self.action(event, snap.lsn));
                }
                written += actions.len() as u64;
                self.write(actions).await?;
                if let Some((key, _)) = events.last() {
                    after = Some(key.clone());
                }
            }
            if remaining.is_none() && pieces.read() < CHUNK_ROWS {
                break;
            }
        }
        sql.batch_execute("COMMIT").await.map_err(q)?;
        Ok((written, held))
    }

    /// The write of one copied row, versioned by the snapshot position.
    fn action(&self, event: &crate::event::ChangeEvent, lsn: u64) -> Option<Action> {
        let mut doc = fields(event.after.as_ref()?.to_map().into_owned());
        let key = event.key.as_ref()?;
        let id = doc_id(&key.to_map());
        let ts_ms = event.tx.commit_time_us / 1000;
        doc.insert(
            "_cdc".into(),
            json!({"op": "r", "lsn": lsn, "seq": event.seq, "ts_ms": ts_ms}),
        );
        let writer = super::generation::filling_alias(&self.index);
        let meta = json!({"index": {"_index": writer, "_id": id, "version": lsn,
                                    "version_type": "external", "require_alias": true}});
        Some(Action {
            index: self.index.clone(),
            meta: meta.to_string(),
            doc: Some(Value::Object(doc).to_string()),
            id,
            at: (lsn, event.seq),
            ..Action::default()
        })
    }

    /// Write `actions` until each is written, superseded or refused.
    async fn write(&self, mut actions: Vec<Action>) -> Result<(), EsError> {
        while !actions.is_empty() {
            let body = render(&actions);
            let resp = with_retry(&self.es, || self.client.bulk(body.clone())).await?;
            let results = outcomes(&resp, actions.len()).map_err(|reason| EsError::Unreadable {
                status: 200,
                body: reason,
            })?;
            let mut retry = Vec::new();
            for (action, outcome) in actions.into_iter().zip(results) {
                match outcome {
                    Outcome::Done | Outcome::Conflict => {}
                    Outcome::Retry(_) | Outcome::Unanswered => retry.push(action),
                    Outcome::NoIndex(reason) => {
                        return Err(EsError::Fill(format!(
                            "the new index {} is gone ({reason})",
                            self.index
                        )));
                    }
                    Outcome::Reject(reason) => {
                        metrics()
                            .es_refusals
                            .with_label_values(&["reindex_copy"])
                            .inc();
                        tracing::error!(index = %self.index, id = %action.id, reason, "the new index refused a copied row");
                    }
                }
            }
            if !retry.is_empty() {
                tokio::time::sleep(Duration::from_millis(self.es.retry_initial_ms)).await;
            }
            actions = retry;
        }
        Ok(())
    }
}

/// The WAL insert position, read before the snapshot is taken: every
/// transaction committed after it is newer than the copy, and every one it
/// sees committed either below it (its rows copied at a newer version) or
/// after it (its change, newer, wins over the copy).
async fn insert_position(sql: &Client) -> Result<u64, EsError> {
    let row = sql
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .map_err(|e| fill_error(crate::pg::PgError::from(e)))?;
    let lsn: String = row.get(0);
    let lsn: Lsn = lsn
        .parse()
        .map_err(|_| EsError::Fill(format!("unreadable WAL position {lsn}")))?;
    Ok(lsn.0)
}

/// The transactions running at the snapshot (its first statement takes
/// it): 32-bit xid → `xid8` text.
async fn running(sql: &Client) -> Result<HashMap<u32, String>, EsError> {
    let row = sql
        .query_one(
            "SELECT ARRAY(SELECT x::text FROM pg_snapshot_xip(pg_current_snapshot()) x)",
            &[],
        )
        .await
        .map_err(|e| fill_error(crate::pg::PgError::from(e)))?;
    Ok(row
        .get::<_, Vec<String>>(0)
        .into_iter()
        .filter_map(|x| Some(((x.parse::<u64>().ok()? & XID_MASK) as u32, x)))
        .collect())
}

/// `schema.table`'s shape now, as a fill reads it (the columns published, the key).
pub(super) async fn table_shape(
    pg: &PostgresConfig,
    schema: &str,
    table: &str,
) -> Result<Shape, String> {
    let sql = crate::pg::connect(pg).await.map_err(|e| e.to_string())?;
    let found = crate::pg::catalog::table_key(&sql, schema, table)
        .await
        .map_err(|e| e.to_string())?;
    Shape::load(&sql, &found, &pg.publication)
        .await
        .map_err(|e| e.to_string())
}

/// Transactions whose commit is in the WAL but not yet visible, waiting
/// for a synchronous standby (`xid8` texts), and whether sessions of other
/// roles were counted in without knowing (their waits are hidden from a
/// role without `pg_read_all_stats`): their transactions could be such
/// commits too. Empty while `synchronous_standby_names` is: no commit waits.
///
/// Only sessions of this database can change its tables. A session's own
/// commit waits holding its transaction's lock. A `COMMIT PREPARED` waits
/// in a session that holds no lock of the prepared transaction: that one
/// is found by its name, quoted plainly, in the waiting statement. Every
/// prepared transaction is counted in while a waiting `COMMIT PREPARED`
/// names none that way (its name spelled otherwise: `E'…'`, `$$…$$`), or
/// while a session's statements are hidden.
pub(super) async fn committing(sql: &Client) -> Result<(HashSet<String>, bool), EsError> {
    let q = |e| fill_error(crate::pg::PgError::from(e));
    let row = sql
        .query_one(
            "SELECT current_setting('synchronous_standby_names') <> '', \
                    pg_snapshot_xmax(pg_current_snapshot())::text",
            &[],
        )
        .await
        .map_err(q)?;
    if !row.get::<_, bool>(0) {
        return Ok((HashSet::new(), false));
    }
    let near: u64 = row.get::<_, String>(1).parse().unwrap_or_default();
    let rows = sql
        .query(
            "WITH a AS (SELECT * FROM pg_stat_activity \
                        WHERE datname = current_database() AND pid <> pg_backend_pid() \
                          AND (wait_event = 'SyncRep' OR backend_type IS NULL)) \
             SELECT l.transactionid::text, a.backend_type IS NULL FROM pg_locks l \
             JOIN a ON a.pid = l.pid \
             WHERE l.locktype = 'transactionid' AND l.mode = 'ExclusiveLock' AND l.granted \
             UNION ALL \
             SELECT p.transaction::text, a.backend_type IS NULL FROM pg_prepared_xacts p \
             JOIN a ON p.database = current_database() \
              AND (a.backend_type IS NULL OR strpos(a.query, quote_literal(p.gid)) > 0 \
                   OR (a.query ~* '\\mcommit\\s+prepared\\M' AND NOT EXISTS \
                       (SELECT FROM pg_prepared_xacts n \
                        WHERE strpos(a.query, quote_literal(n.gid)) > 0)))",
            &[],
        )
        .await
        .map_err(q)?;
    let hidden = rows.iter().any(|r| r.get::<_, bool>(1));
    let xids = rows
        .iter()
        .filter_map(|r| Some(widen(r.get::<_, String>(0).parse().ok()?, near).to_string()))
        .collect();
    Ok((xids, hidden))
}

/// The full (`xid8`) id of the 32-bit transaction id `xid`, one of those
/// within 2^31 of the 64-bit id `near` (every running transaction is).
fn widen(xid: u32, near: u64) -> u64 {
    let distance = i64::from(xid.wrapping_sub(near as u32) as i32);
    (near as i64 + distance) as u64
}

/// Wait until none of `xids` (`xid8` texts) is running any more.
pub(super) async fn wait_ended(sql: &Client, xids: &HashSet<String>) -> Result<(), EsError> {
    let xids: Vec<&String> = xids.iter().collect();
    loop {
        let row = sql
            .query_one(
                "SELECT count(*) FROM unnest($1::text[]) x \
                 WHERE pg_xact_status(x::xid8) = 'in progress'",
                &[&xids],
            )
            .await
            .map_err(|e| fill_error(crate::pg::PgError::from(e)))?;
        if row.get::<_, i64>(0) == 0 {
            return Ok(());
        }
        tokio::time::sleep(HELD_POLL).await;
    }
}

/// The failpoint [`ES_FILL_COPY`](crate::wire::failpoint::ES_FILL_COPY).
async fn pause_before_copy() {
    #[cfg(feature = "failpoints")]
    {
        let pause = || -> Option<u64> {
            fail::fail_point!(crate::wire::failpoint::ES_FILL_COPY, |ms| ms
                .and_then(|m| m.parse().ok()));
            None
        };
        if let Some(ms) = pause() {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    }
}

/// Microseconds since the Unix epoch.
fn chrono_now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

fn fill_error(e: impl std::fmt::Display) -> EsError {
    EsError::Fill(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::widen;

    #[test]
    fn a_32_bit_transaction_id_is_widened_to_the_epoch_near_it() {
        let epoch = 5u64 << 32;
        assert_eq!(widen(100, epoch + 90), epoch + 100, "above, same epoch");
        assert_eq!(widen(80, epoch + 90), epoch + 80, "below, same epoch");
        assert_eq!(widen(u32::MAX - 1, epoch + 3), epoch - 2, "before the wrap");
        assert_eq!(widen(4, epoch - 10), epoch + 4, "after the wrap");
    }
}
