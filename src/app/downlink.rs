//! The downlink's tasks while `[commands]` is enabled: the receiver (NATS consumer → inbox) and
//! the driver (core, devices, results). A reload hands the driver the new actuators (it keeps
//! its state and switches off what was removed); the receiver is started anew only when what it
//! connects with changed. Stopping takes the receiver first, so no command is taken that the
//! driver would not see, then the driver, which waits briefly for writes under way.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::tasks::Task;
use super::RunError;
use crate::common::backoff::Backoff;
use crate::common::metrics::Metrics;
use crate::config::{Commands, Config, Gateway, Nats};
use crate::downlink::consumer::Source;
use crate::downlink::devices::Router;
use crate::downlink::driver::{clock_synced, Devices, Driver, Input, Stopped};
use crate::downlink::receive::Receiver;
use crate::sources::serial::modbus::BusRequests;
use crate::store::StoreHandle;
use crate::uplink::nats::Connector;

/// Commands taken and not yet seen by the driver; the consumer's own `max_ack_pending` bounds
/// what arrives, this only bounds a burst.
const INPUTS: usize = 256;

/// What the receiver connects with: a change restarts it.
#[derive(Clone, PartialEq)]
struct Link {
    nats: Nats,
    commands: Commands,
    gateway: Gateway,
}

impl Link {
    fn of(config: &Config) -> Self {
        Self {
            nats: config.nats.clone(),
            commands: config.commands.clone(),
            gateway: config.gateway.clone(),
        }
    }
}

pub(super) struct Downlink {
    store: StoreHandle,
    metrics: Arc<Metrics>,
    bus: BusRequests,
    devices: Router,
    inputs: mpsc::Sender<Input>,
    receiver: (Link, Task),
    driver: Task,
}

impl Downlink {
    /// Starts both tasks if `[commands]` is enabled.
    pub(super) fn start(
        config: &Config,
        store: &StoreHandle,
        metrics: &Arc<Metrics>,
        bus: &BusRequests,
    ) -> Result<Option<Self>, RunError> {
        if !config.commands.enabled {
            return Ok(None);
        }
        let devices = Router::new(config, bus.clone(), None);
        let (inputs, rx) = mpsc::channel(INPUTS);
        let config = Arc::new(config.clone());
        let driver = {
            let (store, metrics) = (store.clone(), metrics.clone());
            let devices: Arc<dyn Devices> = Arc::new(devices.clone());
            let config = config.clone();
            Task::spawn(move |stop| drive(config, store, devices, metrics, rx, stop))
        };
        let link = Link::of(&config);
        let receiver = start_receiver(&config, store, metrics, inputs.clone())?;
        Ok(Some(Self {
            store: store.clone(),
            metrics: metrics.clone(),
            bus: bus.clone(),
            devices,
            inputs,
            receiver: (link, receiver),
            driver,
        }))
    }

    /// Brings the downlink to `new`: started, reconfigured, or (disabled) stopped.
    pub(super) async fn reload(
        this: &mut Option<Self>,
        new: &Config,
        store: &StoreHandle,
        metrics: &Arc<Metrics>,
        bus: &BusRequests,
    ) -> Result<(), RunError> {
        match (this.as_mut(), new.commands.enabled) {
            (None, _) => *this = Self::start(new, store, metrics, bus)?,
            (Some(_), false) => {
                tracing::info!("[commands] disabled: the downlink stops");
                if let Some(old) = this.take() {
                    old.stop().await;
                }
                metrics.set_commands_consumer(None);
            }
            (Some(running), true) => running.reconfigure(new).await?,
        }
        Ok(())
    }

    async fn reconfigure(&mut self, new: &Config) -> Result<(), RunError> {
        let devices = Router::new(new, self.bus.clone(), Some(&self.devices));
        self.devices = devices.clone();
        let input = Input::Reload(Arc::new(new.clone()), Arc::new(devices));
        if self.inputs.send(input).await.is_err() {
            tracing::error!("commands driver gone; the reload reaches it at the next start");
        }
        let link = Link::of(new);
        if link != self.receiver.0 {
            tracing::info!(
                "commands: [nats], [commands] or [gateway] changed; reconnecting the consumer"
            );
            let next = start_receiver(new, &self.store, &self.metrics, self.inputs.clone())?;
            let (_, old) = std::mem::replace(&mut self.receiver, (link, next));
            old.stop().await;
        }
        Ok(())
    }

    /// The receiver first (no command is taken that the driver would not see), then the driver.
    pub(super) async fn stop(self) {
        self.receiver.1.stop().await;
        self.driver.stop().await;
    }
}

fn start_receiver(
    config: &Config,
    store: &StoreHandle,
    metrics: &Arc<Metrics>,
    driver: mpsc::Sender<Input>,
) -> Result<Task, RunError> {
    let connector = Connector::secondary(&config.nats, "sahool-gateway commands", metrics.clone())?;
    let receiver = Receiver {
        connector,
        source: Source::new(&config.commands, &config.gateway),
        gateway_id: config.gateway.id.to_string(),
        store: store.clone(),
        driver,
        metrics: metrics.clone(),
    };
    Ok(Task::spawn(move |stop| receiver.run(stop)))
}

/// The driver, started again from what the store holds after it stopped on a store failure.
async fn drive(
    mut config: Arc<Config>,
    store: StoreHandle,
    mut devices: Arc<dyn Devices>,
    metrics: Arc<Metrics>,
    mut inputs: mpsc::Receiver<Input>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    loop {
        let driver = Driver::new(
            config,
            store.clone(),
            devices,
            metrics.clone(),
            clock_synced,
        );
        let Err(Stopped {
            error,
            config: was,
            devices: had,
        }) = driver.run(&mut inputs, stop.clone()).await
        else {
            return;
        };
        tracing::error!(%error, "commands driver stopped: the buffer failed; starting again from what it holds (no write goes out meanwhile)");
        (config, devices) = (was, had);
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}
