//! Waiting until the pipeline has applied everything up to a WAL position:
//! the slot confirmed it (every change below it is acknowledged by Kafka),
//! then the sink's group committed past the topics' ends as they stood at
//! that moment (the sink commits only what the mirror accepted), then the
//! mirror is refreshed.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::mirror::Mirror;
use super::VerifyError;
use crate::es_writer::{group_offsets, EsConfig};
use crate::kafka_producer::KafkaConfig;
use crate::lsn::Lsn;

/// Pause between two looks at the slot or the group.
const EVERY: Duration = Duration::from_millis(200);

/// Where the pipeline is read from.
pub(crate) struct Pipeline<'a> {
    /// A connection outside any snapshot.
    pub sql: &'a Client,
    /// The slot pgcdc streams from.
    pub slot: &'a str,
    /// The sink's section (its consumer group).
    pub es: &'a EsConfig,
    /// The change topics.
    pub kafka: &'a KafkaConfig,
    /// Longest wait.
    pub timeout: Duration,
}

/// How the wait ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fence {
    /// Everything up to the position is in the mirror.
    Reached,
    /// The wait gave up: differences may still be in flight.
    TimedOut(Behind),
}

/// Where a wait for the pipeline gave up, and how far behind it was.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Behind {
    /// `slot` (Kafka had not acknowledged the position) or `sink` (the
    /// mirror had not applied what Kafka held).
    pub stage: &'static str,
    /// The wait's limit, `verify.fence_timeout_secs`.
    pub timeout_secs: u64,
    /// How far behind that stage was when the wait gave up: WAL bytes
    /// below the position the slot had not confirmed (`slot`), or records
    /// the sink's group had not committed (`sink`).
    pub behind: u64,
    /// `wal_bytes` or `records`.
    pub unit: &'static str,
}

impl Behind {
    /// The wait as text (`the sink was 120 records behind after 60 s`).
    pub fn text(&self) -> String {
        let unit = match self.unit {
            "wal_bytes" => "bytes of WAL",
            _ => "records",
        };
        format!(
            "the pipeline did not catch up within verify.fence_timeout_secs = {}: the {} was {} {unit} behind",
            self.timeout_secs, self.stage, self.behind
        )
    }
}

/// A partition's committed offset and high watermark: (topic, partition,
/// committed, high).
type Offsets = Vec<(String, i32, Option<i64>, i64)>;

impl Pipeline<'_> {
    /// Wait until everything up to `at` is in `mirror`.
    pub async fn applied(&self, at: Lsn, mirror: &Mirror<'_>) -> Result<Fence, VerifyError> {
        let deadline = Instant::now() + self.timeout;
        // An idle database has nothing to move the slot past `at`: a heartbeat does.
        self.sql
            .execute(
                "SELECT pg_logical_emit_message(false, $1, '')",
                &[&crate::wire::message::HEARTBEAT],
            )
            .await?;
        if let Some(behind) = self.slot_reached(at, deadline).await? {
            return Ok(Fence::TimedOut(behind));
        }
        let ends = group_offsets(self.es, self.kafka).await?;
        loop {
            let behind = records_behind(&ends, &group_offsets(self.es, self.kafka).await?);
            if behind == 0 {
                break;
            }
            if Instant::now() > deadline {
                return Ok(Fence::TimedOut(self.gave_up("sink", behind, "records")));
            }
            tokio::time::sleep(EVERY).await;
        }
        mirror.refresh().await?;
        Ok(Fence::Reached)
    }

    /// Wait until the slot confirmed `at` (every change below it is
    /// acknowledged by Kafka), until `deadline`; how far behind it was if not.
    pub async fn slot_reached(
        &self,
        at: Lsn,
        deadline: Instant,
    ) -> Result<Option<Behind>, VerifyError> {
        loop {
            let confirmed = self.slot_confirmed().await?;
            if confirmed >= at {
                return Ok(None);
            }
            if Instant::now() > deadline {
                let behind = at.0.saturating_sub(confirmed.0);
                return Ok(Some(self.gave_up("slot", behind, "wal_bytes")));
            }
            tokio::time::sleep(EVERY).await;
        }
    }

    /// A timed-out wait at `stage`, `behind` `unit`s behind.
    fn gave_up(&self, stage: &'static str, behind: u64, unit: &'static str) -> Behind {
        let behind = Behind {
            stage,
            timeout_secs: self.timeout.as_secs(),
            behind,
            unit,
        };
        tracing::warn!(
            stage,
            behind = behind.behind,
            unit,
            "verify fence timed out"
        );
        behind
    }

    /// The slot's confirmed position (zero if it has none yet).
    async fn slot_confirmed(&self) -> Result<Lsn, VerifyError> {
        let row = self
            .sql
            .query_opt(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.slot],
            )
            .await?;
        let Some(row) = row else {
            return Err(VerifyError::Internal(format!(
                "replication slot {:?} does not exist",
                self.slot
            )));
        };
        let text: Option<String> = row.get(0);
        Ok(text
            .and_then(|t| t.parse::<Lsn>().ok())
            .unwrap_or(Lsn::ZERO))
    }
}

/// Records of `ends` (the high watermarks to pass) that the group's
/// committed offsets in `now` have not passed.
fn records_behind(ends: &Offsets, now: &Offsets) -> u64 {
    ends.iter()
        .map(|(topic, partition, _, high)| {
            let committed = now
                .iter()
                .find(|(t, p, _, _)| t == topic && p == partition)
                .and_then(|(_, _, c, _)| *c)
                .unwrap_or(0);
            u64::try_from(high - committed).unwrap_or(0)
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_behind_counts_what_the_group_has_not_committed() {
        let ends = vec![
            ("t".to_owned(), 0, Some(3), 10),
            ("t".to_owned(), 1, None, 0),
        ];
        let now = vec![
            ("t".to_owned(), 0, Some(7), 12),
            ("t".to_owned(), 1, None, 5),
        ];
        assert_eq!(records_behind(&ends, &now), 3);
        let none = vec![("t".to_owned(), 0, None, 12)];
        assert_eq!(records_behind(&ends, &none), 10);
        let past = vec![("t".to_owned(), 0, Some(11), 12)];
        assert_eq!(records_behind(&ends, &past), 0);
    }
}
