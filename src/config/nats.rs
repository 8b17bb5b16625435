//! `[nats]`: the JetStream servers, the subjects published to, authentication and TLS.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::address::{is_loopback_host, Schemes, ServerUrl};
use super::credentials::{check_server_name, weak_password, TlsFiles};
use super::{DurationValue, Secret, SubjectTemplate};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Nats {
    #[serde(deserialize_with = "nats_urls")]
    pub servers: Vec<ServerUrl>,
    #[serde(default)]
    pub subject: SubjectTemplate,
    /// Subject of liveness events; `{status}` is `connected`, `disconnected` or `warning`.
    #[serde(default = "SubjectTemplate::default_status")]
    pub status_subject: SubjectTemplate,
    pub user: Option<String>,
    pub password: Option<Secret>,
    pub password_file: Option<PathBuf>,
    pub token: Option<Secret>,
    pub token_file: Option<PathBuf>,
    pub nkey_seed_file: Option<PathBuf>,
    pub creds_file: Option<PathBuf>,
    pub tls_ca_file: Option<PathBuf>,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// Name the servers' certificates must carry, when it differs from the host in `servers`
    /// (e.g. servers listed by IP address, or a cluster's shared certificate).
    pub tls_server_name: Option<String>,
    #[serde(default)]
    pub allow_insecure: bool,
    /// How long to wait for a PubAck before the publish counts as failed and is retried.
    #[serde(default = "default_ack_timeout")]
    pub ack_timeout: DurationValue,
    /// Publishes awaiting their PubAck at once, reached one PubAck at a time on each new link
    /// and after each resume (the forwarder's slow start).
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: u16,
}

/// `[nats] servers`: `nats://host[:port]`, `tls://host[:port]` or `host[:port]`.
const NATS: Schemes = Schemes {
    plain: ("nats", 4222),
    tls: ("tls", 4222),
};

fn nats_urls<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ServerUrl>, D::Error> {
    let texts = Vec::<String>::deserialize(d)?;
    Ok(texts
        .into_iter()
        .map(|t| ServerUrl::parse(t, &NATS))
        .collect())
}

impl Nats {
    /// TLS is required by a `tls://` server or any TLS file.
    pub(crate) fn uses_tls(&self) -> bool {
        self.servers.iter().any(|s| s.tls)
            || self.tls_ca_file.is_some()
            || self.tls_cert_file.is_some()
    }

    /// The TLS settings, when the servers are reached over TLS.
    pub(crate) fn tls_files(&self) -> Option<TlsFiles<'_>> {
        self.uses_tls().then_some(TlsFiles::new(
            &self.tls_ca_file,
            &self.tls_cert_file,
            &self.tls_key_file,
            &self.tls_server_name,
        ))
    }

    /// Problems of the section on its own; `line` is its header's.
    pub(super) fn check(&self, line: usize, push: &mut impl FnMut(usize, String)) {
        let mut problem = |what: String| push(line, format!("[nats] {what}"));
        if self.servers.is_empty() {
            problem("servers: list at least one server".into());
        }
        for server in &self.servers {
            match &server.problem {
                None => {
                    if !self.uses_tls() && !is_loopback_host(&server.host) && !self.allow_insecure {
                        problem(format!(
                            "servers: `{server}` is plaintext to a non-loopback host; use tls:// with tls_ca_file, or set allow_insecure = true"
                        ));
                    }
                }
                Some(e) => problem(format!("servers: {e}")),
            }
        }
        if self.max_in_flight == 0 {
            problem("max_in_flight must be at least 1".into());
        }
        if self.password.is_some() && self.password_file.is_some() {
            problem("set password or password_file, not both".into());
        }
        if self.token.is_some() && self.token_file.is_some() {
            problem("set token or token_file, not both".into());
        }
        if self.user.is_some() != (self.password.is_some() || self.password_file.is_some()) {
            problem("user and password (or password_file) go together".into());
        }
        let auth_modes = [
            self.user.is_some(),
            self.token.is_some() || self.token_file.is_some(),
            self.nkey_seed_file.is_some(),
            self.creds_file.is_some(),
        ];
        if auth_modes.iter().filter(|m| **m).count() > 1 {
            problem(
                "choose one authentication: user/password, token, nkey_seed_file or creds_file"
                    .into(),
            );
        }
        if let Some(why) = self
            .password
            .as_ref()
            .and_then(|p| weak_password(p.expose()))
        {
            problem(format!("password is {why}; use a long random one, from password_file or ${{CREDENTIALS_DIRECTORY}}"));
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            problem("tls_cert_file and tls_key_file go together".into());
        }
        if let Some(why) = check_server_name(self.tls_server_name.as_deref()) {
            problem(why);
        }
    }
}

fn default_ack_timeout() -> DurationValue {
    DurationValue(Duration::from_secs(5))
}
fn default_max_in_flight() -> u16 {
    1024
}
