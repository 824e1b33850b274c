//! The partition of each change record, pinned to the partition count each
//! change topic had when pgcdc first wrote to it.
//!
//! Kafka keeps one row's records in order only while they share a
//! partition, and the Java partitioner (`murmur2(key) % partitions`) moves
//! most keys when partitions are added. Adding partitions to a change topic
//! would then put a row's newer records on another partition than its
//! older ones: consumers could apply them out of order, and a compacted
//! topic would keep the older value next to the newer one, or a deleted
//! row's last value next to its tombstone, for good. So pgcdc stores each
//! change topic's partition count in the checkpoint the first time it sees
//! the topic, and computes every record's partition over that count: a
//! row's records stay on the partition they always had, and partitions
//! added later stay unused by change records, which is said at every start
//! and within 10 s while streaming (WARN, `pgcdc_kafka_partitions_added`).
//!
//! Pinning needs the partitioner pgcdc computes: the Java client's murmur2
//! (`murmur2_random`, the default, or `murmur2`). With another `partitioner`
//! in `[kafka.properties]` librdkafka places records, and an added
//! partition is warned about as keys having moved.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLock};

use actix::Addr;

use crate::checkpoint::{CheckpointActor, CheckpointError};
use crate::messages::{PartitionPin, PinPartitions};

/// Partitioners whose placement of a keyed record pgcdc computes itself.
const JAVA_PARTITIONERS: [&str; 2] = ["murmur2_random", "murmur2"];

/// Kafka's murmur2 as the Java client defines it (`Utils.murmur2`): seed
/// 0x9747b28c, m 0x5bd1e995, r 24, little-endian 4-byte blocks.
pub fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h = SEED ^ data.len() as u32;
    let blocks = data.chunks_exact(4);
    let tail = blocks.remainder();
    for b in blocks {
        let mut k = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M) ^ k;
    }
    if !tail.is_empty() {
        for (i, byte) in tail.iter().enumerate().rev() {
            h ^= u32::from(*byte) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^ (h >> 15)
}

/// The Java client's partition of `key` among `partitions`: the positive
/// part of murmur2 modulo the count.
pub fn java_partition(key: &[u8], partitions: u32) -> i32 {
    ((murmur2(key) & 0x7fff_ffff) % partitions.max(1)) as i32
}

/// The partition counts change records are spread over, per topic.
pub type Pins = Arc<HashMap<String, i32>>;

/// The pinned partition counts of the change topics, shared by the producer
/// (which reads them once per batch) and the watch that updates them.
#[derive(Default)]
pub struct Partitioning {
    /// Whether pgcdc computes partitions (the Java partitioner is used).
    computes: bool,
    pins: RwLock<Pins>,
    /// Spreads keyless records (truncates) over the pinned partitions.
    next: AtomicU32,
}

impl Partitioning {
    /// Partitioning for a producer whose `partitioner` property is
    /// `partitioner` (`None`: pgcdc's default, the Java one).
    pub fn new(partitioner: Option<&str>) -> Arc<Self> {
        let computes = partitioner.is_none_or(|p| JAVA_PARTITIONERS.contains(&p.trim()));
        Arc::new(Self {
            computes,
            ..Self::default()
        })
    }

    /// Pin `topic`'s change records to its first `partitions` partitions.
    pub fn pin(&self, topic: &str, partitions: i32) {
        if !self.computes || partitions < 1 {
            return;
        }
        if let Ok(mut pins) = self.pins.write() {
            if pins.get(topic) != Some(&partitions) {
                Arc::make_mut(&mut pins).insert(topic.to_owned(), partitions);
            }
        }
    }

    /// The pins as they are now.
    pub fn pins(&self) -> Pins {
        self.pins.read().map(|p| p.clone()).unwrap_or_default()
    }

    /// The partition of a record of `topic` with `key` under `pins`; `None`
    /// for a topic without a pin (librdkafka's partitioner places it).
    pub fn partition(&self, pins: &Pins, topic: &str, key: Option<&[u8]>) -> Option<i32> {
        let n = *pins.get(topic)? as u32;
        Some(match key {
            Some(k) => java_partition(k, n),
            None => (self.next.fetch_add(1, Ordering::Relaxed) % n) as i32,
        })
    }

    /// Pin `observed` (each change topic and its partitions now) through
    /// the checkpoint, and say what changed since `seen` (the counts last
    /// observed, updated): a WARN for every topic with partitions added
    /// since its pin, at the first observation and whenever its count
    /// changes, and `pgcdc_kafka_partitions_added`.
    pub async fn observe(
        &self,
        observed: Vec<(String, i32)>,
        checkpoint: &Addr<CheckpointActor>,
        seen: &mut HashMap<String, i32>,
    ) -> Result<(), CheckpointError> {
        let pins = checkpoint
            .send(PinPartitions(observed))
            .await
            .map_err(|_| CheckpointError::Stopped)??;
        let added = &crate::metrics::metrics().kafka_partitions_added;
        for p in pins {
            self.pin(&p.topic, p.pinned);
            added
                .with_label_values(&[p.topic.as_str()])
                .set(i64::from(p.now - p.pinned));
            if seen.insert(p.topic.clone(), p.now) != Some(p.now) {
                self.say(&p);
            }
        }
        Ok(())
    }

    /// Log what `pin` means for its topic's records, if anything.
    fn say(&self, pin: &PartitionPin) {
        let PartitionPin {
            topic,
            now,
            pinned,
            before,
        } = pin;
        match before {
            Some(b) if b > now => tracing::warn!(
                topic,
                partitions = now,
                pinned_before = b,
                "the topic has fewer partitions than pgcdc spread its records over: it was deleted and created again, so it holds none of the records written before; its records are spread over its partitions now"
            ),
            _ if now > pinned && self.computes => tracing::warn!(
                topic,
                partitions = now,
                used = pinned,
                "partitions were added to the topic: pgcdc keeps writing each row's records to the partition it always had, among the first {pinned}, so a row's changes stay in order; the other {} stay unused by change records. To spread rows over all {now}, write to new topics (another kafka.topic_prefix) and copy the tables into them (pgcdc snapshot)",
                now - pinned
            ),
            _ if now > pinned => tracing::warn!(
                topic,
                partitions = now,
                first_seen = pinned,
                "partitions were added to the topic and the configured partitioner is not murmur2: librdkafka now places rows by {now} partitions, so a row's newer records can be on another partition than its older ones (consumers may apply them out of order, and a compacted topic keeps both). Remove `partitioner` from [kafka.properties] so pgcdc keeps each row on its partition, or write to new topics"
            ),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_the_java_clients_published_values() {
        // Values from the Java client's own unit test of Utils.murmur2.
        for (text, expected) in [
            ("21", -973_932_308),
            ("foobar", -790_332_482),
            ("a-little-bit-long-string", -985_981_536),
            ("a-little-bit-longer-string", -1_486_304_829),
            (
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            ("abc", 479_470_107),
        ] {
            assert_eq!(murmur2(text.as_bytes()) as i32, expected, "{text}");
        }
    }

    #[test]
    fn records_stay_within_the_pinned_count() {
        let p = Partitioning::new(None);
        p.pin("t", 3);
        let pins = p.pins();
        for i in 0..200u32 {
            let key = format!("{{\"id\":{i}}}");
            let at = p.partition(&pins, "t", Some(key.as_bytes())).unwrap();
            assert_eq!(at, java_partition(key.as_bytes(), 3));
        }
        let keyless: Vec<i32> = (0..6)
            .filter_map(|_| p.partition(&pins, "t", None))
            .collect();
        assert!(
            keyless.iter().all(|&at| (0..3).contains(&at)),
            "{keyless:?}"
        );
        assert_eq!(
            keyless
                .iter()
                .collect::<std::collections::BTreeSet<_>>()
                .len(),
            3
        );
        assert_eq!(p.partition(&pins, "other", Some(b"k")), None);
        // A pin taken later is seen by the next batch's read, not this one's.
        p.pin("t", 6);
        assert_eq!(pins.get("t"), Some(&3));
        assert_eq!(p.pins().get("t"), Some(&6));
    }

    #[actix::test]
    async fn partitions_added_while_running_keep_the_pin_and_are_counted() {
        use crate::supervision::{RestartBudget, SupervisionConfig};
        let dir = tempfile::tempdir().unwrap();
        let budget = RestartBudget::new("checkpoint", SupervisionConfig::default());
        let checkpoint = CheckpointActor::start(dir.path().join("cp"), budget);
        let p = Partitioning::new(None);
        let mut seen = HashMap::new();
        let topic = "partitions-added-while-running";
        for now in [3, 6] {
            let observed = vec![(topic.to_owned(), now)];
            p.observe(observed, &checkpoint, &mut seen).await.unwrap();
        }
        assert_eq!(p.pins().get(topic), Some(&3));
        assert_eq!(seen.get(topic), Some(&6));
        let added = &crate::metrics::metrics().kafka_partitions_added;
        assert_eq!(added.with_label_values(&[topic]).get(), 3);
    }

    #[test]
    fn another_partitioner_is_left_to_librdkafka() {
        for partitioner in ["consistent_random", "fnv1a"] {
            let p = Partitioning::new(Some(partitioner));
            p.pin("t", 3);
            assert_eq!(p.partition(&p.pins(), "t", Some(b"k")), None);
        }
        let p = Partitioning::new(Some("murmur2"));
        p.pin("t", 3);
        assert_eq!(
            p.partition(&p.pins(), "t", Some(b"k")),
            Some(java_partition(b"k", 3))
        );
    }
}
