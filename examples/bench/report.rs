//! The results: samples per measurement over the runs, printed as a table (median and range)
//! and written as JSON with the machine they were measured on.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::{json, Value};

/// The issue's six headings, in table order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Section {
    Ceilings,
    Online,
    Peer,
    Drain,
    Latency,
    Footprint,
    Flood,
}

impl Section {
    fn title(self) -> &'static str {
        match self {
            Self::Ceilings => "1. Ceilings (same run)",
            Self::Online => "2. Online throughput: MQTT QoS 1 in → committed → JetStream PubAck, 300-byte payloads, synchronous = FULL",
            Self::Peer => "3. Peers, same publisher, until all are stored: leaf nats-server (MQTT, own JetStream domain) → hub stream sourcing it (of record); one nats-server alone",
            Self::Drain => "4. Backlog drain: readings buffered while NATS is down",
            Self::Latency => "5. Latency: MQTT publish → stored in JetStream, at a steady 1,000 readings/s",
            Self::Footprint => "6. Footprint",
            Self::Flood => "7. Flood isolation: 3 probes at 10/s each through mosquitto, alone and while a faulty device floods (readings stamped 1 ms apart, as fast as QoS 1 goes); shipped [quality]",
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub enum Target {
    AtLeast(f64),
    AtMost(f64),
}

impl Target {
    fn met(self, value: f64) -> bool {
        match self {
            Self::AtLeast(t) => value >= t,
            Self::AtMost(t) => value <= t,
        }
    }

    fn text(self) -> String {
        match self {
            Self::AtLeast(t) => format!("≥ {}", number(t)),
            Self::AtMost(t) => format!("≤ {}", number(t)),
        }
    }
}

struct Metric {
    section: Section,
    key: String,
    label: String,
    unit: &'static str,
    target: Option<Target>,
    samples: Vec<f64>,
    /// Why there is no figure.
    missing: Option<String>,
}

pub struct Report {
    started: std::time::Instant,
    quick: bool,
    runs: usize,
    metrics: Vec<Metric>,
    load: Vec<Value>,
}

impl Report {
    pub fn new(quick: bool, runs: usize) -> Self {
        Self {
            started: std::time::Instant::now(),
            quick,
            runs,
            metrics: Vec::new(),
            load: Vec::new(),
        }
    }

    /// One run's figure for a measurement.
    pub fn add(
        &mut self,
        section: Section,
        key: &str,
        label: &str,
        unit: &'static str,
        target: Option<Target>,
        value: f64,
    ) {
        eprintln!(
            "bench: [{:6.1} s] {label}: {} {unit}",
            self.started.elapsed().as_secs_f64(),
            number(value)
        );
        match self.metrics.iter_mut().find(|m| m.key == key) {
            Some(m) => m.samples.push(value),
            None => self.metrics.push(Metric {
                section,
                key: key.to_string(),
                label: label.to_string(),
                unit,
                target,
                samples: vec![value],
                missing: None,
            }),
        }
    }

    /// A measurement that could not be made here, with the reason.
    pub fn missing(&mut self, section: Section, key: &str, label: &str, why: &str) {
        if self.metrics.iter().any(|m| m.key == key) {
            return;
        }
        self.metrics.push(Metric {
            section,
            key: key.to_string(),
            label: label.to_string(),
            unit: "",
            target: None,
            samples: Vec::new(),
            missing: Some(why.to_string()),
        });
    }

    /// The load average, to judge how quiet the machine was.
    pub fn note_load(&mut self, run: usize, at: &str) {
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        let one_minute = load.split_whitespace().next().unwrap_or("?").to_string();
        eprintln!("bench: load average (1 min) at the {at} of run {run}: {one_minute}");
        self.load
            .push(json!({ "run": run, "at": at, "loadavg": load.trim() }));
    }

    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\nsahool-gateway benchmark: {} run{}{}, median [min – max]\n{}",
            self.runs,
            if self.runs == 1 { "" } else { "s" },
            if self.quick {
                " (--quick: small sizes, a smoke run)"
            } else {
                ""
            },
            machine_line()
        );
        let mut sections: Vec<Section> = self.metrics.iter().map(|m| m.section).collect();
        sections.sort();
        sections.dedup();
        for section in sections {
            let _ = writeln!(out, "\n{}", section.title());
            let _ = writeln!(
                out,
                "  {:<62} {:>12} {:>25} {:<10} {:>9}  ",
                "", "median", "range", "unit", "target"
            );
            for m in self.metrics.iter().filter(|m| m.section == section) {
                if let Some(why) = &m.missing {
                    let _ = writeln!(out, "  {:<62} {why}", m.label);
                    continue;
                }
                let med = median(&m.samples);
                let (lo, hi) = range(&m.samples);
                let (target, verdict) = match m.target {
                    Some(t) => (t.text(), if t.met(med) { "met" } else { "NOT MET" }),
                    None => (String::new(), ""),
                };
                let _ = writeln!(
                    out,
                    "  {:<62} {:>12} {:>25} {:<10} {:>9}  {verdict}",
                    m.label,
                    number(med),
                    format!("[{} – {}]", number(lo), number(hi)),
                    m.unit,
                    target,
                );
            }
        }
        out
    }

    pub fn write_json(&self, path: &Path) -> std::io::Result<()> {
        let measurements: Vec<Value> = self
            .metrics
            .iter()
            .map(|m| {
                let (lo, hi) = range(&m.samples);
                json!({
                    "key": m.key,
                    "label": m.label,
                    "unit": m.unit,
                    "median": (!m.samples.is_empty()).then(|| median(&m.samples)),
                    "min": (!m.samples.is_empty()).then_some(lo),
                    "max": (!m.samples.is_empty()).then_some(hi),
                    "samples": m.samples,
                    "target": m.target.map(Target::text),
                    "met": m.target.filter(|_| !m.samples.is_empty()).map(|t| t.met(median(&m.samples))),
                    "missing": m.missing,
                })
            })
            .collect();
        let doc = json!({
            "command": if self.quick {
                "cargo run --release --example bench -- --quick"
            } else {
                "cargo run --release --example bench"
            },
            "quick": self.quick,
            "runs": self.runs,
            "machine": machine(),
            "load": self.load,
            "measurements": measurements,
        });
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let text = serde_json::to_string_pretty(&doc).map_err(std::io::Error::other)?;
        std::fs::write(path, text + "\n")
    }
}

pub fn median(samples: &[f64]) -> f64 {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

fn range(samples: &[f64]) -> (f64, f64) {
    let lo = samples.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = samples.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (lo, hi)
}

/// Three significant digits, thousands separated.
fn number(v: f64) -> String {
    if !v.is_finite() {
        return "–".into();
    }
    let a = v.abs();
    if a >= 1000.0 {
        let rounded = v.round() as i64;
        let digits = rounded.unsigned_abs().to_string();
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) {
                out.push(',');
            }
            out.push(c);
        }
        if rounded < 0 {
            out.insert(0, '-');
        }
        out
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let disk = std::process::Command::new("df")
        .args(["--output=source,fstype,size", "-h"])
        .arg(std::env::temp_dir())
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| {
            s.lines()
                .nth(1)
                .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        })
        .unwrap_or_default();
    let version = |cmd: &str, arg: &str| {
        let sbin = Path::new("/usr/sbin").join(cmd);
        let program = if sbin.exists() { sbin } else { cmd.into() };
        std::process::Command::new(program)
            .arg(arg)
            .output()
            .ok()
            .map(|o| {
                let text = String::from_utf8_lossy(&o.stdout).to_string();
                text.lines().next().unwrap_or("").trim().to_string()
            })
            .unwrap_or_default()
    };
    json!({
        "cpus": cpus,
        "cpu_model": model,
        "memory_gib": (mem_kib as f64 / (1 << 20) as f64 * 10.0).round() / 10.0,
        "disk": disk,
        "kernel": version("uname", "-r"),
        "nats_server": version("nats-server", "--version"),
        "mosquitto": version("mosquitto", "-h"),
    })
}

fn machine_line() -> String {
    let m = machine();
    format!(
        "machine: {} × {}, {} GiB RAM, disk {}, kernel {}; {}, {}",
        m["cpus"],
        m["cpu_model"].as_str().unwrap_or("?"),
        m["memory_gib"],
        m["disk"].as_str().unwrap_or("?"),
        m["kernel"].as_str().unwrap_or("?"),
        m["nats_server"].as_str().unwrap_or("?"),
        m["mosquitto"].as_str().unwrap_or("?"),
    )
}
