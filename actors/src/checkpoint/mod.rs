//! CheckpointActor: the RocksDB store of the confirmed commit LSN and the slot
//! identity. Runs on its own thread (`SyncArbiter`) so blocking, synced writes
//! never touch the async runtime.
//!
//! Every write that gates LSN advancement is synced (`WriteOptions::set_sync`);
//! a failed write is fatal (exit code 6), never retried: after a failed fsync
//! the page cache can no longer be trusted.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use actix::prelude::*;
use rocksdb::{Options, WriteBatch, WriteOptions, DB};
use serde::{Deserialize, Serialize};

use crate::error::{exit_fatal, ErrorClass, ExitCode};
use crate::lsn::Lsn;
use crate::messages::{GetCheckpoint, LsnPersisted, PersistLsn, PersistSlotIdentity};
use crate::supervision::RestartBudget;

const KEY_LSN: &[u8] = b"confirmed_lsn";
const KEY_SLOT: &[u8] = b"slot_identity";
/// Prefix of the per-table snapshot progress keys: `progress\0<schema>\0<table>`.
const PREFIX_PROGRESS: &[u8] = b"progress\0";

/// Which slot on which server the checkpoint belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotIdentity {
    /// `IDENTIFY_SYSTEM`'s system identifier of the PostgreSQL cluster.
    pub system_id: String,
    /// Database name.
    pub database: String,
    /// Replication slot name.
    pub slot_name: String,
}

/// A primary-key value as PostgreSQL prints it: one text per key column.
pub type KeyText = Vec<String>;

/// One key range of a table's copy: rows with `after < key <= upto`
/// (`None`: unbounded on that side) still to be copied unless `done`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRange {
    /// Last key copied (exclusive lower bound of what is left).
    pub after: Option<KeyText>,
    /// Inclusive upper bound of the range.
    pub upto: Option<KeyText>,
    /// Every row of the range is copied.
    pub done: bool,
}

/// How far the copy (initial snapshot or backfill) of one table has come.
/// Stored in the same synced write as the LSN of the commit that carried the
/// copied rows, so it never runs ahead of what Kafka acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableProgress {
    /// Schema name, unquoted.
    pub schema: String,
    /// Table name, unquoted.
    pub name: String,
    /// The key ranges the copy is split into.
    pub ranges: Vec<KeyRange>,
    /// Rows copied so far.
    pub rows: u64,
}

impl TableProgress {
    /// A copy of `schema.name` not started yet: one unbounded range.
    pub fn fresh(schema: &str, name: &str) -> Self {
        Self {
            schema: schema.to_owned(),
            name: name.to_owned(),
            ranges: vec![KeyRange {
                after: None,
                upto: None,
                done: false,
            }],
            rows: 0,
        }
    }

    /// A table whose copy is complete (or never wanted).
    pub fn finished(schema: &str, name: &str) -> Self {
        let mut p = Self::fresh(schema, name);
        p.ranges[0].done = true;
        p
    }

    /// Whether every range is copied.
    pub fn done(&self) -> bool {
        self.ranges.iter().all(|r| r.done)
    }

    fn key(&self) -> Vec<u8> {
        let mut k = PREFIX_PROGRESS.to_vec();
        k.extend_from_slice(self.schema.as_bytes());
        k.push(0);
        k.extend_from_slice(self.name.as_bytes());
        k
    }
}

/// What the checkpoint holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checkpoint {
    /// Highest commit end LSN whose records are all acknowledged by Kafka; zero if none yet.
    pub lsn: Lsn,
    /// The slot the LSN refers to; `None` before the first start.
    pub slot: Option<SlotIdentity>,
    /// Copy progress of every table pgcdc has seen (ordered by schema, table).
    pub progress: Vec<TableProgress>,
}

impl Checkpoint {
    /// Tables whose copy is not complete.
    pub fn pending(&self) -> impl Iterator<Item = &TableProgress> {
        self.progress.iter().filter(|p| !p.done())
    }
}

/// Checkpoint store failures. All are fatal: local state we cannot trust.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// RocksDB failed to open, read or write.
    #[error("checkpoint store {path}: {source}")]
    Store {
        /// The database directory.
        path: PathBuf,
        /// RocksDB's error.
        #[source]
        source: rocksdb::Error,
    },
    /// A stored value does not decode.
    #[error("checkpoint store {path}: corrupt value for {key}: {detail}")]
    Corrupt {
        /// The database directory.
        path: PathBuf,
        /// Which key.
        key: &'static str,
        /// What is wrong with it.
        detail: String,
    },
}

impl CheckpointError {
    /// The one classification point for checkpoint errors.
    pub fn class(&self) -> ErrorClass {
        ErrorClass::Fatal(ExitCode::LocalIo)
    }
}

/// The RocksDB checkpoint store, usable without an actor (status, tests).
pub struct CheckpointStore {
    db: DB,
    path: PathBuf,
}

impl CheckpointStore {
    /// Open (creating if missing) the store at `path`.
    pub fn open(path: &Path) -> Result<Self, CheckpointError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.set_paranoid_checks(true);
        Self::wrap(path, DB::open(&opts, path))
    }

    /// Open an existing store read-only (works while the daemon holds it).
    pub fn open_read_only(path: &Path) -> Result<Self, CheckpointError> {
        Self::wrap(
            path,
            DB::open_for_read_only(&Options::default(), path, false),
        )
    }

    fn wrap(path: &Path, db: Result<DB, rocksdb::Error>) -> Result<Self, CheckpointError> {
        let path = path.to_path_buf();
        match db {
            Ok(db) => Ok(Self { db, path }),
            Err(source) => Err(CheckpointError::Store { path, source }),
        }
    }

    fn store_err(&self, source: rocksdb::Error) -> CheckpointError {
        CheckpointError::Store {
            path: self.path.clone(),
            source,
        }
    }

    fn corrupt(&self, key: &'static str, detail: String) -> CheckpointError {
        CheckpointError::Corrupt {
            path: self.path.clone(),
            key,
            detail,
        }
    }

    /// Read the checkpoint; a missing key reads as "none yet".
    pub fn load(&self) -> Result<Checkpoint, CheckpointError> {
        let lsn = match self.db.get(KEY_LSN).map_err(|e| self.store_err(e))? {
            None => Lsn::ZERO,
            Some(v) => {
                let bytes: [u8; 8] = v.as_slice().try_into().map_err(|_| {
                    self.corrupt("confirmed_lsn", format!("{} bytes, expected 8", v.len()))
                })?;
                Lsn(u64::from_be_bytes(bytes))
            }
        };
        let slot = match self.db.get(KEY_SLOT).map_err(|e| self.store_err(e))? {
            None => None,
            Some(v) => Some(
                serde_json::from_slice(&v)
                    .map_err(|e| self.corrupt("slot_identity", e.to_string()))?,
            ),
        };
        let mut progress = Vec::new();
        for item in self.db.prefix_iterator(PREFIX_PROGRESS) {
            let (k, v) = item.map_err(|e| self.store_err(e))?;
            if !k.starts_with(PREFIX_PROGRESS) {
                break;
            }
            let p: TableProgress =
                serde_json::from_slice(&v).map_err(|e| self.corrupt("progress", e.to_string()))?;
            if p.key().as_slice() != &*k || p.ranges.is_empty() {
                return Err(self.corrupt(
                    "progress",
                    format!("entry for {}.{} does not match its key", p.schema, p.name),
                ));
            }
            progress.push(p);
        }
        if slot.is_none() && lsn != Lsn::ZERO {
            return Err(self.corrupt("slot_identity", "missing while an lsn is stored".into()));
        }
        Ok(Checkpoint {
            lsn,
            slot,
            progress,
        })
    }

    fn write_synced(&self, batch: WriteBatch) -> Result<(), CheckpointError> {
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.db
            .write_opt(batch, &opts)
            .map_err(|e| self.store_err(e))
    }

    fn put_progress(
        &self,
        batch: &mut WriteBatch,
        progress: &[TableProgress],
    ) -> Result<(), CheckpointError> {
        for p in progress {
            let json =
                serde_json::to_vec(p).map_err(|e| self.corrupt("progress", e.to_string()))?;
            batch.put(p.key(), json);
        }
        Ok(())
    }

    /// Store `lsn` as the confirmed LSN and the copy progress that came with
    /// it, in one synced write.
    pub fn put_lsn(&self, lsn: Lsn, progress: &[TableProgress]) -> Result<(), CheckpointError> {
        let mut batch = WriteBatch::default();
        batch.put(KEY_LSN, lsn.0.to_be_bytes());
        self.put_progress(&mut batch, progress)?;
        self.write_synced(batch)
    }

    /// Store the slot identity, its starting LSN and the tables' starting
    /// progress in one synced write.
    pub fn put_identity(
        &self,
        identity: &SlotIdentity,
        lsn: Lsn,
        progress: &[TableProgress],
    ) -> Result<(), CheckpointError> {
        let json = serde_json::to_vec(identity)
            .map_err(|e| self.corrupt("slot_identity", e.to_string()))?;
        let mut batch = WriteBatch::default();
        batch.put(KEY_SLOT, json);
        batch.put(KEY_LSN, lsn.0.to_be_bytes());
        self.put_progress(&mut batch, progress)?;
        self.write_synced(batch)
    }
}

/// The actor around [`CheckpointStore`]. One instance per thread of its
/// `SyncArbiter`; on a crash (error or panic) the arbiter builds a new one from
/// the factory, which reopens the store.
pub struct CheckpointActor {
    store: Option<CheckpointStore>,
    path: PathBuf,
    persisted: Lsn,
    /// Tables whose copy is not finished (for the metric).
    copying: std::collections::BTreeSet<(String, String)>,
}

impl CheckpointActor {
    /// Start the actor on its own thread; `budget` counts its restarts.
    pub fn start(path: PathBuf, budget: RestartBudget) -> Addr<Self> {
        let first = std::sync::atomic::AtomicBool::new(true);
        SyncArbiter::start(1, move || {
            if !first.swap(false, std::sync::atomic::Ordering::SeqCst) {
                budget.record();
                std::thread::sleep(budget.backoff());
            }
            CheckpointActor {
                store: None,
                path: path.clone(),
                persisted: Lsn::ZERO,
                copying: Default::default(),
            }
        })
    }

    fn store(&mut self) -> &CheckpointStore {
        if self.store.is_none() {
            let store = CheckpointStore::open(&self.path).unwrap_or_else(|e| {
                exit_fatal(ExitCode::LocalIo, "cannot open the checkpoint store", &e)
            });
            let checkpoint = store.load().unwrap_or_else(|e| {
                exit_fatal(ExitCode::LocalIo, "cannot read the checkpoint", &e)
            });
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
        self.store.as_ref().unwrap_or_else(|| unreachable!())
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
}

impl Actor for CheckpointActor {
    type Context = SyncContext<Self>;

    fn started(&mut self, _ctx: &mut Self::Context) {
        self.store();
    }
}

impl Handler<PersistLsn> for CheckpointActor {
    type Result = ();

    fn handle(&mut self, msg: PersistLsn, ctx: &mut Self::Context) {
        let done = self.guarded(ctx, |act| {
            act.store();
            if msg.lsn > act.persisted || !msg.progress.is_empty() {
                let lsn = msg.lsn.max(act.persisted);
                if let Err(e) = act.store().put_lsn(lsn, &msg.progress) {
                    exit_fatal(ExitCode::LocalIo, "checkpoint write failed", &e);
                }
                act.persisted = lsn;
                for p in &msg.progress {
                    let key = (p.schema.clone(), p.name.clone());
                    if !p.done() {
                        act.copying.insert(key);
                    } else {
                        act.copying.remove(&key);
                        tracing::info!(table = %format!("{}.{}", p.schema, p.name), rows = p.rows, "table copy fully acknowledged");
                    }
                }
                crate::metrics::metrics()
                    .snapshot_pending
                    .set(act.copying.len() as i64);
            }
            fail::fail_point!(crate::wire::failpoint::CHECKPOINT_BEFORE_CONFIRM);
            act.persisted
        });
        if let Some(lsn) = done {
            msg.notify.do_send(LsnPersisted { lsn });
        }
    }
}

impl Handler<GetCheckpoint> for CheckpointActor {
    type Result = Result<Checkpoint, CheckpointError>;

    fn handle(&mut self, _msg: GetCheckpoint, _ctx: &mut Self::Context) -> Self::Result {
        self.store().load()
    }
}

impl Handler<PersistSlotIdentity> for CheckpointActor {
    type Result = Result<(), CheckpointError>;

    fn handle(&mut self, msg: PersistSlotIdentity, _ctx: &mut Self::Context) -> Self::Result {
        self.store()
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

    fn identity() -> SlotIdentity {
        SlotIdentity {
            system_id: "7".into(),
            database: "db".into(),
            slot_name: "s".into(),
        }
    }

    #[test]
    fn empty_store_reads_as_no_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(dir.path()).unwrap();
        assert_eq!(store.load().unwrap(), Checkpoint::default());
    }

    #[test]
    fn checkpoint_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = CheckpointStore::open(dir.path()).unwrap();
            let fresh = [
                TableProgress::fresh("public", "a"),
                TableProgress::fresh("public", "b"),
            ];
            store.put_identity(&identity(), Lsn(100), &fresh).unwrap();
            let mut a = TableProgress::fresh("public", "a");
            a.ranges[0].after = Some(vec!["42".into()]);
            a.rows = 42;
            store.put_lsn(Lsn(250), &[a]).unwrap();
        }
        let store = CheckpointStore::open_read_only(dir.path()).unwrap();
        let cp = store.load().unwrap();
        assert_eq!((cp.lsn, cp.slot.clone()), (Lsn(250), Some(identity())));
        assert_eq!(cp.progress.len(), 2);
        assert_eq!(cp.progress[0].ranges[0].after, Some(vec!["42".to_string()]));
        assert_eq!((cp.progress[0].rows, cp.progress[1].rows), (42, 0));
        assert_eq!(cp.pending().count(), 2);
    }

    #[test]
    fn corrupt_lsn_is_refused_not_read_as_zero() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(dir.path()).unwrap();
        store.put_identity(&identity(), Lsn(100), &[]).unwrap();
        store.db.put(KEY_LSN, b"xyz").unwrap();
        let err = store.load().unwrap_err();
        assert!(
            matches!(
                err,
                CheckpointError::Corrupt {
                    key: "confirmed_lsn",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn lsn_without_identity_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(dir.path()).unwrap();
        store.put_lsn(Lsn(5), &[]).unwrap();
        assert!(store.load().is_err());
    }
}
