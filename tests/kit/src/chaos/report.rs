//! The result table: one line per scenario.

use std::fmt::Write as _;

/// How a scenario ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every check held.
    Pass,
    /// The first check that failed, with what was seen.
    Fail(String),
    /// Not run, and why (e.g. failpoints not compiled in).
    Skipped(String),
}

impl Verdict {
    /// Whether this verdict fails the run.
    pub fn failed(&self) -> bool {
        matches!(self, Verdict::Fail(_))
    }

    fn text(&self) -> String {
        match self {
            Verdict::Pass => "PASS".into(),
            Verdict::Fail(why) => format!("FAIL: {why}"),
            Verdict::Skipped(why) => format!("SKIPPED: {why}"),
        }
    }
}

/// One scenario's line.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Scenario name.
    pub scenario: String,
    /// Faults injected.
    pub injections: usize,
    /// Transactions committed.
    pub transactions: usize,
    /// Records read back from Kafka.
    pub events: usize,
    /// Records beyond the first of each change.
    pub duplicates: usize,
    /// PASS, FAIL or SKIPPED.
    pub verdict: Verdict,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// The end of the daemon's log, for a failed scenario.
    pub log_tail: Option<String>,
}

/// The table header.
pub const HEADER: &str =
    "scenario           injections  transactions  events  duplicates  seconds  verdict";

/// The whole table.
pub fn table(outcomes: &[Outcome]) -> String {
    let mut out = format!("{HEADER}\n");
    for o in outcomes {
        let _ = writeln!(
            out,
            "{:<18} {:>10}  {:>12}  {:>6}  {:>10}  {:>7.1}  {}",
            o.scenario,
            o.injections,
            o.transactions,
            o.events,
            o.duplicates,
            o.seconds,
            o.verdict.text()
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_names_the_first_failed_check() {
        let o = Outcome {
            scenario: "kill9".into(),
            injections: 3,
            transactions: 900,
            events: 12000,
            duplicates: 40,
            verdict: Verdict::Fail("kafka: 2 transactions missing".into()),
            seconds: 31.5,
            log_tail: None,
        };
        let t = table(&[o]);
        assert!(t.starts_with(HEADER));
        assert!(t.contains("kill9") && t.contains("FAIL: kafka: 2 transactions missing"));
    }
}
