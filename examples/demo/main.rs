//! The whole pipeline, live, with no MQTT broker: simulated SAHOOL devices publish readings at
//! QoS 1 straight to the real gateway binary's MQTT listener, and a simulated soil probe prints
//! `key=value` lines on a serial port (a pseudo-terminal). The gateway buffers every reading in
//! SQLite and forwards it to a real nats-server's JetStream. Midway nats-server is stopped for a
//! few seconds, so the buffer fills, then started again, so it drains. At the end the stream is
//! read back and checked: every reading sent exactly once, valid against the event contract, in
//! `seq` order; a table per input and the outage and throughput figures are printed.
//! Last, the downlink: the farm's uplink (a TCP link between the gateway and nats-server) is cut
//! while the platform publishes commands for two valves on a simulated Modbus bus; on reconnect
//! the gateway applies the one still valid and refuses the expired one (see `valves.rs`).
//!
//! Run `scripts/demo` (installs nats-server when missing), or:
//! `cargo build --release --bin sahool-gateway && cargo run --release --example demo`.
//! Exits non-zero when a check fails.

#[path = "../../tests/support/mod.rs"]
mod support;

mod farm;
mod publisher;
mod summary;
mod talker;
mod valves;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use farm::{Input, FARM, SERIAL_PORT, TALKER};
use publisher::Progress;
use summary::{Figures, InputRow, Run};
use support::commands::Uplink;
use support::pty::{wait_port_open, Pty};
use support::{free_port, Gateway, Nats};
use time::OffsetDateTime;

/// MQTT readings per second, all devices together.
const RATE: f64 = 200.0;
/// The serial soil probe prints a line this often.
const LINE_EVERY: Duration = Duration::from_millis(200);
const PUBLISH_FOR: Duration = Duration::from_secs(25);
const OUTAGE_AT: Duration = Duration::from_secs(8);
const OUTAGE_FOR: Duration = Duration::from_secs(6);
/// How long the devices wait for their last PUBACKs once they stop making readings.
const ACK_WITHIN: Duration = Duration::from_secs(30);
/// How long the buffer may take to drain once the devices stop.
const DRAIN_WITHIN: Duration = Duration::from_secs(60);
/// The platform's stream, as `Nats::create_stream` makes it (120 s duplicate window).
const STREAM: &str = "SAHOOL_IOT";
/// The `[[mqtt_listener]]` name in `farm::gateway_config`.
const LISTENER: &str = "devices";

// ---------------------------------------------------------------------------------------------
// Watching the gateway
// ---------------------------------------------------------------------------------------------

/// The gateway's own view, from one scrape of `/metrics`.
struct Snapshot {
    accepted: u64,
    buffered: u64,
    forwarded: u64,
    rejected: u64,
    nats_up: bool,
    lines_read: u64,
    pubacks: f64,
    puback_seconds: f64,
}

fn snapshot(gateway: &Gateway) -> Snapshot {
    let body = gateway
        .get("/metrics")
        .map(|(_, body)| body)
        .unwrap_or_default();
    let metric = |name: &str, labels: &str| support::metric_value(&body, name, labels);
    let listener = format!("listener=\"{LISTENER}\"");
    Snapshot {
        accepted: metric("sahool_gateway_readings_accepted_total", "") as u64,
        buffered: metric("sahool_gateway_buffer_readings", "") as u64,
        forwarded: metric("sahool_gateway_readings_forwarded_total", "") as u64,
        rejected: metric("sahool_gateway_readings_rejected_total", "") as u64,
        nats_up: metric("sahool_gateway_nats_connected", "") == 1.0,
        lines_read: metric(
            "sahool_gateway_serial_messages_received_total",
            &format!("port=\"{SERIAL_PORT}\""),
        ) as u64,
        pubacks: metric(
            "sahool_gateway_mqtt_listener_puback_seconds_count",
            &listener,
        ),
        puback_seconds: metric("sahool_gateway_mqtt_listener_puback_seconds_sum", &listener),
    }
}

/// Progress of the run so far, printed every second.
struct Watch {
    start: Instant,
    mqtt: Arc<Progress>,
    lines: Arc<AtomicU64>,
    max_buffered: u64,
}

impl Watch {
    fn new(start: Instant, mqtt: Arc<Progress>, lines: Arc<AtomicU64>) -> Self {
        Self {
            start,
            mqtt,
            lines,
            max_buffered: 0,
        }
    }

    /// Takes a snapshot, prints a progress line, and keeps the largest backlog.
    fn observe(&mut self, gateway: &Gateway) -> Snapshot {
        let s = snapshot(gateway);
        self.max_buffered = self.max_buffered.max(s.buffered);
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        println!(
            "{:>4}s  mqtt sent {:>5} acked {:>5}  serial lines {:>4}  accepted {:>5}  buffered {:>5}  forwarded {:>5}  NATS {}",
            self.start.elapsed().as_secs(),
            load(&self.mqtt.readings),
            load(&self.mqtt.acked_readings),
            load(&self.lines),
            s.accepted,
            s.buffered,
            s.forwarded,
            if s.nats_up { "connected" } else { "DOWN" }
        );
        s
    }
}

// ---------------------------------------------------------------------------------------------
// The demo
// ---------------------------------------------------------------------------------------------

// Blocking harness calls (metrics scrapes, starting and stopping nats-server) are made straight
// from `main`'s future: it runs on the main thread, the publisher on the runtime's workers.
#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    stop_children_on_panic();
    let passed = run().await;
    // `run` has returned, so the harness has stopped every process it started.
    std::process::exit(if passed { 0 } else { 1 });
}

async fn run() -> bool {
    println!("== Starting nats-server and the gateway (no MQTT broker: devices publish to the gateway) ==");
    let mut nats = Nats::start();
    nats.create_stream(STREAM, &["sahool.iot.>"]).await;
    nats.create_stream("SAHOOL_COMMANDS", &["sahool.commands.>"])
        .await;
    // The farm's uplink: the gateway reaches nats-server through it, so the downlink step can
    // cut the farm off while the platform stays up.
    let uplink = Uplink::to(nats.port).await;
    let listen_port = free_port();
    let pty = Pty::open();
    let valves_pty = Pty::open();
    let valves_path = valves_pty.slave_path().to_path_buf();
    let bus = valves::spawn_bus(valves_pty);
    let config = farm::gateway_config(&uplink.url(), listen_port, pty.slave_path())
        + &valves::gateway_config(&valves_path);
    let mut gateway = Gateway::start(&config);
    gateway.wait_until(
        "NATS connected and the MQTT listener bound",
        Duration::from_secs(30),
        |g| {
            let listening = format!("listener {LISTENER}: listening");
            snapshot(g).nats_up
                && g.get("/readyz")
                    .is_some_and(|(_, body)| body.contains(&listening))
        },
    );
    // Lines begun before the port opened are dropped: start talking once it is open.
    wait_port_open(&gateway, SERIAL_PORT);
    wait_port_open(&gateway, valves::BUS);
    print_setup(&nats, listen_port, &pty, &gateway);
    valves::print_setup(&valves_path);

    let start = Instant::now();
    let mut watch = Watch::new(start, Arc::default(), Arc::default());
    let talker = talker::spawn(pty, start, PUBLISH_FOR, LINE_EVERY, watch.lines.clone());
    let (mqtt, outage) = publish_through_outage(&mut nats, &gateway, listen_port, &mut watch).await;
    let serial = talker.join().expect("the serial talker finished");
    println!(
        ">>> serial probe stopped: {} readings in {} lines",
        serial.readings.len(),
        serial.lines
    );
    let publish_secs = start.elapsed().as_secs_f64();
    let mut sent = mqtt.readings;
    sent.extend(serial.readings);
    let drained = wait_for_drain(&gateway, &mut watch, sent.len() as u64).await;
    let last = snapshot(&gateway);

    println!(">>> reading the stream back from JetStream");
    let events = nats.read_readings(STREAM).await;
    let report = summary::check_stream(&events, &sent);
    let downlink = valves::run(&nats, &uplink, &bus).await;
    println!(">>> stopping the gateway with SIGTERM");
    let exit_code = gateway.terminate();
    // Only now: the gateway would have seen the device unplugged.
    drop(serial.pty);

    if let Some(error) = &report.first_schema_error {
        println!("first contract violation: {error}");
    }
    let count = |input| sent.iter().filter(|p| p.input == input).count();
    let per_line = TALKER.sensors.len() as u64;
    let run = Run {
        inputs: vec![
            InputRow {
                label: "MQTT listener",
                input: Input::Listener,
                sent: count(Input::Listener),
                acked: mqtt.acked_readings,
                acked_means: format!(
                    "in a message the listener PUBACKed ({} / {} messages)",
                    mqtt.acked_messages, mqtt.messages
                ),
            },
            InputRow {
                label: "serial (lines)",
                input: Input::Serial,
                sent: count(Input::Serial),
                acked: last.lines_read * per_line,
                acked_means: format!(
                    "in a line the gateway read ({} / {} lines; a serial line has no ack)",
                    last.lines_read, serial.lines
                ),
            },
        ],
        messages: (mqtt.acked_messages, mqtt.messages),
        lines: (last.lines_read, serial.lines),
        accepted: last.accepted,
        rejected: last.rejected,
        buffered: last.buffered,
        drained,
        exit_code,
    };
    let figures = Figures {
        outage_secs: outage.down_for.as_secs_f64(),
        max_buffered: watch.max_buffered,
        publish_secs,
        catch_up: outage
            .down_at
            .and_then(|down_at| summary::catch_up(&events, down_at)),
        mean_puback_ms: last.puback_seconds * 1000.0 / last.pubacks.max(1.0),
        reconnects: mqtt.reconnects,
        resent: mqtt.resent,
    };
    let passed = summary::print(&run, &report, &figures) & valves::print(&downlink);
    if !passed {
        print_log_tail(&gateway);
    }
    passed
}

fn print_setup(nats: &Nats, listen_port: u16, pty: &Pty, gateway: &Gateway) {
    println!(
        "  nats-server    {}  (stream {STREAM} on sahool.iot.>)",
        nats.url()
    );
    println!("  MQTT listener  mqtt://127.0.0.1:{listen_port}  ([[mqtt_listener]] {LISTENER}, auth none: loopback)");
    println!(
        "  serial port    {}  ([[serial]] {SERIAL_PORT}, lines, kv)",
        pty.slave_path().display()
    );
    println!(
        "  gateway        http://127.0.0.1:{}/metrics",
        gateway.http_port
    );
    for d in FARM.iter().chain([&TALKER]) {
        let types: Vec<&str> = d.sensors.iter().map(|s| s.sensor_type).collect();
        let (id, field, form) = (d.id, d.field, d.form_name());
        println!(
            "  device {id:<14} {field:<14} {form:<9} {}",
            types.join(", ")
        );
    }
}

/// Where the NATS outage stands.
enum Outage {
    Ahead,
    Ongoing(Instant, OffsetDateTime),
    Over(OutageReport),
}

/// When NATS went down, and for how long.
struct OutageReport {
    down_at: Option<OffsetDateTime>,
    down_for: Duration,
}

/// Runs the MQTT devices to the end, printing progress every second, with nats-server down
/// from `OUTAGE_AT` for `OUTAGE_FOR`. Returns what the devices did and the outage's figures.
async fn publish_through_outage(
    nats: &mut Nats,
    gateway: &Gateway,
    listen_port: u16,
    watch: &mut Watch,
) -> (publisher::Outcome, OutageReport) {
    println!(
        "\n== Devices publish {RATE} readings/s at QoS 1, the serial probe a line every {} ms, for {} s; \
         nats-server is down from {} s to {} s ==",
        LINE_EVERY.as_millis(),
        PUBLISH_FOR.as_secs(),
        OUTAGE_AT.as_secs(),
        (OUTAGE_AT + OUTAGE_FOR).as_secs()
    );
    let start = watch.start;
    let devices = tokio::spawn(publisher::run_devices(
        listen_port,
        RATE,
        PUBLISH_FOR,
        ACK_WITHIN,
        start,
        watch.mqtt.clone(),
    ));
    let mut outage = Outage::Ahead;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    while !devices.is_finished() {
        tick.tick().await;
        match outage {
            Outage::Ahead if start.elapsed() >= OUTAGE_AT => {
                nats.stop();
                outage = Outage::Ongoing(Instant::now(), OffsetDateTime::now_utc());
                println!(">>> nats-server stopped: the gateway keeps acking devices and buffers in SQLite");
            }
            Outage::Ongoing(since, down_at) if start.elapsed() >= OUTAGE_AT + OUTAGE_FOR => {
                nats.resume();
                outage = Outage::Over(OutageReport {
                    down_at: Some(down_at),
                    down_for: since.elapsed(),
                });
                println!(
                    ">>> nats-server started again: the gateway reconnects and drains the buffer"
                );
            }
            _ => {}
        }
        watch.observe(gateway);
    }
    let outcome = devices.await.expect("the device simulation finished");
    println!(
        ">>> MQTT devices stopped: {} readings in {} messages, {} PUBACKed",
        outcome.readings.len(),
        outcome.messages,
        outcome.acked_messages
    );
    let report = match outage {
        Outage::Over(report) => report,
        Outage::Ongoing(since, down_at) => {
            nats.resume();
            OutageReport {
                down_at: Some(down_at),
                down_for: since.elapsed(),
            }
        }
        Outage::Ahead => OutageReport {
            down_at: None,
            down_for: Duration::ZERO,
        },
    };
    (outcome, report)
}

/// Waits until the gateway has forwarded every reading sent and its buffer is empty, printing
/// progress; false if that takes longer than `DRAIN_WITHIN`.
async fn wait_for_drain(gateway: &Gateway, watch: &mut Watch, sent: u64) -> bool {
    let deadline = Instant::now() + DRAIN_WITHIN;
    loop {
        let s = watch.observe(gateway);
        if s.buffered == 0 && s.forwarded >= sent {
            println!(">>> buffer drained");
            return true;
        }
        if Instant::now() >= deadline {
            println!(">>> buffer not drained after {} s", DRAIN_WITHIN.as_secs());
            return false;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn print_log_tail(gateway: &Gateway) {
    let log = gateway.log();
    let lines: Vec<&str> = log.lines().collect();
    println!("\n--- last lines of the gateway log ---");
    for line in &lines[lines.len().saturating_sub(30)..] {
        println!("{line}");
    }
}

/// The release profile aborts on panic, which skips the harness's `Drop`s that stop
/// nats-server and the gateway. Kill this process's children in the panic hook so a
/// failed demo leaves nothing running.
fn stop_children_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        for pid in child_pids() {
            let _ = std::process::Command::new("kill")
                .arg("-KILL")
                .arg(&pid)
                .status();
        }
    }));
}

/// Children of every thread of this process (Linux lists them per thread under /proc).
fn child_pids() -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|pids| {
            pids.split_whitespace()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect()
}
