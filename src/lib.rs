//! sahool-gateway: farm sensors → SQLite outbox → SAHOOL's NATS JetStream.
//!
//! Module map, in the order data flows:
//! - [`config`]: the TOML config, parsed and checked in one place for `run` and `validate`; one
//!   file per section, below every other module but [`reading`].
//! - [`sources`]: inputs ([`sources::mqtt`], [`sources::listener`]); each acks its sender only
//!   after the commit, through the shared commit queue [`sources::intake`]. Every input, serial
//!   ones too, screens what its mapping made by the same rules: [`sources::admission`] (flood
//!   protection, rejections dead-lettered with their raw bytes).
//!   [`sources::serial`]: one task per `[[serial]]` port (open, reopen with backoff) and the
//!   plug-in point for protocol engines: [`sources::serial::lines`] (ASCII talkers),
//!   [`sources::serial::modbus`] (Modbus RTU), [`sources::serial::sdi12`] (SDI-12),
//!   [`sources::serial::frames`] (firmware nodes speaking the `sahool-wire` frames; on a port
//!   through [`sources::serial::frames_port`]).
//!   [`sources::serial::polling`]: the poll schedule and per-station fault reports they share.
//! - [`flood`]: flood protection that tells a burst from a flood: claims per unit of a device's
//!   own observation time, and pacing (not discarding) by arrival.
//! - [`mapping`]: payloads → [`reading::Reading`]s of configured sensors, or rejections.
//! - [`reading`]: the reading model, SAHOOL sensor types, units and timestamps.
//! - [`store`]: the SQLite outbox (group commit, bounds, dead-letters, corruption recovery);
//!   other readers (the CLI, `/status`) open it read-only through [`store::Inspector`].
//! - [`forward`]: outbox → JetStream in `seq` order; rows deleted only after their PubAck. Its
//!   `core` decides without I/O (events in, actions out); its `driver` is the async loop that
//!   carries the actions out through the [`forward::Publisher`] trait, where NATS errors become
//!   [`forward::Failure`] kinds.
//! - [`downlink`]: platform commands to actuators (DESIGN §8): a command parsed and checked,
//!   and the sans-IO core that decides each write, read-back, result and off deadline.
//! - [`event`]: the event contract: envelope, subject and headers of a buffered reading.
//! - [`nats`]: NATS links, one connection each (servers, auth, TLS, publish permission refusals).
//! - [`tls`]: rustls client configs (ring) for NATS and MQTT: CA, client certificate, server name.
//! - [`secrets`]: secrets read from files (`${CREDENTIALS_DIRECTORY}`), weak passwords refused.
//! - [`http`] and [`metrics`]: `/healthz`, `/readyz`, `/metrics`, `/status`.
//! - [`status`]: the typed state report `/status` serves and the `status` command prints.
//! - [`app`]: `run`, wiring the above and shutting down in an order that loses nothing.
//! - [`cli`]: the commands besides `run`: `validate`, `buffer stats`, `dead-letters list` and
//!   `replay`.
//! - [`replay`]: `dead-letters replay`: which kept messages map again, through the running
//!   gateway's `POST /dead-letters/replay` or, with none running, the buffer opened under its
//!   lock; the transaction itself is the store's.
//! - [`systemd`]: the notify protocol: READY, STATUS, WATCHDOG from the pipeline's progress.
//! - [`backoff`]: retry delays shared by every reconnecting part.
//! - [`log_limit`]: rate limits for log lines that repeat while a fault lasts.

pub mod app;
pub mod backoff;
pub mod cli;
pub mod config;
pub mod downlink;
pub mod event;
pub mod flood;
pub mod forward;
pub mod http;
pub mod log_limit;
pub mod mapping;
pub mod metrics;
pub mod nats;
pub mod reading;
pub mod replay;
pub mod secrets;
pub mod sources;
pub mod status;
pub mod store;
pub mod systemd;
pub mod tls;
