//! `run`: wires config, store, forwarder, sources and HTTP together, and shuts them down in
//! the order that loses nothing: intake first, then the forwarder, then the store.

use std::sync::Arc;

use tokio::sync::watch;

use crate::config::Config;
use crate::forward::Forwarder;
use crate::mapping::Mapper;
use crate::metrics::Metrics;
use crate::sources::mqtt::MqttInput;
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
    let _ = stop_tx.send(true);
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
