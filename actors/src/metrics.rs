//! Process-wide metrics in the Prometheus text format, and the readiness rules.
//!
//! Every actor updates the one [`Metrics`] instance ([`metrics()`]); the HTTP
//! endpoint renders it. Gauges derived from several sources (lag) are computed
//! when rendered. Readiness ([`Metrics::readiness`]) depends on what the
//! process runs ([`Readiness`]): the pipeline is ready while replication makes
//! progress (and its ES sink, if it runs one, is not stalled); a standalone
//! sink while it writes or is caught up, and is not stalled.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::lsn::Lsn;

/// Every metric pgcdc exports.
pub struct Metrics {
    registry: Registry,
    /// The freshness canary's histograms and ages ([`crate::canary`]).
    pub freshness: crate::canary::Freshness,
    /// Changes decoded from the stream or copied by snapshots, per table and op.
    pub events_in: IntCounterVec,
    /// Changes acknowledged by Kafka, per table and op.
    pub events_out: IntCounterVec,
    /// Kafka delivery errors.
    pub kafka_errors: IntCounter,
    /// Times a broker refused one of pgcdc's running Kafka clients (failed
    /// SASL authentication or TLS handshake), per client.
    kafka_refusals: IntCounterVec,
    /// Running Kafka clients a broker refuses, with librdkafka's reason,
    /// until the brokers accept pgcdc again ([`Metrics::kafka_refused`]).
    kafka_refused: Mutex<std::collections::BTreeMap<&'static str, String>>,
    kafka_clients_refused: IntGauge,
    /// Elasticsearch bulk items, per outcome (done, superseded, retried, dead_lettered).
    pub es_items: IntCounterVec,
    /// Records parked on the dead-letter topic.
    pub dead_letters: IntCounter,
    /// Bulk requests or items the search server refused or answered unreadably, by reason.
    pub es_refusals: IntCounterVec,
    /// Mirror generations built for incompatible schema changes, by event
    /// (`started`, `swapped`, `abandoned`).
    pub es_reindexes: IntCounterVec,
    /// Mirrors found with their index deleted, by mirror.
    pub es_mirrors_deleted: IntCounterVec,
    /// Times Elasticsearch refused a mirror's (or history) index or
    /// mapping, by mirror or history index.
    pub es_mirrors_refused: IntCounterVec,
    /// Synced checkpoint writes (several acknowledged batches can share one).
    pub checkpoint_writes: IntCounter,
    /// Batches the stream handed to the producer.
    pub batches: IntCounter,
    /// Commit of a streamed batch's oldest transaction to Kafka acknowledging
    /// the whole batch ([`Metrics::acknowledged`]).
    kafka_ack: Histogram,
    /// Offsets the ES sink never received (see the sink's continuity check).
    pub es_skipped_offsets: IntCounter,
    /// Supervised restarts, per actor.
    pub restarts: IntCounterVec,
    /// Rows copied by snapshots and backfills, per table.
    pub snapshot_rows: IntCounterVec,
    /// Tables whose copy is not finished.
    pub snapshot_pending: IntGauge,
    /// WAL the slot keeps on the server (`pg_current_wal_lsn() - restart_lsn`).
    pub slot_retained_wal: IntGauge,
    /// Whether retained WAL is over `wal.budget_bytes` (0/1).
    pub wal_over_budget: IntGauge,
    /// Heartbeat messages written.
    pub heartbeats: IntCounter,
    /// Audit log records dropped (never data).
    pub audit_dropped: IntGauge,
    /// Messages with pgcdc's prefixes whose signature did not verify.
    pub forged_messages: IntCounter,
    /// Configured tables whose changes are not captured (dropped, or not
    /// published and not added back).
    pub tables_uncaptured: IntGauge,
    /// Operations the publication's `publish` option leaves out.
    pub unpublished_operations: IntGauge,
    /// PostgreSQL sessions blocking a pgcdc session that waits on a lock
    /// (a slot creation, a copy), as of the last look ([`crate::pg::waits`]).
    pub postgres_blocking: IntGauge,
    /// What keeps pgcdc waiting in PostgreSQL, while something does.
    waiting: Mutex<Option<String>>,
    /// Tables copied again (most truncated first) because the table, its
    /// partitions or what the publication sends of it changed, per table
    /// and cause.
    pub table_resets: IntCounterVec,
    /// Backfill and repair chunks read again because a transaction that
    /// committed before their low mark was not yet visible, per table.
    pub chunks_read_again: IntCounterVec,
    /// Partitions each change topic gained since pgcdc first wrote to it.
    pub kafka_partitions_added: IntGaugeVec,
    /// Records beyond the ES sink group's committed offset, per topic and partition.
    pub es_sink_lag: IntGaugeVec,
    /// Partitions assigned to this ES sink.
    pub es_sink_partitions: IntGauge,
    /// Times the ES sink left its group and joined again to end a stall.
    pub es_sink_rejoins: IntCounter,
    /// 1 while the ES sink reads its partitions directly, outside its group.
    pub es_sink_direct: IntGauge,
    /// Highest commit LSN the ES sink applied to the mirror, per table.
    pub es_applied_lsn: IntGaugeVec,
    /// Rows (and documents) the continuous verification compared, per
    /// table and result ([`crate::verify::continuous`]).
    pub verify_rows: IntCounterVec,
    /// Drifted rows (missing, extra, stale) the last continuous
    /// verification of a table found.
    pub verify_drift: IntGaugeVec,
    /// When the last continuous verification round ended (seconds since the epoch).
    pub verify_last_run: IntGauge,
    /// Drifted rows the continuous verification had copied again and saw
    /// repaired in the mirror, per table.
    pub verify_repaired: IntCounterVec,
    /// Tables whose mirror the continuous verification found drifted, and
    /// what it found, until repaired or found without drift.
    verify_drifted: Mutex<std::collections::BTreeMap<String, String>>,
    es_sink_stalled: IntGauge,
    es_mirrors_lacking: IntGauge,
    sink: Mutex<SinkHealth>,
    lag_bytes: IntGauge,
    lag_seconds: IntGauge,
    confirmed: IntGaugeVec,
    server_wal_end: AtomicU64,
    confirmed_lsn: AtomicU64,
    /// Commit time (µs since epoch) of the newest checkpointed transaction.
    confirmed_commit_us: AtomicI64,
    progress: Mutex<Progress>,
}

/// What the process's readiness is judged on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// `pgcdc run`: replication progress; with `sink`, also an ES sink that
    /// is not stalled and writes (or is caught up) once it ran a window.
    Pipeline {
        /// Whether the ES sink runs in this process.
        sink: bool,
    },
    /// `pgcdc es-sink`: the sink alone.
    Sink,
}

/// When the ES sink last showed life, and why it is stalled.
#[derive(Default)]
struct SinkHealth {
    /// The last batch written (bulk requests accepted) and committed.
    wrote_at: Option<SystemTime>,
    /// The last probe that found no record waiting.
    caught_up_at: Option<SystemTime>,
    /// When the sink first started in this process.
    started_at: Option<SystemTime>,
    /// Why Elasticsearch did not take the batch being sent, while the sink
    /// retries it.
    retrying: Option<String>,
    /// Why the sink is stalled, while it is.
    stalled: Option<String>,
    /// Indices known to lack changes (mirrors until their fill from
    /// PostgreSQL is swapped in, refused history indices), and why.
    lacking: std::collections::BTreeMap<String, String>,
    /// Those of `lacking` that are history indices.
    history: std::collections::BTreeSet<String>,
}

/// When the stream last showed life.
struct Progress {
    confirmed_at: Option<SystemTime>,
    keepalive_at: Option<SystemTime>,
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| panic!("{e}"));
    r.register(Box::new(c.clone()))
        .unwrap_or_else(|e| panic!("{e}"));
    c
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).unwrap_or_else(|e| panic!("{e}"));
    r.register(Box::new(c.clone()))
        .unwrap_or_else(|e| panic!("{e}"));
    c
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| panic!("{e}"));
    r.register(Box::new(g.clone()))
        .unwrap_or_else(|e| panic!("{e}"));
    g
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: &[f64]) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
        .unwrap_or_else(|e| panic!("{e}"));
    r.register(Box::new(h.clone()))
        .unwrap_or_else(|e| panic!("{e}"));
    h
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).unwrap_or_else(|e| panic!("{e}"));
    r.register(Box::new(g.clone()))
        .unwrap_or_else(|e| panic!("{e}"));
    g
}

/// Events per (`schema.table`, op code), in first-seen order.
pub fn count_events(events: &[crate::event::ChangeEvent]) -> Vec<((String, &'static str), u64)> {
    let mut counts: Vec<((String, &'static str), u64)> = Vec::new();
    let mut last: Option<(&str, &str, &'static str, usize)> = None;
    for e in events {
        let op = e.op.code();
        let i = match last {
            Some((s, n, o, i)) if s == e.table.schema && n == e.table.name && o == op => i,
            _ => {
                let name = format!("{}.{}", e.table.schema, e.table.name);
                match counts.iter().position(|((t, o), _)| *t == name && *o == op) {
                    Some(i) => i,
                    None => {
                        counts.push(((name, op), 0));
                        counts.len() - 1
                    }
                }
            }
        };
        counts[i].1 += 1;
        last = Some((&e.table.schema, &e.table.name, op, i));
    }
    counts
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

/// Whether `t` is at most `window` ago.
fn recent(t: Option<SystemTime>, window: Duration) -> bool {
    t.and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age <= window)
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

impl Metrics {
    fn new() -> Self {
        let r = Registry::new_custom(Some("pgcdc".into()), None).unwrap_or_else(|e| panic!("{e}"));
        let confirmed = IntGaugeVec::new(
            Opts::new(
                "lsn",
                "LSN positions: server WAL end and checkpointed (confirmed)",
            ),
            &["position"],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        r.register(Box::new(confirmed.clone()))
            .unwrap_or_else(|e| panic!("{e}"));
        Self {
            events_in: counter_vec(
                &r,
                "events_in_total",
                "Changes read from PostgreSQL",
                &["table", "op"],
            ),
            events_out: counter_vec(
                &r,
                "events_out_total",
                "Changes acknowledged by Kafka",
                &["table", "op"],
            ),
            kafka_errors: counter(&r, "kafka_errors_total", "Kafka delivery errors"),
            kafka_refusals: counter_vec(
                &r,
                "kafka_refusals_total",
                "Times a broker refused a running Kafka client of pgcdc (SASL authentication or TLS handshake failed)",
                &["client"],
            ),
            kafka_refused: Mutex::default(),
            kafka_clients_refused: gauge(
                &r,
                "kafka_clients_refused",
                "Running Kafka clients of pgcdc a broker refuses, until a new client of the same configuration gets through",
            ),
            es_items: counter_vec(
                &r,
                "es_bulk_items_total",
                "Elasticsearch bulk items by outcome",
                &["outcome"],
            ),
            batches: counter(
                &r,
                "batches_total",
                "Batches the stream handed to the Kafka producer (committed transactions already received share one, up to postgres.max_batch_events)",
            ),
            kafka_ack: histogram(
                &r,
                "kafka_ack_seconds",
                "Commit of a streamed batch's oldest transaction (the database's clock) to Kafka acknowledging the batch's last record",
                &[
                    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    60.0, 300.0,
                ],
            ),
            checkpoint_writes: counter(
                &r,
                "checkpoint_writes_total",
                "Synced checkpoint writes (acknowledged batches that complete during one are merged into the next)",
            ),
            es_reindexes: counter_vec(
                &r,
                "es_reindexes_total",
                "Mirror generations built for incompatible schema changes, by event",
                &["event"],
            ),
            es_mirrors_deleted: counter_vec(
                &r,
                "es_mirrors_deleted_total",
                "Mirrors whose index was found deleted (while the sink wrote to it, or while it was stopped); each is copied again from PostgreSQL",
                &["mirror"],
            ),
            es_mirrors_refused: counter_vec(
                &r,
                "es_mirrors_refused_total",
                "Times Elasticsearch refused a mirror's or history index's creation or mapping (tried again every 30 s): a mirror's changes are skipped meanwhile and it is filled from PostgreSQL once accepted; a history index's documents are dead-lettered",
                &["mirror"],
            ),
            es_refusals: counter_vec(
                &r,
                "es_bulk_refusals_total",
                "Bulk requests split or items dead-lettered because of the server's answer",
                &["reason"],
            ),
            dead_letters: counter(
                &r,
                "dead_letters_total",
                "Records parked on the dead-letter topic",
            ),
            es_skipped_offsets: counter(
                &r,
                "es_skipped_offsets_total",
                "Kafka offsets the ES sink never received (retention, compaction or a broker fault)",
            ),
            restarts: counter_vec(
                &r,
                "actor_restarts_total",
                "Supervised actor restarts",
                &["actor"],
            ),
            snapshot_rows: counter_vec(
                &r,
                "snapshot_rows_total",
                "Rows copied by snapshots and backfills",
                &["table"],
            ),
            snapshot_pending: gauge(
                &r,
                "snapshot_tables_pending",
                "Tables whose copy is not finished",
            ),
            slot_retained_wal: gauge(
                &r,
                "slot_retained_wal_bytes",
                "WAL retained on the server by the slot",
            ),
            wal_over_budget: gauge(
                &r,
                "slot_retained_wal_over_budget",
                "1 while retained WAL exceeds wal.budget_bytes",
            ),
            heartbeats: counter(
                &r,
                "heartbeats_total",
                "Heartbeat messages written to the WAL",
            ),
            audit_dropped: gauge(
                &r,
                "audit_dropped_total",
                "Audit log records dropped (data is never dropped)",
            ),
            forged_messages: counter(
                &r,
                "forged_messages_total",
                "WAL messages with pgcdc's prefixes whose signature did not verify (ignored)",
            ),
            tables_uncaptured: gauge(
                &r,
                "tables_uncaptured",
                "Configured tables whose changes are not all captured (dropped, not published, or partitioned with unlogged or foreign partitions): their mirrors are not current",
            ),
            postgres_blocking: gauge(
                &r,
                "postgres_blocking_sessions",
                "PostgreSQL sessions that block a pgcdc session waiting on a lock (creating its slot, copying a table): see the log for their pids",
            ),
            waiting: Mutex::default(),
            unpublished_operations: gauge(
                &r,
                "publication_unpublished_operations",
                "Operations (insert, update, delete, truncate) the publication's publish option leaves out: their changes never reach Kafka",
            ),
            table_resets: counter_vec(
                &r,
                "table_resets_total",
                "Tables copied again, by cause; truncated first unless the cause is partition_attached: created again, back after they were gone, added back to the publication, the publication's column list or row filter changed, a partitioned table's changes were sent under its partitions' names, a partition was detached or dropped (partition_removed), truncated by itself or rewritten (partition_rewritten), attached holding rows (partition_attached), or decoded again after some were unlogged or foreign tables (partition_undecoded)",
                &["table", "cause"],
            ),
            chunks_read_again: counter_vec(
                &r,
                "backfill_chunks_read_again_total",
                "Backfill and repair chunks read again because a transaction that committed before the chunk was not yet visible to its read (e.g. waiting for a synchronous standby)",
                &["table"],
            ),
            kafka_partitions_added: gauge_vec(
                &r,
                "kafka_partitions_added",
                "Partitions the change topic gained since pgcdc first wrote to it: its change records stay on the partitions they had (unless kafka.properties sets another partitioner)",
                &["topic"],
            ),
            es_sink_lag: gauge_vec(
                &r,
                "es_sink_lag_records",
                "Records beyond the ES sink group's committed offset",
                &["topic", "partition"],
            ),
            es_sink_partitions: gauge(
                &r,
                "es_sink_partitions_assigned",
                "Partitions assigned to this ES sink",
            ),
            es_sink_rejoins: counter(
                &r,
                "es_sink_rejoins_total",
                "Times the ES sink left its group and joined again to end a stall",
            ),
            es_sink_direct: gauge(
                &r,
                "es_sink_reading_directly",
                "1 while the ES sink reads every partition directly because its group does not form",
            ),
            es_applied_lsn: gauge_vec(
                &r,
                "es_applied_lsn",
                "Highest commit LSN the ES sink applied to the mirror",
                &["table"],
            ),
            verify_rows: counter_vec(
                &r,
                "verify_rows_total",
                "Rows and documents compared by the continuous verification, by result (equal, missing, extra, stale, newer, unconfirmed)",
                &["table", "result"],
            ),
            verify_drift: gauge_vec(
                &r,
                "verify_drift_rows",
                "Drifted rows (missing, extra, stale) found by the last continuous verification of a table",
                &["table"],
            ),
            verify_repaired: counter_vec(
                &r,
                "verify_repaired_rows_total",
                "Drifted rows the continuous verification had copied again and saw repaired in the mirror",
                &["table"],
            ),
            verify_drifted: Mutex::default(),
            verify_last_run: gauge(
                &r,
                "verify_last_run_timestamp_seconds",
                "When the last continuous verification round ended (seconds since the epoch)",
            ),
            es_sink_stalled: gauge(
                &r,
                "es_sink_stalled",
                "1 while records wait on a partition whose committed offset stands still",
            ),
            es_mirrors_lacking: gauge(
                &r,
                "es_mirrors_lacking_changes",
                "Indices known to lack changes: mirrors (index deleted, records Kafka never delivered) until their fill from PostgreSQL is swapped in, history indices Elasticsearch refuses until it accepts them",
            ),
            sink: Mutex::default(),
            lag_bytes: gauge(
                &r,
                "replication_lag_bytes",
                "Server WAL end minus the checkpointed (confirmed) LSN",
            ),
            lag_seconds: gauge(
                &r,
                "replication_lag_seconds",
                "Now minus the commit time of the newest checkpointed change, while behind",
            ),
            confirmed,
            server_wal_end: AtomicU64::new(0),
            confirmed_lsn: AtomicU64::new(0),
            confirmed_commit_us: AtomicI64::new(0),
            progress: Mutex::new(Progress {
                confirmed_at: None,
                keepalive_at: None,
            }),
            freshness: crate::canary::Freshness::new(&r),
            registry: r,
        }
    }

    /// The server reported its WAL end (keepalive or data).
    pub fn server_wal_end(&self, lsn: Lsn) {
        self.server_wal_end.fetch_max(lsn.0, Ordering::Relaxed);
        if let Ok(mut p) = self.progress.lock() {
            p.keepalive_at = Some(SystemTime::now());
        }
    }

    /// A commit (or position) is checkpointed and confirmed.
    pub fn confirmed(&self, lsn: Lsn, commit_time_us: Option<i64>) {
        let before = self.confirmed_lsn.fetch_max(lsn.0, Ordering::Relaxed);
        if let Some(t) = commit_time_us {
            self.confirmed_commit_us.fetch_max(t, Ordering::Relaxed);
        }
        if lsn.0 > before {
            if let Ok(mut p) = self.progress.lock() {
                p.confirmed_at = Some(SystemTime::now());
            }
        }
    }

    /// Kafka acknowledged every record of a batch whose oldest streamed
    /// transaction committed at `commit_time_us` (µs since the epoch).
    pub fn acknowledged(&self, commit_time_us: i64) {
        let micros = now_us().saturating_sub(commit_time_us).max(0);
        self.kafka_ack.observe(micros as f64 / 1e6);
    }

    /// Replication lag in bytes.
    pub fn lag_bytes(&self) -> u64 {
        let end = self.server_wal_end.load(Ordering::Relaxed);
        end.saturating_sub(self.confirmed_lsn.load(Ordering::Relaxed))
    }

    /// Ready: confirmed progress within `window`, or caught up with a
    /// keepalive within `window`; and every configured table is captured.
    pub fn ready(&self, window: Duration) -> bool {
        let Ok(p) = self.progress.lock() else {
            return false;
        };
        let moving = recent(p.confirmed_at, window)
            || (recent(p.keepalive_at, window) && self.lag_bytes() == 0);
        moving && self.tables_uncaptured.get() == 0
    }

    /// Whether the process is ready as `what` (see [`Readiness`]); if not, why.
    pub fn readiness(&self, window: Duration, what: Readiness) -> Result<(), String> {
        let uncaptured = self.tables_uncaptured.get();
        if what != Readiness::Sink && uncaptured > 0 {
            return Err(format!(
                "{uncaptured} configured table(s) not captured (dropped, not in the publication, or with unlogged or foreign partitions; see the log)"
            ));
        }
        self.kafka_accepting()?;
        if what != Readiness::Sink && !self.ready(window) {
            if let Some(why) = self.waiting.lock().ok().and_then(|w| w.clone()) {
                return Err(why);
            }
            return Err(format!(
                "no confirmed progress in {}s and {} bytes behind",
                window.as_secs(),
                self.lag_bytes()
            ));
        }
        self.freshness.check()?;
        self.verified()?;
        if what == (Readiness::Pipeline { sink: false }) {
            return Ok(());
        }
        let Ok(s) = self.sink.lock() else {
            return Err("sink health unreadable".into());
        };
        if let Some(why) = &s.stalled {
            return Err(why.clone());
        }
        if !s.lacking.is_empty() {
            let list: Vec<String> = s
                .lacking
                .iter()
                .map(|(m, why)| format!("{m} ({why})"))
                .collect();
            return Err(format!(
                "es sink: indices lack changes: {}",
                list.join(", ")
            ));
        }
        // In `pgcdc run`, a sink that started less than a window ago is
        // given that window; a standalone sink is judged on the sink alone.
        let live = recent(s.wrote_at, window)
            || recent(s.caught_up_at, window)
            || (what != Readiness::Sink && recent(s.started_at, window));
        if !live {
            let why = s
                .retrying
                .as_ref()
                .map(|why| format!(" (elasticsearch: {why})"))
                .unwrap_or_default();
            return Err(format!(
                "es sink: no batch written and not caught up in {}s{why}",
                window.as_secs()
            ));
        }
        Ok(())
    }

    /// A broker refused the running Kafka client `client` (`why`: librdkafka's
    /// line); `/ready` is 503 naming it until [`Metrics::kafka_accepted`].
    pub fn kafka_refused(&self, client: &'static str, why: &str) {
        self.kafka_refusals.with_label_values(&[client]).inc();
        if let Ok(mut refused) = self.kafka_refused.lock() {
            refused.insert(client, why.to_owned());
            self.kafka_clients_refused.set(refused.len() as i64);
        }
    }

    /// Whether a broker refuses any running Kafka client.
    pub fn kafka_refusing(&self) -> bool {
        self.kafka_refused.lock().is_ok_and(|r| !r.is_empty())
    }

    /// The brokers accept pgcdc's credentials again: no client is refused.
    pub fn kafka_accepted(&self) {
        if let Ok(mut refused) = self.kafka_refused.lock() {
            refused.clear();
            self.kafka_clients_refused.set(0);
        }
    }

    /// `Err` naming the first refused Kafka client while any is.
    fn kafka_accepting(&self) -> Result<(), String> {
        let refused = self
            .kafka_refused
            .lock()
            .map_err(|_| "kafka refusals unreadable")?;
        match refused.iter().next() {
            Some((client, why)) => Err(format!(
                "the kafka broker refuses pgcdc's client {client}: {why}"
            )),
            None => Ok(()),
        }
    }

    /// The continuous verification found `table`'s mirror drifted
    /// (`Some(what)`: the counts; `/ready` names it) or no longer (`None`).
    pub fn verify_drifted(&self, table: &str, what: Option<String>) {
        if let Ok(mut d) = self.verify_drifted.lock() {
            match what {
                Some(what) => d.insert(table.to_owned(), what),
                None => d.remove(table),
            };
        }
    }

    /// `Err` naming the tables whose mirror drifted, while any did.
    fn verified(&self) -> Result<(), String> {
        let d = self
            .verify_drifted
            .lock()
            .map_err(|_| "verify results unreadable")?;
        if d.is_empty() {
            return Ok(());
        }
        let list: Vec<String> = d.iter().map(|(t, what)| format!("{t} ({what})")).collect();
        Err(format!(
            "continuous verification found the mirror drifted: {}",
            list.join(", ")
        ))
    }

    /// What keeps pgcdc waiting in PostgreSQL (`Some(why)`: `/ready` gives
    /// it as its reason while not ready), or nothing any more.
    pub fn postgres_waiting(&self, why: Option<String>) {
        if let Ok(mut w) = self.waiting.lock() {
            *w = why;
        }
    }

    /// The ES sink wrote and committed a batch.
    pub fn sink_wrote(&self) {
        if let Ok(mut s) = self.sink.lock() {
            s.wrote_at = Some(SystemTime::now());
            s.retrying = None;
        }
    }

    /// The ES sink started (its first start in this process counts).
    pub fn sink_started(&self) {
        if let Ok(mut s) = self.sink.lock() {
            s.started_at.get_or_insert_with(SystemTime::now);
        }
    }

    /// Elasticsearch did not take the batch the ES sink sends, for `why`:
    /// the sink tries again; `/ready` names it once nothing was written for
    /// a window.
    pub fn sink_retrying(&self, why: &str) {
        const SHOWN: usize = 300;
        let mut shown: String = why.chars().take(SHOWN).collect();
        if shown.len() < why.len() {
            shown.push('…');
        }
        if let Ok(mut s) = self.sink.lock() {
            s.retrying = Some(shown);
        }
    }

    /// The ES sink found no record waiting beyond its group's committed offsets.
    pub fn sink_caught_up(&self) {
        if let Ok(mut s) = self.sink.lock() {
            s.caught_up_at = Some(SystemTime::now());
        }
    }

    /// The ES sink is stalled (`Some(why)`) or not (`None`); whether it was before.
    pub fn sink_stalled(&self, why: Option<String>) -> bool {
        let was = self.es_sink_stalled.get() == 1;
        self.es_sink_stalled.set(i64::from(why.is_some()));
        if let Ok(mut s) = self.sink.lock() {
            s.stalled = why;
        }
        was
    }

    /// The ES sink's mirror `alias` lacks changes (`Some(why)`) until a
    /// fill completes, or no longer (`None`).
    pub fn sink_lacking(&self, alias: &str, why: Option<&str>) {
        if let Ok(mut s) = self.sink.lock() {
            match why {
                Some(why) => s.lacking.insert(alias.to_owned(), why.to_owned()),
                None => s.lacking.remove(alias),
            };
            self.es_mirrors_lacking.set(s.lacking.len() as i64);
        }
    }

    /// Elasticsearch refuses the ES sink's history index `index`
    /// (`Some(why)`), or no longer (`None`).
    pub fn sink_history_refused(&self, index: &str, why: Option<&str>) {
        if let Ok(mut s) = self.sink.lock() {
            match why {
                Some(why) => {
                    s.history.insert(index.to_owned());
                    s.lacking.insert(index.to_owned(), why.to_owned());
                }
                None => {
                    s.history.remove(index);
                    s.lacking.remove(index);
                }
            }
            self.es_mirrors_lacking.set(s.lacking.len() as i64);
        }
    }

    /// A run of the ES sink starts: it knows of no refused history index
    /// until a record meets one again.
    pub fn sink_history_forgotten(&self) {
        if let Ok(mut s) = self.sink.lock() {
            for index in std::mem::take(&mut s.history) {
                s.lacking.remove(&index);
            }
            self.es_mirrors_lacking.set(s.lacking.len() as i64);
        }
    }

    /// The ES sink applied `table`'s changes up to commit LSN `lsn` (never moves back).
    pub fn sink_applied(&self, table: &str, lsn: Lsn) {
        let gauge = self.es_applied_lsn.with_label_values(&[table]);
        let lsn = i64::try_from(lsn.0).unwrap_or(i64::MAX);
        if lsn > gauge.get() {
            gauge.set(lsn);
        }
    }

    /// Everything, in the Prometheus text format.
    pub fn render(&self) -> String {
        let lag = self.lag_bytes();
        self.lag_bytes.set(lag as i64);
        let commit = self.confirmed_commit_us.load(Ordering::Relaxed);
        let seconds = if lag > 0 && commit > 0 {
            (now_us() - commit).max(0) / 1_000_000
        } else {
            0
        };
        self.lag_seconds.set(seconds);
        self.audit_dropped
            .set(crate::audit::dropped_total().try_into().unwrap_or(i64::MAX));
        self.confirmed
            .with_label_values(&["server_wal_end"])
            .set(self.server_wal_end.load(Ordering::Relaxed) as i64);
        self.confirmed
            .with_label_values(&["confirmed"])
            .set(self.confirmed_lsn.load(Ordering::Relaxed) as i64);
        self.freshness.refresh();
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_reports_the_audit_records_dropped() {
        crate::audit::count_drops(3);
        let before = crate::audit::dropped_total();
        let text = metrics().render();
        let line = text
            .lines()
            .find(|l| l.starts_with("pgcdc_audit_dropped_total "))
            .expect("audit_dropped_total rendered");
        let shown: u64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .expect("a number");
        assert!(shown >= before, "{line} < {before}");
    }

    #[test]
    fn lag_is_wal_end_minus_confirmed_and_readiness_follows_it() {
        let m = Metrics::new();
        assert!(!m.ready(Duration::from_secs(30)), "no life seen yet");
        m.server_wal_end(Lsn(1000));
        assert_eq!(m.lag_bytes(), 1000);
        assert!(
            !m.ready(Duration::from_secs(30)),
            "behind, nothing confirmed"
        );
        m.confirmed(Lsn(1000), Some(now_us()));
        assert_eq!(m.lag_bytes(), 0);
        assert!(m.ready(Duration::from_secs(30)));
        let text = m.render();
        assert!(text.contains("pgcdc_replication_lag_bytes 0"), "{text}");
        assert!(
            text.contains("pgcdc_lsn{position=\"confirmed\"} 1000"),
            "{text}"
        );
    }

    /// Metrics whose stream just confirmed everything the server has.
    fn confirmed_progress() -> Metrics {
        let m = Metrics::new();
        m.server_wal_end(Lsn(10));
        m.confirmed(Lsn(10), None);
        m
    }

    #[test]
    fn a_refused_kafka_client_makes_both_readinesses_503_until_kafka_accepts_pgcdc() {
        let m = confirmed_progress();
        let window = Duration::from_secs(30);
        m.sink_caught_up();
        let pipeline = Readiness::Pipeline { sink: true };
        assert_eq!(m.readiness(window, pipeline), Ok(()));
        assert!(!m.kafka_refusing());
        m.kafka_refused("pgcdc-es-sink", "SASL authentication error: sink");
        m.kafka_refused("pgcdc", "SASL authentication error: producer");
        m.kafka_refused("pgcdc", "SASL authentication error: again");
        assert!(m.kafka_refusing());
        for what in [pipeline, Readiness::Sink] {
            assert_eq!(
                m.readiness(window, what),
                Err("the kafka broker refuses pgcdc's client pgcdc: SASL authentication error: again".into())
            );
        }
        let text = m.render();
        assert!(text.contains("pgcdc_kafka_clients_refused 2"), "{text}");
        assert!(
            text.contains("pgcdc_kafka_refusals_total{client=\"pgcdc\"} 2"),
            "{text}"
        );
        m.kafka_accepted();
        assert!(!m.kafka_refusing());
        assert_eq!(m.readiness(window, pipeline), Ok(()));
        assert!(m.render().contains("pgcdc_kafka_clients_refused 0"));
    }

    #[test]
    fn a_drifted_mirror_is_named_until_its_table_is_cleared() {
        let m = confirmed_progress();
        let window = Duration::from_secs(30);
        let pipeline = Readiness::Pipeline { sink: false };
        m.verify_drifted(
            "public.b",
            Some("0 missing, 1 extra, 0 stale; being repaired".into()),
        );
        m.verify_drifted(
            "public.a",
            Some("1 missing, 0 extra, 0 stale; being repaired".into()),
        );
        assert_eq!(
            m.readiness(window, pipeline),
            Err("continuous verification found the mirror drifted: public.a (1 missing, 0 extra, 0 stale; being repaired), public.b (0 missing, 1 extra, 0 stale; being repaired)".into())
        );
        m.verify_drifted("public.a", None);
        assert!(m
            .readiness(window, pipeline)
            .is_err_and(|e| e.contains("public.b") && !e.contains("public.a")));
        m.verify_drifted("public.b", None);
        assert_eq!(m.readiness(window, pipeline), Ok(()));
    }

    #[test]
    fn a_standalone_sink_is_ready_while_it_writes_or_is_caught_up_and_not_stalled() {
        let m = Metrics::new();
        let window = Duration::from_secs(30);
        let sink = m.readiness(window, Readiness::Sink);
        assert!(sink.is_err_and(|e| e.contains("not caught up")));
        m.sink_caught_up();
        assert_eq!(m.readiness(window, Readiness::Sink), Ok(()));
        m.sink_stalled(Some("stalled: 7 records wait".into()));
        assert_eq!(
            m.readiness(window, Readiness::Sink),
            Err("stalled: 7 records wait".into())
        );
        assert!(m.render().contains("pgcdc_es_sink_stalled 1"));
        m.sink_stalled(None);
        m.sink_wrote();
        assert_eq!(m.readiness(window, Readiness::Sink), Ok(()));
        assert!(m.render().contains("pgcdc_es_sink_stalled 0"));
        m.sink_lacking("cdc_public_a", Some("its index was deleted"));
        m.sink_lacking("cdc_public_b", Some("kafka never delivered some records"));
        let why = m.readiness(window, Readiness::Sink).unwrap_err();
        assert!(
            why.contains("cdc_public_a (its index was deleted), cdc_public_b (kafka"),
            "{why}"
        );
        assert!(m.render().contains("pgcdc_es_mirrors_lacking_changes 2"));
        m.sink_lacking("cdc_public_a", None);
        m.sink_history_refused("cdc_public_a_history", Some("refused"));
        // A new run of the sink forgets refused history indices, not mirrors.
        m.sink_history_forgotten();
        let why = m.readiness(window, Readiness::Sink).unwrap_err();
        assert!(
            !why.contains("history") && why.contains("cdc_public_b"),
            "{why}"
        );
        m.sink_lacking("cdc_public_b", None);
        assert_eq!(m.readiness(window, Readiness::Sink), Ok(()));
        assert!(m.render().contains("pgcdc_es_mirrors_lacking_changes 0"));
    }

    #[test]
    fn the_pipeline_is_not_ready_while_its_sink_is_stalled() {
        let m = confirmed_progress();
        let window = Duration::from_secs(30);
        m.sink_stalled(Some("stalled".into()));
        assert_eq!(
            m.readiness(window, Readiness::Pipeline { sink: false }),
            Ok(())
        );
        assert_eq!(
            m.readiness(window, Readiness::Pipeline { sink: true }),
            Err("stalled".into())
        );
        m.sink_stalled(None);
        m.sink_started();
        assert_eq!(
            m.readiness(window, Readiness::Pipeline { sink: true }),
            Ok(()),
            "a sink that started less than a window ago and wrote nothing yet is no reason"
        );
        // A window later, still nothing written (Elasticsearch refuses the batch).
        m.sink_retrying("cluster_block_exception: index blocked");
        if let Ok(mut s) = m.sink.lock() {
            s.started_at = SystemTime::now().checked_sub(window * 2);
        }
        assert_eq!(
            m.readiness(window, Readiness::Pipeline { sink: true }),
            Err("es sink: no batch written and not caught up in 30s (elasticsearch: cluster_block_exception: index blocked)".into())
        );
        m.sink_started();
        assert!(
            m.readiness(window, Readiness::Pipeline { sink: true })
                .is_err(),
            "a restart of the sink is no new grace"
        );
        m.sink_wrote();
        assert_eq!(
            m.readiness(window, Readiness::Pipeline { sink: true }),
            Ok(())
        );
        m.sink_retrying(&"x".repeat(1000));
        let why = m.sink.lock().map(|s| s.retrying.clone()).ok().flatten();
        assert!(why.is_some_and(|w| w.len() < 310), "a long reason is cut");
        let lost = Metrics::new();
        assert!(lost
            .readiness(window, Readiness::Pipeline { sink: true })
            .is_err_and(|e| e.contains("no confirmed progress")));
    }

    #[test]
    fn the_applied_lsn_of_a_table_never_moves_back() {
        let m = Metrics::new();
        m.sink_applied("public.t", Lsn(500));
        m.sink_applied("public.t", Lsn(300));
        m.sink_applied("public.u", Lsn(7));
        let text = m.render();
        assert!(
            text.contains("pgcdc_es_applied_lsn{table=\"public.t\"} 500"),
            "{text}"
        );
        assert!(
            text.contains("pgcdc_es_applied_lsn{table=\"public.u\"} 7"),
            "{text}"
        );
    }
}
