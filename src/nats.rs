//! The NATS connection: servers, authentication and TLS from `[nats]`, reconnecting forever,
//! with the link state mirrored into metrics, `/readyz` and logs.
//!
//! The server reports a publish it refuses for lack of permission only as an asynchronous
//! `-ERR 'Permissions Violation for Publish to "<subject>"'`; the publish itself just never
//! gets a reply. [`PublishDenials`] keeps those reports per subject so the forwarder can tell
//! a refusal from a lost reply.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::config::{Nats, Secret};
use crate::log_limit::LogLimit;
use crate::metrics::Metrics;
use crate::secrets::{self, SecretError};
use crate::tls::{self, TlsError};

#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error("[nats] TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("cannot connect to NATS: {0}")]
    Connect(#[from] async_nats::ConnectError),
}

/// A connected (or connecting) client and the publish refusals its server reported.
pub struct Link {
    pub client: async_nats::Client,
    pub denials: Arc<PublishDenials>,
}

/// Subjects the server refused to let this connection publish to, with when it said so.
pub struct PublishDenials {
    last: Mutex<HashMap<String, Instant>>,
    changed: watch::Sender<u64>,
}

/// Distinct subjects remembered; a misconfigured template could otherwise grow the map.
const MAX_DENIED_SUBJECTS: usize = 4096;

impl PublishDenials {
    fn new() -> Self {
        Self {
            last: Mutex::new(HashMap::new()),
            changed: watch::channel(0).0,
        }
    }

    fn record(&self, subject: &str) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.len() >= MAX_DENIED_SUBJECTS && !last.contains_key(subject) {
            // Forgetting old refusals is safe: a forgotten one only makes a publish wait for
            // its ack timeout and be retried.
            last.clear();
        }
        last.insert(subject.to_string(), Instant::now());
        drop(last);
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// True if the server refused a publish to `subject` at or after `since`. Permissions hold
    /// for the whole connection, so a refusal reported after a publish was sent means that
    /// publish was refused too (the server stores nothing it refuses).
    pub fn denied_since(&self, subject: &str, since: Instant) -> bool {
        self.last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(subject)
            .is_some_and(|at| *at >= since)
    }

    /// Wakes on every new refusal.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

/// The subject of a `Permissions Violation for Publish to "<subject>"` server error.
fn denied_subject(error: &str) -> Option<&str> {
    let rest = error
        .trim_matches('\'')
        .strip_prefix("Permissions Violation for Publish to ")?;
    Some(rest.trim().trim_matches('"'))
}

/// Connects in the background: returns at once and keeps (re)connecting forever.
pub async fn connect(nats: &Nats, name: &str, metrics: Arc<Metrics>) -> Result<Link, NatsError> {
    let tls = nats
        .tls_files()
        .map(|files| tls::client_config(&files, "NATS"))
        .transpose()?;
    let denials = Arc::new(PublishDenials::new());
    let events_metrics = metrics.clone();
    let events_tls = tls.clone();
    let events_denials = denials.clone();
    // Each failed reconnect attempt reports an event; one line per minute is enough.
    let event_log = Arc::new(LogLimit::new(Duration::from_secs(60)));
    let denial_log = Arc::new(LogLimit::new(Duration::from_secs(10)));
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
            let tls = events_tls.clone();
            let denials = events_denials.clone();
            let event_log = event_log.clone();
            let denial_log = denial_log.clone();
            async move {
                match event {
                    async_nats::Event::Connected => {
                        metrics.nats_connected.set(1);
                        metrics.set_nats_problem(None);
                        if let Some(tls) = &tls {
                            tls.clear_problem();
                        }
                        tracing::info!("connected to NATS");
                    }
                    async_nats::Event::Disconnected => {
                        metrics.nats_connected.set(0);
                        tracing::warn!("disconnected from NATS; buffering and reconnecting");
                    }
                    async_nats::Event::ServerError(async_nats::ServerError::Other(text))
                        if denied_subject(&text).is_some() =>
                    {
                        let subject = denied_subject(&text).unwrap_or_default();
                        denials.record(subject);
                        if let Some(held) = denial_log.admit() {
                            tracing::error!(%subject, repeats = held, "the NATS server denies this user publishing to the subject: readings for it go to dead-letters (grant it in the server's permissions, or change [nats] subject)");
                        }
                    }
                    other => {
                        if let async_nats::Event::ClientError(e) = &other {
                            // The client names only the kind ("tls error"); the handshake
                            // itself knows why.
                            let why = tls
                                .as_ref()
                                .and_then(|t| t.last_problem())
                                .unwrap_or_else(|| e.to_string());
                            metrics.set_nats_problem(Some(why));
                        }
                        if let Some(held) = event_log.admit() {
                            tracing::warn!(event = %other, repeats = held, "NATS client event");
                        }
                    }
                }
            }
        });
    options = with_auth(options, nats)?;
    if let Some(tls) = &tls {
        options = options
            .tls_client_config(tls.config.as_ref().clone())
            .require_tls(true);
    }
    let addrs: Vec<async_nats::ServerAddr> = nats
        .servers
        .iter()
        .map(|s| s.replacen("tls://", "nats://", 1))
        .filter_map(|s| s.parse().ok())
        .collect();
    let client = options.connect(addrs).await?;
    Ok(Link { client, denials })
}

/// Adds the `[nats]` authentication to `options`, reading and checking every secret file: a
/// weak password, an NKey seed or `.creds` file that does not parse is refused here, naming the
/// file, instead of failing each connection attempt.
pub fn with_auth(
    mut options: async_nats::ConnectOptions,
    nats: &Nats,
) -> Result<async_nats::ConnectOptions, SecretError> {
    if let Some(user) = &nats.user {
        let password = match (&nats.password, &nats.password_file) {
            (Some(p), _) => p.clone(),
            (None, Some(path)) => secrets::read_password("[nats] password", path)?,
            (None, None) => Secret::new(String::new()),
        };
        options = options.user_and_password(user.clone(), password.expose().to_string());
    }
    let token = match (&nats.token, &nats.token_file) {
        (Some(t), _) => Some(t.clone()),
        (None, Some(path)) => Some(secrets::read("[nats] token", path)?),
        (None, None) => None,
    };
    if let Some(token) = token {
        options = options.token(token.expose().to_string());
    }
    if let Some(path) = &nats.nkey_seed_file {
        let what = "[nats] nkey seed";
        let seed = secrets::read(what, path)?;
        if nkeys::KeyPair::from_seed(seed.expose()).is_err() {
            return Err(secrets::malformed(
                what,
                path,
                "an NKey seed (one line starting with SU, as `nk -gen user` writes it)",
            ));
        }
        options = options.nkey(seed.expose().to_string());
    }
    if let Some(path) = &nats.creds_file {
        let what = "[nats] credentials";
        let creds = secrets::read(what, path)?;
        options = options.credentials(creds.expose()).map_err(|_| {
            secrets::malformed(
                what,
                path,
                "a .creds file with a user JWT and its NKey seed (as nsc writes it)",
            )
        })?;
    }
    Ok(options)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denied_subjects_are_read_from_server_errors() {
        assert_eq!(
            denied_subject("Permissions Violation for Publish to \"farm.t.reading\""),
            Some("farm.t.reading")
        );
        assert_eq!(
            denied_subject("'Permissions Violation for Publish to \"a.b\"'"),
            Some("a.b")
        );
        assert_eq!(
            denied_subject("Permissions Violation for Subscription to \"x\""),
            None
        );
    }

    #[test]
    fn a_denial_counts_for_publishes_sent_before_it() {
        let d = PublishDenials::new();
        let sent = Instant::now();
        assert!(!d.denied_since("a", sent));
        d.record("a");
        assert!(d.denied_since("a", sent));
        assert!(!d.denied_since("b", sent));
        assert!(!d.denied_since("a", Instant::now() + Duration::from_secs(1)));
    }
}
