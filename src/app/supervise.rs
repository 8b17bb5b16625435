//! The systemd watchdog's progress check: pinged only while the pipeline makes progress.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::common::metrics::Metrics;
use crate::common::systemd::{self, Notifier};
use crate::store::StoreHandle;

/// The pipeline's progress check, every few seconds: the store thread answers a flush and the
/// forwarder's loop went round recently. Only then is the systemd watchdog pinged, so a wedged
/// pipeline (a hung disk, a stuck task) stops the pings and systemd restarts the service.
pub(super) async fn supervise(
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
        metrics.set_pipeline_progressing(store_ok && forwarder_ok);
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
