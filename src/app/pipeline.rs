//! The parts a reload may change: MQTT sources, serial ports, MQTT listeners (each a keyed
//! [`Tasks`] set), the forwarder's NATS link and the heartbeat, with what they all start from.

use std::future::ready;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use super::downlink::Downlink;
use super::tasks::{Task, Tasks};
use super::RunError;
use crate::common::metrics::Metrics;
use crate::config::{Config, Gateway, Ident, MqttListener, MqttSource, Nats, Quality};
use crate::fleet::heartbeat::{self, Heartbeat};
use crate::ingest::mapping::{Mapper, SharedMapper};
use crate::sources::listener::auth::SharedPasswords;
use crate::sources::listener::{self, ListenerInput};
use crate::sources::mqtt::{client_secrets, ClientSecretsError, MqttInput};
use crate::sources::serial::modbus::BusRequests;
use crate::sources::serial::{PortPlan, SerialInput};
use crate::store::StoreHandle;
use crate::uplink::event::Subjects;
use crate::uplink::forward::Forwarder;
use crate::uplink::nats;

/// What every task starts from.
struct Wiring {
    gateway: Gateway,
    quality: Quality,
    store: StoreHandle,
    metrics: Arc<Metrics>,
    mapper: SharedMapper,
    /// The Modbus ports' request queues, shared by the ports and the downlink's writes.
    bus: BusRequests,
    /// When the gateway started: the heartbeat's uptime.
    started: Instant,
}

/// A serial port's plan, equal to another when a port running with one can go on under the
/// other ([`PortPlan::unchanged`]).
struct Port(PortPlan);

impl PartialEq for Port {
    fn eq(&self, other: &Self) -> bool {
        self.0.unchanged(&other.0)
    }
}

pub(super) struct Pipeline {
    wiring: Wiring,
    sources: Tasks<Ident, MqttSource>,
    serial: Tasks<Ident, Port>,
    /// Each with its password file (`auth = "password"`), which a reload reads again.
    listeners: Tasks<Ident, MqttListener, Option<SharedPasswords>>,
    forwarder: (Nats, Task),
    heartbeat: (heartbeat::Plan, Task),
    /// With `[commands]` enabled: the commands consumer and the actuator driver.
    downlink: Option<Downlink>,
}

/// Entries by name. Settings compare equal wherever in the file they stand (`unplaced` clears
/// the line), so an entry moved in the file keeps running.
fn by_name<'a, T: Clone>(
    entries: &'a [T],
    name: fn(&T) -> &Ident,
    unplaced: fn(T) -> T,
) -> impl Iterator<Item = (Ident, T)> + 'a {
    entries
        .iter()
        .map(move |e| (name(e).clone(), unplaced(e.clone())))
}

fn sources(config: &Config) -> impl Iterator<Item = (Ident, MqttSource)> + '_ {
    by_name(&config.mqtt, |m| &m.name, |m| MqttSource { line: 0, ..m })
}

fn listeners(config: &Config) -> impl Iterator<Item = (Ident, MqttListener)> + '_ {
    by_name(
        &config.mqtt_listener,
        |l| &l.name,
        |l| MqttListener { line: 0, ..l },
    )
}

fn ports(config: &Config) -> impl Iterator<Item = (Ident, Port)> {
    PortPlan::all(config)
        .into_iter()
        .map(|plan| (plan.port.name.clone(), Port(plan)))
}

impl Pipeline {
    /// Starts the forwarder and every source the config names; the first failure is returned.
    pub(super) async fn start(
        config: &Config,
        store: StoreHandle,
        metrics: Arc<Metrics>,
    ) -> Result<Self, RunError> {
        let wiring = Wiring {
            gateway: config.gateway.clone(),
            quality: config.quality.clone(),
            store,
            metrics,
            mapper: Arc::new(RwLock::new(Arc::new(Mapper::new(config)))),
            bus: BusRequests::default(),
            started: Instant::now(),
        };
        let forwarder = (config.nats.clone(), wiring.start_forwarder(&config.nats)?);
        let plan = heartbeat::Plan::of(config);
        let heartbeat = (plan.clone(), wiring.start_heartbeat(plan));
        let mut pipeline = Pipeline {
            wiring,
            sources: Tasks::new("MQTT source"),
            serial: Tasks::new("serial port"),
            listeners: Tasks::new("MQTT listener"),
            forwarder,
            heartbeat,
            downlink: None,
        };
        let w = &pipeline.wiring;
        let downlink = Downlink::start(config, &w.store, &w.metrics, &w.bus);
        let started = downlink.map(|d| pipeline.downlink = d);
        let failed = pipeline.reconcile(config).await.into_iter();
        match started.err().into_iter().chain(failed).next() {
            Some(e) => {
                pipeline.stop().await;
                Err(e)
            }
            None => Ok(pipeline),
        }
    }

    /// Applies a new, valid config: mappings at once; sources and the NATS link that changed
    /// are stopped (acks of committed messages finished, outstanding PubAcks collected) and
    /// started anew. Buffered readings stay where they are. The last failure is returned; the
    /// rest is applied regardless.
    pub(super) async fn reload(&mut self, new: &Config) -> Result<(), RunError> {
        *self
            .wiring
            .mapper
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Arc::new(Mapper::new(new));
        if self.wiring.quality != new.quality {
            // Sources read their rate limits at start: restart them all with the new ones.
            self.wiring.quality = new.quality.clone();
            self.stop_sources().await;
        }
        let mut failed = self.reconcile(new).await;
        if self.forwarder.0 != new.nats {
            tracing::info!("[nats] changed: reconnecting the forwarder");
            // The old link keeps forwarding until the new one is up.
            match self.wiring.start_forwarder(&new.nats) {
                Ok(next) => {
                    let (_, old) = std::mem::replace(&mut self.forwarder, (new.nats.clone(), next));
                    old.stop().await;
                }
                Err(e) => failed.push(e),
            }
        }
        let plan = heartbeat::Plan::of(new);
        if self.heartbeat.0 != plan {
            // A new interval or config revision: the next heartbeat an interval from now.
            let next = (plan.clone(), self.wiring.start_heartbeat(plan));
            std::mem::replace(&mut self.heartbeat, next).1.stop().await;
        }
        let w = &self.wiring;
        if let Err(e) =
            Downlink::reload(&mut self.downlink, new, &w.store, &w.metrics, &w.bus).await
        {
            failed.push(e);
        }
        failed.pop().map_or(Ok(()), Err)
    }

    /// Serial ports, MQTT sources and listeners as `config` wants them; the failures.
    async fn reconcile(&mut self, config: &Config) -> Vec<RunError> {
        let wiring = &self.wiring;
        let serial = self
            .serial
            .reconcile(ports(config), |port| {
                ready(Ok::<_, RunError>(wiring.start_serial(&port.0)))
            })
            .await;
        let sources = self
            .sources
            .reconcile(sources(config), |source| ready(wiring.start_source(source)))
            .await;
        let listeners = self
            .listeners
            .reconcile(listeners(config), |config| {
                let config = config.clone();
                async move { wiring.start_listener(&config).await }
            })
            .await;
        let mut failed: Vec<RunError> = [serial.failed, sources.failed, listeners.failed]
            .into_iter()
            .flatten()
            .collect();
        failed.extend(self.reload_passwords(&listeners.kept));
        failed
    }

    /// Listeners that kept running read their password files again; the previous one stays in
    /// force where that fails.
    fn reload_passwords(&self, kept: &[Ident]) -> Vec<RunError> {
        let mut failed = Vec::new();
        for name in kept {
            let Some((config, Some(shared))) = self.listeners.get(name) else {
                continue;
            };
            if let Err(e) = listener::reload_passwords(config, shared) {
                tracing::error!(error = %e, "password file not reloaded; the previous one stays in force");
                failed.push(e.into());
            }
        }
        failed
    }

    /// Stops every source, in the shutdown order: MQTT sources, serial ports, listeners.
    async fn stop_sources(&mut self) {
        self.sources.stop_all().await;
        self.serial.stop_all().await;
        self.listeners.stop_all().await;
    }

    /// Intake stops first and finishes acking what is committed; then the heartbeat and the
    /// downlink; then the forwarder collects outstanding PubAcks.
    pub(super) async fn stop(mut self) {
        self.stop_sources().await;
        self.heartbeat.1.stop().await;
        // Before the forwarder: the results the driver commits while it stops are forwarded.
        if let Some(downlink) = self.downlink.take() {
            downlink.stop().await;
        }
        self.forwarder.1.stop().await;
    }
}

impl Wiring {
    fn start_source(&self, source: &MqttSource) -> Result<Task, RunError> {
        let source_name = source.name.to_string();
        let (password, tls) = client_secrets(source).map_err(|e| match e {
            ClientSecretsError::Password(error) => RunError::MqttSecret { source_name, error },
            ClientSecretsError::Tls(error) => RunError::MqttTls { source_name, error },
        })?;
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
        Ok(Task::spawn(|stop| input.run(stop)))
    }

    /// A port task; it opens the device itself (with backoff), so starting cannot fail.
    fn start_serial(&self, plan: &PortPlan) -> Task {
        let input = SerialInput {
            plan: plan.clone(),
            quality: self.quality.clone(),
            mapper: self.mapper.clone(),
            store: self.store.clone(),
            metrics: self.metrics.clone(),
            bus: self.bus.clone(),
        };
        Task::spawn(|stop| input.run(stop))
    }

    /// A listener task and its password file, which a reload reads again.
    async fn start_listener(
        &self,
        config: &MqttListener,
    ) -> Result<Task<Option<SharedPasswords>>, RunError> {
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
        Ok(Task::spawn(|stop| input.run(stop)).with(passwords))
    }

    fn start_heartbeat(&self, plan: heartbeat::Plan) -> Task {
        let task = Heartbeat {
            plan,
            store: self.store.clone(),
            metrics: self.metrics.clone(),
            started: self.started,
        };
        Task::spawn(|stop| task.run(stop))
    }

    fn start_forwarder(&self, config: &Nats) -> Result<Task, RunError> {
        if config.allow_insecure {
            tracing::warn!("[nats] allow_insecure = true: plaintext NATS connections to non-loopback servers are permitted");
        }
        let connector = nats::Connector::new(
            config,
            &format!("sahool-gateway {}", self.gateway.id),
            self.metrics.clone(),
        )?;
        let forwarder = Forwarder::new(
            self.store.clone(),
            connector,
            self.gateway.id.to_string(),
            Subjects {
                reading: config.subject.clone(),
                status: config.status_subject.clone(),
            },
            usize::from(config.max_in_flight),
            config.ack_timeout.0,
            self.metrics.clone(),
        );
        Ok(Task::spawn(|stop| forwarder.run(stop)))
    }
}
