//! The integration tests: one binary (rocksdb and librdkafka link once), a
//! module per area, against real services started by `pgcdc-testkit`.

mod chaos;
mod crash;
mod e2e;
mod es_sink;
mod observe;
mod producer_outage;
mod schema_changes;
mod sink_group;
mod snapshot;
mod support;
mod table_shapes;
mod types;
