//! Serial ports through the real binary, with pseudo-terminals as devices: line talkers in all
//! three forms with garbage mixed in; a device unplugged and plugged in again (a by-id style
//! link repointed) without a restart; a port missing at start while MQTT carries on; a reload
//! that restarts only the port whose settings changed; a full buffer (`reject_new`) that holds
//! what the port read until there is room, losing nothing.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use support::pty::{wait_port_open, SerialLink};
use support::{probe_config, probe_readings, publish_all, Gateway, Mosquitto, Nats};

/// Readings and rejections arrive within this on a loaded machine.
const WITHIN: Duration = Duration::from_secs(30);

fn port_label(port: &str) -> String {
    format!("port=\"{port}\"")
}

/// (device, sensor type, value) of each reading in the stream, in stream order.
async fn readings(nats: &Nats) -> Vec<(String, String, f64)> {
    nats.read_readings("SAHOOL_IOT")
        .await
        .iter()
        .map(|m| {
            let p = &m.body["payload"];
            (
                p["device_id"].as_str().unwrap_or_default().to_string(),
                p["sensor_type"].as_str().unwrap_or_default().to_string(),
                p["value"].as_f64().unwrap_or(f64::NAN),
            )
        })
        .collect()
}

fn wait_forwarded(gateway: &Gateway, n: usize) {
    gateway.wait_until(&format!("{n} readings forwarded"), WITHIN, |g| {
        g.metric("sahool_gateway_readings_forwarded_total", "") >= n as f64
    });
}

/// A config with one kv talker, `port`, printing `level=N` for water level sensor `tank-1`,
/// with `extra` sections.
fn tank_talker(nats: &Nats, link: &SerialLink, port: &str, extra: &str) -> String {
    format!(
        r#"
[nats]
servers = ["{nats}"]
ack_timeout = "2s"
{extra}
[[serial]]
name = "{port}"
path = "{path}"
protocol = "lines"
line_format = "kv"
device_id = "tank-1"

[[fields]]
id = "field-1"
  [[fields.sensors]]
  device_id = "tank-1"
  sensor_type = "water_level"
  line = {{ port = "{port}", key = "level" }}
"#,
        nats = nats.url(),
        path = link.path.display(),
    )
}

const TALKERS: &str = r#"
[[fields]]
id = "field-1"
  [[fields.sensors]]
  device_id = "probe-kv"
  sensor_type = "soil_temperature"
  line = { port = "kv-talker", key = "soil_t" }
  [[fields.sensors]]
  device_id = "probe-kv"
  sensor_type = "soil_moisture"
  scale = 0.1
  line = { port = "kv-talker", key = "vwc" }
  [[fields.sensors]]
  device_id = "probe-csv"
  sensor_type = "soil_temperature"
  line = { port = "csv-talker", key = "soil_t" }
  [[fields.sensors]]
  device_id = "probe-csv"
  sensor_type = "soil_moisture"
  line = { port = "csv-talker", key = "vwc" }
  [[fields.sensors]]
  device_id = "station-1"
  sensor_type = "air_temperature"
  line = { port = "json-talker", key = "temp" }
  [[fields.sensors]]
  device_id = "station-1"
  sensor_type = "air_humidity"
  line = { port = "json-talker", key = "rh" }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn line_talkers_in_three_forms_with_garbage_mixed_in() {
    let nats = Nats::with_platform_stream().await;
    let mut kv = SerialLink::plugged("usb-kv");
    let mut csv = SerialLink::plugged("usb-csv");
    let mut json = SerialLink::plugged("usb-json");
    let gateway = Gateway::start(&format!(
        r#"
[nats]
servers = ["{nats}"]

[[serial]]
name = "kv-talker"
path = "{kv}"
protocol = "lines"
line_format = "kv"
device_id = "probe-kv"
max_line = 64

[[serial]]
name = "csv-talker"
path = "{csv}"
protocol = "lines"
baud = 115200
line_format = "csv"
columns = ["device", "soil_t", "vwc"]

[[serial]]
name = "json-talker"
path = "{json}"
protocol = "lines"
line_format = "json"
{TALKERS}"#,
        nats = nats.url(),
        kv = kv.path.display(),
        csv = csv.path.display(),
        json = json.path.display(),
    ));
    for port in ["kv-talker", "csv-talker", "json-talker"] {
        wait_port_open(&gateway, port);
    }

    // A minute ago, as the device's own clock says.
    let ts = time::OffsetDateTime::now_utc().unix_timestamp() - 60;
    kv.write(b"soil_t=21.5,vwc=315\r\n");
    kv.write(b"garbage ###\n");
    kv.write(b"soil_t=\xff\xfe\n");
    kv.write(format!("{}\n", "x".repeat(100)).as_bytes());
    kv.write(b"soil_t=22.0 vwc=320 uptime=17\n");
    kv.write(b"soil_t=99\n");
    csv.write(b"device,soil_t,vwc\n");
    csv.write(b"probe-csv,18.25,40.5\n");
    csv.write(b"probe-csv,18.5\n");
    csv.write(b"ghost,1,2\n");
    csv.write(b"probe-csv,19.0,41.0\n");
    json.write(format!("{{\"temp\":24.5,\"rh\":55,\"ts\":{ts}}}\n").as_bytes());
    json.write(b"[1,2,3]\n");
    json.write(b"{\"temp\":\n");
    json.write(b"{\"temp\":\"warm\"}\n");
    json.write(b"{\"device\":\"station-1\",\"temp\":25.0,\"rh\":\"56.5\"}\n");

    wait_forwarded(&gateway, 12);
    gateway.wait_until("9 rejections", WITHIN, |g| {
        g.metric("sahool_gateway_readings_rejected_total", "") >= 9.0
    });

    let got = readings(&nats).await;
    let per_device = |device: &str| -> Vec<(String, f64)> {
        got.iter()
            .filter(|(d, _, _)| d == device)
            .map(|(_, t, v)| (t.clone(), *v))
            .collect()
    };
    let pairs = |items: &[(&str, f64)]| -> Vec<(String, f64)> {
        items.iter().map(|(t, v)| (t.to_string(), *v)).collect()
    };
    assert_eq!(
        per_device("probe-kv"),
        pairs(&[
            ("soil_temperature", 21.5),
            ("soil_moisture", 31.5),
            ("soil_temperature", 22.0),
            ("soil_moisture", 32.0)
        ]),
        "in line order, vwc scaled by 0.1: {got:?}"
    );
    assert_eq!(
        per_device("probe-csv"),
        pairs(&[
            ("soil_temperature", 18.25),
            ("soil_moisture", 40.5),
            ("soil_temperature", 19.0),
            ("soil_moisture", 41.0)
        ]),
        "{got:?}"
    );
    // A JSON line's values go in key order.
    assert_eq!(
        per_device("station-1"),
        pairs(&[
            ("air_humidity", 55.0),
            ("air_temperature", 24.5),
            ("air_humidity", 56.5),
            ("air_temperature", 25.0)
        ]),
        "{got:?}"
    );
    assert_eq!(got.len(), 12, "nothing else: {got:?}");
    let events = nats.read_readings("SAHOOL_IOT").await;
    let first_json = events
        .iter()
        .find(|e| e.body["payload"]["device_id"] == "station-1")
        .expect("a station reading");
    let expected_ts = time::OffsetDateTime::from_unix_timestamp(ts)
        .expect("ts")
        .format(&time::format_description::well_known::Rfc3339)
        .expect("format");
    assert_eq!(
        first_json.body["payload"]["timestamp"], expected_ts,
        "the line's own time"
    );
    let validator = support::event_validator();
    for e in &events {
        assert!(validator.is_valid(&e.body), "{}", e.body);
    }

    let mut by_source: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let letters = gateway.dead_letters();
    for d in &letters {
        by_source
            .entry(d["source"].as_str().unwrap_or_default().to_string())
            .or_default()
            .push(d["reason"].as_str().unwrap_or_default().to_string());
    }
    for reasons in by_source.values_mut() {
        reasons.sort();
    }
    let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(
        by_source.get("kv-talker").cloned().unwrap_or_default(),
        strings(&["malformed", "malformed", "out_of_range", "oversized"]),
        "{letters:#?}"
    );
    assert_eq!(
        by_source.get("csv-talker").cloned().unwrap_or_default(),
        strings(&["malformed", "unknown_device"]),
        "{letters:#?}"
    );
    assert_eq!(
        by_source.get("json-talker").cloned().unwrap_or_default(),
        strings(&["malformed", "malformed", "malformed"]),
        "{letters:#?}"
    );
    let raw = |needle: &str| letters.iter().any(|d| d["raw"] == needle);
    assert!(
        raw("garbage ###"),
        "the line's bytes are kept: {letters:#?}"
    );
    assert!(
        raw("736f696c5f743dfffe"),
        "bytes that are not UTF-8 are kept (shown in hex): {letters:#?}"
    );
    assert!(
        raw(&"x".repeat(64)),
        "an overlong line's first max_line bytes"
    );
    assert_eq!(
        gateway.metric(
            "sahool_gateway_serial_messages_received_total",
            &port_label("kv-talker")
        ),
        6.0
    );
    assert!(
        gateway.metric(
            "sahool_gateway_serial_bytes_received_total",
            &port_label("csv-talker")
        ) > 0.0
    );

    // The dry run shows the same as the port does.
    let out = gateway.cli(&[
        "mappings",
        "test",
        "--serial-line",
        "soil_t=21.5,vwc=315",
        "--port",
        "kv-talker",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("\"device_id\":\"probe-kv\"") && text.contains("\"value\":31.5"),
        "{text}"
    );
    let out = gateway.cli(&[
        "mappings",
        "test",
        "--serial-line",
        "probe-csv,18.5",
        "--port",
        "csv-talker",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("rejected: malformed") && text.contains("3 columns"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unplugged_device_is_opened_again_when_plugged_back_in() {
    let nats = Nats::with_platform_stream().await;
    let mut link = SerialLink::plugged("usb-FTDI_FT232R_A5069RR4-if00-port0");
    let mut gateway = Gateway::start(&tank_talker(&nats, &link, "talker", ""));
    let up = |g: &Gateway| g.metric("sahool_gateway_serial_port_up", &port_label("talker"));
    wait_port_open(&gateway, "talker");
    for i in 0..3 {
        link.write(format!("level={i}\n").as_bytes());
    }
    wait_forwarded(&gateway, 3);

    link.unplug();
    gateway.wait_until("the port noticed lost", WITHIN, |g| {
        up(g) == 0.0
            && g.metric(
                "sahool_gateway_serial_errors_total",
                "port=\"talker\",reason=\"lost\"",
            ) >= 1.0
    });
    let (code, body) = gateway.get("/readyz").expect("readyz");
    assert_eq!(
        code, 200,
        "one unplugged port does not make the gateway unready: {body}"
    );
    assert!(body.contains("serial talker: down"), "{body}");

    // Another pseudo-terminal behind the same path, as a re-plugged adapter gets another ttyUSBn.
    link.plug();
    wait_port_open(&gateway, "talker");
    assert_eq!(
        gateway.metric(
            "sahool_gateway_serial_reconnects_total",
            &port_label("talker")
        ),
        1.0
    );
    for i in 3..6 {
        link.write(format!("level={i}\n").as_bytes());
    }
    wait_forwarded(&gateway, 6);
    let values: Vec<f64> = readings(&nats).await.iter().map(|r| r.2).collect();
    assert_eq!(values, vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
    assert!(gateway.is_running(), "no restart");
    let (_, body) = gateway.get("/readyz").expect("readyz");
    assert!(body.contains("serial talker: up"), "{body}");
    assert_eq!(gateway.log().matches("serial port open").count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_missing_at_start_does_not_stop_mqtt_and_opens_once_plugged_in() {
    let nats = Nats::with_platform_stream().await;
    let broker = Mosquitto::start();
    let mut late = SerialLink::unplugged("usb-late");
    // A pseudo-terminal has no RS-485 mode: that port stays down, and says why.
    let rs485 = SerialLink::plugged("usb-rs485");
    let config = probe_config(&nats, &broker, "", "")
        + &format!(
            r#"
  [[fields.sensors]]
  device_id = "probe-late"
  sensor_type = "water_level"
  line = {{ port = "late", key = "level" }}

[[serial]]
name = "late"
path = "{late}"
protocol = "lines"
line_format = "kv"
device_id = "probe-late"

[[serial]]
name = "bus"
path = "{rs485}"
protocol = "lines"
line_format = "kv"
rs485 = {{ rts_on_send = true }}
"#,
            late = late.path.display(),
            rs485 = rs485.path.display()
        );
    let gateway = Gateway::start(&config);
    gateway.wait_subscribed(1).await;
    assert_eq!(
        publish_all(broker.port, "p1", probe_readings(0..20)).await,
        20
    );
    wait_forwarded(&gateway, 20);
    gateway.wait_until("both ports reported down", WITHIN, |g| {
        g.metric(
            "sahool_gateway_serial_errors_total",
            "port=\"late\",reason=\"missing\"",
        ) >= 1.0
            && g.metric(
                "sahool_gateway_serial_errors_total",
                "port=\"bus\",reason=\"rs485\"",
            ) >= 1.0
    });
    let (code, body) = gateway.get("/readyz").expect("readyz");
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("serial late: down") && body.contains("no such device"),
        "{body}"
    );
    assert!(
        body.contains("serial bus: down") && body.contains("RS-485"),
        "{body}"
    );

    late.plug();
    wait_port_open(&gateway, "late");
    late.write(b"level=7\n");
    wait_forwarded(&gateway, 21);
    let got = readings(&nats).await;
    assert_eq!(
        got.last(),
        Some(&("probe-late".to_string(), "water_level".to_string(), 7.0))
    );
    assert_eq!(
        got.iter().filter(|r| r.0 == "probe-1").count(),
        20,
        "every MQTT reading"
    );
    assert_eq!(
        gateway.metric(
            "sahool_gateway_serial_reconnects_total",
            &port_label("late")
        ),
        0.0,
        "a first open is not a reconnect"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_restarts_only_the_port_whose_settings_changed() {
    let nats = Nats::with_platform_stream().await;
    let mut a = SerialLink::plugged("usb-a");
    let mut b = SerialLink::plugged("usb-b");
    let (a_path, b_path) = (a.path.clone(), b.path.clone());
    let config = |b_form: &str| {
        format!(
            r#"
[nats]
servers = ["{nats}"]

[[serial]]
name = "a"
path = "{a}"
protocol = "lines"
line_format = "kv"
device_id = "probe-a"

[[serial]]
name = "b"
path = "{b}"
protocol = "lines"
device_id = "probe-b"
{b_form}

[[fields]]
id = "field-1"
  [[fields.sensors]]
  device_id = "probe-a"
  sensor_type = "water_level"
  line = {{ port = "a", key = "level" }}
  [[fields.sensors]]
  device_id = "probe-b"
  sensor_type = "water_level"
  line = {{ port = "b", key = "level" }}
"#,
            nats = nats.url(),
            a = a_path.display(),
            b = b_path.display(),
        )
    };
    let mut gateway = Gateway::start(&config("line_format = \"kv\""));
    wait_port_open(&gateway, "a");
    wait_port_open(&gateway, "b");
    a.write(b"level=1\n");
    b.write(b"level=2\n");
    wait_forwarded(&gateway, 2);

    gateway.rewrite_config(&config("line_format = \"csv\"\ncolumns = [\"level\"]"));
    gateway.signal("HUP");
    gateway.wait_until("reloaded", WITHIN, |g| g.log().contains("config reloaded"));
    wait_port_open(&gateway, "b");
    a.write(b"level=3\n");
    b.write(b"level\n4\n");
    wait_forwarded(&gateway, 4);

    let values: Vec<(String, f64)> = readings(&nats)
        .await
        .into_iter()
        .map(|(d, _, v)| (d, v))
        .collect();
    let of = |device: &str| -> Vec<f64> {
        values
            .iter()
            .filter(|(d, _)| d == device)
            .map(|(_, v)| *v)
            .collect()
    };
    assert_eq!(of("probe-a"), vec![1.0, 3.0]);
    assert_eq!(of("probe-b"), vec![2.0, 4.0], "b reads CSV now");
    let log = gateway.log();
    let opens = |port: &str| {
        log.lines()
            .filter(|l| l.contains("serial port open") && l.contains(&format!("port={port} ")))
            .count()
    };
    assert_eq!(opens("a"), 1, "a kept its device open:\n{log}");
    assert_eq!(opens("b"), 2, "b was restarted:\n{log}");
    assert_eq!(gateway.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_buffer_holds_what_the_port_read_and_loses_none() {
    let n = 400;
    let mut nats = Nats::with_platform_stream().await;
    let mut link = SerialLink::plugged("usb-tank");
    let gateway = Gateway::start(&tank_talker(
        &nats,
        &link,
        "tank",
        r#"
[buffer]
max_bytes = "16KiB"
when_full = "reject_new"
min_free_disk = "1MiB"

# One talker stands in for a busy bus: no flood limits.
[quality]
device_rate = 1000000.0
device_burst = 1000000.0
source_rate = 1000000.0
source_burst = 1000000.0
"#,
    ));
    wait_port_open(&gateway, "tank");
    nats.stop();
    // About 4 KB: the pseudo-terminal holds what the gateway does not read meanwhile.
    for i in 0..n {
        link.write(format!("level={i}\n").as_bytes());
    }
    gateway.wait_until("intake paused at the bound", WITHIN, |g| {
        g.metric("sahool_gateway_intake_paused", "") == 1.0
    });
    let buffered = gateway.metric("sahool_gateway_buffer_readings", "") as usize;
    assert!(
        buffered > 0 && buffered < n,
        "the buffer holds {buffered}; the port holds the rest"
    );
    assert_eq!(
        gateway.metric("sahool_gateway_serial_port_up", &port_label("tank")),
        1.0
    );

    nats.resume();
    gateway.wait_until("all forwarded", Duration::from_secs(120), |g| {
        g.metric("sahool_gateway_readings_forwarded_total", "") >= n as f64
    });
    let values: Vec<f64> = readings(&nats).await.iter().map(|r| r.2).collect();
    let expected: Vec<f64> = (0..n).map(|i| i as f64).collect();
    assert_eq!(values, expected, "every line once, in order");
    assert_eq!(
        gateway.metric("sahool_gateway_readings_dropped_total", ""),
        0.0
    );
    assert_eq!(
        gateway.metric("sahool_gateway_readings_rejected_total", ""),
        0.0
    );
}
