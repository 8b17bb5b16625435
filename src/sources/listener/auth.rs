//! Who may publish to a listener with `auth = "password"`: user names with argon2 password
//! hashes from a file, one `user:$argon2id$v=19$...` (PHC string) per line, `#` comments. The
//! `sahool-gateway passwd FILE USER` command writes such lines.
//!
//! Checking a password is slow by design (that is what makes a stolen file hard to crack), so
//! checks run on the blocking pool, a few at a time: a flood of CONNECTs queues up instead of
//! taking every core. An unknown user costs as much as a wrong password, so timing does not
//! tell which user names exist. Passwords are never logged.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::SaltString;
use argon2::{Argon2, PasswordHash, PasswordHasher, PasswordVerifier};
use tokio::sync::Semaphore;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read password file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("password file {path}, line {line}: {reason}")]
    Format {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("password file {0}: {1}")]
    Path(PathBuf, String),
    #[error("cannot write password file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("user name `{0}` must be non-empty, without `:`, spaces or control characters")]
    BadUser(String),
    #[error("the password is {0}; use a long random one")]
    Weak(&'static str),
    #[error("cannot hash the password: {0}")]
    Hash(String),
}

/// The users of one password file.
#[derive(Debug, Default)]
pub(crate) struct Passwords {
    /// user → PHC hash string.
    users: HashMap<String, String>,
}

impl Passwords {
    /// Reads and checks the file: every line a user with a parseable argon2 hash.
    pub(crate) fn load(path: &Path) -> Result<Self, AuthError> {
        let path = &crate::config::resolve_path(path)
            .map_err(|e| AuthError::Path(path.to_path_buf(), e))?;
        crate::common::secrets::warn_if_readable_by_others(path);
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
            path: path.clone(),
            source,
        })?;
        Self::parse(&text).map_err(|(line, reason)| AuthError::Format {
            path: path.clone(),
            line,
            reason,
        })
    }

    fn parse(text: &str) -> Result<Self, (usize, String)> {
        let mut users = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((user, hash)) = line.split_once(':') else {
                return Err((i + 1, "expected `user:$argon2id$...`".into()));
            };
            check_user(user).map_err(|e| (i + 1, e.to_string()))?;
            let parsed = PasswordHash::new(hash)
                .map_err(|e| (i + 1, format!("user {user}: not a PHC hash string ({e})")))?;
            if !parsed.algorithm.as_str().starts_with("argon2") {
                return Err((
                    i + 1,
                    format!(
                        "user {user}: hash algorithm `{}` is not argon2; write it with `sahool-gateway passwd`",
                        parsed.algorithm
                    ),
                ));
            }
            if users.insert(user.to_string(), hash.to_string()).is_some() {
                return Err((i + 1, format!("user {user} appears twice")));
            }
        }
        Ok(Self { users })
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.users.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// True if `password` is `user`'s. Slow (argon2): call from the blocking pool.
    pub(crate) fn verify(&self, user: &str, password: &str) -> bool {
        let (hash, known) = match self.users.get(user) {
            Some(h) => (h.as_str(), true),
            None => (dummy_hash(), false),
        };
        let Ok(parsed) = PasswordHash::new(hash) else {
            return false;
        };
        let matches = Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok();
        known && matches
    }
}

/// A hash to check unknown users against, so they take as long as known ones.
fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| hash("no user has this password").unwrap_or_default())
}

/// The password file in force; a reload swaps the inner `Arc`.
pub(crate) type SharedPasswords = Arc<RwLock<Arc<Passwords>>>;

/// Checks CONNECT credentials against the password file, a few at a time.
pub(crate) struct Authenticator {
    passwords: SharedPasswords,
    permits: Semaphore,
}

/// Password checks running at once: argon2 takes a core (and its memory) per check.
const CONCURRENT_CHECKS: usize = 2;

impl Authenticator {
    pub(crate) fn new(passwords: SharedPasswords) -> Self {
        Self {
            passwords,
            permits: Semaphore::new(CONCURRENT_CHECKS),
        }
    }

    pub(crate) async fn check(&self, user: &str, password: &str) -> bool {
        let Ok(_permit) = self.permits.acquire().await else {
            return false;
        };
        let passwords = self
            .passwords
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let (user, password) = (user.to_string(), password.to_string());
        tokio::task::spawn_blocking(move || passwords.verify(&user, &password))
            .await
            .unwrap_or(false)
    }
}

fn check_user(user: &str) -> Result<(), AuthError> {
    if user.is_empty()
        || user
            .chars()
            .any(|c| c == ':' || c.is_whitespace() || c.is_control())
    {
        return Err(AuthError::BadUser(user.to_string()));
    }
    Ok(())
}

/// An argon2id PHC hash of `password` with a fresh random salt and the crate's default cost.
pub(crate) fn hash(password: &str) -> Result<String, AuthError> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| AuthError::Hash(e.to_string()))
}

/// `passwd`: sets `user`'s password in the file at `path` (created if missing, mode 0600),
/// keeping every other line. The file is replaced atomically.
pub(crate) fn set_password(path: &Path, user: &str, password: &str) -> Result<(), AuthError> {
    check_user(user)?;
    if let Some(why) = crate::config::weak_password(password) {
        return Err(AuthError::Weak(why));
    }
    let existing = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(source) => {
            return Err(AuthError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let line = format!("{user}:{}", hash(password)?);
    let mut replaced = false;
    let mut lines: Vec<String> = existing
        .lines()
        .map(|l| match l.trim().split_once(':') {
            Some((u, _)) if u == user && !l.trim_start().starts_with('#') => {
                replaced = true;
                line.clone()
            }
            _ => l.to_string(),
        })
        .collect();
    if !replaced {
        lines.push(line);
    }
    let text = lines.join("\n") + "\n";
    Passwords::parse(&text).map_err(|(line, reason)| AuthError::Format {
        path: path.to_path_buf(),
        line,
        reason,
    })?;
    write_private(path, &text)
}

/// Writes `text` to a new file readable by its owner only, then renames it over `path`.
fn write_private(path: &Path, text: &str) -> Result<(), AuthError> {
    crate::common::files::write_atomic(path, text.as_bytes()).map_err(|source| AuthError::Write {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_verify_replace() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("passwd");
        set_password(&path, "node-1", "k3v-9Lq!tr8z-WmX").unwrap();
        set_password(&path, "node-2", "another-long-secret-7").unwrap();
        let p = Passwords::load(&path).unwrap();
        assert_eq!(p.len(), 2);
        assert!(p.verify("node-1", "k3v-9Lq!tr8z-WmX"));
        assert!(!p.verify("node-1", "another-long-secret-7"));
        assert!(!p.verify("nobody", "k3v-9Lq!tr8z-WmX"));

        set_password(&path, "node-1", "replaced-secret-99").unwrap();
        let p = Passwords::load(&path).unwrap();
        assert_eq!(p.len(), 2, "replaced, not appended");
        assert!(p.verify("node-1", "replaced-secret-99"));
        assert!(p.verify("node-2", "another-long-secret-7"));

        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            !text.contains("replaced-secret-99"),
            "only the hash is stored"
        );
    }

    #[test]
    fn weak_passwords_and_bad_users_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("passwd");
        assert!(matches!(
            set_password(&path, "u", "changeme"),
            Err(AuthError::Weak(_))
        ));
        assert!(matches!(
            set_password(&path, "a:b", "k3v-9Lq!tr8z-WmX"),
            Err(AuthError::BadUser(_))
        ));
        assert!(!path.exists());
    }

    #[test]
    fn malformed_files_name_the_line() {
        let err = Passwords::parse("# users\nnode-1:$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA\nnode-2:plain\n")
            .unwrap_err();
        assert_eq!(err.0, 3, "{err:?}");
        let err = Passwords::parse("node-1:$2b$12$abcdefghijklmnopqrstuv\n").unwrap_err();
        assert_eq!(err.0, 1, "{err:?}");
    }
}
