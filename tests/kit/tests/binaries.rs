//! The kit's two binaries as users and tests run them. (Being an
//! integration test of this package, it also makes `cargo test --workspace`
//! build them, beside `pgcdc`, for the root package's tests.)

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use pgcdc_testkit::kafka::{wait_broker, TopicReader};

/// `pgcdc-chaos --help` lists every scenario with its description.
#[test]
fn chaos_help_lists_every_scenario_with_its_description() {
    let out = Command::new(env!("CARGO_BIN_EXE_pgcdc-chaos"))
        .arg("--help")
        .output()
        .expect("run pgcdc-chaos");
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{help}");
    let scenarios = [
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
    for s in scenarios {
        let line = help
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("- {s}:")));
        assert!(
            line.is_some_and(|l| l.len() > s.len() + 10),
            "{s} undescribed in:\n{help}"
        );
    }
}

/// `kafka-mock` prints a bootstrap address that answers, creates topics on
/// command, and exits when its stdin closes.
#[test]
fn kafka_mock_serves_until_stdin_closes() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kafka-mock"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start kafka-mock");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let bootstrap = lines.next().expect("a line").expect("utf-8");
    wait_broker(&bootstrap, Duration::from_secs(10)).expect("the mock answers");
    writeln!(stdin, "topic t 2").expect("command");
    assert_eq!(lines.next().expect("answer").expect("utf-8"), "ok");
    writeln!(stdin, "nonsense").expect("command");
    assert!(lines
        .next()
        .expect("answer")
        .expect("utf-8")
        .starts_with("error"));
    let reader = TopicReader::new(&bootstrap).expect("reader");
    let records = reader
        .read_all("t", Duration::ZERO, Duration::from_secs(10))
        .expect("read");
    assert!(records.is_empty());
    drop(stdin);
    let status = child.wait().expect("wait");
    assert!(status.success(), "{status}");
}
