//! Secrets kept in files: passwords, tokens, NKey seeds, creds and TLS keys named by the config,
//! directly or under `${CREDENTIALS_DIRECTORY}` (systemd `LoadCredential=`).
//!
//! A password read from a file meets the same rule as an inline one (no known default, no
//! short or one-character password), at start and in `validate`. A secret file others can read
//! is warned about by name. Nothing here ever puts a secret's value into a message.

use std::path::{Path, PathBuf};

use crate::common::tls;
use crate::config::{resolve_path, weak_password, Config, Secret};

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("{0}")]
    Path(String),
    #[error("cannot read {what} file {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} file {path} is empty")]
    Empty { what: &'static str, path: PathBuf },
    #[error("{what} file {path} is not {expected}")]
    Malformed {
        what: &'static str,
        path: PathBuf,
        expected: &'static str,
    },
    #[error("the {what} in {path} is {why}; use a long random one")]
    Weak {
        what: &'static str,
        path: PathBuf,
        why: &'static str,
    },
}

/// Reads a secret from a file, trimming the trailing newline editors add.
pub(crate) fn read(what: &'static str, path: &Path) -> Result<Secret, SecretError> {
    let path = resolve_path(path).map_err(SecretError::Path)?;
    warn_if_readable_by_others(&path);
    let text = std::fs::read_to_string(&path).map_err(|source| SecretError::Read {
        what,
        path: path.clone(),
        source,
    })?;
    let secret = text.trim_end_matches(['\n', '\r']);
    if secret.is_empty() {
        return Err(SecretError::Empty { what, path });
    }
    Ok(Secret::new(secret.to_string()))
}

/// Reads a password from a file and refuses a weak one, as the config does for inline ones.
pub(crate) fn read_password(what: &'static str, path: &Path) -> Result<Secret, SecretError> {
    let secret = read(what, path)?;
    match weak_password(secret.expose()) {
        Some(why) => Err(SecretError::Weak {
            what,
            path: resolve_path(path).unwrap_or_else(|_| path.to_path_buf()),
            why,
        }),
        None => Ok(secret),
    }
}

/// The error for a secret file whose content is not what its key expects (never quoting it).
pub(crate) fn malformed(what: &'static str, path: &Path, expected: &'static str) -> SecretError {
    SecretError::Malformed {
        what,
        path: resolve_path(path).unwrap_or_else(|_| path.to_path_buf()),
        expected,
    }
}

/// A secret file that others may read is worth a warning naming it (never its content).
pub(crate) fn warn_if_readable_by_others(path: &Path) {
    if readable_by_others(path) {
        tracing::warn!(file = %path.display(), "secret file is readable by every user; chmod o-r it");
    }
}

fn readable_by_others(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|meta| meta.permissions().mode() & 0o004 != 0)
}

/// What `validate` finds in the files a config names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Finding {
    /// The line of the section that names the file.
    pub line: usize,
    pub message: String,
    /// A problem fails `validate`; a note is only printed.
    pub problem: bool,
}

impl Finding {
    fn problem(line: usize, message: String) -> Self {
        Self {
            line,
            message,
            problem: true,
        }
    }

    fn note(line: usize, message: String) -> Self {
        Self {
            line,
            message,
            problem: false,
        }
    }
}

/// Reads every secret and TLS file the config names, as `run` will; `nats_line` is the line of
/// the `[nats]` header. Paths under `${CREDENTIALS_DIRECTORY}` are noted as unchecked when that
/// variable is not set (systemd sets it only for the service).
pub(crate) fn check_files(config: &Config, nats_line: usize) -> Vec<Finding> {
    let mut found = Vec::new();
    let n = &config.nats;
    let nats_files = [
        &n.password_file,
        &n.token_file,
        &n.nkey_seed_file,
        &n.creds_file,
    ];
    let nats_paths = nats_files.iter().filter_map(|p| p.as_deref());
    match nats_paths.clone().find_map(unresolvable) {
        Some(why) => found.push(Finding::note(nats_line, why)),
        None => {
            if let Err(e) = crate::uplink::nats::Identity::load(n) {
                found.push(Finding::problem(nats_line, e.to_string()));
            }
        }
    }
    for m in &config.mqtt {
        let Some(path) = &m.password_file else {
            continue;
        };
        match unresolvable(path) {
            Some(why) => found.push(Finding::note(m.line, why)),
            None => {
                if let Err(e) = read_password("[[mqtt]] password", path) {
                    found.push(Finding::problem(m.line, e.to_string()));
                }
            }
        }
    }

    let mut tls = vec![(nats_line, n.tls_files(), "[nats]".to_string())];
    for m in &config.mqtt {
        tls.push((m.line, m.tls_files(), format!("[[mqtt]] `{}`", m.name)));
    }
    for (line, files, label) in tls {
        let Some(files) = files else { continue };
        let paths = [files.ca, files.cert, files.key];
        if let Some(why) = paths.into_iter().flatten().find_map(unresolvable) {
            found.push(Finding::note(line, why));
        } else if let Err(e) = tls::client_config(&files, &label) {
            found.push(Finding::problem(line, format!("{label} TLS: {e}")));
        }
    }

    let mut secret_files: Vec<(usize, &Path)> = nats_paths
        .chain(n.tls_key_file.as_deref())
        .map(|p| (nats_line, p))
        .collect();
    for m in &config.mqtt {
        for p in [&m.password_file, &m.tls_key_file].into_iter().flatten() {
            secret_files.push((m.line, p));
        }
    }
    for (line, path) in secret_files {
        if let Some(resolved) = resolve_path(path).ok().filter(|p| readable_by_others(p)) {
            found.push(Finding::note(
                line,
                format!(
                    "secret file {} is readable by every user; chmod o-r it",
                    resolved.display()
                ),
            ));
        }
    }
    found
}

/// A note when `path` names `${CREDENTIALS_DIRECTORY}` and that is not set here.
fn unresolvable(path: &Path) -> Option<String> {
    resolve_path(path)
        .err()
        .map(|e| format!("not checked here: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_weak_password_in_a_file_is_refused_without_quoting_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nats.password");
        std::fs::write(&path, "Changeme2024\n").unwrap();
        let e = read_password("[nats] password", &path)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("known default") && e.contains("nats.password"),
            "{e}"
        );
        assert!(!e.contains("Changeme2024"), "{e}");

        std::fs::write(&path, "\n").unwrap();
        let e = read_password("[nats] password", &path)
            .unwrap_err()
            .to_string();
        assert!(e.contains("is empty"), "{e}");

        std::fs::write(&path, "k3v-9Lq!tr8z-WmX\r\n").unwrap();
        assert_eq!(
            read_password("[nats] password", &path).unwrap().expose(),
            "k3v-9Lq!tr8z-WmX"
        );
    }
}
