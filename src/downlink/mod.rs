//! The downlink (DESIGN §8, issue 16): platform commands to pumps, valves and setpoints, with
//! the uplink's guarantees in the other direction.
//!
//! This is the foundation: [`command`] parses and checks a command message into a typed
//! [`Command`]; [`core`] decides, without I/O, what happens to it: events in (a command, a
//! write's outcome, a read-back, a clock tick, a reload), actions out (write, read back,
//! publish a result, store or clear an off deadline). [`modbus`] carries out a write or a
//! read-back of a Modbus-bound actuator on its port's bus, [`mqtt`] of one behind an MQTT
//! broker (command topic out, state topic back), and [`devices`] sends each actuator to its
//! binding. The SQLite inbox, results and actuator state are the store's
//! ([`crate::store::inbox`]); the NATS consumer is [`consumer`] and [`receive`], the loop that
//! carries the core's actions out [`driver`]; the core assumes only that the driver carries out
//! its actions in order and reports each write and read-back.
//!
//! # Invariants of the core
//! 1. **One write at a time per actuator**, commands in `issued_at` order (equal ones in arrival
//!    order); different actuators never wait for each other.
//! 2. **Never stale.** A command is judged when it reaches the head of its actuator's queue, not
//!    only on arrival: `expired` if `expires_at <= now`; `superseded` if issued before the newest
//!    command already written to that actuator (written, not only applied: a newer command that
//!    failed still keeps an older one from coming after it).
//! 3. **Only what the config allows**, checked in this order, each a `rejected` result without a
//!    write: unknown actuator (or one of another field, or removed by a reload);
//!    `out_of_range` (a value outside `range`, or an action the kind lacks: never clamped);
//!    `clock_unsynced` (with `require_clock_sync`); `interlock` (a `requires_on` switch not
//!    confirmed on, a `block_when` reading beyond its limit or missing); `rate_limited`
//!    (`min_off` since the last confirmed off not over). `off` passes all but the first two:
//!    switching off is always allowed.
//! 4. **Never a write at or after `expires_at`** for a command: a bus error is retried with a
//!    backoff only while the retry falls before `expires_at`, then the command `failed`
//!    (`bus_error`) and the device state counts as unknown.
//! 5. **Applied means confirmed.** `applied` only when the read-back matches the write (a
//!    setpoint within half its register's resolution); otherwise `failed` (`readback_mismatch`)
//!    with the value read. An actuator with no way to read back (MQTT without a state topic)
//!    reports `applied` with no read-back once the write went out.
//! 6. **Nothing left running.** An `on` whose run has a limit (`duration_s`, `max_on`) stores its
//!    off deadline *before* its write, so a crash between the two cannot leave it on without
//!    one. `max_on` counts from the start of the run, not from the latest `on`, so repeated
//!    `on`s cannot stretch a run. A deadline that passed (at a tick, or found at start through
//!    [`core::Core::restore`]) takes precedence over queued commands: an off write, retried
//!    until confirmed, reported `switched_off` with the `on`'s command id.
//! 7. **Reloads.** A removed actuator's queued commands end `rejected: unknown_actuator`; a
//!    write under way finishes; a switch that may be on is switched off (`switched_off`, empty
//!    command id), then the actuator is forgotten.
//! 8. **Each command id at most once.** The inbox is the authority (its key is the command id,
//!    and it survives restarts): a redelivery is acked and never reaches the core. The core
//!    also ignores an id it saw lately (the last 4096), so a repeat that slipped past is still
//!    not written twice.
//! 9. Every command ends in exactly one final result: `applied`, `failed`, `rejected`,
//!    `expired` or `superseded`; one that is written is preceded by `accepted`.
//!
//! Open (for the driver and issue 16): switching off a switch that others `require_on` does not
//! switch those off; `block_when` refuses a start but does not stop a running pump when the
//! reading crosses its limit; both are safety rules the platform may want.

pub mod command;
pub(crate) mod consumer;
pub mod core;
pub(crate) mod devices;
pub(crate) mod driver;
pub mod modbus;
pub(crate) mod mqtt;
pub(crate) mod receive;

pub use self::command::{Command, CommandError, Request};
pub use self::core::{
    Action, ActuatorSpec, Cause, CommandResult, Core, Ctx, Deadline, Limit, Readings, Reason,
    Restored, Status, Value,
};
