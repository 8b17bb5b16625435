//! `run`: wires config, store, forwarder, sources and HTTP together; applies the configs that
//! arrive on `reloads`; and shuts down in the order that loses nothing: intake first, then the
//! forwarder, then the store. It shuts down when `shutdown` resolves, and when the store finds
//! its file corrupt ([`store::StoreHandle::fatal`]): then `run` returns [`RunError::StoreCorrupt`]
//! (exit 75). The caller binds the HTTP listener and turns signals into `shutdown` and
//! `reloads` (the binary: SIGTERM, SIGINT, SIGHUP), so a test can start the app in-process.
//!
//! - `pipeline.rs`: the sources, serial ports, listeners and NATS link a reload may change.
//! - `tasks.rs`: keyed tasks and the one reconcile that stops and starts them.
//! - `supervise.rs`: the systemd watchdog's progress check.

mod downlink;
mod pipeline;
mod supervise;
mod tasks;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::common::http;
use crate::common::metrics::Metrics;
use crate::common::status::ConfigStatus;
use crate::common::systemd::Notifier;
use crate::config::{Config, ListenerAuth};
use crate::fleet::remote::{self, Remote};
use crate::sources::listener::ListenerError;
use crate::store;
use crate::uplink::nats;
use pipeline::Pipeline;
use tasks::Task;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Http(#[from] http::BindError),
    #[error(transparent)]
    Nats(#[from] nats::NatsError),
    #[error("[[mqtt]] `{source_name}`: {error}")]
    MqttSecret {
        source_name: String,
        error: crate::common::secrets::SecretError,
    },
    #[error("[[mqtt]] `{source_name}` TLS: {error}")]
    MqttTls {
        source_name: String,
        error: crate::common::tls::TlsError,
    },
    /// Raised by the binary, which installs the handlers.
    #[error("cannot install signal handler: {0}")]
    Signal(std::io::Error),
    #[error(transparent)]
    Listener(#[from] ListenerError),
    #[error("buffer file became corrupt while running ({0}); the next start moves it aside")]
    StoreCorrupt(String),
}

impl RunError {
    /// The process's exit status: 75 (EX_TEMPFAIL) when a restart cures the cause, so the
    /// service manager restarts the gateway; 1 for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            RunError::StoreCorrupt(_) => 75,
            _ => 1,
        }
    }
}

/// Inline secrets work, but belong in files readable by the service only.
fn warn_about_inline_secrets(config: &Config) {
    if config.nats.password.is_some() || config.nats.token.is_some() {
        tracing::warn!("[nats] has an inline secret; prefer password_file / token_file or ${{CREDENTIALS_DIRECTORY}}");
    }
    for m in config.mqtt.iter().filter(|m| m.password.is_some()) {
        tracing::warn!(source = %m.name, "[[mqtt]] has an inline password; prefer password_file");
    }
    for m in config.mqtt.iter().filter(|m| m.allow_insecure) {
        tracing::warn!(source = %m.name, url = %m.url, "allow_insecure = true: plaintext MQTT to this broker is permitted");
    }
    for l in &config.mqtt_listener {
        if l.auth == ListenerAuth::Password && !l.tls() && !l.listen.ip().is_loopback() {
            tracing::warn!(listener = %l.name, listen = %l.listen, "devices send their passwords in plaintext to this listener; configure tls_cert_file and tls_key_file where devices support TLS");
        }
    }
}

/// Runs the gateway until `shutdown` resolves or the buffer file turns corrupt. `http` serves
/// `/metrics`, `/status` and the rest; each config from `reloads` (already parsed and checked)
/// replaces the running one, and a part of it that cannot start is logged and tried again on
/// the next reload. With `[fleet] config_bucket`, remote config revisions are applied the same
/// way ([`crate::fleet::remote`]).
pub async fn run(
    config: Config,
    http: TcpListener,
    shutdown: impl Future<Output = ()>,
    reloads: mpsc::Receiver<Config>,
) -> Result<(), RunError> {
    warn_about_inline_secrets(&config);
    let metrics = Arc::new(Metrics::new());
    let (store, store_thread) = store::start(
        config.store_path(),
        config.buffer.clone(),
        config.quality.low_battery,
        metrics.clone(),
    )?;
    let pipeline = Pipeline::start(&config, store.clone(), metrics.clone()).await?;
    let replay_plan = crate::replay::shared(&config);
    let replay = crate::replay::Service::new(&store, replay_plan.clone());
    let (stop_tx, stop_rx) = watch::channel(false);
    let http_task = tokio::spawn(http::serve(
        http,
        metrics.clone(),
        replay.clone(),
        config.store_path().into(),
        stop_rx.clone(),
    ));
    let notifier = Arc::new(Notifier::from_env());
    // The store is open and every source task is running.
    notifier.ready();
    let supervisor = tokio::spawn(supervise::supervise(
        notifier.clone(),
        store.clone(),
        metrics.clone(),
        stop_rx,
    ));
    log_running(&config);
    metrics.set_config(ConfigStatus::of(&config));
    let (current_tx, current_rx) = watch::channel(Arc::new(config.clone()));
    let (apply_tx, applies) = mpsc::channel(1);
    let remote = Remote::of(
        &config,
        store.clone(),
        metrics.clone(),
        apply_tx,
        current_rx,
    )
    .map(|r| Task::spawn(move |stop| r.run(stop)));
    let mut running = Running {
        pipeline,
        replay_plan,
        notifier,
        metrics: metrics.clone(),
        current: config,
        current_tx,
    };
    let failure = running
        .serve(store.fatal(), shutdown, reloads, applies)
        .await;

    // Remote config first (a revision under probation stays the trial the next start rolls
    // back); intake stops first and finishes acking what is committed; then the forwarder collects
    // outstanding PubAcks; the store commits what they deleted and closes with the last handle.
    running.notifier.stopping();
    if let Some(remote) = remote {
        remote.stop().await;
    }
    let _ = stop_tx.send(true);
    let _ = supervisor.await;
    running.pipeline.stop().await;
    let _ = http_task.await;
    replay.close();
    let _ = store.flush().await;
    // The writer thread ends with its last handle.
    drop(store);
    let _ = tokio::task::spawn_blocking(move || store_thread.join()).await;
    tracing::info!("stopped");
    failure.map_or(Ok(()), Err)
}

/// What `run` changes while it serves.
struct Running {
    pipeline: Pipeline,
    replay_plan: crate::replay::SharedPlan,
    notifier: Arc<Notifier>,
    metrics: Arc<Metrics>,
    current: Config,
    /// The config in force, for remote config.
    current_tx: watch::Sender<Arc<Config>>,
}

impl Running {
    /// Applies reloads until `shutdown` resolves (`None`) or the store reports its file
    /// corrupt (the error to end with).
    async fn serve(
        &mut self,
        mut fatal: watch::Receiver<Option<String>>,
        shutdown: impl Future<Output = ()>,
        mut reloads: mpsc::Receiver<Config>,
        mut applies: mpsc::Receiver<remote::Apply>,
    ) -> Option<RunError> {
        tokio::pin!(shutdown);
        let mut reloads_open = true;
        loop {
            tokio::select! {
                cause = corrupted(&mut fatal) => {
                    tracing::error!(cause = %cause, "buffer file became corrupt while running: nothing more is stored; shutting down");
                    return Some(RunError::StoreCorrupt(cause));
                }
                () = &mut shutdown => return None,
                new = reloads.recv(), if reloads_open => match new {
                    Some(new) => self.reload(new, "SIGHUP").await,
                    // No more reloads; the gateway runs on.
                    None => reloads_open = false,
                },
                Some(apply) = applies.recv() => {
                    self.reload(apply.config, &apply.cause).await;
                    let _ = apply.done.send(());
                }
            }
        }
    }

    /// Applies `new`; `cause` names where it came from in the log (SIGHUP, a remote revision).
    async fn reload(&mut self, new: Config, cause: &str) {
        for (what, changed) in [
            ("[gateway]", new.gateway != self.current.gateway),
            ("[buffer]", new.buffer != self.current.buffer),
            ("[http]", new.http != self.current.http),
        ] {
            if changed {
                tracing::warn!(
                    section = what,
                    "changed, but only takes effect after a restart"
                );
            }
        }
        // A part that cannot start (e.g. an unreadable secret file) must not stop the rest:
        // it is reported, and the next reload tries it again.
        match self.pipeline.reload(&new).await {
            Ok(()) => tracing::info!(
                sources = new.mqtt.len(),
                fields = new.fields.len(),
                "{cause}: config reloaded"
            ),
            Err(e) => {
                tracing::error!(error = %e, "{cause}: config reloaded in part; fix the cause and reload again")
            }
        }
        // Replays map with the mapping in force, as intake does.
        crate::replay::reload(&self.replay_plan, &new);
        self.metrics.set_config(ConfigStatus::of(&new));
        self.current_tx.send_replace(Arc::new(new.clone()));
        self.current = new;
        // The binary said RELOADING when it read the file.
        self.notifier.ready();
    }
}

fn log_running(config: &Config) {
    tracing::info!(
        gateway = %config.gateway.id,
        sources = config.mqtt.len(),
        serial_ports = config.serial.len(),
        listeners = config.mqtt_listener.len(),
        fields = config.fields.len(),
        buffer = %config.store_path().display(),
        "gateway running"
    );
}

/// Resolves with the cause once the store reports its file corrupt (see
/// [`store::StoreHandle::fatal`]); never if the writer ends without doing so.
async fn corrupted(fatal: &mut watch::Receiver<Option<String>>) -> String {
    // The borrow of the cause ends before any further await, so `run` stays `Send`.
    let cause = (fatal.wait_for(Option::is_some).await).map(|cause| (*cause).clone());
    match cause {
        Ok(cause) => cause.unwrap_or_default(),
        Err(_) => std::future::pending().await,
    }
}
