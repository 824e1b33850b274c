//! The daemon configuration the integration tests and benches start from.

use std::path::Path;

use crate::kafka::Broker;
use crate::pg::PgCluster;

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

/// `cfg` (a [`daemon_config`]) with its metrics served on 127.0.0.1:`port`.
pub fn with_metrics(cfg: &str, port: u16) -> String {
    cfg.replace("listen = \"\"", &format!("listen = \"127.0.0.1:{port}\""))
}
