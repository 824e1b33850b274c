//! Group commit of checkpoints: at most one synced checkpoint write is in
//! flight; acknowledged prefixes that complete meanwhile are merged into the
//! next one (the highest LSN, each table's latest copy progress). Many small
//! transactions then cost one fsync per write time, not one per batch, and
//! nothing waits longer than the write in flight.

use actix::Recipient;

use crate::checkpoint::TableProgress;
use crate::lsn::Lsn;
use crate::messages::{LsnPersisted, PersistLsn};

/// A checkpoint to write: the LSN, the progress, and who is told once it is durable.
pub(super) struct Pending {
    /// The LSN to store.
    pub lsn: Lsn,
    /// Copy progress to store with it.
    pub progress: Vec<TableProgress>,
    /// Told once it is durable.
    pub notify: Recipient<LsnPersisted>,
}

/// Whether a write is in flight, and the one waiting behind it.
#[derive(Default)]
pub(super) struct GroupCommit {
    in_flight: bool,
    waiting: Option<Pending>,
}

impl GroupCommit {
    /// Queue `next`; the write to send now, if none is in flight.
    pub(super) fn offer(&mut self, next: Pending) -> Option<Pending> {
        let next = match self.waiting.take() {
            Some(mut w) => {
                merge(&mut w, next);
                w
            }
            None => next,
        };
        if self.in_flight {
            self.waiting = Some(next);
            return None;
        }
        self.in_flight = true;
        Some(next)
    }

    /// The write in flight is done: the next write to send, if one waits.
    pub(super) fn done(&mut self) -> Option<Pending> {
        let next = self.waiting.take();
        self.in_flight = next.is_some();
        next
    }
}

/// `into` followed by `later`: the higher LSN, each table's later progress,
/// the later recipient (the open session's stream).
fn merge(into: &mut Pending, later: Pending) {
    into.lsn = into.lsn.max(later.lsn);
    for p in later.progress {
        match into
            .progress
            .iter_mut()
            .find(|q| (&q.schema, &q.name) == (&p.schema, &p.name))
        {
            Some(q) => *q = p,
            None => into.progress.push(p),
        }
    }
    into.notify = later.notify;
}

impl Pending {
    /// The checkpoint message.
    pub(super) fn message(self) -> PersistLsn {
        PersistLsn {
            lsn: self.lsn,
            progress: self.progress,
            notify: self.notify,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix::prelude::*;

    struct Sink;
    impl Actor for Sink {
        type Context = Context<Self>;
    }
    impl Handler<LsnPersisted> for Sink {
        type Result = ();
        fn handle(&mut self, _: LsnPersisted, _: &mut Self::Context) {}
    }

    fn pending(lsn: u64, rows: &[(&str, u64)], to: &Recipient<LsnPersisted>) -> Pending {
        let progress = rows
            .iter()
            .map(|(t, n)| TableProgress {
                rows: *n,
                ..TableProgress::fresh("public", t)
            })
            .collect();
        Pending {
            lsn: Lsn(lsn),
            progress,
            notify: to.clone(),
        }
    }

    #[actix::test]
    async fn writes_behind_the_one_in_flight_merge_into_one() {
        let to = Sink.start().recipient();
        let mut g = GroupCommit::default();
        assert_eq!(g.offer(pending(10, &[], &to)).map(|p| p.lsn), Some(Lsn(10)));
        assert!(g.offer(pending(20, &[("a", 1)], &to)).is_none());
        assert!(g.offer(pending(30, &[("a", 5), ("b", 2)], &to)).is_none());
        let next = g.done().unwrap();
        assert_eq!(next.lsn, Lsn(30));
        let rows: Vec<(String, u64)> = next
            .progress
            .iter()
            .map(|p| (p.name.clone(), p.rows))
            .collect();
        assert_eq!(rows, [("a".to_owned(), 5), ("b".to_owned(), 2)]);
        assert!(g.done().is_none(), "nothing waits behind the merged write");
        assert!(
            g.offer(pending(40, &[], &to)).is_some(),
            "idle again: sent at once"
        );
    }
}
