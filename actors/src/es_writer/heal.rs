//! Healing a broker that skips the rest of a record batch.
//!
//! tansu 0.6 answers a fetch that starts in the middle of a record batch with
//! the *next* batch, so a sink (re)starting at a committed offset inside a
//! batch silently misses that batch's remaining records. When the first
//! record of a partition after assignment is beyond the committed offset, the
//! sink seeks back, progressively earlier (committed − 1, − 2, − 4, … down to
//! 0), until the broker delivers a record at or before the committed offset;
//! what is below the committed offset is skipped, the rest is written.
//! Replays are harmless: documents are versioned by commit LSN. A gap that
//! is still there after a seek to 0 (retention deleted the records) is left
//! to the continuity check, which reports it. Pure: no I/O here.

use std::collections::HashMap;

/// A partition being read again from before its committed offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Healing {
    /// The group's committed offset: where reading must resume.
    committed: i64,
    /// Seeks made so far, minus one.
    attempt: u32,
}

/// What to do with one partition's records in a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Decision {
    /// Keep them all (the continuity check still looks for gaps).
    Keep,
    /// Drop them and seek the partition to this offset.
    Rewind(i64),
    /// Healed: drop the records below this (committed) offset, keep the rest.
    KeepFrom(i64),
    /// Sought back to 0 and the gap is still there: keep them; the
    /// continuity check reports the gap.
    GiveUp,
}

/// Partitions being healed since the last rebalance.
#[derive(Debug, Default)]
pub(super) struct Healer {
    healing: HashMap<(String, i32), Healing>,
}

impl Healer {
    /// Forget every partition (a rebalance: offsets are looked up again).
    pub(super) fn clear(&mut self) {
        self.healing.clear();
    }

    /// Stop healing one partition (a seek back failed): its gap is reported instead.
    pub(super) fn forget(&mut self, topic: &str, partition: i32) {
        self.healing.remove(&(topic.to_owned(), partition));
    }

    /// Whether no partition is being healed.
    pub(super) fn is_idle(&self) -> bool {
        self.healing.is_empty()
    }

    /// Decide for one partition whose first record in this batch is at
    /// `first`. `assigned_at` is the committed offset when this is the first
    /// record since the partition was assigned.
    pub(super) fn decide(
        &mut self,
        topic: &str,
        partition: i32,
        first: i64,
        assigned_at: Option<i64>,
    ) -> Decision {
        let key = (topic.to_owned(), partition);
        if let Some(h) = self.healing.get(&key).copied() {
            if first <= h.committed {
                self.healing.remove(&key);
                return Decision::KeepFrom(h.committed);
            }
            let attempt = h.attempt + 1;
            return match rewind_target(h.committed, attempt) {
                Some(to) => {
                    let committed = h.committed;
                    self.healing.insert(key, Healing { committed, attempt });
                    Decision::Rewind(to)
                }
                None => {
                    self.healing.remove(&key);
                    Decision::GiveUp
                }
            };
        }
        match assigned_at {
            Some(committed) if first > committed => match rewind_target(committed, 0) {
                Some(to) => {
                    let attempt = 0;
                    self.healing.insert(key, Healing { committed, attempt });
                    Decision::Rewind(to)
                }
                None => Decision::GiveUp,
            },
            _ => Decision::Keep,
        }
    }
}

/// How far before the committed offset try number `attempt` (from 0) seeks: 1, 2, 4, …
fn step_back(attempt: u32) -> i64 {
    1i64.checked_shl(attempt)
        .filter(|b| *b > 0)
        .unwrap_or(i64::MAX)
}

/// Where to seek on try `attempt` (from 0) to read a partition again from
/// before `committed`: committed − 1, − 2, − 4, …, clamped at 0; `None` once a
/// try already went to 0 (or there is nothing before `committed`).
pub(super) fn rewind_target(committed: i64, attempt: u32) -> Option<i64> {
    if committed <= 0 {
        return None;
    }
    if attempt > 0 && committed.saturating_sub(step_back(attempt - 1)) <= 0 {
        return None;
    }
    Some(committed.saturating_sub(step_back(attempt)).max(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeks_go_back_doubling_down_to_zero_then_stop() {
        let targets: Vec<i64> = (0..).map_while(|a| rewind_target(100, a)).collect();
        assert_eq!(targets, [99, 98, 96, 92, 84, 68, 36, 0]);
        assert_eq!(
            (0..).map_while(|a| rewind_target(1, a)).collect::<Vec<_>>(),
            [0]
        );
        assert_eq!(rewind_target(0, 0), None, "nothing before offset 0");
        assert_eq!(rewind_target(i64::MAX, 70), None, "no overflow");
        assert_eq!(rewind_target(i64::MAX, 62), Some(i64::MAX - (1 << 62)));
    }

    #[test]
    fn a_skipped_batch_is_read_again_from_the_committed_offset() {
        let mut h = Healer::default();
        // Committed at 100, the broker answered from 200 (the next batch).
        assert_eq!(h.decide("t", 0, 200, Some(100)), Decision::Rewind(99));
        assert!(!h.is_idle());
        // 99 is in the same batch: the broker skips again; go further back.
        assert_eq!(h.decide("t", 0, 200, None), Decision::Rewind(98));
        assert_eq!(h.decide("t", 0, 200, None), Decision::Rewind(96));
        // Now the broker delivers the batch: drop what is below 100.
        assert_eq!(h.decide("t", 0, 96, None), Decision::KeepFrom(100));
        assert!(h.is_idle());
        assert_eq!(h.decide("t", 0, 150, None), Decision::Keep, "healed");
    }

    #[test]
    fn records_at_the_committed_offset_need_no_healing() {
        let mut h = Healer::default();
        assert_eq!(h.decide("t", 0, 100, Some(100)), Decision::Keep);
        assert_eq!(h.decide("t", 1, 7, Some(10)), Decision::Keep, "a replay");
        assert_eq!(
            h.decide("t", 2, 500, None),
            Decision::Keep,
            "not just assigned"
        );
        assert!(h.is_idle());
    }

    #[test]
    fn a_gap_still_there_at_offset_zero_is_given_up() {
        let mut h = Healer::default();
        // Retention deleted 0..50: every seek lands on 50.
        let mut seeks = vec![];
        let mut decision = h.decide("t", 0, 50, Some(3));
        while let Decision::Rewind(to) = decision {
            seeks.push(to);
            decision = h.decide("t", 0, 50, None);
        }
        assert_eq!(seeks, [2, 1, 0]);
        assert_eq!(decision, Decision::GiveUp);
        assert!(h.is_idle());
        assert_eq!(h.decide("t", 0, 50, Some(0)), Decision::GiveUp);
    }

    #[test]
    fn partitions_heal_independently_and_a_rebalance_forgets() {
        let mut h = Healer::default();
        assert_eq!(h.decide("t", 0, 20, Some(10)), Decision::Rewind(9));
        assert_eq!(h.decide("u", 0, 20, Some(10)), Decision::Rewind(9));
        assert_eq!(h.decide("t", 0, 9, None), Decision::KeepFrom(10));
        assert!(!h.is_idle(), "u is still healing");
        h.forget("u", 0);
        assert!(h.is_idle());
        assert_eq!(h.decide("u", 0, 20, Some(10)), Decision::Rewind(9));
        h.clear();
        assert!(h.is_idle());
        assert_eq!(h.decide("u", 0, 20, None), Decision::Keep);
    }
}
