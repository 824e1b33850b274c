//! Noticing a sink group that leaves changes waiting, and when to rejoin it.
//!
//! A consumer group can leave records unconsumed with no error anywhere:
//! tansu 0.6 keeps members that died in the group and can leave the live
//! member without partitions for good, and a member whose process hangs
//! keeps its partitions. So every few seconds the sink compares each
//! partition's high watermark with its group's committed offset. A
//! partition is *stuck* when records wait beyond the committed offset and
//! that offset has not moved for `stall_timeout`; the sink is *stalled*
//! while any partition of its topics is stuck, whoever owns it (one it owns
//! itself counts only while it is idle: a batch that takes longer than the
//! bound is slow, not stalled). A stalled
//! sink leaves its group and joins again as a new member, which makes the
//! broker rebalance; the next rejoin waits twice as long, up to
//! [`MAX_REJOIN_GAP`]. Pure: no I/O here.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Longest wait between two rejoins while the sink stays stalled.
const MAX_REJOIN_GAP: Duration = Duration::from_secs(300);

/// One partition of the sink's topics, as a probe saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct PartitionLag {
    /// The topic.
    pub(super) topic: String,
    /// The partition.
    pub(super) partition: i32,
    /// The group's committed offset (`None`: nothing committed yet).
    pub(super) committed: Option<i64>,
    /// The low watermark: where a group without a committed offset starts.
    pub(super) low: i64,
    /// The high watermark: the offset the next record will get.
    pub(super) high: i64,
    /// Whether this member owns the partition.
    pub(super) owned: bool,
}

impl PartitionLag {
    /// Records beyond the committed offset (never negative: a broker's
    /// high watermark may trail what it already delivered).
    pub(super) fn lag(&self) -> i64 {
        let from = self.committed.unwrap_or(self.low).max(self.low);
        (self.high - from).max(0)
    }
}

/// What a probe means for the sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Verdict {
    /// No record waits beyond the committed offsets.
    CaughtUp,
    /// Records wait, and the group is consuming them (or has not had long enough).
    Behind {
        /// Records waiting.
        lag: i64,
    },
    /// Records wait on partitions whose committed offsets have not moved for the bound.
    Stalled {
        /// Records waiting, on every partition.
        lag: i64,
        /// Partitions stuck.
        stuck: usize,
        /// How long the sink has been stalled.
        stalled_for: Duration,
        /// Whether to leave the group and join again now.
        rejoin: bool,
    },
}

/// The sink's memory of its group's progress.
#[derive(Debug)]
pub(super) struct StallWatch {
    /// How long committed offsets may stand still while records wait.
    bound: Duration,
    /// Per partition: the committed offset last seen, and since when.
    seen: HashMap<(String, i32), (Option<i64>, Instant)>,
    /// When this member last (re)joined: the next rejoin waits for the gap after it.
    joined_at: Instant,
    /// Rejoins since the group last made progress on every partition.
    rejoins: u32,
    /// Since when the sink is stalled.
    stalled_since: Option<Instant>,
}

impl StallWatch {
    /// A watch for a member that joined at `now`.
    pub(super) fn new(bound: Duration, now: Instant) -> Self {
        Self {
            bound,
            seen: HashMap::new(),
            joined_at: now,
            rejoins: 0,
            stalled_since: None,
        }
    }

    /// The sink committed `offset` (the next to read) on a partition itself:
    /// progress, even if a probe still reads the older committed offset.
    pub(super) fn committed(&mut self, topic: &str, partition: i32, offset: i64, now: Instant) {
        self.seen
            .insert((topic.to_owned(), partition), (Some(offset), now));
    }

    /// The sink left its group and joined again at `now`.
    pub(super) fn rejoined(&mut self, now: Instant) {
        self.joined_at = now;
        self.rejoins += 1;
    }

    /// Rejoins since the group last made progress.
    pub(super) fn rejoins(&self) -> u32 {
        self.rejoins
    }

    /// Take in a probe of every partition of the sink's topics at `now`;
    /// `idle`: the sink received no record since the last probe.
    pub(super) fn observe(
        &mut self,
        partitions: &[PartitionLag],
        idle: bool,
        now: Instant,
    ) -> Verdict {
        self.seen.retain(|(t, p), _| {
            partitions
                .iter()
                .any(|l| (&l.topic, l.partition) == (t, *p))
        });
        let mut stuck = 0;
        for l in partitions {
            let key = (l.topic.clone(), l.partition);
            let since = match self.seen.get(&key) {
                Some(&(committed, since)) if committed == l.committed => since,
                _ => {
                    self.seen.insert(key, (l.committed, now));
                    now
                }
            };
            if l.lag() > 0 && now.duration_since(since) >= self.bound && (idle || !l.owned) {
                stuck += 1;
            }
        }
        let lag = partitions.iter().map(PartitionLag::lag).sum();
        if stuck == 0 {
            self.stalled_since = None;
            self.rejoins = 0;
            return if lag == 0 {
                Verdict::CaughtUp
            } else {
                Verdict::Behind { lag }
            };
        }
        let since = *self.stalled_since.get_or_insert(now);
        Verdict::Stalled {
            lag,
            stuck,
            stalled_for: now.duration_since(since),
            rejoin: now.duration_since(self.joined_at) >= self.rejoin_gap(),
        }
    }

    /// How long a member must have been in the group before the next rejoin:
    /// the bound, doubling with every rejoin that did not help.
    fn rejoin_gap(&self) -> Duration {
        let doublings = self.rejoins.min(16);
        self.bound
            .saturating_mul(1 << doublings)
            .min(MAX_REJOIN_GAP.max(self.bound))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUND: Duration = Duration::from_secs(30);

    fn part(partition: i32, committed: Option<i64>, high: i64) -> PartitionLag {
        PartitionLag {
            topic: "t".into(),
            partition,
            committed,
            low: 0,
            high,
            owned: false,
        }
    }

    fn at(start: Instant, secs: u64) -> Instant {
        start + Duration::from_secs(secs)
    }

    #[test]
    fn lag_counts_from_the_committed_offset_or_the_start_and_is_never_negative() {
        assert_eq!(part(0, Some(40), 100).lag(), 60);
        assert_eq!(part(0, None, 100).lag(), 100);
        assert_eq!(
            part(0, Some(120), 100).lag(),
            0,
            "a trailing high watermark"
        );
        let trimmed = PartitionLag {
            low: 50,
            ..part(0, Some(10), 100)
        };
        assert_eq!(trimmed.lag(), 50, "retention deleted what was before 50");
    }

    #[test]
    fn records_nobody_consumes_for_the_bound_are_a_stall_and_a_rejoin() {
        let t0 = Instant::now();
        let mut w = StallWatch::new(BOUND, t0);
        let stuck = [part(0, Some(10), 50), part(1, Some(5), 5)];
        assert_eq!(w.observe(&stuck, true, t0), Verdict::Behind { lag: 40 });
        assert_eq!(
            w.observe(&stuck, true, at(t0, 29)),
            Verdict::Behind { lag: 40 }
        );
        assert_eq!(
            w.observe(&stuck, true, at(t0, 30)),
            Verdict::Stalled {
                lag: 40,
                stuck: 1,
                stalled_for: Duration::ZERO,
                rejoin: true
            }
        );
        w.rejoined(at(t0, 30));
        // Still stalled while the new member waits for its assignment, no rejoin yet.
        let v = w.observe(&stuck, true, at(t0, 65));
        assert!(
            matches!(v, Verdict::Stalled { rejoin: false, stalled_for, .. } if stalled_for == Duration::from_secs(35)),
            "{v:?}"
        );
        // The next rejoin waits twice the bound after the last one.
        let v = w.observe(&stuck, true, at(t0, 90));
        assert!(matches!(v, Verdict::Stalled { rejoin: true, .. }), "{v:?}");
        assert_eq!(w.rejoins(), 1);
    }

    #[test]
    fn moving_committed_offsets_are_progress_even_with_records_waiting() {
        let t0 = Instant::now();
        let mut w = StallWatch::new(BOUND, t0);
        for (i, committed) in [10, 20, 30, 40].into_iter().enumerate() {
            let v = w.observe(
                &[part(0, Some(committed), 100)],
                true,
                at(t0, 20 * i as u64),
            );
            assert!(matches!(v, Verdict::Behind { .. }), "{v:?}");
        }
        // The sink's own commit counts even when the probe reads the old offset.
        w.committed("t", 0, 50, at(t0, 70));
        let v = w.observe(&[part(0, Some(40), 100)], true, at(t0, 95));
        assert!(matches!(v, Verdict::Behind { .. }), "{v:?}");
        assert_eq!(
            w.observe(&[part(0, Some(100), 100)], true, at(t0, 500)),
            Verdict::CaughtUp
        );
    }

    #[test]
    fn progress_ends_the_stall_and_resets_the_backoff() {
        let t0 = Instant::now();
        let mut w = StallWatch::new(BOUND, t0);
        w.observe(&[part(0, Some(0), 10)], true, t0);
        w.rejoined(at(t0, 30));
        w.rejoined(at(t0, 90));
        assert_eq!(w.rejoin_gap(), BOUND * 4);
        assert_eq!(
            w.observe(&[part(0, Some(5), 10)], true, at(t0, 100)),
            Verdict::Behind { lag: 5 }
        );
        assert_eq!(w.rejoins(), 0);
        assert_eq!(w.rejoin_gap(), BOUND);
    }

    #[test]
    fn a_partition_the_sink_owns_is_stuck_only_while_the_sink_is_idle() {
        let t0 = Instant::now();
        let mut w = StallWatch::new(BOUND, t0);
        let mine = [PartitionLag {
            owned: true,
            ..part(0, Some(10), 50)
        }];
        w.observe(&mine, false, t0);
        assert_eq!(
            w.observe(&mine, false, at(t0, 40)),
            Verdict::Behind { lag: 40 },
            "busy with a long batch"
        );
        assert!(matches!(
            w.observe(&mine, true, at(t0, 45)),
            Verdict::Stalled { .. }
        ));
    }

    #[test]
    fn the_rejoin_gap_is_capped() {
        let mut w = StallWatch::new(BOUND, Instant::now());
        for _ in 0..40 {
            w.rejoined(Instant::now());
        }
        assert_eq!(w.rejoin_gap(), MAX_REJOIN_GAP);
    }
}
