//! The loop that carries out the command core's actions: results and deadlines committed to the
//! store, writes and read-backs on the devices, a tick each second. Commands arrive from
//! [`super::receive`] only after their inbox row committed.
//!
//! # Invariants
//! 1. Actions are carried out in the order the core returned them, and a store action is
//!    committed before the next action starts: `accepted` and an off deadline are durable
//!    before the write they precede (so a crash never leaves a write without its record).
//! 2. A store failure stops the driver before any further write; it is started again from what
//!    the store holds (open commands are resumed by reading the device first).
//! 3. Devices are driven concurrently across actuators but one operation at a time per
//!    actuator (the core hands out one at a time), and never block the loop: ticks (deadlines)
//!    go on while a bus is slow and while NATS is down.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, watch};

use super::core::{Action, ActuatorSpec, CommandResult, Core, Ctx, Readings, Status, Value};
use super::Command;
use crate::common::clock::{self, ClockSync};
use crate::common::metrics::Metrics;
use crate::config::Config;
use crate::reading::{SensorType, Timestamp};
use crate::store::{InboxState, Latest, ResultRow, StoreError, StoreHandle};

/// How often deadlines and retries are looked at.
const TICK: Duration = Duration::from_secs(1);
/// How long a stop waits for writes already on a bus, so their results are kept.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Writes and read-backs on the devices; `Err` is a bus error, in words an operator can act on.
pub(crate) trait Devices: Send + Sync {
    fn write(&self, actuator_id: &str, value: Value) -> BoxFuture<'static, Result<(), String>>;
    fn read(&self, actuator_id: &str) -> BoxFuture<'static, Result<Value, String>>;
}

/// What the driver learns from the outside while it runs.
pub(crate) enum Input {
    /// A command whose inbox row committed.
    Command(Command),
    /// The config after a reload, with the devices it binds.
    Reload(Arc<Config>, Arc<dyn Devices>),
}

/// Why a driver stopped on its own, with what it ran under, to start again from.
pub(crate) struct Stopped {
    pub(crate) error: StoreError,
    pub(crate) config: Arc<Config>,
    pub(crate) devices: Arc<dyn Devices>,
}

/// Whether `on` and `set` may go out: the kernel says the clock is synchronised (a state that
/// cannot be read counts as not).
pub(crate) fn clock_synced() -> bool {
    matches!(clock::read(), ClockSync::Synchronised { .. })
}

/// A device operation that finished.
enum Done {
    Written(String, Result<(), String>),
    Read(String, Result<Value, String>),
}

pub(crate) struct Driver {
    config: Arc<Config>,
    core: Core,
    store: StoreHandle,
    devices: Arc<dyn Devices>,
    latest: Arc<Latest>,
    metrics: Arc<Metrics>,
    clock_synced: fn() -> bool,
    /// Tenant and correlation id of the commands the core may still report on, by command id.
    envelopes: HashMap<String, (String, String)>,
    /// Tenant of each field, for results without a command (a removal's `switched_off`).
    tenants: HashMap<String, String>,
    /// `block_when` sensors by the name the core knows them by (`device/type`).
    sensors: HashMap<String, (String, SensorType)>,
    busy: FuturesUnordered<BoxFuture<'static, Done>>,
}

/// Live readings as the core asks for them: fresh values of the watched sensors.
struct Live<'a> {
    latest: &'a Latest,
    sensors: &'a HashMap<String, (String, SensorType)>,
    now: Timestamp,
}

impl Readings for Live<'_> {
    fn latest(&self, sensor: &str) -> Option<f64> {
        let (device, kind) = self.sensors.get(sensor)?;
        self.latest.fresh(device, *kind, self.now)
    }
}

impl Driver {
    pub(crate) fn new(
        config: Arc<Config>,
        store: StoreHandle,
        devices: Arc<dyn Devices>,
        metrics: Arc<Metrics>,
        clock_synced: fn() -> bool,
    ) -> Self {
        let mut driver = Self {
            core: Core::new(Core::specs(&config), config.commands.require_clock_sync),
            config: config.clone(),
            latest: store.latest(),
            store,
            devices,
            metrics,
            clock_synced,
            envelopes: HashMap::new(),
            tenants: HashMap::new(),
            sensors: HashMap::new(),
            busy: FuturesUnordered::new(),
        };
        driver.configure(&config);
        driver
    }

    /// Tenants and watched sensors from the config.
    fn configure(&mut self, config: &Config) {
        self.tenants = config
            .fields
            .iter()
            .map(|f| (f.id.to_string(), config.tenant_of(f).to_string()))
            .collect();
        self.sensors = Core::specs(config)
            .iter()
            .filter_map(|s| s.block_when.as_ref().map(|(sensor, _)| sensor.clone()))
            .filter_map(|sensor| {
                let (device, kind) = sensor.rsplit_once('/')?;
                Some((
                    sensor.clone(),
                    (device.to_string(), SensorType::from_name(kind)?),
                ))
            })
            .collect();
        self.latest.watch(self.sensors.values().cloned());
    }

    /// Runs until `shutdown`, or until the store fails: then the error, with the config and
    /// devices in force, to start again from what the store holds.
    pub(crate) async fn run(
        mut self,
        inputs: &mut mpsc::Receiver<Input>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), Stopped> {
        if let Err(e) = self.serve(inputs, &mut shutdown).await {
            return Err(Stopped {
                error: e,
                config: self.config,
                devices: self.devices,
            });
        }
        let (config, devices) = (self.config.clone(), self.devices.clone());
        self.drain().await.map_err(|error| Stopped {
            error,
            config,
            devices,
        })
    }

    async fn serve(
        &mut self,
        inputs: &mut mpsc::Receiver<Input>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), StoreError> {
        self.resume().await?;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let actions = tokio::select! {
                biased;
                _ = shutdown.changed() => return Ok(()),
                Some(done) = self.busy.next(), if !self.busy.is_empty() => self.finished(done),
                Some(input) = inputs.recv() => self.input(input),
                _ = tick.tick() => self.event(|core, ctx| core.tick(ctx)),
            };
            self.perform(actions).await?;
        }
    }

    /// Restores what the store kept, then takes up the commands still open: those accepted
    /// before the stop are resumed (device read first), the others judged as new.
    async fn resume(&mut self) -> Result<(), StoreError> {
        for (id, restored) in self.store.actuator_states().await? {
            self.core.restore(&id, restored);
        }
        let gateway_id = self.config.gateway.id.to_string();
        for open in self.store.commands_open().await? {
            let command = match Command::parse(&open.raw, &gateway_id) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(command_id = %open.command_id, error = %e, "an open command in the inbox no longer parses; left as it is");
                    continue;
                }
            };
            self.remember(&command);
            let actions = match open.state {
                InboxState::Writing => self.event(|core, ctx| core.resumed(command, ctx)),
                InboxState::Queued => self.event(|core, ctx| core.received(command, ctx)),
                InboxState::Done => continue,
            };
            self.perform(actions).await?;
        }
        Ok(())
    }

    fn input(&mut self, input: Input) -> Vec<Action> {
        match input {
            Input::Command(command) => {
                self.remember(&command);
                self.event(|core, ctx| core.received(command, ctx))
            }
            Input::Reload(config, devices) => {
                self.devices = devices;
                self.configure(&config);
                let specs: Vec<ActuatorSpec> = Core::specs(&config);
                self.config = config;
                self.event(|core, ctx| core.reload(specs, ctx))
            }
        }
    }

    fn finished(&mut self, done: Done) -> Vec<Action> {
        match done {
            Done::Written(id, outcome) => self.event(|core, ctx| core.written(&id, outcome, ctx)),
            Done::Read(id, outcome) => self.event(|core, ctx| core.read_back(&id, outcome, ctx)),
        }
    }

    /// Hands the core an event with the time, the clock's state and the live readings.
    fn event(&mut self, event: impl FnOnce(&mut Core, &Ctx<'_>) -> Vec<Action>) -> Vec<Action> {
        let now = Timestamp::now();
        let live = Live {
            latest: &self.latest,
            sensors: &self.sensors,
            now,
        };
        let ctx = Ctx {
            now,
            clock_synced: (self.clock_synced)(),
            readings: &live,
        };
        event(&mut self.core, &ctx)
    }

    fn remember(&mut self, command: &Command) {
        self.envelopes.insert(
            command.command_id.clone(),
            (command.tenant_id.clone(), command.correlation_id.clone()),
        );
    }

    /// Carries the actions out in order; each store action is committed before the next.
    async fn perform(&mut self, actions: Vec<Action>) -> Result<(), StoreError> {
        for action in actions {
            match action {
                Action::Write {
                    actuator_id, value, ..
                } => {
                    let write = self.devices.write(&actuator_id, value);
                    self.busy.push(Box::pin(
                        async move { Done::Written(actuator_id, write.await) },
                    ));
                }
                Action::ReadBack { actuator_id } => {
                    let read = self.devices.read(&actuator_id);
                    self.busy
                        .push(Box::pin(async move { Done::Read(actuator_id, read.await) }));
                }
                Action::Publish(result) => self.publish(result).await?,
                Action::StoreDeadline { actuator_id, .. }
                | Action::ClearDeadline { actuator_id } => {
                    if let Some(state) = self.core.persisted(&actuator_id) {
                        self.store.actuator_state(actuator_id, state).await?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Commits a result to the outbox with the inbox row's new state and the actuator's.
    async fn publish(&mut self, result: CommandResult) -> Result<(), StoreError> {
        let (tenant_id, correlation_id) = self.envelope(&result);
        let state = self
            .core
            .persisted(&result.actuator_id)
            .map(|s| (result.actuator_id.clone(), s));
        let status = result.status;
        let actuator = result.actuator_id.clone();
        let on = match (status, result.requested) {
            (Status::Applied | Status::SwitchedOff, Some(Value::Switch(on))) => Some(on),
            _ => None,
        };
        let command_id = result.command_id.clone();
        let row = ResultRow {
            tenant_id,
            correlation_id,
            result,
        };
        self.store.command_result(row, state).await?;
        self.metrics.count_command(status);
        if on.is_some() {
            self.metrics.set_actuator_on(&actuator, on);
        }
        if status.is_final() {
            self.envelopes.remove(&command_id);
        }
        Ok(())
    }

    /// Tenant and correlation id for a result: its command's; for one without a command, the
    /// field's tenant and an id naming the actuator and the instant.
    fn envelope(&self, result: &CommandResult) -> (String, String) {
        if let Some(known) = self.envelopes.get(&result.command_id) {
            return known.clone();
        }
        let tenant = self
            .tenants
            .get(&result.field_id)
            .cloned()
            .unwrap_or_default();
        let correlation = if result.command_id.is_empty() {
            format!("{}@{}", result.actuator_id, result.at.rfc3339())
        } else {
            result.command_id.clone()
        };
        (tenant, correlation)
    }

    /// At a stop: waits (briefly) for the device operations under way, so what they did is
    /// reported; what is still open is resumed at the next start.
    async fn drain(mut self) -> Result<(), StoreError> {
        let deadline = tokio::time::Instant::now() + STOP_GRACE;
        while !self.busy.is_empty() {
            let Ok(Some(done)) = tokio::time::timeout_at(deadline, self.busy.next()).await else {
                break;
            };
            let actions: Vec<Action> = self
                .finished(done)
                .into_iter()
                .filter(|a| {
                    matches!(
                        a,
                        Action::Publish(_)
                            | Action::StoreDeadline { .. }
                            | Action::ClearDeadline { .. }
                    )
                })
                .collect();
            self.perform(actions).await?;
        }
        Ok(())
    }
}
