//! `run`: wires config, store, forwarder, sources and HTTP together; reloads the config on
//! SIGHUP; and shuts down in the order that loses nothing: intake first, then the forwarder,
//! then the store. On SIGTERM/SIGINT, and when the store finds its file corrupt
//! ([`StoreHandle::fatal`]): then `run` returns [`RunError::StoreCorrupt`] (exit 75).

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::signal::unix::SignalKind;
use tokio::sync::watch;

use crate::common::http;
use crate::common::metrics::Metrics;
use crate::common::systemd::{self, Notifier};
use crate::config::{Config, Gateway, ListenerAuth, MqttListener, MqttSource, Nats, Quality};
use crate::ingest::mapping::{Mapper, SharedMapper};
use crate::sources::listener::auth::SharedPasswords;
use crate::sources::listener::{self, ListenerError, ListenerInput};
use crate::sources::mqtt::MqttInput;
use crate::sources::serial::{PortPlan, SerialInput};
use crate::store;
use crate::store::StoreHandle;
use crate::uplink::event::Subjects;
use crate::uplink::forward::Forwarder;
use crate::uplink::nats;

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

/// A running task with its own stop signal.
struct Task<C> {
    config: C,
    stop: watch::Sender<bool>,
    handle: tokio::task::JoinHandle<()>,
}

impl<C> Task<C> {
    async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.handle.await;
    }
}

/// A running `[[mqtt_listener]]` and its password file, which a reload reads again.
struct ListenerTask {
    task: Task<MqttListener>,
    passwords: Option<SharedPasswords>,
}

/// What `run` keeps to start, replace and stop the parts a reload may change.
struct Pipeline {
    gateway: Gateway,
    quality: Quality,
    store: StoreHandle,
    metrics: Arc<Metrics>,
    mapper: SharedMapper,
    sources: Vec<Task<MqttSource>>,
    serial: Vec<Task<PortPlan>>,
    forwarder: Task<Nats>,
    listeners: Vec<ListenerTask>,
}

impl Pipeline {
    fn start_source(&self, source: &MqttSource) -> Result<Task<MqttSource>, RunError> {
        let source_name = source.name.to_string();
        let password = match (&source.password, &source.password_file) {
            (Some(p), _) => Some(p.clone()),
            (None, Some(path)) => Some(
                crate::common::secrets::read_password("[[mqtt]] password", path).map_err(
                    |error| RunError::MqttSecret {
                        source_name: source_name.clone(),
                        error,
                    },
                )?,
            ),
            (None, None) => None,
        };
        let tls = source
            .tls_files()
            .map(|files| {
                crate::common::tls::client_config(&files, &format!("MQTT source {source_name}"))
            })
            .transpose()
            .map_err(|error| RunError::MqttTls { source_name, error })?;
        let input = MqttInput {
            source: source.clone(),
            quality: self.quality.clone(),
            gateway: self.gateway.clone(),
            password,
            tls,
            mapper: self.mapper.clone(),
            store: self.store.clone(),
            metrics: self.metrics.clone(),
        };
        let (stop, stop_rx) = watch::channel(false);
        Ok(Task {
            config: source.clone(),
            stop,
            handle: tokio::spawn(input.run(stop_rx)),
        })
    }

    /// A port task; it opens the device itself (with backoff), so starting cannot fail.
    fn start_serial(&self, plan: PortPlan) -> Task<PortPlan> {
        let input = SerialInput {
            plan: plan.clone(),
            quality: self.quality.clone(),
            mapper: self.mapper.clone(),
            store: self.store.clone(),
            metrics: self.metrics.clone(),
            bus: Default::default(),
        };
        let (stop, stop_rx) = watch::channel(false);
        Task {
            config: plan,
            stop,
            handle: tokio::spawn(input.run(stop_rx)),
        }
    }

    /// Stops ports that were removed or changed and starts new and changed ones; ports whose
    /// settings and (for polled protocols) sensors are unchanged keep their device open.
    async fn reload_serial(&mut self, new: &Config) {
        let plans = PortPlan::all(new);
        let mut kept = Vec::new();
        for task in std::mem::take(&mut self.serial) {
            if plans.iter().any(|p| task.config.unchanged(p)) {
                kept.push(task);
            } else {
                tracing::info!(port = %task.config.port.name, "stopping serial port (removed or changed)");
                task.stop().await;
            }
        }
        for plan in plans {
            if !kept.iter().any(|t| t.config.unchanged(&plan)) {
                tracing::info!(port = %plan.port.name, "starting serial port");
                kept.push(self.start_serial(plan));
            }
        }
        self.serial = kept;
    }

    async fn start_listener(&self, config: &MqttListener) -> Result<ListenerTask, RunError> {
        let passwords = listener::load_passwords(config)?;
        let input = ListenerInput::new(
            config,
            &self.quality,
            passwords.clone(),
            self.mapper.clone(),
            self.store.clone(),
            self.metrics.clone(),
        )
        .await?;
        let (stop, stop_rx) = watch::channel(false);
        Ok(ListenerTask {
            task: Task {
                config: config.clone(),
                stop,
                handle: tokio::spawn(input.run(stop_rx)),
            },
            passwords,
        })
    }

    /// Listeners as `new` wants them: unchanged ones keep running (their password files read
    /// again), the others are stopped and started anew. The first failure is returned.
    async fn reload_listeners(&mut self, new: &Config) -> Option<RunError> {
        let mut kept = Vec::new();
        let mut failed = None;
        for l in std::mem::take(&mut self.listeners) {
            if new
                .mqtt_listener
                .iter()
                .any(|c| same_listener(c, &l.task.config))
            {
                if let Some(passwords) = &l.passwords {
                    if let Err(e) = listener::reload_passwords(&l.task.config, passwords) {
                        tracing::error!(error = %e, "password file not reloaded; the previous one stays in force");
                        failed = Some(e.into());
                    }
                }
                kept.push(l);
            } else {
                tracing::info!(listener = %l.task.config.name, "stopping MQTT listener (removed or changed)");
                l.task.stop().await;
            }
        }
        for config in &new.mqtt_listener {
            if !kept.iter().any(|l| same_listener(&l.task.config, config)) {
                tracing::info!(listener = %config.name, "starting MQTT listener");
                match self.start_listener(config).await {
                    Ok(l) => kept.push(l),
                    Err(e) => failed = Some(e),
                }
            }
        }
        self.listeners = kept;
        failed
    }

    async fn start_forwarder(
        gateway: &Gateway,
        config: &Nats,
        store: &StoreHandle,
        metrics: &Arc<Metrics>,
    ) -> Result<Task<Nats>, RunError> {
        if config.allow_insecure {
            tracing::warn!("[nats] allow_insecure = true: plaintext NATS connections to non-loopback servers are permitted");
        }
        let connector = nats::Connector::new(
            config,
            &format!("sahool-gateway {}", gateway.id),
            metrics.clone(),
        )?;
        let forwarder = Forwarder::new(
            store.clone(),
            connector,
            gateway.id.to_string(),
            Subjects {
                reading: config.subject.clone(),
                status: config.status_subject.clone(),
            },
            usize::from(config.max_in_flight),
            config.ack_timeout.0,
            metrics.clone(),
        );
        let (stop, stop_rx) = watch::channel(false);
        Ok(Task {
            config: config.clone(),
            stop,
            handle: tokio::spawn(forwarder.run(stop_rx)),
        })
    }

    /// Applies a new, valid config: mappings at once; sources and the NATS link that changed
    /// are stopped (acks of committed messages finished, outstanding PubAcks collected) and
    /// started anew. Buffered readings stay where they are.
    async fn reload(&mut self, new: &Config, current: &Config) -> Result<(), RunError> {
        for (what, changed) in [
            (
                "[gateway]",
                format!("{:?}", new.gateway) != format!("{:?}", current.gateway),
            ),
            (
                "[buffer]",
                format!("{:?}", new.buffer) != format!("{:?}", current.buffer),
            ),
            ("[http]", new.http.listen != current.http.listen),
        ] {
            if changed {
                tracing::warn!(
                    section = what,
                    "changed, but only takes effect after a restart"
                );
            }
        }
        *self.mapper.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(Mapper::new(new));
        if self.quality != new.quality {
            // Sources read their rate limits at start: restart them all with the new ones.
            self.quality = new.quality.clone();
            for task in std::mem::take(&mut self.sources) {
                task.stop().await;
            }
            for task in std::mem::take(&mut self.serial) {
                task.stop().await;
            }
            for l in std::mem::take(&mut self.listeners) {
                l.task.stop().await;
            }
        }
        self.reload_serial(new).await;

        let mut kept = Vec::new();
        for task in std::mem::take(&mut self.sources) {
            if new.mqtt.iter().any(|m| same_source(m, &task.config)) {
                kept.push(task);
            } else {
                tracing::info!(source = %task.config.name, "stopping MQTT source (removed or changed)");
                task.stop().await;
            }
        }
        let mut failed = None;
        for source in &new.mqtt {
            if !kept.iter().any(|t| same_source(&t.config, source)) {
                tracing::info!(source = %source.name, "starting MQTT source");
                match self.start_source(source) {
                    Ok(task) => kept.push(task),
                    Err(e) => failed = Some(e),
                }
            }
        }
        self.sources = kept;
        if let Some(e) = self.reload_listeners(new).await {
            failed = Some(e);
        }

        if self.forwarder.config != new.nats {
            tracing::info!("[nats] changed: reconnecting the forwarder");
            // The old link keeps forwarding until the new one is up.
            match Self::start_forwarder(&self.gateway, &new.nats, &self.store, &self.metrics).await
            {
                Ok(next) => std::mem::replace(&mut self.forwarder, next).stop().await,
                Err(e) => failed = Some(e),
            }
        }
        failed.map_or(Ok(()), Err)
    }
}

/// Equal settings, wherever in the file they stand.
fn same_source(a: &MqttSource, b: &MqttSource) -> bool {
    MqttSource {
        line: 0,
        ..a.clone()
    } == MqttSource {
        line: 0,
        ..b.clone()
    }
}

/// Equal settings, wherever in the file they stand.
fn same_listener(a: &MqttListener, b: &MqttListener) -> bool {
    MqttListener {
        line: 0,
        ..a.clone()
    } == MqttListener {
        line: 0,
        ..b.clone()
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

pub async fn run(config_path: &Path, config: Config) -> Result<(), RunError> {
    warn_about_inline_secrets(&config);
    let metrics = Arc::new(Metrics::new());
    let (store, store_thread) = store::start(
        config.store_path(),
        config.buffer.clone(),
        config.quality.low_battery,
        metrics.clone(),
    )?;
    let listener = http::bind(config.http.listen).await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let signal = |kind| tokio::signal::unix::signal(kind).map_err(RunError::Signal);
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;

    let forwarder =
        Pipeline::start_forwarder(&config.gateway, &config.nats, &store, &metrics).await?;
    let mut pipeline = Pipeline {
        gateway: config.gateway.clone(),
        quality: config.quality.clone(),
        store: store.clone(),
        metrics: metrics.clone(),
        mapper: Arc::new(RwLock::new(Arc::new(Mapper::new(&config)))),
        sources: Vec::new(),
        serial: Vec::new(),
        forwarder,
        listeners: Vec::new(),
    };
    for source in &config.mqtt {
        let task = pipeline.start_source(source)?;
        pipeline.sources.push(task);
    }
    for plan in PortPlan::all(&config) {
        let task = pipeline.start_serial(plan);
        pipeline.serial.push(task);
    }
    for l in &config.mqtt_listener {
        let task = pipeline.start_listener(l).await?;
        pipeline.listeners.push(task);
    }
    let replay_plan = crate::replay::shared(&config);
    let replay = crate::replay::Service::new(&store, replay_plan.clone());
    let http_task = tokio::spawn(http::serve(
        listener,
        metrics.clone(),
        replay.clone(),
        config.store_path().into(),
        stop_rx.clone(),
    ));
    let notifier = Arc::new(Notifier::from_env());
    // The store is open and every source task is running.
    notifier.ready();
    let supervisor = tokio::spawn(supervise(
        notifier.clone(),
        store.clone(),
        metrics.clone(),
        stop_rx.clone(),
    ));
    tracing::info!(
        gateway = %config.gateway.id,
        sources = config.mqtt.len(),
        serial_ports = config.serial.len(),
        listeners = config.mqtt_listener.len(),
        fields = config.fields.len(),
        buffer = %config.store_path().display(),
        "gateway running"
    );

    let mut current = config;
    let mut fatal = store.fatal();
    let mut failure = None;
    loop {
        tokio::select! {
            cause = corrupted(&mut fatal) => {
                tracing::error!(cause = %cause, "buffer file became corrupt while running: nothing more is stored; shutting down");
                failure = Some(RunError::StoreCorrupt(cause));
                break;
            }
            _ = sigterm.recv() => { tracing::info!("SIGTERM: shutting down"); break; }
            _ = sigint.recv() => { tracing::info!("SIGINT: shutting down"); break; }
            _ = sighup.recv() => {
                notifier.reloading();
                match crate::config::load(config_path) {
                    Ok(new) => {
                        // A part that cannot start (e.g. an unreadable secret file) must not
                        // stop the rest: it is reported, and the next reload tries it again.
                        match pipeline.reload(&new, &current).await {
                            Ok(()) => tracing::info!(sources = new.mqtt.len(), fields = new.fields.len(), "SIGHUP: config reloaded"),
                            Err(e) => tracing::error!(error = %e, "SIGHUP: config reloaded in part; fix the cause and reload again"),
                        }
                        // Replays map with the mapping in force, as intake does.
                        crate::replay::reload(&replay_plan, &new);
                        current = new;
                    }
                    Err(e) => tracing::error!(error = %e, "SIGHUP: new config refused; the running one stays"),
                }
                notifier.ready();
            }
        }
    }

    // Intake stops first and finishes acking what is committed; then the forwarder collects
    // outstanding PubAcks; the store commits what they deleted and closes with the last handle.
    notifier.stopping();
    let _ = stop_tx.send(true);
    let _ = supervisor.await;
    let Pipeline {
        sources,
        serial,
        forwarder,
        listeners,
        store: pipeline_store,
        ..
    } = pipeline;
    for source in sources {
        source.stop().await;
    }
    for port in serial {
        port.stop().await;
    }
    for l in listeners {
        l.task.stop().await;
    }
    forwarder.stop().await;
    let _ = http_task.await;
    replay.close();
    let _ = store.flush().await;
    // The writer thread ends with its last handle.
    drop(pipeline_store);
    drop(store);
    let _ = tokio::task::spawn_blocking(move || store_thread.join()).await;
    tracing::info!("stopped");
    failure.map_or(Ok(()), Err)
}

/// Resolves with the cause once the store reports its file corrupt (see
/// [`StoreHandle::fatal`]); never if the writer ends without doing so.
async fn corrupted(fatal: &mut watch::Receiver<Option<String>>) -> String {
    match fatal.wait_for(Option::is_some).await {
        Ok(cause) => (*cause).clone().unwrap_or_default(),
        Err(_) => std::future::pending().await,
    }
}

/// The pipeline's progress check, every few seconds: the store thread answers a flush and the
/// forwarder's loop went round recently. Only then is the systemd watchdog pinged, so a wedged
/// pipeline (a hung disk, a stuck task) stops the pings and systemd restarts the service.
async fn supervise(
    notifier: Arc<Notifier>,
    store: StoreHandle,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let watchdog = systemd::watchdog_timeout();
    let period = watchdog
        .map(|t| t / 3)
        .unwrap_or(Duration::from_secs(5))
        .clamp(Duration::from_millis(200), Duration::from_secs(5));
    let mut tick = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let store_ok = matches!(
            tokio::time::timeout(period, store.flush()).await,
            Ok(Ok(()))
        );
        let forwarder_ok = metrics.forwarder_idle_for() < period * 2 + Duration::from_secs(1);
        if store_ok && forwarder_ok {
            if watchdog.is_some() {
                notifier.watchdog();
            }
        } else {
            tracing::error!(
                store_ok,
                forwarder_ok,
                "pipeline is not making progress; withholding the watchdog ping"
            );
        }
        notifier.status(&format!(
            "backlog {} readings ({} bytes), oldest {}s; NATS {}; {} dead-letters",
            metrics.buffer_readings.get(),
            metrics.buffer_bytes.get(),
            metrics.buffer_oldest_age_seconds.get(),
            if metrics.nats_is_connected() {
                "connected"
            } else {
                "disconnected"
            },
            metrics.dead_letters.get(),
        ));
    }
}
