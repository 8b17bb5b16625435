//! The command line through the real binary: `validate` on every shipped config and on broken
//! ones, `--version`, and the buffer commands on a buffer that does not exist yet.

mod support;

use std::path::Path;
use std::process::Command;

fn gateway(args: &[&str]) -> std::process::Output {
    Command::new(support::gateway_binary())
        .args(args)
        .output()
        .expect("run the gateway binary")
}

#[test]
fn every_shipped_config_validates() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("config/ exists") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") || is_server_config(&path) {
            continue;
        }
        let out = gateway(&["validate", "--config", path.to_str().expect("utf-8 path")]);
        assert!(
            out.status.success(),
            "{} does not validate:\n{}{}",
            path.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        checked += 1;
    }
    assert!(checked >= 1, "config/ holds at least the example");
}

/// NATS or MQTT server configs shipped as examples are not gateway configs.
fn is_server_config(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("nats-server") || n.starts_with("mosquitto"))
}

#[test]
fn validate_lists_every_problem_with_its_line_and_exits_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        r#"[gateway]
id = "gw-1"
tenant_id = "t"
colour = "green"

[nats]
servers = ["nats://nats.example:4222"]

[buffer]
max_bytes = "lots"

[[fields]]
id = "f"
  [[fields.sensors]]
  device_id = "d"
  sensor_type = "soil_moisture"
  scale = 0.0
"#,
    )
    .expect("write");
    let out = gateway(&["validate", "--config", path.to_str().expect("path")]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("line 4") && text.contains("colour"), "{text}");
    assert!(text.contains("line 10") && text.contains("lots"), "{text}");
    assert!(
        text.contains("plaintext") && text.contains("allow_insecure"),
        "{text}"
    );
    assert!(text.contains("line 14") && text.contains("scale"), "{text}");
}

#[test]
fn validate_reports_a_missing_file_clearly() {
    let out = gateway(&["validate", "--config", "/nonexistent/gateway.toml"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/gateway.toml"), "{err}");
}

#[test]
fn version_names_the_package() {
    let out = gateway(&["--version"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("sahool-gateway {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn buffer_stats_before_first_run_says_what_is_wrong() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gw.toml");
    std::fs::write(
        &path,
        format!(
            "[gateway]\nid = \"g\"\ntenant_id = \"t\"\ndata_dir = \"{}\"\n[nats]\nservers = [\"nats://127.0.0.1:4222\"]\n",
            dir.path().join("data").display()
        ),
    )
    .expect("write");
    let out = gateway(&["buffer", "stats", "--config", path.to_str().expect("path")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("has the gateway run"));
}

/// The example config's commented serial ports, serial sensors, `[commands]` and actuators
/// (each a run of comment lines from `# [[serial]]`, `# [[fields.sensors]]`, `# [commands]` or
/// `# [[fields.actuators]]` on, with `# # ` for their own comments) validate once uncommented,
/// so an operator can start from them.
#[test]
fn the_example_serial_sections_validate_uncommented() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/gateway.example.toml");
    let text = std::fs::read_to_string(&example).expect("the example config");
    let mut uncommented = Vec::new();
    let mut in_example = false;
    for line in text.lines() {
        let body = line.trim_start();
        let indent = &line[..line.len() - body.len()];
        if [
            "# [[serial]]",
            "# [[fields.sensors]]",
            "# [commands]",
            "# [[fields.actuators]]",
        ]
        .contains(&body)
        {
            in_example = true;
        }
        in_example &= body.starts_with('#');
        if in_example {
            let rest = body
                .strip_prefix("# ")
                .unwrap_or(body.trim_start_matches('#'));
            uncommented.push(format!("{indent}{rest}"));
        } else {
            uncommented.push(line.to_string());
        }
    }
    let uncommented = uncommented.join("\n");
    let config = sahool_gateway::config::parse(&uncommented)
        .unwrap_or_else(|problems| panic!("{problems:?}\n{uncommented}"));
    let ports: Vec<String> = config
        .serial
        .iter()
        .map(|p| format!("{} {}", p.name.as_str(), p.protocol))
        .collect();
    assert_eq!(
        ports,
        [
            "talker lines",
            "rs485-1 modbus-rtu",
            "sdi12-usb sdi12",
            "nodes frames"
        ],
        "every protocol has an example"
    );
    let bound: usize = config
        .fields
        .iter()
        .flat_map(|f| &f.sensors)
        .filter(|s| s.serial_binding().is_some())
        .count();
    assert_eq!(bound, 7, "{uncommented}");
    assert!(config.commands.enabled, "{uncommented}");
    let actuators: Vec<&str> = config
        .fields
        .iter()
        .flat_map(|f| &f.actuators)
        .map(|a| a.id.as_str())
        .collect();
    assert_eq!(actuators, ["pump-1", "valve-3", "dosing-1"]);

    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("uncommented.toml");
    std::fs::write(&path, &uncommented).expect("write");
    let out = gateway(&["validate", "--config", path.to_str().expect("path")]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A gateway with a pump and a dosing setpoint on a Modbus bus, its buffer under `dir`.
const ACTUATORS_CONFIG: &str = r#"
gateway = { id = "gw-1", tenant_id = "tenant-a", data_dir = "DATA" }
nats = { servers = ["nats://127.0.0.1:4222"] }
serial = [{ name = "rs485-1", path = "/dev/ttyUSB0", protocol = "modbus-rtu" }]

[[fields]]
id = "f-1"
actuators = [
  { id = "pump-1", kind = "switch", max_on = "2h", modbus = { port = "rs485-1", unit = 7, coil = 0 } },
  { id = "dosing-1", kind = "setpoint", range = [0.0, 100.0], modbus = { port = "rs485-1", unit = 7, register = 10, type = "u16", scale = 0.1 } },
]
"#;

mod downlink_cli {
    use std::sync::Arc;

    use sahool_gateway::downlink::{Command, CommandResult, Deadline, Restored, Status, Value};
    use sahool_gateway::reading::Timestamp;
    use sahool_gateway::store::{self, InboxCommand, ResultRow};

    pub(super) const T0: i64 = 1_780_287_300_000;
    pub(super) const PUMP_ON: &str = "00000000-0000-4000-8000-00000000000a";
    pub(super) const DOSE: &str = "00000000-0000-4000-8000-00000000000b";
    pub(super) const PUMP_OFF: &str = "00000000-0000-4000-8000-00000000000c";

    /// A command message for gw-1, received `n` seconds after `T0`.
    fn command(id: &str, actuator: &str, payload: serde_json::Value, n: i64) -> InboxCommand {
        let mut p = serde_json::json!({
            "command_id": id, "gateway_id": "gw-1", "field_id": "f-1", "actuator_id": actuator,
            "issued_at": "2026-06-01T04:15:00Z", "expires_at": "2099-01-01T00:00:00Z"
        });
        for (k, v) in payload.as_object().expect("an object") {
            p[k] = v.clone();
        }
        let raw = serde_json::to_vec(&serde_json::json!({
            "event_id": "5f0c6f1e-8a43-4a5e-9c59-1b7c1f0e2a11", "event_type": "actuator_command",
            "version": 1, "aggregate_id": "f-1", "tenant_id": "tenant-a",
            "correlation_id": format!("corr-{id}"), "timestamp": "2026-06-01T04:15:00Z",
            "payload": p
        }))
        .expect("json");
        let c = Command::parse(&raw, "gw-1").expect("a valid command");
        InboxCommand::new(&c, raw, Timestamp::from_unix_millis(T0 + n * 1000))
    }

    fn result(id: &str, actuator: &str, status: Status, value: Value) -> ResultRow {
        ResultRow {
            result: CommandResult {
                command_id: id.into(),
                actuator_id: actuator.into(),
                field_id: "f-1".into(),
                status,
                reason: (status == Status::Rejected)
                    .then_some(sahool_gateway::downlink::Reason::OutOfRange),
                requested: Some(value),
                readback: (status == Status::Applied).then_some(value),
                at: Timestamp::from_unix_millis(T0 + 5_000),
            },
            tenant_id: "tenant-a".into(),
            correlation_id: String::new(),
        }
    }

    /// The pump switched on with a deadline and applied, the dosing refused, an off queued.
    pub(super) async fn populate(config: &std::path::Path) {
        let c = sahool_gateway::config::load(config).expect("config");
        let metrics = Arc::new(sahool_gateway::common::metrics::Metrics::new());
        let (s, thread) =
            store::start(c.store_path(), c.buffer.clone(), 20.0, metrics).expect("start the store");
        let on = serde_json::json!({"action": "on", "duration_s": 300});
        let set = serde_json::json!({"action": "set", "value": 700.0});
        s.command_received(command(PUMP_ON, "pump-1", on, 1))
            .await
            .expect("received");
        s.command_received(command(DOSE, "dosing-1", set, 2))
            .await
            .expect("received");
        let running = Restored {
            newest_written: Timestamp::parse_rfc3339("2026-06-01T04:15:00Z"),
            deadline: Some(Deadline {
                at: Timestamp::parse_rfc3339("2026-06-01T04:20:00Z").expect("time"),
                command_id: PUMP_ON.into(),
                run_since: Timestamp::from_unix_millis(T0),
            }),
            off_since: None,
        };
        let on = Value::Switch(true);
        let pump = Some(("pump-1".to_string(), running));
        for status in [Status::Accepted, Status::Applied] {
            let r = result(PUMP_ON, "pump-1", status, on);
            assert!(s.command_result(r, pump.clone()).await.expect("result"));
        }
        let refused = result(DOSE, "dosing-1", Status::Rejected, Value::Number(700.0));
        assert!(s.command_result(refused, None).await.expect("result"));
        let off = serde_json::json!({"action": "off"});
        s.command_received(command(PUMP_OFF, "pump-1", off, 3))
            .await
            .expect("received");
        drop(s);
        tokio::task::spawn_blocking(move || thread.join().expect("store thread"))
            .await
            .expect("join");
    }
}

#[tokio::test]
async fn actuators_and_commands_list_show_the_inbox() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gw.toml");
    let data = dir.path().join("data");
    let config = ACTUATORS_CONFIG.replace("DATA", data.to_str().expect("utf-8 path"));
    std::fs::write(&path, config).expect("write");
    let config = path.to_str().expect("path");
    downlink_cli::populate(&path).await;

    let out = gateway(&["actuators", "--config", config]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = |id: &str| {
        text.lines()
            .find(|l| l.contains(id))
            .unwrap_or_default()
            .to_string()
    };
    let pump = line("pump-1");
    for needle in [
        "f-1",
        " on ",
        downlink_cli::PUMP_ON,
        "applied",
        "2026-06-01T04:20:00Z",
    ] {
        assert!(pump.contains(needle), "{needle}: {text}");
    }
    let dose = line("dosing-1");
    for needle in ["unknown", downlink_cli::DOSE, "rejected (out_of_range)"] {
        assert!(dose.contains(needle), "{needle}: {text}");
    }

    let out = gateway(&["commands", "list", "--config", config, "--limit", "2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(rows.len(), 2, "--limit 2");
    assert_eq!(
        (
            &rows[0]["command_id"],
            &rows[0]["action"],
            &rows[0]["state"],
            &rows[0]["status"]
        ),
        (
            &downlink_cli::PUMP_OFF.into(),
            &"off".into(),
            &"queued".into(),
            &serde_json::Value::Null
        )
    );
    assert_eq!(
        (
            &rows[1]["command_id"],
            &rows[1]["value"],
            &rows[1]["state"],
            &rows[1]["reason"]
        ),
        (
            &downlink_cli::DOSE.into(),
            &700.0.into(),
            &"done".into(),
            &"out_of_range".into()
        )
    );
    // Three results buffered (accepted, applied, rejected), none of them a reading.
    let out = gateway(&["buffer", "stats", "--config", config, "--json"]);
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stats JSON");
    assert_eq!(
        (&stats["command_results"], &stats["readings"]),
        (&3.into(), &0.into())
    );
    assert_eq!(stats["accepted"], 0);
    let received = downlink_cli::T0 + 3_000;
    assert_eq!(
        rows[0]["received_at"],
        sahool_gateway::reading::Timestamp::from_unix_millis(received).to_rfc3339()
    );
}
