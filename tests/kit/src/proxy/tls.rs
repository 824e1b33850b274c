//! A TLS terminator: accepts TLS with a test certificate and forwards the
//! plain bytes to a service on 127.0.0.1, so services without TLS of their
//! own (tansu, osmem-server) can be reached over TLS.

use std::sync::Arc;

use anyhow::{Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::certs::Issued;

/// A running terminator; its accept loop ends when it is dropped.
pub struct TlsTerminator {
    /// The port it listens on (127.0.0.1).
    pub port: u16,
    accept: tokio::task::JoinHandle<()>,
}

impl TlsTerminator {
    /// Listen on `listener`, present `cert`, forward to `127.0.0.1:upstream`.
    pub fn start(listener: std::net::TcpListener, cert: &Issued, upstream: u16) -> Result<Self> {
        let chain = CertificateDer::pem_slice_iter(cert.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .context("certificate")?;
        let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).context("key")?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        let acceptor = TlsAcceptor::from(Arc::new(config));
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let listener = TcpListener::from_std(listener)?;
        let accept = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(serve(acceptor.clone(), conn, upstream));
            }
        });
        Ok(Self { port, accept })
    }
}

impl Drop for TlsTerminator {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Finish the handshake, then copy both ways until either side closes.
async fn serve(acceptor: TlsAcceptor, conn: TcpStream, upstream: u16) {
    let Ok(mut tls) = acceptor.accept(conn).await else {
        return; // a client that refused our certificate: what some tests want
    };
    let Ok(mut plain) = TcpStream::connect(("127.0.0.1", upstream)).await else {
        return;
    };
    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
}
