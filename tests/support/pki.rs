//! A throwaway PKI for TLS tests: a CA made with rcgen, server certificates for loopback (or a
//! given name), client certificates, all written as PEM files in the PKI's temp directory.
#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// A certificate and its key, as files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CertFiles {
    /// The key file's text, to search output for.
    pub fn key_pem(&self) -> String {
        std::fs::read_to_string(&self.key).expect("key file")
    }
}

pub struct Pki {
    dir: tempfile::TempDir,
    name: String,
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    /// A new CA named `name`.
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("CA key");
        let ca = CertifiedIssuer::self_signed(params, key).expect("CA certificate");
        let pki = Self {
            dir: tempfile::tempdir().expect("tempdir"),
            name: name.to_string(),
            ca,
        };
        std::fs::write(pki.ca_file(), pki.ca.pem()).expect("write CA");
        pki
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The CA certificate (PEM).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join(format!("{}-ca.pem", self.name))
    }

    /// A server certificate for `localhost` and `127.0.0.1`.
    pub fn server(&self, file_name: &str) -> CertFiles {
        self.server_for(file_name, &["localhost", "127.0.0.1"])
    }

    /// A server certificate for the given names (DNS names or IP addresses) only.
    pub fn server_for(&self, file_name: &str, names: &[&str]) -> CertFiles {
        self.issue(file_name, names, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate (for mTLS) with common name `file_name`.
    pub fn client(&self, file_name: &str) -> CertFiles {
        self.issue(file_name, &[], ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn issue(&self, file_name: &str, names: &[&str], usage: ExtendedKeyUsagePurpose) -> CertFiles {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("leaf params");
        params
            .distinguished_name
            .push(DnType::CommonName, file_name.to_string());
        params.extended_key_usages = vec![usage];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.ca).expect("sign leaf");
        let files = CertFiles {
            cert: self.dir.path().join(format!("{file_name}.pem")),
            key: self.dir.path().join(format!("{file_name}.key")),
        };
        std::fs::write(&files.cert, cert.pem()).expect("write certificate");
        write_private(&files.key, &key.serialize_pem());
        files
    }
}

/// Writes a file only its owner may read, as secrets should be.
pub fn write_private(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write secret file");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod 600");
}
