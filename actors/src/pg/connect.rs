//! Building connections: a SQL client ([`connect`]), the replication
//! session's settings ([`replication_config`]) and a gated replication
//! session ([`connect_replication`]). All are built here and only here, with
//! the transport security of [`super::tls`].

use std::error::Error as StdError;
use std::time::Duration;

use pgwire_replication::{PgWireError, ReplicationClient, ReplicationConfig};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::{Client, Connection, NoTls, Socket};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::tls::{self, Security, SslMode, TlsError, SECURITY_PROBE};
use super::{session, PgError, PostgresConfig};
use crate::lsn::Lsn;

/// `application_name` of every pgcdc connection, so operators can spot them
/// in `pg_stat_activity` and `pg_stat_replication`.
pub(super) const APPLICATION_NAME: &str = "pgcdc";
/// Replication messages buffered between the client's socket worker and the
/// stream task; the worker holds one more while it waits for room. The
/// kernel's socket buffer absorbs bursts while a batch is handed over. This
/// read-ahead is counted in messages (one row each), not bytes, so it is kept
/// small: with 256, a backlog of 4 MiB rows read while Kafka stalled held
/// about 88 rows ahead (pgcdc peaked at 371 MiB, 111 MiB with 16). Below 16
/// the worker is woken more often for no memory that ordinary rows save.
const REPLICATION_BUFFER: usize = 16;
/// Largest replication message accepted (256 MiB): room for very wide rows,
/// while bounding what a single message can make pgcdc allocate.
const MAX_MESSAGE_BYTES: usize = 256 << 20;

/// Open a SQL connection with PostgreSQL's timeouts off (see `session`);
/// the connection task runs in the background.
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
    let connected = match cfg.sslmode {
        SslMode::Disable => open(&pg, NoTls).await,
        mode => {
            pg.ssl_mode(match mode {
                SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
                _ => tokio_postgres::config::SslMode::Require,
            });
            open(&pg, MakeRustlsConnect::new(tls::client_config(cfg)?)).await
        }
    };
    connected.map_err(|e| match TlsError::recognise(&chain(&e), cfg) {
        Some(tls) => PgError::Tls(tls),
        None => PgError::Connect(e),
    })
}

/// Connect with `tls`; the connection task runs in the background.
async fn open<T>(pg: &tokio_postgres::Config, tls: T) -> Result<Client, tokio_postgres::Error>
where
    T: MakeTlsConnect<Socket>,
    T::Stream: Send + 'static,
    T::TlsConnect: Send,
    <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
{
    let (client, conn) = pg.connect(tls).await?;
    tokio::spawn(drive(conn));
    super::session::without_timeouts(&client).await?;
    Ok(client)
}

/// Run a connection until it closes.
async fn drive<T: AsyncRead + AsyncWrite + Unpin>(conn: Connection<Socket, T>) {
    if let Err(e) = conn.await {
        tracing::debug!(error = %e, "sql connection closed");
    }
}

/// An error and its causes, as one line (tokio-postgres keeps the TLS or
/// server message in the cause).
pub(crate) fn chain(e: &dyn StdError) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// What a SQL connection negotiated.
pub async fn sql_security(client: &Client, cfg: &PostgresConfig) -> Result<Security, PgError> {
    let row = client.query_opt(SECURITY_PROBE, &[]).await?;
    Ok(Security {
        tls_version: row.map(|r| r.get(0)),
        mode: cfg.sslmode,
    })
}

/// Open a gated replication session (nothing streams until its `start`)
/// beginning at `start`, and ask it what it negotiated: the first query also
/// reports a failed connection, TLS failures named as [`TlsError`]s.
pub async fn connect_replication(
    cfg: &PostgresConfig,
    start: Lsn,
) -> Result<(ReplicationClient, Security), PgError> {
    let failed = |e: PgWireError| match TlsError::recognise(&e.to_string(), cfg) {
        Some(tls) => PgError::Tls(tls),
        None => PgError::Replication(e),
    };
    let mut config = replication_config(cfg, start);
    if cfg.sslmode == SslMode::VerifyCa {
        if let Some(name) = super::server_name::certificate_name(cfg).await? {
            config = config.with_tls(tls::replication_tls(cfg).with_sni_hostname(name));
        }
    }
    let mut client = ReplicationClient::connect_gated(config)
        .await
        .map_err(failed)?;
    let rows = client.simple_query(SECURITY_PROBE).await.map_err(failed)?;
    let version = rows
        .into_iter()
        .next()
        .and_then(|row| row.into_iter().next().flatten());
    let security = Security {
        tls_version: version.map(|v| String::from_utf8_lossy(&v).into_owned()),
        mode: cfg.sslmode,
    };
    Ok((client, security))
}

/// The replication session for `cfg`'s slot and publication, starting (and
/// acknowledging) at `start`, with the session settings of [`session`].
fn replication_config(cfg: &PostgresConfig, start: Lsn) -> ReplicationConfig {
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
    .with_tls(tls::replication_tls(cfg))
    .with_start_lsn(start.into())
    .with_ack_lsn(start.into())
    .with_status_interval(status_interval)
    .with_wakeup_interval(status_interval)
    .with_buffer_size(REPLICATION_BUFFER)
    .with_options(session::startup_options())
    .with_max_message_size(MAX_MESSAGE_BYTES)
    .with_application_name(APPLICATION_NAME)
}
