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
