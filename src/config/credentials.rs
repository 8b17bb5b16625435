//! Where secrets and TLS material come from, and which passwords are refused. Config checks use
//! these, and so do the modules that read the files at run time (`secrets`, `tls`, the
//! listener), which is why they live here, at the bottom of the crate.

use std::path::{Path, PathBuf};

/// The TLS keys of a `[nats]` or `[[mqtt]]` section.
#[derive(Debug, Clone, Copy)]
pub struct TlsFiles<'a> {
    /// CA certificates (PEM) that signed the server's certificate; the system's when `None`.
    pub ca: Option<&'a Path>,
    /// Client certificate chain (PEM), for servers that verify clients (mTLS).
    pub cert: Option<&'a Path>,
    pub key: Option<&'a Path>,
    /// Name the server's certificate must carry, instead of the host of its URL.
    pub server_name: Option<&'a str>,
}

impl<'a> TlsFiles<'a> {
    /// From a config section's `tls_ca_file`, `tls_cert_file`, `tls_key_file`, `tls_server_name`.
    pub fn new(
        ca: &'a Option<PathBuf>,
        cert: &'a Option<PathBuf>,
        key: &'a Option<PathBuf>,
        server_name: &'a Option<String>,
    ) -> Self {
        Self {
            ca: ca.as_deref(),
            cert: cert.as_deref(),
            key: key.as_deref(),
            server_name: server_name.as_deref(),
        }
    }
}

/// A `tls_server_name` must be something a certificate can carry.
pub(super) fn check_server_name(name: Option<&str>) -> Option<String> {
    let name = name?;
    rustls::pki_types::ServerName::try_from(name)
        .is_err()
        .then(|| format!("tls_server_name `{name}` is not a DNS name or IP address"))
}

/// Expands `${CREDENTIALS_DIRECTORY}` (set by systemd's `LoadCredential=`) in a file path.
pub(crate) fn resolve_path(path: &Path) -> Result<PathBuf, String> {
    const VAR: &str = "${CREDENTIALS_DIRECTORY}";
    let text = path.to_string_lossy();
    if !text.contains(VAR) {
        return Ok(path.to_path_buf());
    }
    let dir = std::env::var("CREDENTIALS_DIRECTORY").map_err(|_| {
        format!(
            "{} uses ${{CREDENTIALS_DIRECTORY}}, which is only set when systemd passes credentials (LoadCredential=)",
            path.display()
        )
    })?;
    Ok(PathBuf::from(text.replace(VAR, &dir)))
}

/// Passwords that are defaults somewhere or trivially guessed; `Some(why)` if `password` is one.
pub(crate) fn weak_password(password: &str) -> Option<&'static str> {
    const KNOWN: [&str; 20] = [
        "password",
        "passw0rd",
        "admin",
        "administrator",
        "changeme",
        "change-me",
        "secret",
        "nats",
        "mosquitto",
        "guest",
        "default",
        "test",
        "sahool",
        "root",
        "toor",
        "letmein",
        "qwerty",
        "123456",
        "12345678",
        "1234567890",
    ];
    let lower = password.to_ascii_lowercase();
    if KNOWN
        .iter()
        .any(|k| lower == *k || lower.trim_end_matches(|c: char| c.is_ascii_digit()) == *k)
    {
        Some("a known default")
    } else if password.chars().count() < 12 {
        Some("shorter than 12 characters")
    } else if password
        .chars()
        .all(|c| c == password.chars().next().unwrap_or(c))
    {
        Some("one repeated character")
    } else {
        None
    }
}
