//! The downlink's decisions, without I/O: commands, write and read-back outcomes, clock ticks
//! and reloads come in as calls; writes, read-backs, results and off deadlines to keep come out
//! as [`Action`]s. No sockets, no sleeps, no clock of its own: every event carries a [`Ctx`]
//! with the time, whether the clock is synchronised, and the live readings for interlocks.
//!
//! The driver carries out the actions in order and reports each write ([`Core::written`]) and
//! read-back ([`Core::read_back`]); it calls [`Core::tick`] about once a second so retries and
//! off deadlines happen on time, whatever else is going on.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::Duration;

use serde::Serialize;

use super::command::{Command, Request};
use crate::common::backoff::Backoff;
use crate::config;
use crate::reading::Timestamp;

/// Command ids remembered after they are done, to ignore a repeat that slips past the inbox.
const SEEN: usize = 4096;
/// First and longest wait before writing again after a bus error.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// What the core knows of the world at an event.
pub struct Ctx<'a> {
    /// The gateway's wall clock (expiry and deadlines are wall-clock instants).
    pub now: Timestamp,
    pub clock_synced: bool,
    /// The latest fresh reading of each sensor, by `device_id/sensor_type`.
    pub readings: &'a dyn Readings,
}

/// Live readings for `block_when`; a sensor without a fresh reading has none.
pub trait Readings {
    fn latest(&self, sensor: &str) -> Option<f64>;
}

impl<S: std::hash::BuildHasher> Readings for HashMap<String, f64, S> {
    fn latest(&self, sensor: &str) -> Option<f64> {
        self.get(sensor).copied()
    }
}

/// An actuator as the core needs it, from its `[[fields.actuators]]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct ActuatorSpec {
    pub id: String,
    pub field_id: String,
    pub kind: config::ActuatorKind,
    pub max_on: Option<Duration>,
    pub min_off: Option<Duration>,
    pub requires_on: Vec<String>,
    /// `(sensor, limit)`: refuse `on` / `set` while the reading is beyond the limit or missing.
    pub block_when: Option<(String, Limit)>,
    pub range: Option<(f64, f64)>,
    /// Whether the device's state can be read back (Modbus; MQTT with a state topic). Without,
    /// a write that went out is reported `applied` with no read-back value.
    pub readback: bool,
    /// How far a read-back setpoint may be from the value written and still match.
    pub tolerance: f64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Limit {
    Below(f64),
    Above(f64),
}

impl ActuatorSpec {
    pub fn from_config(field: &config::Field, a: &config::Actuator) -> Self {
        let block_when = a.block_when.as_ref().and_then(|b| {
            let limit = b.below.map(Limit::Below).or(b.above.map(Limit::Above))?;
            Some((b.sensor.to_string(), limit))
        });
        let (readback, tolerance) = match (&a.modbus, &a.mqtt) {
            (Some(m), _) if m.value_type() == config::serial::RegisterType::F32 => (true, 1e-3),
            // An integer register holds the value to within half a step of its scale.
            (Some(m), _) => (true, m.scale().abs() / 2.0),
            (None, Some(m)) => (m.state_topic().is_some(), 1e-9),
            (None, None) => (false, 0.0),
        };
        Self {
            id: a.id.to_string(),
            field_id: field.id.to_string(),
            kind: a.kind,
            max_on: a.max_on.map(|d| d.0),
            min_off: a.min_off.map(|d| d.0),
            requires_on: a.requires_on.iter().map(|r| r.to_string()).collect(),
            block_when,
            range: a.range.map(|[lo, hi]| (lo, hi)),
            readback,
            tolerance,
        }
    }
}

/// A state written or read: a switch's on/off, a setpoint's value.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Value {
    Switch(bool),
    Number(f64),
}

/// `payload.status` of a result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Accepted,
    Applied,
    Failed,
    Rejected,
    Expired,
    Superseded,
    SwitchedOff,
}

impl Status {
    pub const ALL: [Status; 7] = [
        Self::Accepted,
        Self::Applied,
        Self::Failed,
        Self::Rejected,
        Self::Expired,
        Self::Superseded,
        Self::SwitchedOff,
    ];

    /// As in the result's payload (and the inbox's `status` column).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Applied => "applied",
            Self::Failed => "failed",
            Self::Rejected => "rejected",
            Self::Expired => "expired",
            Self::Superseded => "superseded",
            Self::SwitchedOff => "switched_off",
        }
    }

    /// Whether the command is done with after this step (all but `accepted`).
    pub fn is_final(self) -> bool {
        self != Self::Accepted
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

/// `payload.reason` of a failed or rejected result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    UnknownActuator,
    /// A value outside the range, or an action the actuator's kind does not have (`set` on a
    /// switch, `on`/`off` on a setpoint): outside the declaration either way.
    OutOfRange,
    Interlock,
    /// `min_off` since the last run has not passed.
    RateLimited,
    ClockUnsynced,
    ReadbackMismatch,
    BusError,
}

impl Reason {
    /// As in the result's payload (and the inbox's `reason` column).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnknownActuator => "unknown_actuator",
            Self::OutOfRange => "out_of_range",
            Self::Interlock => "interlock",
            Self::RateLimited => "rate_limited",
            Self::ClockUnsynced => "clock_unsynced",
            Self::ReadbackMismatch => "readback_mismatch",
            Self::BusError => "bus_error",
        }
    }
}

/// One step of a command, as `sahool.iot.actuator.result` reports it. The store puts it in
/// the envelope of the command's inbox row (tenant, correlation id): `StoreHandle::command_result`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CommandResult {
    /// Empty for a `switched_off` with no command behind it.
    pub command_id: String,
    pub actuator_id: String,
    pub field_id: String,
    pub status: Status,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    pub requested: Option<Value>,
    pub readback: Option<Value>,
    #[serde(serialize_with = "rfc3339")]
    pub at: Timestamp,
}

fn rfc3339<S: serde::Serializer>(t: &Timestamp, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(t.rfc3339().as_str())
}

/// Why a write is made.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Cause {
    Command(String),
    /// The off deadline of the `on` with this command id.
    Deadline(String),
    /// The actuator left the config while on.
    Removal,
    /// An interlock broke while it was on; the `on` that began the run, if known.
    Interlock(String),
}

/// What the driver does next.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Write to the device, then report with [`Core::written`].
    Write {
        actuator_id: String,
        value: Value,
        cause: Cause,
    },
    /// Read the device's state, then report with [`Core::read_back`].
    ReadBack {
        actuator_id: String,
    },
    /// Put the result in the outbox.
    Publish(CommandResult),
    /// Keep this off deadline in SQLite (replacing the actuator's previous one) before the
    /// next action is carried out.
    StoreDeadline {
        actuator_id: String,
        deadline: Deadline,
    },
    ClearDeadline {
        actuator_id: String,
    },
}

/// An off deadline, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deadline {
    pub at: Timestamp,
    /// The `on` that set it; its `switched_off` result carries this id.
    pub command_id: String,
    /// When the run began (`max_on` counts from here, across restarts too).
    pub run_since: Timestamp,
}

/// What the store kept of an actuator across a restart.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Restored {
    /// `issued_at` of the newest command written to it.
    pub newest_written: Option<Timestamp>,
    /// The off deadline it had, to enforce at the next tick however long ago it passed.
    pub deadline: Option<Deadline>,
    /// When it was last confirmed off, for `min_off`.
    pub off_since: Option<Timestamp>,
}

/// Why a command is refused without a write.
type Refusal = (Status, Option<Reason>);

/// A write and its read-back under way.
#[derive(Debug)]
struct Job {
    cause: JobCause,
    value: Value,
    step: Step,
    backoff: Backoff,
    /// The off deadline this write set (an `on`), to keep once applied.
    deadline: Option<Timestamp>,
    /// What is known of the last write, which decides what a retry does.
    landed: Landed,
}

/// Whether the job's last write reached the device, as far as the core knows. A retry reads
/// whenever the write may have landed, so a write that landed is never sent twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Landed {
    /// Not written yet, or read back as not taken: a retry writes.
    No,
    /// Acknowledged by the device: a retry reads back again, and a mismatch is a failure.
    Acked,
    /// Unknown (taken up after a restart, or the write's answer lost on the bus): a retry reads
    /// first and writes only if the device is not yet in the state asked for.
    Unknown,
}

#[derive(Debug)]
enum JobCause {
    Command(Command),
    Deadline(String),
    Removal,
    Interlock(String),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Step {
    Writing,
    Reading,
    RetryAt(Timestamp),
}

/// One actuator's state between events.
#[derive(Debug)]
struct Actuator {
    spec: ActuatorSpec,
    /// The state last confirmed by a read-back (or a write without one); `None`: unknown.
    confirmed: Option<Value>,
    /// Since when the current run may have been on (set at an `on` write, cleared when off
    /// is confirmed): `max_on` counts from here.
    run_since: Option<Timestamp>,
    /// The latest `on` of the current run (not kept across restarts; the deadline's is).
    run_by: Option<String>,
    off_since: Option<Timestamp>,
    newest_written: Option<Timestamp>,
    deadline: Option<Deadline>,
    /// Commands waiting, in `issued_at` order (then arrival).
    queue: Vec<Command>,
    job: Option<Job>,
    /// Gone from the config: finish the job, switch off, then forget it.
    removed: bool,
}

impl Actuator {
    fn new(spec: ActuatorSpec) -> Self {
        Self {
            spec,
            confirmed: None,
            run_since: None,
            run_by: None,
            off_since: None,
            newest_written: None,
            deadline: None,
            queue: Vec::new(),
            job: None,
            removed: false,
        }
    }

    /// Whether a switch may be on: confirmed so, or a run or deadline not yet ended by a
    /// confirmed off.
    fn may_be_on(&self) -> bool {
        self.spec.kind == config::ActuatorKind::Switch
            && (self.confirmed == Some(Value::Switch(true))
                || self.run_since.is_some()
                || self.deadline.is_some())
    }

    fn start_off(&mut self, cause: JobCause, out: &mut Vec<Action>) {
        let value = Value::Switch(false);
        out.push(Action::Write {
            actuator_id: self.spec.id.clone(),
            value,
            cause: cause.public(),
        });
        self.job = Some(Job::new(cause, value, None));
    }

    /// The actuator is off, as confirmed: the run and its deadline end.
    fn confirmed_off(&mut self, now: Timestamp, out: &mut Vec<Action>) {
        self.run_since = None;
        self.run_by = None;
        self.off_since = Some(now);
        if self.deadline.take().is_some() {
            out.push(Action::ClearDeadline {
                actuator_id: self.spec.id.clone(),
            });
        }
    }
}

impl Job {
    fn new(cause: JobCause, value: Value, deadline: Option<Timestamp>) -> Self {
        Self {
            cause,
            value,
            step: Step::Writing,
            backoff: Backoff::new(RETRY_FIRST, RETRY_MAX),
            deadline,
            landed: Landed::No,
        }
    }
}

impl JobCause {
    fn public(&self) -> Cause {
        match self {
            Self::Command(c) => Cause::Command(c.command_id.clone()),
            Self::Deadline(id) => Cause::Deadline(id.clone()),
            Self::Removal => Cause::Removal,
            Self::Interlock(id) => Cause::Interlock(id.clone()),
        }
    }
}

/// Command ids seen lately, oldest forgotten first.
#[derive(Debug, Default)]
struct Seen {
    ids: HashSet<String>,
    order: VecDeque<String>,
}

impl Seen {
    /// False if `id` was seen already.
    fn insert(&mut self, id: &str) -> bool {
        if !self.ids.insert(id.to_string()) {
            return false;
        }
        self.order.push_back(id.to_string());
        if self.order.len() > SEEN {
            if let Some(oldest) = self.order.pop_front() {
                self.ids.remove(&oldest);
            }
        }
        true
    }
}

/// The downlink's state: every actuator's, and the command ids seen lately.
#[derive(Debug)]
pub struct Core {
    /// By id; ordered, so a tick or reload acts on actuators in the same order every time.
    actuators: BTreeMap<String, Actuator>,
    require_clock_sync: bool,
    seen: Seen,
}

impl Core {
    pub fn new(specs: Vec<ActuatorSpec>, require_clock_sync: bool) -> Self {
        Self {
            actuators: specs
                .into_iter()
                .map(|s| (s.id.clone(), Actuator::new(s)))
                .collect(),
            require_clock_sync,
            seen: Seen::default(),
        }
    }

    /// The actuators of every field in the config.
    pub fn specs(config: &config::Config) -> Vec<ActuatorSpec> {
        config
            .fields
            .iter()
            .flat_map(|f| {
                f.actuators
                    .iter()
                    .map(move |a| ActuatorSpec::from_config(f, a))
            })
            .collect()
    }

    /// At start, before any event: what the store kept of an actuator. A deadline that passed
    /// meanwhile is enforced at the first tick.
    pub fn restore(&mut self, actuator_id: &str, restored: Restored) {
        let Some(a) = self.actuators.get_mut(actuator_id) else {
            return;
        };
        a.newest_written = restored.newest_written;
        a.off_since = restored.off_since;
        a.run_since = restored.deadline.as_ref().map(|d| d.run_since);
        a.deadline = restored.deadline;
    }

    /// What the store keeps of an actuator, as it stands now ([`Core::restore`] takes it back).
    pub fn persisted(&self, actuator_id: &str) -> Option<Restored> {
        let a = self.actuators.get(actuator_id)?;
        Some(Restored {
            newest_written: a.newest_written,
            deadline: a.deadline.clone(),
            off_since: a.off_since,
        })
    }

    /// The state last confirmed on the device, if known.
    pub fn confirmed(&self, actuator_id: &str) -> Option<Value> {
        self.actuators.get(actuator_id).and_then(|a| a.confirmed)
    }

    pub fn deadline(&self, actuator_id: &str) -> Option<&Deadline> {
        self.actuators.get(actuator_id)?.deadline.as_ref()
    }

    /// A command the inbox committed. A command id seen lately is ignored (no actions).
    pub fn received(&mut self, command: Command, ctx: &Ctx<'_>) -> Vec<Action> {
        if !self.seen.insert(&command.command_id) {
            tracing::debug!(command_id = %command.command_id, "command seen already; ignored");
            return Vec::new();
        }
        self.enqueue(command, ctx)
    }

    /// The command's actuator, if it is declared (for the command's field) and not removed.
    fn actuator_for(&mut self, command: &Command) -> Option<&mut Actuator> {
        self.actuators
            .get_mut(&command.actuator_id)
            .filter(|a| !a.removed && a.spec.field_id == command.field_id)
    }

    /// Queues the command behind its actuator's (in `issued_at` order; equal ones in arrival
    /// order) and moves the queue on; an undeclared actuator is refused.
    fn enqueue(&mut self, command: Command, ctx: &Ctx<'_>) -> Vec<Action> {
        let mut out = Vec::new();
        let Some(a) = self.actuator_for(&command) else {
            let refusal = (Status::Rejected, Some(Reason::UnknownActuator));
            out.push(refused(&command, refusal, ctx.now));
            return out;
        };
        let at = a
            .queue
            .partition_point(|q| q.issued_at <= command.issued_at);
        let id = command.actuator_id.clone();
        a.queue.insert(at, command);
        self.advance(&id, ctx, &mut out);
        out
    }

    /// At start, after [`Core::restore`]: a command whose `accepted` was committed before the
    /// gateway stopped, so its write may or may not have reached the device. The device is
    /// read first: in the state asked for, the command is `applied` without a second write;
    /// otherwise it is written (unless it expired meanwhile). An actuator that cannot be read
    /// back is judged and written again: commands are absolute, so that is harmless (its
    /// second `accepted` is the same event: the store keeps one per command and status).
    pub fn resumed(&mut self, command: Command, ctx: &Ctx<'_>) -> Vec<Action> {
        self.seen.insert(&command.command_id);
        let Some(a) = self
            .actuator_for(&command)
            .filter(|a| a.job.is_none() && a.spec.readback)
        else {
            return self.enqueue(command, ctx);
        };
        let value = requested(command.request);
        let deadline = a
            .deadline
            .as_ref()
            .filter(|d| d.command_id == command.command_id)
            .map(|d| d.at);
        a.newest_written = a.newest_written.max(Some(command.issued_at));
        if let Request::On { .. } = command.request {
            a.run_since.get_or_insert(ctx.now);
            a.run_by = Some(command.command_id.clone());
        }
        let mut job = Job::new(JobCause::Command(command), value, deadline);
        job.step = Step::Reading;
        job.landed = Landed::Unknown;
        a.job = Some(job);
        vec![Action::ReadBack {
            actuator_id: a.spec.id.clone(),
        }]
    }

    /// How the last [`Action::Write`] for this actuator went (`Err`: the bus error).
    pub fn written(
        &mut self,
        actuator_id: &str,
        outcome: Result<(), String>,
        ctx: &Ctx<'_>,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        let Some(a) = self.in_step(actuator_id, Step::Writing) else {
            return out;
        };
        match outcome {
            Ok(()) if a.spec.readback => {
                if let Some(job) = a.job.as_mut() {
                    job.step = Step::Reading;
                    job.landed = Landed::Acked;
                }
                out.push(Action::ReadBack {
                    actuator_id: actuator_id.to_string(),
                });
            }
            Ok(()) => finish(a, None, ctx.now, &mut out),
            Err(detail) => {
                // The request may have reached the device and only its answer been lost.
                if let Some(job) = a.job.as_mut().filter(|_| a.spec.readback) {
                    job.landed = Landed::Unknown;
                }
                bus_error(a, &detail, ctx.now, &mut out)
            }
        }
        self.advance(actuator_id, ctx, &mut out);
        self.advance_dependents(actuator_id, ctx, &mut out);
        out
    }

    /// What the last [`Action::ReadBack`] for this actuator read (`Err`: the bus error).
    pub fn read_back(
        &mut self,
        actuator_id: &str,
        outcome: Result<Value, String>,
        ctx: &Ctx<'_>,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        let Some(a) = self.in_step(actuator_id, Step::Reading) else {
            return out;
        };
        let (wanted, tolerance) = match &a.job {
            Some(job) => (job.value, a.spec.tolerance),
            None => return out,
        };
        let unknown = a.job.as_ref().is_some_and(|j| j.landed == Landed::Unknown);
        match outcome {
            Ok(read) if same(wanted, read, tolerance) => finish(a, Some(read), ctx.now, &mut out),
            Ok(read) if unknown => write_unlanded(a, read, ctx.now, &mut out),
            Ok(read) => mismatch(a, read, ctx.now, &mut out),
            Err(detail) => bus_error(a, &detail, ctx.now, &mut out),
        }
        self.advance(actuator_id, ctx, &mut out);
        self.advance_dependents(actuator_id, ctx, &mut out);
        out
    }

    /// About once a second: retries that are due, off deadlines that passed, queues that can
    /// move on.
    pub fn tick(&mut self, ctx: &Ctx<'_>) -> Vec<Action> {
        let mut out = Vec::new();
        let ids: Vec<String> = self.actuators.keys().cloned().collect();
        for id in ids {
            if let Some(a) = self.actuators.get_mut(&id) {
                retry_if_due(a, ctx.now, &mut out);
            }
            self.advance(&id, ctx, &mut out);
        }
        out
    }

    /// The actuators after a reload: new ones start unknown, changed ones keep their state,
    /// removed ones refuse what they had queued, are switched off if they may be on, and are
    /// then forgotten.
    pub fn reload(&mut self, specs: Vec<ActuatorSpec>, ctx: &Ctx<'_>) -> Vec<Action> {
        let mut out = Vec::new();
        let mut specs: HashMap<String, ActuatorSpec> =
            specs.into_iter().map(|s| (s.id.clone(), s)).collect();
        for (id, a) in &mut self.actuators {
            match specs.remove(id) {
                Some(spec) => {
                    a.spec = spec;
                    a.removed = false;
                }
                None => {
                    a.removed = true;
                    let refusal = (Status::Rejected, Some(Reason::UnknownActuator));
                    for c in a.queue.drain(..) {
                        out.push(refused(&c, refusal, ctx.now));
                    }
                }
            }
        }
        for (id, spec) in specs {
            self.actuators.insert(id, Actuator::new(spec));
        }
        let ids: Vec<String> = self.actuators.keys().cloned().collect();
        for id in ids {
            self.advance(&id, ctx, &mut out);
        }
        out
    }

    /// The actuator, if its job is at `step`; an outcome for anything else is stale.
    fn in_step(&mut self, actuator_id: &str, step: Step) -> Option<&mut Actuator> {
        let a = self.actuators.get_mut(actuator_id);
        let found = a.as_ref().and_then(|a| a.job.as_ref()).map(|j| j.step);
        if found != Some(step) {
            tracing::warn!(actuator = actuator_id, ?found, expected = ?step, "outcome for no such step; ignored");
            return None;
        }
        a
    }

    /// Starts the next write the actuator can make, refusing the commands that cannot be
    /// applied on the way; forgets a removed actuator once it is safely off.
    fn advance(&mut self, actuator_id: &str, ctx: &Ctx<'_>, out: &mut Vec<Action>) {
        let Some(mut a) = self.actuators.remove(actuator_id) else {
            return;
        };
        let keep = self.advance_one(&mut a, ctx, out);
        if keep {
            self.actuators.insert(actuator_id.to_string(), a);
        }
    }

    /// [`Core::advance`] for an actuator taken out of the map (so the others can be read for
    /// interlocks). False once a removed actuator is done with.
    fn advance_one(&self, a: &mut Actuator, ctx: &Ctx<'_>, out: &mut Vec<Action>) -> bool {
        loop {
            if a.job.is_some() {
                return true;
            }
            if let Some(d) = a.deadline.as_ref().filter(|d| d.at <= ctx.now) {
                let cause = JobCause::Deadline(d.command_id.clone());
                a.start_off(cause, out);
                return true;
            }
            if a.removed {
                if a.may_be_on() {
                    a.start_off(JobCause::Removal, out);
                    return true;
                }
                return false;
            }
            if self.interlock_broken(a, ctx) {
                // The `on` behind this run gets the `switched_off` that says why it ended.
                let began = a
                    .run_by
                    .clone()
                    .or_else(|| a.deadline.as_ref().map(|d| d.command_id.clone()));
                tracing::warn!(actuator = %a.spec.id, "an interlock broke while on; switching off");
                a.start_off(JobCause::Interlock(began.unwrap_or_default()), out);
                return true;
            }
            if a.queue.is_empty() {
                return true;
            }
            let command = a.queue.remove(0);
            match self.judge(a, &command, ctx) {
                Ok(()) => start(a, command, ctx.now, out),
                Err(refusal) => out.push(refused(&command, refusal, ctx.now)),
            }
        }
    }

    /// Whether the command at the head of the actuator's queue may be written now.
    fn judge(&self, a: &Actuator, c: &Command, ctx: &Ctx<'_>) -> Result<(), Refusal> {
        let rejected = |reason| Err((Status::Rejected, Some(reason)));
        if c.expires_at <= ctx.now {
            return Err((Status::Expired, None));
        }
        if a.newest_written.is_some_and(|t| c.issued_at < t) {
            return Err((Status::Superseded, None));
        }
        if !declared(&a.spec, c.request) {
            return rejected(Reason::OutOfRange);
        }
        if c.request == Request::Off {
            return Ok(());
        }
        if self.require_clock_sync && !ctx.clock_synced {
            return rejected(Reason::ClockUnsynced);
        }
        if !self.interlocks_allow(&a.spec, ctx) {
            return rejected(Reason::Interlock);
        }
        let resting = match (c.request, a.spec.min_off, a.off_since) {
            (Request::On { .. }, Some(min_off), Some(since)) => {
                a.confirmed != Some(Value::Switch(true)) && ctx.now < after(since, min_off)
            }
            _ => false,
        };
        if resting {
            return rejected(Reason::RateLimited);
        }
        Ok(())
    }

    /// Before an `on` or `set`: each of `requires_on` confirmed on, and a `block_when`
    /// reading within its limit (none is no go).
    fn interlocks_allow(&self, spec: &ActuatorSpec, ctx: &Ctx<'_>) -> bool {
        let required_on = spec
            .requires_on
            .iter()
            .all(|other| self.confirmed(other) == Some(Value::Switch(true)));
        let unblocked = spec.block_when.as_ref().is_none_or(|(sensor, limit)| {
            ctx.readings
                .latest(sensor)
                .is_some_and(|v| !limit.crossed(v))
        });
        required_on && unblocked
    }

    /// While a switch may be on: an interlock known broken, i.e. one of `requires_on`
    /// confirmed off (a pump whose valve closed) or a `block_when` reading past its limit (a
    /// tank run low). Unknown states and missing readings do not stop a run; they refuse the
    /// next `on`.
    fn interlock_broken(&self, a: &Actuator, ctx: &Ctx<'_>) -> bool {
        if !a.may_be_on() {
            return false;
        }
        let partner_off = a
            .spec
            .requires_on
            .iter()
            .any(|other| self.confirmed(other) == Some(Value::Switch(false)));
        let blocked = a.spec.block_when.as_ref().is_some_and(|(sensor, limit)| {
            ctx.readings
                .latest(sensor)
                .is_some_and(|v| limit.crossed(v))
        });
        partner_off || blocked
    }

    /// Advances the switches that require `actuator_id`, so one whose partner just went off
    /// stops now rather than at the next tick.
    fn advance_dependents(&mut self, actuator_id: &str, ctx: &Ctx<'_>, out: &mut Vec<Action>) {
        let dependents: Vec<String> = self
            .actuators
            .values()
            .filter(|a| a.spec.requires_on.iter().any(|r| r == actuator_id))
            .map(|a| a.spec.id.clone())
            .collect();
        for id in dependents {
            self.advance(&id, ctx, out);
        }
    }
}

impl Limit {
    /// Whether `value` is past the limit (at the limit is still within).
    fn crossed(self, value: f64) -> bool {
        match self {
            Self::Below(l) => value < l,
            Self::Above(l) => value > l,
        }
    }
}

/// Whether the actuator's declaration allows the request: on/off for switches, a value
/// within the range for setpoints.
fn declared(spec: &ActuatorSpec, request: Request) -> bool {
    match (spec.kind, request) {
        (config::ActuatorKind::Switch, Request::On { .. } | Request::Off) => true,
        (config::ActuatorKind::Setpoint, Request::Set(v)) => {
            spec.range.is_some_and(|(lo, hi)| lo <= v && v <= hi)
        }
        _ => false,
    }
}

/// Starts writing a command that passed: `accepted`, the off deadline of an `on` stored
/// before the write, then the write.
fn start(a: &mut Actuator, command: Command, now: Timestamp, out: &mut Vec<Action>) {
    let value = requested(command.request);
    a.newest_written = a.newest_written.max(Some(command.issued_at));
    out.push(Action::Publish(result(
        &command,
        Status::Accepted,
        None,
        now,
    )));
    let mut deadline = None;
    if let Request::On { duration } = command.request {
        a.run_by = Some(command.command_id.clone());
        let run_since = *a.run_since.get_or_insert(now);
        let asked = duration.map(|d| after(now, d));
        let cap = a.spec.max_on.map(|m| after(run_since, m));
        deadline = asked.into_iter().chain(cap).min();
        if let Some(at) = deadline {
            let d = Deadline {
                at,
                command_id: command.command_id.clone(),
                run_since,
            };
            a.deadline = Some(d.clone());
            out.push(Action::StoreDeadline {
                actuator_id: a.spec.id.clone(),
                deadline: d,
            });
        }
    }
    out.push(Action::Write {
        actuator_id: a.spec.id.clone(),
        value,
        cause: Cause::Command(command.command_id.clone()),
    });
    a.job = Some(Job::new(JobCause::Command(command), value, deadline));
}

/// The write took effect (read back to match, or with nothing to read back): the state, the
/// deadline and the result that follow.
fn finish(a: &mut Actuator, readback: Option<Value>, now: Timestamp, out: &mut Vec<Action>) {
    let Some(job) = a.job.take() else { return };
    a.confirmed = Some(job.value);
    match job.value {
        Value::Switch(false) => a.confirmed_off(now, out),
        // An `on` without a deadline of its own ends the previous one: the newest wins.
        Value::Switch(true) if job.deadline.is_none() && a.deadline.take().is_some() => {
            out.push(Action::ClearDeadline {
                actuator_id: a.spec.id.clone(),
            })
        }
        _ => {}
    }
    let (command_id, status, reason) = match &job.cause {
        JobCause::Command(c) => (c.command_id.clone(), Status::Applied, None),
        JobCause::Deadline(id) => (id.clone(), Status::SwitchedOff, None),
        JobCause::Removal => (String::new(), Status::SwitchedOff, None),
        JobCause::Interlock(id) => (id.clone(), Status::SwitchedOff, Some(Reason::Interlock)),
    };
    out.push(Action::Publish(CommandResult {
        command_id,
        actuator_id: a.spec.id.clone(),
        field_id: a.spec.field_id.clone(),
        status,
        reason,
        requested: Some(job.value),
        readback,
        at: now,
    }));
}

/// The device is not yet in the state asked for after a write whose fate was unknown (before
/// a restart, or unanswered): it did not land, so it goes out now, unless the command expired
/// meanwhile.
fn write_unlanded(a: &mut Actuator, read: Value, now: Timestamp, out: &mut Vec<Action>) {
    a.confirmed = Some(read);
    let Some(job) = a.job.as_mut() else { return };
    job.landed = Landed::No;
    if let JobCause::Command(c) = &job.cause {
        if c.expires_at <= now {
            let c = c.clone();
            a.job = None;
            out.push(Action::Publish(result(&c, Status::Expired, None, now)));
            return;
        }
    }
    job.step = Step::Writing;
    out.push(Action::Write {
        actuator_id: a.spec.id.clone(),
        value: job.value,
        cause: job.cause.public(),
    });
}

/// The device reads back other than written. A command fails with what was read; an off
/// that must happen (deadline, removal) is tried again.
fn mismatch(a: &mut Actuator, read: Value, now: Timestamp, out: &mut Vec<Action>) {
    a.confirmed = Some(read);
    if read == Value::Switch(false) {
        a.confirmed_off(now, out);
    }
    let id = a.spec.id.clone();
    let Some(job) = a.job.as_mut() else { return };
    tracing::warn!(actuator = %id, wanted = ?job.value, ?read, "read back other than written");
    if !matches!(job.cause, JobCause::Command(_)) {
        job.landed = Landed::No;
        job.step = Step::RetryAt(after(now, job.backoff.next_delay()));
        return;
    }
    if let Some(Job {
        cause: JobCause::Command(c),
        ..
    }) = a.job.take()
    {
        let mut r = result(&c, Status::Failed, Some(Reason::ReadbackMismatch), now);
        r.readback = Some(read);
        out.push(Action::Publish(r));
    }
}

/// A write or read-back failed on the bus: try again after a backoff, unless the command
/// expires first (then it failed; the device state is unknown).
fn bus_error(a: &mut Actuator, detail: &str, now: Timestamp, out: &mut Vec<Action>) {
    let id = a.spec.id.clone();
    let Some(job) = a.job.as_mut() else { return };
    tracing::warn!(actuator = %id, detail, "bus error while driving an actuator");
    let retry_at = after(now, job.backoff.next_delay());
    match &job.cause {
        JobCause::Command(c) if retry_at >= c.expires_at => fail_on_bus(a, now, out),
        _ => job.step = Step::RetryAt(retry_at),
    }
}

fn fail_on_bus(a: &mut Actuator, now: Timestamp, out: &mut Vec<Action>) {
    a.confirmed = None;
    if let Some(Job {
        cause: JobCause::Command(c),
        ..
    }) = a.job.take()
    {
        out.push(Action::Publish(result(
            &c,
            Status::Failed,
            Some(Reason::BusError),
            now,
        )));
    }
}

/// Writes again if the retry is due; a command that expired meanwhile fails instead.
fn retry_if_due(a: &mut Actuator, now: Timestamp, out: &mut Vec<Action>) {
    let Some(job) = a.job.as_mut() else { return };
    if !matches!(job.step, Step::RetryAt(at) if at <= now) {
        return;
    }
    if let JobCause::Command(c) = &job.cause {
        if c.expires_at <= now {
            return fail_on_bus(a, now, out);
        }
    }
    // A write that may have landed is read, not sent again: acknowledged (its read-back
    // failed), or unknown (before a restart, or with its answer lost).
    if job.landed != Landed::No {
        job.step = Step::Reading;
        out.push(Action::ReadBack {
            actuator_id: a.spec.id.clone(),
        });
        return;
    }
    job.step = Step::Writing;
    out.push(Action::Write {
        actuator_id: a.spec.id.clone(),
        value: job.value,
        cause: job.cause.public(),
    });
}

fn same(wanted: Value, read: Value, tolerance: f64) -> bool {
    match (wanted, read) {
        (Value::Switch(w), Value::Switch(r)) => w == r,
        (Value::Number(w), Value::Number(r)) => {
            (w - r).abs() <= tolerance + 1e-9 * w.abs().max(1.0)
        }
        _ => false,
    }
}

fn requested(request: Request) -> Value {
    match request {
        Request::On { .. } => Value::Switch(true),
        Request::Off => Value::Switch(false),
        Request::Set(v) => Value::Number(v),
    }
}

fn result(c: &Command, status: Status, reason: Option<Reason>, now: Timestamp) -> CommandResult {
    CommandResult {
        command_id: c.command_id.clone(),
        actuator_id: c.actuator_id.clone(),
        field_id: c.field_id.clone(),
        status,
        reason,
        requested: Some(requested(c.request)),
        readback: None,
        at: now,
    }
}

/// The result of a command refused without a write.
fn refused(c: &Command, (status, reason): Refusal, now: Timestamp) -> Action {
    tracing::info!(command_id = %c.command_id, actuator = %c.actuator_id, ?status, ?reason, "command not applied");
    Action::Publish(result(c, status, reason, now))
}

/// `t` plus `d`, saturating.
fn after(t: Timestamp, d: Duration) -> Timestamp {
    Timestamp(t.0.saturating_add(i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)))
}

#[cfg(test)]
mod tests;
