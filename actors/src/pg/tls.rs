//! Transport security of PostgreSQL connections: `postgres.sslmode` and its
//! certificate files, the rustls client configuration of SQL connections and
//! the TLS settings of the replication connection (pgwire-replication, also
//! rustls: one library, one set of verification rules), what a connection
//! negotiated, and TLS failures in words a user can act on.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use pgwire_replication::config::{SslMode as WireMode, TlsConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use serde::Deserialize;

use super::PostgresConfig;
use crate::error::{ConfigError, ErrorClass, ExitCode};

/// `postgres.sslmode`, with libpq's meanings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    /// Never encrypt.
    Disable,
    /// Encrypt when the server offers TLS, without verifying its certificate.
    #[default]
    Prefer,
    /// Always encrypt, without verifying the certificate.
    Require,
    /// Encrypt and verify that a trusted CA signed the certificate.
    VerifyCa,
    /// Encrypt, verify the CA and that the certificate names the host.
    VerifyFull,
}

impl SslMode {
    /// The mode as written in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }

    /// Whether the server certificate's chain is verified.
    fn verifies(self) -> bool {
        matches!(self, Self::VerifyCa | Self::VerifyFull)
    }

    /// Whether a connection without TLS is refused.
    fn requires(self) -> bool {
        !matches!(self, Self::Disable | Self::Prefer)
    }
}

impl std::fmt::Display for SslMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A TLS failure, named so the operator knows what to change.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file cannot be read or holds nothing usable.
    #[error("{key}: cannot use {}: {reason}", path.display())]
    File {
        /// The configuration key naming the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The server answered the TLS request with "no".
    #[error("the server does not support TLS (postgres.sslmode = {0}): turn ssl on in postgresql.conf, or set postgres.sslmode = prefer or disable")]
    NotSupported(SslMode),
    /// The server refuses connections without TLS.
    #[error("the server requires TLS for this connection (pg_hba.conf has no entry without encryption): set postgres.sslmode = require, verify-ca or verify-full")]
    RequiredByServer,
    /// The certificate does not name the host connected to.
    #[error("the server certificate does not match the host {host:?} ({detail}): set postgres.host to a name the certificate lists, or use postgres.sslmode = verify-ca")]
    HostMismatch {
        /// `postgres.host`.
        host: String,
        /// What the TLS library said.
        detail: String,
    },
    /// No trusted CA signed the certificate, or it is otherwise invalid.
    #[error("the server certificate is not trusted ({0}): set postgres.sslrootcert to the CA file that signed it")]
    Untrusted(String),
    /// The handshake failed for another reason.
    #[error("TLS handshake with the server failed: {0}")]
    Handshake(String),
}

impl TlsError {
    /// The one classification point: unusable files are configuration
    /// errors; a refused or untrusted server will not change by retrying;
    /// anything else (a connection reset mid-handshake) is retried.
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::File { .. } => ErrorClass::Fatal(ExitCode::Config),
            Self::NotSupported(_)
            | Self::RequiredByServer
            | Self::HostMismatch { .. }
            | Self::Untrusted(_) => ErrorClass::Fatal(ExitCode::Upstream),
            Self::Handshake(_) => ErrorClass::Transient,
        }
    }

    /// Name the TLS problem in an error's text, if it is one. Both clients
    /// report handshake failures as text (pgwire-replication only as text),
    /// so one reading serves both.
    pub(crate) fn recognise(text: &str, cfg: &PostgresConfig) -> Option<Self> {
        let has = |needles: &[&str]| needles.iter().any(|n| text.contains(n));
        let detail = || text.rsplit(": ").next().unwrap_or(text).to_owned();
        if has(&["server does not support TLS"]) {
            Some(Self::NotSupported(cfg.sslmode))
        } else if has(&["no encryption"]) && has(&["pg_hba.conf"]) {
            Some(Self::RequiredByServer)
        } else if has(&["NotValidForName", "not valid for name"]) {
            Some(Self::HostMismatch {
                host: cfg.host.clone(),
                detail: detail(),
            })
        } else if has(&["invalid peer certificate"]) {
            Some(Self::Untrusted(detail()))
        } else if has(&["TLS handshake", "error performing TLS"]) {
            Some(Self::Handshake(text.to_owned()))
        } else {
            None
        }
    }
}

/// Report unusable `sslmode` combinations and unreadable certificate files.
pub(super) fn validate(cfg: &PostgresConfig, errors: &mut Vec<ConfigError>) {
    let mode = cfg.sslmode;
    if mode.requires() && cfg.host.starts_with('/') {
        errors.push(ConfigError::new(
            "postgres.sslmode",
            format!("{mode} needs a TCP host: TLS does not apply to Unix sockets"),
        ));
    }
    if mode == SslMode::VerifyFull && cfg.host.parse::<std::net::IpAddr>().is_ok() {
        errors.push(ConfigError::new(
            "postgres.host",
            "verify-full checks the certificate against a host name: use a name the server certificate lists, or sslmode = verify-ca",
        ));
    }
    if cfg.sslrootcert.is_some() && !mode.verifies() {
        errors.push(ConfigError::new(
            "postgres.sslrootcert",
            format!("is only used by sslmode = verify-ca or verify-full (sslmode is {mode}: the certificate would not be checked)"),
        ));
    }
    if cfg.sslcert.is_some() != cfg.sslkey.is_some() {
        errors.push(ConfigError::new(
            "postgres.sslcert",
            "a client certificate needs both sslcert and sslkey",
        ));
    }
    if mode == SslMode::Disable {
        return;
    }
    let ca = mode.verifies().then(|| roots(cfg).err()).flatten();
    let files = [ca, client_identity(cfg).err()];
    for e in files.into_iter().flatten() {
        if let TlsError::File { key, path, reason } = &e {
            let message = format!("cannot use {}: {reason}", path.display());
            errors.push(ConfigError::new(*key, message));
        }
    }
}

/// The CA certificates that verify the server: `sslrootcert`, else the
/// Mozilla root set (webpki-roots).
fn roots(cfg: &PostgresConfig) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    let Some(path) = &cfg.sslrootcert else {
        store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        return Ok(store);
    };
    let (added, _) = store.add_parsable_certificates(certificates(path, "postgres.sslrootcert")?);
    if added == 0 {
        return Err(file_error(
            "postgres.sslrootcert",
            path,
            "no usable CA certificate in it",
        ));
    }
    Ok(store)
}

/// The client certificate chain and key, if configured.
type Identity = Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>;

/// `sslcert` and `sslkey`, read and parsed.
fn client_identity(cfg: &PostgresConfig) -> Result<Identity, TlsError> {
    let (Some(cert), Some(key)) = (&cfg.sslcert, &cfg.sslkey) else {
        return Ok(None);
    };
    let chain = certificates(cert, "postgres.sslcert")?;
    let bytes = read(key, "postgres.sslkey")?;
    let key_der = PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| {
        file_error(
            "postgres.sslkey",
            key,
            &format!("no PEM private key in it ({e})"),
        )
    })?;
    Ok(Some((chain, key_der)))
}

/// Every PEM certificate in `path`; at least one.
fn certificates(path: &Path, key: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(path, key)?;
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&bytes).collect();
    match certs {
        Ok(certs) if !certs.is_empty() => Ok(certs),
        Ok(_) => Err(file_error(key, path, "no PEM certificate in it")),
        Err(e) => Err(file_error(key, path, &format!("not PEM ({e})"))),
    }
}

fn read(path: &Path, key: &'static str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| file_error(key, path, &e.to_string()))
}

fn file_error(key: &'static str, path: &Path, reason: &str) -> TlsError {
    TlsError::File {
        key,
        path: path.to_owned(),
        reason: reason.to_owned(),
    }
}

/// The rustls configuration of SQL connections for `cfg.sslmode`.
pub(super) fn client_config(cfg: &PostgresConfig) -> Result<ClientConfig, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Handshake(e.to_string()))?;
    let builder = match cfg.sslmode {
        SslMode::VerifyFull => builder.with_root_certificates(roots(cfg)?),
        mode => builder
            .dangerous()
            .with_custom_certificate_verifier(partial(cfg, mode.verifies(), None)?),
    };
    match client_identity(cfg)? {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).map_err(|e| {
            let path = cfg.sslkey.as_deref().unwrap_or(Path::new(""));
            file_error("postgres.sslkey", path, &e.to_string())
        }),
        None => Ok(builder.with_no_client_auth()),
    }
}

/// The server certificate a handshake presented, once it has.
pub(super) type Seen = Arc<Mutex<Option<CertificateDer<'static>>>>;

/// A verify-ca configuration without a client certificate that keeps the
/// server certificate it sees.
pub(super) fn chain_config(cfg: &PostgresConfig) -> Result<(ClientConfig, Seen), TlsError> {
    let seen = Seen::default();
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Handshake(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(partial(cfg, true, Some(seen.clone()))?)
        .with_no_client_auth();
    Ok((config, seen))
}

/// The one crypto provider (ring, as pgwire-replication's).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A [`Partial`] verifier over `cfg`'s roots.
fn partial(
    cfg: &PostgresConfig,
    check_chain: bool,
    seen: Option<Seen>,
) -> Result<Arc<Partial>, TlsError> {
    let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots(cfg)?), provider())
        .build()
        .map_err(|e| TlsError::Handshake(e.to_string()))?;
    Ok(Arc::new(Partial {
        inner,
        check_chain,
        seen,
    }))
}

/// The replication connection's TLS settings for `cfg.sslmode`.
pub(super) fn replication_tls(cfg: &PostgresConfig) -> TlsConfig {
    let mode = match cfg.sslmode {
        SslMode::Disable => WireMode::Disable,
        SslMode::Prefer => WireMode::Prefer,
        SslMode::Require => WireMode::Require,
        SslMode::VerifyCa => WireMode::VerifyCa,
        SslMode::VerifyFull => WireMode::VerifyFull,
    };
    let tls = TlsConfig {
        mode,
        ca_pem_path: cfg.sslrootcert.clone(),
        ..TlsConfig::default()
    };
    match (&cfg.sslcert, &cfg.sslkey) {
        (Some(cert), Some(key)) => tls.with_client_cert(cert, key),
        _ => tls,
    }
}

/// Verification short of verify-full: the chain only (verify-ca), or
/// nothing (prefer, require: encryption against passive listeners only).
/// Signatures of the handshake itself are always checked.
#[derive(Debug)]
struct Partial {
    inner: Arc<WebPkiServerVerifier>,
    check_chain: bool,
    /// Where to keep the server certificate, when asked.
    seen: Option<Seen>,
}

impl ServerCertVerifier for Partial {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(seen) = &self.seen {
            *seen.lock().unwrap_or_else(|e| e.into_inner()) = Some(end_entity.clone().into_owned());
        }
        if !self.check_chain {
            return Ok(ServerCertVerified::assertion());
        }
        let checked =
            self.inner
                .verify_server_cert(end_entity, intermediates, server_name, ocsp, now);
        match checked {
            Err(rustls::Error::InvalidCertificate(e)) if is_name_error(&e) => {
                Ok(ServerCertVerified::assertion())
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Whether a certificate error is only about the host name.
fn is_name_error(e: &rustls::CertificateError) -> bool {
    use rustls::CertificateError as C;
    matches!(e, C::NotValidForName | C::NotValidForNameContext { .. })
}

/// What one connection negotiated, for the start-up log and `pgcdc check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Security {
    /// The TLS version in use (`TLSv1.3`); `None`: not encrypted.
    pub tls_version: Option<String>,
    /// The configured mode (which tells what was verified).
    pub mode: SslMode,
}

/// Asks the server whether this session is encrypted (`pg_stat_ssl` is
/// readable by every role for its own sessions).
pub(super) const SECURITY_PROBE: &str =
    "SELECT version FROM pg_stat_ssl WHERE pid = pg_backend_pid() AND ssl";

impl Security {
    /// Whether the connection is encrypted.
    pub fn encrypted(&self) -> bool {
        self.tls_version.is_some()
    }

    /// What was verified: `ca and host name`, `ca`, or `nothing`.
    pub fn verified(&self) -> &'static str {
        match (self.encrypted(), self.mode) {
            (true, SslMode::VerifyFull) => "ca and host name",
            (true, SslMode::VerifyCa) => "ca",
            _ => "nothing",
        }
    }
}

impl Security {
    /// Log what `connection` (`sql`, `replication`) negotiated.
    pub fn log(&self, connection: &'static str) {
        tracing::info!(
            connection,
            encrypted = self.encrypted(),
            tls_version = self.tls_version.as_deref().unwrap_or("none"),
            verified = self.verified(),
            sslmode = %self.mode,
            "postgresql connection security"
        );
    }
}

impl std::fmt::Display for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mode = self.mode;
        match &self.tls_version {
            None if mode == SslMode::Disable => write!(f, "not encrypted (sslmode = disable)"),
            None => write!(f, "not encrypted (sslmode = {mode}: the server offers no TLS)"),
            Some(v) if mode.verifies() => write!(
                f,
                "encrypted ({v}), server certificate verified ({})",
                self.verified()
            ),
            Some(v) => write!(
                f,
                "encrypted ({v}), server certificate NOT verified (sslmode = {mode}; use verify-full)"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(mode: SslMode) -> PostgresConfig {
        PostgresConfig {
            sslmode: mode,
            tables: vec!["t".into()],
            ..Default::default()
        }
    }

    #[test]
    fn handshake_texts_become_actionable_errors() {
        let c = cfg(SslMode::VerifyFull);
        let cases = [
            ("error performing TLS handshake: server does not support TLS", "does not support TLS"),
            ("tls error: server does not support TLS (SSLRequest rejected)", "does not support TLS"),
            ("db error: FATAL: no pg_hba.conf entry for host \"127.0.0.1\", user \"u\", database \"d\", no encryption", "requires TLS"),
            ("error performing TLS handshake: invalid peer certificate: certificate not valid for name \"localhost\"; certificate is only valid for DnsName(\"db\")", "does not match the host \"localhost\""),
            ("tls error: TLS handshake failed: invalid peer certificate: NotValidForName", "does not match"),
            ("tls error: TLS handshake failed: invalid peer certificate: UnknownIssuer", "set postgres.sslrootcert"),
        ];
        for (text, words) in cases {
            let e = TlsError::recognise(text, &c).unwrap_or_else(|| panic!("{text}"));
            assert!(e.to_string().contains(words), "{text} -> {e}");
            assert_eq!(e.class(), ErrorClass::Fatal(ExitCode::Upstream), "{e}");
        }
        assert!(TlsError::recognise("connection refused", &c).is_none());
    }

    #[test]
    fn unusable_settings_and_files_are_named() {
        let mut c = cfg(SslMode::VerifyFull);
        c.host = "127.0.0.1".into();
        c.sslrootcert = Some("/nonexistent/ca.pem".into());
        c.sslcert = Some("/nonexistent/client.pem".into());
        let mut errors = Vec::new();
        validate(&c, &mut errors);
        let keys = crate::error_keys(&errors);
        assert_eq!(
            keys,
            ["postgres.host", "postgres.sslcert", "postgres.sslrootcert"]
        );
        assert!(
            errors[2].to_string().contains("/nonexistent/ca.pem"),
            "{errors:?}"
        );

        let mut c = cfg(SslMode::Require);
        c.sslrootcert = Some("/etc/hostname".into());
        c.host = "/run/postgresql".into();
        let mut errors = Vec::new();
        validate(&c, &mut errors);
        assert_eq!(
            crate::error_keys(&errors),
            ["postgres.sslmode", "postgres.sslrootcert"]
        );
    }

    #[test]
    fn a_file_without_certificates_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate\n").unwrap();
        let mut c = cfg(SslMode::VerifyCa);
        c.sslrootcert = Some(path);
        let e = roots(&c).unwrap_err();
        assert!(e.to_string().contains("no PEM certificate"), "{e}");
        assert_eq!(e.class(), ErrorClass::Fatal(ExitCode::Config));
    }

    #[test]
    fn security_says_what_was_verified() {
        let s = |v: Option<&str>, mode| Security {
            tls_version: v.map(Into::into),
            mode,
        };
        assert_eq!(
            s(Some("TLSv1.3"), SslMode::VerifyFull).to_string(),
            "encrypted (TLSv1.3), server certificate verified (ca and host name)"
        );
        assert!(s(Some("TLSv1.3"), SslMode::Require)
            .to_string()
            .contains("NOT verified"));
        assert!(s(None, SslMode::Prefer)
            .to_string()
            .contains("not encrypted"));
        assert_eq!(s(None, SslMode::VerifyFull).verified(), "nothing");
    }
}
