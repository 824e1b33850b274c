//! One scenario from start to verdict: world, workload and faults, a clean
//! stop, then every check.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::task::block_in_place;

use super::check::{self, TopicScan};
use super::report::{Outcome, Verdict};
use super::workload::{self, Committed, Journal};
use super::world::{self, Skip, World, SLOT};
use super::{faults, ChaosOptions, Rng, Scenario, INDEX};
use crate::lock;
use crate::oracle::{self, Want};
use crate::slot::{SlotWatch, SlotWatcher};

/// How long the mirror gets to equal the table after the workload stopped.
const CONVERGE: Duration = Duration::from_secs(90);
/// How long the mirror's versions get to settle once the rows are equal.
const SETTLE: Duration = Duration::from_secs(60);
/// How long the daemon gets to exit after SIGTERM.
const STOP: Duration = Duration::from_secs(60);
/// How often the slot watcher polls.
const SLOT_EVERY: Duration = Duration::from_millis(100);

/// One scenario's parameters.
pub(crate) struct Context<'a> {
    pub(crate) scenario: Scenario,
    /// This scenario's seed.
    pub(crate) seed: u64,
    /// The run's seed (names kept logs, salts the password).
    pub(crate) run_seed: u64,
    /// Whether the daemon under test has failpoints compiled in.
    pub(crate) failpoints: bool,
    pub(crate) opts: &'a ChaosOptions,
}

/// Run one scenario; its outcome.
pub(crate) async fn scenario(ctx: Context<'_>) -> Outcome {
    let started = Instant::now();
    let mut outcome = Outcome {
        scenario: ctx.scenario.name(),
        injections: 0,
        transactions: 0,
        events: 0,
        duplicates: 0,
        verdict: Verdict::Pass,
        seconds: 0.0,
        log_tail: None,
    };
    if ctx.scenario == Scenario::Panic && !ctx.failpoints {
        outcome.verdict = Verdict::Skipped("pgcdc was built without --features failpoints".into());
        return outcome;
    }
    outcome.verdict = match world::start(ctx.scenario, ctx.seed, ctx.run_seed, ctx.opts).await {
        Ok(mut w) => {
            let v = drive(&ctx, &mut w, &mut outcome).await;
            if v.failed() {
                keep_log(&w, &outcome.scenario, ctx.run_seed);
                outcome.log_tail = Some(w.daemon.log_tail());
            }
            v
        }
        Err(e) => match e.downcast_ref::<Skip>() {
            Some(skip) => Verdict::Skipped(skip.0.clone()),
            None => Verdict::Fail(format!("setup: {e:#}")),
        },
    };
    outcome.seconds = started.elapsed().as_secs_f64();
    outcome
}

/// Copy the daemon's log of a failed scenario somewhere it outlives the temp dir.
fn keep_log(w: &World, name: &str, seed: u64) {
    let to = std::env::temp_dir().join(format!("pgcdc-chaos-{seed}-{name}.log"));
    if std::fs::copy(&w.daemon.log, &to).is_ok() {
        eprintln!("chaos: {name}: daemon log kept in {}", to.display());
    }
}

/// Workload + faults + oracle; the verdict.
async fn drive(ctx: &Context<'_>, w: &mut World, o: &mut Outcome) -> Verdict {
    w.slot = Some(SlotWatcher::start(w.pg.url(), SLOT, SLOT_EVERY));
    let stop = Arc::new(AtomicBool::new(false));
    let journal = Arc::new(Mutex::new(Journal::default()));
    let writer = tokio::spawn(workload::run(
        w.pg.url(),
        ctx.seed,
        ctx.scenario == Scenario::SchemaChange,
        stop.clone(),
        journal.clone(),
    ));
    let mut rng = Rng::new(ctx.seed);
    let injected = faults::inject(ctx.scenario, &mut rng, ctx.opts, w).await;
    stop.store(true, Ordering::SeqCst);
    let _ = writer.await;
    o.injections = match injected {
        Ok(n) => n,
        Err(e) => return Verdict::Fail(format!("inject: {e:#}")),
    };
    let committed = std::mem::take(&mut lock(&journal).committed);
    o.transactions = committed.len();
    if !w.daemon.is_running() {
        return Verdict::Fail("pgcdc exited during the run".into());
    }
    if let Ok(db) = w.pg.client().await {
        w.db = db;
    }
    let brokers = w.broker.brokers();
    let filled = ctx.scenario == Scenario::SchemaChange;
    let want = Want::Verified {
        pg: &w.pg,
        table: "public.chaos_items",
    };
    let mut es = oracle::mirror_equals(&w.es.url, INDEX, want, CONVERGE, None)
        .await
        .map_err(|e| e.to_string());
    if es.is_ok() {
        // Equal rows are not the end of the sink's work; wait for the versions too.
        if let Ok(scan) = block_in_place(|| check::read_topic(&brokers)) {
            es = check::versions_settle(&w.es.url, &scan.versions, filled, SETTLE).await;
        }
    }
    let status = block_in_place(|| w.daemon.terminate(STOP));
    let slot = match w.slot.take() {
        Some(s) => s.stop().await,
        None => SlotWatch::default(),
    };
    let mut checks = Checks::default();
    match status {
        Ok(s) => checks.check(s.code() == Some(0), || {
            format!("sigterm exit code {:?}", s.code())
        }),
        Err(e) => checks.check(false, || format!("sigterm: {e}")),
    }
    let scan = block_in_place(|| check::read_topic(&brokers));
    if let (Err(e), Ok(scan)) = (&mut es, &scan) {
        e.push_str(&explain(w, scan, &brokers).await);
    }
    let mut kafka_versions = Default::default();
    match scan {
        Ok(scan) => {
            o.events = scan.records;
            o.duplicates = check::duplicates(&scan.seen);
            kafka_checks(&mut checks, &committed, &scan, &slot);
            kafka_versions = scan.versions;
        }
        Err(e) => checks.check(false, || format!("kafka read: {e:#}")),
    }
    match &es {
        Ok(docs) => {
            let stale = check::stale_versions(docs, &kafka_versions, filled);
            checks.check(stale == 0, || {
                format!("es: {stale} documents' _version is not their last commit lsn")
            });
        }
        Err(e) => checks.check(false, || format!("es mirror: {e}")),
    }
    daemon_checks(&mut checks, w, ctx.opts);
    match faults::after_stop(ctx.scenario, o.injections, w).await {
        Ok(n) => o.injections += n,
        Err(e) => checks.check(false, || format!("{e:#}")),
    }
    checks.verdict()
}

/// Where the documents that differ have their changes on Kafka.
async fn explain(w: &World, scan: &TopicScan, brokers: &str) -> String {
    let (Ok(rows), Ok(docs)) = (
        oracle::table_rows(&w.db, "chaos_items").await,
        crate::search::documents(&w.es.url, INDEX).await,
    ) else {
        return String::new();
    };
    let sources = docs.into_iter().map(|(k, (_, v))| (k, v)).collect();
    let wrong = oracle::wrong_ids(&rows, &sources);
    block_in_place(|| check::explain_mirror(&wrong, scan, brokers))
}

/// Nothing committed is missing from Kafka; the slot never moved back or past Kafka.
fn kafka_checks(checks: &mut Checks, committed: &[Committed], scan: &TopicScan, slot: &SlotWatch) {
    let missing = check::missing(committed, &scan.seen);
    checks.check(missing.is_empty(), || {
        let first: Vec<i64> = missing.iter().take(5).map(|c| c.n).collect();
        format!(
            "kafka: {} transactions missing, first {first:?}",
            missing.len()
        )
    });
    checks.check(slot.backwards.is_none(), || {
        format!("confirmed_flush_lsn moved backwards {:x?}", slot.backwards)
    });
    let unacked = check::confirmed_but_missing(slot.max_confirmed, committed, &scan.seen);
    checks.check(unacked.is_empty(), || {
        format!(
            "slot confirmed {:x} past transactions not on kafka {unacked:?}",
            slot.max_confirmed
        )
    });
}

/// The daemon's log and memory.
fn daemon_checks(checks: &mut Checks, w: &World, opts: &ChaosOptions) {
    let log = w.daemon.log_text();
    checks.check(!log.contains("kafka skipped offsets"), || {
        "the es sink reported offsets kafka never delivered".into()
    });
    checks.check(!log.contains(&w.pg.password), || {
        "the postgres password appears in the log".into()
    });
    let rss_mb = w.daemon.peak_rss_kb / 1024;
    checks.check(rss_mb < opts.rss_limit_mb, || {
        format!("peak rss {rss_mb} MiB over {} MiB", opts.rss_limit_mb)
    });
}

/// The first failed check wins.
#[derive(Default)]
struct Checks(Option<String>);

impl Checks {
    fn check(&mut self, ok: bool, why: impl FnOnce() -> String) {
        if !ok && self.0.is_none() {
            self.0 = Some(why());
        }
    }

    fn verdict(self) -> Verdict {
        self.0.map_or(Verdict::Pass, Verdict::Fail)
    }
}
