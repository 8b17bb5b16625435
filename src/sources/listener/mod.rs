//! An `[[mqtt_listener]]`: the gateway's own MQTT endpoint, so devices publish straight to it
//! with no broker in between. A device's PUBACK means its readings are committed to the buffer.
//!
//! - [`session`]: the MQTT 3.1.1 / 5 protocol of a connection, without I/O (fuzzed);
//! - [`connection`]: one connection's task: CONNECT, commits, acknowledgements in order;
//! - [`auth`]: the password file (argon2 hashes) and the `passwd` command behind it;
//! - [`tls`]: rustls server setup, with client certificates when configured.
//!
//! This module runs the accept loop. Each connection is its own task with bounded buffers, so
//! a slow or hostile client stalls only itself. At most `max_connections` are served; a client
//! over the limit gets CONNACK "server busy" (plaintext listeners; a few at a time) or a closed
//! socket. A socket that cannot be bound is retried with backoff, and `/readyz` says so.
//! Shutdown: the port closes first, then every connection acknowledges what it committed,
//! tells MQTT 5 clients the server is shutting down, and closes.

pub(crate) mod auth;
pub(crate) mod connection;
pub mod session;
pub(crate) mod tls;

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use self::auth::{AuthError, Authenticator, Passwords, SharedPasswords};
use self::connection::{Admission, Auth, Context, CONNECT_TIMEOUT};
use self::tls::TlsError;
use crate::common::backoff::Backoff;
use crate::common::log_limit::LogLimit;
use crate::common::metrics::Metrics;
use crate::config::{ListenerAuth, MqttListener, Quality};
use crate::ingest::intake;
use crate::ingest::mapping::SharedMapper;
use crate::store::StoreHandle;

/// Clients over the connection limit answered with "server busy" at once; more are just closed.
const BUSY_REPLIES: usize = 16;
/// How long connections may take to settle at shutdown before they are cut.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    #[error("[[mqtt_listener]] `{name}`: {source}")]
    Auth { name: String, source: AuthError },
    #[error("[[mqtt_listener]] `{name}`: {source}")]
    Tls { name: String, source: TlsError },
}

/// The password file of a listener with `auth = "password"`, shared with reloads.
pub(crate) fn load_passwords(
    config: &MqttListener,
) -> Result<Option<SharedPasswords>, ListenerError> {
    match (&config.auth, &config.password_file) {
        (ListenerAuth::Password, Some(path)) => {
            let passwords = read_passwords(config, path)?;
            Ok(Some(Arc::new(RwLock::new(Arc::new(passwords)))))
        }
        _ => Ok(None),
    }
}

/// Reads the password file again into `shared` (after a SIGHUP); the old one stays on error.
pub(crate) fn reload_passwords(
    config: &MqttListener,
    shared: &SharedPasswords,
) -> Result<(), ListenerError> {
    if let Some(path) = &config.password_file {
        let passwords = read_passwords(config, path)?;
        *shared.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(passwords);
    }
    Ok(())
}

fn read_passwords(
    config: &MqttListener,
    path: &std::path::Path,
) -> Result<Passwords, ListenerError> {
    let passwords = Passwords::load(path).map_err(|source| ListenerError::Auth {
        name: config.name.to_string(),
        source,
    })?;
    if passwords.is_empty() {
        tracing::warn!(listener = %config.name, file = %path.display(), "password file lists no users: every client will be refused");
    }
    Ok(passwords)
}

/// A listener ready to run: TLS loaded, socket bound if it could be.
pub(crate) struct ListenerInput {
    listen: SocketAddr,
    max_connections: usize,
    cx: Arc<Context>,
    tls: Option<TlsAcceptor>,
    socket: Option<TcpListener>,
}

impl ListenerInput {
    /// Loads the TLS files (an error here is the config's to fix) and tries to bind, so the
    /// socket is normally listening before the gateway reports ready.
    pub(crate) async fn new(
        config: &MqttListener,
        quality: &Quality,
        passwords: Option<SharedPasswords>,
        mapper: SharedMapper,
        store: StoreHandle,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ListenerError> {
        let tls = tls::acceptor(config).map_err(|source| ListenerError::Tls {
            name: config.name.to_string(),
            source,
        })?;
        let auth = match (config.auth, passwords) {
            (ListenerAuth::Password, Some(p)) => Auth::Password(Authenticator::new(p)),
            // Config checks make a password listener have a file; without one nobody gets in.
            (ListenerAuth::Password, None) => Auth::Password(Authenticator::new(Arc::default())),
            (ListenerAuth::Certificate, _) => Auth::Certificate,
            (ListenerAuth::None, _) => Auth::None,
        };
        let seconds = |d: Duration| u16::try_from(d.as_secs()).unwrap_or(u16::MAX);
        let cx = Context::new(
            config.name.as_str(),
            config.topics.clone(),
            auth,
            config.max_in_flight,
            u32::try_from(config.max_packet_size.0).unwrap_or(u32::MAX),
            (
                seconds(config.keep_alive_min.0),
                seconds(config.keep_alive_max.0),
            ),
            mapper,
            store,
            intake::flood_guard(quality),
            metrics,
        );
        let socket = bind(config.name.as_str(), config.listen).await;
        Ok(Self {
            listen: config.listen,
            max_connections: usize::try_from(config.max_connections).unwrap_or(usize::MAX),
            cx: Arc::new(cx),
            tls,
            socket,
        })
    }

    /// Accepts connections until `shutdown`, then lets them settle.
    pub(crate) async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let name = self.cx.name.clone();
        let metrics = self.cx.metrics.clone();
        metrics.set_listener_bound(&name, Some(self.socket.is_some()));
        let mut rebind = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        let socket = loop {
            if let Some(s) = self.socket.take() {
                break s;
            }
            tokio::select! {
                _ = tokio::time::sleep(rebind.next_delay()) => {
                    self.socket = bind(&name, self.listen).await;
                }
                _ = shutdown.changed() => {
                    metrics.set_listener_bound(&name, None);
                    return;
                }
            }
        };
        metrics.set_listener_bound(&name, Some(true));
        tracing::info!(listener = %name, listen = %self.listen, tls = self.tls.is_some(), "MQTT listener accepting connections");

        let slots = Arc::new(Semaphore::new(self.max_connections));
        let busy_replies = Arc::new(Semaphore::new(BUSY_REPLIES));
        let accept_log = LogLimit::new(Duration::from_secs(10));
        let mut tasks = JoinSet::new();
        loop {
            tokio::select! {
                accepted = socket.accept() => match accepted {
                    Ok((tcp, peer)) => {
                        // PUBACKs are small and latency-bound: no Nagle delay.
                        let _ = tcp.set_nodelay(true);
                        match slots.clone().try_acquire_owned() {
                            Ok(slot) => {
                                let task = connection(tcp, peer, self.cx.clone(), self.tls.clone(), shutdown.clone(), Admission::Open);
                                tasks.spawn(async move {
                                    task.await;
                                    drop(slot);
                                });
                            }
                            Err(_) => {
                                self.cx.reject("too_many_connections", peer, "max_connections reached");
                                // A busy reply needs the CONNECT; over TLS that costs a handshake.
                                if let (None, Ok(permit)) = (&self.tls, busy_replies.clone().try_acquire_owned()) {
                                    let task = connection(tcp, peer, self.cx.clone(), None, shutdown.clone(), Admission::Busy);
                                    tasks.spawn(async move {
                                        task.await;
                                        drop(permit);
                                    });
                                }
                            }
                        }
                    }
                    Err(e) => {
                        // Typically out of file descriptors: wait for connections to end.
                        if let Some(held) = accept_log.admit() {
                            tracing::warn!(listener = %name, error = %e, similar_held_back = held, "cannot accept a connection");
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                _ = shutdown.changed() => break,
            }
        }
        // The port closes; connections saw the same shutdown and are settling.
        drop(socket);
        tracing::info!(listener = %name, connections = tasks.len(), "MQTT listener stopping");
        let settle = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(SHUTDOWN_GRACE, settle).await.is_err() {
            tracing::warn!(listener = %name, "connections did not settle in time; closing them");
            tasks.abort_all();
        }
        metrics.set_listener_bound(&name, None);
    }
}

async fn bind(name: &str, addr: SocketAddr) -> Option<TcpListener> {
    match TcpListener::bind(addr).await {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!(listener = %name, listen = %addr, error = %e, "cannot listen; retrying with backoff (is another program on that port?)");
            None
        }
    }
}

/// One connection: the TLS handshake if configured, then the MQTT session.
async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    cx: Arc<Context>,
    tls: Option<TlsAcceptor>,
    shutdown: watch::Receiver<bool>,
    admission: Admission,
) {
    let open = cx
        .metrics
        .listener_connections_open
        .get_or_create(&cx.metrics.listener(&cx.name))
        .clone();
    open.inc();
    match tls {
        None => connection::serve(tcp, peer, cx.clone(), shutdown, admission).await,
        Some(acceptor) => match tokio::time::timeout(CONNECT_TIMEOUT, acceptor.accept(tcp)).await {
            Ok(Ok(stream)) => {
                connection::serve(stream, peer, cx.clone(), shutdown, admission).await
            }
            Ok(Err(e)) => {
                let reason = if is_certificate_problem(&e) {
                    "auth"
                } else {
                    "tls"
                };
                cx.reject(reason, peer, &format!("TLS handshake failed: {e}"));
            }
            Err(_) => cx.reject("tls", peer, "TLS handshake not finished within 10 s"),
        },
    }
    open.dec();
}

/// True when a handshake failed over the client's certificate (missing, or not from our CA).
fn is_certificate_problem(e: &std::io::Error) -> bool {
    use tokio_rustls::rustls::Error;
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<Error>())
        .is_some_and(|e| {
            matches!(
                e,
                Error::NoCertificatesPresented | Error::InvalidCertificate(_)
            )
        })
}
