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
    /// The wait gave up at this stage (`slot` or `sink`): differences may
    /// still be in flight.
    TimedOut(&'static str),
}

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
        while !self.slot_confirmed(at).await? {
            if Instant::now() > deadline {
                return Ok(Fence::TimedOut("slot"));
            }
            tokio::time::sleep(EVERY).await;
        }
        let ends = group_offsets(self.es, self.kafka).await?;
        loop {
            let now = group_offsets(self.es, self.kafka).await?;
            let behind = ends.iter().any(|(topic, partition, _, high)| {
                let committed = now
                    .iter()
                    .find(|(t, p, _, _)| t == topic && p == partition)
                    .and_then(|(_, _, c, _)| *c);
                *high > 0 && committed.is_none_or(|c| c < *high)
            });
            if !behind {
                break;
            }
            if Instant::now() > deadline {
                return Ok(Fence::TimedOut("sink"));
            }
            tokio::time::sleep(EVERY).await;
        }
        mirror.refresh().await?;
        Ok(Fence::Reached)
    }

    /// Whether the slot's confirmed position reached `at`.
    async fn slot_confirmed(&self, at: Lsn) -> Result<bool, VerifyError> {
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
            .is_some_and(|c| c >= at))
    }
}
