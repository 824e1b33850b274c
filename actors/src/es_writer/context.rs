//! The sink's Kafka consumer context: logs assignments and failed offset
//! commits, counts rebalances for the continuity check, and reports a
//! broker's refusals (`/ready`).

use std::sync::atomic::{AtomicU64, Ordering};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::TopicPartitionList;

/// Logs the sink's partition assignments and failed offset commits: which
/// partitions this sink owns is the first question when a mirror lags.
/// Counts rebalances, so the continuity check knows when to start over.
#[derive(Default)]
pub(super) struct SinkContext {
    rebalances: AtomicU64,
}

impl SinkContext {
    /// Rebalances seen so far.
    pub(super) fn rebalances(&self) -> u64 {
        self.rebalances.load(Ordering::SeqCst)
    }
}

/// The sink's consumer's `client.id`, and its name in refusals.
pub(super) const CLIENT: &str = "pgcdc-es-sink";

impl ClientContext for SinkContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        crate::kafka_producer::running_log(CLIENT, level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        crate::kafka_producer::running_error(CLIENT, &error, reason);
    }
}

impl ConsumerContext for SinkContext {
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let parts = |tpl: &TopicPartitionList| {
            tpl.elements()
                .iter()
                .map(|e| format!("{}[{}]", e.topic(), e.partition()))
                .collect::<Vec<_>>()
                .join(",")
        };
        self.rebalances.fetch_add(1, Ordering::SeqCst);
        match rebalance {
            Rebalance::Assign(tpl) => {
                tracing::info!(partitions = parts(tpl), "es sink assigned");
                drop_on_failpoint(consumer, &parts(tpl));
            }
            Rebalance::Revoke(tpl) => tracing::info!(partitions = parts(tpl), "es sink revoked"),
            Rebalance::Error(e) => tracing::warn!(error = %e, "es sink rebalance failed"),
        }
    }

    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        _offsets: &TopicPartitionList,
    ) {
        if let Err(e) = result {
            // The records are written again after a restart: no loss, but worth seeing.
            tracing::warn!(error = %e, "es sink offset commit failed");
        }
    }
}

/// Failpoint `es-assigned` (`return`): give the assignment up at once, as
/// if the broker had assigned nothing; the group still counts it as ours.
fn drop_on_failpoint(consumer: &BaseConsumer<SinkContext>, partitions: &str) {
    #[cfg(feature = "failpoints")]
    {
        use rdkafka::consumer::Consumer;
        fail::fail_point!(crate::wire::failpoint::ES_ASSIGNED, |_| {
            let _ = consumer.unassign();
            tracing::warn!(partitions, "es sink revoked (failpoint es-assigned)");
        });
    }
    let _ = (consumer, partitions);
}
