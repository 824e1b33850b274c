//! `pgcdc chaos`: a fault-injection harness. Each scenario starts private
//! services (PostgreSQL, tansu, osmem-server) and a pgcdc daemon (this very
//! executable, `run`), drives a workload of numbered transactions, injects
//! faults on a schedule drawn from a seeded PRNG, stops the daemon cleanly
//! and checks the oracle ([`oracle`]). The seed is printed first, so any run
//! can be replayed. Some scenarios put the daemon behind fault proxies
//! ([`proxy`] for TCP, [`es_proxy`] for `_bulk`) or its state on a small
//! filesystem ([`services::TmpfsMount`]).

pub mod es_proxy;
mod faults;
pub mod oracle;
mod proxy;
mod report;
mod services;
mod workload;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use tokio::task::block_in_place;
use tokio_postgres::Client;

use es_proxy::EsFaultProxy;
use proxy::TcpProxy;
pub use report::{Outcome, Verdict, HEADER};
use services::{free_port, Daemon, PgCluster, SearchServer, Tansu, TmpfsMount};
use workload::{lock, Journal};

/// Every scenario, in the default order.
pub const SCENARIOS: [&str; 12] = [
    "kill9",
    "panic",
    "pg-restart",
    "walsender-kill",
    "slot-dropped",
    "proxy",
    "es-errors",
    "kafka-down",
    "disk-full",
    "checkpoint-corrupt",
    "checkpoint-missing",
    "slot-advanced",
];

/// What `pgcdc chaos` was asked to do.
#[derive(Debug, Clone)]
pub struct ChaosOptions {
    /// PRNG seed; from the clock when absent.
    pub seed: Option<u64>,
    /// Scenarios to run (empty: all).
    pub scenarios: Vec<String>,
    /// Faults per scenario (kills, restarts, terminations).
    pub kills: usize,
    /// Seconds the workload runs in each scenario.
    pub duration_secs: u64,
    /// Peak RSS of the daemon allowed, in MiB.
    pub rss_limit_mb: u64,
}

/// splitmix64: small, deterministic, good enough to schedule faults.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform-ish in `0..n` (`0` when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
}

/// Run the harness; the process exit code (0 when every scenario passed).
pub fn run(opts: ChaosOptions) -> i32 {
    let seed = opts.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let names: Vec<String> = if opts.scenarios.is_empty() {
        SCENARIOS.iter().map(|s| s.to_string()).collect()
    } else {
        opts.scenarios.clone()
    };
    if let Some(bad) = names.iter().find(|n| !SCENARIOS.contains(&n.as_str())) {
        eprintln!(
            "pgcdc chaos: unknown scenario {bad:?}; known: {}",
            SCENARIOS.join(",")
        );
        return 2;
    }
    println!("chaos seed: {seed}");
    println!(
        "replay: pgcdc chaos --seed {seed} --scenarios {} --kills {} --duration-secs {} --rss-limit-mb {}",
        names.join(","),
        opts.kills,
        opts.duration_secs,
        opts.rss_limit_mb
    );
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pgcdc chaos: tokio runtime: {e}");
            return 1;
        }
    };
    let mut outcomes = Vec::new();
    for name in &names {
        let index = SCENARIOS.iter().position(|s| s == name).unwrap_or(0) as u64;
        let scenario_seed = seed ^ (index + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let outcome = rt.block_on(run_scenario(name, scenario_seed, seed, &opts));
        eprintln!(
            "{}",
            report::table(std::slice::from_ref(&outcome)).trim_end()
        );
        outcomes.push(outcome);
    }
    print!("{}", report::table(&outcomes));
    i32::from(outcomes.iter().any(|o| o.verdict.failed()))
}

/// A scenario's running world.
pub(crate) struct World {
    pub(crate) pg: PgCluster,
    pub(crate) db: Client,
    pub(crate) daemon: Daemon,
    /// Set when PostgreSQL is restarted on purpose (see [`oracle::watch_slot`]).
    pub(crate) pg_restarted: Arc<AtomicBool>,
    /// The daemon's `state_dir`.
    pub(crate) state_dir: PathBuf,
    /// `proxy`: the TCP proxies in front of PostgreSQL, Kafka and ES, by service.
    pub(crate) proxies: Vec<(&'static str, TcpProxy)>,
    /// `es-errors`: the HTTP fault proxy in front of ES.
    pub(crate) es_proxy: Option<EsFaultProxy>,
    /// `disk-full`: the small filesystem `state_dir` lives on.
    _disk: Option<TmpfsMount>,
    tansu: Tansu,
    es: SearchServer,
    _dir: tempfile::TempDir,
}

/// Partitions of the `cdc-events` topic in the daemon's configuration.
pub(crate) const PARTITIONS: i32 = 3;

/// Why a scenario cannot run here (reported `SKIPPED`, never `PASS`).
#[derive(Debug)]
struct Skip(String);

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Skip {}

/// The daemon's configuration. The ES sink's consumer uses static group
/// membership (`group.instance.id`): with dynamic membership, two `kill -9`s
/// within one rebalance left tansu's group without an assignment for minutes
/// (ES never converged; replay: seed 7, kill9, --kills 2 --duration-secs 10).
/// The producer writes one record per batch (`batch.num.messages = 1`):
/// tansu 0.6 answers a fetch from the middle of a record batch with the
/// next batch, so a sink resuming at a committed offset inside a batch never
/// got the rest of it (seen under load with `--seed 7 --scenarios kill9
/// --kills 2 --duration-secs 10`: documents missing, the sink's continuity
/// check reporting skipped offsets). Real Kafka returns the whole batch.
fn daemon_config(
    w_dir: &Path,
    pg_port: u16,
    password: &str,
    brokers: &str,
    es_url: &str,
) -> String {
    format!(
        "state_dir = {state:?}\nshutdown_timeout_secs = 20\n\
         [postgres]\nhost = \"127.0.0.1\"\nport = {port}\nuser = \"postgres\"\npassword = {pw:?}\n\
         database = \"postgres\"\ntables = [\"public.chaos_items\"]\nstatus_interval_secs = 1\n\
         [kafka]\nbrokers = {brokers:?}\ntopic_partitions = {partitions}\ndelivery_timeout_ms = 30000\n\
         [kafka.properties]\n\"group.instance.id\" = \"pgcdc-chaos-sink\"\n\"batch.num.messages\" = \"1\"\n\
         [elasticsearch]\nrun_in_daemon = true\nurl = {url:?}\nnumber_of_replicas = 0\nflush_interval_ms = 50\n\
         [supervision]\nmax_restarts = 50\nbackoff_initial_ms = 50\nbackoff_max_ms = 1000\n\
         [log]\nlevel = \"info\"\n[metrics]\nlisten = \"\"\n",
        state = w_dir.join("state").display().to_string(),
        port = pg_port,
        pw = password,
        url = es_url,
        partitions = PARTITIONS,
    )
}

/// A proxy on a fresh port in front of `127.0.0.1:upstream`.
fn proxy_to(upstream: u16) -> Result<TcpProxy> {
    TcpProxy::start(std::net::TcpListener::bind("127.0.0.1:0")?, upstream)
}

/// The port of a base URL such as `http://127.0.0.1:9200`.
fn url_port(url: &str) -> Result<u16> {
    url.rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .ok_or_else(|| anyhow!("no port in {url}"))
}

/// Start the services (with the scenario's proxies or small filesystem) and
/// the daemon, and wait until it streams.
async fn start_world(name: &str, seed: u64, run_seed: u64) -> Result<World> {
    let dir = tempfile::Builder::new().prefix("pgcdc-chaos-").tempdir()?;
    let state_dir = dir.path().join("state");
    let disk = match name {
        "disk-full" => Some(TmpfsMount::mount(&state_dir, 64).map_err(|e| Skip(format!("{e:#}")))?),
        _ => None,
    };
    let pg = block_in_place(|| PgCluster::start(&format!("chaos-secret-{run_seed}")))?;
    let es = SearchServer::start()?;
    let mut proxies = Vec::new();
    let tansu = match name {
        "proxy" => {
            // Kafka clients reconnect to the advertised address: tansu must advertise the proxy.
            let front = std::net::TcpListener::bind("127.0.0.1:0")?;
            let tansu = Tansu::start_with(free_port()?, front.local_addr()?.port())?;
            proxies.push(("postgres", proxy_to(pg.port)?));
            proxies.push(("kafka", TcpProxy::start(front, tansu.port)?));
            proxies.push(("elasticsearch", proxy_to(url_port(&es.url)?)?));
            tansu
        }
        _ => Tansu::start()?,
    };
    let es_proxy = match name {
        "es-errors" => Some(EsFaultProxy::start(&es.url, seed).await?),
        _ => None,
    };
    let brokers = tansu.brokers();
    block_in_place(|| oracle::wait_broker(&brokers, Duration::from_secs(30)))?;
    let db = pg.client().await?;
    db.batch_execute(workload::DDL).await?;
    let proxied = |service: &str| {
        proxies
            .iter()
            .find(|(s, _)| *s == service)
            .map(|(_, p)| p.port)
    };
    let pg_port = proxied("postgres").unwrap_or(pg.port);
    let es_url = match (&es_proxy, proxied("elasticsearch")) {
        (Some(p), _) => p.url.clone(),
        (None, Some(port)) => format!("http://127.0.0.1:{port}"),
        (None, None) => es.url.clone(),
    };
    let config = daemon_config(dir.path(), pg_port, &pg.password, &brokers, &es_url);
    let daemon = Daemon::start(dir.path(), &config)?;
    let mut w = World {
        pg,
        db,
        daemon,
        pg_restarted: Arc::default(),
        state_dir,
        proxies,
        es_proxy,
        _disk: disk,
        tansu,
        es,
        _dir: dir,
    };
    wait_streaming(&mut w).await?;
    Ok(w)
}

/// Wait until the daemon holds the slot with an active walsender.
pub(crate) async fn wait_streaming(w: &mut World) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let q = "SELECT 1 FROM pg_replication_slots WHERE slot_name = 'pgcdc' AND active";
    loop {
        if !w.daemon.is_running() {
            return Err(anyhow!("pgcdc exited before streaming"));
        }
        if w.db.query_opt(q, &[]).await.ok().flatten().is_some() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(anyhow!("pgcdc did not start streaming within 60 s"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn run_scenario(name: &str, seed: u64, run_seed: u64, opts: &ChaosOptions) -> Outcome {
    let started = Instant::now();
    let mut outcome = Outcome {
        scenario: name.to_owned(),
        injections: 0,
        transactions: 0,
        events: 0,
        duplicates: 0,
        verdict: Verdict::Pass,
        seconds: 0.0,
    };
    if name == "panic" && !cfg!(feature = "failpoints") {
        outcome.verdict = Verdict::Skipped("built without --features failpoints".into());
        return outcome;
    }
    outcome.verdict = match start_world(name, seed, run_seed).await {
        Ok(mut w) => {
            let v = drive(name, seed, opts, &mut w, &mut outcome).await;
            if v.failed() {
                keep_log(&w, name, run_seed);
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
async fn drive(
    name: &str,
    seed: u64,
    opts: &ChaosOptions,
    w: &mut World,
    o: &mut Outcome,
) -> Verdict {
    let stop_poll = Arc::new(AtomicBool::new(false));
    let poller = oracle::watch_slot(w.pg.url(), stop_poll.clone(), w.pg_restarted.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let journal = Arc::new(Mutex::new(Journal::default()));
    let writer = tokio::spawn(workload::run(
        w.pg.url(),
        seed,
        stop.clone(),
        journal.clone(),
    ));
    let mut rng = Rng::new(seed);
    let injected = faults::inject(name, &mut rng, opts, w).await;
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
    let mut es = oracle::es_converges(&w.db, &w.es.url, Duration::from_secs(90)).await;
    let brokers = w.tansu.brokers();
    if es.is_ok() {
        // Equal rows are not the end of the sink's work; wait for the versions too.
        if let Ok(scan) = block_in_place(|| oracle::read_topic(&brokers, "cdc-events")) {
            let settle = Duration::from_secs(60);
            es = oracle::es_versions_settle(&w.es.url, &scan.versions, settle).await;
        }
    }
    let status = block_in_place(|| w.daemon.terminate(Duration::from_secs(60)));
    stop_poll.store(true, Ordering::SeqCst);
    let slot = poller.await.unwrap_or_default();
    let mut checks = Checks::default();
    match status {
        Ok(s) => checks.check(s.code() == Some(0), || {
            format!("sigterm exit code {:?}", s.code())
        }),
        Err(e) => checks.check(false, || format!("sigterm: {e}")),
    }
    let mut kafka_versions = std::collections::HashMap::new();
    let scan = block_in_place(|| oracle::read_topic(&brokers, "cdc-events"));
    if let (Err(e), Ok(scan)) = (&mut es, &scan) {
        e.push_str(&oracle::explain_mirror(&w.db, &w.es.url, scan, &brokers).await);
    }
    match scan {
        Ok(scan) => {
            let seen = &scan.seen;
            o.events = scan.records;
            kafka_versions.clone_from(&scan.versions);
            o.duplicates = oracle::duplicates(seen);
            let missing = oracle::missing(&committed, seen);
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
            let unacked = oracle::confirmed_but_missing(slot.max_confirmed, &committed, seen);
            checks.check(unacked.is_empty(), || {
                format!(
                    "slot confirmed {:x} past transactions not on kafka {unacked:?}",
                    slot.max_confirmed
                )
            });
        }
        Err(e) => checks.check(false, || format!("kafka read: {e:#}")),
    }
    match &es {
        Ok(versions) => {
            let stale = oracle::stale_versions(versions, &kafka_versions);
            checks.check(stale == 0, || {
                format!("es: {stale} documents' _version is not their last commit lsn")
            });
        }
        Err(e) => checks.check(false, || format!("es mirror: {e}")),
    }
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
    match faults::after_stop(name, o.injections, w).await {
        Ok(n) => o.injections += n,
        Err(e) => checks.check(false, || format!("{e:#}")),
    }
    checks.verdict()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_schedule() {
        let a: Vec<u64> = (0..5)
            .map({
                let mut r = Rng::new(7);
                move |_| r.below(1000)
            })
            .collect();
        let mut r = Rng::new(7);
        let b: Vec<u64> = (0..5).map(|_| r.below(1000)).collect();
        assert_eq!(a, b);
        assert_ne!(Rng::new(8).next_u64(), Rng::new(7).next_u64());
    }
}
