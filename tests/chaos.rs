//! `pgcdc chaos` end to end: short kill -9 and injected-panic scenarios must
//! pass (the panic scenario stops the daemon with SIGTERM right after its
//! restarts, so a shutdown racing a restart is covered), and the
//! output must carry the seed (for replay) and the result table. It runs in a
//! directory without `config/pgcdc.toml`: chaos needs no configuration file.

use std::process::Command;

/// Run `pgcdc chaos` with `args` in a directory without a configuration
/// file; it must exit 0. Returns its stdout.
fn chaos(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_pgcdc"))
        .arg("chaos")
        .args(args)
        .current_dir(std::env::temp_dir())
        .output()
        .expect("run pgcdc chaos");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
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
    let stdout = chaos(&[
        "--seed",
        "7",
        "--scenarios",
        "kill9,panic",
        "--kills",
        "2",
        "--duration-secs",
        "10",
    ]);
    assert!(stdout.contains("chaos seed: 7"), "{stdout}");
    assert!(
        stdout.contains("pgcdc chaos --seed 7 --scenarios kill9,panic"),
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

/// The ES fault proxy (429/500/dropped connections/partial bulk failures) and
/// a deleted checkpoint (slot taken over at its confirmed position) must
/// pass too; about 55 s.
#[test]
fn chaos_es_errors_and_a_deleted_checkpoint_pass() {
    let stdout = chaos(&[
        "--seed",
        "7",
        "--scenarios",
        "es-errors,checkpoint-missing",
        "--kills",
        "1",
        "--duration-secs",
        "5",
    ]);
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
