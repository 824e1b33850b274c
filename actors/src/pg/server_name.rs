//! The DNS name the server's certificate lists, read in a handshake of our
//! own. pgwire-replication 0.5's verify-ca still compares the host name (it
//! misses the host-name error current rustls returns), so with verify-ca the
//! replication connection names the server as its certificate does. The
//! chain is verified in this handshake and again by the replication client.

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::tls::{self, TlsError};
use super::PostgresConfig;

/// PostgreSQL's SSLRequest: length 8, code 80877103.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// The first DNS name of the server certificate; `None` when the server
/// offers no TLS or the certificate lists no DNS name (the replication
/// client then reports what is wrong).
pub(super) async fn certificate_name(cfg: &PostgresConfig) -> Result<Option<String>, TlsError> {
    let (config, seen) = tls::chain_config(cfg)?;
    let failed = |e: std::io::Error| TlsError::Handshake(e.to_string());
    let mut tcp = TcpStream::connect((cfg.host.as_str(), cfg.port))
        .await
        .map_err(failed)?;
    tcp.write_all(&SSL_REQUEST).await.map_err(failed)?;
    if tcp.read_u8().await.map_err(failed)? != b'S' {
        return Ok(None);
    }
    let name = ServerName::try_from(cfg.host.clone())
        .map_err(|e| TlsError::Handshake(format!("host {:?}: {e}", cfg.host)))?;
    let handshake = TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await;
    let certificate = seen.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Err(e) = handshake {
        return Err(TlsError::recognise(&e.to_string(), cfg)
            .unwrap_or_else(|| TlsError::Handshake(e.to_string())));
    }
    let Some(der) = certificate else {
        return Ok(None);
    };
    let cert = webpki::EndEntityCert::try_from(&der)
        .map_err(|e| TlsError::Untrusted(format!("unreadable server certificate: {e}")))?;
    let name = cert.valid_dns_names().next().map(str::to_owned);
    Ok(name)
}
