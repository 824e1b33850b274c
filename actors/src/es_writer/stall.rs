//! Noticing a sink group that leaves changes waiting, and what to do about it.
//!
//! A consumer group can leave records unconsumed with no error anywhere:
//! tansu 0.6 keeps members that died in the group and can leave the live
//! member without partitions, and a member whose process hangs keeps its
//! partitions. So every few seconds the sink compares each partition's high
//! watermark with its group's committed offset. A partition is *stuck* when
//! records wait beyond the committed offset and that offset has not moved
//! for the bound (`stall_timeout_secs`); the sink is *stalled* while any
//! partition of its topics is stuck, whoever owns it (one it owns itself
//! counts only while it is idle: a batch that takes longer than the bound is
//! slow, not stalled).
//!
//! The remedies, a bound apart while the stall lasts: first leave the group
//! and join again as a new member, which makes the broker rebalance. If the
//! stall outlives that, the group does not form at all (tansu 0.6 keeps a
//! member that left while it led a join as the group's leader for good, so
//! no one is ever assigned anything): the sink then reads every partition
//! directly, outside the group, for a spell ([`FIRST_SPELL`], doubling up to
//! [`MAX_SPELL`] while the group keeps failing), and tries the group again
//! after each spell. Pure: no I/O here.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The least time a remedy gets to work: a new member may first wait for
/// the broker to drop members that died (their 10 s session) and rebalance.
const MIN_REMEDY_GAP: Duration = Duration::from_secs(20);
/// How long the sink first reads partitions directly before trying its group again.
const FIRST_SPELL: Duration = Duration::from_secs(300);
/// The longest spell of direct reading.
const MAX_SPELL: Duration = Duration::from_secs(3600);

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
    /// Whether this sink reads the partition (assigned, or read directly).
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

/// What to do about a stall now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Remedy {
    /// Nothing yet: the last remedy gets the bound to work.
    Wait,
    /// Leave the group and join it again as a new member.
    Rejoin,
    /// Leave the group and read every partition directly for this long.
    ReadDirectly(Duration),
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
        /// What to do now.
        remedy: Remedy,
    },
}

/// The sink's memory of its group's progress and of the remedies tried.
#[derive(Debug)]
pub(super) struct StallWatch {
    /// How long committed offsets may stand still while records wait.
    bound: Duration,
    /// Per partition: the committed offset last seen, and since when.
    seen: HashMap<(String, i32), (Option<i64>, Instant)>,
    /// When the sink last joined, rejoined, or changed how it reads.
    acted_at: Instant,
    /// Rejoins since the group last worked.
    rejoins: u32,
    /// Spells of direct reading since the group last worked.
    spells: u32,
    /// Since when the sink is stalled.
    stalled_since: Option<Instant>,
    /// Whether a committed offset moved since the last probe.
    moved: bool,
}

impl StallWatch {
    /// A watch for a member that joined at `now`.
    pub(super) fn new(bound: Duration, now: Instant) -> Self {
        Self {
            bound,
            seen: HashMap::new(),
            acted_at: now,
            rejoins: 0,
            spells: 0,
            stalled_since: None,
            moved: false,
        }
    }

    /// The rejoins and spells of direct reading since the group last worked.
    pub(super) fn escalation(&self) -> (u32, u32) {
        (self.rejoins, self.spells)
    }

    /// Go on from the rejoins and spells an earlier watch counted.
    pub(super) fn resume(&mut self, (rejoins, spells): (u32, u32)) {
        (self.rejoins, self.spells) = (rejoins, spells);
    }

    /// The sink committed `offset` (the next to read) on a partition itself:
    /// progress, even if a probe still reads the older committed offset.
    pub(super) fn committed(&mut self, topic: &str, partition: i32, offset: i64, now: Instant) {
        self.seen
            .insert((topic.to_owned(), partition), (Some(offset), now));
        self.moved = true;
    }

    /// The sink applied `remedy` at `now` (or joined its group again after a spell).
    pub(super) fn acted(&mut self, remedy: Remedy, now: Instant) {
        self.acted_at = now;
        match remedy {
            Remedy::Rejoin => self.rejoins += 1,
            Remedy::ReadDirectly(_) => self.spells += 1,
            Remedy::Wait => {}
        }
    }

    /// Take in a probe of every partition of the sink's topics at `now`.
    /// `idle`: the sink received no record since the last probe; `in_group`:
    /// it reads as a group member (not directly).
    pub(super) fn observe(
        &mut self,
        partitions: &[PartitionLag],
        idle: bool,
        in_group: bool,
        now: Instant,
    ) -> Verdict {
        let stuck = self.stuck(partitions, idle, now);
        let lag = partitions.iter().map(PartitionLag::lag).sum();
        // Evidence that the group works: offsets move, or it assigned partitions.
        let group_works = std::mem::take(&mut self.moved) || partitions.iter().any(|l| l.owned);
        if stuck == 0 {
            self.stalled_since = None;
            if in_group && group_works {
                (self.rejoins, self.spells) = (0, 0);
            }
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
            remedy: self.remedy(in_group, now),
        }
    }

    /// Update what is known of each partition's committed offset; how many are stuck.
    fn stuck(&mut self, partitions: &[PartitionLag], idle: bool, now: Instant) -> usize {
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
                known => {
                    self.moved |= known.is_some();
                    self.seen.insert(key, (l.committed, now));
                    now
                }
            };
            if l.lag() > 0 && now.duration_since(since) >= self.bound && (idle || !l.owned) {
                stuck += 1;
            }
        }
        stuck
    }

    /// The next remedy, a bound (at least [`MIN_REMEDY_GAP`]) after the last action.
    fn remedy(&self, in_group: bool, now: Instant) -> Remedy {
        if now.duration_since(self.acted_at) < self.bound.max(MIN_REMEDY_GAP) {
            return Remedy::Wait;
        }
        if in_group && self.rejoins == 0 && self.spells == 0 {
            return Remedy::Rejoin;
        }
        Remedy::ReadDirectly(spell(self.spells))
    }
}

/// How long spell number `n` (from 0) of direct reading lasts.
fn spell(n: u32) -> Duration {
    FIRST_SPELL.saturating_mul(1 << n.min(16)).min(MAX_SPELL)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUND: Duration = Duration::from_secs(20);

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

    fn remedy(v: &Verdict) -> Option<Remedy> {
        match v {
            Verdict::Stalled { remedy, .. } => Some(*remedy),
            _ => None,
        }
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
    fn a_stall_is_met_by_a_rejoin_then_by_reading_directly() {
        let t0 = Instant::now();
        let mut w = StallWatch::new(BOUND, t0);
        let stuck = [part(0, Some(10), 50), part(1, Some(5), 5)];
        assert_eq!(
            w.observe(&stuck, true, true, t0),
            Verdict::Behind { lag: 40 }
        );
        assert_eq!(
            w.observe(&stuck, true, true, at(t0, 19)),
            Verdict::Behind { lag: 40 }
        );
        assert_eq!(
            w.observe(&stuck, true, true, at(t0, 20)),
            Verdict::Stalled {
                lag: 40,
                stuck: 1,
                stalled_for: Duration::ZERO,
                remedy: Remedy::Rejoin
            }
        );
        w.acted(Remedy::Rejoin, at(t0, 20));
        let v = w.observe(&stuck, true, true, at(t0, 35));
        assert_eq!(
            remedy(&v),
            Some(Remedy::Wait),
            "the new member gets the bound"
        );
        assert!(
            matches!(v, Verdict::Stalled { stalled_for, .. } if stalled_for == Duration::from_secs(15))
        );
        let v = w.observe(&stuck, true, true, at(t0, 40));
        assert_eq!(remedy(&v), Some(Remedy::ReadDirectly(FIRST_SPELL)));
    }

    #[test]
    fn after_a_spell_a_group_that_still_fails_is_left_at_once_for_a_longer_spell() {
        let t0 = Instant::now();
        let mut w = StallWatch::new(BOUND, t0);
        w.acted(Remedy::Rejoin, t0);
        w.acted(Remedy::ReadDirectly(FIRST_SPELL), t0);
        // Reading directly drains the topic: caught up, but that says nothing of the group.
        assert_eq!(
            w.observe(&[part(0, Some(50), 50)], true, false, at(t0, 100)),
            Verdict::CaughtUp
        );
        // Back in the group (acted again), which still assigns nothing.
        w.acted(Remedy::Wait, at(t0, 300));
        let stuck = [part(0, Some(50), 80)];
        w.observe(&stuck, true, true, at(t0, 301));
        let v = w.observe(&stuck, true, true, at(t0, 321));
        assert_eq!(remedy(&v), Some(Remedy::ReadDirectly(FIRST_SPELL * 2)));
    }

    #[test]
    fn moving_committed_offsets_are_progress_and_end_the_remedies() {
        let t0 = Instant::now();
        let mut w = StallWatch::new(BOUND, t0);
        w.acted(Remedy::Rejoin, t0);
        for (i, committed) in [10, 20, 30, 40].into_iter().enumerate() {
            let v = w.observe(
                &[part(0, Some(committed), 100)],
                true,
                true,
                at(t0, 15 * i as u64),
            );
            assert!(matches!(v, Verdict::Behind { .. }), "{v:?}");
        }
        assert_eq!(w.rejoins, 0, "another member consumes: the group works");
        // The sink's own commit counts even when the probe reads the old offset.
        w.committed("t", 0, 50, at(t0, 60));
        let v = w.observe(&[part(0, Some(40), 100)], true, true, at(t0, 75));
        assert!(matches!(v, Verdict::Behind { .. }), "{v:?}");
        assert_eq!(
            w.observe(&[part(0, Some(100), 100)], true, true, at(t0, 500)),
            Verdict::CaughtUp
        );
    }

    #[test]
    fn a_partition_the_sink_owns_is_stuck_only_while_the_sink_is_idle() {
        let t0 = Instant::now();
        let mut w = StallWatch::new(BOUND, t0);
        let mine = [PartitionLag {
            owned: true,
            ..part(0, Some(10), 50)
        }];
        w.observe(&mine, false, true, t0);
        assert_eq!(
            w.observe(&mine, false, true, at(t0, 40)),
            Verdict::Behind { lag: 40 },
            "busy with a long batch"
        );
        assert!(matches!(
            w.observe(&mine, true, true, at(t0, 45)),
            Verdict::Stalled { .. }
        ));
    }

    #[test]
    fn spells_double_up_to_an_hour() {
        assert_eq!(spell(0), FIRST_SPELL);
        assert_eq!(spell(1), FIRST_SPELL * 2);
        assert_eq!(spell(3), FIRST_SPELL * 8);
        assert_eq!(spell(4), MAX_SPELL);
        assert_eq!(spell(40), MAX_SPELL);
    }
}
