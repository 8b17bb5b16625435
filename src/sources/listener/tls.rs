//! TLS for a listener: rustls with the ring provider; the server certificate chain and key
//! from PEM files; and, when `tls_client_ca_file` is set, a client certificate required from
//! every client and verified against that CA before any MQTT byte is read.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

use crate::config::MqttListener;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what} {path}: {detail}")]
    File {
        what: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("TLS setup: {0}")]
    Setup(String),
}

/// The acceptor for a listener with `tls_cert_file`; `None` for a plaintext one.
pub(crate) fn acceptor(listener: &MqttListener) -> Result<Option<TlsAcceptor>, TlsError> {
    let (Some(cert_file), Some(key_file)) = (&listener.tls_cert_file, &listener.tls_key_file)
    else {
        return Ok(None);
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = certificates("tls_cert_file", cert_file)?;
    let key_path = resolve("tls_key_file", key_file)?;
    crate::common::secrets::warn_if_readable_by_others(&key_path);
    let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| TlsError::File {
        what: "tls_key_file",
        path: key_path.clone(),
        detail: format!("no usable private key ({e})"),
    })?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup(e.to_string()))?;
    let builder = match &listener.tls_client_ca_file {
        Some(ca_file) => {
            let mut roots = RootCertStore::empty();
            for ca in certificates("tls_client_ca_file", ca_file)? {
                roots.add(ca).map_err(|e| TlsError::File {
                    what: "tls_client_ca_file",
                    path: ca_file.clone(),
                    detail: e.to_string(),
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::Setup(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::File {
            what: "tls_cert_file",
            path: cert_file.clone(),
            detail: format!("does not go with tls_key_file: {e}"),
        })?;
    Ok(Some(TlsAcceptor::from(Arc::new(config))))
}

fn resolve(what: &'static str, path: &Path) -> Result<PathBuf, TlsError> {
    crate::config::resolve_path(path).map_err(|detail| TlsError::File {
        what,
        path: path.to_path_buf(),
        detail,
    })
}

/// Every certificate in a PEM file; at least one.
fn certificates(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let path = resolve(what, path)?;
    let fail = |detail: String| TlsError::File {
        what,
        path: path.clone(),
        detail,
    };
    let certs = CertificateDer::pem_file_iter(&path)
        .map_err(|e| fail(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(e.to_string()))?;
    if certs.is_empty() {
        return Err(fail("holds no PEM certificate".into()));
    }
    Ok(certs)
}
