//! Watermark backfill (as in Netflix's DBLog and Debezium's incremental
//! snapshots): copy a table while the stream runs, without locks.
//!
//! For each chunk the [`SnapshotActor`](super::SnapshotActor):
//! 1. registers the chunk here and writes a *low* mark into the WAL
//!    (`pg_logical_emit_message(true, 'pgcdc.watermark', …)`),
//! 2. reads the chunk (`SELECT … WHERE key > last ORDER BY key LIMIT n`),
//! 3. stores the rows here and writes a *high* mark.
//!
//! The stream sees the marks in commit order. Between them it records the
//! key of every change to the table ([`Windows::observe`]); at the high mark
//! it drops the chunk rows whose key changed (the stream already carries a
//! change at least as new) and emits the rest inside the high mark's
//! transaction, versioned with its commit LSN. A TRUNCATE between the marks
//! drops the whole chunk. A chunk whose low mark this stream session did not
//! see (it restarted in between) is not emitted: the actor reads it again.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::checkpoint::TableProgress;
use crate::event::{ChangeEvent, KeySource, Op, TableRef};

/// Prefix of watermark messages.
pub const WATERMARK_PREFIX: &str = crate::wire::message::WATERMARK;
/// Prefix of signal messages (`pgcdc snapshot --table`).
pub const SIGNAL_PREFIX: &str = crate::wire::message::SIGNAL;

/// A watermark message's content.
#[derive(Debug, Serialize, Deserialize)]
pub struct Mark {
    /// The slot of the pgcdc instance that wrote it.
    pub slot: String,
    /// The chunk.
    pub id: u64,
    /// `false`: low mark, `true`: high mark.
    pub high: bool,
}

/// A signal message's content: a request to backfill a table.
#[derive(Debug, Serialize, Deserialize)]
pub struct Signal {
    /// The slot of the pgcdc instance it is meant for.
    pub slot: String,
    /// Schema of the table to copy again.
    pub schema: String,
    /// Name of the table to copy again.
    pub table: String,
}

/// What became of a chunk.
#[derive(Debug, PartialEq, Eq)]
pub enum ChunkOutcome {
    /// Its rows are in the stream's output.
    Emitted,
    /// The stream did not see its low mark: read it again.
    Retry,
}

struct PendingChunk {
    table: (String, String),
    rows: Option<(Vec<ChangeEvent>, TableProgress)>,
    outcome: oneshot::Sender<ChunkOutcome>,
}

#[derive(Default)]
struct Registry {
    epoch: u64,
    next_id: u64,
    chunks: HashMap<u64, PendingChunk>,
}

/// Chunks between their marks, shared by the snapshot actor and the stream.
#[derive(Clone)]
pub struct Watermarks {
    inner: Arc<Mutex<Registry>>,
}

impl Default for Watermarks {
    fn default() -> Self {
        // Ids must not repeat those of earlier runs still in the WAL.
        let base = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        Self {
            inner: Arc::new(Mutex::new(Registry {
                next_id: base,
                ..Registry::default()
            })),
        }
    }
}

impl Watermarks {
    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new stream session starts: forget every pending chunk.
    pub fn new_epoch(&self) -> u64 {
        let mut r = self.lock();
        r.epoch += 1;
        r.chunks.clear();
        r.epoch
    }

    /// Register a chunk of `schema.name` for stream session `epoch`; `None`
    /// if that session is over.
    pub fn register(
        &self,
        epoch: u64,
        schema: &str,
        name: &str,
    ) -> Option<(u64, oneshot::Receiver<ChunkOutcome>)> {
        let mut r = self.lock();
        if r.epoch != epoch {
            return None;
        }
        r.next_id = r.next_id.wrapping_add(1);
        let id = r.next_id;
        let (tx, rx) = oneshot::channel();
        r.chunks.insert(
            id,
            PendingChunk {
                table: (schema.to_owned(), name.to_owned()),
                rows: None,
                outcome: tx,
            },
        );
        Some((id, rx))
    }

    /// The chunk's rows were read; `progress` is the table's progress once they are emitted.
    pub fn fill(&self, id: u64, rows: Vec<ChangeEvent>, progress: TableProgress) {
        if let Some(c) = self.lock().chunks.get_mut(&id) {
            c.rows = Some((rows, progress));
        }
    }

    /// Drop a chunk (its marks could not be written).
    pub fn forget(&self, id: u64) {
        self.lock().chunks.remove(&id);
    }

    fn table_of(&self, id: u64) -> Option<(String, String)> {
        self.lock().chunks.get(&id).map(|c| c.table.clone())
    }

    fn take(&self, id: u64) -> Option<PendingChunk> {
        self.lock().chunks.remove(&id)
    }
}

struct Window {
    schema: String,
    name: String,
    keys: HashSet<String>,
    truncated: bool,
}

/// What the stream must do for a logical message.
#[derive(Debug)]
pub enum MessageAction {
    /// Not ours, or nothing to do.
    Ignore,
    /// Put these rows into the current transaction; checkpoint `progress` with it.
    Emit(Vec<ChangeEvent>, TableProgress),
    /// Start copying this table again (progress reset).
    Backfill(TableProgress),
}

/// The stream side: open windows between low and high marks.
pub struct Windows {
    slot: String,
    marks: Watermarks,
    open: HashMap<u64, Window>,
    /// The configured tables with a unique key: the only ones a signal may
    /// ask to backfill (anything else would be checkpointed as a copy that
    /// can never finish).
    copyable: HashSet<(String, String)>,
}

fn key_text(e: &ChangeEvent) -> String {
    e.key
        .as_ref()
        .map(|k| serde_json::Value::Object(k.clone()).to_string())
        .unwrap_or_default()
}

impl Windows {
    /// Windows for the stream of `slot`, whose configured tables are `tables`.
    pub fn new(slot: &str, marks: Watermarks, tables: &[Arc<TableRef>]) -> Self {
        let copyable = tables
            .iter()
            .filter(|t| t.key_source != KeySource::WholeRow)
            .map(|t| (t.schema.clone(), t.name.clone()))
            .collect();
        Self {
            slot: slot.to_owned(),
            marks,
            open: HashMap::new(),
            copyable,
        }
    }

    /// Record the keys of streamed changes to tables with an open window.
    pub fn observe(&mut self, events: &[ChangeEvent]) {
        if self.open.is_empty() {
            return;
        }
        for e in events {
            for w in self.open.values_mut() {
                if w.schema == e.table.schema && w.name == e.table.name {
                    if e.op == Op::Truncate {
                        w.truncated = true;
                    } else {
                        w.keys.insert(key_text(e));
                    }
                }
            }
        }
    }

    /// Handle a logical decoding message.
    pub fn on_message(&mut self, prefix: &str, content: &[u8]) -> MessageAction {
        match prefix {
            WATERMARK_PREFIX => {
                let Ok(mark) = serde_json::from_slice::<Mark>(content) else {
                    tracing::warn!("ignoring a malformed watermark message");
                    return MessageAction::Ignore;
                };
                if mark.slot != self.slot {
                    return MessageAction::Ignore;
                }
                if mark.high {
                    self.high(mark.id)
                } else {
                    self.low(mark.id);
                    MessageAction::Ignore
                }
            }
            SIGNAL_PREFIX => match serde_json::from_slice::<Signal>(content) {
                Ok(s) if s.slot == self.slot => self.signal(s),
                Ok(_) => MessageAction::Ignore,
                Err(e) => {
                    tracing::warn!(error = %e, "ignoring a malformed signal message");
                    MessageAction::Ignore
                }
            },
            _ => MessageAction::Ignore,
        }
    }

    /// A backfill request for this slot: only a configured table with a
    /// unique key is copied; anything else is ignored and nothing persisted.
    fn signal(&self, s: Signal) -> MessageAction {
        let table = format!("{}.{}", s.schema, s.table);
        if !self.copyable.contains(&(s.schema.clone(), s.table.clone())) {
            tracing::warn!(table = %table, "ignoring a backfill signal for a table that is not configured or has no unique key");
            return MessageAction::Ignore;
        }
        tracing::info!(table = %table, "backfill requested");
        MessageAction::Backfill(TableProgress::fresh(&s.schema, &s.table))
    }

    fn low(&mut self, id: u64) {
        if let Some((schema, name)) = self.marks.table_of(id) {
            let window = Window {
                schema,
                name,
                keys: HashSet::new(),
                truncated: false,
            };
            self.open.insert(id, window);
        }
    }

    fn high(&mut self, id: u64) -> MessageAction {
        let window = self.open.remove(&id);
        let Some(chunk) = self.marks.take(id) else {
            return MessageAction::Ignore;
        };
        let (Some(window), Some((rows, progress))) = (window, chunk.rows) else {
            let _ = chunk.outcome.send(ChunkOutcome::Retry);
            return MessageAction::Ignore;
        };
        let read = rows.len();
        let rows: Vec<ChangeEvent> = if window.truncated {
            Vec::new()
        } else {
            rows.into_iter()
                .filter(|e| !window.keys.contains(&key_text(e)))
                .collect()
        };
        tracing::debug!(table = %format!("{}.{}", window.schema, window.name), read, emitted = rows.len(), "backfill chunk at its high mark");
        let _ = chunk.outcome.send(ChunkOutcome::Emitted);
        MessageAction::Emit(rows, progress)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::TxMeta;
    use crate::lsn::Lsn;
    use serde_json::json;

    fn event(op: Op, id: i64) -> ChangeEvent {
        let key = json!({ "id": id }).as_object().cloned();
        ChangeEvent {
            op,
            table: Arc::new(TableRef {
                schema: "public".into(),
                name: "t".into(),
                key_columns: vec!["id".into()],
                key_source: Default::default(),
                column_types: String::new(),
            }),
            key: if op == Op::Truncate {
                None
            } else {
                key.clone()
            },
            before: None,
            after: key,
            unchanged_toast: Vec::new(),
            lsn: Lsn(1),
            seq: 0,
            tx: TxMeta {
                xid: 1,
                commit_lsn: Lsn(1),
                commit_time_us: 0,
            },
            snapshot: false,
        }
    }

    fn mark(id: u64, high: bool) -> Vec<u8> {
        serde_json::to_vec(&Mark {
            slot: "s".into(),
            id,
            high,
        })
        .unwrap()
    }

    fn chunk(marks: &Watermarks, ids: &[i64]) -> (u64, oneshot::Receiver<ChunkOutcome>) {
        let epoch = marks.new_epoch();
        let (id, rx) = marks.register(epoch, "public", "t").unwrap();
        let rows = ids.iter().map(|i| event(Op::Read, *i)).collect();
        marks.fill(id, rows, TableProgress::fresh("public", "t"));
        (id, rx)
    }

    #[test]
    fn rows_changed_between_the_marks_are_dropped() {
        let marks = Watermarks::default();
        let mut w = Windows::new("s", marks.clone(), &[]);
        let (id, mut rx) = chunk(&marks, &[1, 2, 3]);
        assert!(matches!(
            w.on_message(WATERMARK_PREFIX, &mark(id, false)),
            MessageAction::Ignore
        ));
        w.observe(&[event(Op::Update, 2)]);
        let MessageAction::Emit(rows, _) = w.on_message(WATERMARK_PREFIX, &mark(id, true)) else {
            panic!("chunk not emitted");
        };
        let ids: Vec<_> = rows
            .iter()
            .map(|e| e.key.clone().unwrap()["id"].clone())
            .collect();
        assert_eq!(ids, vec![json!(1), json!(3)]);
        assert_eq!(rx.try_recv().unwrap(), ChunkOutcome::Emitted);
    }

    #[test]
    fn truncate_between_the_marks_drops_the_chunk() {
        let marks = Watermarks::default();
        let mut w = Windows::new("s", marks.clone(), &[]);
        let (id, _rx) = chunk(&marks, &[1, 2]);
        w.on_message(WATERMARK_PREFIX, &mark(id, false));
        w.observe(&[event(Op::Truncate, 0)]);
        let MessageAction::Emit(rows, _) = w.on_message(WATERMARK_PREFIX, &mark(id, true)) else {
            panic!("chunk not emitted");
        };
        assert!(rows.is_empty());
    }

    #[test]
    fn a_high_mark_without_its_low_mark_asks_for_a_retry() {
        let marks = Watermarks::default();
        let mut w = Windows::new("s", marks.clone(), &[]);
        let (id, mut rx) = chunk(&marks, &[1]);
        assert!(matches!(
            w.on_message(WATERMARK_PREFIX, &mark(id, true)),
            MessageAction::Ignore
        ));
        assert_eq!(rx.try_recv().unwrap(), ChunkOutcome::Retry);
    }

    #[test]
    fn other_slots_and_stale_sessions_are_ignored() {
        let marks = Watermarks::default();
        let mut w = Windows::new("other", marks.clone(), &[]);
        let (id, _rx) = chunk(&marks, &[1]);
        w.on_message(WATERMARK_PREFIX, &mark(id, false));
        assert!(matches!(
            w.on_message(WATERMARK_PREFIX, &mark(id, true)),
            MessageAction::Ignore
        ));
        let epoch = marks.new_epoch();
        assert!(marks.register(epoch - 1, "public", "t").is_none());
        assert!(matches!(
            w.on_message(WATERMARK_PREFIX, b"not json"),
            MessageAction::Ignore
        ));
    }

    #[test]
    fn signals_for_unconfigured_or_keyless_tables_are_ignored() {
        let table = |name: &str, key_source| {
            Arc::new(TableRef {
                schema: "public".into(),
                name: name.into(),
                key_columns: vec!["id".into()],
                key_source,
                column_types: String::new(),
            })
        };
        let tables = [
            table("keyed", KeySource::IdentityIndex),
            table("keyless", KeySource::WholeRow),
        ];
        let mut w = Windows::new("s", Watermarks::default(), &tables);
        let signal = |t: &str| {
            let s = Signal {
                slot: "s".into(),
                schema: "public".into(),
                table: t.into(),
            };
            serde_json::to_vec(&s).unwrap()
        };
        for t in ["keyless", "unknown"] {
            let action = w.on_message(SIGNAL_PREFIX, &signal(t));
            assert!(matches!(action, MessageAction::Ignore), "{t}: {action:?}");
        }
        let action = w.on_message(SIGNAL_PREFIX, &signal("keyed"));
        assert!(
            matches!(&action, MessageAction::Backfill(p) if p.name == "keyed"),
            "{action:?}"
        );
    }
}
