//! TLS client settings shared by the NATS link and the MQTT sources: a rustls `ClientConfig`
//! (ring provider) from a CA file, an optional client certificate and key, and an optional
//! server name to check the server's certificate against.
//!
//! Every file is read and checked when the config is built, so a wrong path or a damaged PEM
//! stops the part at start (and fails `validate`) instead of failing each connection attempt.
//! Handshake problems that only the connection sees (a certificate from another CA, a server
//! that wants a client certificate) are logged here with their cause, since the NATS client
//! reports them only as "tls error". No message ever carries key material.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::common::log_limit::LogLimit;

/// Defined with the config sections it is read from; re-exported where it is used.
pub use crate::config::TlsFiles;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{0}")]
    Path(String),
    #[error("cannot read {what} {path}: {problem}")]
    File {
        what: &'static str,
        path: PathBuf,
        problem: String,
    },
    #[error("{what} {path}: {problem}")]
    Content {
        what: &'static str,
        path: PathBuf,
        problem: String,
    },
    #[error("no trusted CA certificates: tls_ca_file is not set and the system has none ({0})")]
    NoSystemRoots(String),
    #[error("tls_server_name `{0}` is not a DNS name or IP address")]
    ServerName(String),
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A client config and the last handshake problem it saw, for `/readyz` and status lines.
#[derive(Clone)]
pub struct ClientTls {
    pub config: Arc<ClientConfig>,
    problem: Arc<Mutex<Option<String>>>,
}

impl ClientTls {
    /// The last handshake problem seen since `clear_problem`.
    pub(crate) fn last_problem(&self) -> Option<String> {
        self.problem
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Forgets the last problem, once a connection is up.
    pub(crate) fn clear_problem(&self) {
        *self.problem.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// Builds the client config; `peer` names the link in log lines ("NATS", "MQTT source farm").
pub fn client_config(files: &TlsFiles<'_>, peer: &str) -> Result<ClientTls, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = Arc::new(match files.ca {
        Some(ca) => load_roots(ca)?,
        None => system_roots()?,
    });
    let server_name = files
        .server_name
        .map(|n| {
            ServerName::try_from(n.to_string()).map_err(|_| TlsError::ServerName(n.to_string()))
        })
        .transpose()?;
    let identity = match (files.cert, files.key) {
        (Some(cert), Some(key)) => Some(Arc::new(load_identity(cert, key, &provider)?)),
        _ => None,
    };
    let problem = Arc::new(Mutex::new(None));
    let report = Report {
        peer: peer.to_string(),
        problem: problem.clone(),
        log: Arc::new(LogLimit::new(Duration::from_secs(60))),
    };
    let verifier = Verifier {
        inner: WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?,
        server_name,
        report: report.clone(),
    };
    // `dangerous()` only because the verifier is our own: rustls' WebPKI verifier with the name
    // possibly fixed and its failures reported; it checks exactly what the default one does.
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(Identity { identity, report }));
    Ok(ClientTls {
        config: Arc::new(config),
        problem,
    })
}

fn resolve(path: &Path) -> Result<PathBuf, TlsError> {
    crate::config::resolve_path(path).map_err(TlsError::Path)
}

fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let what = "tls_ca_file";
    let certs = load_certs(what, path)?;
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots.add(cert).map_err(|e| TlsError::Content {
            what,
            path: path.to_path_buf(),
            problem: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(roots)
}

fn system_roots() -> Result<RootCertStore, TlsError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = found
            .errors
            .first()
            .map_or("none installed".to_string(), |e| e.to_string());
        return Err(TlsError::NoSystemRoots(why));
    }
    Ok(roots)
}

fn load_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let resolved = resolve(path)?;
    let certs = CertificateDer::pem_file_iter(&resolved)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| pem_error(what, &resolved, e))?;
    if certs.is_empty() {
        return Err(TlsError::Content {
            what,
            path: resolved,
            problem: "no PEM certificate (-----BEGIN CERTIFICATE-----) in it".into(),
        });
    }
    Ok(certs)
}

fn load_identity(
    cert: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let chain = load_certs("tls_cert_file", cert)?;
    let key_path = resolve(key)?;
    crate::common::secrets::warn_if_readable_by_others(&key_path);
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .map_err(|e| pem_error("tls_key_file", &key_path, e))?;
    CertifiedKey::from_der(chain, key, provider).map_err(|e| TlsError::Content {
        what: "tls_key_file",
        path: key_path,
        problem: match e {
            rustls::Error::InconsistentKeys(_) => {
                "this key does not belong to the certificate in tls_cert_file".into()
            }
            other => format!("not a usable private key: {other}"),
        },
    })
}

/// A PEM error as a sentence that never quotes the file's content.
fn pem_error(what: &'static str, path: &Path, e: rustls::pki_types::pem::Error) -> TlsError {
    use rustls::pki_types::pem::Error;
    let path = path.to_path_buf();
    let problem = match e {
        Error::Io(source) => {
            return TlsError::File {
                what,
                path,
                problem: source.to_string(),
            }
        }
        Error::NoItemsFound => {
            "nothing of the expected kind in it (PEM with -----BEGIN ...----- sections)".into()
        }
        Error::SectionTooLarge => "a PEM section is too large".into(),
        _ => "damaged PEM (a section's BEGIN/END lines or its base64 are broken)".into(),
    };
    TlsError::Content {
        what,
        path,
        problem,
    }
}

/// Logs handshake problems of one link (once a minute) and keeps the last for `/readyz`.
#[derive(Clone)]
struct Report {
    peer: String,
    problem: Arc<Mutex<Option<String>>>,
    log: Arc<LogLimit>,
}

impl std::fmt::Debug for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Report").field("peer", &self.peer).finish()
    }
}

impl Report {
    fn record(&self, problem: String, refused: bool) {
        if let Some(held) = self.log.admit() {
            if refused {
                tracing::error!(link = %self.peer, problem = %problem, repeats = held, "TLS handshake refused");
            } else {
                tracing::warn!(link = %self.peer, problem = %problem, repeats = held, "TLS handshake");
            }
        }
        *self.problem.lock().unwrap_or_else(|e| e.into_inner()) = Some(problem);
    }
}

/// WebPKI verification against the configured roots, optionally for a fixed server name.
#[derive(Debug)]
struct Verifier {
    inner: Arc<WebPkiServerVerifier>,
    server_name: Option<ServerName<'static>>,
    report: Report,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let name = self.server_name.as_ref().unwrap_or(server_name);
        let result =
            self.inner
                .verify_server_cert(end_entity, intermediates, name, ocsp_response, now);
        if let Err(e) = &result {
            let hint = match e {
                rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer) => {
                    "; is tls_ca_file the CA that signed the server's certificate?"
                }
                rustls::Error::InvalidCertificate(
                    rustls::CertificateError::NotValidForName
                    | rustls::CertificateError::NotValidForNameContext { .. },
                ) => "; connect by a name the certificate carries, or set tls_server_name",
                _ => "",
            };
            self.report.record(
                format!(
                    "server certificate rejected for {}: {e}{hint}",
                    name.to_str()
                ),
                true,
            );
        }
        result
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

/// The client certificate, if any; says so when a server asks for one we do not have.
#[derive(Debug)]
struct Identity {
    identity: Option<Arc<CertifiedKey>>,
    report: Report,
}

impl ResolvesClientCert for Identity {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        if self.identity.is_none() {
            self.report.record(
                "the server asks for a client certificate and none is configured; if it requires one (mTLS), set tls_cert_file and tls_key_file".into(),
                false,
            );
        }
        self.identity.clone()
    }

    fn has_certs(&self) -> bool {
        // Always answer a CertificateRequest, so a missing certificate is reported above.
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files<'a>(ca: &'a Path, cert: &'a Path, key: &'a Path) -> TlsFiles<'a> {
        TlsFiles {
            ca: Some(ca),
            cert: Some(cert),
            key: Some(key),
            server_name: None,
        }
    }

    #[test]
    fn key_problems_are_named_without_quoting_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let one = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let other = rcgen::KeyPair::generate().unwrap();
        let ca = dir.path().join("ca.pem");
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        std::fs::write(&ca, one.cert.pem()).unwrap();
        std::fs::write(&cert, one.cert.pem()).unwrap();
        std::fs::write(&key, one.signing_key.serialize_pem()).unwrap();
        assert!(client_config(&files(&ca, &cert, &key), "test").is_ok());

        std::fs::write(&key, other.serialize_pem()).unwrap();
        let e = client_config(&files(&ca, &cert, &key), "test")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("does not belong to the certificate"), "{e}");

        let damaged =
            "-----BEGIN PRIVATE KEY-----\nS3cr3t!!Key*Material\n-----END PRIVATE KEY-----\n";
        std::fs::write(&key, damaged).unwrap();
        let e = client_config(&files(&ca, &cert, &key), "test")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("tls_key_file") && e.contains("key.pem"), "{e}");
        assert!(!e.contains("S3cr3t") && !e.contains("Material"), "{e}");

        std::fs::write(&ca, "not a certificate\n").unwrap();
        let e = client_config(&files(&ca, &cert, &key), "test")
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("tls_ca_file") && e.contains("no PEM certificate"),
            "{e}"
        );

        let missing = dir.path().join("missing.pem");
        let e = client_config(&files(&missing, &cert, &key), "test")
            .err()
            .unwrap()
            .to_string();
        assert!(e.starts_with("cannot read tls_ca_file"), "{e}");
    }
}
