//! The NATS connection: servers, authentication and TLS from `[nats]`, reconnecting forever,
//! with the link state mirrored into metrics and logs.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{Nats, Secret};
use crate::log_limit::LogLimit;
use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("{0}")]
    Path(String),
    #[error("cannot read {what} file {path}: {source}")]
    SecretFile {
        what: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot connect to NATS: {0}")]
    Connect(#[from] async_nats::ConnectError),
}

/// Reads a secret from a file, trimming the trailing newline editors add.
pub fn read_secret(what: &'static str, path: &Path) -> Result<Secret, NatsError> {
    let path = &resolve(path)?;
    warn_if_readable_by_others(path);
    let text = std::fs::read_to_string(path).map_err(|source| NatsError::SecretFile {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    Ok(Secret::new(text.trim_end_matches(['\n', '\r']).to_string()))
}

/// A secret file that others may read is worth a warning naming it (never its content).
pub fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o004 != 0 {
            tracing::warn!(file = %path.display(), "secret file is readable by every user; chmod o-r it");
        }
    }
}

fn resolve(path: &Path) -> Result<std::path::PathBuf, NatsError> {
    crate::config::resolve_path(path).map_err(NatsError::Path)
}

/// Connects in the background: returns at once and keeps (re)connecting forever.
pub async fn connect(
    nats: &Nats,
    name: &str,
    metrics: Arc<Metrics>,
) -> Result<async_nats::Client, NatsError> {
    let events_metrics = metrics.clone();
    // Each failed reconnect attempt reports an event; one line per minute is enough.
    let event_log = Arc::new(LogLimit::new(Duration::from_secs(60)));
    let mut options = async_nats::ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(5))
        // Half-open links (a frozen server, a dead NAT mapping) are found by missed pings.
        .ping_interval(Duration::from_secs(10))
        .reconnect_delay_callback(|attempts| {
            Duration::from_millis(250u64.saturating_mul(1 << attempts.min(5)))
                .min(Duration::from_secs(8))
        })
        .event_callback(move |event| {
            let metrics = events_metrics.clone();
            let event_log = event_log.clone();
            async move {
                match event {
                    async_nats::Event::Connected => {
                        metrics.nats_connected.set(1);
                        tracing::info!("connected to NATS");
                    }
                    async_nats::Event::Disconnected => {
                        metrics.nats_connected.set(0);
                        tracing::warn!("disconnected from NATS; buffering and reconnecting");
                    }
                    other => {
                        if let Some(held) = event_log.admit() {
                            tracing::warn!(event = %other, repeats = held, "NATS client event");
                        }
                    }
                }
            }
        });
    if let Some(user) = &nats.user {
        let password = match (&nats.password, &nats.password_file) {
            (Some(p), _) => p.clone(),
            (None, Some(path)) => read_secret("password", path)?,
            (None, None) => Secret::new(String::new()),
        };
        options = options.user_and_password(user.clone(), password.expose().to_string());
    }
    let token = match (&nats.token, &nats.token_file) {
        (Some(t), _) => Some(t.clone()),
        (None, Some(path)) => Some(read_secret("token", path)?),
        (None, None) => None,
    };
    if let Some(token) = token {
        options = options.token(token.expose().to_string());
    }
    if let Some(path) = &nats.nkey_seed_file {
        options = options.nkey(read_secret("nkey seed", path)?.expose().to_string());
    }
    if let Some(path) = &nats.creds_file {
        let path = resolve(path)?;
        warn_if_readable_by_others(&path);
        options =
            options
                .credentials_file(&path)
                .await
                .map_err(|source| NatsError::SecretFile {
                    what: "credentials",
                    path,
                    source,
                })?;
    }
    if let Some(ca) = &nats.tls_ca_file {
        options = options
            .add_root_certificates(resolve(ca)?)
            .require_tls(true);
    }
    if let (Some(cert), Some(key)) = (&nats.tls_cert_file, &nats.tls_key_file) {
        options = options.add_client_certificate(resolve(cert)?, resolve(key)?);
    }
    let servers: Vec<String> = nats
        .servers
        .iter()
        .map(|s| s.replacen("tls://", "nats://", 1))
        .collect();
    let tls_urls = nats.servers.iter().any(|s| s.starts_with("tls://"));
    if tls_urls {
        options = options.require_tls(true);
    }
    let addrs: Vec<async_nats::ServerAddr> =
        servers.iter().filter_map(|s| s.parse().ok()).collect();
    Ok(options.connect(addrs).await?)
}
