//! Server TLS for `distlock serve` (rustls, no OpenSSL): the certificate, key and optional client
//! CA read from PEM files, turned into a rustls configuration, and swapped for a fresh one on
//! SIGHUP without touching connections already open.
//!
//! A handshake takes whatever configuration is current when the connection is accepted; a
//! connection keeps the session it negotiated, so a reload never drops anyone. A reload that fails
//! (a half-written file, a key that does not match) is logged and the old configuration stays.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

use crate::Error;

/// The PEM files TLS is made of (`--tls-cert`, `--tls-key`, `--tls-client-ca`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The server's certificate chain, leaf first.
    pub cert: PathBuf,
    /// The private key of the leaf certificate (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// When given, clients must present a certificate signed by one of these CAs (mTLS).
    pub client_ca: Option<PathBuf>,
}

/// The current rustls configuration, replaced as a whole on reload.
pub struct Tls {
    files: TlsFiles,
    current: RwLock<TlsAcceptor>,
}

impl Tls {
    /// Reads and checks the files; fails with a message naming the file at fault.
    pub fn load(files: TlsFiles) -> crate::Result<Tls> {
        let config = server_config(&files)?;
        Ok(Tls { files, current: RwLock::new(TlsAcceptor::from(config)) })
    }

    /// Whether clients must present a certificate.
    pub fn mutual(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// The acceptor new connections use (cheap: an `Arc` clone).
    pub fn acceptor(&self) -> TlsAcceptor {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Reads the files again and, when they make a valid configuration, uses it for every new
    /// connection. Connections already open keep theirs.
    pub fn reload(&self) -> crate::Result<()> {
        let config = server_config(&self.files)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = TlsAcceptor::from(config);
        Ok(())
    }

    /// Reloads on every SIGHUP until the process ends (other parts of the server may listen to
    /// SIGHUP too: each listener gets every signal).
    pub fn reload_on_sighup(self: Arc<Self>) {
        #[cfg(unix)]
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let mut hup = match signal(SignalKind::hangup()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("cannot listen for SIGHUP; TLS files will not be reloaded: {e}");
                    return;
                }
            };
            while hup.recv().await.is_some() {
                match self.reload() {
                    Ok(()) => {
                        tracing::info!(cert = %self.files.cert.display(), "SIGHUP: TLS certificate and key reloaded")
                    }
                    Err(e) => {
                        tracing::error!("SIGHUP: TLS files not reloaded, keeping the previous ones: {e:#}")
                    }
                }
            }
        });
    }
}

fn read(path: &Path, what: &str) -> crate::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::File(format!("reading the TLS {what} {}: {e}", path.display())))
}

fn certificates(path: &Path, what: &str) -> crate::Result<Vec<CertificateDer<'static>>> {
    let pem = read(path, what)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::File(format!("the TLS {what} {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(Error::File(format!("the TLS {what} {} holds no PEM certificate", path.display())));
    }
    Ok(certs)
}

/// Builds the rustls configuration the files describe (HTTP/1.1 only, like the plain listener).
fn server_config(files: &TlsFiles) -> crate::Result<Arc<ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certificates(&files.cert, "certificate")?;
    let key = PrivateKeyDer::from_pem_slice(&read(&files.key, "key")?)
        .map_err(|e| Error::File(format!("the TLS key {}: {e}", files.key.display())))?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Settings(format!("TLS protocol versions: {e}")))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates(path, "client CA")? {
                roots
                    .add(cert)
                    .map_err(|e| Error::File(format!("the TLS client CA {}: {e}", path.display())))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| Error::File(format!("the TLS client CA {}: {e}", path.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| {
        Error::File(format!(
            "the TLS certificate {} and key {} do not go together: {e}",
            files.cert.display(),
            files.key.display()
        ))
    })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
