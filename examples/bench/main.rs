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
//! 3. the peers, fed by the same publisher: the peer of record, a leaf nats-server on the
//!    gateway (MQTT listener, a JetStream domain and stream of its own) whose stream the hub's
//!    stream sources over a leaf-node link, timed until the hub holds every reading (and again
//!    with `sync_interval: always` on the leaf where the installed nats-server has it); and
//!    one nats-server taking MQTT into its own stream. CPU per reading of every process, on
//!    the gateway's box and in all, and the gateway/peer ratios;
//! 4. backlog drain: 1,000,000 readings buffered while NATS is down, then NATS started;
//! 5. latency from MQTT publish to stored in JetStream at a steady 1,000 readings/s;
//! 6. footprint: peak RSS at 10,000 readings/s and during the drain, binary sizes, buffer
//!    bytes per reading, and the RSS curve (sampled each second) of each gateway path at
//!    1,000 readings/s while the platform's nats-server is stopped 2 s after every 6 s up,
//!    and idle after (`soak`; the chaos soak, shortened);
//! 7. flood isolation: normal devices' latency while one device floods, with the shipped
//!    flood limits, and how much of the flood was stored.
//!
//! The table is printed and written as JSON to `target/bench/results.json`. Figures are
//! printed, never asserted: a loaded machine gives lower numbers, not a failure.
//!
//! Options: `--quick`, `--runs N`, `--out FILE`, `--only PHASE,...` (of `ceilings`,
//! `throughput`, `latency`, `steady`, `drain`, `flood`, `soak`: to look at one part again),
//! `--system KEY,...` (of the scenarios' keys: `gateway`, `listener`, `leafhub`,
//! `leafhub_sync`, `peer`), `--count N` (readings per online-throughput measurement), and
//! `--perf DIR`: record `perf record -F 2999` of the gateway process during each online
//! measurement into `DIR/<system>.data` (see `scripts/perf-breakdown` and BENCHMARKS.md), e.g.
//!
//! ```sh
//! cargo run --profile profiling --example bench -- --only throughput --system listener //!     --count 300000 --runs 1 --perf target/perf
//! ```

#[path = "../../tests/support/mod.rs"]
mod support;

mod backlog;
mod ceilings;
mod flood;
mod leaf;
mod measure;
mod publisher;
mod report;
mod scenarios;
mod soak;

use std::path::PathBuf;
use std::process::ExitCode;

use report::{Report, Section, Target};
use scenarios::{Scenario, System, SCENARIOS};

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
    /// Seconds of publishing at 1,000 readings/s with NATS flaps, for the RSS curve.
    pub soak_secs: u64,
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
    soak_secs: 60,
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
    soak_secs: 16,
};

/// The steady rates of the latency and footprint measurements.
const LATENCY_RATE: f64 = 1_000.0;
const STEADY_RATE: f64 = 10_000.0;
/// The chaos soak's rate (`tests/chaos.rs`, scenario 8).
const SOAK_RATE: f64 = 1_000.0;
/// The backlog the drain target speaks of.
const TARGET_BACKLOG: u64 = 1_000_000;

struct Options {
    quick: bool,
    runs: usize,
    out: PathBuf,
    only: Vec<String>,
    systems: Vec<String>,
    count: Option<u64>,
    perf: Option<PathBuf>,
}

impl Options {
    fn parse(args: &[String]) -> Result<Self, String> {
        let mut o = Options {
            quick: false,
            runs: 0,
            out: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench/results.json"),
            only: Vec::new(),
            systems: Vec::new(),
            count: None,
            perf: None,
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
                "--system" => {
                    let list = it.next().ok_or("--system needs a list of systems")?;
                    for key in list.split(',') {
                        if !SCENARIOS.iter().any(|s| s.key == key) {
                            let keys: Vec<&str> = SCENARIOS.iter().map(|s| s.key).collect();
                            return Err(format!(
                                "unknown system `{key}` (systems: {})",
                                keys.join(", ")
                            ));
                        }
                        o.systems.push(key.to_string());
                    }
                }
                "--count" => {
                    o.count = Some(
                        it.next()
                            .and_then(|n| n.parse().ok())
                            .filter(|n| *n > 0)
                            .ok_or("--count needs a number above 0")?,
                    )
                }
                "--perf" => o.perf = Some(PathBuf::from(it.next().ok_or("--perf needs a directory")?)),
                other => {
                    return Err(format!(
                        "unknown argument `{other}` (try --quick, --runs N, --out FILE, --only PHASES, --system KEYS, --count N, --perf DIR)"
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
    // The profile this bench was built with (target/<profile>/examples/bench): the gateway
    // binary is built with the same one, e.g. `--profile profiling` for perf.
    let profile = std::env::current_exe()
        .ok()
        .and_then(|exe| {
            let dir = exe.parent()?.parent()?;
            Some(dir.file_name()?.to_string_lossy().into_owned())
        })
        .filter(|p| release && p != "release" && p != "debug");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = std::process::Command::new(cargo);
    cmd.current_dir(env!("CARGO_MANIFEST_DIR")).args([
        "build",
        "--locked",
        "--bin",
        "sahool-gateway",
    ]);
    let flag = match &profile {
        Some(p) => format!(" --profile {p}"),
        None if release => " --release".to_string(),
        None => String::new(),
    };
    cmd.args(flag.split_whitespace());
    eprintln!("bench: building the gateway binary (cargo build{flag} --bin sahool-gateway)");
    match cmd.status() {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(format!("building the gateway failed ({s})")),
        Err(e) => Err(format!("cannot run cargo to build the gateway: {e}")),
    }
}

async fn bench(options: Options) -> ExitCode {
    let mut sizes = if options.quick { QUICK } else { FULL };
    if let Some(count) = options.count {
        sizes.throughput = count;
    }
    if let Some(dir) = &options.perf {
        if let Err(e) = std::fs::create_dir_all(dir) {
            eprintln!("bench: cannot create {}: {e}", dir.display());
            return ExitCode::FAILURE;
        }
        let _ = scenarios::PERF_DIR.set(dir.clone());
    }
    let mut report = Report::new(options.quick, options.runs);
    let sync_interval = leaf::sync_interval_supported();
    if !sync_interval {
        eprintln!("bench: the installed nats-server does not support `sync_interval` (2.10 and later do): no leaf→hub peer at the gateway's durability");
    }
    for run in 1..=options.runs {
        eprintln!("bench: run {run} of {}", options.runs);
        report.note_load(run, "start");
        one_run(&sizes, &options, sync_interval, &mut report).await;
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
    "soak",
];

/// One system's online figures in a run, for the ratios.
struct OnlineFigures {
    scenario: &'static Scenario,
    rate: f64,
    /// CPU per reading (µs) of the processes on the gateway's box, and of all of them.
    box_us: f64,
    total_us: f64,
}

/// The gateway's own CPU per reading the issue aims at, by scenario.
fn cpu_target(key: &str) -> Option<Target> {
    match key {
        "listener" => Some(Target::AtMost(7.0)),
        "gateway" => Some(Target::AtMost(9.0)),
        _ => None,
    }
}

/// What each gateway path should reach against each peer (throughput ratio).
fn ratio_target(gateway: &str, peer: &str) -> Option<Target> {
    match (gateway, peer) {
        ("listener", "leafhub") => Some(Target::AtLeast(2.0)),
        ("listener", "leafhub_sync") => Some(Target::AtLeast(10.0)),
        ("gateway", "leafhub") => Some(Target::AtLeast(1.2)),
        _ => None,
    }
}

/// The online throughput of one system, with CPU per reading of each of its processes.
async fn online_phase(
    scenario: &'static Scenario,
    base: u64,
    sizes: &Sizes,
    report: &mut Report,
) -> OnlineFigures {
    let online = scenarios::online(scenario, base, sizes.throughput).await;
    let section = if scenario.system.is_gateway() {
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
    let (mut box_us, mut total_us) = (0.0, 0.0);
    for (process, us) in &online.cpu_us {
        let target = (*process == "gateway")
            .then(|| cpu_target(scenario.key))
            .flatten();
        report.add(
            section,
            &format!("online.{}.cpu.{}", scenario.key, process.replace(' ', "_")),
            &format!("  CPU per reading: {process}"),
            "µs",
            target,
            *us,
        );
        total_us += us;
        if scenarios::on_box(&scenario.system, process) {
            box_us += us;
        }
    }
    report.add(
        section,
        &format!("online.{}.cpu.box", scenario.key),
        "  CPU per reading on the gateway's box",
        "µs",
        None,
        box_us,
    );
    report.add(
        section,
        &format!("online.{}.cpu.total", scenario.key),
        "  CPU per reading, all processes",
        "µs",
        None,
        total_us,
    );
    OnlineFigures {
        scenario,
        rate: online.rate,
        box_us,
        total_us,
    }
}

/// Each gateway path against each peer: throughput, and CPU per reading on the box and in all.
fn ratios(online: &[OnlineFigures], js_best: Option<f64>, report: &mut Report) {
    let (gateways, peers): (Vec<&OnlineFigures>, Vec<&OnlineFigures>) =
        online.iter().partition(|o| o.scenario.system.is_gateway());
    for g in &gateways {
        let gk = g.scenario.key;
        for p in &peers {
            let pk = p.scenario.key;
            let (gn, pn) = (g.scenario.name, p.scenario.name);
            report.add(
                Section::Online,
                &format!("ratio.{gk}.{pk}"),
                &format!("{gn} / {pn}"),
                "×",
                ratio_target(gk, pk),
                g.rate / p.rate,
            );
            report.add(
                Section::Online,
                &format!("ratio.{gk}.{pk}.cpu.box"),
                "  CPU per reading on the box, same ratio",
                "×",
                None,
                g.box_us / p.box_us,
            );
            report.add(
                Section::Online,
                &format!("ratio.{gk}.{pk}.cpu.total"),
                "  CPU per reading of all processes, same ratio",
                "×",
                None,
                g.total_us / p.total_us,
            );
        }
        if let Some(ceiling) = js_best {
            report.add(
                Section::Online,
                &format!("ratio.{gk}.jetstream"),
                &format!("{} / JetStream ceiling", g.scenario.name),
                "%",
                Some(Target::AtLeast(80.0)),
                100.0 * g.rate / ceiling,
            );
        }
    }
}

async fn one_run(sizes: &Sizes, options: &Options, sync_interval: bool, report: &mut Report) {
    let only = &options.only;
    let wanted = |phase: &str| only.is_empty() || only.iter().any(|o| o == phase);
    let mut js_best = None;
    if wanted("ceilings") {
        js_best = Some(ceilings_phase(sizes, report).await);
    }
    let mut online = Vec::new();
    for (i, scenario) in SCENARIOS.iter().enumerate() {
        // Index ranges differ per system so no reading repeats another's device timestamp.
        let base = i as u64 * 10_000_000;
        let gateway = scenario.system.is_gateway();
        if !options.systems.is_empty() && !options.systems.iter().any(|k| k == scenario.key) {
            continue;
        }
        if matches!(scenario.system, System::LeafHub { sync_always: true }) && !sync_interval {
            report.missing(
                Section::Peer,
                &format!("online.{}", scenario.key),
                scenario.label,
                "not measured: the installed nats-server has no `sync_interval` (2.10 and later)",
            );
            continue;
        }
        if wanted("throughput") {
            online.push(online_phase(scenario, base, sizes, report).await);
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
        if wanted("soak") && gateway {
            soak_phase(scenario, base + 6_000_000, sizes.soak_secs, report).await;
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
    ratios(&online, js_best, report);
    if wanted("drain") {
        drain_phase(sizes, report).await;
    }
    if wanted("flood") {
        flood_phase(sizes, report).await;
    }
}

/// 6. Footprint over a run with NATS flaps: RSS min, median and max per phase, and the curve.
async fn soak_phase(scenario: &Scenario, base: u64, seconds: u64, report: &mut Report) {
    let soak = soak::flaps(scenario, base, SOAK_RATE, seconds).await;
    eprintln!(
        "bench: RSS curve, {} ({} NATS flaps; MiB each second: {}): {}",
        scenario.name,
        soak.flaps,
        soak::PHASES.join(" | "),
        soak.curve()
    );
    for (i, phase) in soak::PHASES.iter().enumerate() {
        let (min, median, max) = soak.summary(i);
        let key = format!("rss.soak.{}.{}", scenario.key, phase.replace(' ', "_"));
        let label = format!("RSS with NATS flaps, {phase}: {}", scenario.name);
        for (stat, label, value) in [
            ("max", format!("{label}, max"), max),
            ("median", "  median".to_string(), median),
            ("min", "  min".to_string(), min),
        ] {
            let target = soak_target(i, stat);
            let key = format!("{key}.{stat}");
            report.add(Section::Footprint, &key, &label, "MiB", target, value);
        }
    }
}

/// The issue's RSS targets over a long run: under 16 MiB steady (the medians: the idle's
/// first sample may still hold the last flap's drain), under 32 MiB while a backlog drains.
fn soak_target(phase: usize, stat: &str) -> Option<Target> {
    match (phase, stat) {
        (0, "max") => Some(Target::AtMost(32.0)),
        (_, "median") => Some(Target::AtMost(16.0)),
        _ => None,
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
