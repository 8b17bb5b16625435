#![warn(unreachable_pub)]
//! sahool-gateway: farm sensors → SQLite outbox → SAHOOL's NATS JetStream.
//!
//! Module map, in the order data flows (`sources/ → ingest/ → store/ → uplink/`):
//! - [`config`]: the TOML config, parsed and checked in one place for `run`, `validate` and
//!   reload; one file per section, below every other module but [`reading`].
//! - [`reading`]: the reading model, SAHOOL sensor types, units and timestamps.
//! - [`sources`]: what receives bytes: [`sources::mqtt`] (a broker session),
//!   [`sources::listener`] (the built-in MQTT listener), [`sources::serial`] (one task per
//!   `[[serial]]` port and the protocol engines: [`sources::serial::lines`] ASCII talkers,
//!   [`sources::serial::modbus`] Modbus RTU, [`sources::serial::sdi12`] SDI-12,
//!   [`sources::serial::frames`] firmware nodes speaking `sahool-wire`).
//! - [`ingest`]: the one path every source's bytes take to a committed row:
//!   [`ingest::mapping`] (payloads → readings of configured sensors, or rejections),
//!   [`ingest::flood`] (claims per unit of a device's own time, pacing by arrival),
//!   [`ingest::admission`] (screening; rejections dead-lettered with their raw bytes) and
//!   [`ingest::intake`] (the commit queue: senders acknowledged after the commit, in order).
//! - [`store`]: the SQLite outbox (group commit, bounds, dead-letters, corruption recovery);
//!   other readers (the CLI, `/status`) open it read-only through [`store::Inspector`].
//! - [`uplink`]: outbox → JetStream: [`uplink::event`] (the event contract: envelope, subject,
//!   headers), [`uplink::forward`] (seq order, rows deleted only after their PubAck; a sans-IO
//!   `core` and the async `driver` that carries its actions out) and [`uplink::nats`] (links).
//! - [`common`]: what every stage uses: [`common::tls`], [`common::secrets`],
//!   [`common::backoff`], [`common::log_limit`], [`common::metrics`], [`common::status`] (the
//!   typed state report), [`common::http`] (`/healthz`, `/readyz`, `/metrics`, `/status`) and
//!   [`common::systemd`] (READY, STATUS, WATCHDOG) and [`common::trace`] (W3C `traceparent`:
//!   a device's kept, or one derived from the event id).
//! - [`downlink`]: platform commands to actuators (DESIGN §8): a command parsed and checked,
//!   the sans-IO core that decides each write, read-back, result and off deadline, and the
//!   devices it drives (Modbus coils and registers, MQTT command and state topics).
//! - [`fleet`]: what the platform sees of the gateway and how it steers it (DESIGN §9): the
//!   heartbeat, and [`fleet::remote`] config from NATS KV (a sans-IO `core` deciding apply,
//!   reject, keep or roll back after probation; a driver doing the KV watch, files, reloads),
//!   each reporting through the outbox like a reading.
//! - [`app`]: `run(config, http listener, shutdown, reloads)`, wiring the above, reconciling
//!   keyed source tasks on reload and shutting down in an order that loses nothing; the binary
//!   (`main.rs`) binds HTTP and turns signals into shutdown and reloads.
//! - [`cli`]: the commands besides `run`: `validate`, `status`, `buffer stats`,
//!   `dead-letters list` and `replay`, `sensors`, `actuators` and `commands list`.
//! - [`doctor`]: `doctor`, every check an operator makes by hand (config, NATS and its streams,
//!   the commands consumer, the remote config bucket, MQTT brokers, serial ports, disk,
//!   clock), one line each with its fix.
//! - [`replay`]: `dead-letters replay`: which kept messages map again, through the running
//!   gateway's `POST /dead-letters/replay` or, with none running, the buffer opened under its
//!   lock; the transaction itself is the store's.

pub mod app;
pub mod cli;
pub mod common;
pub mod config;
pub mod doctor;
pub mod downlink;
pub mod fleet;
pub mod ingest;
pub mod reading;
pub(crate) mod replay;
pub mod sources;
pub mod store;
pub mod uplink;
