//! TLS for the `https://` lock-server client (rustls): which certificates to trust, an optional
//! client certificate, and one-line messages for handshakes that fail.
//!
//! Trust: the CA certificates in `ca=PATH` (PEM) when given, else the operating system's roots
//! (read once per client with `rustls-native-certs`, as `rediss://` does through the redis crate),
//! so a server certificate from the organisation's own CA that is installed system-wide works
//! without parameters. `cert=PATH&key=PATH` present a client certificate (for a server started
//! with `--tls-client-ca`).

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};

use crate::error::{Error, Result};

/// The `ca`, `cert` and `key` parameters of an `https://` URL.
#[derive(Debug, Default, Clone)]
pub(super) struct TlsParams {
    pub ca: Option<String>,
    pub cert: Option<String>,
    pub key: Option<String>,
}

impl TlsParams {
    /// Whether any was given.
    pub(super) fn any(&self) -> bool {
        self.ca.is_some() || self.cert.is_some() || self.key.is_some()
    }
}

fn read(path: &str, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::InvalidInput(format!("reading the TLS {what} {path}: {e}")))
}

fn certificates(path: &str, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let pem = read(path, what)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::InvalidInput(format!("the TLS {what} {path}: {e}")))?;
    if certs.is_empty() {
        return Err(Error::InvalidInput(format!("the TLS {what} {path} holds no PEM certificate")));
    }
    Ok(certs)
}

/// The rustls client configuration the parameters describe.
pub(super) fn client_config(params: &TlsParams) -> Result<Arc<ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    match &params.ca {
        Some(path) => {
            for cert in certificates(path, "CA")? {
                roots.add(cert).map_err(|e| Error::InvalidInput(format!("the TLS CA {path}: {e}")))?;
            }
        }
        None => {
            // With none found every server is untrusted, and each call says so (and names ca=).
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                tracing::debug!(errors = ?found.errors, "no system root certificates found");
            }
        }
    }
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::InvalidInput(format!("TLS: {e}")))?
        .with_root_certificates(roots);
    let mut config = match (&params.cert, &params.key) {
        (Some(cert), Some(key)) => {
            let chain = certificates(cert, "client certificate")?;
            let key = PrivateKeyDer::from_pem_slice(&read(key, "client key")?)
                .map_err(|e| Error::InvalidInput(format!("the TLS client key {key}: {e}")))?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                Error::InvalidInput(format!(
                    "the TLS client certificate {cert} and key do not go together: {e}"
                ))
            })?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => return Err(Error::InvalidInput("cert= and key= go together".into())),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The name the server's certificate must carry: the URL's host (an IP address or a DNS name).
pub(super) fn server_name(host: &str) -> Result<ServerName<'static>> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_owned())
        .map_err(|_| Error::InvalidInput(format!("{host:?} is not a host name TLS can check")))
}

/// A one-line account of a failure whose cause is TLS, or `None` when TLS is not the cause.
pub(super) fn explain(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut source = Some(error);
    while let Some(e) = source {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(describe(tls));
        }
        // An `io::Error`'s `source` skips the error it wraps: look inside it here.
        let inner = e.downcast_ref::<std::io::Error>().and_then(std::io::Error::get_ref);
        if let Some(tls) = inner.and_then(|i| i.downcast_ref::<rustls::Error>()) {
            return Some(describe(tls));
        }
        source = e.source();
    }
    None
}

fn describe(e: &rustls::Error) -> String {
    use rustls::{AlertDescription as Alert, CertificateError as Cert, Error as E};
    match e {
        E::InvalidCertificate(Cert::UnknownIssuer | Cert::BadSignature) => format!(
            "the server's TLS certificate is not trusted ({e}): it is not signed by a CA this client \
             trusts; give the CA that signed it with ?ca=PATH"
        ),
        E::InvalidCertificate(Cert::NotValidForName | Cert::NotValidForNameContext { .. }) => {
            format!("the server's TLS certificate is not trusted ({e}): it does not name the host in the URL")
        }
        E::InvalidCertificate(_) => format!("the server's TLS certificate is not trusted ({e})"),
        E::AlertReceived(Alert::CertificateRequired) => {
            "the server requires a client certificate (give cert=PATH&key=PATH)".to_owned()
        }
        // What a server that verifies clients answers to a certificate it does not accept
        // (decrypt_error: a CA of the same name whose signature does not verify).
        E::AlertReceived(
            Alert::BadCertificate
            | Alert::UnknownCA
            | Alert::CertificateUnknown
            | Alert::CertificateExpired
            | Alert::CertificateRevoked
            | Alert::UnsupportedCertificate
            | Alert::AccessDenied
            | Alert::DecryptError,
        ) => format!("the server refused this client's TLS certificate ({e})"),
        other => format!("TLS failed: {other}"),
    }
}
