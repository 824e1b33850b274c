//! The chaos harness: each scenario starts private services (PostgreSQL, a
//! Kafka broker, osmem-server) and the shipped `pgcdc` binary, drives a
//! workload of numbered transactions, injects faults on a schedule drawn
//! from a seeded PRNG, stops the daemon cleanly and checks the oracle. The
//! seed is printed first, so any run can be replayed. Some scenarios put
//! the daemon behind fault proxies or its state on a small filesystem.

mod check;
mod faults;
mod report;
mod run;
mod workload;
mod world;

use std::io::Write;
use std::path::PathBuf;

use clap::{Args, ValueEnum};

pub use report::{Outcome, Verdict, HEADER};

/// The change topic the daemon writes and the sink reads.
pub(crate) const TOPIC: &str = "cdc-events";
/// The mirror index of the workload's table.
pub(crate) const INDEX: &str = "cdc_public_chaos_items";
/// The ES sink's consumer group.
pub(crate) const SINK_GROUP: &str = "pgcdc-es-sink";
/// Partitions of the change topic in the daemon's configuration.
pub(crate) const PARTITIONS: i32 = 3;

/// A fault scenario; the order is the default order (and part of each scenario's seed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// kill -9 the daemon at random times and start it again.
    Kill9,
    /// Restart with a failpoint armed that panics in an actor (needs a failpoints build).
    Panic,
    /// Restart PostgreSQL (immediate and fast shutdowns, alternating).
    PgRestart,
    /// Terminate the walsender with pg_terminate_backend.
    WalsenderKill,
    /// Drop the slot behind the stopped daemon: the restart must exit with code 5.
    SlotDropped,
    /// TCP proxies before PostgreSQL, Kafka and ES cut connections or delay them (tansu only).
    Proxy,
    /// An HTTP proxy answers _bulk with 429, 500, dropped connections or partial failures.
    EsErrors,
    /// Freeze the broker (SIGSTOP) for a few seconds, then let it go on.
    KafkaDown,
    /// Fill state_dir's filesystem (a small tmpfs, root only): keep going or exit 6.
    DiskFull,
    /// Corrupt the checkpoint: refused with exit 6, recovered by deleting it.
    CheckpointCorrupt,
    /// Delete the checkpoint: the slot is taken over at its confirmed position.
    CheckpointMissing,
    /// Advance the slot past the checkpoint behind the stopped daemon: exit 5.
    SlotAdvanced,
    /// Change the table's columns (the mirror takes a mapping or a new index filled from PostgreSQL), then kill -9 soon after; the workload also truncates the table.
    SchemaChange,
}

impl Scenario {
    /// Its command-line name.
    pub fn name(self) -> String {
        self.to_possible_value()
            .map(|v| v.get_name().to_owned())
            .unwrap_or_default()
    }

    /// Its position in the default order.
    fn index(self) -> u64 {
        Scenario::value_variants()
            .iter()
            .position(|s| *s == self)
            .unwrap_or(0) as u64
    }
}

/// The Kafka implementation a run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BrokerKind {
    /// tansu with memory storage.
    Tansu,
    /// librdkafka's mock cluster (the `kafka-mock` binary).
    Mock,
}

/// What a chaos run is asked to do.
#[derive(Debug, Clone, Args)]
pub struct ChaosOptions {
    /// PRNG seed (printed first, so a run can be replayed); default: from the clock.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Comma-separated scenarios (default: all, in the order listed).
    #[arg(long, value_delimiter = ',', value_enum)]
    pub scenarios: Vec<Scenario>,
    /// Faults per scenario (kills, restarts, walsender terminations).
    #[arg(long, default_value_t = 3)]
    pub kills: usize,
    /// Seconds the workload runs in each scenario.
    #[arg(long, default_value_t = 20)]
    pub duration_secs: u64,
    /// Peak RSS allowed for the daemon, in MiB.
    #[arg(long, default_value_t = 300)]
    pub rss_limit_mb: u64,
    /// The Kafka implementation.
    #[arg(long, value_enum, default_value_t = BrokerKind::Tansu)]
    pub broker: BrokerKind,
    /// The pgcdc executable under test (default: `pgcdc` beside this executable).
    #[arg(long)]
    pub pgcdc: Option<PathBuf>,
    /// The kafka-mock executable (default: `kafka-mock` beside this executable).
    #[arg(long)]
    pub kafka_mock: Option<PathBuf>,
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

/// `name` beside the running executable.
fn beside_me(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(name)))
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Run the scenarios; the result table goes to `out`, progress to stderr.
/// The exit code: 0 when no scenario failed.
pub fn run(mut opts: ChaosOptions, out: &mut dyn Write) -> i32 {
    let seed = opts.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    if opts.scenarios.is_empty() {
        opts.scenarios = Scenario::value_variants().to_vec();
    }
    let pgcdc = opts.pgcdc.get_or_insert_with(|| beside_me("pgcdc")).clone();
    opts.kafka_mock
        .get_or_insert_with(|| beside_me("kafka-mock"));
    let names: Vec<String> = opts.scenarios.iter().map(|s| s.name()).collect();
    let broker = opts
        .broker
        .to_possible_value()
        .map(|v| v.get_name().to_owned())
        .unwrap_or_default();
    let _ = writeln!(out, "chaos seed: {seed}");
    let _ = writeln!(
        out,
        "replay: scripts/chaos.sh --seed {seed} --scenarios {} --kills {} --duration-secs {} --rss-limit-mb {} --broker {broker}",
        names.join(","),
        opts.kills,
        opts.duration_secs,
        opts.rss_limit_mb
    );
    let failpoints = crate::daemon::has_failpoints(&pgcdc);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pgcdc-chaos: tokio runtime: {e}");
            return 1;
        }
    };
    let mut outcomes = Vec::new();
    for &scenario in &opts.scenarios {
        let scenario_seed = seed ^ (scenario.index() + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let ctx = run::Context {
            scenario,
            seed: scenario_seed,
            run_seed: seed,
            failpoints,
            opts: &opts,
        };
        let outcome = rt.block_on(run::scenario(ctx));
        eprintln!(
            "{}",
            report::table(std::slice::from_ref(&outcome)).trim_end()
        );
        outcomes.push(outcome);
    }
    let _ = write!(out, "{}", report::table(&outcomes));
    // Last, so a CI log cut to its end still shows why.
    for o in &outcomes {
        if let Some(tail) = &o.log_tail {
            let _ = writeln!(
                out,
                "\n{} failed; the end of pgcdc's log:\n{tail}",
                o.scenario
            );
        }
    }
    i32::from(outcomes.iter().any(|o| o.verdict.failed()))
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

    #[test]
    fn every_scenario_has_a_name_and_a_description() {
        let names: Vec<String> = Scenario::value_variants()
            .iter()
            .map(|s| s.name())
            .collect();
        assert_eq!(
            names.join(","),
            "kill9,panic,pg-restart,walsender-kill,slot-dropped,proxy,es-errors,kafka-down,\
             disk-full,checkpoint-corrupt,checkpoint-missing,slot-advanced,schema-change"
        );
        for s in Scenario::value_variants() {
            let help = s
                .to_possible_value()
                .and_then(|v| v.get_help().map(|h| h.to_string()));
            assert!(
                help.is_some_and(|h| !h.is_empty()),
                "{s:?} has no description"
            );
        }
    }
}
