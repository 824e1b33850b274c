//! The sink's canary watch: the search stage of the freshness canary.
//!
//! The sink also reads the canary topic. A canary record lists the change
//! partitions' high watermarks at a moment every change before the canary
//! was in Kafka; the canary is searchable once each listed partition is
//! applied up to its offset (by this sink's own writes, seen at once, or by
//! the group's committed offsets, seen at each probe), plus the index
//! refresh interval. Records are checked (slot, signature) before they
//! count; a canary older than the newest one already counted, or written
//! before this sink started, is skipped: a record read again (a rebalance,
//! a seek back, a restart) must not be counted as fresh latency.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::Consumer;
use rdkafka::message::{Message, OwnedMessage};

use super::group::SinkConsumer;

use crate::canary::record::{CanaryRecord, Refused};
use crate::canary::{now_us, Stage};
use crate::metrics::metrics;
use crate::snapshot::watermark::MessageKey;

/// Elasticsearch's default `index.refresh_interval`: pgcdc does not change
/// it on the indices it creates, so a write is searchable at most this long
/// after its bulk request succeeded.
const REFRESH: Duration = Duration::from_secs(1);
/// Canaries waiting for their partitions, at most (the oldest is dropped).
const PENDING_MAX: usize = 256;

/// What the sink needs to read canary records.
pub struct CanaryWatch {
    /// The installation's message key (records are signed with it).
    pub key: MessageKey,
    /// The slot whose canaries count.
    pub slot: String,
    /// The canary topic.
    pub topic: String,
}

/// Canaries read and not yet searchable, oldest first.
#[derive(Default)]
pub(super) struct Pending(Vec<CanaryRecord>);

impl Pending {
    /// Keep `record` unless it is not newer than `newest_us` (counted, or
    /// from before the sink started) or already kept; whether it was kept.
    pub(super) fn offer(&mut self, record: CanaryRecord, newest_us: i64) -> bool {
        if record.t_us <= newest_us || self.0.iter().any(|r| r.t_us == record.t_us) {
            return false;
        }
        let at = self.0.partition_point(|r| r.t_us < record.t_us);
        self.0.insert(at, record);
        if self.0.len() > PENDING_MAX {
            self.0.remove(0);
        }
        true
    }

    /// Take the canaries that are applied, by `applied(topic, partition)`
    /// (the next offset to apply): the newest applied one and every older
    /// one (whatever came before it came before them too). Write times, oldest first.
    pub(super) fn take_applied(&mut self, applied: impl Fn(&str, i32) -> Option<i64>) -> Vec<i64> {
        let Some(newest) = self.0.iter().rposition(|r| r.applied_by(&applied)) else {
            return Vec::new();
        };
        self.0.drain(..=newest).map(|r| r.t_us).collect()
    }
}

/// The watch and its pending canaries, for one run of the sink.
pub(super) struct Canaries {
    watch: Arc<CanaryWatch>,
    pending: Pending,
    /// Whether this sink reads the canary partition (and so measures the stage).
    owned: bool,
}

impl Canaries {
    /// Watch for `watch`'s canaries; the search stage is measured once the
    /// sink reads the canary partition.
    pub(super) fn new(watch: Arc<CanaryWatch>) -> Self {
        metrics().freshness.unmeasure(Stage::Search);
        Self {
            watch,
            pending: Pending::default(),
            owned: false,
        }
    }

    /// Whether `consumer` is assigned the canary partition.
    pub(super) fn assigned(&self, consumer: &SinkConsumer) -> bool {
        consumer
            .assignment()
            .is_ok_and(|a| !a.elements_for_topic(&self.watch.topic).is_empty())
    }

    /// Whether the sink reads the canary partition now: the sink that does
    /// measures the search stage, from when it started reading it; the
    /// others export no search age (with several sinks in a group, one measures).
    pub(super) fn owned(&mut self, owned: bool) {
        if owned == self.owned {
            return;
        }
        self.owned = owned;
        let f = &metrics().freshness;
        match owned {
            true => f.measure(Stage::Search, now_us()),
            false => {
                // The next owner counts them.
                self.pending = Pending::default();
                f.unmeasure(Stage::Search)
            }
        }
        tracing::info!(topic = %self.watch.topic, owned, "es sink: the canary partition changed hands (the owner measures search freshness)");
    }

    /// Whether `topic` is the canary topic.
    pub(super) fn is_canary(&self, topic: &str) -> bool {
        topic == self.watch.topic
    }

    /// Keep the genuine, new canary records of `batch`.
    pub(super) fn read(&mut self, batch: &[OwnedMessage]) {
        if batch.iter().any(|m| self.is_canary(m.topic())) {
            self.owned(true);
        }
        let newest = metrics().freshness.newest(Stage::Search);
        let w = &self.watch;
        for msg in batch.iter().filter(|m| m.topic() == w.topic) {
            match CanaryRecord::read(msg.payload().unwrap_or_default(), &w.key, &w.slot) {
                Ok(r) => {
                    self.pending.offer(r, newest);
                }
                Err(Refused::OtherSlot) => {}
                Err(why) => {
                    metrics().forged_messages.inc();
                    tracing::warn!(topic = %w.topic, offset = msg.offset(), why = %why, "ignoring a canary record");
                }
            }
        }
    }

    /// Count the canaries now applied as searchable.
    pub(super) fn observe(&mut self, applied: impl Fn(&str, i32) -> Option<i64>) {
        let now = now_us();
        for t_us in self.pending.take_applied(applied) {
            metrics()
                .freshness
                .reached(Stage::Search, t_us, now, REFRESH);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::canary::record::Offsets;
    use crate::lsn::Lsn;

    fn canary(key: &MessageKey, t_us: i64, next: i64) -> CanaryRecord {
        let mut offsets = Offsets::new();
        offsets.entry("t".into()).or_default().insert(0, next);
        CanaryRecord::signed(key, "s", (t_us, Lsn(1)), offsets)
    }

    #[test]
    fn canaries_read_again_or_older_than_the_newest_counted_are_skipped() {
        let key = MessageKey::random().unwrap();
        let mut p = Pending::default();
        assert!(
            !p.offer(canary(&key, 5, 1), 5),
            "not newer than the newest counted"
        );
        assert!(p.offer(canary(&key, 20, 4), 5));
        assert!(p.offer(canary(&key, 10, 2), 5), "kept in write order");
        assert!(!p.offer(canary(&key, 10, 2), 5), "read twice, kept once");
        assert_eq!(p.take_applied(|_, _| Some(1)), Vec::<i64>::new());
        assert_eq!(p.take_applied(|_, _| Some(2)), vec![10]);
        assert_eq!(p.take_applied(|_, _| Some(9)), vec![20]);
        assert!(p.0.is_empty());
    }

    #[test]
    fn a_newer_applied_canary_takes_the_older_ones_with_it() {
        let key = MessageKey::random().unwrap();
        let mut p = Pending::default();
        let mut older = canary(&key, 10, 2);
        older.offsets.entry("gone".into()).or_default().insert(0, 1);
        p.offer(older, 0);
        p.offer(canary(&key, 20, 3), 0);
        let applied = |t: &str, _| (t == "t").then_some(3);
        assert_eq!(p.take_applied(applied), vec![10, 20]);
    }
}
