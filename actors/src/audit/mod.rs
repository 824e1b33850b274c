//! LogActor: the audit log in `<state_dir>/audit.db` (SQLite, WAL journal,
//! `synchronous=FULL`).
//!
//! ```text
//! any thread ──tracing event──▶ AuditLayer ──try_send──▶ bounded queue ──▶ LogActor ──▶ audit.db
//!                                   │ queue full: count, drop              (own thread, batches)
//! ```
//!
//! Events at or above `audit.level` become rows of `logs` (time, level,
//! target, message, the other fields as JSON, and the `actor` and `lsn` fields
//! as columns); events with the target [`DEAD_LETTER_TARGET`] become rows of
//! `dead_letters`. Times are RFC 3339 text in UTC with milliseconds.
//!
//! Logging never waits for the database: the layer hands records over with
//! `try_send`. When the queue is full, or a batch cannot be written (the file
//! is locked by another connection past the busy timeout, the disk fails),
//! those records are dropped from the audit log only (the console still has
//! them), counted in [`dropped_total`], and the writer warns about it on the
//! console at most once per ten seconds.
//!
//! The writer runs on its own thread with its own current-thread tokio
//! runtime, apart from the actix system: it exists before and after the
//! pipeline, and a slow disk there cannot stall the pipeline's runtime. It
//! writes up to 500 records per transaction, or what arrived within 200 ms,
//! and applies retention (`retention_days`, `max_rows`) at start and every ten
//! minutes.

mod config;
mod record;
pub mod store;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use sqlx::sqlite::SqliteConnection;
use sqlx::Connection;
use tokio::sync::mpsc;

pub use config::{parse_level, AuditConfig};
pub use record::{asked_per_event, now_ms, rfc3339_ms, AuditLayer, DeadLetter, Entry, LogRecord};

use crate::error::{ErrorClass, ExitCode};

/// Target of the event the ES sink emits for each dead letter (fields `table`,
/// `key`, `lsn`, `reason`, `payload`); it goes to `dead_letters`, not the console.
pub const DEAD_LETTER_TARGET: &str = "pgcdc::dead_letter";
/// Target of the audit log's own warnings: console only, never queued.
const SELF_TARGET: &str = "pgcdc::audit";
/// The audit database's file name in `state_dir`.
pub const FILE_NAME: &str = "audit.db";

/// Records waiting for the writer; beyond this they are dropped.
const QUEUE_CAPACITY: usize = 10_000;
/// Most records per transaction.
const BATCH_MAX: usize = 500;
/// Longest wait for a batch to fill.
const BATCH_WAIT: Duration = Duration::from_millis(200);
/// How often retention runs (and once at start).
const RETENTION_EVERY: Duration = Duration::from_secs(10 * 60);
/// Least time between two warnings about dropped records.
const DROP_WARN_EVERY: Duration = Duration::from_secs(10);
/// How often an idle writer looks at the drop counter.
const TICK: Duration = Duration::from_secs(1);
/// Longest wait for the database to open at start.
const OPEN_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest wait of [`flush_before_exit`].
const EXIT_FLUSH: Duration = Duration::from_secs(2);

/// Records dropped from the audit log by every writer of this process.
static DROPPED: AtomicU64 = AtomicU64::new(0);
/// The writer [`flush_before_exit`] flushes.
static EXIT_HANDLE: OnceLock<AuditHandle> = OnceLock::new();

/// Records dropped from the audit log since the process started (queue full,
/// database locked or failing); for the metrics endpoint.
pub fn dropped_total() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// Flush the audit log (waiting at most two seconds) before the process ends
/// without running destructors (a panic hook or an abort path).
pub fn flush_before_exit() {
    if let Some(handle) = EXIT_HANDLE.get() {
        handle.flush(EXIT_FLUSH);
    }
}

/// Count `n` dropped records in the process total, as a writer would.
#[cfg(test)]
pub(crate) fn count_drops(n: u64) {
    Drops::default().add(n);
}

/// A drop counter of one writer that also adds to the process total.
#[derive(Debug, Clone, Default)]
struct Drops(Arc<AtomicU64>);

impl Drops {
    fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
        DROPPED.fetch_add(n, Ordering::Relaxed);
    }

    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Why the audit log could not start.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The database could not be opened or its schema created.
    #[error("audit log {}: {source}", path.display())]
    Open {
        /// The database file.
        path: PathBuf,
        /// What SQLite said.
        #[source]
        source: sqlx::Error,
    },
    /// Opening did not finish in time (another process holds a lock).
    #[error("audit log {}: not opened within {}s", path.display(), OPEN_TIMEOUT.as_secs())]
    OpenTimeout {
        /// The database file.
        path: PathBuf,
    },
    /// The writer thread or its runtime could not be created.
    #[error("audit log: cannot start the writer: {0}")]
    Thread(#[source] std::io::Error),
}

impl AuditError {
    /// The one classification point: an audit log that cannot start is local state.
    pub fn class(&self) -> ErrorClass {
        ErrorClass::Fatal(ExitCode::LocalIo)
    }
}

/// Requests from an [`AuditHandle`] to the writer; each is answered on its channel.
enum Control {
    /// Write everything queued.
    Flush(std::sync::mpsc::Sender<()>),
    /// Write everything queued, close the database and stop.
    Stop(std::sync::mpsc::Sender<()>),
}

/// Flushes and stops a running LogActor.
#[derive(Debug, Clone)]
pub struct AuditHandle {
    control: mpsc::UnboundedSender<Control>,
    drops: Drops,
}

impl AuditHandle {
    /// Write everything queued so far, waiting at most `timeout`; `true` if done in time.
    pub fn flush(&self, timeout: Duration) -> bool {
        self.request(Control::Flush, timeout)
    }

    /// Flush, close the database and stop the writer, waiting at most
    /// `timeout`; `true` if done in time. Later events count as dropped.
    pub fn shutdown(&self, timeout: Duration) -> bool {
        self.request(Control::Stop, timeout)
    }

    fn request(&self, make: fn(std::sync::mpsc::Sender<()>) -> Control, timeout: Duration) -> bool {
        let (ack, done) = std::sync::mpsc::channel();
        self.control.send(make(ack)).is_ok() && done.recv_timeout(timeout).is_ok()
    }

    /// Records this writer dropped.
    pub fn dropped(&self) -> u64 {
        self.drops.get()
    }

    /// Make [`flush_before_exit`] flush this writer (the first call wins).
    pub fn flush_on_exit(&self) {
        let _ = EXIT_HANDLE.set(self.clone());
    }
}

/// The audit log writer: owns the database connection and the queue's receiving end.
pub struct LogActor {
    conn: SqliteConnection,
    rx: mpsc::Receiver<Entry>,
    control: mpsc::UnboundedReceiver<Control>,
    config: AuditConfig,
    drops: Drops,
    reporter: DropReporter,
    last_error: Option<String>,
}

impl LogActor {
    /// Open (or create) the database at `path` and start the writer on its own
    /// thread; install the returned layer in the subscriber.
    pub fn start(
        path: &Path,
        config: &AuditConfig,
    ) -> Result<(AuditLayer, AuditHandle), AuditError> {
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        let (control_tx, control) = mpsc::unbounded_channel();
        let drops = Drops::default();
        let (opened_tx, opened) = std::sync::mpsc::channel();
        let (db, cfg, d) = (path.to_owned(), config.clone(), drops.clone());
        std::thread::Builder::new()
            .name("pgcdc-audit".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = opened_tx.send(Err(AuditError::Thread(e)));
                        return;
                    }
                };
                rt.block_on(async move {
                    let conn = match store::open_writer(&db).await {
                        Ok(conn) => conn,
                        Err(source) => {
                            let _ = opened_tx.send(Err(AuditError::Open { path: db, source }));
                            return;
                        }
                    };
                    let _ = opened_tx.send(Ok(()));
                    let actor = LogActor {
                        conn,
                        rx,
                        control,
                        config: cfg,
                        drops: d,
                        reporter: DropReporter::default(),
                        last_error: None,
                    };
                    actor.run().await;
                });
            })
            .map_err(AuditError::Thread)?;
        match opened.recv_timeout(OPEN_TIMEOUT) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(AuditError::OpenTimeout {
                    path: path.to_owned(),
                })
            }
        }
        let mut layer = AuditLayer::new(tx, drops.clone(), config.min_level());
        if !config.dead_letter_payloads {
            layer = layer.without_payloads();
        }
        let handle = AuditHandle {
            control: control_tx,
            drops,
        };
        Ok((layer, handle))
    }

    /// Write batches until stopped, or until every layer and every handle is gone.
    async fn run(mut self) {
        self.apply_retention().await;
        let mut next_retention = Instant::now() + RETENTION_EVERY;
        let (mut control_open, mut queue_open) = (true, true);
        let stopped = loop {
            if !control_open && !queue_open {
                break None;
            }
            tokio::select! {
                biased;
                cmd = self.control.recv(), if control_open => match cmd {
                    Some(Control::Flush(ack)) => {
                        self.drain().await;
                        let _ = ack.send(());
                    }
                    Some(Control::Stop(ack)) => {
                        // Refuse new records first (they count as dropped), then write the rest.
                        self.rx.close();
                        self.drain().await;
                        break Some(ack);
                    }
                    None => control_open = false,
                },
                // Every layer gone: keep answering the handle until it stops us or goes too.
                entry = self.rx.recv(), if queue_open => match entry {
                    Some(first) => self.collect_and_write(first).await,
                    None => queue_open = false,
                },
                () = tokio::time::sleep(TICK) => {}
            }
            self.warn_drops();
            if Instant::now() >= next_retention {
                self.apply_retention().await;
                next_retention = Instant::now() + RETENTION_EVERY;
            }
        };
        self.warn_drops();
        if let Err(e) = self.conn.close().await {
            tracing::warn!(target: SELF_TARGET, error = %e, "closing the audit log failed");
        }
        if let Some(ack) = stopped {
            let _ = ack.send(());
        }
    }

    /// Gather a batch after `first` (up to `BATCH_MAX` records or `BATCH_WAIT`) and write it.
    async fn collect_and_write(&mut self, first: Entry) {
        let deadline = tokio::time::Instant::now() + BATCH_WAIT;
        let mut batch = vec![first];
        while batch.len() < BATCH_MAX {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(entry)) => batch.push(entry),
                _ => break,
            }
        }
        self.write(&batch).await;
    }

    /// Write everything queued now, in batches.
    async fn drain(&mut self) {
        let mut left = self.rx.len();
        while left > 0 {
            let mut batch = Vec::with_capacity(left.min(BATCH_MAX));
            while batch.len() < BATCH_MAX {
                match self.rx.try_recv() {
                    Ok(entry) => batch.push(entry),
                    Err(_) => break,
                }
            }
            if batch.is_empty() {
                break;
            }
            left = left.saturating_sub(batch.len());
            self.write(&batch).await;
        }
    }

    /// One transaction; on failure the batch is dropped and counted.
    async fn write(&mut self, batch: &[Entry]) {
        if let Err(e) = store::insert_batch(&mut self.conn, batch).await {
            self.drops.add(batch.len() as u64);
            self.last_error = Some(e.to_string());
        }
    }

    /// Warn on the console (never into the queue) when records were dropped, rate-limited.
    fn warn_drops(&mut self) {
        let total = self.drops.get();
        if let Some(dropped) = self.reporter.due(total, Instant::now()) {
            let error = self.last_error.take();
            tracing::warn!(
                target: SELF_TARGET,
                dropped,
                dropped_total = total,
                error = error.as_deref(),
                "audit log cannot keep up or cannot write; records dropped from the audit log only"
            );
        }
    }

    async fn apply_retention(&mut self) {
        let days = i64::from(self.config.retention_days);
        let before = now_ms().saturating_sub(days.saturating_mul(86_400_000));
        match store::apply_retention(&mut self.conn, before, self.config.max_rows).await {
            Ok(0) => {}
            Ok(deleted) => tracing::debug!(target: SELF_TARGET, deleted, "audit log retention"),
            Err(e) => tracing::warn!(
                target: SELF_TARGET,
                error = %e,
                "audit log retention failed; it runs again later"
            ),
        }
    }
}

/// When to warn about drops: at the first, then at most once per `DROP_WARN_EVERY`.
#[derive(Debug, Default)]
struct DropReporter {
    reported: u64,
    last: Option<Instant>,
}

impl DropReporter {
    /// Drops not yet reported, if there are any and a warning is due at `now`.
    fn due(&mut self, total: u64, now: Instant) -> Option<u64> {
        if total <= self.reported
            || self
                .last
                .is_some_and(|t| now.duration_since(t) < DROP_WARN_EVERY)
        {
            return None;
        }
        let new = total - self.reported;
        self.reported = total;
        self.last = Some(now);
        Some(new)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};
    use tracing::Level;
    use tracing_subscriber::layer::SubscriberExt;

    use super::store::LogQuery;
    use super::*;
    use crate::lsn::Lsn;

    fn all_levels(limit: u32) -> LogQuery {
        LogQuery {
            min_level: Level::TRACE,
            since_ms: None,
            limit,
        }
    }

    #[tokio::test]
    async fn warnings_and_errors_are_read_back_with_their_fields() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let config = AuditConfig {
            level: "warn".into(),
            dead_letter_payloads: true,
            ..Default::default()
        };
        let (layer, handle) = LogActor::start(&path, &config).unwrap();
        let subscriber = tracing_subscriber::registry().with(layer.filtered());
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("below the level");
            tracing::warn!(
                actor = "kafka_producer",
                lsn = %Lsn(0x1_0000_0010),
                attempt = 2u32,
                "delivery failed"
            );
            tracing::error!(target: "pgcdc::test", lsn = 16u64, error = %"boom", "fatal: stop");
            tracing::warn!(
                target: "pgcdc::dead_letter",
                table = "public.users",
                key = r#"{"id":1}"#,
                lsn = "0/10",
                reason = "mapper_parsing_exception",
                payload = r#"{"after":{"id":1}}"#,
                "record dead-lettered"
            );
        });
        assert!(handle.flush(Duration::from_secs(10)));

        let mut conn = store::open_reader(&path).await.unwrap();
        let rows = store::read_logs(&mut conn, &all_levels(10)).await.unwrap();
        assert_eq!(rows.len(), 2, "{rows:?}");
        let w = &rows[0];
        assert_eq!(
            (w.level.as_str(), w.target.as_str(), w.message.as_str()),
            ("WARN", module_path!(), "delivery failed")
        );
        assert_eq!(w.actor.as_deref(), Some("kafka_producer"));
        assert_eq!(w.lsn.as_deref(), Some("1/10"));
        let fields: Value = serde_json::from_str(&w.fields).unwrap();
        assert_eq!(
            fields,
            json!({"actor": "kafka_producer", "lsn": "1/10", "attempt": 2})
        );
        assert!(w.time.len() == 24 && w.time.ends_with('Z'), "{}", w.time);
        let e = &rows[1];
        assert_eq!(
            (e.level.as_str(), e.target.as_str(), e.message.as_str()),
            ("ERROR", "pgcdc::test", "fatal: stop")
        );
        assert_eq!((e.actor.as_deref(), e.lsn.as_deref()), (None, Some("0/10")));
        let fields: Value = serde_json::from_str(&e.fields).unwrap();
        assert_eq!(fields, json!({"lsn": 16, "error": "boom"}));

        let dead = store::read_dead_letters(&mut conn, None, 10).await.unwrap();
        assert_eq!(dead.len(), 1, "{dead:?}");
        let d = &dead[0];
        assert_eq!(d.table, "public.users");
        assert_eq!(d.key.as_deref(), Some(r#"{"id":1}"#));
        assert_eq!(d.lsn.as_deref(), Some("0/10"));
        assert_eq!(d.reason, "mapper_parsing_exception");
        assert_eq!(d.payload.as_deref(), Some(r#"{"after":{"id":1}}"#));
        assert!(handle.shutdown(Duration::from_secs(10)));
    }

    #[tokio::test]
    async fn by_default_dead_letters_keep_no_payload_and_the_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let (layer, handle) = LogActor::start(&path, &AuditConfig::default()).unwrap();
        let subscriber = tracing_subscriber::registry().with(layer.filtered());
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(
                target: "pgcdc::dead_letter",
                table = "public.users",
                reason = "bad",
                payload = r#"{"after":{"card":"4111"}}"#,
                "record dead-lettered"
            );
        });
        assert!(handle.flush(Duration::from_secs(10)));
        let mut conn = store::open_reader(&path).await.unwrap();
        let dead = store::read_dead_letters(&mut conn, None, 10).await.unwrap();
        assert_eq!((dead.len(), dead[0].payload.as_deref()), (1, None));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        assert!(handle.shutdown(Duration::from_secs(10)));
    }

    #[tokio::test]
    async fn a_locked_database_drops_records_without_blocking_and_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let (layer, handle) = LogActor::start(&path, &AuditConfig::default()).unwrap();
        let _guard =
            tracing::subscriber::set_default(tracing_subscriber::registry().with(layer.filtered()));
        // Another connection takes the write lock and keeps it.
        let mut locker = store::open_writer(&path).await.unwrap();
        sqlx::raw_sql(
            "BEGIN IMMEDIATE; INSERT INTO logs (time, level, target, message, fields) \
             VALUES ('', 'INFO', 'test', 'lock holder', '{}')",
        )
        .execute(&mut locker)
        .await
        .unwrap();

        let started = Instant::now();
        for i in 0..100_000u32 {
            tracing::warn!(i, "while locked");
        }
        let took = started.elapsed();
        assert!(took < Duration::from_secs(2), "logging waited: {took:?}");
        // Everything beyond the queue and the batch waiting for the lock was dropped.
        let floor = 100_000 - (QUEUE_CAPACITY + BATCH_MAX) as u64;
        assert!(handle.dropped() >= floor, "dropped {}", handle.dropped());
        assert!(dropped_total() >= handle.dropped());

        sqlx::raw_sql("ROLLBACK")
            .execute(&mut locker)
            .await
            .unwrap();
        // The queue is still full when the lock goes: log until a record gets through.
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut reader = store::open_reader(&path).await.unwrap();
        let errors = LogQuery {
            min_level: Level::ERROR,
            ..all_levels(10)
        };
        let mut markers = 0u64;
        loop {
            tracing::error!(actor = "test", "after the lock");
            markers += 1;
            handle.flush(Duration::from_secs(5));
            let rows = store::read_logs(&mut reader, &errors).await.unwrap();
            if rows.iter().any(|r| r.message == "after the lock") {
                break;
            }
            assert!(Instant::now() < deadline, "nothing written after the lock");
        }
        assert!(handle.shutdown(Duration::from_secs(10)));
        // Every event was either written or counted as dropped.
        let written = store::read_logs(&mut reader, &all_levels(200_000))
            .await
            .unwrap()
            .len() as u64;
        assert_eq!(written + handle.dropped(), 100_000 + markers);
    }

    #[tokio::test]
    async fn shutdown_writes_everything_queued_then_drops() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let (layer, handle) = LogActor::start(&path, &AuditConfig::default()).unwrap();
        let _guard =
            tracing::subscriber::set_default(tracing_subscriber::registry().with(layer.filtered()));
        for i in 0..2_000u32 {
            tracing::info!(i, "queued");
        }
        assert!(handle.shutdown(Duration::from_secs(30)));
        assert_eq!(handle.dropped(), 0);
        tracing::info!("after shutdown");
        assert_eq!(handle.dropped(), 1);
        let mut conn = store::open_reader(&path).await.unwrap();
        let rows = store::read_logs(&mut conn, &all_levels(5_000))
            .await
            .unwrap();
        assert_eq!(rows.len(), 2_000);
        let last: Value = serde_json::from_str(&rows[1_999].fields).unwrap();
        assert_eq!(last, json!({"i": 1_999}));
    }

    #[test]
    fn drop_warnings_come_at_most_every_ten_seconds() {
        let mut r = DropReporter::default();
        let t0 = Instant::now();
        assert_eq!(r.due(0, t0), None);
        assert_eq!(r.due(5, t0), Some(5));
        assert_eq!(r.due(9, t0 + Duration::from_secs(3)), None);
        assert_eq!(r.due(12, t0 + Duration::from_secs(10)), Some(7));
        assert_eq!(r.due(12, t0 + Duration::from_secs(30)), None);
    }

    #[test]
    fn an_unopenable_database_is_a_local_state_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing").join(FILE_NAME);
        let err = LogActor::start(&path, &AuditConfig::default())
            .err()
            .unwrap();
        assert!(matches!(err, AuditError::Open { .. }), "{err}");
        assert_eq!(err.class(), ErrorClass::Fatal(ExitCode::LocalIo));
        assert!(err.to_string().contains("audit.db"), "{err}");
    }
}
