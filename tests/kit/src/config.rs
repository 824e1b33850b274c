//! The daemon configuration the integration tests and benches start from.

use std::path::Path;

use crate::kafka::Broker;
use crate::pg::PgCluster;

/// `[kafka.properties]` for tests that kill a consumer: the group coordinator
/// then waits at most this long for the dead member during a rebalance
/// (librdkafka's default `max.poll.interval.ms` is 5 minutes). Tests that
/// kill a sink repeatedly also give it a static `group.instance.id`: tansu
/// sometimes never reassigns the partitions of a killed member otherwise.
pub const FAST_REBALANCE: &str = "[kafka.properties]\n\"max.poll.interval.ms\" = \"15000\"\n";

/// [`FAST_REBALANCE`] plus one record per producer batch, for tansu: tansu
/// 0.6 answers a fetch from the middle of a batch with the next batch, so a
/// restarted sink resuming inside one would miss the rest of it (real Kafka
/// and the mock cluster return the whole batch).
pub const FAST_REBALANCE_ONE_PER_BATCH: &str =
    "[kafka.properties]\n\"max.poll.interval.ms\" = \"15000\"\n\"batch.num.messages\" = \"1\"\n";

/// Config text for a daemon streaming `tables` from `pg` into `broker`;
/// `extra_kafka` is appended to the `[kafka]` section.
pub fn daemon_config(
    pg: &PgCluster,
    broker: &dyn Broker,
    state_dir: &Path,
    tables: &[&str],
    extra_kafka: &str,
) -> String {
    let tables: Vec<String> = tables.iter().map(|t| format!("{t:?}")).collect();
    format!(
        "state_dir = {state:?}\nshutdown_timeout_secs = 20\n\
         [postgres]\nhost = \"127.0.0.1\"\nport = {port}\nuser = \"postgres\"\ndatabase = \"postgres\"\n\
         tables = [{tables}]\nstatus_interval_secs = 1\n\
         [kafka]\nbrokers = {brokers:?}\ntopic_partitions = 1\ndelivery_timeout_ms = 30000\n{settings}{extra_kafka}\n\
         [supervision]\nmax_restarts = 20\nbackoff_initial_ms = 50\nbackoff_max_ms = 1000\n\
         [log]\nlevel = \"info,pgcdc_actors=debug\"\n[metrics]\nlisten = \"\"\n",
        state = state_dir.display().to_string(),
        port = pg.port,
        tables = tables.join(", "),
        brokers = broker.brokers(),
        settings = broker.kafka_settings(),
    )
}
