//! The publication and the slot: make sure they exist, and decide where
//! streaming may start without a gap. (Server checks and table lookups are
//! in [`crate::pg::catalog`].)

use std::sync::Arc;

use tokio_postgres::Client;

use super::ReplicationError;
use crate::checkpoint::{Checkpoint, SlotIdentity};
use crate::event::TableRef;
use crate::lsn::Lsn;
use crate::pg::quote::{qualified, quote_ident};

/// Kept at this path for callers not yet moved to [`crate::pg::connect`].
pub use crate::pg::connect;

/// What an existing publication holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicationState {
    /// `publish_via_partition_root`: changes of partitions are published
    /// under the partitioned (root) table's name.
    pub via_root: bool,
    /// The published tables as (schema, name).
    pub tables: Vec<(String, String)>,
    /// The operations it does not publish (`publish` lacks them): `insert`,
    /// `update`, `delete`, `truncate`.
    pub unpublished: Vec<&'static str>,
}

/// What not publishing `unpublished` operations means for the mirror, with
/// the SQL that publishes them all; `None` if none is left out.
pub fn unpublished_note(name: &str, unpublished: &[&str]) -> Option<String> {
    if unpublished.is_empty() {
        return None;
    }
    Some(format!(
        "does not publish {} (its publish option), so those changes never reach Kafka and the mirror keeps the rows they change in PostgreSQL; run ALTER PUBLICATION {} SET (publish = 'insert, update, delete, truncate') unless that is meant",
        unpublished.join(", "),
        quote_ident(name)
    ))
}

impl PublicationState {
    /// [`unpublished_note`] for this publication.
    pub fn unpublished_note(&self, name: &str) -> Option<String> {
        unpublished_note(name, &self.unpublished)
    }

    /// The configured tables the publication lacks.
    pub fn missing<'a>(&self, tables: &'a [Arc<TableRef>]) -> Vec<&'a Arc<TableRef>> {
        tables
            .iter()
            .filter(|t| {
                !self
                    .tables
                    .iter()
                    .any(|(s, n)| *s == t.schema && *n == t.name)
            })
            .collect()
    }

    /// The published tables that are not configured (`schema.name`): their
    /// changes are decoded but not emitted.
    pub fn extra(&self, tables: &[Arc<TableRef>]) -> Vec<String> {
        self.tables
            .iter()
            .filter(|(s, n)| !tables.iter().any(|t| *s == t.schema && *n == t.name))
            .map(|(s, n)| format!("{s}.{n}"))
            .collect()
    }
}

/// Publication `name`'s `publish_via_partition_root` and the operations
/// its `publish` option leaves out, if it exists.
pub async fn publish_options(
    sql: &Client,
    name: &str,
) -> Result<Option<(bool, Vec<&'static str>)>, tokio_postgres::Error> {
    let row = sql
        .query_opt(
            "SELECT pubviaroot, pubinsert, pubupdate, pubdelete, pubtruncate \
               FROM pg_publication WHERE pubname = $1",
            &[&name],
        )
        .await?;
    let ops = ["insert", "update", "delete", "truncate"];
    Ok(row.map(|row| {
        let unpublished = (0..ops.len())
            .filter(|i| !row.get::<_, bool>(i + 1))
            .map(|i| ops[i])
            .collect();
        (row.get(0), unpublished)
    }))
}

/// The publication `name`, if it exists.
pub async fn inspect_publication(
    sql: &Client,
    name: &str,
) -> Result<Option<PublicationState>, ReplicationError> {
    let Some((via_root, unpublished)) = publish_options(sql, name).await? else {
        return Ok(None);
    };
    let rows = sql
        .query("SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1", &[&name])
        .await?;
    Ok(Some(PublicationState {
        via_root,
        tables: rows.iter().map(|r| (r.get(0), r.get(1))).collect(),
        unpublished,
    }))
}

/// The tables' quoted `schema.name`s, for a `$1::text[]` cast to regclass.
fn quoted_names(tables: &[Arc<TableRef>]) -> Vec<String> {
    tables
        .iter()
        .map(|t| qualified(&t.schema, &t.name))
        .collect()
}

/// The configured tables that are partitioned.
async fn partitioned<'t>(
    sql: &Client,
    tables: &'t [Arc<TableRef>],
) -> Result<Vec<&'t Arc<TableRef>>, ReplicationError> {
    let names = quoted_names(tables);
    let rows = sql
        .query(
            "SELECT t.i FROM unnest($1::text[]) WITH ORDINALITY AS t(q, i) \
               JOIN pg_class c ON c.oid = t.q::regclass WHERE c.relkind = 'p'",
            &[&names],
        )
        .await?;
    let at = |r: &tokio_postgres::Row| usize::try_from(r.get::<_, i64>(0) - 1).ok();
    Ok(rows
        .iter()
        .filter_map(at)
        .filter_map(|i| tables.get(i))
        .collect())
}

/// The configured partitioned tables whose changes publication `name`
/// sends under their partitions' names (`publish_via_partition_root` off).
pub async fn sent_as_partitions<'t>(
    sql: &Client,
    name: &str,
    tables: &'t [Arc<TableRef>],
) -> Result<Vec<&'t Arc<TableRef>>, ReplicationError> {
    match publish_options(sql, name).await? {
        Some((false, _)) => partitioned(sql, tables).await,
        _ => Ok(Vec::new()),
    }
}

/// Refuse a publication that would label a partitioned table's changes with
/// its partitions' names (`publish_via_partition_root` off): the snapshot
/// uses the configured root, the stream would not.
pub async fn check_partition_root(
    sql: &Client,
    name: &str,
    state: &PublicationState,
    tables: &[Arc<TableRef>],
) -> Result<(), ReplicationError> {
    if state.via_root {
        return Ok(());
    }
    let roots = partitioned(sql, tables).await?;
    if roots.is_empty() {
        return Ok(());
    }
    let roots: Vec<String> = roots
        .iter()
        .map(|t| qualified(&t.schema, &t.name))
        .collect();
    Err(ReplicationError::NotReady(format!(
        "publication {name:?} publishes the changes of the partitioned table(s) {} under their partitions' names; run ALTER PUBLICATION {} SET (publish_via_partition_root = true)",
        roots.join(", "),
        quote_ident(name)
    )))
}

/// Refuse a configured table that is a partition whose changes the
/// publication sends under an ancestor's name (`publish_via_partition_root`):
/// an ancestor that is configured too, or one the publication already
/// publishes (`published`). Its own records would hold its initial copy
/// and nothing after, or its changes would be dropped as another table's.
pub async fn check_configured_partitions(
    sql: &Client,
    name: &str,
    published: &[(String, String)],
    tables: &[Arc<TableRef>],
) -> Result<(), ReplicationError> {
    let names = quoted_names(tables);
    let rows = sql
        .query(
            "SELECT t.i, n.nspname::text, c.relname::text \
               FROM unnest($1::text[]) WITH ORDINALITY AS t(q, i) \
               JOIN pg_class l ON l.oid = t.q::regclass AND l.relispartition \
               CROSS JOIN LATERAL pg_partition_ancestors(l.oid) WITH ORDINALITY AS a(relid, depth) \
               JOIN pg_class c ON c.oid = a.relid \
               JOIN pg_namespace n ON n.oid = c.relnamespace \
              WHERE a.relid <> l.oid ORDER BY t.i, a.depth DESC",
            &[&names],
        )
        .await?;
    let configured = |s: &str, n: &str| tables.iter().any(|t| t.schema == s && t.name == n);
    let is_published = |s: &str, n: &str| published.iter().any(|(ps, pn)| ps == s && pn == n);
    for r in &rows {
        let (i, schema, ancestor): (i64, String, String) = (r.get(0), r.get(1), r.get(2));
        let Some(leaf) = usize::try_from(i - 1).ok().and_then(|i| tables.get(i)) else {
            continue;
        };
        let (leaf, root) = (
            format!("{}.{}", leaf.schema, leaf.name),
            format!("{schema}.{ancestor}"),
        );
        let why = if configured(&schema, &ancestor) {
            format!("{leaf} is a partition of {root}, which postgres.tables names too: the publication sends {leaf}'s changes as {root}'s (publish_via_partition_root), so {leaf}'s own records would hold its initial copy and nothing after. Remove {leaf} from postgres.tables")
        } else if is_published(&schema, &ancestor) {
            format!("{leaf} is a partition of {root}, which publication {name:?} publishes: it sends {leaf}'s changes as {root}'s (publish_via_partition_root), which pgcdc does not capture. Configure {root} instead of {leaf}, or take {root} out of the publication")
        } else {
            continue;
        };
        return Err(ReplicationError::NotReady(why));
    }
    Ok(())
}

/// Create the publication (publishing partitions under their root table's
/// name), or add the tables it lacks but those in `captured` (they were
/// captured before: the stream's scope watch adds them back and copies them
/// again); an existing publication that labels a configured partitioned
/// table's changes with its partitions is refused, and its tables that are
/// not configured are logged (they are not emitted).
pub async fn ensure_publication(
    sql: &Client,
    name: &str,
    tables: &[Arc<TableRef>],
    captured: &[(String, String)],
) -> Result<(), ReplicationError> {
    let list = |ts: &[&Arc<TableRef>]| {
        ts.iter()
            .map(|t| qualified(&t.schema, &t.name))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let Some(state) = inspect_publication(sql, name).await? else {
        check_configured_partitions(sql, name, &[], tables).await?;
        let all: Vec<_> = tables.iter().collect();
        sql.batch_execute(&format!(
            "CREATE PUBLICATION {} FOR TABLE {} WITH (publish_via_partition_root = true)",
            quote_ident(name),
            list(&all)
        ))
        .await?;
        tracing::info!(
            publication = name,
            tables = all.len(),
            "created publication"
        );
        return Ok(());
    };
    check_partition_root(sql, name, &state, tables).await?;
    check_configured_partitions(sql, name, &state.tables, tables).await?;
    if let Some(note) = state.unpublished_note(name) {
        tracing::warn!(publication = name, "the publication {note}");
    }
    let extra = state.extra(tables);
    if !extra.is_empty() {
        tracing::warn!(publication = name, tables = %extra.join(", "), "the publication has tables that postgres.tables does not; their changes are not emitted");
    }
    let was_captured =
        |t: &&Arc<TableRef>| captured.iter().any(|(s, n)| *s == t.schema && *n == t.name);
    let (again, missing): (Vec<_>, Vec<_>) =
        state.missing(tables).into_iter().partition(was_captured);
    if !again.is_empty() {
        tracing::warn!(publication = name, tables = %list(&again), "tables captured before are no longer in the publication (re-created while pgcdc was stopped?): they are added back, truncated and copied again once streaming");
    }
    if !missing.is_empty() {
        sql.batch_execute(&format!(
            "ALTER PUBLICATION {} ADD TABLE {}",
            quote_ident(name),
            list(&missing)
        ))
        .await?;
        tracing::warn!(publication = name, added = %list(&missing), "added tables to the publication; their earlier rows are not snapshotted");
    }
    Ok(())
}

/// What `pg_replication_slots` says about our slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotState {
    /// Output plugin.
    pub plugin: String,
    /// Database the slot decodes.
    pub database: String,
    /// Everything before this is confirmed by the consumer.
    pub confirmed_flush: Lsn,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: String,
}

/// The slot's row, if the slot exists.
pub async fn inspect_slot(sql: &Client, slot: &str) -> Result<Option<SlotState>, ReplicationError> {
    let row = sql
        .query_opt(
            "SELECT plugin::text, database::text, confirmed_flush_lsn::text, coalesce(wal_status, '') \
               FROM pg_replication_slots WHERE slot_name = $1 AND slot_type = 'logical'",
            &[&slot],
        )
        .await?;
    row.map(|r| {
        let lsn: Option<String> = r.get(2);
        let confirmed_flush = lsn
            .as_deref()
            .unwrap_or("0/0")
            .parse()
            .map_err(|e| ReplicationError::NotReady(format!("{e}")))?;
        Ok(SlotState {
            plugin: r.get(0),
            database: r.get(1),
            confirmed_flush,
            wal_status: r.get(3),
        })
    })
    .transpose()
}

/// Create the slot; returns its consistent point.
pub async fn create_slot(sql: &Client, slot: &str) -> Result<Lsn, ReplicationError> {
    let row = sql
        .query_one(
            "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await?;
    let lsn: String = row.get(0);
    tracing::info!(slot, lsn = %lsn, "created replication slot");
    lsn.parse()
        .map_err(|e| ReplicationError::NotReady(format!("{e}")))
}

/// Where streaming starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartPoint {
    /// First start and no slot: create it and start at its consistent point.
    CreateSlot,
    /// First start and the slot exists: take it over at its confirmed
    /// position (copying the tables by backfill when snapshots are on).
    AdoptSlot(Lsn),
    /// Resume at the checkpoint (an interrupted snapshot goes on by backfill).
    Resume(Lsn),
    /// First start and no slot: create the slot with an exported snapshot,
    /// copy the tables, then stream.
    Snapshot,
}

/// Compare the checkpoint with the slot; anything that could hide a gap is refused.
pub fn decide_start(
    checkpoint: &Checkpoint,
    slot: Option<&SlotState>,
    identity: &SlotIdentity,
    snapshot: bool,
) -> Result<StartPoint, ReplicationError> {
    let gap = |what: String| Err(ReplicationError::SlotGap(what));
    if let Some(s) = slot {
        if s.plugin != "pgoutput" {
            return Err(ReplicationError::NotReady(format!(
                "slot {:?} uses plugin {:?}, not pgoutput; drop it or configure another slot name",
                identity.slot_name, s.plugin
            )));
        }
        if s.wal_status == "lost" {
            return gap(format!(
                "slot {:?} has wal_status = lost: PostgreSQL removed WAL it still needed",
                identity.slot_name
            ));
        }
    }
    let Some(ours) = &checkpoint.slot else {
        return Ok(match slot {
            Some(s) => StartPoint::AdoptSlot(s.confirmed_flush),
            None if snapshot => StartPoint::Snapshot,
            None => StartPoint::CreateSlot,
        });
    };
    if ours != identity {
        return gap(format!(
            "checkpoint belongs to slot {ours:?}, but this is {identity:?}"
        ));
    }
    match slot {
        None => gap(format!("slot {:?} is missing (dropped?) though a checkpoint exists at {}", identity.slot_name, checkpoint.lsn)),
        Some(s) if s.confirmed_flush > checkpoint.lsn => gap(format!(
            "slot {:?} was advanced to {} beyond our checkpoint {} (recreated or used by another consumer)",
            identity.slot_name, s.confirmed_flush, checkpoint.lsn
        )),
        Some(_) => Ok(StartPoint::Resume(checkpoint.lsn)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publication_scope_lists_missing_and_extra_tables() {
        let table = |n: &str| {
            Arc::new(TableRef {
                schema: "public".into(),
                name: n.into(),
                key_columns: vec!["id".into()],
                key_source: Default::default(),
                column_types: String::new(),
            })
        };
        let configured = [table("a"), table("b")];
        let state = PublicationState {
            via_root: true,
            tables: vec![
                ("public".into(), "b".into()),
                ("public".into(), "audit".into()),
            ],
            unpublished: Vec::new(),
        };
        let missing: Vec<_> = state
            .missing(&configured)
            .iter()
            .map(|t| t.name.clone())
            .collect();
        assert_eq!(missing, ["a"]);
        assert_eq!(state.extra(&configured), ["public.audit"]);
        assert_eq!(state.unpublished_note("pgcdc"), None);
        let inserts_only = PublicationState {
            unpublished: vec!["update", "delete"],
            ..state
        };
        let note = inserts_only.unpublished_note("pgcdc").unwrap();
        assert!(
            note.starts_with("does not publish update, delete "),
            "{note}"
        );
        assert!(
            note.contains(
                "ALTER PUBLICATION \"pgcdc\" SET (publish = 'insert, update, delete, truncate')"
            ),
            "{note}"
        );
    }

    fn identity() -> SlotIdentity {
        SlotIdentity {
            system_id: "1".into(),
            database: "db".into(),
            slot_name: "pgcdc".into(),
        }
    }

    fn slot(lsn: u64, status: &str) -> SlotState {
        SlotState {
            plugin: "pgoutput".into(),
            database: "db".into(),
            confirmed_flush: Lsn(lsn),
            wal_status: status.into(),
        }
    }

    fn checkpoint(lsn: u64) -> Checkpoint {
        Checkpoint {
            lsn: Lsn(lsn),
            slot: Some(identity()),
            ..Checkpoint::default()
        }
    }

    #[test]
    fn first_start_creates_or_adopts() {
        let fresh = Checkpoint::default();
        assert_eq!(
            decide_start(&fresh, None, &identity(), false).unwrap(),
            StartPoint::CreateSlot
        );
        let s = slot(500, "reserved");
        assert_eq!(
            decide_start(&fresh, Some(&s), &identity(), false).unwrap(),
            StartPoint::AdoptSlot(Lsn(500))
        );
    }

    #[test]
    fn resume_when_slot_trails_or_equals_checkpoint() {
        let s = slot(90, "reserved");
        assert_eq!(
            decide_start(&checkpoint(100), Some(&s), &identity(), false).unwrap(),
            StartPoint::Resume(Lsn(100))
        );
        let s = slot(100, "extended");
        assert_eq!(
            decide_start(&checkpoint(100), Some(&s), &identity(), false).unwrap(),
            StartPoint::Resume(Lsn(100))
        );
    }

    #[test]
    fn snapshot_on_first_start_resume_when_unfinished() {
        let fresh = Checkpoint::default();
        assert_eq!(
            decide_start(&fresh, None, &identity(), true).unwrap(),
            StartPoint::Snapshot
        );
        let pending = Checkpoint {
            progress: vec![crate::checkpoint::TableProgress::fresh("public", "t")],
            ..checkpoint(100)
        };
        let s = slot(100, "reserved");
        assert_eq!(
            decide_start(&pending, Some(&s), &identity(), true).unwrap(),
            StartPoint::Resume(Lsn(100))
        );
        assert!(matches!(
            decide_start(&pending, None, &identity(), true),
            Err(ReplicationError::SlotGap(_))
        ));
    }

    #[test]
    fn gaps_are_refused() {
        let is_gap = |r: Result<StartPoint, ReplicationError>| {
            matches!(r, Err(ReplicationError::SlotGap(_)))
        };
        assert!(is_gap(decide_start(
            &checkpoint(100),
            None,
            &identity(),
            false
        )));
        assert!(is_gap(decide_start(
            &checkpoint(100),
            Some(&slot(101, "reserved")),
            &identity(),
            false
        )));
        assert!(is_gap(decide_start(
            &checkpoint(100),
            Some(&slot(50, "lost")),
            &identity(),
            false
        )));
        let other = SlotIdentity {
            system_id: "2".into(),
            ..identity()
        };
        assert!(is_gap(decide_start(
            &checkpoint(100),
            Some(&slot(50, "reserved")),
            &other,
            false
        )));
    }

    #[test]
    fn foreign_plugin_is_refused() {
        let mut s = slot(1, "reserved");
        s.plugin = "wal2json".into();
        assert!(matches!(
            decide_start(&checkpoint(1), Some(&s), &identity(), false),
            Err(ReplicationError::NotReady(_))
        ));
    }
}
