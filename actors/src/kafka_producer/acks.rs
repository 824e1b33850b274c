//! The acknowledgement prefix: the heart of "never confirm ahead of Kafka".
//!
//! Batches of one session are tracked in session order. A batch is *done*
//! when every one of its records is acknowledged; only a done *prefix* is
//! released, and the checkpoint moves to the last `commit_end` in it. A batch
//! acknowledged before an earlier one waits for it; once a batch failed, the
//! session is broken and nothing after it is ever released. Pure: no I/O, no
//! actor, so every ordering can be tested directly.

use std::collections::VecDeque;

use crate::lsn::Lsn;
use crate::messages::TableProgress;

/// Events per (`schema.table`, op) of one batch, counted out once released.
pub type EventCounts = Vec<((String, &'static str), u64)>;

/// One published batch awaiting acknowledgement.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingBatch {
    /// Position in the session.
    pub seq: u64,
    /// The commit end LSN this batch completes, if any.
    pub commit_end: Option<Lsn>,
    /// Copy progress checkpointed with `commit_end`.
    pub progress: Vec<TableProgress>,
    /// Events per table and op, for the metrics.
    pub counts: EventCounts,
    /// Kafka records in the batch.
    pub records: usize,
}

/// What to checkpoint once a prefix is done.
#[derive(Debug, Clone, PartialEq)]
pub struct Persist {
    /// The last commit end LSN of the released prefix.
    pub lsn: Lsn,
    /// The newest progress of each table in the prefix.
    pub progress: Vec<TableProgress>,
}

/// What one acknowledgement released.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Released {
    /// Event counts of every released batch.
    pub counts: Vec<EventCounts>,
    /// What to checkpoint; `None` when the prefix holds no commit end.
    pub persist: Option<Persist>,
}

/// The batches of one session in flight, in session order.
#[derive(Debug, Default)]
pub struct AckPrefix {
    batches: VecDeque<(PendingBatch, bool)>,
    records: usize,
    broken: bool,
}

impl AckPrefix {
    /// Track a newly published batch (the next of the session).
    pub fn push(&mut self, batch: PendingBatch) {
        if self.broken {
            return;
        }
        self.records += batch.records;
        self.batches.push_back((batch, false));
    }

    /// Batch `seq` is fully acknowledged: release the done prefix, if any.
    pub fn acked(&mut self, seq: u64) -> Released {
        let mut released = Released::default();
        let Some(front) = self.batches.front().map(|(b, _)| b.seq) else {
            return released;
        };
        let Some((_, done)) = seq
            .checked_sub(front)
            .and_then(|i| self.batches.get_mut(i as usize))
        else {
            return released;
        };
        *done = true;
        let mut lsn = None;
        let mut progress: Vec<TableProgress> = Vec::new();
        while self.batches.front().is_some_and(|(_, done)| *done) {
            let Some((b, _)) = self.batches.pop_front() else {
                break;
            };
            self.records -= b.records;
            released.counts.push(b.counts);
            lsn = b.commit_end.or(lsn);
            for p in b.progress {
                progress.retain(|q| (&q.schema, &q.name) != (&p.schema, &p.name));
                progress.push(p);
            }
        }
        released.persist = lsn.map(|lsn| Persist { lsn, progress });
        released
    }

    /// A batch failed: the session is broken, nothing still in flight (before
    /// or after it) will be released.
    pub fn fail(&mut self) {
        self.clear();
        self.broken = true;
    }

    /// Forget everything (a new session starts).
    pub fn clear(&mut self) {
        self.batches.clear();
        self.records = 0;
        self.broken = false;
    }

    /// Records published and not yet released.
    pub fn records(&self) -> usize {
        self.records
    }

    /// Whether nothing is in flight.
    pub fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(seq: u64, commit_end: Option<u64>) -> PendingBatch {
        PendingBatch {
            seq,
            commit_end: commit_end.map(Lsn),
            progress: vec![],
            counts: vec![(("public.t".into(), "c"), seq + 1)],
            records: 2,
        }
    }

    fn persisted(r: &Released) -> Option<Lsn> {
        r.persist.as_ref().map(|p| p.lsn)
    }

    #[test]
    fn batches_acknowledged_in_order_release_one_by_one() {
        let mut acks = AckPrefix::default();
        acks.push(batch(0, Some(10)));
        acks.push(batch(1, None));
        acks.push(batch(2, Some(30)));
        assert_eq!(acks.records(), 6);
        assert_eq!(persisted(&acks.acked(0)), Some(Lsn(10)));
        let r = acks.acked(1);
        assert_eq!(
            (persisted(&r), r.counts.len()),
            (None, 1),
            "no commit end in it"
        );
        assert_eq!(persisted(&acks.acked(2)), Some(Lsn(30)));
        assert!(acks.is_empty());
        assert_eq!(acks.records(), 0);
    }

    #[test]
    fn a_later_batch_acknowledged_first_waits_for_the_earlier_one() {
        let mut acks = AckPrefix::default();
        acks.push(batch(0, Some(10)));
        acks.push(batch(1, Some(20)));
        let early = acks.acked(1);
        assert_eq!(early, Released::default(), "nothing may be persisted yet");
        assert_eq!(acks.records(), 4);
        let both = acks.acked(0);
        assert_eq!(
            persisted(&both),
            Some(Lsn(20)),
            "both at once, up to the later LSN"
        );
        assert_eq!(both.counts.len(), 2);
        assert!(acks.is_empty());
    }

    #[test]
    fn nothing_past_a_failed_batch_is_ever_persisted() {
        let mut acks = AckPrefix::default();
        acks.push(batch(0, Some(10)));
        acks.push(batch(1, Some(20)));
        acks.push(batch(2, Some(30)));
        assert_eq!(acks.acked(2), Released::default());
        // Batch 1 fails after the later batch 2 succeeded.
        acks.fail();
        assert!(acks.is_empty());
        assert_eq!(acks.records(), 0);
        // Late reports of the broken session release nothing, nor do new pushes.
        for seq in [0, 1, 2] {
            assert_eq!(acks.acked(seq), Released::default(), "seq {seq}");
        }
        acks.push(batch(3, Some(40)));
        assert_eq!(acks.acked(3), Released::default());
        // A new session starts clean.
        acks.clear();
        acks.push(batch(0, Some(50)));
        assert_eq!(persisted(&acks.acked(0)), Some(Lsn(50)));
    }

    #[test]
    fn the_newest_progress_of_each_table_is_persisted() {
        let progress = |rows| TableProgress {
            rows,
            ..TableProgress::fresh("public", "t")
        };
        let mut acks = AckPrefix::default();
        let mut a = batch(0, None);
        a.progress = vec![progress(1)];
        let mut b = batch(1, Some(20));
        b.progress = vec![progress(2), TableProgress::fresh("public", "u")];
        acks.push(a);
        acks.push(b);
        acks.acked(1);
        let p = acks.acked(0).persist.expect("a checkpoint");
        assert_eq!(
            p.progress,
            vec![progress(2), TableProgress::fresh("public", "u")]
        );
    }

    #[test]
    fn unknown_or_repeated_acknowledgements_are_ignored() {
        let mut acks = AckPrefix::default();
        assert_eq!(acks.acked(0), Released::default());
        acks.push(batch(5, Some(10)));
        assert_eq!(acks.acked(4), Released::default(), "before the front");
        assert_eq!(acks.acked(9), Released::default(), "never published");
        assert_eq!(persisted(&acks.acked(5)), Some(Lsn(10)));
        assert_eq!(acks.acked(5), Released::default(), "already released");
    }
}
