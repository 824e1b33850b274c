//! The offset-continuity check: every record of a partition must follow the
//! previous one, and the first after a (re)assignment must be at the group's
//! committed offset, or at offset 0 where the group has committed none (a
//! new group, or one whose offsets expired: records before the first one
//! delivered were deleted before the group read them). pgcdc's topics have
//! no gaps (no transactions, no compaction unless the operator set it), and
//! the canary topic is not checked. A jump means records were never
//! delivered: deleted by retention before the sink read them, compacted away,
//! or skipped by the broker (tansu 0.6 answers a fetch from the middle of a
//! record batch with the next batch). A jump at the first record after an
//! assignment is healed by seeking back (see `heal`); a jump that cannot be
//! healed means the mirror may miss changes, so it is logged as an error and
//! counted, and the sink fills the mirrors of the topic's tables again from
//! PostgreSQL (see `alias`).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};

use super::context::SinkContext;
use super::error::EsError;
use super::heal::{Decision, Healer};

/// Longest wait for the group's committed offsets; past it the batch is
/// written unchecked (the check is a diagnostic, not a gate).
const COMMITTED_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for a seek back to be accepted; past it the gap is reported
/// instead of healed.
const SEEK_TIMEOUT: Duration = Duration::from_secs(5);

/// A partition's committed offset, looked up when it was (re)assigned.
type Assigned = (String, i32, i64);

/// What the check knows of each partition since the last rebalance.
#[derive(Default)]
pub(super) struct Continuity {
    /// The canary topic, whose gaps cost no change: not checked.
    canary: Option<String>,
    /// The offset each partition's next record must have.
    next: NextOffsets,
    /// The rebalance count `next` belongs to.
    rebalances: u64,
    /// Partitions being read again after the broker skipped records.
    healer: Healer,
}

impl Continuity {
    /// A check of every topic but the `canary` topic.
    pub(super) fn new(canary: Option<&str>) -> Self {
        Self {
            canary: canary.map(str::to_owned),
            ..Self::default()
        }
    }

    /// Check `batch` against what came before: heal skips at the start of a
    /// partition (dropping records from `batch` and seeking back), then log
    /// and count every gap left; the topics with such gaps.
    pub(super) async fn check(
        &mut self,
        consumer: &Arc<StreamConsumer<SinkContext>>,
        batch: &mut Vec<OwnedMessage>,
    ) -> Vec<String> {
        let rebalances = consumer.context().rebalances();
        if rebalances != self.rebalances {
            self.next.clear();
            self.healer.clear();
            self.rebalances = rebalances;
        }
        let assigned = self.learn_committed(consumer, batch).await;
        self.heal(consumer, batch, &assigned).await;
        self.report_gaps(batch)
    }

    /// Decide for every partition that was just assigned or is being healed;
    /// seek back and drop the records that are to be read again.
    async fn heal(
        &mut self,
        consumer: &Arc<StreamConsumer<SinkContext>>,
        batch: &mut Vec<OwnedMessage>,
        assigned: &[Assigned],
    ) {
        if assigned.is_empty() && self.healer.is_idle() {
            return;
        }
        let mut decisions = self.decide(batch, assigned);
        for (topic, partition, decision) in &mut decisions {
            if let Decision::Rewind(to) = *decision {
                if let Err(e) = seek(consumer, topic.clone(), *partition, to).await {
                    // Keep the records: the gap is reported, as without healing.
                    tracing::warn!(topic = %topic, partition = *partition, error = %e, "es sink: cannot seek back; reporting the gap instead");
                    self.healer.forget(topic, *partition);
                    *decision = Decision::GiveUp;
                }
            }
        }
        batch.retain(|m| {
            let decision = decisions
                .iter()
                .find(|d| (d.0.as_str(), d.1) == (m.topic(), m.partition()));
            match decision.map(|d| d.2) {
                Some(Decision::Rewind(_)) => false,
                Some(Decision::KeepFrom(committed)) => m.offset() >= committed,
                _ => true,
            }
        });
    }

    /// The healer's decision for each partition of `batch`, by its first
    /// record; partitions whose records are all kept are left out.
    fn decide(
        &mut self,
        batch: &[OwnedMessage],
        assigned: &[Assigned],
    ) -> Vec<(String, i32, Decision)> {
        let mut firsts: Vec<(&str, i32, i64)> = Vec::new();
        for m in batch {
            if !firsts
                .iter()
                .any(|f| (f.0, f.1) == (m.topic(), m.partition()))
            {
                firsts.push((m.topic(), m.partition(), m.offset()));
            }
        }
        let mut decisions = Vec::new();
        for (topic, partition, first) in firsts {
            let at = assigned
                .iter()
                .find(|a| (a.0.as_str(), a.1) == (topic, partition))
                .map(|a| a.2);
            let decision = self.healer.decide(topic, partition, first, at);
            log_decision(topic, partition, first, decision);
            if !matches!(decision, Decision::Keep | Decision::GiveUp) {
                decisions.push((topic.to_owned(), partition, decision));
            }
        }
        decisions
    }

    /// Log and count the gaps in `batch`; the topics they are in.
    fn report_gaps(&mut self, batch: &[OwnedMessage]) -> Vec<String> {
        let canary = self.canary.as_deref();
        let at = batch
            .iter()
            .filter(|m| Some(m.topic()) != canary)
            .map(|m| (m.topic(), m.partition(), m.offset()));
        let gaps = skipped_offsets(&mut self.next, at);
        for g in &gaps {
            crate::metrics::metrics()
                .es_skipped_offsets
                .inc_by(g.skipped() as u64);
            tracing::error!(
                topic = g.topic,
                partition = g.partition,
                expected = g.expected,
                got = g.got,
                skipped = g.skipped(),
                "es sink: kafka skipped offsets; the mirror may miss changes: every mirror of the topic's tables is filled again from PostgreSQL"
            );
        }
        gaps.into_iter().map(|g| g.topic).collect()
    }

    /// Look up the committed offset of every partition of `batch` not seen
    /// since the last rebalance; those found.
    async fn learn_committed(
        &mut self,
        consumer: &Arc<StreamConsumer<SinkContext>>,
        batch: &[OwnedMessage],
    ) -> Vec<Assigned> {
        let canary = self.canary.as_deref();
        let unseen: HashSet<(&str, i32)> = batch
            .iter()
            .filter(|m| Some(m.topic()) != canary)
            .map(|m| (m.topic(), m.partition()))
            .filter(|&(topic, partition)| {
                self.next
                    .get(topic)
                    .is_none_or(|parts| !parts.contains_key(&partition))
            })
            .collect();
        if unseen.is_empty() {
            return Vec::new();
        }
        let mut tpl = TopicPartitionList::new();
        for (topic, partition) in &unseen {
            tpl.add_partition(topic, *partition);
        }
        let consumer = consumer.clone();
        let committed =
            tokio::task::spawn_blocking(move || consumer.committed_offsets(tpl, COMMITTED_TIMEOUT))
                .await;
        let mut assigned = Vec::new();
        match committed {
            Ok(Ok(tpl)) => {
                for e in tpl.elements() {
                    let committed = match e.offset() {
                        Offset::Offset(o) => Some(o),
                        // None committed: reading starts at the earliest
                        // record, which must be the partition's first.
                        Offset::Invalid => Some(0),
                        _ => None,
                    };
                    if let Some(o) = committed {
                        self.next
                            .entry(e.topic().to_owned())
                            .or_default()
                            .insert(e.partition(), o);
                        assigned.push((e.topic().to_owned(), e.partition(), o));
                    }
                }
            }
            // Unchecked this time; the records themselves are still written.
            other => tracing::debug!(?other, "es sink: no committed offsets to check against"),
        }
        assigned
    }
}

/// One line per healing step (a gap given up on is reported by the gap check).
fn log_decision(topic: &str, partition: i32, first: i64, decision: Decision) {
    match decision {
        Decision::Rewind(to) => tracing::warn!(
            topic,
            partition,
            got = first,
            seek_to = to,
            "es sink: the broker skipped records after the committed offset; seeking back to read them"
        ),
        Decision::KeepFrom(committed) => tracing::info!(
            topic,
            partition,
            committed,
            got = first,
            "es sink: reading from the committed offset again after the broker skipped records"
        ),
        Decision::Keep | Decision::GiveUp => {}
    }
}

/// Move `partition`'s fetch position to `offset` (records fetched before are discarded).
async fn seek(
    consumer: &Arc<StreamConsumer<SinkContext>>,
    topic: String,
    partition: i32,
    offset: i64,
) -> Result<(), EsError> {
    let consumer = consumer.clone();
    tokio::task::spawn_blocking(move || {
        consumer.seek(&topic, partition, Offset::Offset(offset), SEEK_TIMEOUT)
    })
    .await
    .map_err(|_| EsError::Kafka(rdkafka::error::KafkaError::Canceled))??;
    Ok(())
}

/// A jump in one partition's offsets.
#[derive(Debug, PartialEq, Eq)]
struct Gap {
    topic: String,
    partition: i32,
    expected: i64,
    got: i64,
}

impl Gap {
    fn skipped(&self) -> i64 {
        self.got - self.expected
    }
}

/// Topic → partition → the offset its next record must have. Keyed by topic
/// first so a record is looked up by `&str`, without allocating.
type NextOffsets = HashMap<String, HashMap<i32, i64>>;

/// Walk `(topic, partition, offset)`s in delivery order against `next` and
/// update it. A record later than expected is a gap; an earlier one is a
/// re-delivery (no gap); a partition `next` does not know is taken as it comes.
fn skipped_offsets<'a>(
    next: &mut NextOffsets,
    at: impl IntoIterator<Item = (&'a str, i32, i64)>,
) -> Vec<Gap> {
    let mut gaps = Vec::new();
    for (topic, partition, offset) in at {
        if !next.contains_key(topic) {
            next.insert(topic.to_owned(), HashMap::new());
        }
        let Some(parts) = next.get_mut(topic) else {
            continue;
        };
        if let Some(&expected) = parts.get(&partition) {
            if offset > expected {
                gaps.push(Gap {
                    topic: topic.to_owned(),
                    partition,
                    expected,
                    got: offset,
                });
            }
        }
        parts.insert(partition, offset + 1);
    }
    gaps
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_forward_jumps_in_one_partition_are_gaps() {
        let mut next = NextOffsets::new();
        next.entry("t".to_owned()).or_default().insert(0, 10);
        let at = [
            ("t", 0, 10),
            ("t", 0, 11),
            ("t", 1, 500), // unknown partition: taken as it comes
            ("t", 1, 501),
            ("t", 0, 15), // 12..=14 never delivered
            ("t", 0, 3),  // re-delivery after a rebalance
            ("t", 0, 4),
            ("t", 1, 503), // 502 never delivered
        ];
        let gaps = skipped_offsets(&mut next, at);
        let g = |partition, expected, got| Gap {
            topic: "t".into(),
            partition,
            expected,
            got,
        };
        assert_eq!(gaps, vec![g(0, 12, 15), g(1, 502, 503)]);
        assert_eq!(gaps[0].skipped(), 3);
        assert_eq!(next["t"][&0], 5);
        assert_eq!(next["t"][&1], 504);
    }
}
