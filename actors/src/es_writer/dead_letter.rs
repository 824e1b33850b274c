//! Records Elasticsearch refuses for good go to the dead-letter topic (with
//! the reason) and the audit log's `dead_letters` table, so the batch can be
//! committed without losing them.

use std::borrow::Cow;
use std::time::Duration;

use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use serde_json::json;

use super::error::EsError;
use crate::kafka_producer::{PolledProducer, Reply};

/// Longest wait for the dead-letter topic to acknowledge one record; the
/// batch is not committed before it, so a failure only replays it.
const DLQ_SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// Where dead letters go.
pub(super) struct DeadLetters {
    /// The producer writing them.
    pub(super) producer: PolledProducer<Reply>,
    /// The dead-letter topic.
    pub(super) topic: String,
}

/// The value of header `key` of `msg`, as text (borrowed: it is read for
/// every record).
pub(super) fn header<'m>(msg: &'m OwnedMessage, key: &str) -> Option<Cow<'m, str>> {
    let headers = msg.headers()?;
    (0..headers.count())
        .map(|i| headers.get(i))
        .find(|h| h.key == key)
        .and_then(|h| h.value.map(String::from_utf8_lossy))
}

impl DeadLetters {
    /// Park a record on the dead-letter topic with the reason; waits for the acknowledgement.
    pub(super) async fn send(&self, msg: &OwnedMessage, reason: &str) -> Result<(), EsError> {
        let table = header(msg, crate::wire::header::TABLE).unwrap_or_default();
        tracing::warn!(
            topic = msg.topic(),
            partition = msg.partition(),
            offset = msg.offset(),
            table = table.as_ref(),
            reason,
            "record dead-lettered"
        );
        // The audit log's `dead_letters` table (this target never reaches the console: row values).
        let key = msg.key().map(String::from_utf8_lossy);
        let lsn = header(msg, crate::wire::header::COMMIT_LSN);
        let payload = msg.payload().map(String::from_utf8_lossy);
        tracing::warn!(
            target: crate::audit::DEAD_LETTER_TARGET,
            table = table.as_ref(),
            key = key.as_deref(),
            lsn = lsn.as_deref(),
            reason,
            payload = payload.as_deref(),
            "record dead-lettered"
        );
        let value = json!({
            "reason": reason,
            "table": table,
            "topic": msg.topic(),
            "partition": msg.partition(),
            "offset": msg.offset(),
            "payload": payload,
        })
        .to_string();
        let headers = OwnedHeaders::new().insert(Header {
            key: crate::wire::header::REASON,
            value: Some(reason),
        });
        let payload = value.as_bytes();
        self.producer
            .deliver(
                &self.topic,
                msg.key(),
                payload,
                Some(headers),
                DLQ_SEND_TIMEOUT,
            )
            .await
            .map_err(EsError::Kafka)?;
        Ok(())
    }
}
