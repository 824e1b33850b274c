//! CheckpointActor: the RocksDB store of the confirmed commit LSN and the slot
//! identity. Runs on its own thread (`SyncArbiter`) so blocking, synced writes
//! never touch the async runtime.
//!
//! Every write that gates LSN advancement is synced (`WriteOptions::set_sync`);
//! a failed write is fatal (exit code 6), never retried: after a failed fsync
//! the page cache can no longer be trusted. The actor reports it (and a store
//! it cannot open or read) to the daemon and from then on refuses all work.

mod store;

use std::collections::BTreeSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use actix::prelude::*;

pub use crate::error::CheckpointError;
pub use crate::messages::{Checkpoint, KeyRange, KeyText, SlotIdentity, TableProgress};
pub use store::CheckpointStore;

use crate::error::ExitCode;
use crate::lsn::Lsn;
use crate::messages::{
    GetCheckpoint, LsnPersisted, PartitionPin, PersistCopiedFrom, PersistLsn, PersistSlotIdentity,
    PinPartitions,
};
use crate::supervision::RestartBudget;

/// The actor around [`CheckpointStore`]. One instance per thread of its
/// `SyncArbiter`; on a crash (a panic) the arbiter builds a new one from the
/// factory, which reopens the store.
pub struct CheckpointActor {
    store: Option<CheckpointStore>,
    path: PathBuf,
    persisted: Lsn,
    /// Tables whose copy is not finished (for the metric).
    copying: BTreeSet<(String, String)>,
    /// Counts restarts and takes fatal reports.
    budget: RestartBudget,
    /// A fatal condition was reported: no more reads or writes.
    failed: bool,
}

impl CheckpointActor {
    /// Start the actor on its own thread; `budget` counts its restarts and
    /// takes its fatal reports.
    pub fn start(path: PathBuf, budget: RestartBudget) -> Addr<Self> {
        let first = AtomicBool::new(true);
        SyncArbiter::start(1, move || {
            if !first.swap(false, Ordering::SeqCst) && budget.record() {
                std::thread::sleep(budget.backoff());
            }
            CheckpointActor {
                store: None,
                path: path.clone(),
                persisted: Lsn::ZERO,
                copying: BTreeSet::new(),
                budget: budget.clone(),
                failed: budget.is_stopping(),
            }
        })
    }

    /// The open store; opens and reads it on first use. A store that cannot be
    /// opened or read is reported as fatal (exit code 6).
    fn store(&mut self) -> Result<&CheckpointStore, CheckpointError> {
        if self.failed {
            return Err(CheckpointError::Stopped);
        }
        if self.store.is_none() {
            let opened = CheckpointStore::open(&self.path)
                .map_err(|e| ("cannot open the checkpoint store", e))
                .and_then(|s| match s.load() {
                    Ok(c) => Ok((s, c)),
                    Err(e) => Err(("cannot read the checkpoint", e)),
                });
            let (store, checkpoint) = match opened {
                Ok(opened) => opened,
                Err((what, e)) => return Err(self.fail(what, e)),
            };
            self.persisted = checkpoint.lsn;
            self.copying = checkpoint
                .pending()
                .map(|p| (p.schema.clone(), p.name.clone()))
                .collect();
            crate::metrics::metrics()
                .snapshot_pending
                .set(self.copying.len() as i64);
            self.store = Some(store);
        }
        self.store.as_ref().ok_or(CheckpointError::Stopped)
    }

    /// Report `error` as fatal and refuse all later work; returns `error`.
    fn fail(&mut self, what: &str, error: CheckpointError) -> CheckpointError {
        self.failed = true;
        self.store = None;
        self.budget.fatal(ExitCode::LocalIo, what, &error);
        error
    }

    /// Run `work`; a panic stops this instance so the arbiter restarts it.
    fn guarded<R>(
        &mut self,
        ctx: &mut SyncContext<Self>,
        work: impl FnOnce(&mut Self) -> R,
    ) -> Option<R> {
        match catch_unwind(AssertUnwindSafe(|| work(self))) {
            Ok(r) => Some(r),
            Err(_) => {
                tracing::error!(actor = "checkpoint", "checkpoint work panicked; restarting");
                ctx.stop();
                None
            }
        }
    }

    /// Store `msg`'s LSN and progress (if they move anything) with a synced
    /// write; the LSN now persisted.
    fn persist(&mut self, msg: &PersistLsn) -> Result<Lsn, CheckpointError> {
        self.store()?;
        if msg.lsn > self.persisted || !msg.progress.is_empty() {
            let lsn = msg.lsn.max(self.persisted);
            if let Err(e) = self.store()?.put_lsn(lsn, &msg.progress) {
                return Err(self.fail("checkpoint write failed", e));
            }
            self.persisted = lsn;
            for p in &msg.progress {
                let key = (p.schema.clone(), p.name.clone());
                if !p.done() {
                    self.copying.insert(key);
                } else {
                    self.copying.remove(&key);
                    tracing::info!(table = %format!("{}.{}", p.schema, p.name), rows = p.rows, "table copy fully acknowledged");
                }
            }
            crate::metrics::metrics()
                .snapshot_pending
                .set(self.copying.len() as i64);
        }
        Ok(self.persisted)
    }
}

impl Actor for CheckpointActor {
    type Context = SyncContext<Self>;

    fn started(&mut self, _ctx: &mut Self::Context) {
        // Errors are reported inside; the handlers answer with them.
        let _ = self.store();
    }
}

impl Handler<PersistLsn> for CheckpointActor {
    type Result = ();

    fn handle(&mut self, msg: PersistLsn, ctx: &mut Self::Context) {
        let done = self.guarded(ctx, |act| {
            let lsn = act.persist(&msg).ok()?;
            fail::fail_point!(crate::wire::failpoint::CHECKPOINT_BEFORE_CONFIRM);
            Some(lsn)
        });
        // Nothing is confirmed unless it is durably stored.
        if let Some(Some(lsn)) = done {
            msg.notify.do_send(LsnPersisted { lsn });
        }
    }
}

impl Handler<GetCheckpoint> for CheckpointActor {
    type Result = Result<Checkpoint, CheckpointError>;

    fn handle(&mut self, _msg: GetCheckpoint, _ctx: &mut Self::Context) -> Self::Result {
        self.store()?.load()
    }
}

impl Handler<PersistCopiedFrom> for CheckpointActor {
    type Result = Result<(), CheckpointError>;

    fn handle(&mut self, msg: PersistCopiedFrom, _ctx: &mut Self::Context) -> Self::Result {
        self.store()?.put_copied_from(&msg.0)
    }
}

impl Handler<PinPartitions> for CheckpointActor {
    type Result = Result<Vec<PartitionPin>, CheckpointError>;

    fn handle(&mut self, msg: PinPartitions, _ctx: &mut Self::Context) -> Self::Result {
        self.store()?.pin_partitions(&msg.0)
    }
}

impl Handler<PersistSlotIdentity> for CheckpointActor {
    type Result = Result<(), CheckpointError>;

    fn handle(&mut self, msg: PersistSlotIdentity, _ctx: &mut Self::Context) -> Self::Result {
        self.store()?
            .put_identity(&msg.identity, msg.lsn, &msg.progress)?;
        self.persisted = msg.lsn;
        for p in msg.progress.iter().filter(|p| !p.done()) {
            self.copying.insert((p.schema.clone(), p.name.clone()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::FatalReporter;
    use crate::supervision::SupervisionConfig;

    #[actix::test]
    async fn an_unusable_directory_is_reported_as_local_io_not_exited() {
        let dir = tempfile::tempdir().unwrap();
        // A regular file where the store's directory should be.
        let path = dir.path().join("cp");
        std::fs::write(&path, b"not a directory").unwrap();
        let (reporter, mut fatal) = FatalReporter::channel();
        let budget =
            RestartBudget::new("checkpoint", SupervisionConfig::default()).reporting_to(reporter);
        let checkpoint = CheckpointActor::start(path, budget);
        let reply = checkpoint.send(GetCheckpoint).await.unwrap();
        assert!(reply.is_err(), "{reply:?}");
        let report = fatal.recv().await.expect("a fatal report");
        assert_eq!(report.code, ExitCode::LocalIo);
        assert_eq!(report.code.code(), 6);
        assert_eq!(report.what, "cannot open the checkpoint store");
        // Still running (not exited), and refusing work from now on.
        let again = checkpoint.send(GetCheckpoint).await.unwrap();
        assert!(matches!(again, Err(CheckpointError::Stopped)), "{again:?}");
    }
}
