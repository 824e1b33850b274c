//! Building connections: a SQL client ([`connect`]) and the replication
//! session's settings ([`replication_config`]). Both are built here and only
//! here, so transport security is added in one place.

use std::time::Duration;

use pgwire_replication::{ReplicationConfig, TlsConfig};
use tokio_postgres::{Client, NoTls};

use super::{session, PgError, PostgresConfig};
use crate::lsn::Lsn;

/// `application_name` of every pgcdc connection, so operators can spot them
/// in `pg_stat_activity` and `pg_stat_replication`.
const APPLICATION_NAME: &str = "pgcdc";
/// Replication messages buffered between the client's socket worker and the
/// stream task. The kernel's socket buffer already absorbs bursts while a
/// batch is handed over; this read-ahead is counted in messages (one row
/// each), not bytes, so it is kept small: with rows of tens of MB it is what
/// the stream holds besides its batches.
const REPLICATION_BUFFER: usize = 256;
/// Largest replication message accepted (256 MiB): room for very wide rows,
/// while bounding what a single message can make pgcdc allocate.
const MAX_MESSAGE_BYTES: usize = 256 << 20;

/// Open a SQL connection; the connection task runs in the background.
pub async fn connect(cfg: &PostgresConfig) -> Result<Client, PgError> {
    let mut pg = tokio_postgres::Config::new();
    pg.host(&cfg.host)
        .port(cfg.port)
        .user(&cfg.user)
        .dbname(&cfg.database)
        .application_name(APPLICATION_NAME)
        .connect_timeout(Duration::from_secs(cfg.connect_timeout_secs));
    if !cfg.password.expose().is_empty() {
        pg.password(cfg.password.expose());
    }
    let (client, conn) = pg.connect(NoTls).await.map_err(PgError::Connect)?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "sql connection closed");
        }
    });
    Ok(client)
}

/// The replication session for `cfg`'s slot and publication, starting (and
/// acknowledging) at `start`, with the session settings of [`session`].
pub(crate) fn replication_config(cfg: &PostgresConfig, start: Lsn) -> ReplicationConfig {
    let status_interval = Duration::from_secs(cfg.status_interval_secs);
    ReplicationConfig::new(
        cfg.host.clone(),
        cfg.user.clone(),
        cfg.password.expose(),
        cfg.database.clone(),
        cfg.slot.clone(),
        cfg.publication.as_str(),
    )
    .with_port(cfg.port)
    .with_tls(TlsConfig::disabled())
    .with_start_lsn(start.into())
    .with_ack_lsn(start.into())
    .with_status_interval(status_interval)
    .with_wakeup_interval(status_interval)
    .with_buffer_size(REPLICATION_BUFFER)
    .with_options(session::startup_options())
    .with_max_message_size(MAX_MESSAGE_BYTES)
    .with_application_name(APPLICATION_NAME)
}
