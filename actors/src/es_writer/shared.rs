//! Fills shared by the sink processes of one group.
//!
//! A table's records are spread over the partitions of its topic, so with
//! several sink processes in a group each applies some of a mirror's
//! changes. A new generation filled from PostgreSQL by one process
//! ([`fill`](super::fill)) must get every change committed after its
//! snapshot, from every process. So:
//! - the process that fills writes a heartbeat document `filling~<index>`
//!   into `<index_prefix>_truncations` before it creates the generation,
//!   then every [`BEAT_EVERY`];
//! - every process looks at the mirrors' generations and heartbeats at
//!   least every [`VIEW_FRESH`], and before it writes a batch read after
//!   its last look went stale; a generation being filled elsewhere gets
//!   each change it applies too, and a process that needs a fill follows
//!   one under way instead of starting its own;
//! - the fill takes its snapshot [`FILL_DELAY`] after the generation
//!   exists: a process that wrote a change without knowing of the
//!   generation had read it before then, so the snapshot holds it. A
//!   commit PostgreSQL had written but not yet made visible
//!   [`VIEW_FRESH`] after the generation existed (waiting for a
//!   synchronous standby) may have been applied so: the snapshot waits
//!   until it is visible ([`settle`]);
//! - a followed fill whose heartbeat has not changed for [`FILL_DEAD`] (its
//!   process died) is ended by the first process that sees it so, which
//!   then fills the mirror itself. A fill whose heartbeat another process
//!   ended is not swapped in.
//!
//! Only the process that filled a generation swaps it in, and the alias
//! only moves to a newer generation.

use std::time::Duration;

use tokio_postgres::Client;

use super::client::{Beat, EsClient};
use super::error::EsError;
use super::fill::{committing, wait_ended, Fill};

/// Longest time a process writes changes without having looked at the
/// generations being filled.
pub(super) const VIEW_FRESH: Duration = Duration::from_secs(2);
/// Wait between creating a generation and taking its fill's snapshot:
/// longer than [`VIEW_FRESH`].
pub(super) const FILL_DELAY: Duration = Duration::from_secs(3);
/// How often a fill's heartbeat is written.
pub(super) const BEAT_EVERY: Duration = Duration::from_secs(2);
/// A fill whose heartbeat has not changed for this long is taken as stopped.
pub(super) const FILL_DEAD: Duration = Duration::from_secs(10);

/// Run `fill`, writing its heartbeat meanwhile; the
/// rows copied and the last heartbeat, or why it ended.
pub(super) async fn run(
    fill: Fill,
    client: EsClient,
    registry: String,
    first: Beat,
) -> Result<(u64, Beat), EsError> {
    let index = fill.index.clone();
    let filling = fill.run();
    tokio::pin!(filling);
    let mut last = first;
    loop {
        tokio::select! {
            rows = &mut filling => return rows.map(|rows| (rows, last)),
            () = tokio::time::sleep(BEAT_EVERY) => match client.beat(&registry, &index, last).await {
                Ok(Some(beat)) => last = beat,
                Ok(None) => return Err(ended_elsewhere(&index)),
                Err(e) => tracing::warn!(index, error = %e, "cannot write the fill's heartbeat; trying again"),
            },
        }
    }
}

/// The fill of `index` whose heartbeat another process ended, having seen
/// it unchanged for [`FILL_DEAD`].
pub(super) fn ended_elsewhere(index: &str) -> EsError {
    EsError::Fill(format!(
        "another sink process saw no heartbeat of the fill of {index} for {} s and ended it",
        FILL_DEAD.as_secs()
    ))
}

/// Wait, from the moment the generation `index` exists, until a snapshot
/// taken on `sql` holds every change a sink process may have applied
/// without knowing of it: [`FILL_DELAY`], and until the commits that were
/// in the WAL but invisible at [`VIEW_FRESH`] are visible.
pub(super) async fn settle(sql: &Client, index: &str) -> Result<(), EsError> {
    tokio::time::sleep(VIEW_FRESH).await;
    let (unseen, hidden) = committing(sql).await?;
    tokio::time::sleep(FILL_DELAY - VIEW_FRESH).await;
    if hidden {
        tracing::warn!(index, "this role cannot see whether other roles' commits wait for a synchronous standby: the fill waits for all their transactions to end before its snapshot (grant pg_read_all_stats to see them)");
    }
    if unseen.is_empty() {
        return Ok(());
    }
    tracing::warn!(index, transactions = unseen.len(), "the fill waits before its snapshot for commits PostgreSQL wrote but does not show yet (waiting for a synchronous standby): a sink process may have applied them before it knew of the new index");
    wait_ended(sql, &unseen).await?;
    tracing::info!(
        index,
        "those commits are visible now: taking the fill's snapshot"
    );
    Ok(())
}
