//! The downlink step (DESIGN §8): two irrigation valves on a simulated Modbus RTU bus (a
//! pseudo-terminal), driven by commands the platform publishes while the farm's uplink is cut.
//! JetStream keeps them; when the link comes back the gateway applies the one still valid
//! (confirmed by reading the coil back, and switched off again when its `duration_s` ends) and
//! refuses the one whose `expires_at` passed on the way, without touching its coil.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use time::OffsetDateTime;

use crate::support::commands::{
    check_results, command_at, id_of, publish_command, read_results, statuses, Uplink,
};
use crate::support::pty::Pty;
use crate::support::sim_modbus::{SimBus, Slave};
use crate::support::{Nats, StreamMessage};

/// The `[[serial]]` port the valves hang on.
pub const BUS: &str = "valves";
/// A field of their own: the valves water it, no sensor of the demo sits in it.
const FIELD: &str = "field-orchard-5";
const UNIT: u8 = 3;
/// Opened while the link is down, valid for two minutes: applied on reconnect.
const KEPT: (&str, u16) = ("valve-3", 0);
/// Opened while the link is down, valid for 3 s: expired by the time the link is back.
const STALE: (&str, u16) = ("valve-4", 1);
/// valve-3 runs this long, then the gateway closes it on its own.
const RUN_FOR_S: i64 = 5;
const LINK_DOWN_FOR: Duration = Duration::from_secs(6);
const WITHIN: Duration = Duration::from_secs(60);

/// The bus with both valves closed, its far end on `pty`.
pub fn spawn_bus(pty: Pty) -> SimBus {
    SimBus::spawn(
        pty.into_async(),
        vec![Slave::new(UNIT).coil(KEPT.1, false).coil(STALE.1, false)],
    )
}

/// The port, `[commands]` and the valves, for the gateway's config.
pub fn gateway_config(bus_path: &std::path::Path) -> String {
    format!(
        r#"
[commands]
enabled = true
# A demo machine often runs no time service, and the kernel then calls its clock
# unsynchronised: on a gateway, keep the default (true) and run one.
require_clock_sync = false

[[serial]]
name = "{BUS}"
path = "{path}"
protocol = "modbus-rtu"
baud = 19200
timeout = "200ms"

[[fields]]
id = "{FIELD}"
  [[fields.actuators]]
  id = "{kept}"
  kind = "switch"
  max_on = "2h"
  modbus = {{ port = "{BUS}", unit = {UNIT}, coil = {kept_coil} }}
  [[fields.actuators]]
  id = "{stale}"
  kind = "switch"
  max_on = "2h"
  modbus = {{ port = "{BUS}", unit = {UNIT}, coil = {stale_coil} }}
"#,
        path = bus_path.display(),
        kept = KEPT.0,
        kept_coil = KEPT.1,
        stale = STALE.0,
        stale_coil = STALE.1,
    )
}

pub fn print_setup(bus_path: &std::path::Path) {
    println!(
        "  valves bus     {}  ([[serial]] {BUS}, modbus-rtu: {} coil {}, {} coil {} at unit {UNIT})",
        bus_path.display(),
        KEPT.0,
        KEPT.1,
        STALE.0,
        STALE.1
    );
}

/// One command's fate, for the summary.
pub struct Row {
    actuator: &'static str,
    valid_for: &'static str,
    statuses: Vec<String>,
    writes: u32,
    coil_now: Option<bool>,
    expected: &'static [&'static str],
    expected_writes: u32,
}

pub struct Report {
    rows: Vec<Row>,
    link_down_for: Duration,
    applied_after_link_back: Option<Duration>,
}

/// Cuts the uplink, has the platform publish both commands, restores the link and waits for
/// every result (and valve-3's automatic close).
pub async fn run(nats: &Nats, uplink: &Uplink, bus: &SimBus) -> Report {
    println!(
        "\n== Downlink: the farm's uplink is cut for {} s; meanwhile the platform opens {} for {RUN_FOR_S} s \
         (valid 2 min) and {} (valid 3 s) ==",
        LINK_DOWN_FOR.as_secs(),
        KEPT.0,
        STALE.0
    );
    uplink.cut();
    let now = OffsetDateTime::now_utc();
    let mut kept = command_at(FIELD, KEPT.0, "on", now, now + time::Duration::minutes(2));
    kept["payload"]["duration_s"] = json!(RUN_FOR_S);
    let stale = command_at(FIELD, STALE.0, "on", now, now + time::Duration::seconds(3));
    for command in [&kept, &stale] {
        publish_command(nats.client().await, command, id_of(command), WITHIN).await;
    }
    println!(">>> both commands queued in SAHOOL_COMMANDS; the gateway cannot see them yet");
    tokio::time::sleep(LINK_DOWN_FOR).await;
    uplink.restore();
    let back = Instant::now();
    println!(">>> uplink restored: the gateway's consumer fetches what was queued");
    let applied = wait_for(nats, "valve-3 applied, valve-4 expired", |r| {
        final_is(r, &kept, "applied") && final_is(r, &stale, "expired")
    })
    .await;
    let applied_after_link_back = applied.then(|| back.elapsed());
    println!(
        ">>> {} applied and confirmed by reading the coil back; {} refused as expired",
        KEPT.0, STALE.0
    );
    wait_for(nats, "valve-3 switched off after duration_s", |r| {
        statuses(r, id_of(&kept))
            .iter()
            .any(|s| s == "switched_off")
    })
    .await;
    println!(
        ">>> {} switched off by the gateway after {RUN_FOR_S} s",
        KEPT.0
    );
    let results = read_results(nats.client().await).await;
    // Every result valid against the contract, once per (command, status), in order.
    check_results(&results);
    let row = |(actuator, coil): (&'static str, u16),
               command: &Value,
               valid_for,
               expected,
               expected_writes| Row {
        actuator,
        valid_for,
        statuses: statuses(&results, id_of(command)),
        writes: bus.coil_writes(UNIT, coil),
        coil_now: bus.coil_state(UNIT, coil),
        expected,
        expected_writes,
    };
    Report {
        rows: vec![
            row(
                KEPT,
                &kept,
                "2 min",
                &["accepted", "applied", "switched_off"],
                2,
            ),
            row(STALE, &stale, "3 s", &["expired"], 0),
        ],
        link_down_for: LINK_DOWN_FOR,
        applied_after_link_back,
    }
}

fn final_is(results: &[StreamMessage], command: &Value, status: &str) -> bool {
    statuses(results, id_of(command))
        .iter()
        .any(|s| s == status)
}

/// Polls the results until `done`; false after [`WITHIN`].
async fn wait_for(nats: &Nats, what: &str, done: impl Fn(&[StreamMessage]) -> bool) -> bool {
    let deadline = Instant::now() + WITHIN;
    loop {
        if done(&read_results(nats.client().await).await) {
            return true;
        }
        if Instant::now() >= deadline {
            println!(">>> not within {} s: {what}", WITHIN.as_secs());
            return false;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Prints the table and the checks; true when every check passed.
pub fn print(report: &Report) -> bool {
    println!(
        "\n== Downlink summary (uplink down {} s) ==",
        report.link_down_for.as_secs()
    );
    println!(
        "  {:<8} {:>9}  {:<34} {:>11}  coil now",
        "valve", "valid for", "results", "coil writes"
    );
    let mut passed = true;
    for r in &report.rows {
        println!(
            "  {:<8} {:>9}  {:<34} {:>11}  {}",
            r.actuator,
            r.valid_for,
            r.statuses.join(" → "),
            r.writes,
            match r.coil_now {
                Some(true) => "on",
                Some(false) => "off",
                None => "?",
            }
        );
        passed &=
            r.statuses == r.expected && r.writes == r.expected_writes && r.coil_now == Some(false);
    }
    let check = |ok: bool, label: &str, value: String| {
        println!(
            "  {:<6} {:<40} {value}",
            if ok { "ok" } else { "FAIL" },
            label
        );
    };
    check(
        passed,
        "each command applied at most once",
        "valve-3 on then off (2 writes), valve-4 never written".into(),
    );
    check(
        report.applied_after_link_back.is_some(),
        "queued command applied on reconnect",
        report
            .applied_after_link_back
            .map(|d| format!("{:.1} s after the link came back", d.as_secs_f64()))
            .unwrap_or_else(|| "not applied".into()),
    );
    let passed = passed && report.applied_after_link_back.is_some();
    println!(
        "\n{}",
        if passed {
            "PASS: the command still valid was applied once on reconnect, the expired one never written"
        } else {
            "FAIL: see the downlink checks above"
        }
    );
    passed
}
