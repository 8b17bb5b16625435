//! The NATS links: servers, authentication and TLS from `[nats]`, one connection per link (see
//! [`Connector`]), with the link state mirrored into metrics, `/readyz` and logs.
//!
//! The server reports a publish it refuses for lack of permission only as an asynchronous
//! `-ERR 'Permissions Violation for Publish to "<subject>"'`; the publish itself just never
//! gets a reply. [`PublishDenials`] keeps those reports per subject so the forwarder can tell
//! a refusal from a lost reply.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::common::log_limit::LogLimit;
use crate::common::metrics::Metrics;
use crate::common::secrets::{self, SecretError};
use crate::common::tls::{self, TlsError};
use crate::config::{Nats, Secret};

#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error("[nats] TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("cannot connect to NATS: {0}")]
    Connect(#[from] async_nats::ConnectError),
    #[error("cannot subscribe to the PubAck inbox (the NATS user needs subscribe permission on `_INBOX.>`): {0}")]
    Subscribe(#[from] async_nats::SubscribeError),
}

/// Subjects the server refused to let this connection publish to, with when it said so.
pub(crate) struct PublishDenials {
    last: Mutex<HashMap<String, Instant>>,
    changed: watch::Sender<u64>,
}

/// Distinct subjects remembered; a misconfigured template could otherwise grow the map.
const MAX_DENIED_SUBJECTS: usize = 4096;

impl PublishDenials {
    pub(crate) fn new() -> Self {
        Self {
            last: Mutex::new(HashMap::new()),
            changed: watch::channel(0).0,
        }
    }

    pub(crate) fn record(&self, subject: &str) {
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
    pub(crate) fn denied_since(&self, subject: &str, since: Instant) -> bool {
        self.last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(subject)
            .is_some_and(|at| *at >= since)
    }

    /// Wakes on every new refusal.
    pub(crate) fn watch(&self) -> watch::Receiver<u64> {
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

/// Opens links to `[nats]`, each one TCP (or TLS) connection that is never resumed.
///
/// Why no client-side reconnect: a client that reconnects sends, on the new connection, the
/// publishes still queued for the old one, ahead of the earlier ones the forwarder resends
/// because their PubAcks never came; the stream would store them out of `seq` order. So a link
/// serves only its first connection: every later attempt of the client is refused before it
/// authenticates (see [`Identity::auth`]), the client gives up, its queue is dropped, and the
/// forwarder opens a new link with its own backoff once everything in flight has an outcome.
#[derive(Clone)]
pub(crate) struct Connector {
    inner: Arc<ConnectorInner>,
}

struct ConnectorInner {
    name: String,
    servers: Vec<async_nats::ServerAddr>,
    identity: Identity,
    tls: Option<tls::ClientTls>,
    metrics: Arc<Metrics>,
    /// Whether this link's state is the gateway's NATS state (`nats_connected`, `/readyz`):
    /// the forwarder's link is; the commands link reports through its own status.
    reports_state: bool,
    /// Failed connection attempts are reported as events; one line per minute is enough.
    event_log: LogLimit,
    denial_log: LogLimit,
}

/// One connection to NATS and the publish refusals its server reported.
pub(crate) struct Link {
    pub client: async_nats::Client,
    pub(crate) denials: Arc<PublishDenials>,
    /// Set when the link is dropped: its client may no longer reconnect, and its late events
    /// no longer speak for the gateway's NATS state.
    retired: Arc<AtomicBool>,
}

impl Link {
    pub(crate) fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.retired.store(true, Ordering::Relaxed);
    }
}

impl Connector {
    /// Reads and checks every secret and TLS file `[nats]` names; connects nothing yet.
    pub(crate) fn new(nats: &Nats, name: &str, metrics: Arc<Metrics>) -> Result<Self, NatsError> {
        Self::build(nats, name, metrics, true)
    }

    /// A connector for a second link (the commands consumer's) that leaves the gateway's NATS
    /// state to the forwarder's link.
    pub(crate) fn secondary(
        nats: &Nats,
        name: &str,
        metrics: Arc<Metrics>,
    ) -> Result<Self, NatsError> {
        Self::build(nats, name, metrics, false)
    }

    fn build(
        nats: &Nats,
        name: &str,
        metrics: Arc<Metrics>,
        reports_state: bool,
    ) -> Result<Self, NatsError> {
        let tls = nats
            .tls_files()
            .map(|files| tls::client_config(&files, "NATS"))
            .transpose()?;
        let servers = nats
            .servers
            .iter()
            .map(|s| s.to_string().replacen("tls://", "nats://", 1))
            .filter_map(|s| s.parse().ok())
            .collect();
        Ok(Self {
            inner: Arc::new(ConnectorInner {
                name: name.to_string(),
                servers,
                identity: Identity::load(nats)?,
                tls,
                metrics,
                reports_state,
                event_log: LogLimit::new(Duration::from_secs(60)),
                denial_log: LogLimit::new(Duration::from_secs(10)),
            }),
        })
    }

    /// Connects to one of the servers (each tried once) and returns the link.
    pub(crate) async fn open(&self) -> Result<Link, NatsError> {
        let inner = &self.inner;
        let denials = Arc::new(PublishDenials::new());
        let retired = Arc::new(AtomicBool::new(false));
        // Until the link is handed out, its client may (re)connect: nothing was published yet.
        let handed_out = Arc::new(AtomicBool::new(false));
        let auth_identity = inner.identity.clone();
        let auth_handed_out = handed_out.clone();
        let mut options = async_nats::ConnectOptions::with_auth_callback(move |nonce| {
            let identity = auth_identity.clone();
            let handed_out = auth_handed_out.clone();
            async move {
                if handed_out.load(Ordering::Relaxed) {
                    return Err(async_nats::AuthError::new(RECONNECT_REFUSED));
                }
                identity.auth(&nonce)
            }
        })
        .name(&inner.name)
        // Each server once at the start; after a link is lost, its client's attempts are all
        // refused and it gives up after as many.
        .max_reconnects(Some(inner.servers.len().max(1)))
        .reconnect_delay_callback(|_| Duration::ZERO)
        .connection_timeout(Duration::from_secs(5))
        // Half-open links (a frozen server, a dead NAT mapping) are found by missed pings.
        .ping_interval(Duration::from_secs(10))
        .event_callback({
            let connector = self.clone();
            let denials = denials.clone();
            let retired = retired.clone();
            move |event| {
                let connector = connector.clone();
                let denials = denials.clone();
                let retired = retired.clone();
                async move { connector.on_event(event, &denials, &retired) }
            }
        });
        if let Some(tls) = &inner.tls {
            options = options
                .tls_client_config(tls.config.as_ref().clone())
                .require_tls(true);
        }
        let client = match options.connect(inner.servers.clone()).await {
            Ok(client) => client,
            Err(e) => {
                if inner.reports_state {
                    let why = self.tls_problem().unwrap_or_else(|| e.to_string());
                    inner.metrics.set_nats_problem(Some(why));
                }
                return Err(e.into());
            }
        };
        handed_out.store(true, Ordering::Relaxed);
        Ok(Link {
            client,
            denials,
            retired,
        })
    }

    /// The client names only the kind of a TLS failure ("tls error"); the handshake knows why.
    pub(crate) fn tls_problem(&self) -> Option<String> {
        self.inner.tls.as_ref().and_then(|t| t.last_problem())
    }

    fn on_event(&self, event: async_nats::Event, denials: &PublishDenials, retired: &AtomicBool) {
        let inner = &self.inner;
        if retired.load(Ordering::Relaxed) {
            return;
        }
        if !inner.reports_state {
            // Denials and errors of a secondary link are its owner's to report.
            tracing::debug!(link = %inner.name, event = %event, "NATS client event");
            return;
        }
        match event {
            async_nats::Event::Connected => {
                inner.metrics.nats_connected.set(1);
                inner.metrics.set_nats_problem(None);
                if let Some(tls) = &inner.tls {
                    tls.clear_problem();
                }
                tracing::info!("connected to NATS");
            }
            async_nats::Event::Disconnected => {
                inner.metrics.nats_connected.set(0);
                tracing::warn!("disconnected from NATS; buffering and reconnecting");
            }
            async_nats::Event::ServerError(async_nats::ServerError::Other(text))
                if denied_subject(&text).is_some() =>
            {
                let subject = denied_subject(&text).unwrap_or_default();
                denials.record(subject);
                if let Some(held) = inner.denial_log.admit() {
                    tracing::error!(%subject, repeats = held, "the NATS server denies this user publishing to the subject: readings for it go to dead-letters (grant it in the server's permissions, or change [nats] subject)");
                }
            }
            // The lost link's client giving up, as designed: the forwarder opens a new one.
            async_nats::Event::ClientError(_) | async_nats::Event::Closed
                if inner.metrics.nats_connected.get() == 0 => {}
            other => {
                if let async_nats::Event::ClientError(e) = &other {
                    let why = self.tls_problem().unwrap_or_else(|| e.to_string());
                    inner.metrics.set_nats_problem(Some(why));
                }
                if let Some(held) = inner.event_log.admit() {
                    tracing::warn!(event = %other, repeats = held, "NATS client event");
                }
            }
        }
    }
}

/// Why a link's client may not reconnect (in async-nats' own debug log only).
const RECONNECT_REFUSED: &str = "this link is not resumed: the gateway opens a new one";

/// The `[nats]` identity, read and checked once; each connection signs its own server nonce.
#[derive(Clone)]
pub(crate) enum Identity {
    Anonymous,
    UserPassword {
        user: String,
        password: Secret,
    },
    Token(Secret),
    NKey(Arc<nkeys::KeyPair>),
    /// A `.creds` file: the user JWT and the NKey that signs for it.
    Jwt {
        jwt: String,
        key: Arc<nkeys::KeyPair>,
    },
}

impl Identity {
    /// Reads every secret file `[nats]` names: a weak password, an NKey seed or `.creds` file
    /// that does not parse is refused here, naming the file, instead of failing each
    /// connection attempt.
    pub(crate) fn load(nats: &Nats) -> Result<Self, SecretError> {
        if let Some(user) = &nats.user {
            let password = match (&nats.password, &nats.password_file) {
                (Some(p), _) => p.clone(),
                (None, Some(path)) => secrets::read_password("[nats] password", path)?,
                (None, None) => Secret::new(String::new()),
            };
            return Ok(Self::UserPassword {
                user: user.clone(),
                password,
            });
        }
        match (&nats.token, &nats.token_file) {
            (Some(t), _) => return Ok(Self::Token(t.clone())),
            (None, Some(path)) => return Ok(Self::Token(secrets::read("[nats] token", path)?)),
            (None, None) => {}
        }
        if let Some(path) = &nats.nkey_seed_file {
            let what = "[nats] nkey seed";
            let seed = secrets::read(what, path)?;
            let key = nkeys::KeyPair::from_seed(seed.expose()).map_err(|_| {
                secrets::malformed(
                    what,
                    path,
                    "an NKey seed (one line starting with SU, as `nk -gen user` writes it)",
                )
            })?;
            return Ok(Self::NKey(Arc::new(key)));
        }
        if let Some(path) = &nats.creds_file {
            let what = "[nats] credentials";
            let creds = secrets::read(what, path)?;
            let parsed = creds_blocks(creds.expose()).and_then(|(jwt, seed)| {
                Some((jwt.to_string(), nkeys::KeyPair::from_seed(seed).ok()?))
            });
            let Some((jwt, key)) = parsed else {
                return Err(secrets::malformed(
                    what,
                    path,
                    "a .creds file with a user JWT and its NKey seed (as nsc writes it)",
                ));
            };
            return Ok(Self::Jwt {
                jwt,
                key: Arc::new(key),
            });
        }
        Ok(Self::Anonymous)
    }

    /// What to send in CONNECT to a server that gave `nonce`.
    fn auth(&self, nonce: &[u8]) -> Result<async_nats::Auth, async_nats::AuthError> {
        let sign = |key: &nkeys::KeyPair| {
            key.sign(nonce)
                .map_err(|_| async_nats::AuthError::new("cannot sign the server nonce"))
        };
        let mut auth = async_nats::Auth::new();
        match self {
            Self::Anonymous => {}
            Self::UserPassword { user, password } => {
                auth.username = Some(user.clone());
                auth.password = Some(password.expose().to_string());
            }
            Self::Token(token) => auth.token = Some(token.expose().to_string()),
            Self::NKey(key) => {
                auth.nkey = Some(key.public_key());
                auth.signature = Some(sign(key)?);
            }
            Self::Jwt { jwt, key } => {
                auth.jwt = Some(jwt.clone());
                auth.signature = Some(sign(key)?);
            }
        }
        Ok(auth)
    }
}

/// The user JWT and the NKey seed of a `.creds` file: the first two lines that each sit between
/// a dashed BEGIN line and a dashed END line.
fn creds_blocks(text: &str) -> Option<(&str, &str)> {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let marker = |l: &str, word| l.starts_with("---") && l.ends_with("---") && l.contains(word);
    let mut blocks = lines
        .windows(3)
        .filter(|w| marker(w[0], "BEGIN") && !w[1].starts_with("---") && marker(w[2], "END"))
        .map(|w| w[1]);
    Some((blocks.next()?, blocks.next()?))
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
    fn creds_files_give_their_jwt_and_seed() {
        let creds = "-----BEGIN NATS USER JWT-----\neyJ0eXAi.eyJqdGki.sig\n------END NATS USER JWT------\n\n\
            ************************* IMPORTANT *************************\n\
            NKEY Seed printed below can be used to sign and prove identity.\n\n\
            -----BEGIN USER NKEY SEED-----\r\nSUAIO3FHUX5PNV2LQIIP7TZ3N4L7TX3W53MQGEIVYFIGA635OZCKEYHFLM\r\n------END USER NKEY SEED------\n";
        assert_eq!(
            creds_blocks(creds),
            Some((
                "eyJ0eXAi.eyJqdGki.sig",
                "SUAIO3FHUX5PNV2LQIIP7TZ3N4L7TX3W53MQGEIVYFIGA635OZCKEYHFLM"
            ))
        );
        assert_eq!(
            creds_blocks("-----BEGIN NATS USER JWT-----\nonly\n-----END-----\n"),
            None
        );
        assert_eq!(creds_blocks(""), None);
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
