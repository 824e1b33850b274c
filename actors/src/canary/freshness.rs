//! The freshness metrics: per stage, a histogram of commit → stage and the
//! age of the newest canary that reached it; and the readiness rule on
//! those ages (`canary.max_lag_secs`).

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use prometheus::{GaugeVec, HistogramOpts, HistogramVec, Opts, Registry};

use super::now_us;

/// Histogram buckets of freshness, in seconds.
const BUCKETS: &[f64] = &[0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];

/// A point of the pipeline a canary reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The canary's record is acknowledged by Kafka (after every change before it).
    Kafka,
    /// Every change before the canary is written by the sink and refreshed.
    Search,
}

impl Stage {
    /// The `stage` label.
    pub fn label(self) -> &'static str {
        match self {
            Stage::Kafka => "kafka",
            Stage::Search => "search",
        }
    }

    /// What reaching the stage means, for the readiness reason.
    fn reached_means(self) -> &'static str {
        match self {
            Stage::Kafka => "acknowledged by kafka",
            Stage::Search => "searchable",
        }
    }
}

/// What a process knows of one stage.
#[derive(Default)]
struct Measure {
    /// Whether this process measures the stage now.
    on: AtomicBool,
    /// Write time (µs) of the newest canary that reached the stage, or when
    /// measuring (re)started if later.
    newest_us: AtomicI64,
}

/// The freshness metrics (part of [`crate::metrics::Metrics`]).
pub struct Freshness {
    /// Commit → stage, per stage.
    seconds: HistogramVec,
    /// Age of the newest canary that reached a stage, per stage (set when rendered).
    age: GaugeVec,
    /// The Kafka stage (measured where canaries are written).
    kafka: Measure,
    /// The search stage (measured by the sink reading the canary partition).
    search: Measure,
    /// `canary.max_lag_secs` (0: not part of readiness).
    max_lag_secs: AtomicU64,
}

impl Freshness {
    /// The metrics, registered in `r`.
    pub(crate) fn new(r: &Registry) -> Self {
        let seconds = HistogramVec::new(
            HistogramOpts::new(
                "freshness_seconds",
                "Canary commit to reaching a stage (kafka: its record acknowledged; search: everything before it searchable)",
            )
            .buckets(BUCKETS.to_vec()),
            &["stage"],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let age = GaugeVec::new(
            Opts::new(
                "freshness_last_canary_age_seconds",
                "Age of the newest canary that reached a stage",
            ),
            &["stage"],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        r.register(Box::new(seconds.clone()))
            .unwrap_or_else(|e| panic!("{e}"));
        r.register(Box::new(age.clone()))
            .unwrap_or_else(|e| panic!("{e}"));
        Self {
            seconds,
            age,
            kafka: Measure::default(),
            search: Measure::default(),
            max_lag_secs: AtomicU64::new(0),
        }
    }

    fn measure_of(&self, stage: Stage) -> &Measure {
        match stage {
            Stage::Kafka => &self.kafka,
            Stage::Search => &self.search,
        }
    }

    /// Require each measured stage's canary age below `secs` for readiness (0: don't).
    pub fn set_max_lag(&self, secs: u64) {
        self.max_lag_secs.store(secs, Ordering::Relaxed);
    }

    /// This process measures `stage` from `now_us` on: its age counts from
    /// here until a canary arrives, and canaries written before are not
    /// counted (another process may have counted them).
    pub fn measure(&self, stage: Stage, now_us: i64) {
        let m = self.measure_of(stage);
        m.newest_us.fetch_max(now_us, Ordering::Relaxed);
        m.on.store(true, Ordering::Relaxed);
    }

    /// This process stops measuring `stage` (its age is no longer exported
    /// nor judged): a sink that no longer reads the canary partition.
    pub fn unmeasure(&self, stage: Stage) {
        self.measure_of(stage).on.store(false, Ordering::Relaxed);
    }

    /// A canary written at `t_us` reached `stage` at `now_us`, plus `after`
    /// (the time the stage itself adds, such as an index refresh).
    pub fn reached(&self, stage: Stage, t_us: i64, now_us: i64, after: Duration) {
        let secs = (now_us - t_us).max(0) as f64 / 1e6 + after.as_secs_f64();
        self.seconds
            .with_label_values(&[stage.label()])
            .observe(secs);
        self.measure_of(stage)
            .newest_us
            .fetch_max(t_us, Ordering::Relaxed);
    }

    /// Write time (µs) of the newest canary that reached `stage` (or when
    /// measuring it last started, if later): older canaries are not counted.
    pub fn newest(&self, stage: Stage) -> i64 {
        self.measure_of(stage).newest_us.load(Ordering::Relaxed)
    }

    /// Seconds since the newest canary that reached `stage` was written, if measured.
    fn age(&self, stage: Stage) -> Option<f64> {
        let m = self.measure_of(stage);
        let t = m.newest_us.load(Ordering::Relaxed);
        m.on.load(Ordering::Relaxed)
            .then(|| (now_us() - t).max(0) as f64 / 1e6)
    }

    /// Set the age gauges (before rendering); a stage not measured has none.
    pub(crate) fn refresh(&self) {
        for stage in [Stage::Kafka, Stage::Search] {
            match self.age(stage) {
                Some(age) => self.age.with_label_values(&[stage.label()]).set(age),
                None => {
                    let _ = self.age.remove_label_values(&[stage.label()]);
                }
            }
        }
    }

    /// Whether freshness allows readiness; if not, why (naming the stage).
    pub(crate) fn check(&self) -> Result<(), String> {
        let max = self.max_lag_secs.load(Ordering::Relaxed);
        if max == 0 {
            return Ok(());
        }
        for stage in [Stage::Kafka, Stage::Search] {
            match self.age(stage) {
                Some(age) if age > max as f64 => {
                    return Err(format!(
                        "freshness: stage {}: the newest canary {} was written {age:.0}s ago (canary.max_lag_secs = {max})",
                        stage.label(),
                        stage.reached_means()
                    ))
                }
                _ => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_names_the_stale_stage_and_only_measured_stages_count() {
        let f = Freshness::new(&Registry::new());
        f.set_max_lag(5);
        let now = now_us();
        assert_eq!(f.check(), Ok(()), "nothing measured: ready");
        f.measure(Stage::Kafka, now);
        f.measure(Stage::Search, now - 60_000_000);
        let why = f.check().unwrap_err();
        assert!(why.contains("stage search"), "{why}");
        f.unmeasure(Stage::Search);
        assert_eq!(f.check(), Ok(()), "a stage not measured is not judged");
        f.measure(Stage::Search, now - 60_000_000);
        f.reached(Stage::Search, now - 1_000_000, now, Duration::from_secs(1));
        assert_eq!(f.check(), Ok(()));
        f.reached(Stage::Search, now - 30_000_000, now, Duration::ZERO);
        assert_eq!(f.newest(Stage::Search), now - 1_000_000, "never backwards");
        f.measure(Stage::Kafka, now - 60_000_000);
        assert_eq!(
            f.newest(Stage::Kafka),
            now,
            "measuring again never goes back"
        );
    }
}
