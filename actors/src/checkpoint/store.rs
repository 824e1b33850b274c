//! The RocksDB checkpoint store: the confirmed commit LSN, the slot identity,
//! each table's copy progress and what its mirror was copied from. Blocking;
//! used by the checkpoint actor on its own thread and read-only by `pgcdc
//! status`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rocksdb::{Options, WriteBatch, WriteOptions, DB};

use crate::error::CheckpointError;
use crate::lsn::Lsn;
use crate::messages::{Checkpoint, PartitionPin, SlotIdentity, TableProgress};

/// Key of the confirmed commit LSN (8 bytes, big-endian).
const KEY_LSN: &[u8] = b"confirmed_lsn";
/// Key of the slot identity (JSON).
const KEY_SLOT: &[u8] = b"slot_identity";
/// Prefix of the per-table snapshot progress keys: `progress\0<schema>\0<table>`.
const PREFIX_PROGRESS: &[u8] = b"progress\0";

/// Prefix of the keys of what each table's mirror was copied from:
/// `copied_from\0<schema>\0<table>`, its fingerprint as the value.
const PREFIX_COPIED_FROM: &[u8] = b"copied_from\0";

/// Prefix of the partition count each change topic's records are spread
/// over: `partitions\0<topic>`, the count as 4 bytes, big-endian.
const PREFIX_PARTITIONS: &[u8] = b"partitions\0";

/// The key `table`'s entry is stored under, after `prefix`.
fn table_key(prefix: &[u8], schema: &str, name: &str) -> Vec<u8> {
    let mut k = prefix.to_vec();
    k.extend_from_slice(schema.as_bytes());
    k.push(0);
    k.extend_from_slice(name.as_bytes());
    k
}

/// The key a table's progress is stored under.
fn progress_key(p: &TableProgress) -> Vec<u8> {
    table_key(PREFIX_PROGRESS, &p.schema, &p.name)
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
        // RocksDB's own log file (`LOG`) only for fatal messages: pgcdc logs
        // each error RocksDB returns. On a full disk a failed line in that
        // file made the next one abort the process in a RocksDB built with
        // assertions (Debian's librocksdb 7.8) instead of failing the write.
        opts.set_log_level(rocksdb::LogLevel::Fatal);
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
            if progress_key(&p).as_slice() != &*k || p.ranges.is_empty() {
                return Err(self.corrupt(
                    "progress",
                    format!("entry for {}.{} does not match its key", p.schema, p.name),
                ));
            }
            progress.push(p);
        }
        let mut copied_from = BTreeMap::new();
        for item in self.db.prefix_iterator(PREFIX_COPIED_FROM) {
            let (k, v) = item.map_err(|e| self.store_err(e))?;
            let Some(table) = k.strip_prefix(PREFIX_COPIED_FROM) else {
                break;
            };
            let text = |b: &[u8]| String::from_utf8(b.to_vec()).ok();
            let mut parts = table.splitn(2, |b| *b == 0);
            let entry = (
                parts.next().and_then(text),
                parts.next().and_then(text),
                text(&v),
            );
            let (Some(schema), Some(name), Some(fingerprint)) = entry else {
                return Err(self.corrupt(
                    "copied_from",
                    "an entry is not schema, table and text".into(),
                ));
            };
            copied_from.insert((schema, name), fingerprint);
        }
        if slot.is_none() && lsn != Lsn::ZERO {
            return Err(self.corrupt("slot_identity", "missing while an lsn is stored".into()));
        }
        Ok(Checkpoint {
            lsn,
            slot,
            progress,
            copied_from,
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
            batch.put(progress_key(p), json);
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

    /// Store what the mirrors of `tables` are copied from ((schema, name)
    /// and fingerprint), in one synced write.
    pub fn put_copied_from(
        &self,
        tables: &[((String, String), String)],
    ) -> Result<(), CheckpointError> {
        let mut batch = WriteBatch::default();
        for ((schema, name), fingerprint) in tables {
            batch.put(
                table_key(PREFIX_COPIED_FROM, schema, name),
                fingerprint.as_bytes(),
            );
        }
        self.write_synced(batch)
    }

    /// The partition count each of `observed` (topic, partitions now) is
    /// pinned to: the stored one, else (a topic seen for the first time) its
    /// count now. A topic with fewer partitions than its pin was deleted and
    /// created again (Kafka cannot remove partitions), so it is pinned anew.
    /// New pins are stored in one synced write.
    pub fn pin_partitions(
        &self,
        observed: &[(String, i32)],
    ) -> Result<Vec<PartitionPin>, CheckpointError> {
        let mut batch = WriteBatch::default();
        let mut pins = Vec::with_capacity(observed.len());
        for (topic, now) in observed {
            let mut key = PREFIX_PARTITIONS.to_vec();
            key.extend_from_slice(topic.as_bytes());
            let before = match self.db.get(&key).map_err(|e| self.store_err(e))? {
                None => None,
                Some(v) => Some(i32::from_be_bytes(v.as_slice().try_into().map_err(
                    |_| {
                        self.corrupt(
                            "partitions",
                            format!("{} bytes for {topic}, expected 4", v.len()),
                        )
                    },
                )?)),
            };
            let pinned = match before {
                Some(b) if b <= *now => b,
                _ => {
                    batch.put(key, now.to_be_bytes());
                    *now
                }
            };
            pins.push(PartitionPin {
                topic: topic.clone(),
                now: *now,
                pinned,
                before,
            });
        }
        if !batch.is_empty() {
            self.write_synced(batch)?;
        }
        Ok(pins)
    }

    /// The partition count each change topic's records are pinned to.
    pub fn partition_pins(&self) -> Result<BTreeMap<String, i32>, CheckpointError> {
        let mut pins = BTreeMap::new();
        for item in self.db.prefix_iterator(PREFIX_PARTITIONS) {
            let (k, v) = item.map_err(|e| self.store_err(e))?;
            let Some(topic) = k.strip_prefix(PREFIX_PARTITIONS) else {
                break;
            };
            let count = v.as_ref().try_into().map(i32::from_be_bytes);
            let (Ok(topic), Ok(count)) = (std::str::from_utf8(topic), count) else {
                return Err(
                    self.corrupt("partitions", "an entry is not a topic and a count".into())
                );
            };
            pins.insert(topic.to_owned(), count);
        }
        Ok(pins)
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
            let fp = |t: &str, f: &str| (("public".to_string(), t.to_string()), f.to_string());
            store
                .put_copied_from(&[fp("a", "1 2"), fp("b", "")])
                .unwrap();
            store.put_copied_from(&[fp("a", "1 3|{OPEXPR}")]).unwrap();
        }
        let store = CheckpointStore::open_read_only(dir.path()).unwrap();
        let cp = store.load().unwrap();
        assert_eq!((cp.lsn, cp.slot.clone()), (Lsn(250), Some(identity())));
        assert_eq!(cp.progress.len(), 2);
        assert_eq!(cp.progress[0].ranges[0].after, Some(vec!["42".to_string()]));
        assert_eq!((cp.progress[0].rows, cp.progress[1].rows), (42, 0));
        assert_eq!(cp.pending().count(), 2);
        let copied_from: Vec<_> = cp
            .copied_from
            .iter()
            .map(|((_, t), f)| (t.as_str(), f.as_str()))
            .collect();
        assert_eq!(copied_from, [("a", "1 3|{OPEXPR}"), ("b", "")]);
    }

    #[test]
    fn a_topic_keeps_the_partition_count_it_was_first_seen_with() {
        let dir = tempfile::tempdir().unwrap();
        let pinned = |store: &CheckpointStore, observed: &[(&str, i32)]| {
            let observed: Vec<_> = observed.iter().map(|(t, n)| (t.to_string(), *n)).collect();
            let pins = store.pin_partitions(&observed).unwrap();
            pins.iter()
                .map(|p| (p.pinned, p.before))
                .collect::<Vec<_>>()
        };
        {
            let store = CheckpointStore::open(dir.path()).unwrap();
            assert_eq!(
                pinned(&store, &[("a", 3), ("b", 1)]),
                [(3, None), (1, None)]
            );
            // Partitions added: the first count stays.
            assert_eq!(pinned(&store, &[("a", 6)]), [(3, Some(3))]);
        }
        let store = CheckpointStore::open(dir.path()).unwrap();
        assert_eq!(
            pinned(&store, &[("a", 6), ("b", 4)]),
            [(3, Some(3)), (1, Some(1))]
        );
        // Fewer than the pin: the topic was created again, and is pinned anew.
        assert_eq!(pinned(&store, &[("a", 2)]), [(2, Some(3))]);
        assert_eq!(pinned(&store, &[("a", 6)]), [(2, Some(2))]);
        // The pins are not part of the checkpoint's table entries.
        assert_eq!(store.load().unwrap(), Checkpoint::default());
        let pins = store.partition_pins().unwrap();
        assert_eq!(pins, BTreeMap::from([("a".into(), 2), ("b".into(), 1)]));
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
