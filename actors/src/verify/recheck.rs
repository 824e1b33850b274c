//! Checking apparent differences again once the pipeline caught up.
//!
//! Each round: a snapshot reads the pending keys; the verifier waits until
//! the pipeline applied everything up to its position ([`super::fence`]),
//! reads the documents, and a next snapshot reads the keys again.
//!
//! - Equal: the difference was in flight. A document past the position:
//!   *newer*.
//! - Stale or extra: drift. The document is at most as new as the
//!   snapshot and everything up to it was applied, so it should equal it.
//! - Missing: a delete leaves no version to compare, so a document deleted
//!   by a change after the snapshot looks missing too. It is drift only if
//!   the next snapshot, read after the documents, still has the same row
//!   (a delete the mirror applied committed before that read) and no
//!   transaction it does not see holds the row (`xmax`: a delete still
//!   committing); otherwise the key raced the check and goes to the next
//!   round, based on the next snapshot. A key still racing after
//!   `verify.rechecks` rounds changes faster than the check can settle:
//!   *newer*, not drift.
//! - The wait timed out: the pipeline is behind by more than
//!   `verify.fence_timeout_secs`, so a difference still there can be in
//!   flight or drift: *unconfirmed*, neither drift nor equal; no further round.

use std::collections::{HashMap, HashSet};

use serde_json::{Map, Value};

use super::compare::{compare, Cut, Kind, Verdict};
use super::fence::Fence;
use super::mirror::Mirror;
use super::source::Snapshot;
use super::{by_id, Apparent, Finding, TableReport, Verifier, VerifyError};
use crate::checkpoint::KeyText;
use crate::snapshot::shape::Shape;

/// The pending keys' rows as one snapshot saw them.
struct Reading {
    /// What the snapshot holds.
    cut: Cut,
    /// Rows by document id.
    rows: HashMap<String, Map<String, Value>>,
    /// Rows a transaction the snapshot does not see changed or deleted.
    flux: HashSet<String>,
}

impl Verifier {
    /// Check `pending` again (see the module docs); count what they are in `report`.
    pub(super) async fn recheck(
        &self,
        shape: &Shape,
        mirror: &Mirror<'_>,
        mut pending: Vec<Apparent>,
        report: &mut TableReport,
    ) -> Result<(), VerifyError> {
        if pending.is_empty() {
            return Ok(());
        }
        let sql = crate::pg::connect(&self.pg).await?;
        let pipeline = self.pipeline(&sql);
        let mut base = self.read(shape, &pending).await?;
        for _ in 0..self.opts.rechecks {
            if pending.is_empty() {
                break;
            }
            let fence = pipeline.applied(base.cut.at, mirror).await?;
            let reached = fence == Fence::Reached;
            report.fence = Some(fence);
            let docs = self.documents(mirror, &pending).await?;
            let next = self.read(shape, &pending).await?;
            let mut racing = Vec::new();
            for (_, finding) in pending {
                let (was, now) = (base.rows.get(&finding.id), next.rows.get(&finding.id));
                match compare(was, docs.get(&finding.id), &base.cut) {
                    Verdict::Equal => {}
                    Verdict::Differs(Kind::Newer, _) => report.add(Kind::Newer, finding),
                    // Behind the fence timeout: nothing can be concluded.
                    Verdict::Differs(_, columns) if !reached => {
                        report.add(Kind::Unconfirmed, Finding { columns, ..finding });
                    }
                    Verdict::Differs(Kind::Missing, _)
                        if was != now || base.flux.contains(&finding.id) =>
                    {
                        racing.push((Kind::Missing, finding));
                    }
                    Verdict::Differs(kind, columns) => {
                        report.add(kind, Finding { columns, ..finding });
                    }
                }
            }
            pending = racing;
            base = next;
        }
        for (_, finding) in pending {
            report.add(Kind::Newer, finding);
        }
        Ok(())
    }

    /// The rows of the `pending` keys in a new snapshot.
    async fn read(&self, shape: &Shape, pending: &[Apparent]) -> Result<Reading, VerifyError> {
        let snap = Snapshot::open(&self.pg).await?;
        let keys: Vec<KeyText> = pending.iter().filter_map(|(_, f)| f.key.clone()).collect();
        let (mut rows, mut flux) = (HashMap::new(), HashSet::new());
        for chunk in keys.chunks(self.opts.chunk_rows) {
            let found = snap.lookup(shape, chunk).await?;
            flux.extend(found.iter().filter(|r| r.held).map(|r| r.id.clone()));
            rows.extend(by_id(found));
        }
        let cut = snap.cut.clone();
        snap.close().await?;
        Ok(Reading { cut, rows, flux })
    }

    /// The documents of the `pending` keys that exist, by id.
    async fn documents(
        &self,
        mirror: &Mirror<'_>,
        pending: &[Apparent],
    ) -> Result<HashMap<String, Map<String, Value>>, VerifyError> {
        let mut docs = HashMap::new();
        for chunk in pending.chunks(self.opts.chunk_rows) {
            let ids: Vec<String> = chunk.iter().map(|(_, f)| f.id.clone()).collect();
            docs.extend(mirror.get(&ids).await?);
        }
        Ok(docs)
    }
}
