//! The core's rules one by one, then properties over random deliveries, timings and bus
//! errors. A [`Rig`] plays the driver and the devices: it carries out writes and read-backs
//! when told to, so tests choose what happens in between.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::config::ActuatorKind;

/// 2026-05-28T19:33:20Z, in nanoseconds.
const BASE: i64 = 1_780_000_000_000_000_000;

fn t(secs: i64) -> Timestamp {
    Timestamp(BASE + secs * 1_000_000_000)
}

fn switch(id: &str) -> ActuatorSpec {
    ActuatorSpec {
        id: id.into(),
        field_id: "f-1".into(),
        kind: ActuatorKind::Switch,
        max_on: None,
        min_off: None,
        requires_on: Vec::new(),
        block_when: None,
        range: None,
        readback: true,
        tolerance: 0.0,
    }
}

fn setpoint(id: &str) -> ActuatorSpec {
    ActuatorSpec {
        kind: ActuatorKind::Setpoint,
        range: Some((0.0, 100.0)),
        tolerance: 0.05,
        ..switch(id)
    }
}

fn on() -> Request {
    Request::On { duration: None }
}

fn on_for(secs: u64) -> Request {
    Request::On {
        duration: Some(Duration::from_secs(secs)),
    }
}

/// Command `n` for `actuator`, issued at `issued` and expiring at `expires` (seconds).
fn cmd(n: u32, actuator: &str, request: Request, issued: i64, expires: i64) -> Command {
    Command {
        event_id: format!("00000000-0000-4000-8000-{n:012}"),
        tenant_id: "tenant-a".into(),
        correlation_id: format!("corr-{n}"),
        command_id: id(n),
        field_id: "f-1".into(),
        actuator_id: actuator.into(),
        request,
        issued_at: t(issued),
        expires_at: t(expires),
        requested_by: None,
        reason: None,
    }
}

fn id(n: u32) -> String {
    format!("10000000-0000-4000-8000-{n:012}")
}

/// The driver and the devices around a core.
struct Rig {
    core: Core,
    now: Timestamp,
    synced: bool,
    readings: HashMap<String, f64>,
    /// What each device holds.
    device: HashMap<String, Value>,
    /// Devices that ignore writes.
    stuck: Vec<String>,
    /// Writes and read-backs handed out and not yet carried out, in order.
    pending: VecDeque<Action>,
    results: Vec<CommandResult>,
    /// Every write carried out: when, to what, with what, why.
    writes: Vec<(Timestamp, String, Value, Cause)>,
    /// When the core handed out each write, and why.
    handed: Vec<(Timestamp, Cause)>,
    /// The deadlines as the store holds them.
    stored: HashMap<String, Deadline>,
    /// Every action in order, for tests of order.
    log: Vec<Action>,
}

impl Rig {
    fn new(specs: Vec<ActuatorSpec>) -> Self {
        Self {
            core: Core::new(specs, true),
            now: t(0),
            synced: true,
            readings: HashMap::new(),
            device: HashMap::new(),
            stuck: Vec::new(),
            pending: VecDeque::new(),
            results: Vec::new(),
            writes: Vec::new(),
            handed: Vec::new(),
            stored: HashMap::new(),
            log: Vec::new(),
        }
    }

    fn take(&mut self, actions: Vec<Action>) {
        for action in actions {
            self.log.push(action.clone());
            match action {
                Action::Publish(r) => self.results.push(r),
                Action::StoreDeadline {
                    actuator_id,
                    deadline,
                } => {
                    self.stored.insert(actuator_id, deadline);
                }
                Action::ClearDeadline { actuator_id } => {
                    self.stored.remove(&actuator_id);
                }
                Action::Write { ref cause, .. } => {
                    self.handed.push((self.now, cause.clone()));
                    self.pending.push_back(action);
                }
                Action::ReadBack { .. } => self.pending.push_back(action),
            }
        }
    }

    /// Gives the core an event with the rig's time, clock and readings; takes its actions.
    fn event(&mut self, event: impl FnOnce(&mut Core, &Ctx<'_>) -> Vec<Action>) {
        let ctx = Ctx {
            now: self.now,
            clock_synced: self.synced,
            readings: &self.readings,
        };
        let actions = event(&mut self.core, &ctx);
        self.take(actions);
    }

    fn send(&mut self, c: Command) {
        self.event(|core, ctx| core.received(c, ctx));
    }

    fn tick(&mut self) {
        self.event(|core, ctx| core.tick(ctx));
    }

    fn reload(&mut self, specs: Vec<ActuatorSpec>) {
        self.event(|core, ctx| core.reload(specs, ctx));
    }

    /// Carries out the oldest pending write or read-back; `fail`: as a bus error. False when
    /// nothing was pending.
    fn step(&mut self, fail: bool) -> bool {
        let Some(action) = self.pending.pop_front() else {
            return false;
        };
        let bus = if fail {
            Err("timeout".to_string())
        } else {
            Ok(())
        };
        match action {
            Action::Write {
                actuator_id,
                value,
                cause,
            } => {
                if !fail && !self.stuck.contains(&actuator_id) {
                    self.device.insert(actuator_id.clone(), value);
                }
                if !fail {
                    self.writes
                        .push((self.now, actuator_id.clone(), value, cause));
                }
                self.event(|core, ctx| core.written(&actuator_id, bus, ctx));
            }
            Action::ReadBack { actuator_id } => {
                let held = self.device.get(&actuator_id).copied();
                let read = bus.map(|()| held.unwrap_or(Value::Switch(false)));
                self.event(|core, ctx| core.read_back(&actuator_id, read, ctx));
            }
            other => unreachable!("not pending: {other:?}"),
        }
        true
    }

    /// Carries out the oldest pending write, which reaches the device, but its answer is lost
    /// on the bus.
    fn step_answer_lost(&mut self) {
        let Some(Action::Write {
            actuator_id,
            value,
            cause,
        }) = self.pending.pop_front()
        else {
            panic!("no write pending: {:?}", self.pending);
        };
        self.device.insert(actuator_id.clone(), value);
        self.writes
            .push((self.now, actuator_id.clone(), value, cause));
        let lost = Err("timeout".to_string());
        self.event(|core, ctx| core.written(&actuator_id, lost, ctx));
    }

    /// Carries out everything pending, without failures.
    fn settle(&mut self) {
        while self.step(false) {}
    }

    /// The statuses reported for command `n`, in order.
    fn statuses(&self, n: u32) -> Vec<Status> {
        self.results
            .iter()
            .filter(|r| r.command_id == id(n))
            .map(|r| r.status)
            .collect()
    }

    fn reason(&self, n: u32) -> Option<Reason> {
        self.results
            .iter()
            .rfind(|r| r.command_id == id(n))
            .and_then(|r| r.reason)
    }

    fn writes_to(&self, actuator: &str) -> usize {
        self.writes.iter().filter(|w| w.1 == actuator).count()
    }
}

use Status::{Accepted, Applied, Expired, Failed, Rejected, Superseded, SwitchedOff};

#[test]
fn an_on_is_accepted_written_read_back_then_applied() {
    let mut rig = Rig::new(vec![switch("pump")]);
    rig.send(cmd(1, "pump", on(), 0, 60));
    assert!(matches!(
        rig.pending.front(),
        Some(Action::Write {
            value: Value::Switch(true),
            ..
        })
    ));
    assert_eq!(rig.statuses(1), [Accepted]);
    rig.step(false);
    assert!(matches!(rig.pending.front(), Some(Action::ReadBack { .. })));
    rig.step(false);
    assert_eq!(rig.statuses(1), [Accepted, Applied]);
    let applied = rig.results.last().unwrap();
    assert_eq!(applied.readback, Some(Value::Switch(true)));
    assert_eq!(rig.core.confirmed("pump"), Some(Value::Switch(true)));
}

#[test]
fn a_command_expired_on_arrival_is_not_written() {
    let mut rig = Rig::new(vec![switch("pump")]);
    rig.now = t(60);
    rig.send(cmd(1, "pump", on(), 0, 60));
    assert_eq!(rig.statuses(1), [Expired]);
    assert!(rig.pending.is_empty());
}

#[test]
fn a_command_that_expires_while_queued_is_not_written() {
    let mut rig = Rig::new(vec![switch("pump")]);
    rig.send(cmd(1, "pump", on(), 0, 600));
    rig.send(cmd(2, "pump", Request::Off, 1, 5));
    assert_eq!(rig.statuses(2), [], "queued behind command 1");
    rig.now = t(10);
    rig.settle();
    assert_eq!(rig.statuses(1), [Accepted, Applied]);
    assert_eq!(rig.statuses(2), [Expired]);
    assert_eq!(rig.writes_to("pump"), 1);
}

#[test]
fn an_older_command_than_the_last_written_is_superseded() {
    let mut rig = Rig::new(vec![switch("pump")]);
    rig.send(cmd(1, "pump", on(), 10, 600));
    rig.settle();
    rig.send(cmd(2, "pump", Request::Off, 5, 600));
    assert_eq!(rig.statuses(2), [Superseded]);
    assert_eq!(rig.device["pump"], Value::Switch(true));
}

#[test]
fn queued_commands_are_written_in_issued_order() {
    let mut rig = Rig::new(vec![switch("pump")]);
    rig.send(cmd(1, "pump", on(), 1, 600));
    rig.send(cmd(3, "pump", on(), 3, 600));
    rig.send(cmd(2, "pump", Request::Off, 2, 600));
    rig.settle();
    let order: Vec<_> = rig.writes.iter().map(|w| w.3.clone()).collect();
    assert_eq!(
        order,
        [1, 2, 3].map(|n| Cause::Command(id(n))),
        "2 was delivered last but issued before 3"
    );
}

#[test]
fn unknown_actuators_and_other_fields_are_rejected() {
    let mut rig = Rig::new(vec![switch("pump")]);
    rig.send(cmd(1, "ghost", on(), 0, 60));
    let mut other_field = cmd(2, "pump", on(), 0, 60);
    other_field.field_id = "f-2".into();
    rig.send(other_field);
    for n in [1, 2] {
        assert_eq!(rig.statuses(n), [Rejected]);
        assert_eq!(rig.reason(n), Some(Reason::UnknownActuator));
    }
    assert!(rig.pending.is_empty());
}

#[test]
fn values_outside_the_declaration_are_rejected_not_clamped() {
    let mut rig = Rig::new(vec![switch("pump"), setpoint("dose")]);
    rig.send(cmd(1, "dose", Request::Set(100.5), 0, 60));
    rig.send(cmd(2, "pump", Request::Set(1.0), 0, 60));
    rig.send(cmd(3, "dose", on(), 0, 60));
    for n in [1, 2, 3] {
        assert_eq!(rig.statuses(n), [Rejected], "{n}");
        assert_eq!(rig.reason(n), Some(Reason::OutOfRange), "{n}");
    }
    rig.send(cmd(4, "dose", Request::Set(100.0), 0, 60));
    rig.settle();
    assert_eq!(rig.statuses(4), [Accepted, Applied]);
    assert_eq!(
        rig.writes,
        [(
            t(0),
            "dose".into(),
            Value::Number(100.0),
            Cause::Command(id(4))
        )]
    );
}

#[test]
fn requires_on_needs_the_other_switch_confirmed_on() {
    let pump = ActuatorSpec {
        requires_on: vec!["valve".into()],
        ..switch("pump")
    };
    let mut rig = Rig::new(vec![pump, switch("valve")]);
    rig.send(cmd(1, "pump", on(), 0, 60));
    assert_eq!(
        (rig.statuses(1), rig.reason(1)),
        (vec![Rejected], Some(Reason::Interlock))
    );
    rig.send(cmd(2, "valve", on(), 1, 60));
    rig.settle();
    rig.send(cmd(3, "pump", on(), 2, 60));
    rig.settle();
    assert_eq!(rig.statuses(3), [Accepted, Applied]);
    rig.send(cmd(4, "pump", Request::Off, 3, 60));
    rig.send(cmd(5, "valve", Request::Off, 3, 60));
    rig.settle();
    assert_eq!(
        rig.statuses(4),
        [Accepted, Applied],
        "off is never interlocked"
    );
}

#[test]
fn block_when_refuses_beyond_the_limit_or_without_a_reading() {
    let pump = ActuatorSpec {
        block_when: Some(("tank-5/water_level".into(), Limit::Below(10.0))),
        ..switch("pump")
    };
    let mut rig = Rig::new(vec![pump]);
    rig.send(cmd(1, "pump", on(), 0, 60));
    rig.readings.insert("tank-5/water_level".into(), 9.5);
    rig.send(cmd(2, "pump", on(), 1, 60));
    for n in [1, 2] {
        assert_eq!(
            (rig.statuses(n), rig.reason(n)),
            (vec![Rejected], Some(Reason::Interlock))
        );
    }
    rig.readings.insert("tank-5/water_level".into(), 10.0);
    rig.send(cmd(3, "pump", on(), 2, 60));
    rig.settle();
    assert_eq!(rig.statuses(3), [Accepted, Applied]);
}

/// The valve a running pump requires is closed (by a command, here): the pump is switched off
/// as soon as the valve's off is confirmed, `switched_off` with `interlock` for the pump's `on`.
#[test]
fn a_running_pump_stops_when_the_valve_it_requires_is_confirmed_off() {
    let pump = ActuatorSpec {
        requires_on: vec!["valve".into()],
        max_on: Some(Duration::from_secs(3600)),
        ..switch("pump")
    };
    let mut rig = Rig::new(vec![pump, switch("valve")]);
    rig.send(cmd(1, "valve", on(), 0, 60));
    rig.settle();
    rig.send(cmd(2, "pump", on(), 1, 60));
    rig.settle();
    assert_eq!(rig.device["pump"], Value::Switch(true));
    rig.send(cmd(3, "valve", Request::Off, 2, 60));
    // No tick: the valve's confirmation alone moves the pump.
    rig.settle();
    assert_eq!(rig.device["pump"], Value::Switch(false));
    assert_eq!(rig.statuses(2), [Accepted, Applied, SwitchedOff]);
    assert_eq!(rig.reason(2), Some(Reason::Interlock));
    assert_eq!(
        rig.writes.last().map(|w| w.3.clone()),
        Some(Cause::Interlock(id(2)))
    );
    assert!(
        rig.stored.is_empty(),
        "the pump's deadline ended with the run"
    );
    // Stopped once: later ticks write nothing more.
    let writes = rig.writes.len();
    for s in 3..6 {
        rig.now = t(s);
        rig.tick();
        rig.settle();
    }
    assert_eq!(rig.writes.len(), writes);
}

/// A `block_when` reading crossing its limit during a run stops it at the next tick; a
/// missing reading or an unknown partner does not (they only refuse the next `on`).
#[test]
fn a_run_stops_when_its_block_when_reading_crosses_the_limit_not_when_it_goes_missing() {
    let pump = ActuatorSpec {
        block_when: Some(("tank-5/water_level".into(), Limit::Below(10.0))),
        requires_on: vec!["valve".into()],
        ..switch("pump")
    };
    let mut rig = Rig::new(vec![pump, switch("valve")]);
    rig.readings.insert("tank-5/water_level".into(), 50.0);
    rig.send(cmd(1, "valve", on(), 0, 60));
    rig.settle();
    rig.send(cmd(2, "pump", on(), 1, 60));
    rig.settle();
    rig.readings.clear();
    rig.now = t(2);
    rig.tick();
    rig.settle();
    assert_eq!(
        rig.device["pump"],
        Value::Switch(true),
        "no reading is no trip"
    );
    rig.readings.insert("tank-5/water_level".into(), 10.0);
    rig.now = t(3);
    rig.tick();
    rig.settle();
    assert_eq!(
        rig.device["pump"],
        Value::Switch(true),
        "at the limit is within"
    );
    rig.readings.insert("tank-5/water_level".into(), 9.9);
    rig.now = t(4);
    rig.tick();
    rig.settle();
    assert_eq!(rig.device["pump"], Value::Switch(false));
    let last = rig.results.last().expect("a result");
    assert_eq!(
        (last.status, last.reason, last.command_id.as_str()),
        (SwitchedOff, Some(Reason::Interlock), id(2).as_str()),
        "the switched_off names the on behind the run"
    );
    assert_eq!(
        rig.device["valve"],
        Value::Switch(true),
        "the valve stays open"
    );
}

/// A write whose answer is lost may have landed: the retry reads the device first and writes
/// only if it did not. A write the device acknowledged whose read-back failed is read again,
/// not written again. So a bus error never makes a second write of what landed.
#[test]
fn a_write_whose_answer_was_lost_is_read_before_it_is_written_again() {
    let mut rig = Rig::new(vec![switch("landed"), switch("lost"), switch("unread")]);
    rig.send(cmd(1, "landed", on(), 0, 60));
    rig.send(cmd(2, "lost", on(), 0, 60));
    rig.send(cmd(3, "unread", on(), 0, 60));
    rig.step_answer_lost(); // `landed`: on the device, the answer lost
    rig.step(true); // `lost`: never reached the device
    rig.step(false); // `unread`: written and acknowledged...
    rig.step(true); // ...its read-back lost
    for s in 1..4 {
        rig.now = t(s);
        rig.tick();
        rig.settle();
    }
    assert_eq!(rig.statuses(1), [Accepted, Applied]);
    assert_eq!(rig.statuses(2), [Accepted, Applied]);
    assert_eq!(
        rig.writes_to("landed"),
        1,
        "confirmed by reading, not written again"
    );
    assert_eq!(rig.writes_to("lost"), 1, "read off, so written");
    assert_eq!(rig.device["lost"], Value::Switch(true));
    assert_eq!(rig.statuses(3), [Accepted, Applied]);
    assert_eq!(rig.writes_to("unread"), 1, "read again, not written again");
}

/// An acknowledged write read back other than written fails the command at once, also when
/// an earlier read-back of it was lost: the device answered, it did not take the value.
#[test]
fn an_acknowledged_write_read_back_wrong_after_a_lost_read_fails() {
    let mut rig = Rig::new(vec![switch("welded")]);
    rig.stuck.push("welded".into());
    rig.send(cmd(1, "welded", on(), 0, 60));
    rig.step(false); // written, acknowledged, ignored by the relay
    rig.step(true); // the read-back lost
    rig.now = t(2);
    rig.tick();
    rig.settle();
    assert_eq!(
        (rig.statuses(1), rig.reason(1)),
        (vec![Accepted, Failed], Some(Reason::ReadbackMismatch))
    );
    assert_eq!(rig.writes_to("welded"), 1);
}

#[test]
fn min_off_refuses_an_on_too_soon_after_the_last_off() {
    let pump = ActuatorSpec {
        min_off: Some(Duration::from_secs(300)),
        ..switch("pump")
    };
    let mut rig = Rig::new(vec![pump]);
    rig.send(cmd(1, "pump", on(), 0, 60));
    rig.send(cmd(2, "pump", Request::Off, 1, 60));
    rig.settle();
    rig.now = t(200);
    rig.send(cmd(3, "pump", on(), 200, 260));
    assert_eq!(
        (rig.statuses(3), rig.reason(3)),
        (vec![Rejected], Some(Reason::RateLimited))
    );
    rig.now = t(300);
    rig.send(cmd(4, "pump", on(), 300, 360));
    rig.settle();
    assert_eq!(rig.statuses(4), [Accepted, Applied]);
}

#[test]
fn an_unsynchronised_clock_refuses_all_but_off() {
    let mut rig = Rig::new(vec![switch("pump"), setpoint("dose")]);
    rig.synced = false;
    rig.send(cmd(1, "pump", on(), 0, 60));
    rig.send(cmd(2, "dose", Request::Set(5.0), 0, 60));
    for n in [1, 2] {
        assert_eq!(
            (rig.statuses(n), rig.reason(n)),
            (vec![Rejected], Some(Reason::ClockUnsynced))
        );
    }
    rig.send(cmd(3, "pump", Request::Off, 0, 60));
    rig.settle();
    assert_eq!(rig.statuses(3), [Accepted, Applied]);
    let lax = Core::new(vec![switch("pump")], false);
    let mut rig = Rig { core: lax, ..rig };
    rig.send(cmd(4, "pump", on(), 1, 60));
    rig.settle();
    assert_eq!(
        rig.statuses(4),
        [Accepted, Applied],
        "require_clock_sync = false"
    );
}

#[test]
fn a_repeated_command_id_is_never_written_twice() {
    let mut rig = Rig::new(vec![switch("pump")]);
    rig.send(cmd(1, "pump", on(), 0, 60));
    rig.send(cmd(1, "pump", on(), 0, 60));
    rig.settle();
    rig.send(cmd(1, "pump", on(), 0, 60));
    rig.settle();
    assert_eq!(rig.writes_to("pump"), 1);
    assert_eq!(rig.statuses(1), [Accepted, Applied]);
}

#[test]
fn max_on_caps_the_duration_asked_and_the_deadline_is_stored_before_the_write() {
    let pump = ActuatorSpec {
        max_on: Some(Duration::from_secs(7200)),
        ..switch("pump")
    };
    let mut rig = Rig::new(vec![pump]);
    rig.send(cmd(1, "pump", on_for(3 * 3600), 0, 60));
    let store = rig
        .log
        .iter()
        .position(|a| matches!(a, Action::StoreDeadline { .. }));
    let write = rig
        .log
        .iter()
        .position(|a| matches!(a, Action::Write { .. }));
    assert!(store.is_some() && store < write, "{:?}", rig.log);
    assert_eq!(rig.stored["pump"].at, t(7200));
    rig.settle();
    // Another on later in the same run does not stretch it.
    rig.now = t(3600);
    rig.send(cmd(2, "pump", on(), 3600, 3660));
    rig.settle();
    assert_eq!(rig.stored["pump"].at, t(7200));
    assert_eq!(rig.stored["pump"].command_id, id(2));
}

#[test]
fn a_passed_deadline_switches_off_and_reports_switched_off() {
    let mut rig = Rig::new(vec![switch("pump")]);
    rig.send(cmd(1, "pump", on_for(300), 0, 60));
    rig.settle();
    assert_eq!(rig.stored["pump"].at, t(300));
    rig.now = t(299);
    rig.tick();
    assert!(rig.pending.is_empty());
    rig.now = t(300);
    rig.tick();
    rig.settle();
    assert_eq!(rig.device["pump"], Value::Switch(false));
    assert_eq!(rig.statuses(1), [Accepted, Applied, SwitchedOff]);
    assert!(rig.stored.is_empty() && rig.core.deadline("pump").is_none());
    assert_eq!(rig.writes.last().unwrap().3, Cause::Deadline(id(1)));
}

#[test]
fn a_deadline_that_passed_while_down_is_enforced_at_the_first_tick() {
    let mut rig = Rig::new(vec![switch("pump")]);
    let deadline = Deadline {
        at: t(5),
        command_id: id(7),
        run_since: t(0),
    };
    rig.core.restore(
        "pump",
        Restored {
            deadline: Some(deadline),
            ..Restored::default()
        },
    );
    rig.now = t(15);
    rig.send(cmd(8, "pump", on(), 15, 60));
    rig.settle();
    assert_eq!(
        rig.writes[0].3,
        Cause::Deadline(id(7)),
        "the deadline goes before the queue"
    );
    assert_eq!(rig.statuses(7), [SwitchedOff]);
}

#[test]
fn a_read_back_that_differs_fails_with_the_value_read() {
    let mut rig = Rig::new(vec![setpoint("dose")]);
    rig.stuck.push("dose".into());
    rig.device.insert("dose".into(), Value::Number(12.0));
    rig.send(cmd(1, "dose", Request::Set(40.0), 0, 60));
    rig.settle();
    assert_eq!(rig.statuses(1), [Accepted, Failed]);
    let failed = rig.results.last().unwrap();
    assert_eq!(failed.reason, Some(Reason::ReadbackMismatch));
    assert_eq!(failed.readback, Some(Value::Number(12.0)));
    // Within half a step of the register: a match.
    rig.stuck.clear();
    rig.send(cmd(2, "dose", Request::Set(40.03), 1, 60));
    rig.settle();
    assert_eq!(rig.statuses(2), [Accepted, Applied]);
}

#[test]
fn bus_errors_are_retried_until_the_command_would_expire_then_fail() {
    let mut rig = Rig::new(vec![switch("pump")]);
    rig.send(cmd(1, "pump", on(), 0, 10));
    rig.step(true);
    assert!(rig.pending.is_empty(), "no write before the backoff");
    rig.now = t(1);
    rig.tick();
    assert_eq!(rig.pending.len(), 1, "written again after 1s");
    rig.step(true);
    rig.now = t(3);
    rig.tick();
    rig.step(true); // next try would be at 7s
    rig.now = t(7);
    rig.tick();
    rig.step(true); // next try at 15s, past expires_at
    assert_eq!(rig.statuses(1), [Accepted, Failed]);
    assert_eq!(rig.reason(1), Some(Reason::BusError));
    rig.now = t(20);
    rig.tick();
    assert!(rig.pending.is_empty());
    assert_eq!(
        rig.core.confirmed("pump"),
        None,
        "unknown after a failed write"
    );
}

#[test]
fn a_busy_actuator_does_not_hold_up_another() {
    let mut rig = Rig::new(vec![switch("pump"), switch("valve")]);
    rig.send(cmd(1, "pump", on(), 0, 60));
    rig.send(cmd(2, "valve", on(), 0, 60));
    assert_eq!(rig.pending.len(), 2, "both written without waiting");
}

#[test]
fn a_reload_rejects_a_removed_actuators_queue_and_switches_it_off() {
    let mut rig = Rig::new(vec![switch("pump"), switch("valve")]);
    rig.send(cmd(1, "pump", on(), 0, 600));
    rig.settle();
    rig.send(cmd(2, "pump", Request::Off, 1, 600));
    rig.send(cmd(3, "pump", on(), 2, 600));
    rig.reload(vec![switch("valve")]);
    assert_eq!(rig.statuses(3), [Rejected]);
    assert_eq!(rig.reason(3), Some(Reason::UnknownActuator));
    rig.settle();
    assert_eq!(
        rig.statuses(2),
        [Accepted, Applied],
        "the write under way finishes"
    );
    rig.send(cmd(4, "pump", on(), 3, 600));
    assert_eq!(rig.statuses(4), [Rejected]);

    let mut rig = Rig::new(vec![switch("pump")]);
    rig.send(cmd(1, "pump", on(), 0, 600));
    rig.settle();
    rig.reload(Vec::new());
    rig.settle();
    assert_eq!(rig.device["pump"], Value::Switch(false));
    let last = rig.results.last().unwrap();
    assert_eq!((last.status, last.command_id.as_str()), (SwitchedOff, ""));
}

#[test]
fn results_fit_the_result_schema_payload() {
    let schema: serde_json::Value = serde_json::from_str(include_str!(
        "../../../contracts/actuator_command_result.v1.json"
    ))
    .unwrap();
    let payload = &schema["properties"]["payload"];
    let mut rig = Rig::new(vec![setpoint("dose")]);
    rig.send(cmd(1, "dose", Request::Set(7.5), 0, 60));
    rig.send(cmd(2, "dose", Request::Set(700.0), 0, 60));
    rig.settle();
    assert_eq!(rig.results.len(), 3);
    for r in &rig.results {
        let json = serde_json::to_value(r).unwrap();
        assert!(jsonschema::is_valid(payload, &json), "{json}");
    }
    let json = serde_json::to_value(&rig.results[1]).unwrap();
    assert_eq!(json["status"], "applied");
    assert_eq!(json["readback"], 7.5);
    let json = serde_json::to_value(&rig.results[2]).unwrap();
    assert_eq!(
        (json["status"].as_str(), json["reason"].as_str()),
        (Some("rejected"), Some("out_of_range"))
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// 100 alternating on/off delivered in any order, the driver completing writes at any
    /// point in between: the device ends as the last issued says.
    #[test]
    fn the_last_issued_wins_whatever_the_delivery_order(
        order in Just((0..100u32).collect::<Vec<_>>()).prop_shuffle(),
        interleave in proptest::collection::vec(any::<bool>(), 300),
    ) {
        let mut rig = Rig::new(vec![switch("pump")]);
        let mut next = order.into_iter();
        let mut choices = interleave.into_iter();
        loop {
            if choices.next().unwrap_or(false) && rig.step(false) {
                continue;
            }
            let Some(n) = next.next() else { break };
            let request = if n % 2 == 0 { on() } else { Request::Off };
            rig.send(cmd(n, "pump", request, i64::from(n), 3600));
        }
        rig.settle();
        prop_assert_eq!(rig.device.get("pump"), Some(&Value::Switch(false)));
        prop_assert_eq!(rig.statuses(99), vec![Accepted, Applied]);
        // Every command ends in one final result.
        for n in 0..100 {
            let finals = rig.statuses(n).into_iter().filter(|s| *s != Accepted).count();
            prop_assert_eq!(finals, 1, "command {}", n);
        }
    }

    /// Random commands, times and bus errors: no write for a command at or after its
    /// `expires_at`, and never a switch on without an off deadline within `max_on`.
    #[test]
    fn never_late_never_on_too_long(
        events in proptest::collection::vec((0u8..4, 0u32..20, 1i64..40, any::<bool>()), 1..200),
    ) {
        let max_on = 60;
        let pump = ActuatorSpec { max_on: Some(Duration::from_secs(max_on)), ..switch("pump") };
        let mut rig = Rig::new(vec![pump, setpoint("dose")]);
        let mut expiry = HashMap::new();
        let mut on_since: Option<Timestamp> = None;
        for (n, (kind, advance, life, fail)) in (0u32..).zip(events) {
            let now = rig.now.0 / 1_000_000_000 - BASE / 1_000_000_000;
            match kind {
                0 | 1 => {
                    let request = if kind == 0 { on_for(u64::from(advance) * 10 + 1) } else { Request::Off };
                    let c = cmd(n, "pump", request, now - i64::from(advance % 3), now + life);
                    expiry.insert(Cause::Command(c.command_id.clone()), c.expires_at);
                    rig.send(c);
                }
                2 => { rig.step(fail); }
                _ => {
                    rig.now = t(now + i64::from(advance % 5));
                    rig.tick();
                }
            }
            for (at, cause) in &rig.handed {
                if let Some(expires) = expiry.get(cause) {
                    prop_assert!(at < expires, "a write at {:?} for {:?} expiring {:?}", at, cause, expires);
                }
            }
            // While on, an off deadline is stored, within max_on of when the device went on.
            match (rig.device.get("pump"), on_since) {
                (Some(Value::Switch(true)), since) => {
                    let since = *on_since.get_or_insert(since.unwrap_or(rig.now));
                    let deadline = rig.stored.get("pump").map(|d| d.at);
                    prop_assert!(deadline.is_some_and(|at| at <= after(since, Duration::from_secs(max_on))),
                        "on since {:?}, deadline {:?}", since, deadline);
                }
                _ => on_since = None,
            }
        }
    }
}

#[test]
fn specs_come_from_the_config() {
    let actuators = r#"
[commands]
enabled = true
require_clock_sync = false
[[fields]]
id = "f-1"
  [[fields.actuators]]
  id = "pump-1"
  kind = "switch"
  max_on = "2h"
  block_when = { sensor = "tank-5/water_level", below = 10.0 }
  modbus = { port = "rs485-1", unit = 7, coil = 0 }
  [[fields.actuators]]
  id = "dosing-1"
  kind = "setpoint"
  range = [0.0, 100.0]
  modbus = { port = "rs485-1", unit = 7, register = 10, scale = 0.1 }
  [[fields.actuators]]
  id = "relay"
  kind = "switch"
  mqtt = { source = "farm-broker", command_topic = "relay/set", payload_on = "1", payload_off = "0" }
"#;
    use crate::config::test_support::{ACTUATOR_PLACES, MINIMAL};
    let text = format!("{MINIMAL}{ACTUATOR_PLACES}{actuators}");
    let config = crate::config::parse(&text).unwrap_or_else(|p| panic!("{p:?}"));
    let specs = Core::specs(&config);
    let pump = &specs[0];
    assert_eq!(
        (pump.field_id.as_str(), pump.max_on),
        ("f-1", Some(Duration::from_secs(7200)))
    );
    assert_eq!(
        pump.block_when,
        Some(("tank-5/water_level".into(), Limit::Below(10.0)))
    );
    assert!((specs[1].tolerance - 0.05).abs() < 1e-12 && specs[1].readback);
    assert_eq!(specs[1].range, Some((0.0, 100.0)));
    assert!(!specs[2].readback, "no state_topic: nothing to read back");
    let mut core = Core::new(specs, config.commands.require_clock_sync);
    let ctx = Ctx {
        now: t(0),
        clock_synced: false,
        readings: &HashMap::from([("tank-5/water_level".to_string(), 50.0)]),
    };
    let actions = core.received(cmd(1, "pump-1", on(), 0, 60), &ctx);
    assert!(
        actions.iter().any(|a| matches!(a, Action::Write { .. })),
        "require_clock_sync = false: {actions:?}"
    );
}

/// A restart between `accepted` and the result: the core is new, the command comes back from
/// the inbox as resumed.
fn restarted_with(device: Option<Value>, c: Command) -> Rig {
    let mut rig = Rig::new(vec![switch("pump")]);
    if let Some(v) = device {
        rig.device.insert("pump".into(), v);
    }
    rig.now = t(5);
    rig.event(|core, ctx| core.resumed(c, ctx));
    rig.settle();
    rig
}

#[test]
fn a_resumed_command_whose_write_went_out_is_applied_without_a_second_write() {
    let rig = restarted_with(Some(Value::Switch(true)), cmd(1, "pump", on(), 0, 60));
    assert_eq!(rig.statuses(1), vec![Applied]);
    assert_eq!(rig.writes_to("pump"), 0);
}

#[test]
fn a_resumed_command_whose_write_did_not_go_out_is_written_once() {
    let rig = restarted_with(Some(Value::Switch(false)), cmd(1, "pump", on(), 0, 60));
    assert_eq!(rig.statuses(1), vec![Applied]);
    assert_eq!(rig.writes_to("pump"), 1);
}

#[test]
fn a_resumed_command_that_expired_meanwhile_is_not_written() {
    let rig = restarted_with(Some(Value::Switch(false)), cmd(1, "pump", on(), 0, 3));
    assert_eq!(rig.statuses(1), vec![Expired]);
    assert_eq!(rig.writes_to("pump"), 0);
}

#[test]
fn a_resumed_command_is_not_taken_twice_when_redelivered() {
    let mut rig = restarted_with(Some(Value::Switch(true)), cmd(1, "pump", on(), 0, 60));
    rig.send(cmd(1, "pump", on(), 0, 60));
    rig.settle();
    assert_eq!(rig.statuses(1), vec![Applied]);
    assert_eq!(rig.writes_to("pump"), 0);
}

#[test]
fn a_resumed_command_whose_first_read_fails_reads_again_before_any_write() {
    // The bus is not up yet at start: the first read fails, the retry reads again.
    let mut rig = Rig::new(vec![switch("pump")]);
    rig.device.insert("pump".into(), Value::Switch(true));
    rig.now = t(5);
    rig.event(|core, ctx| core.resumed(cmd(1, "pump", on(), 0, 60), ctx));
    assert!(rig.step(true), "the first read-back is handed out");
    rig.now = t(7);
    rig.tick();
    rig.settle();
    assert_eq!(rig.statuses(1), vec![Applied]);
    assert_eq!(
        rig.writes_to("pump"),
        0,
        "the write went out before the restart"
    );
}
