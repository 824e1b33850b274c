//! The integration tests: one binary (rocksdb and librdkafka link once), a
//! module per area, against real services started by `pgcdc-testkit`.

mod chaos;
mod crash;
mod debezium;
mod e2e;
mod es_sink;
mod es_tls;
mod freshness;
mod golden;
mod independent_consumer;
mod kafka_sasl;
mod kafka_tls;
mod large_values;
mod observe;
mod producer_outage;
mod reindex;
mod schema_changes;
mod secrets;
mod sink_group;
mod snapshot;
mod support;
mod table_shapes;
mod tls;
mod types;
mod verify;
