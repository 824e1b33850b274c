//! Asking the daemon to repair drifted keys, and waiting for the repair:
//! signed signals in the WAL ([`Signal::repair`]) that the stream hands to
//! the snapshot actor, which copies the keys again between watermarks
//! (missing and stale rows re-read, extra documents deleted).

use std::time::Instant;

use super::compare::{doc_lsn, Kind};
use super::mirror::Mirror;
use super::{TableReport, Verifier, VerifyError};
use crate::checkpoint::KeyText;
use crate::lsn::Lsn;
use crate::snapshot::watermark::{MessageKey, Signal};

/// Keys per repair signal (one WAL message each).
const KEYS_PER_SIGNAL: usize = 1000;
/// Pause between two looks at the repaired documents.
const EVERY: std::time::Duration = std::time::Duration::from_millis(200);

impl Verifier {
    /// Ask the daemon on this slot to copy the drifted keys of `report`
    /// (of `schema.table`) again; the WAL position of the last request,
    /// `None` if no key can be repaired.
    pub async fn request_repair(
        &self,
        key: &MessageKey,
        (schema, table): (&str, &str),
        report: &TableReport,
    ) -> Result<Option<Lsn>, VerifyError> {
        // A key drifted in both legs is copied once.
        let mut keys: Vec<KeyText> = report
            .drift
            .iter()
            .filter_map(|(_, f)| f.key.clone())
            .collect();
        keys.sort();
        keys.dedup();
        if keys.is_empty() {
            return Ok(None);
        }
        let sql = crate::pg::connect(&self.pg).await?;
        let mut last = None;
        for chunk in keys.chunks(KEYS_PER_SIGNAL) {
            let signal = Signal::repair(key, &self.pg.slot, (schema, table), chunk.to_vec());
            let at = signal.write(&sql).await?;
            last = Some(
                at.parse()
                    .map_err(|_| VerifyError::Internal(format!("unreadable lsn {at:?}")))?,
            );
        }
        tracing::info!(table = %report.table, keys = keys.len(), "repair requested");
        Ok(last)
    }

    /// Wait until every drifted key of `report` was written again after
    /// `since` (an extra document: removed), for at most
    /// `verify.fence_timeout_secs`; whether they all were.
    pub async fn await_repair(
        &self,
        report: &TableReport,
        since: Lsn,
    ) -> Result<bool, VerifyError> {
        let mirror = Mirror::new(&self.es, &report.index);
        let deadline = Instant::now() + self.opts.fence_timeout();
        let mut pending: Vec<(Kind, String)> = report
            .drift
            .iter()
            .filter(|(_, f)| f.key.is_some())
            .map(|(k, f)| (k.clone(), f.id.clone()))
            .collect();
        loop {
            let mut left = Vec::new();
            for chunk in pending.chunks(self.opts.chunk_rows) {
                let ids: Vec<String> = chunk.iter().map(|(_, id)| id.clone()).collect();
                let docs = mirror.get(&ids).await?;
                left.extend(
                    chunk
                        .iter()
                        .filter(|(kind, id)| {
                            let rewritten = docs.get(id).map(|d| doc_lsn(d) > since);
                            match kind {
                                Kind::Extra => rewritten == Some(false),
                                _ => rewritten != Some(true),
                            }
                        })
                        .cloned(),
                );
            }
            pending = left;
            if pending.is_empty() {
                return Ok(true);
            }
            if Instant::now() > deadline {
                return Ok(false);
            }
            tokio::time::sleep(EVERY).await;
        }
    }
}
