//! The cross-cutting parts every stage of the data path uses: TLS and secrets, retry delays,
//! files replaced atomically, rate-limited logs, metrics, the typed status report, the loopback
//! HTTP server, the systemd notify protocol, W3C trace context and the allocator's footprint.

pub(crate) mod backoff;
pub(crate) mod clock;
pub(crate) mod files;
pub mod http;
pub(crate) mod log_limit;
pub mod memory;
pub mod metrics;
pub(crate) mod secrets;
pub mod status;
pub mod systemd;
pub mod tls;
pub mod trace;
