//! Where a stream session starts: check the server, tables, publication and
//! slot against the checkpoint, then either resume, create or adopt the
//! slot, or take the initial snapshot on a new slot.

use std::sync::Arc;

use pgwire_replication::ReplicationClient;

use super::slot::{self, StartPoint};
use super::stream::{Outbox, Stream};
use super::ReplicationError;
use crate::checkpoint::{Checkpoint, SlotIdentity, TableProgress};
use crate::event::TableRef;
use crate::lsn::Lsn;
use crate::messages::{GetCheckpoint, OpenSession, PersistCopiedFrom, PersistSlotIdentity};
use crate::metrics::metrics;
use crate::pg::{catalog, quote::quote_ident};
use crate::snapshot::{import_snapshot, SnapshotMode};

/// Copied chunks queued per snapshot reader while the previous ones go to
/// Kafka: keeps every reader busy without holding many chunks in memory.
const CHUNKS_IN_FLIGHT_PER_READER: usize = 2;

/// What `prepare` decided: where to start (`None`: snapshot first), the
/// tables, the slot identity, and the table copies to finish by backfill.
pub(super) type Prepared = (
    Option<Lsn>,
    Vec<Arc<TableRef>>,
    SlotIdentity,
    Vec<TableProgress>,
);

impl Stream {
    /// Check the server, tables, publication and slot; decide where to start
    /// (`None`: take an initial snapshot first) and which table
    /// copies are left to finish by backfill.
    pub(super) async fn prepare(&self) -> Result<Prepared, ReplicationError> {
        let cfg = &self.config;
        let sql = crate::pg::connect(cfg).await?;
        crate::pg::sql_security(&sql, cfg).await?.log("sql");
        catalog::check_server(&sql).await?;
        let tables = catalog::resolve_tables(&sql, &cfg.tables).await?;
        let limited = catalog::rls_limited(&sql, &tables).await?;
        if !limited.is_empty() {
            tracing::warn!(tables = %limited.join(", "), role = %cfg.user, "row-level security filters these tables' rows for pgcdc's role: the initial snapshot, backfills, repairs and verify fail on them rather than copy only some rows; give the role BYPASSRLS (ALTER ROLE … BYPASSRLS) or connect as the tables' owner");
        }
        for (parent, children) in catalog::inheritance_children(&sql, &tables).await? {
            tracing::warn!(table = %parent, children = %children, "the table has inheritance children: PostgreSQL publishes their changes under their own names, so its records and mirror hold only its own rows; add the children to postgres.tables to capture theirs");
        }
        let checkpoint = self.checkpoint.send(GetCheckpoint).await??;
        // Tables captured before that left the publication (dropped and
        // created again while pgcdc was stopped) are the scope watch's to
        // add back: it also resets their mirror.
        let captured: Vec<(String, String)> = checkpoint
            .progress
            .iter()
            .map(|p| (p.schema.clone(), p.name.clone()))
            .collect();
        if let Err(e) = slot::ensure_publication(&sql, &cfg.publication, &tables, &captured).await {
            self.note_sent_as_partitions(&sql, &tables, &checkpoint)
                .await;
            return Err(e);
        }
        let identity = SlotIdentity {
            system_id: catalog::system_id(&sql).await?,
            database: cfg.database.clone(),
            slot_name: cfg.slot.clone(),
        };
        let state = slot::inspect_slot(&sql, &cfg.slot).await?;
        let want_snapshot = self.snapshot.mode == SnapshotMode::Initial;
        let start_point =
            slot::decide_start(&checkpoint, state.as_ref(), &identity, want_snapshot)?;
        let fresh_copy = want_snapshot && !matches!(start_point, StartPoint::Resume(_));
        self.note_copied_from(&sql, &tables, &checkpoint, fresh_copy)
            .await?;
        let mut pending: Vec<TableProgress> = Vec::new();
        let start = match start_point {
            StartPoint::Resume(lsn) => {
                pending = resumed_copies(&checkpoint, &tables, want_snapshot);
                Some(lsn)
            }
            StartPoint::CreateSlot | StartPoint::AdoptSlot(_) => {
                let lsn = match start_point {
                    StartPoint::AdoptSlot(lsn) => {
                        tracing::warn!(slot = %cfg.slot, lsn = %lsn, backfill = want_snapshot, "no checkpoint: taking over the existing slot at its confirmed position");
                        lsn
                    }
                    _ => slot::create_slot(&sql, &cfg.slot).await?,
                };
                let progress = progress_of(&tables, want_snapshot);
                pending.extend(progress.iter().filter(|p| !p.done()).cloned());
                let persist = PersistSlotIdentity {
                    identity: identity.clone(),
                    lsn,
                    progress,
                };
                self.checkpoint.send(persist).await??;
                Some(lsn)
            }
            StartPoint::Snapshot => None,
        };
        let me = self.me.clone();
        let open = OpenSession {
            session: self.session,
            on_broken: me.clone().recipient(),
            on_persisted: me.recipient(),
        };
        self.producer.send(open).await?;
        Ok((start, tables, identity, pending))
    }

    /// Store what each table's mirror is copied from (the table's OID, the
    /// publication's column list and row filter for it) where the
    /// checkpoint has nothing yet, or for every table when all are about to
    /// be copied (`fresh_copy`). The scope watch copies a table again when
    /// that changes; stored before the copies start, a change made
    /// meanwhile is not missed.
    async fn note_copied_from(
        &self,
        sql: &tokio_postgres::Client,
        tables: &[Arc<TableRef>],
        checkpoint: &Checkpoint,
        fresh_copy: bool,
    ) -> Result<(), ReplicationError> {
        let names: Vec<(String, String)> = tables
            .iter()
            .map(|t| (t.schema.clone(), t.name.clone()))
            .collect();
        let publication = &self.config.publication;
        let now = catalog::published_fingerprints(sql, publication, &names).await?;
        let unknown: Vec<_> = names
            .into_iter()
            .zip(now)
            .filter(|(t, _)| fresh_copy || !checkpoint.copied_from.contains_key(t))
            .collect();
        if !unknown.is_empty() {
            self.checkpoint.send(PersistCopiedFrom(unknown)).await??;
        }
        Ok(())
    }

    /// Refused because the publication sends configured partitioned tables
    /// as their partitions: note that their mirrors, if any, miss what was
    /// sent so since the last check, so they are copied again once it sends
    /// them as themselves (the scope watch resets them).
    async fn note_sent_as_partitions(
        &self,
        sql: &tokio_postgres::Client,
        tables: &[Arc<TableRef>],
        checkpoint: &Checkpoint,
    ) {
        let Ok(roots) = slot::sent_as_partitions(sql, &self.config.publication, tables).await
        else {
            return;
        };
        let lost: Vec<_> = roots
            .into_iter()
            .map(|t| (t.schema.clone(), t.name.clone()))
            .filter(|t| checkpoint.copied_from.contains_key(t))
            .map(|t| (t, super::scope::AS_PARTITIONS.to_owned()))
            .collect();
        if !lost.is_empty() {
            let stored = match self.checkpoint.send(PersistCopiedFrom(lost)).await {
                Ok(stored) => stored.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = stored {
                tracing::warn!(error = %e, "could not note the tables sent as their partitions");
            }
        }
    }

    /// A replication session streaming from `start`.
    pub(super) async fn resume_stream(
        &self,
        start: Lsn,
    ) -> Result<ReplicationClient, ReplicationError> {
        let mut client = self.open_session(start).await?;
        client.start().await?;
        client.wait_started().await?;
        Ok(client)
    }

    /// A gated replication session at `start`; what it negotiated is logged.
    async fn open_session(&self, start: Lsn) -> Result<ReplicationClient, ReplicationError> {
        let (client, security) = crate::pg::connect_replication(&self.config, start).await?;
        security.log("replication");
        Ok(client)
    }

    /// Create the slot with an exported snapshot on a gated replication
    /// session, copy every table as of that snapshot, then start replication on
    /// the same session at the consistent point.
    pub(super) async fn initial_snapshot(
        &self,
        tables: &[Arc<TableRef>],
        identity: SlotIdentity,
        out: &mut Outbox,
    ) -> Result<ReplicationClient, ReplicationError> {
        let cfg = &self.config;
        let mut client = self.open_session(Lsn::ZERO).await?;
        let (at, name) = create_exporting_slot(&mut client, &cfg.slot).await?;
        let readers = import_snapshot(cfg, &self.snapshot, &name).await?;
        fail::fail_point!(crate::wire::failpoint::SNAPSHOT_PLAN);
        let plan = readers
            .plan(tables, &self.snapshot, &cfg.publication)
            .await?;
        let mut progress: Vec<TableProgress> = plan.iter().map(|(_, p)| p.clone()).collect();
        self.checkpoint
            .send(PersistSlotIdentity {
                identity,
                lsn: at,
                progress: progress.clone(),
            })
            .await??;
        let ranges: usize = progress.iter().map(|p| p.ranges.len()).sum();
        tracing::info!(slot = %cfg.slot, lsn = %at, snapshot = %name, tables = tables.len(), ranges, "snapshot started");
        let in_flight = CHUNKS_IN_FLIGHT_PER_READER * self.snapshot.parallelism;
        let (tx, mut rx) = tokio::sync::mpsc::channel(in_flight);
        let copy = async {
            let copied = readers.copy(&plan, &self.snapshot, at, tx).await;
            copied.map_err(ReplicationError::from)
        };
        let publish = async {
            while let Some(chunk) = rx.recv().await {
                let p = &mut progress[chunk.table];
                p.ranges[chunk.range].after = chunk.after;
                p.ranges[chunk.range].done = chunk.done;
                p.rows += chunk.rows.rows.len() as u64;
                metrics()
                    .snapshot_rows
                    .with_label_values(&[&format!("{}.{}", p.schema, p.name)])
                    .inc_by(chunk.rows.rows.len() as u64);
                out.rows = Some(chunk.rows);
                out.progress.push(p.clone());
                self.publish(out, Some(at)).await?;
            }
            Ok::<(), ReplicationError>(())
        };
        let (rows, ()) = tokio::try_join!(copy, publish)?;
        tracing::info!(rows, lsn = %at, "snapshot copied; starting the stream");
        client.start().await?;
        client.wait_started().await?;
        Ok(client)
    }
}

/// `CREATE_REPLICATION_SLOT … (SNAPSHOT 'export')` on the gated session:
/// the slot's consistent point and the exported snapshot's name.
async fn create_exporting_slot(
    client: &mut ReplicationClient,
    slot: &str,
) -> Result<(Lsn, String), ReplicationError> {
    let create = format!(
        "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput (SNAPSHOT 'export')",
        quote_ident(slot)
    );
    let rows = client.simple_query(&create).await?;
    let col = |i: usize| {
        rows.first()
            .and_then(|r| r.get(i).cloned().flatten())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .ok_or_else(|| {
                ReplicationError::NotReady("CREATE_REPLICATION_SLOT returned no snapshot".into())
            })
    };
    let at: Lsn = col(1)?
        .parse()
        .map_err(|e| ReplicationError::NotReady(format!("{e}")))?;
    Ok((at, col(2)?))
}

/// Every configured table, as fresh progress (`copy`) or as already copied.
fn progress_of(tables: &[Arc<TableRef>], copy: bool) -> Vec<TableProgress> {
    tables
        .iter()
        .map(|t| match copy {
            true => TableProgress::fresh(&t.schema, &t.name),
            false => TableProgress::finished(&t.schema, &t.name),
        })
        .collect()
}

/// On resume: the copies the checkpoint left unfinished, plus (with
/// snapshots on) tables added to the configuration since.
fn resumed_copies(
    checkpoint: &Checkpoint,
    tables: &[Arc<TableRef>],
    want_snapshot: bool,
) -> Vec<TableProgress> {
    let configured = |p: &TableProgress| {
        tables
            .iter()
            .any(|t| (&p.schema, &p.name) == (&t.schema, &t.name))
    };
    let mut pending: Vec<TableProgress> = checkpoint
        .pending()
        .filter(|p| {
            let keep = configured(p);
            if !keep {
                tracing::warn!(table = %format!("{}.{}", p.schema, p.name), "the checkpoint has an unfinished copy of a table that is not configured; it is not resumed");
            }
            keep
        })
        .cloned()
        .collect();
    if !pending.is_empty() {
        tracing::info!(
            tables = pending.len(),
            "resuming interrupted table copies by backfill"
        );
    }
    if want_snapshot {
        let extra: Vec<TableProgress> = progress_of(tables, true)
            .into_iter()
            .filter(|t| {
                !checkpoint
                    .progress
                    .iter()
                    .any(|p| (&p.schema, &p.name) == (&t.schema, &t.name))
            })
            .collect();
        for t in &extra {
            tracing::info!(table = %format!("{}.{}", t.schema, t.name), "table added to the configuration; copying it by backfill");
        }
        pending.extend(extra);
    }
    pending
}
