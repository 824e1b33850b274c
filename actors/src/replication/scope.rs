//! Every configured table stays captured.
//!
//! `DROP TABLE` takes a table out of the publication, and a table created
//! again under the same name is not added back: without a check, its changes
//! would be lost without a word. While the stream runs, this watch looks
//! every [`CHECK_EVERY`]:
//! - a configured table that no longer exists is logged at ERROR (again
//!   every [`REMIND_EVERY`]) and counted in `pgcdc_tables_uncaptured`, which
//!   turns `/ready` to 503, until it exists again;
//! - a configured partitioned table whose changes the publication sends
//!   under its partitions' names (`publish_via_partition_root` turned off)
//!   is not captured either: logged and counted the same way, and copied
//!   again once the option is on again;
//! - a configured partitioned table with unlogged or foreign partitions,
//!   whose changes PostgreSQL does not decode, is not fully captured:
//!   logged and counted the same way, and copied again once every
//!   partition is decoded (set logged, or detached);
//! - a configured table that exists but is not published (re-created, or
//!   removed from the publication by hand) is added back. Once every
//!   transaction that began before the add has ended (their changes may not
//!   be decoded with the table published), a signed reset signal goes into
//!   the WAL: the stream emits a truncate for the table there and copies it
//!   again by watermark backfill, so its mirror ends equal to the new table;
//! - a published table that is not the one its mirror was copied from, or
//!   not sent as it was, is reset the same way (whether that changed while
//!   streaming or while pgcdc was stopped: what each mirror was copied from
//!   is kept in the checkpoint):
//!   - created again under a publication that takes it in at once (`FOR
//!     ALL TABLES`, `FOR TABLES IN SCHEMA`), the mirror would keep the rows
//!     of the dropped table;
//!   - back after it was gone (renamed away and back), the mirror would
//!     lack the changes made meanwhile;
//!   - another column list or row filter, the mirror would keep columns no
//!     longer sent, lack those sent now, and keep rows the filter no longer
//!     passes (no change ever removes them) or lack rows it passes now;
//!   - a partition detached or dropped, or truncated by itself (that
//!     truncate is not published under the table's name), the mirror would
//!     keep its rows (no change removes them from the table).
//! - a partitioned table that gained a partition holding rows (attached,
//!   not created empty) is copied again without a truncate: no change
//!   brought those rows.
//!
//! A failed check is logged and retried at the next pass.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::Addr;
use tokio_postgres::Client;

use crate::checkpoint::CheckpointActor;
use crate::event::TableRef;
use crate::messages::{GetCheckpoint, PersistCopiedFrom};
use crate::metrics::metrics;
use crate::pg::catalog;
use crate::pg::quote::{qualified, quote_ident};
use crate::pg::{PgError, PostgresConfig};
use crate::snapshot::watermark::{MessageKey, Signal};

/// How often the publication is compared with the configured tables.
pub const CHECK_EVERY: Duration = Duration::from_secs(5);
/// How often a table that stays dropped is reported again.
const REMIND_EVERY: Duration = Duration::from_secs(60);
/// How often the wait for older transactions looks again.
const OLDER_POLL: Duration = Duration::from_millis(200);

/// Where a configured table stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Exists and is published: captured.
    Published,
    /// Exists, not published: must be added back and copied again.
    Unpublished,
    /// Does not exist.
    Gone,
    /// Partitioned, and its changes are sent under its partitions' names.
    AsPartitions,
    /// Published, but these partitions' changes are not decoded (unlogged
    /// or foreign tables, each named with why).
    Undecoded(Vec<String>),
}

/// What a mirror is copied from while its partitioned table's changes are
/// sent under its partitions' names (a fingerprint never takes this form).
pub(super) const AS_PARTITIONS: &str = "as-partitions";

/// What a mirror is copied from while some of its partitioned table's
/// partitions are unlogged or foreign tables.
const UNDECODED: &str = "undecoded-partitions";

/// The watch over one stream session's tables.
pub(super) struct ScopeWatch {
    pg: Arc<PostgresConfig>,
    tables: Vec<(String, String)>,
    key: MessageKey,
    sql: Option<Client>,
    /// Tables found uncaptured (gone, sent as their partitions, or with
    /// partitions not decoded), when that was last reported, and as what:
    /// reported again every [`REMIND_EVERY`], or at once when it changes.
    uncaptured: HashMap<(String, String), (Instant, State)>,
    /// Where what each mirror was copied from is kept.
    checkpoint: Addr<CheckpointActor>,
    /// The fingerprints of what each mirror was copied from (the table and
    /// its column list and row filter), once read from the checkpoint.
    copied_from: Option<BTreeMap<(String, String), String>>,
    /// The operations the publication's `publish` option left out at the
    /// last pass (the session's start logged them).
    unpublished: Option<Vec<&'static str>>,
}

impl ScopeWatch {
    /// A watch over `tables`, signing its signals with `key`.
    pub fn new(
        pg: Arc<PostgresConfig>,
        tables: &[Arc<TableRef>],
        key: MessageKey,
        checkpoint: Addr<CheckpointActor>,
    ) -> Self {
        let tables = tables
            .iter()
            .map(|t| (t.schema.clone(), t.name.clone()))
            .collect();
        Self {
            pg,
            tables,
            key,
            sql: None,
            uncaptured: HashMap::new(),
            checkpoint,
            copied_from: None,
            unpublished: None,
        }
    }

    /// Check until dropped (it runs beside the stream, which drops it when it ends).
    pub async fn run(mut self) {
        loop {
            if let Err(e) = self.pass().await {
                tracing::warn!(error = %e, "publication check failed; retrying");
                self.sql = None;
            }
            tokio::time::sleep(CHECK_EVERY).await;
        }
    }

    async fn pass(&mut self) -> Result<(), PgError> {
        if self.sql.is_none() {
            self.sql = Some(crate::pg::connect(&self.pg).await?);
        }
        let via_root = self.follow_publish_option().await?;
        let Some(sql) = self.sql.as_mut() else {
            return Ok(());
        };
        let states = table_states(sql, &self.pg.publication, &self.tables, via_root).await?;
        let mut uncaptured = 0;
        let (mut published, mut recaptured, mut lost) = (Vec::new(), Vec::new(), Vec::new());
        for (table, state) in states {
            let name = format!("{}.{}", table.0, table.1);
            let due = self
                .uncaptured
                .get(&table)
                .is_none_or(|(t, was)| t.elapsed() >= REMIND_EVERY || *was != state);
            match &state {
                State::Published => {
                    if self.uncaptured.remove(&table).is_some() {
                        tracing::info!(table = %name, "configured table exists and is captured again");
                    }
                    published.push(table);
                }
                State::Gone => {
                    uncaptured += 1;
                    if due {
                        tracing::error!(table = %name, "configured table no longer exists (dropped or renamed): its mirror keeps the rows it had; pgcdc copies the table again when it exists again, or remove it from postgres.tables");
                        self.uncaptured
                            .insert(table.clone(), (Instant::now(), state.clone()));
                    }
                    lost.push((table, ""));
                }
                State::AsPartitions => {
                    uncaptured += 1;
                    if due {
                        let publication = quote_ident(&self.pg.publication);
                        let fix = format!("ALTER PUBLICATION {publication} SET (publish_via_partition_root = true)");
                        tracing::error!(table = %name, publication = %self.pg.publication, fix = %fix, "the publication sends this partitioned table's changes under its partitions' names (publish_via_partition_root is off): they are not captured; once it is on again pgcdc truncates the table's mirror and copies it again");
                        self.uncaptured
                            .insert(table.clone(), (Instant::now(), state.clone()));
                    }
                    lost.push((table, AS_PARTITIONS));
                }
                State::Undecoded(partitions) => {
                    uncaptured += 1;
                    if due {
                        tracing::error!(table = %name, partitions = %partitions.join(", "), "PostgreSQL decodes no change of these partitions' rows (an unlogged table writes no WAL for them; a foreign table's rows live on another server): the table is not fully captured and its mirror misses their changes; once every partition is logged (ALTER TABLE … SET LOGGED) or these are detached, pgcdc truncates the table's mirror and copies it again");
                        self.uncaptured
                            .insert(table.clone(), (Instant::now(), state.clone()));
                    }
                    lost.push((table, UNDECODED));
                }
                State::Unpublished => {
                    self.uncaptured.remove(&table);
                    tracing::warn!(table = %name, publication = %self.pg.publication, "configured table is not in the publication (re-created, or removed from it): adding it back, then truncating its mirror and copying it again");
                    let (pg, key) = (&self.pg, &self.key);
                    match recapture(sql, pg, key, &table).await {
                        Ok(()) => {
                            let resets = &metrics().table_resets;
                            resets
                                .with_label_values(&[name.as_str(), "added_back"])
                                .inc();
                            recaptured.push(table)
                        }
                        Err(e) => {
                            uncaptured += 1;
                            tracing::error!(table = %name, error = %e, fix = %add_table_sql(&pg.publication, &table), "could not add the table back to the publication: its changes are not captured");
                        }
                    }
                }
            }
        }
        metrics().tables_uncaptured.set(uncaptured);
        self.follow_published(published, recaptured, lost).await
    }

    /// Say when the operations the publication's `publish` option leaves
    /// out change while streaming (the session's start said what they were);
    /// `pgcdc_publication_unpublished_operations` counts them. Returns the
    /// publication's `publish_via_partition_root` (`true` if it is missing).
    async fn follow_publish_option(&mut self) -> Result<bool, PgError> {
        let Some(sql) = &self.sql else {
            return Ok(true);
        };
        let name = &self.pg.publication;
        let Some((via_root, now)) = super::slot::publish_options(sql, name).await? else {
            return Ok(true);
        };
        metrics().unpublished_operations.set(now.len() as i64);
        let was = self.unpublished.replace(now.clone());
        match (was, super::slot::unpublished_note(name, &now)) {
            (Some(was), Some(note)) if was != now => {
                tracing::warn!(publication = %name, "the publication now {note}")
            }
            (Some(was), None) if !was.is_empty() => {
                tracing::info!(publication = %name, "the publication publishes every operation again; changes made while it did not stay missing from the mirror (pgcdc snapshot --table copies a table again)")
            }
            _ => {}
        }
        Ok(via_root)
    }

    /// Reset each of `published` that is not the table, or not sent as,
    /// its mirror was copied from: another table under its name (created
    /// again), captured again after it was not (renamed away and back, or
    /// sent as its partitions: its changes meanwhile were not captured), or
    /// another column list or row filter. Note what `recaptured` (reset
    /// already) are copied from now, and what `lost` are not captured as
    /// (`""`: gone, or [`AS_PARTITIONS`]).
    async fn follow_published(
        &mut self,
        published: Vec<(String, String)>,
        recaptured: Vec<(String, String)>,
        lost: Vec<((String, String), &'static str)>,
    ) -> Result<(), PgError> {
        if self.copied_from().await.is_none() {
            return Ok(());
        }
        let (Some(sql), Some(copied_from)) = (&self.sql, self.copied_from.as_mut()) else {
            return Ok(());
        };
        let tables: Vec<_> = published
            .into_iter()
            .chain(recaptured.clone())
            .chain(lost.iter().map(|(t, _)| t.clone()))
            .collect();
        let now = catalog::published_fingerprints(sql, &self.pg.publication, &tables).await?;
        let mut changed = Vec::new();
        for (table, fingerprint) in tables.into_iter().zip(now) {
            // Uncaptured as this pass saw it, even if it is back by now
            // (renamed away and straight back): its changes meanwhile are missing.
            let marker = lost.iter().find(|(t, _)| *t == table).map(|(_, m)| *m);
            let fingerprint = marker.map_or(fingerprint, str::to_owned);
            let was = copied_from.get(&table);
            if was == Some(&fingerprint) {
                continue;
            }
            let seen = was.filter(|_| !recaptured.contains(&table) && marker.is_none());
            let name = format!("{}.{}", table.0, table.1);
            let (cause, why, reset) = match seen.map(|was| compare(was, &fingerprint)) {
                None | Some(Difference::Unchanged) => (None, String::new(), false),
                Some(Difference::Reset(cause, why)) => (Some(cause), why.to_owned(), true),
                Some(Difference::Added(oids)) => {
                    let held = catalog::partitions_with_rows(sql, &oids).await?;
                    if held.is_empty() {
                        tracing::info!(table = %name, partitions = oids.len(), "partitions added to the table, empty: nothing to copy");
                        (None, String::new(), false)
                    } else {
                        let why = format!(
                            "partitions attached to the table hold rows no change brought ({})",
                            held.join(", ")
                        );
                        (Some("partition_attached"), why, false)
                    }
                }
            };
            if let Some(cause) = cause {
                let what = match reset {
                    true => "truncating its mirror and copying it again",
                    false => "copying the table again",
                };
                tracing::warn!(table = %name, publication = %self.pg.publication, "{why}: {what}");
                metrics()
                    .table_resets
                    .with_label_values(&[name.as_str(), cause])
                    .inc();
                let signal = Signal::signed(&self.key, &self.pg.slot, &table.0, &table.1, reset);
                let lsn = signal.write(sql).await?;
                tracing::info!(table = %name, lsn = %lsn, reset, "copy requested");
            }
            changed.push((table, fingerprint));
        }
        if changed.is_empty() {
            return Ok(());
        }
        let stored = match self
            .checkpoint
            .send(PersistCopiedFrom(changed.clone()))
            .await
        {
            Ok(stored) => stored.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match stored {
            Ok(()) => copied_from.extend(changed),
            Err(e) => {
                tracing::warn!(error = %e, "could not store what the mirrors are copied from; checked again")
            }
        }
        Ok(())
    }

    /// The fingerprints of what each mirror was copied from, read from the
    /// checkpoint once.
    async fn copied_from(&mut self) -> Option<&BTreeMap<(String, String), String>> {
        if self.copied_from.is_none() {
            let read = match self.checkpoint.send(GetCheckpoint).await {
                Ok(read) => read.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match read {
                Ok(checkpoint) => self.copied_from = Some(checkpoint.copied_from),
                Err(e) => {
                    tracing::warn!(error = %e, "could not read the checkpoint; checked again")
                }
            }
        }
        self.copied_from.as_ref()
    }
}

/// How what a mirror was copied from differs from its table now.
#[derive(Debug, PartialEq)]
enum Difference {
    /// Nothing the mirror depends on: the fingerprint was stored before
    /// fingerprints named a partitioned table's partitions.
    Unchanged,
    /// The mirror holds what the table no longer has, or lacks what it
    /// has: truncate and copy again (cause, words for the log).
    Reset(&'static str, &'static str),
    /// Partitions were added (attached or created; these OIDs): those
    /// that hold rows brought them without a change.
    Added(Vec<u32>),
}

/// How the fingerprint `was` differs from `now` ([`why_reset`] unless only
/// the partitions differ).
fn compare(was: &str, now: &str) -> Difference {
    // The table's part, and its leaf partitions: OID → file node.
    let split = |f: &'_ str| match f.rsplit_once(&format!("|{}", catalog::PARTITIONS)) {
        Some((table, list)) => {
            let leaves: BTreeMap<u32, u32> = list
                .split(',')
                .filter_map(|leaf| leaf.split_once('.'))
                .filter_map(|(oid, node)| Some((oid.parse().ok()?, node.parse().ok()?)))
                .collect();
            (table.to_owned(), Some(leaves))
        }
        None => (f.to_owned(), None),
    };
    let ((table_was, parts_was), (table_now, parts_now)) = (split(was), split(now));
    if table_was != table_now {
        let (cause, why) = why_reset(was, now);
        return Difference::Reset(cause, why);
    }
    let (Some(parts_was), Some(parts_now)) = (parts_was, parts_now) else {
        return Difference::Unchanged;
    };
    if parts_was.keys().any(|oid| !parts_now.contains_key(oid)) {
        return Difference::Reset(
            "partition_removed",
            "a partition of the table was detached or dropped: its rows are no longer the table's",
        );
    }
    if parts_was.iter().any(|(oid, node)| parts_now[oid] != *node) {
        return Difference::Reset(
            "partition_rewritten",
            "a partition of the table was truncated by itself (PostgreSQL does not publish that under the table's name) or rewritten (VACUUM FULL, CLUSTER, a column type change)",
        );
    }
    let added = parts_now.keys().filter(|oid| !parts_was.contains_key(oid));
    Difference::Added(added.copied().collect())
}

/// Why a table whose fingerprint was `was` (empty: it was gone;
/// [`AS_PARTITIONS`]: sent as its partitions) and is `now` is copied again:
/// the `cause` label of `pgcdc_table_resets_total` and the log's words. A
/// fingerprint starts with the table's OID.
fn why_reset(was: &str, now: &str) -> (&'static str, &'static str) {
    let oid = |f: &str| f.split('|').next().unwrap_or_default().to_owned();
    if was.is_empty() {
        (
            "back_after_gone",
            "the table exists again after it was gone (its changes meanwhile were not captured)",
        )
    } else if was == AS_PARTITIONS {
        (
            "partition_root_restored",
            "the publication sends the partitioned table's changes under its name again (publish_via_partition_root was off: its changes meanwhile were not captured)",
        )
    } else if was == UNDECODED {
        (
            "partition_undecoded",
            "every partition of the table is decoded again (an unlogged or foreign partition was set logged, detached or dropped: its changes meanwhile were not captured)",
        )
    } else if oid(was) != oid(now) {
        ("created_again", "the table was created again")
    } else {
        (
            "publication_changed",
            "the publication's column list or row filter for the table changed",
        )
    }
}

/// The state of each of `tables` against `publication`, whose
/// `publish_via_partition_root` is `via_root`. A published table with
/// unlogged or foreign partitions is [`State::Undecoded`].
async fn table_states(
    sql: &Client,
    publication: &str,
    tables: &[(String, String)],
    via_root: bool,
) -> Result<Vec<((String, String), State)>, PgError> {
    let (schemas, names): (Vec<&str>, Vec<&str>) =
        tables.iter().map(|(s, n)| (s.as_str(), n.as_str())).unzip();
    let rows = sql
        .query(
            "SELECT s, n, to_regclass(format('%I.%I', s, n)) IS NOT NULL, \
                    EXISTS (SELECT 1 FROM pg_publication_tables p \
                             WHERE p.pubname = $1 AND p.schemaname = s AND p.tablename = n), \
                    EXISTS (SELECT 1 FROM pg_class c \
                             WHERE c.oid = to_regclass(format('%I.%I', s, n)) AND c.relkind = 'p') \
               FROM unnest($2::text[], $3::text[]) AS t(s, n)",
            &[&publication, &schemas, &names],
        )
        .await?;
    let mut states: Vec<_> = rows
        .iter()
        .map(|r| {
            let partitioned = r.get::<_, bool>(4);
            let state = match (r.get::<_, bool>(2), r.get::<_, bool>(3)) {
                (_, true) => State::Published,
                // Not listed: its partitions are, in its stead.
                (true, false) if partitioned && !via_root => State::AsPartitions,
                (true, false) => State::Unpublished,
                (false, false) => State::Gone,
            };
            ((r.get(0), r.get(1)), state)
        })
        .collect();
    let undecoded = catalog::undecoded_partitions(sql, tables).await?;
    for (table, state) in &mut states {
        let found = undecoded.iter().find(|(t, _)| t == table);
        if let (State::Published, Some((_, partitions))) = (&state, found) {
            *state = State::Undecoded(partitions.clone());
        }
    }
    Ok(states)
}

fn add_table_sql(publication: &str, (schema, name): &(String, String)) -> String {
    format!(
        "ALTER PUBLICATION {} ADD TABLE {}",
        quote_ident(publication),
        qualified(schema, name)
    )
}

/// Add the table back, wait out older transactions, then ask the stream to
/// reset it (truncate, copy again).
async fn recapture(
    sql: &mut Client,
    pg: &PostgresConfig,
    key: &MessageKey,
    table: &(String, String),
) -> Result<(), PgError> {
    let tx = sql.transaction().await?;
    tx.batch_execute(&add_table_sql(&pg.publication, table))
        .await?;
    let xid: String = tx
        .query_one("SELECT pg_current_xact_id()::text", &[])
        .await?
        .get(0);
    tx.commit().await?;
    wait_for_older_transactions(sql, &xid).await?;
    let signal = Signal::signed(key, &pg.slot, &table.0, &table.1, true);
    let lsn = signal.write(sql).await?;
    tracing::info!(table = %format!("{}.{}", table.0, table.1), lsn = %lsn, "table added back to the publication; reset requested");
    Ok(())
}

/// Wait until every transaction older than `xid` has ended.
async fn wait_for_older_transactions(sql: &Client, xid: &str) -> Result<(), PgError> {
    let started = Instant::now();
    let mut reminded = started;
    loop {
        let done: bool = sql
            .query_one(
                "SELECT pg_snapshot_xmin(pg_current_snapshot()) > $1::text::xid8",
                &[&xid],
            )
            .await?
            .get(0);
        if done {
            return Ok(());
        }
        if reminded.elapsed() >= REMIND_EVERY {
            tracing::warn!(waited_secs = started.elapsed().as_secs(), "a transaction older than the publication change is still open; the table is copied again once it ends");
            reminded = Instant::now();
        }
        tokio::time::sleep(OLDER_POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reset_says_why() {
        let says = |was: &str, now: &str, cause: &str, words: &str| {
            let (c, w) = why_reset(was, now);
            assert_eq!(c, cause, "{was} -> {now}");
            assert!(w.contains(words), "{w}");
        };
        says(
            "",
            "16384",
            "back_after_gone",
            "exists again after it was gone",
        );
        says(
            AS_PARTITIONS,
            "16384",
            "partition_root_restored",
            "publish_via_partition_root was off",
        );
        says(
            UNDECODED,
            "16384",
            "partition_undecoded",
            "unlogged or foreign partition",
        );
        says("16384", "16390", "created_again", "created again");
        says("16384|1 2", "16390|1 2", "created_again", "created again");
        let changed = "column list or row filter";
        says("16384|1 2", "16384|1 2 3", "publication_changed", changed);
        says("16384", "16384|{OPEXPR}", "publication_changed", changed);
    }

    #[test]
    fn partitions_added_are_copied_and_partitions_removed_or_truncated_reset_the_mirror() {
        let removed = |d: Difference| matches!(d, Difference::Reset("partition_removed", _));
        let rewritten = |d: Difference| matches!(d, Difference::Reset("partition_rewritten", _));
        let two = "16384|parts:1.11,2.12";
        assert_eq!(
            compare(two, "16384|parts:1.11,2.12,3.13"),
            Difference::Added(vec![3])
        );
        assert_eq!(
            compare("16384|parts:", "16384|parts:7.17"),
            Difference::Added(vec![7])
        );
        assert!(removed(compare(two, "16384|parts:1.11")));
        assert!(removed(compare(two, "16384|parts:1.11,3.13")));
        assert!(rewritten(compare(two, "16384|parts:1.11,2.20")));
        assert!(rewritten(compare(two, "16384|parts:1.11,2.20,3.13")));
        // Stored before fingerprints named partitions: nothing to do.
        assert_eq!(compare("16384", "16384|parts:1.11"), Difference::Unchanged);
        let filtered = compare("16384|1 2|parts:1.11", "16384|1 2 3|parts:1.11,2.12");
        assert!(matches!(
            filtered,
            Difference::Reset("publication_changed", _)
        ));
        let again = compare("16384|parts:1.11", "16390|parts:1.11");
        assert!(matches!(again, Difference::Reset("created_again", _)));
    }
}
