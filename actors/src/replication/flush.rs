//! What the stream tells PostgreSQL, and when: a pure policy, no I/O.
//!
//! - **Flushed LSN.** Only an LSN the checkpoint actor reported persisted
//!   ([`FlushPolicy::persisted`]) is handed to the replication client, which
//!   sends it in its standby status updates and keepalive answers. It only
//!   moves forward: acknowledgements that arrive late or out of order never
//!   take it back ([`raise`]).
//! - **Position markers.** A batch with no events but a commit LSN moves the
//!   checkpoint across WAL pgcdc does not publish (empty transactions,
//!   heartbeats, other databases' traffic seen as keepalives). A keepalive
//!   position is published only when nothing is pending (no open
//!   transaction, no unsent events), and markers without data go out at most
//!   once per [`MARKER_EVERY`].
//! - **Lag.** Published commits are remembered (up to [`LAG_COMMITS_MAX`])
//!   until confirmed, for the commit-time lag metric.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::lsn::Lsn;

/// Least time between two position markers that carry no data, so an idle
/// or busy-elsewhere server costs at most one tiny batch a second.
pub(super) const MARKER_EVERY: Duration = Duration::from_secs(1);
/// Most published-but-unconfirmed commits remembered for the lag metric;
/// beyond it the metric skips commits instead of growing memory.
pub(super) const LAG_COMMITS_MAX: usize = 100_000;

/// Raise `current` to `lsn` if that is newer; `true` if it moved. The one
/// rule for every "confirmed" position: never backwards.
pub(super) fn raise(current: &mut Lsn, lsn: Lsn) -> bool {
    let newer = lsn > *current;
    if newer {
        *current = lsn;
    }
    newer
}

/// A newly confirmed position: report `lsn` as flushed; `commit_time_us` is
/// the commit time of the last published commit it covers (for the lag).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Confirmed {
    /// The LSN to report as flushed.
    pub lsn: Lsn,
    /// Unix µs of the newest published commit at or before `lsn`, if any.
    pub commit_time_us: Option<i64>,
}

/// The flush/marker policy of one stream session.
#[derive(Debug)]
pub(super) struct FlushPolicy {
    /// The last LSN reported as flushed.
    reported: Lsn,
    /// The last position handed to the producer as a commit (LSN, when).
    last_marker: (Lsn, Instant),
    /// Published commits not yet confirmed: (end LSN, commit time µs).
    commits: VecDeque<(Lsn, i64)>,
}

impl FlushPolicy {
    /// A session whose published position starts at `start`, at `now`.
    pub fn new(start: Lsn, now: Instant) -> Self {
        Self {
            reported: Lsn::ZERO,
            last_marker: (start, now),
            commits: VecDeque::new(),
        }
    }

    /// The last position handed to the producer as a commit.
    pub fn position(&self) -> Lsn {
        self.last_marker.0
    }

    /// A batch carrying commit position `lsn` was handed to the producer.
    pub fn published(&mut self, lsn: Lsn, now: Instant) {
        self.last_marker = (lsn, now);
    }

    /// A transaction committed at `end` (Unix µs `commit_time_us`); `empty`
    /// if it published nothing. Returns whether to publish its position now.
    pub fn committed(&mut self, end: Lsn, commit_time_us: i64, empty: bool, now: Instant) -> bool {
        if self.commits.len() < LAG_COMMITS_MAX {
            self.commits.push_back((end, commit_time_us));
        }
        !empty || self.marker_due(now)
    }

    /// The server is at `wal_end`; `idle` if no transaction is open and no
    /// event waits to be sent. Returns the position to publish, if any.
    pub fn keepalive(&self, wal_end: Lsn, idle: bool, now: Instant) -> Option<Lsn> {
        (idle && wal_end > self.last_marker.0 && self.marker_due(now)).then_some(wal_end)
    }

    /// The checkpoint persisted `lsn`. Returns what to report, or `None` if
    /// it is not newer than what was reported already.
    pub fn persisted(&mut self, lsn: Lsn) -> Option<Confirmed> {
        if !raise(&mut self.reported, lsn) {
            return None;
        }
        let mut commit_time_us = None;
        while self.commits.front().is_some_and(|(end, _)| *end <= lsn) {
            commit_time_us = self.commits.pop_front().map(|(_, t)| t);
        }
        Some(Confirmed {
            lsn,
            commit_time_us,
        })
    }

    /// Whether a marker without data may go out now.
    fn marker_due(&self, now: Instant) -> bool {
        now.duration_since(self.last_marker.1) >= MARKER_EVERY
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(start: u64) -> (FlushPolicy, Instant) {
        let t0 = Instant::now();
        (FlushPolicy::new(Lsn(start), t0), t0)
    }

    #[test]
    fn an_lsn_is_reported_only_once_persisted() {
        let (mut p, t0) = policy(100);
        assert!(p.committed(Lsn(200), 7, false, t0));
        p.published(Lsn(200), t0);
        assert_eq!(p.position(), Lsn(200));
        // Published is not persisted: nothing to report until the checkpoint says so.
        assert_eq!(p.reported, Lsn::ZERO);
        let c = p
            .persisted(Lsn(200))
            .expect("a newer persisted lsn is reported");
        assert_eq!(c.lsn, Lsn(200));
        assert_eq!(c.commit_time_us, Some(7));
        assert_eq!(p.reported, Lsn(200));
    }

    #[test]
    fn the_reported_lsn_never_moves_backwards() {
        let (mut p, _) = policy(100);
        assert_eq!(p.persisted(Lsn(300)).map(|c| c.lsn), Some(Lsn(300)));
        assert_eq!(p.persisted(Lsn(200)), None);
        assert_eq!(p.persisted(Lsn(300)), None);
        assert_eq!(p.reported, Lsn(300));
        let mut watched = Lsn(300);
        assert!(!raise(&mut watched, Lsn(299)));
        assert_eq!(watched, Lsn(300));
        assert!(raise(&mut watched, Lsn(301)));
        assert_eq!(watched, Lsn(301));
    }

    #[test]
    fn acknowledgements_out_of_order_confirm_each_commit_once() {
        let (mut p, t0) = policy(0);
        for (end, time) in [(10, 1), (20, 2), (30, 3)] {
            p.committed(Lsn(end), time, false, t0);
        }
        // The ack for 30 overtakes the one for 20.
        let c = p.persisted(Lsn(30)).expect("newer");
        assert_eq!((c.lsn, c.commit_time_us), (Lsn(30), Some(3)));
        assert_eq!(
            p.persisted(Lsn(20)),
            None,
            "a late ack must not report 20 after 30"
        );
        assert_eq!(p.persisted(Lsn(10)), None);
        p.committed(Lsn(40), 4, false, t0);
        let c = p.persisted(Lsn(40)).expect("newer");
        assert_eq!((c.lsn, c.commit_time_us), (Lsn(40), Some(4)));
        // A confirmation between commits covers only the commits at or before it.
        p.committed(Lsn(50), 5, false, t0);
        p.committed(Lsn(60), 6, false, t0);
        let c = p.persisted(Lsn(55)).expect("newer");
        assert_eq!(c.commit_time_us, Some(5));
        let c = p.persisted(Lsn(56)).expect("newer");
        assert_eq!(c.commit_time_us, None, "no further commit is covered");
    }

    #[test]
    fn a_keepalive_position_is_published_only_when_nothing_is_pending() {
        let (p, t0) = policy(100);
        let later = t0 + MARKER_EVERY;
        assert_eq!(p.keepalive(Lsn(500), false, later), None, "work pending");
        assert_eq!(p.keepalive(Lsn(500), true, later), Some(Lsn(500)));
        assert_eq!(
            p.keepalive(Lsn(100), true, later),
            None,
            "not past the position"
        );
        assert_eq!(
            p.keepalive(Lsn(50), true, later),
            None,
            "behind the position"
        );
    }

    #[test]
    fn markers_without_data_go_out_at_most_once_per_interval() {
        let (mut p, t0) = policy(100);
        let soon = t0 + MARKER_EVERY / 2;
        assert_eq!(p.keepalive(Lsn(500), true, soon), None);
        assert!(
            !p.committed(Lsn(150), 0, true, soon),
            "an empty commit waits"
        );
        assert!(
            p.committed(Lsn(160), 0, false, soon),
            "a commit with events goes now"
        );
        p.published(Lsn(160), soon);
        let later = soon + MARKER_EVERY;
        assert!(p.committed(Lsn(170), 0, true, later));
        assert_eq!(p.keepalive(Lsn(500), true, later), Some(Lsn(500)));
    }

    #[test]
    fn lag_bookkeeping_is_bounded() {
        let (mut p, t0) = policy(0);
        for i in 0..(LAG_COMMITS_MAX as u64 + 10) {
            p.committed(Lsn(i + 1), 0, false, t0);
        }
        assert_eq!(p.commits.len(), LAG_COMMITS_MAX);
    }
}
