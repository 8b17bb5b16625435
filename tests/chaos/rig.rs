//! What every chaos scenario shares: the real parts (nats-server with the platform's stream,
//! mosquitto, the gateway binary), a steady publisher, run lengths (short by default, the
//! issue's full lengths with `CHAOS_LONG=1`), and a seeded random source (`CHAOS_SEED` replays a
//! run's fault timings).
//!
//! Scenarios run one at a time, each on its own runtime: they measure the machine's behaviour
//! under faults, and two at once would only measure each other.

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use crate::support::steady::{Ledger, Steady};
use crate::support::{probe_config, probe_reading, Gateway, Mosquitto, Nats};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// True when `CHAOS_LONG=1`: the full durations and the 10-minute soak.
pub fn long() -> bool {
    std::env::var("CHAOS_LONG").is_ok_and(|v| v == "1")
}

/// `short` by default, `long` with `CHAOS_LONG=1`.
pub fn pick<T>(short: T, long_run: T) -> T {
    if long() {
        long_run
    } else {
        short
    }
}

/// SplitMix64: small, seedable, good enough to place faults.
pub struct Rng(u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// Uniform in `lo..=hi`.
    pub fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        let span = hi.saturating_sub(lo).as_millis() as u64;
        lo + Duration::from_millis(self.below(span + 1))
    }
}

/// Runs one scenario alone, on its own runtime, with its seed.
pub fn scenario<F, Fut>(f: F)
where
    F: FnOnce(Rng, u64) -> Fut,
    Fut: Future<Output = ()>,
{
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let seed = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(f(Rng(seed), seed));
}

/// Readings per second of the steady publisher.
pub fn rate() -> f64 {
    pick(200.0, 500.0)
}

/// The real parts, wired as a farm gateway in front of the platform.
pub struct Rig {
    pub nats: Nats,
    pub broker: Mosquitto,
    pub gateway: Gateway,
}

impl Rig {
    /// Servers and a running gateway with `buffer` lines in `[buffer]`.
    pub async fn start(buffer: &str) -> Self {
        Self::start_with(buffer, &[]).await
    }

    /// As `start`, with environment variables for the gateway.
    pub async fn start_with(buffer: &str, env: &[(&str, &str)]) -> Self {
        let (nats, broker, mut gateway) = Self::parts(buffer, env).await;
        gateway.resume();
        let rig = Self {
            nats,
            broker,
            gateway,
        };
        rig.ready().await;
        rig
    }

    /// Servers running and the gateway configured but not started (`gateway.resume()` starts
    /// it): for scenarios that prepare its data directory first.
    pub async fn parts(buffer: &str, env: &[(&str, &str)]) -> (Nats, Mosquitto, Gateway) {
        let nats = Nats::with_platform_stream().await;
        let broker = Mosquitto::start();
        let gateway = Gateway::configure(&probe_config(&nats, &broker, buffer, ""), env);
        (nats, broker, gateway)
    }

    /// Waits until the gateway is subscribed and connected to NATS.
    pub async fn ready(&self) {
        self.gateway.wait_subscribed(1).await;
        self.gateway
            .wait_until("NATS connected", Duration::from_secs(20), |g| {
                g.metric("sahool_gateway_nats_connected", "") == 1.0
            });
    }

    /// A steady publisher of `probe-1` readings from number 0.
    pub fn publisher(&self, name: &str) -> Steady {
        Steady::start(self.broker.port, name, rate(), 0, probe_reading)
    }
}

/// Stops a publisher, leaving a generous time for the last acknowledgements.
pub fn finish(publisher: Steady) -> Ledger {
    publisher.finish(Duration::from_secs(60))
}

/// Sleeps on the runtime.
pub async fn sleep(d: Duration) {
    tokio::time::sleep(d).await;
}
