//! Heartbeat records (`kafka.heartbeats`): every `wal.heartbeat_secs`, a
//! record on `__debezium-heartbeat.<topic_prefix>` (or
//! `kafka.heartbeat_topic`) keyed `{"serverName": <topic_prefix>}` as
//! Debezium's are, whose value carries the time and the LSN pgcdc has
//! published and checkpointed up to, so consumers see that an idle pipeline
//! is alive.

use std::sync::Arc;

use serde_json::json;

use super::send::{send_one, Producer};
use super::EncodedRecord;
use crate::lsn::Lsn;
use crate::pg::values::to_json_bytes;

/// Where and as whom heartbeats are published.
#[derive(Clone)]
pub struct Heartbeats {
    /// The heartbeat topic.
    pub topic: Arc<str>,
    /// `serverName` in the key: `kafka.topic_prefix`.
    pub server: Arc<str>,
}

impl Heartbeats {
    /// The heartbeat record at `now_ms` with the LSN `reached` (`null` before
    /// the first checkpoint of this run).
    pub fn record(&self, reached: Option<Lsn>, now_ms: i64) -> EncodedRecord {
        let (mut key, mut value) = (Vec::new(), Vec::new());
        to_json_bytes(&json!({ "serverName": &*self.server }), &mut key);
        to_json_bytes(
            &json!({"ts_ms": now_ms, "lsn": reached.map(|l| l.0)}),
            &mut value,
        );
        EncodedRecord {
            topic: self.topic.clone(),
            key: Some(key),
            value: Some(value),
            table: "".into(),
            op: "",
            commit_lsn: reached.map_or_else(String::new, |l| l.to_string()).into(),
            types: "{}".into(),
        }
    }

    /// Publish the heartbeat record in the background; a failure is logged
    /// (the next heartbeat tries again).
    pub fn publish(&self, producer: Arc<Producer>, reached: Option<Lsn>, now_ms: i64) {
        let record = self.record(reached, now_ms);
        tokio::spawn(async move {
            match send_one(&producer, record, now_ms).await {
                Ok(()) => {
                    tracing::debug!(lsn = ?reached.map(|l| l.to_string()), "heartbeat record published")
                }
                Err(e) => tracing::warn!(error = %e, "heartbeat record not delivered"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_are_keyed_by_server_name_and_carry_the_lsn() {
        let h = Heartbeats {
            topic: "__debezium-heartbeat.pgcdc".into(),
            server: "pgcdc".into(),
        };
        let r = h.record(Some(Lsn(0x1_0000_0010)), 7);
        assert_eq!(
            r.key.as_deref(),
            Some(br#"{"serverName":"pgcdc"}"#.as_slice())
        );
        assert_eq!(
            r.value.as_deref(),
            Some(br#"{"lsn":4294967312,"ts_ms":7}"#.as_slice())
        );
        assert_eq!(&*r.commit_lsn, "1/10");
        let r = h.record(None, 7);
        assert_eq!(
            r.value.as_deref(),
            Some(br#"{"lsn":null,"ts_ms":7}"#.as_slice())
        );
    }
}
