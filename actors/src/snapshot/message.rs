//! The WAL messages pgcdc writes to steer its own stream: watermarks
//! around backfill chunks and signals (copy a table again, or reset a
//! re-created one), each signed with the installation's [`MessageKey`].

use serde::{Deserialize, Serialize};

use super::sign::MessageKey;
use super::watermark::SIGNAL_PREFIX;
use crate::pg::PgError;

/// A watermark message's content.
#[derive(Debug, Serialize, Deserialize)]
pub struct Mark {
    /// The slot of the pgcdc instance that wrote it.
    pub slot: String,
    /// The chunk.
    pub id: u64,
    /// `false`: low mark, `true`: high mark.
    pub high: bool,
    /// HMAC of the fields above ([`MessageKey`]); absent in forged marks.
    #[serde(default)]
    pub mac: String,
}

impl Mark {
    /// A mark signed with `key`.
    pub fn signed(key: &MessageKey, slot: &str, id: u64, high: bool) -> Self {
        let mut mark = Self {
            slot: slot.to_owned(),
            id,
            high,
            mac: String::new(),
        };
        mark.mac = key.sign(&mark.fields());
        mark
    }

    fn fields(&self) -> [String; 4] {
        let high = if self.high { "high" } else { "low" };
        [
            "watermark".into(),
            self.slot.clone(),
            self.id.to_string(),
            high.into(),
        ]
    }

    /// Whether its MAC verifies with `key`.
    pub(super) fn genuine(&self, key: &MessageKey) -> bool {
        key.verify(&self.fields(), &self.mac)
    }
}

/// A signal message's content: a request to backfill a table.
#[derive(Debug, Serialize, Deserialize)]
pub struct Signal {
    /// The slot of the pgcdc instance it is meant for.
    pub slot: String,
    /// Schema of the table to copy again.
    pub schema: String,
    /// Name of the table to copy again.
    pub table: String,
    /// The table was re-created: its earlier rows are gone (a truncate is
    /// emitted before the copy).
    #[serde(default)]
    pub reset: bool,
    /// HMAC of the fields above ([`MessageKey`]); absent in forged signals.
    #[serde(default)]
    pub mac: String,
}

impl Signal {
    /// A signal signed with `key`.
    pub fn signed(key: &MessageKey, slot: &str, schema: &str, table: &str, reset: bool) -> Self {
        let mut signal = Self {
            slot: slot.to_owned(),
            schema: schema.to_owned(),
            table: table.to_owned(),
            reset,
            mac: String::new(),
        };
        signal.mac = key.sign(&signal.fields());
        signal
    }

    fn fields(&self) -> [String; 5] {
        let reset = if self.reset { "reset" } else { "copy" };
        [
            "signal".into(),
            self.slot.clone(),
            self.schema.clone(),
            self.table.clone(),
            reset.into(),
        ]
    }

    /// Whether its MAC verifies with `key`.
    pub(super) fn genuine(&self, key: &MessageKey) -> bool {
        key.verify(&self.fields(), &self.mac)
    }

    /// Write the signal into the WAL; the LSN it was written at.
    pub async fn write(&self, sql: &tokio_postgres::Client) -> Result<String, PgError> {
        let content = serde_json::to_string(self).unwrap_or_default();
        let row = sql
            .query_one(
                "SELECT pg_logical_emit_message(true, $1, $2)::text",
                &[&SIGNAL_PREFIX, &content],
            )
            .await?;
        Ok(row.get(0))
    }
}

/// Messages addressed to one slot.
pub(super) trait Addressed {
    /// The slot the message is for.
    fn slot(&self) -> &str;
}

impl Addressed for Mark {
    fn slot(&self) -> &str {
        &self.slot
    }
}

impl Addressed for Signal {
    fn slot(&self) -> &str {
        &self.slot
    }
}
