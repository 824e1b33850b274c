//! The WAL messages pgcdc writes to steer its own stream: watermarks
//! around backfill chunks and signals (copy a table again, or reset a
//! re-created one), each signed with the installation's [`MessageKey`].

use serde::{Deserialize, Serialize};

use super::sign::MessageKey;
use super::watermark::SIGNAL_PREFIX;
use crate::checkpoint::KeyText;
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
    /// Copy only these keys (key texts in key order; `pgcdc verify
    /// --repair`): a key with no row is deleted downstream. Absent: the
    /// whole table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<Vec<KeyText>>,
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
            keys: None,
            mac: String::new(),
        };
        signal.mac = key.sign(&signal.fields());
        signal
    }

    /// A signed request to copy `keys` of `schema.table` again.
    pub fn repair(
        key: &MessageKey,
        slot: &str,
        (schema, table): (&str, &str),
        keys: Vec<KeyText>,
    ) -> Self {
        let mut signal = Self::signed(key, slot, schema, table, false);
        signal.keys = Some(keys);
        signal.mac = key.sign(&signal.fields());
        signal
    }

    /// The signed fields; the keys only when present, so whole-table
    /// signals sign as before.
    fn fields(&self) -> Vec<String> {
        let reset = if self.reset { "reset" } else { "copy" };
        let mut fields = vec![
            "signal".into(),
            self.slot.clone(),
            self.schema.clone(),
            self.table.clone(),
            reset.into(),
        ];
        if let Some(keys) = &self.keys {
            fields.push(serde_json::to_string(keys).unwrap_or_default());
        }
        fields
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

impl Addressed for crate::canary::Canary {
    fn slot(&self) -> &str {
        &self.slot
    }
}
