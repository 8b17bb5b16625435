//! `run`: wires config, store, forwarder, sources and HTTP together, and shuts them down in
//! the order that loses nothing: intake first, then the forwarder, then the store.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::config::Config;
use crate::forward::Forwarder;
use crate::mapping::Mapper;
use crate::metrics::Metrics;
use crate::sources::mqtt::MqttInput;
use crate::store::StoreHandle;
use crate::systemd::{self, Notifier};
use crate::{http, nats, store};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Http(#[from] http::BindError),
    #[error(transparent)]
    Nats(#[from] nats::NatsError),
    #[error("cannot install signal handler: {0}")]
    Signal(std::io::Error),
}

pub async fn run(config: Config) -> Result<(), RunError> {
    let metrics = Arc::new(Metrics::new());
    let (store, store_thread) =
        store::start(config.store_path(), config.buffer.clone(), metrics.clone())?;
    let listener = http::bind(config.http.listen).await?;
    let (stop_tx, stop_rx) = watch::channel(false);

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(RunError::Signal)?;

    if config.nats.allow_insecure {
        tracing::warn!("[nats] allow_insecure = true: plaintext NATS connections to non-loopback servers are permitted");
    }
    let client = nats::connect(
        &config.nats,
        &format!("sahool-gateway {}", config.gateway.id),
        metrics.clone(),
    )
    .await?;
    let forwarder = Forwarder::new(
        store.clone(),
        client.clone(),
        config.gateway.id.to_string(),
        config.nats.subject.clone(),
        usize::from(config.nats.max_in_flight),
        config.nats.ack_timeout.0,
        metrics.clone(),
    );

    let mapper = Arc::new(Mapper::new(&config));
    let mut sources = Vec::new();
    for source in &config.mqtt {
        let password = match (&source.password, &source.password_file) {
            (Some(p), _) => Some(p.expose().to_string()),
            (None, Some(path)) => Some(
                nats::read_secret("MQTT password", path)?
                    .expose()
                    .to_string(),
            ),
            (None, None) => None,
        };
        let input = MqttInput {
            source: source.clone(),
            gateway: config.gateway.clone(),
            password,
            mapper: mapper.clone(),
            store: store.clone(),
            metrics: metrics.clone(),
        };
        sources.push(tokio::spawn(input.run(stop_rx.clone())));
    }
    let forwarder = tokio::spawn(forwarder.run(stop_rx.clone()));
    let http_task = tokio::spawn(http::serve(listener, metrics.clone(), stop_rx.clone()));
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
        fields = config.fields.len(),
        buffer = %config.store_path().display(),
        "gateway running"
    );

    tokio::select! {
        _ = sigterm.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
    }

    // Intake stops first and finishes acking what is committed; then the forwarder collects
    // outstanding PubAcks; the store commits what they deleted and closes with the last handle.
    notifier.stopping();
    let _ = stop_tx.send(true);
    let _ = supervisor.await;
    for s in sources {
        let _ = s.await;
    }
    let _ = forwarder.await;
    let _ = http_task.await;
    let _ = store.flush().await;
    drop(store);
    drop(client);
    let _ = tokio::task::spawn_blocking(move || store_thread.join()).await;
    tracing::info!("stopped");
    Ok(())
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
