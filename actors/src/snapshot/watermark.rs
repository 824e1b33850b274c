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
//!
//! PostgreSQL writes a commit into the WAL a moment before other sessions
//! can see it (much longer while synchronous replication waits for a
//! standby). A transaction that committed just before the low mark can
//! then be invisible to the chunk's read although the stream has already
//! carried it, outside the window: the chunk would put the row's older
//! image after its newer change. So each chunk is read in a snapshot whose
//! in-progress transactions are kept with its rows, the stream remembers
//! the commit LSN of the last [`REMEMBERED_COMMITS`] transactions, and a
//! chunk whose read missed one that committed before its low mark is read
//! again ([`ChunkOutcome::NotYetVisible`]).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::message::Addressed;
pub use super::message::{Mark, Signal};
pub use super::sign::MessageKey;
use crate::checkpoint::TableProgress;
use crate::event::{ChangeEvent, KeySource, Op, TableRef, TxMeta};
use crate::lsn::Lsn;
use crate::metrics::metrics;

/// Prefix of watermark messages.
pub const WATERMARK_PREFIX: &str = crate::wire::message::WATERMARK;
/// Prefix of signal messages (`pgcdc snapshot --table`).
pub const SIGNAL_PREFIX: &str = crate::wire::message::SIGNAL;

/// What became of a chunk.
#[derive(Debug, PartialEq, Eq)]
pub enum ChunkOutcome {
    /// Its rows are in the stream's output.
    Emitted,
    /// The stream did not see its low mark: read it again.
    Retry,
    /// The read did not see this transaction, which committed before the
    /// low mark: read it again once it is visible.
    NotYetVisible(u32),
}

/// How many committed transactions the stream remembers (xid and commit
/// LSN) to check that a chunk's read saw all that committed before its low mark.
pub const REMEMBERED_COMMITS: usize = 1 << 16;

/// A chunk's read: its rows, the table's progress once they are emitted,
/// and the transactions in progress in the read's snapshot.
pub struct ChunkRead {
    /// The rows, as reads (and deletes, for a repair's missing keys).
    pub rows: Vec<ChangeEvent>,
    /// The table's progress once they are emitted (`None`: a repair).
    pub progress: Option<TableProgress>,
    /// Transactions the read's snapshot did not see (`txid_current_snapshot`'s xip).
    pub unseen: Vec<u32>,
}

struct PendingChunk {
    table: (String, String),
    read: Option<ChunkRead>,
    outcome: oneshot::Sender<ChunkOutcome>,
}

#[derive(Default)]
struct Registry {
    epoch: u64,
    next_id: u64,
    chunks: HashMap<u64, PendingChunk>,
}

/// Chunks between their marks, shared by the snapshot actor and the stream,
/// and the key that signs and checks their marks.
#[derive(Clone)]
pub struct Watermarks {
    inner: Arc<Mutex<Registry>>,
    key: Arc<MessageKey>,
}

impl Watermarks {
    /// An empty registry whose marks are signed with `key`.
    pub fn new(key: MessageKey) -> Self {
        // Ids must not repeat those of earlier runs still in the WAL.
        let base = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        Self {
            inner: Arc::new(Mutex::new(Registry {
                next_id: base,
                ..Registry::default()
            })),
            key: Arc::new(key),
        }
    }

    /// The key genuine marks and signals are signed with.
    pub fn key(&self) -> &MessageKey {
        &self.key
    }

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
                read: None,
                outcome: tx,
            },
        );
        Some((id, rx))
    }

    /// The chunk was read.
    pub fn fill(&self, id: u64, read: ChunkRead) {
        if let Some(c) = self.lock().chunks.get_mut(&id) {
            c.read = Some(read);
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
    /// The commit LSN of the low mark's transaction.
    low: Lsn,
}

/// The transactions the stream saw commit last, oldest first.
#[derive(Default)]
struct Commits {
    order: VecDeque<u32>,
    at: HashMap<u32, Lsn>,
    /// The commit LSN of the transaction being read.
    current: Lsn,
}

impl Commits {
    fn begin(&mut self, xid: u32, commit: Lsn) {
        self.current = commit;
        if self.at.insert(xid, commit).is_none() {
            self.order.push_back(xid);
        }
        if self.order.len() > REMEMBERED_COMMITS {
            if let Some(old) = self.order.pop_front() {
                self.at.remove(&old);
            }
        }
    }

    /// A transaction of `unseen` that committed before `low`.
    fn before(&self, unseen: &[u32], low: Lsn) -> Option<u32> {
        unseen
            .iter()
            .copied()
            .find(|x| self.at.get(x).is_some_and(|at| *at < low))
    }
}

/// What the stream must do for a logical message.
#[derive(Debug)]
pub enum MessageAction {
    /// Not ours, or nothing to do.
    Ignore,
    /// Put these rows into the current transaction; checkpoint the
    /// progress (if any) with it.
    Emit(Vec<ChangeEvent>, Option<TableProgress>),
    /// A genuine freshness canary written at this time (µs since the epoch).
    Canary(i64),
    /// Copy these keys of the table again (`pgcdc verify --repair`).
    Repair {
        /// The table.
        table: Arc<TableRef>,
        /// Key texts, in key order.
        keys: Vec<crate::checkpoint::KeyText>,
    },
    /// Start copying this table again (progress reset).
    Backfill(TableProgress),
    /// The table was re-created: put this truncate into the current
    /// transaction, then copy the table again if it has a unique key.
    Reset(ChangeEvent, Option<TableProgress>),
}

/// A truncate of `table` at `lsn`; the stream places it in its transaction.
fn truncate_event(table: Arc<TableRef>, lsn: Lsn) -> ChangeEvent {
    ChangeEvent {
        op: Op::Truncate,
        table,
        key: None,
        before: None,
        after: None,
        unchanged_toast: Vec::new(),
        lsn,
        seq: 0,
        tx: TxMeta::default(),
        snapshot: false,
    }
}

/// The stream side: open windows between low and high marks.
pub struct Windows {
    slot: String,
    marks: Watermarks,
    open: HashMap<u64, Window>,
    /// The configured tables. Only those with a unique key may be copied
    /// again (a keyless copy would be checkpointed as a copy that can never
    /// finish).
    tables: HashMap<(String, String), Arc<TableRef>>,
    commits: Commits,
    /// Partitioned tables whose partitions' changes were seen under the
    /// partitions' names in this session (copied again once).
    roots_reset: HashSet<(String, String)>,
}

fn key_text(e: &ChangeEvent) -> String {
    e.key
        .as_ref()
        .map(|k| {
            let mut text = Vec::new();
            k.write_json(&mut text);
            String::from_utf8_lossy(&text).into_owned()
        })
        .unwrap_or_default()
}

impl Windows {
    /// Windows for the stream of `slot`, whose configured tables are `tables`.
    pub fn new(slot: &str, marks: Watermarks, tables: &[Arc<TableRef>]) -> Self {
        let tables = tables
            .iter()
            .map(|t| ((t.schema.clone(), t.name.clone()), t.clone()))
            .collect();
        Self {
            slot: slot.to_owned(),
            marks,
            open: HashMap::new(),
            tables,
            commits: Commits::default(),
            roots_reset: HashSet::new(),
        }
    }

    /// Whether `table` is configured and not yet copied again in this
    /// session because its partitions' changes came under their own names.
    pub fn first_root_reset(&mut self, table: &(String, String)) -> bool {
        self.tables.contains_key(table) && self.roots_reset.insert(table.clone())
    }

    /// A transaction that committed at `commit` is being read.
    pub fn began(&mut self, xid: u32, commit: Lsn) {
        self.commits.begin(xid, commit);
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

    /// Handle a logical decoding message at `lsn`.
    pub fn on_message(&mut self, prefix: &str, content: &[u8], lsn: Lsn) -> MessageAction {
        match prefix {
            WATERMARK_PREFIX => {
                let Some(mark) = self.ours::<Mark>(content, "watermark", Mark::genuine) else {
                    return MessageAction::Ignore;
                };
                if mark.high {
                    self.high(mark.id)
                } else {
                    self.low(mark.id);
                    MessageAction::Ignore
                }
            }
            crate::canary::CANARY_PREFIX => {
                match self.ours::<crate::canary::Canary>(content, "canary", |c, k| c.genuine(k)) {
                    Some(c) => MessageAction::Canary(c.t_us),
                    None => MessageAction::Ignore,
                }
            }
            SIGNAL_PREFIX => match self.ours::<Signal>(content, "signal", Signal::genuine) {
                Some(s) => self.signal(s, lsn),
                None => MessageAction::Ignore,
            },
            _ => MessageAction::Ignore,
        }
    }

    /// The message, if it is for this slot and genuine; a malformed or
    /// unsigned message addressed here is ignored with a warning.
    fn ours<M: serde::de::DeserializeOwned + Addressed>(
        &self,
        content: &[u8],
        what: &'static str,
        genuine: fn(&M, &MessageKey) -> bool,
    ) -> Option<M> {
        let message = match serde_json::from_slice::<M>(content) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(kind = what, error = %e, "ignoring a malformed message");
                return None;
            }
        };
        if message.slot() != self.slot {
            return None;
        }
        if !genuine(&message, self.marks.key()) {
            metrics().forged_messages.inc();
            tracing::warn!(kind = what, slot = %self.slot, "ignoring a message whose signature does not match this installation's key (written by another role or an older pgcdc)");
            return None;
        }
        Some(message)
    }

    /// A genuine request for this slot: copy the table again, after a
    /// truncate if it was re-created. Only configured tables are touched, and
    /// only those with a unique key are copied; nothing else is persisted.
    fn signal(&mut self, s: Signal, lsn: Lsn) -> MessageAction {
        let name = format!("{}.{}", s.schema, s.table);
        let Some(table) = self
            .tables
            .get(&(s.schema.clone(), s.table.clone()))
            .cloned()
        else {
            tracing::warn!(table = %name, "ignoring a signal for a table that is not configured");
            return MessageAction::Ignore;
        };
        let copy = (table.key_source != KeySource::WholeRow)
            .then(|| TableProgress::fresh(&s.schema, &s.table));
        if let (Some(keys), false) = (s.keys, s.reset) {
            if copy.is_none() {
                tracing::warn!(table = %name, "ignoring a repair signal for a table without a unique key");
                return MessageAction::Ignore;
            }
            tracing::info!(table = %name, keys = keys.len(), "repair requested");
            return MessageAction::Repair { table, keys };
        }
        if !s.reset {
            if copy.is_none() {
                tracing::warn!(table = %name, "ignoring a backfill signal for a table without a unique key");
            } else {
                tracing::info!(table = %name, "backfill requested");
            }
            return copy.map_or(MessageAction::Ignore, MessageAction::Backfill);
        }
        match &copy {
            Some(_) => {
                tracing::warn!(table = %name, lsn = %lsn, "table re-created: emitting a truncate and copying its rows again")
            }
            None => {
                tracing::error!(table = %name, lsn = %lsn, "table re-created: emitting a truncate; it has no unique key, so rows written to the new table before this position are not copied (run pgcdc snapshot after giving it a key)")
            }
        }
        let truncate = truncate_event(table, lsn);
        self.observe(std::slice::from_ref(&truncate));
        MessageAction::Reset(truncate, copy)
    }

    fn low(&mut self, id: u64) {
        if let Some((schema, name)) = self.marks.table_of(id) {
            let window = Window {
                schema,
                name,
                keys: HashSet::new(),
                truncated: false,
                low: self.commits.current,
            };
            self.open.insert(id, window);
        }
    }

    fn high(&mut self, id: u64) -> MessageAction {
        let window = self.open.remove(&id);
        let Some(chunk) = self.marks.take(id) else {
            return MessageAction::Ignore;
        };
        let (
            Some(window),
            Some(ChunkRead {
                rows,
                progress,
                unseen,
            }),
        ) = (window, chunk.read)
        else {
            let _ = chunk.outcome.send(ChunkOutcome::Retry);
            return MessageAction::Ignore;
        };
        if let Some(xid) = self.commits.before(&unseen, window.low) {
            let _ = chunk.outcome.send(ChunkOutcome::NotYetVisible(xid));
            return MessageAction::Ignore;
        }
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
    use crate::event::{Row, TxMeta};
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
                key.clone().map(Row::from)
            },
            before: None,
            after: key.map(Row::from),
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

    fn marks() -> Watermarks {
        Watermarks::new(MessageKey::random().unwrap())
    }

    fn mark(marks: &Watermarks, id: u64, high: bool) -> Vec<u8> {
        serde_json::to_vec(&Mark::signed(marks.key(), "s", id, high)).unwrap()
    }

    fn chunk(marks: &Watermarks, ids: &[i64]) -> (u64, oneshot::Receiver<ChunkOutcome>) {
        chunk_unseen(marks, ids, Vec::new())
    }

    fn chunk_unseen(
        marks: &Watermarks,
        ids: &[i64],
        unseen: Vec<u32>,
    ) -> (u64, oneshot::Receiver<ChunkOutcome>) {
        let epoch = marks.new_epoch();
        let (id, rx) = marks.register(epoch, "public", "t").unwrap();
        let rows = ids.iter().map(|i| event(Op::Read, *i)).collect();
        let progress = Some(TableProgress::fresh("public", "t"));
        marks.fill(
            id,
            ChunkRead {
                rows,
                progress,
                unseen,
            },
        );
        (id, rx)
    }

    #[test]
    fn rows_changed_between_the_marks_are_dropped() {
        let marks = marks();
        let mut w = Windows::new("s", marks.clone(), &[]);
        let (id, mut rx) = chunk(&marks, &[1, 2, 3]);
        assert!(matches!(
            w.on_message(WATERMARK_PREFIX, &mark(&marks, id, false), Lsn(1)),
            MessageAction::Ignore
        ));
        w.observe(&[event(Op::Update, 2)]);
        let MessageAction::Emit(rows, _) =
            w.on_message(WATERMARK_PREFIX, &mark(&marks, id, true), Lsn(1))
        else {
            panic!("chunk not emitted");
        };
        let ids: Vec<_> = rows
            .iter()
            .map(|e| e.key.as_ref().unwrap().get("id").unwrap())
            .collect();
        assert_eq!(ids, vec![json!(1), json!(3)]);
        assert_eq!(rx.try_recv().unwrap(), ChunkOutcome::Emitted);
    }

    #[test]
    fn a_read_that_missed_a_commit_before_the_low_mark_is_read_again() {
        let marks = marks();
        let mut w = Windows::new("s", marks.clone(), &[]);
        // 700 committed before the low mark, 701 between the marks, 702 later.
        let (id, mut rx) = chunk_unseen(&marks, &[1, 2], vec![700, 701, 702]);
        w.began(700, Lsn(10));
        w.began(9, Lsn(20));
        w.on_message(WATERMARK_PREFIX, &mark(&marks, id, false), Lsn(19));
        w.began(701, Lsn(30));
        w.began(10, Lsn(40));
        let action = w.on_message(WATERMARK_PREFIX, &mark(&marks, id, true), Lsn(39));
        assert!(matches!(action, MessageAction::Ignore), "{action:?}");
        assert_eq!(rx.try_recv().unwrap(), ChunkOutcome::NotYetVisible(700));

        // Unseen transactions that commit between the marks or later: emitted.
        let (id, mut rx) = chunk_unseen(&marks, &[1, 2], vec![702, 703]);
        w.began(11, Lsn(50));
        w.on_message(WATERMARK_PREFIX, &mark(&marks, id, false), Lsn(49));
        w.began(702, Lsn(60));
        let action = w.on_message(WATERMARK_PREFIX, &mark(&marks, id, true), Lsn(59));
        assert!(
            matches!(action, MessageAction::Emit(ref rows, _) if rows.len() == 2),
            "{action:?}"
        );
        assert_eq!(rx.try_recv().unwrap(), ChunkOutcome::Emitted);
    }

    #[test]
    fn remembered_commits_are_bounded() {
        let mut c = Commits::default();
        for x in 0..(REMEMBERED_COMMITS as u32 + 10) {
            c.begin(x, Lsn(u64::from(x) + 1));
        }
        assert_eq!(
            (c.order.len(), c.at.len()),
            (REMEMBERED_COMMITS, REMEMBERED_COMMITS)
        );
        assert_eq!(c.before(&[3], Lsn(u64::MAX)), None, "forgotten");
        assert_eq!(c.before(&[20, 30], Lsn(u64::MAX)), Some(20));
    }

    #[test]
    fn truncate_between_the_marks_drops_the_chunk() {
        let marks = marks();
        let mut w = Windows::new("s", marks.clone(), &[]);
        let (id, _rx) = chunk(&marks, &[1, 2]);
        w.on_message(WATERMARK_PREFIX, &mark(&marks, id, false), Lsn(1));
        w.observe(&[event(Op::Truncate, 0)]);
        let MessageAction::Emit(rows, _) =
            w.on_message(WATERMARK_PREFIX, &mark(&marks, id, true), Lsn(1))
        else {
            panic!("chunk not emitted");
        };
        assert!(rows.is_empty());
    }

    #[test]
    fn a_high_mark_without_its_low_mark_asks_for_a_retry() {
        let marks = marks();
        let mut w = Windows::new("s", marks.clone(), &[]);
        let (id, mut rx) = chunk(&marks, &[1]);
        assert!(matches!(
            w.on_message(WATERMARK_PREFIX, &mark(&marks, id, true), Lsn(1)),
            MessageAction::Ignore
        ));
        assert_eq!(rx.try_recv().unwrap(), ChunkOutcome::Retry);
    }

    #[test]
    fn other_slots_and_stale_sessions_are_ignored() {
        let marks = marks();
        let mut w = Windows::new("other", marks.clone(), &[]);
        let (id, _rx) = chunk(&marks, &[1]);
        w.on_message(WATERMARK_PREFIX, &mark(&marks, id, false), Lsn(1));
        assert!(matches!(
            w.on_message(WATERMARK_PREFIX, &mark(&marks, id, true), Lsn(1)),
            MessageAction::Ignore
        ));
        let epoch = marks.new_epoch();
        assert!(marks.register(epoch - 1, "public", "t").is_none());
        assert!(matches!(
            w.on_message(WATERMARK_PREFIX, b"not json", Lsn(1)),
            MessageAction::Ignore
        ));
    }

    fn tables() -> [Arc<TableRef>; 2] {
        let table = |name: &str, key_source| {
            Arc::new(TableRef {
                schema: "public".into(),
                name: name.into(),
                key_columns: vec!["id".into()],
                key_source,
                column_types: String::new(),
            })
        };
        [
            table("keyed", KeySource::IdentityIndex),
            table("keyless", KeySource::WholeRow),
        ]
    }

    fn signal(marks: &Watermarks, table: &str, reset: bool) -> Vec<u8> {
        let s = Signal::signed(marks.key(), "s", "public", table, reset);
        serde_json::to_vec(&s).unwrap()
    }

    #[test]
    fn signals_for_unconfigured_or_keyless_tables_are_ignored() {
        let marks = marks();
        let mut w = Windows::new("s", marks.clone(), &tables());
        for t in ["keyless", "unknown"] {
            let action = w.on_message(SIGNAL_PREFIX, &signal(&marks, t, false), Lsn(1));
            assert!(matches!(action, MessageAction::Ignore), "{t}: {action:?}");
        }
        let action = w.on_message(SIGNAL_PREFIX, &signal(&marks, "keyed", false), Lsn(1));
        assert!(
            matches!(&action, MessageAction::Backfill(p) if p.name == "keyed"),
            "{action:?}"
        );
    }

    #[test]
    fn repair_signals_carry_signed_keys_and_canaries_their_time() {
        let marks = marks();
        let mut w = Windows::new("s", marks.clone(), &tables());
        let keys = vec![vec!["5".to_owned()], vec!["100000".to_owned()]];
        let repair = Signal::repair(marks.key(), "s", ("public", "keyed"), keys.clone());
        let content = serde_json::to_vec(&repair).unwrap();
        let action = w.on_message(SIGNAL_PREFIX, &content, Lsn(1));
        assert!(
            matches!(&action, MessageAction::Repair { table, keys: k } if table.name == "keyed" && *k == keys),
            "{action:?}"
        );
        let mut tampered = repair;
        tampered.keys = Some(vec![vec!["6".to_owned()]]);
        let content = serde_json::to_vec(&tampered).unwrap();
        let action = w.on_message(SIGNAL_PREFIX, &content, Lsn(2));
        assert!(matches!(action, MessageAction::Ignore), "{action:?}");
        let canary = crate::canary::Canary::now(marks.key(), "s");
        let t = canary.t_us;
        let content = serde_json::to_vec(&canary).unwrap();
        let action = w.on_message(crate::canary::CANARY_PREFIX, &content, Lsn(3));
        assert!(
            matches!(action, MessageAction::Canary(at) if at == t),
            "{action:?}"
        );
    }

    #[test]
    fn forged_or_tampered_signals_and_marks_change_nothing() {
        let marks = marks();
        let mut w = Windows::new("s", marks.clone(), &tables());
        let forger = Watermarks::new(MessageKey::random().unwrap());
        let unsigned = br#"{"slot":"s","schema":"public","table":"keyed"}"#;
        let mut tampered: Signal = serde_json::from_slice(&signal(&marks, "keyed", false)).unwrap();
        tampered.reset = true;
        let tampered = serde_json::to_vec(&tampered).unwrap();
        for content in [&unsigned[..], &signal(&forger, "keyed", true), &tampered] {
            let action = w.on_message(SIGNAL_PREFIX, content, Lsn(1));
            assert!(matches!(action, MessageAction::Ignore), "{action:?}");
        }
        let (id, mut rx) = chunk(&marks, &[1]);
        w.on_message(WATERMARK_PREFIX, &mark(&marks, id, false), Lsn(1));
        let forged_high = serde_json::to_vec(&Mark::signed(forger.key(), "s", id, true)).unwrap();
        let action = w.on_message(WATERMARK_PREFIX, &forged_high, Lsn(2));
        assert!(matches!(action, MessageAction::Ignore), "{action:?}");
        assert!(
            rx.try_recv().is_err(),
            "a forged high mark settled the chunk"
        );
        let action = w.on_message(WATERMARK_PREFIX, &mark(&marks, id, true), Lsn(3));
        assert!(matches!(action, MessageAction::Emit(..)), "{action:?}");
    }

    #[test]
    fn a_reset_signal_truncates_and_copies_keyed_tables_and_only_truncates_keyless_ones() {
        let marks = marks();
        let mut w = Windows::new("s", marks.clone(), &tables());
        let action = w.on_message(SIGNAL_PREFIX, &signal(&marks, "keyed", true), Lsn(7));
        let MessageAction::Reset(truncate, Some(copy)) = action else {
            panic!("{action:?}");
        };
        assert_eq!(
            (truncate.op, truncate.table.name.as_str()),
            (Op::Truncate, "keyed")
        );
        assert_eq!(copy, TableProgress::fresh("public", "keyed"));
        let action = w.on_message(SIGNAL_PREFIX, &signal(&marks, "keyless", true), Lsn(8));
        assert!(
            matches!(action, MessageAction::Reset(_, None)),
            "{action:?}"
        );
    }
}
