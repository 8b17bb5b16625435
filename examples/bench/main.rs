//! The performance benchmark: the gateway against the NATS-native peer on the same machine.
//!
//! ```sh
//! cargo run --release --example bench              # 3 runs, full sizes (about 10 minutes)
//! cargo run --release --example bench -- --quick   # 1 run, small sizes: a smoke run
//! ```
//!
//! Everything runs on loopback and is set up here: nats-server, mosquitto, the release gateway
//! binary (built first with `cargo build --release --bin sahool-gateway`, a no-op when current)
//! and MQTT publishers, each a child process of this program (`bench publish ...`). Each run
//! measures, and the table gives median and range over the runs of:
//! 1. ceilings: raw JetStream publish with pipelined acks, the store's group-commit insert rate
//!    with the gateway's own settings, and the disk's fsync rate;
//! 2. online throughput: MQTT QoS 1 → committed → JetStream PubAck, 300-byte SAHOOL payloads;
//! 3. the peer: nats-server's MQTT listener into a JetStream stream, fed by the same publisher;
//! 4. backlog drain: 1,000,000 readings buffered while NATS is down, then NATS started;
//! 5. latency from MQTT publish to stored in JetStream at a steady 1,000 readings/s;
//! 6. footprint: peak RSS at 10,000 readings/s and during the drain, binary sizes, buffer
//!    bytes per reading;
//! 7. flood isolation: normal devices' latency while one device floods, with the shipped
//!    flood limits, and how much of the flood was stored.
//!
//! The table is printed and written as JSON to `target/bench/results.json`. Figures are
//! printed, never asserted: a loaded machine gives lower numbers, not a failure.
//!
//! Options: `--quick`, `--runs N`, `--out FILE`, `--only PHASE,...` (of `ceilings`,
//! `throughput`, `latency`, `steady`, `drain`, `flood`: to look at one part again).

#[path = "../../tests/support/mod.rs"]
mod support;

mod backlog;
mod ceilings;
mod flood;
mod measure;
mod publisher;
mod report;
mod scenarios;

use std::path::PathBuf;
use std::process::ExitCode;

use report::{Report, Section, Target};
use scenarios::{System, SCENARIOS};

/// How much each measurement moves.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    /// Readings per online-throughput measurement.
    pub throughput: u64,
    /// Seconds of publishing at 1,000 readings/s for the latency figures.
    pub latency_secs: u64,
    /// Seconds of publishing at 10,000 readings/s for the steady RSS.
    pub steady_secs: u64,
    /// Readings buffered before the drain.
    pub backlog: u64,
    /// Messages per JetStream ceiling measurement, and the ack windows tried.
    pub jetstream: u64,
    pub windows: &'static [usize],
    /// Rows per store ceiling measurement.
    pub store_rows: u64,
    /// Seconds of fsyncs.
    pub fsync_secs: f64,
    /// Seconds of each half of the flood-isolation measurement.
    pub flood_secs: u64,
}

const FULL: Sizes = Sizes {
    throughput: 100_000,
    latency_secs: 20,
    steady_secs: 15,
    backlog: 1_000_000,
    jetstream: 100_000,
    windows: &[256, 1024, 4096],
    store_rows: 200_000,
    fsync_secs: 2.0,
    flood_secs: 10,
};

const QUICK: Sizes = Sizes {
    throughput: 5_000,
    latency_secs: 2,
    steady_secs: 2,
    backlog: 20_000,
    jetstream: 10_000,
    windows: &[1024],
    store_rows: 10_000,
    fsync_secs: 0.3,
    flood_secs: 2,
};

/// The steady rates of the latency and footprint measurements.
const LATENCY_RATE: f64 = 1_000.0;
const STEADY_RATE: f64 = 10_000.0;
/// The backlog the drain target speaks of.
const TARGET_BACKLOG: u64 = 1_000_000;

struct Options {
    quick: bool,
    runs: usize,
    out: PathBuf,
    only: Vec<String>,
}

impl Options {
    fn parse(args: &[String]) -> Result<Self, String> {
        let mut o = Options {
            quick: false,
            runs: 0,
            out: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench/results.json"),
            only: Vec::new(),
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--quick" => o.quick = true,
                "--runs" => {
                    o.runs = it
                        .next()
                        .and_then(|n| n.parse().ok())
                        .filter(|n| *n > 0)
                        .ok_or("--runs needs a number above 0")?
                }
                "--out" => o.out = PathBuf::from(it.next().ok_or("--out needs a file")?),
                "--only" => {
                    let list = it.next().ok_or("--only needs a list of phases")?;
                    for phase in list.split(',') {
                        if !PHASES.contains(&phase) {
                            return Err(format!(
                                "unknown phase `{phase}` (phases: {})",
                                PHASES.join(", ")
                            ));
                        }
                        o.only.push(phase.to_string());
                    }
                }
                other => {
                    return Err(format!(
                        "unknown argument `{other}` (try --quick, --runs N, --out FILE)"
                    ))
                }
            }
        }
        if o.runs == 0 {
            o.runs = if o.quick { 1 } else { 3 };
        }
        Ok(o)
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some(publisher::COMMAND) {
        return publisher::child_main(&args[1..]);
    }
    let options = match Options::parse(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("bench: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = build_gateway() {
        eprintln!("bench: {e}");
        return ExitCode::FAILURE;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(bench(options))
}

/// The gateway binary the bench runs: built now, so the figures are for the current source.
fn build_gateway() -> Result<(), String> {
    let release = !cfg!(debug_assertions);
    if !release {
        eprintln!("bench: WARNING: this is a debug build; its figures mean nothing. Use `cargo run --release --example bench`.");
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = std::process::Command::new(cargo);
    cmd.current_dir(env!("CARGO_MANIFEST_DIR")).args([
        "build",
        "--locked",
        "--bin",
        "sahool-gateway",
    ]);
    if release {
        cmd.arg("--release");
    }
    eprintln!(
        "bench: building the gateway binary (cargo build{} --bin sahool-gateway)",
        if release { " --release" } else { "" }
    );
    match cmd.status() {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(format!("building the gateway failed ({s})")),
        Err(e) => Err(format!("cannot run cargo to build the gateway: {e}")),
    }
}

async fn bench(options: Options) -> ExitCode {
    let sizes = if options.quick { QUICK } else { FULL };
    let mut report = Report::new(options.quick, options.runs);
    for run in 1..=options.runs {
        eprintln!("bench: run {run} of {}", options.runs);
        report.note_load(run, "start");
        one_run(&sizes, &options.only, &mut report).await;
        report.note_load(run, "end");
    }
    footprint_sizes(&mut report);
    print!("{}", report.table());
    match report.write_json(&options.out) {
        Ok(()) => {
            println!("\nJSON: {}", options.out.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bench: cannot write {}: {e}", options.out.display());
            ExitCode::FAILURE
        }
    }
}

/// The parts of a run, for `--only`.
const PHASES: &[&str] = &[
    "ceilings",
    "throughput",
    "latency",
    "steady",
    "drain",
    "flood",
];

async fn one_run(sizes: &Sizes, only: &[String], report: &mut Report) {
    let wanted = |phase: &str| only.is_empty() || only.iter().any(|o| o == phase);
    let mut js_best = None;
    if wanted("ceilings") {
        js_best = Some(ceilings_phase(sizes, report).await);
    }
    let mut peer_rate = None;
    let mut gateway_rates = Vec::new();
    for (i, scenario) in SCENARIOS.iter().enumerate() {
        // Index ranges differ per system so no reading repeats another's device timestamp.
        let base = i as u64 * 10_000_000;
        let gateway = matches!(scenario.system, System::Gateway(_));
        if wanted("throughput") {
            let online = scenarios::online(scenario, base, sizes.throughput).await;
            let section = if gateway {
                Section::Online
            } else {
                Section::Peer
            };
            report.add(
                section,
                &format!("online.{}", scenario.key),
                scenario.label,
                "readings/s",
                None,
                online.rate,
            );
            for (process, us) in online.cpu_us {
                report.add(
                    section,
                    &format!("online.{}.cpu.{process}", scenario.key),
                    &format!("  CPU per reading: {process}"),
                    "µs",
                    None,
                    us,
                );
            }
            if gateway {
                gateway_rates.push((scenario, online.rate));
            } else {
                peer_rate = Some(online.rate);
            }
        }
        if wanted("latency") {
            let latency =
                scenarios::latency(scenario, base + 2_000_000, LATENCY_RATE, sizes.latency_secs)
                    .await;
            for (name, q, target) in [
                ("p50", 0.50, None),
                ("p99", 0.99, Some(Target::AtMost(20.0))),
                ("p99.9", 0.999, None),
            ] {
                report.add(
                    Section::Latency,
                    &format!("latency.{}.{name}", scenario.key),
                    &format!("{}: {name}", scenario.name),
                    "ms",
                    target.filter(|_| gateway),
                    measure::quantile(&latency, q),
                );
            }
        }
        if wanted("steady") {
            let steady =
                scenarios::steady(scenario, base + 4_000_000, STEADY_RATE, sizes.steady_secs).await;
            report.add(
                Section::Footprint,
                &format!("rss.steady.{}", scenario.key),
                &format!("peak RSS at 10,000 readings/s: {}", scenario.name),
                "MiB",
                gateway.then_some(Target::AtMost(16.0)),
                steady.peak_rss_mib,
            );
            report.add(
                Section::Footprint,
                &format!("steady.rate.{}", scenario.key),
                &format!("  rate reached, 10,000/s offered: {}", scenario.name),
                "readings/s",
                None,
                steady.rate,
            );
        }
    }
    for (scenario, rate) in &gateway_rates {
        if let Some(peer) = peer_rate {
            report.add(
                Section::Online,
                &format!("ratio.{}.peer", scenario.key),
                &format!("{} / peer", scenario.name),
                "×",
                Some(Target::AtLeast(2.0)),
                rate / peer,
            );
        }
        if let Some(ceiling) = js_best {
            report.add(
                Section::Online,
                &format!("ratio.{}.jetstream", scenario.key),
                &format!("{} / JetStream ceiling", scenario.name),
                "%",
                Some(Target::AtLeast(80.0)),
                100.0 * rate / ceiling,
            );
        }
    }
    if wanted("drain") {
        drain_phase(sizes, report).await;
    }
    if wanted("flood") {
        flood_phase(sizes, report).await;
    }
}

/// 7. Flood isolation.
async fn flood_phase(sizes: &Sizes, report: &mut Report) {
    let f = flood::isolation(sizes.flood_secs).await;
    for (half, samples) in [("quiet", &f.quiet_ms), ("flooded", &f.flooded_ms)] {
        for (name, q) in [("p50", 0.50), ("p99", 0.99)] {
            report.add(
                Section::Flood,
                &format!("flood.{half}.{name}"),
                &format!("calm probes' latency, {half}: {name}"),
                "ms",
                None,
                measure::quantile(samples, q),
            );
        }
    }
    report.add(
        Section::Flood,
        "flood.calm_lost",
        "calm readings lost",
        "readings",
        Some(Target::AtMost(0.0)),
        f.calm_lost as f64,
    );
    report.add(
        Section::Flood,
        "flood.faulty_rate",
        "  faulty device's rate offered",
        "readings/s",
        None,
        f.faulty_sent as f64 / sizes.flood_secs as f64,
    );
    report.add(
        Section::Flood,
        "flood.faulty_stored",
        "  of its readings stored (the rest dead-lettered as rate_limited)",
        "readings",
        None,
        f.faulty_stored as f64,
    );
}

/// 1. Ceilings; returns the JetStream one (best window).
async fn ceilings_phase(sizes: &Sizes, report: &mut Report) -> f64 {
    let mut best = (0.0f64, 0.0);
    for &window in sizes.windows {
        let (rate, server_us) = ceilings::jetstream(sizes.jetstream, window).await;
        if rate > best.0 {
            best = (rate, server_us);
        }
        report.add(
            Section::Ceilings,
            &format!("ceiling.jetstream.window_{window}"),
            &format!("JetStream publish, pipelined acks, window {window}"),
            "msgs/s",
            None,
            rate,
        );
    }
    report.add(
        Section::Ceilings,
        "ceiling.jetstream",
        "JetStream publish, pipelined acks (best window)",
        "msgs/s",
        None,
        best.0,
    );
    report.add(
        Section::Ceilings,
        "ceiling.jetstream.cpu.nats-server",
        "  CPU per message: nats-server",
        "µs",
        None,
        best.1,
    );
    let store = ceilings::store(sizes.store_rows).await;
    report.add(
        Section::Ceilings,
        "ceiling.store",
        "SQLite group commit, gateway settings, 1,024 appends in flight",
        "rows/s",
        None,
        store,
    );
    let fsync = ceilings::fsync(sizes.fsync_secs);
    report.add(
        Section::Ceilings,
        "ceiling.fsync",
        "disk fsync (4 KiB write + fdatasync)",
        "fsync/s",
        None,
        fsync,
    );
    best.0
}

/// 4. Backlog drain, and the buffer's size on disk.
async fn drain_phase(sizes: &Sizes, report: &mut Report) {
    let drain = backlog::drain(sizes.backlog).await;
    let full = sizes.backlog == TARGET_BACKLOG;
    report.add(
        Section::Drain,
        "drain.seconds",
        &format!("{} readings: NATS up → last PubAck", sizes.backlog),
        "s",
        full.then_some(Target::AtMost(10.0)),
        drain.nats_up_to_last,
    );
    report.add(
        Section::Drain,
        "drain.reconnect_seconds",
        "  of which NATS up → first PubAck (reconnect)",
        "s",
        None,
        drain.nats_up_to_first,
    );
    report.add(
        Section::Drain,
        "drain.rate",
        "drain rate, first → last PubAck",
        "readings/s",
        Some(Target::AtLeast(100_000.0)),
        drain.rate,
    );
    for (process, us) in drain.cpu_us {
        report.add(
            Section::Drain,
            &format!("drain.cpu.{process}"),
            &format!("  CPU per reading: {process}"),
            "µs",
            None,
            us,
        );
    }
    report.add(
        Section::Footprint,
        "rss.drain",
        "peak RSS during the drain",
        "MiB",
        Some(Target::AtMost(32.0)),
        drain.peak_rss_mib,
    );
    report.add(
        Section::Footprint,
        "buffer.bytes_per_reading",
        "buffer file size per buffered reading",
        "B",
        Some(Target::AtMost(120.0)),
        drain.file_bytes_per_reading,
    );
    report.add(
        Section::Footprint,
        "buffer.fill_rate",
        "  backlog written through the store before the drain",
        "rows/s",
        None,
        drain.fill_rate,
    );
}

/// Stripped binary sizes: this machine's release build, and the aarch64 one if `cross/build`
/// made it.
fn footprint_sizes(report: &mut Report) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let exe = support::gateway_binary();
    if let Some(mib) = measure::stripped_mib(&exe, "strip") {
        report.add(
            Section::Footprint,
            "binary.host",
            &format!("stripped binary, {}", std::env::consts::ARCH),
            "MiB",
            None,
            mib,
        );
    }
    let cross = root.join("target/cross/aarch64-unknown-linux-gnu/release/sahool-gateway");
    match measure::stripped_mib(&cross, "aarch64-linux-gnu-strip") {
        Some(mib) => report.add(
            Section::Footprint,
            "binary.aarch64",
            "stripped binary, aarch64",
            "MiB",
            Some(Target::AtMost(8.0)),
            mib,
        ),
        None => report.missing(
            Section::Footprint,
            "binary.aarch64",
            "stripped binary, aarch64",
            "not built here: run cross/build first",
        ),
    }
}
