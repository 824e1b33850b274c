//! The chaos harness (`pgcdc_testkit::chaos`) against the `pgcdc` binary:
//! short kill -9 and injected-panic scenarios must pass (the panic scenario
//! stops the daemon with SIGTERM right after its restarts, so a shutdown
//! racing a restart is covered), also on librdkafka's mock cluster with
//! multi-record batches, and the output must carry the seed (for replay)
//! and the result table. Chaos needs no configuration file.

use pgcdc_testkit::chaos::{self, BrokerKind, ChaosOptions, Scenario};

/// Run the harness; it must exit 0. Returns what it printed.
fn chaos(
    seed: u64,
    scenarios: &[Scenario],
    kills: usize,
    duration_secs: u64,
    broker: BrokerKind,
) -> String {
    let opts = ChaosOptions {
        seed: Some(seed),
        scenarios: scenarios.to_vec(),
        kills,
        duration_secs,
        rss_limit_mb: 300,
        broker,
        pgcdc: Some(crate::support::PGCDC.into()),
        kafka_mock: Some(crate::support::kafka_mock()),
    };
    let mut out = Vec::new();
    let code = chaos::run(opts, &mut out);
    let stdout = String::from_utf8_lossy(&out).into_owned();
    assert_eq!(code, 0, "stdout:\n{stdout}");
    stdout
}

/// The result line of `scenario`; it must say PASS.
fn passed<'a>(stdout: &'a str, scenario: &str) -> &'a str {
    let line = stdout
        .lines()
        .find(|l| l.starts_with(&format!("{scenario} ")))
        .unwrap_or_default();
    assert!(line.contains("PASS"), "{stdout}");
    line
}

#[test]
fn chaos_smoke_run_passes_and_prints_the_seed_and_table() {
    let stdout = chaos(
        7,
        &[Scenario::Kill9, Scenario::Panic],
        2,
        10,
        BrokerKind::Tansu,
    );
    assert!(stdout.contains("chaos seed: 7"), "{stdout}");
    assert!(
        stdout.contains("scripts/chaos.sh --seed 7 --scenarios kill9,panic"),
        "{stdout}"
    );
    assert!(
        stdout.contains("scenario") && stdout.contains("verdict"),
        "{stdout}"
    );
    for scenario in ["kill9", "panic"] {
        passed(&stdout, scenario);
    }
}

/// kill -9 on librdkafka's mock cluster, the producer on its default
/// settings (multi-record batches): the restarted sink resumes inside batches.
#[test]
fn chaos_kill9_passes_on_the_mock_broker_with_multi_record_batches() {
    let stdout = chaos(7, &[Scenario::Kill9], 2, 10, BrokerKind::Mock);
    assert!(stdout.contains("--broker mock"), "{stdout}");
    let line = passed(&stdout, "kill9");
    let injections: usize = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert_eq!(injections, 2, "{line}");
}

/// The ES fault proxy (429/500/dropped connections/partial bulk failures) and
/// a deleted checkpoint (slot taken over at its confirmed position) must
/// pass too; about 55 s.
#[test]
fn chaos_es_errors_and_a_deleted_checkpoint_pass() {
    let scenarios = [Scenario::EsErrors, Scenario::CheckpointMissing];
    let stdout = chaos(7, &scenarios, 1, 5, BrokerKind::Tansu);
    for scenario in ["es-errors", "checkpoint-missing"] {
        let line = passed(&stdout, scenario);
        let injections: usize = line
            .split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        assert!(injections > 0, "a fault must have fired: {line}");
    }
}

/// A full disk under the checkpoint, three times: each time the daemon
/// keeps running or exits with code 6, and it streams on once the space is
/// back. Needs root (a tmpfs mount), else the scenario says SKIPPED.
#[test]
fn chaos_a_full_disk_three_times_exits_with_code_6_or_keeps_running() {
    let scenarios = [Scenario::DiskFull];
    let stdout = chaos(9138, &scenarios, 3, 10, BrokerKind::Tansu);
    if pgcdc_testkit::is_root() {
        passed(&stdout, "disk-full");
    } else {
        assert!(stdout.contains("SKIPPED"), "{stdout}");
    }
}

/// Schema changes while the workload runs, each followed by a kill -9
/// within 3 s: a column added with a default, a type rewritten in place, a
/// column renamed and one dropped (each a new index filled from
/// PostgreSQL, some of them killed or replaced mid-fill), and a nullable
/// column added; the workload truncates the table every 600 transactions.
/// The mirror must end equal to the table, new columns and rewritten values
/// included; about 60 s.
#[test]
fn chaos_schema_changes_with_kills_mid_fill_pass() {
    let stdout = chaos(5, &[Scenario::SchemaChange], 6, 30, BrokerKind::Tansu);
    let line = passed(&stdout, "schema-change");
    assert!(line.split_whitespace().nth(1) == Some("6"), "{line}");
}
