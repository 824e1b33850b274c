//! What the benchmarks share: CPU and memory figures of processes, and one
//! line per figure that `scripts/bench.sh` gathers into a table.

use std::process::Command;

use crate::pg::PgCluster;

/// What a figure must reach.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    /// At least this much (a ratio to a baseline).
    AtLeast(f64),
    /// At most this much (CPU per row, memory).
    AtMost(f64),
}

impl Target {
    /// Whether `x` meets the target.
    pub fn met(self, x: f64) -> bool {
        match self {
            Target::AtLeast(t) => x >= t,
            Target::AtMost(t) => x <= t,
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::AtLeast(t) => write!(f, ">= {t}"),
            Target::AtMost(t) => write!(f, "<= {t}"),
        }
    }
}

/// A number from the environment variable `name`, or `default`.
pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Print one figure for `scripts/bench.sh`'s table: what was measured
/// (`figure`), pgcdc's value and the baseline's (as text, with units), the
/// number judged (a ratio, or a figure of pgcdc's own) and its target.
/// The line starts with `BENCH` and its fields are separated by tabs.
pub fn figure(figure: &str, pgcdc: &str, baseline: &str, judged: f64, target: Target) {
    let met = if target.met(judged) { "met" } else { "NOT met" };
    println!("BENCH\t{figure}\t{pgcdc}\t{baseline}\t{judged:.2}\t{target}\t{met}");
}

/// The value of sample `name` (with its labels, as `/metrics` writes them:
/// `pgcdc_lsn{position="confirmed"}`) in the `/metrics` page `text`.
pub fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The `q` quantile of the label-less Prometheus histogram `metric` in the
/// `/metrics` page `text`, as the upper bound of the first bucket that holds
/// it (so at most that), and the number of observations; `None` without
/// observations.
pub fn histogram_quantile(text: &str, metric: &str, q: f64) -> Option<(f64, u64)> {
    let buckets = histogram_buckets(text, metric);
    let total = buckets.iter().map(|&(_, n)| n).max().filter(|&n| n > 0)?;
    let rank = (q * total as f64).ceil() as u64;
    buckets
        .iter()
        .find(|&&(_, n)| n >= rank)
        .map(|&(le, _)| (le, total))
}

/// The buckets of the label-less Prometheus histogram `metric` in the
/// `/metrics` page `text`: each upper bound (`+Inf` as infinity) with its
/// cumulative count, in the page's order.
pub fn histogram_buckets(text: &str, metric: &str) -> Vec<(f64, u64)> {
    let prefix = format!("{metric}_bucket{{le=\"");
    text.lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|rest| {
            let (le, n) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, n.trim().parse().ok()?))
        })
        .collect()
}

/// CPU seconds (user + system) process `pid` used so far; with `children`,
/// also those of its children that were waited for. 0 if it is gone.
pub fn cpu_secs(pid: u32, children: bool) -> f64 {
    stat_cpu_secs(&format!("/proc/{pid}/stat"), children)
}

/// How librdkafka's own I/O threads' names start (`rdk:main`,
/// `rdk:broker1`, …): the rest of pgcdc's threads run pgcdc's code.
pub const LIBRDKAFKA_THREADS: &str = "rdk:";

/// CPU seconds the threads of process `pid` whose name starts with
/// `prefix` used so far (see [`LIBRDKAFKA_THREADS`]).
pub fn threads_cpu_secs(pid: u32, prefix: &str) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    tasks
        .flatten()
        .filter(|t| {
            let name = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            name.starts_with(prefix)
        })
        .map(|t| stat_cpu_secs(&t.path().join("stat").to_string_lossy(), false))
        .sum()
}

/// The CPU seconds of a `/proc/…/stat` file (see [`cpu_secs`]).
fn stat_cpu_secs(path: &str, children: bool) -> f64 {
    let Ok(stat) = std::fs::read_to_string(path) else {
        return 0.0;
    };
    // Fields after the command name: state is the first, utime the 12th.
    let fields: Vec<f64> = stat
        .rsplit_once(") ")
        .map(|(_, rest)| rest.split(' ').map(|f| f.parse().unwrap_or(0.0)).collect())
        .unwrap_or_default();
    let take = if children { 4 } else { 2 };
    let ticks: f64 = fields.iter().skip(11).take(take).sum();
    ticks / clock_ticks()
}

/// Peak resident memory (`VmHWM`) of process `pid`, MiB; 0 if it is gone.
pub fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Clock ticks per second (`getconf CLK_TCK`).
fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// CPU seconds of a whole PostgreSQL cluster: the postmaster, the backends
/// it waited for, and the live ones. Read again if a backend exited during
/// the reading: reaped between its own reading and the postmaster's, its CPU
/// would count twice (or, the other way round, not at all).
pub fn pg_cpu_secs(pg: &PgCluster) -> f64 {
    let Ok(postmaster) = pg.postmaster_pid() else {
        return 0.0;
    };
    loop {
        let before = pg_children(pg);
        let children: f64 = before.iter().map(|pid| cpu_secs(*pid, true)).sum();
        let total = cpu_secs(postmaster, true) + children;
        if pg_children(pg) == before {
            return total;
        }
    }
}

/// The postmaster's live child processes.
pub fn pg_children(pg: &PgCluster) -> Vec<u32> {
    let Ok(parent) = pg.postmaster_pid() else {
        return Vec::new();
    };
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            let ppid = stat
                .rsplit_once(") ")?
                .1
                .split(' ')
                .nth(1)?
                .parse::<u32>()
                .ok()?;
            (ppid == parent).then_some(pid)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_is_read_by_its_whole_name_and_labels() {
        let page = "pgcdc_lsn{position=\"received\"} 7\npgcdc_lsn{position=\"confirmed\"} 5\npgcdc_checkpoint_writes_total_x 9\npgcdc_checkpoint_writes_total 3\n";
        assert_eq!(sample(page, "pgcdc_lsn{position=\"confirmed\"}"), Some(5.0));
        assert_eq!(sample(page, "pgcdc_checkpoint_writes_total"), Some(3.0));
        assert_eq!(sample(page, "pgcdc_lsn"), None);
        assert_eq!(sample(page, "pgcdc_missing"), None);
    }
}
