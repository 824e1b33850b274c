//! The canary's Kafka record, on its own topic (`__pgcdc-canary.<topic_prefix>`,
//! one partition), so consumers of the change topics never see it.
//!
//! It is produced once the canary's commit is confirmed, i.e. once every
//! change before it is acknowledged, and lists the high watermark of every
//! partition of the change topics looked up after that: each change before
//! the canary sits below them. The sink counts the canary as searchable
//! once it has applied every listed partition up to its listed offset.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::lsn::Lsn;
use crate::snapshot::watermark::MessageKey;

/// Offsets per partition per topic: the next offset to be written.
pub type Offsets = BTreeMap<String, BTreeMap<i32, i64>>;

/// The canary topic of a `topic_prefix`.
pub fn topic(topic_prefix: &str) -> String {
    format!("__pgcdc-canary.{topic_prefix}")
}

/// Why a canary record is not counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Not a canary record.
    #[error("malformed")]
    Malformed,
    /// Another pgcdc instance's canary (not an error).
    #[error("another slot's")]
    OtherSlot,
    /// Its MAC does not verify with this installation's key.
    #[error("not signed with this installation's key")]
    Unsigned,
}

/// A canary as the sink reads it from Kafka.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CanaryRecord {
    /// The slot of the pgcdc instance that wrote it.
    pub slot: String,
    /// Wall-clock time the canary was written into the WAL, µs since the Unix epoch.
    pub t_us: i64,
    /// The commit LSN of the canary's transaction (`X/Y`).
    pub commit_lsn: String,
    /// The change topics' high watermarks once everything before it was acknowledged.
    pub offsets: Offsets,
    /// HMAC of the fields above ([`MessageKey`]).
    #[serde(default)]
    pub mac: String,
}

impl CanaryRecord {
    /// The record of a canary of `slot` written at `t_us`, committed at
    /// `commit_lsn`, behind `offsets`; signed with `key`.
    pub fn signed(
        key: &MessageKey,
        slot: &str,
        (t_us, commit_lsn): (i64, Lsn),
        offsets: Offsets,
    ) -> Self {
        let mut r = Self {
            slot: slot.to_owned(),
            t_us,
            commit_lsn: commit_lsn.to_string(),
            offsets,
            mac: String::new(),
        };
        r.mac = key.sign(&r.fields());
        r
    }

    fn fields(&self) -> [String; 5] {
        [
            "canary-record".into(),
            self.slot.clone(),
            self.t_us.to_string(),
            self.commit_lsn.clone(),
            serde_json::to_string(&self.offsets).unwrap_or_default(),
        ]
    }

    /// The record in `payload` if it parses, is `slot`'s, and its MAC
    /// verifies with `key`; why not otherwise.
    pub fn read(payload: &[u8], key: &MessageKey, slot: &str) -> Result<Self, Refused> {
        let r: Self = serde_json::from_slice(payload).map_err(|_| Refused::Malformed)?;
        if r.slot != slot {
            return Err(Refused::OtherSlot);
        }
        if !key.verify(&r.fields(), &r.mac) {
            return Err(Refused::Unsigned);
        }
        Ok(r)
    }

    /// Whether every listed partition is applied up to its offset, by
    /// `applied(topic, partition)` (the next offset to apply, if known).
    pub fn applied_by(&self, applied: impl Fn(&str, i32) -> Option<i64>) -> bool {
        self.offsets.iter().all(|(topic, partitions)| {
            partitions
                .iter()
                .all(|(&p, &next)| applied(topic, p).is_some_and(|at| at >= next))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offsets(list: &[(&str, i32, i64)]) -> Offsets {
        let mut o = Offsets::new();
        for (t, p, n) in list {
            o.entry((*t).into()).or_default().insert(*p, *n);
        }
        o
    }

    #[test]
    fn records_are_signed_over_every_field_and_addressed_to_a_slot() {
        let key = MessageKey::random().unwrap();
        let r = CanaryRecord::signed(&key, "s", (7, Lsn(9)), offsets(&[("t", 0, 3)]));
        let bytes = serde_json::to_vec(&r).unwrap();
        assert_eq!(CanaryRecord::read(&bytes, &key, "s"), Ok(r.clone()));
        assert_eq!(
            CanaryRecord::read(&bytes, &key, "other").unwrap_err(),
            Refused::OtherSlot
        );
        let other = MessageKey::random().unwrap();
        assert_eq!(
            CanaryRecord::read(&bytes, &other, "s").unwrap_err(),
            Refused::Unsigned
        );
        let mut forged = r.clone();
        forged.offsets = offsets(&[("t", 0, 1)]);
        let bytes = serde_json::to_vec(&forged).unwrap();
        assert!(
            CanaryRecord::read(&bytes, &key, "s").is_err(),
            "offsets are signed"
        );
        assert_eq!(
            CanaryRecord::read(b"{", &key, "s").unwrap_err(),
            Refused::Malformed
        );
    }

    #[test]
    fn a_canary_is_applied_once_every_listed_partition_reached_its_offset() {
        let key = MessageKey::random().unwrap();
        let list = offsets(&[("a", 0, 10), ("a", 1, 5), ("b", 0, 1)]);
        let r = CanaryRecord::signed(&key, "s", (1, Lsn(1)), list);
        let at = |a0: i64, a1: Option<i64>| {
            move |t: &str, p: i32| match (t, p) {
                ("a", 0) => Some(a0),
                ("a", 1) => a1,
                _ => Some(1),
            }
        };
        assert!(
            r.applied_by(at(10, Some(5))),
            "the next offset to apply is the listed one"
        );
        assert!(r.applied_by(at(11, Some(9))));
        assert!(!r.applied_by(at(9, Some(5))), "one record short");
        assert!(!r.applied_by(at(10, None)), "unknown is not applied");
        let empty = CanaryRecord::signed(&key, "s", (1, Lsn(1)), Offsets::new());
        assert!(empty.applied_by(|_, _| None), "nothing to wait for");
    }
}
