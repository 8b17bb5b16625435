//! Instruments: wall-clock times comparable across processes, a stream's fill level and
//! timestamps, arrivals of readings in a stream, peak RSS of a process, binary sizes.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{push, DeliverPolicy};
use async_nats::jetstream::stream::State;
use futures_util::StreamExt;
use serde_json::Value;

/// Nanoseconds since the Unix epoch: the clock nats-server stamps stored messages with.
pub fn unix_ns() -> i128 {
    time::OffsetDateTime::now_utc().unix_timestamp_nanos()
}

pub fn ns_of(t: time::OffsetDateTime) -> i128 {
    t.unix_timestamp_nanos()
}

pub fn secs(ns: i128) -> f64 {
    ns as f64 / 1e9
}

pub async fn jetstream(url: &str) -> async_nats::jetstream::Context {
    let client = async_nats::connect(url)
        .await
        .expect("bench connects to nats-server");
    async_nats::jetstream::new(client)
}

pub async fn stream_state(js: &async_nats::jetstream::Context, name: &str) -> State {
    let mut stream = js.get_stream(name).await.expect("stream exists");
    stream.info().await.expect("stream info").state.clone()
}

/// Waits until the stream holds at least `count` messages; its state then says when the
/// first and the last were stored.
pub async fn wait_stream(
    js: &async_nats::jetstream::Context,
    name: &str,
    count: u64,
    within: Duration,
) -> State {
    let deadline = Instant::now() + within;
    loop {
        let state = stream_state(js, name).await;
        if state.messages >= count {
            return state;
        }
        assert!(
            Instant::now() < deadline,
            "stream {name} holds {} of {count} messages after {within:?}",
            state.messages
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// When each reading (by its index, the payload's `value`) appeared in a stream.
pub struct Arrivals {
    task: tokio::task::JoinHandle<Vec<(u64, i128)>>,
}

impl Arrivals {
    /// Starts watching for new messages on `subject` in `stream`, until `count` arrived.
    pub async fn watch(
        js: &async_nats::jetstream::Context,
        client: &async_nats::Client,
        stream: &str,
        subject: &str,
        count: usize,
    ) -> Self {
        let stream = js.get_stream(stream).await.expect("stream exists");
        let consumer = stream
            .create_consumer(push::OrderedConfig {
                deliver_subject: client.new_inbox(),
                filter_subject: subject.to_string(),
                deliver_policy: DeliverPolicy::New,
                ..Default::default()
            })
            .await
            .expect("ordered consumer");
        let mut messages = consumer.messages().await.expect("consumer messages");
        let task = tokio::spawn(async move {
            let mut seen = Vec::with_capacity(count);
            while seen.len() < count {
                let next = tokio::time::timeout(Duration::from_secs(60), messages.next()).await;
                let Ok(Some(Ok(message))) = next else {
                    panic!("arrivals stopped at {} of {count}", seen.len());
                };
                let at = unix_ns();
                let body: Value = serde_json::from_slice(&message.payload).expect("JSON body");
                // A gateway event carries the reading under `payload`; the peer stores the
                // device's payload as it came.
                let value = body["payload"]["value"]
                    .as_f64()
                    .or_else(|| body["value"].as_f64())
                    .expect("a reading value");
                seen.push((value as u64, at));
            }
            seen
        });
        Self { task }
    }

    pub async fn finish(self) -> Vec<(u64, i128)> {
        self.task.await.expect("arrivals task")
    }
}

/// Quantile of unsorted samples (nearest rank).
pub fn quantile(samples: &[f64], q: f64) -> f64 {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

/// Resident set size of a process in KiB, from `/proc/<pid>/status`.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
}

/// Samples a process's RSS every 50 ms on its own thread and keeps the peak.
pub struct PeakRss {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl PeakRss {
    pub fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = 0;
            while !flag.load(Ordering::Relaxed) {
                peak = peak.max(rss_kib(pid).unwrap_or(0));
                std::thread::sleep(Duration::from_millis(50));
            }
            peak.max(rss_kib(pid).unwrap_or(0))
        });
        Self { stop, thread }
    }

    /// The peak in MiB.
    pub fn finish(self) -> f64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("RSS sampler") as f64 / 1024.0
    }
}

/// CPU time (user + system, seconds) a process has used so far, from `/proc/<pid>/stat`.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name: state is the 3rd, utime the 14th, stime the 15th.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // /proc reports in USER_HZ, which Linux fixes at 100 for user space.
    Some(ticks as f64 / 100.0)
}

/// CPU used by named processes between `start` and `finish`.
pub struct CpuMeter {
    start: Vec<(&'static str, u32, f64)>,
}

impl CpuMeter {
    pub fn start(processes: &[(&'static str, u32)]) -> Self {
        Self {
            start: processes
                .iter()
                .map(|&(name, pid)| (name, pid, cpu_seconds(pid).unwrap_or(0.0)))
                .collect(),
        }
    }

    /// Microseconds of CPU per item, for each process.
    pub fn per_item_us(&self, items: u64) -> Vec<(&'static str, f64)> {
        self.start
            .iter()
            .map(|&(name, pid, t0)| {
                let used = cpu_seconds(pid).unwrap_or(t0) - t0;
                (name, used * 1e6 / items.max(1) as f64)
            })
            .collect()
    }
}

/// Size of `binary` after `strip --strip-all`, in MiB; `None` if there is no such binary.
pub fn stripped_mib(binary: &Path, strip: &str) -> Option<f64> {
    if !binary.exists() {
        return None;
    }
    let dir = tempfile::tempdir().ok()?;
    let out = dir.path().join("stripped");
    let stripped = std::process::Command::new(strip)
        .arg("--strip-all")
        .arg("-o")
        .arg(&out)
        .arg(binary)
        .status()
        .is_ok_and(|s| s.success());
    let path = if stripped { out.as_path() } else { binary };
    let bytes = std::fs::metadata(path).ok()?.len();
    Some(bytes as f64 / (1 << 20) as f64)
}
