//! The polled serial protocols through the real binary, with simulated devices on the far end of
//! pseudo-terminals and a real nats-server: a Modbus RTU bus with good, silent, corrupt,
//! refusing and NaN-reporting slaves; SDI-12 sensors with service requests, CRCs, a corrupt
//! sensor and a binding past the last value; a Modbus adapter unplugged and plugged in again.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;
use support::pty::{wait_port_open, SerialLink};
use support::sim_modbus::{words32, Behaviour, SimBus, Slave};
use support::sim_sdi12::{self, Sensor, SimSdi12};
use support::{Gateway, Nats};

/// Anything a test waits for arrives within this on a loaded machine.
const WITHIN: Duration = Duration::from_secs(60);

/// One reading event's payload, as the platform receives it.
#[derive(Debug, Clone)]
struct Got {
    device: String,
    sensor_type: String,
    value: f64,
    unit: String,
    timestamp: String,
    raw_value: Option<f64>,
}

async fn readings(nats: &Nats) -> Vec<Got> {
    nats.read_readings("SAHOOL_IOT")
        .await
        .iter()
        .map(|m| {
            let p = &m.body["payload"];
            let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
            Got {
                device: text(&p["device_id"]),
                sensor_type: text(&p["sensor_type"]),
                value: p["value"].as_f64().unwrap_or(f64::NAN),
                unit: text(&p["unit"]),
                timestamp: text(&p["timestamp"]),
                raw_value: p["metadata"]["raw_value"].as_f64(),
            }
        })
        .collect()
}

/// Readings of one sensor, in stream order.
fn of<'a>(got: &'a [Got], device: &str, sensor_type: &str) -> Vec<&'a Got> {
    got.iter()
        .filter(|g| g.device == device && g.sensor_type == sensor_type)
        .collect()
}

/// `reason → count` of the dead-letters from `source`.
fn dead_letter_reasons(letters: &[Value], source: &str) -> BTreeMap<String, usize> {
    let mut reasons = BTreeMap::new();
    for d in letters.iter().filter(|d| d["source"] == source) {
        *reasons
            .entry(d["reason"].as_str().unwrap_or_default().to_string())
            .or_insert(0) += 1;
    }
    reasons
}

/// Bytes as `dead-letters list` shows them: as text if UTF-8, else in hex.
fn shown(raw: &[u8]) -> String {
    String::from_utf8(raw.to_vec())
        .unwrap_or_else(|_| raw.iter().map(|b| format!("{b:02x}")).collect())
}

fn close_to(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

/// Readings of every good sensor arrive at least `rounds` times.
async fn wait_rounds(nats: &Nats, gateway: &Gateway, sensors: &[(&str, &str)], rounds: usize) {
    let deadline = std::time::Instant::now() + WITHIN;
    loop {
        let got = readings(nats).await;
        if sensors.iter().all(|(d, t)| of(&got, d, t).len() >= rounds) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not {rounds} rounds of {sensors:?} within {WITHIN:?}: {got:#?}\n{}",
            gateway.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The gateway with one `[[serial]]` port, `name` on `link`: `port` holds the port's other
/// keys, `fields` the sensors.
fn start_with_port(
    nats: &Nats,
    link: &SerialLink,
    name: &str,
    port: &str,
    fields: &str,
) -> Gateway {
    Gateway::start(&format!(
        "[nats]\nservers = [\"{}\"]\n\n[[serial]]\nname = \"{name}\"\npath = \"{}\"\n{port}\n{fields}",
        nats.url(),
        link.path.display()
    ))
}

fn modbus_count(gateway: &Gateway, unit: u8, outcome: &str) -> f64 {
    gateway.metric(
        "sahool_gateway_modbus_requests_total",
        &format!("port=\"bus\",unit=\"{unit}\",outcome=\"{outcome}\""),
    )
}

const MODBUS_SENSORS: &str = r#"
[[fields]]
id = "field-1"
  # An RS-485 soil probe: moisture ×0.1 (u16), temperature ×0.1 (i16).
  [[fields.sensors]]
  device_id = "soil-1"
  sensor_type = "soil_moisture"
  modbus = { port = "bus", unit = 1, register = 0, type = "u16", scale = 0.1 }
  [[fields.sensors]]
  device_id = "soil-1"
  sensor_type = "soil_temperature"
  modbus = { port = "bus", unit = 1, register = 1, type = "i16", scale = 0.1 }
  # A weather station: a float in little word order, a u32 beyond 16 bits (polled on its own
  # interval), and a float the station reports as NaN.
  [[fields.sensors]]
  device_id = "wx-5"
  sensor_type = "air_temperature"
  modbus = { port = "bus", unit = 5, register = 0, kind = "input", type = "f32", word_order = "little" }
  [[fields.sensors]]
  device_id = "wx-5"
  sensor_type = "atmospheric_pressure"
  modbus = { port = "bus", unit = 5, register = 2, kind = "input", type = "u32", scale = 0.01, poll_interval = "700ms" }
  [[fields.sensors]]
  device_id = "wx-5"
  sensor_type = "air_humidity"
  modbus = { port = "bus", unit = 5, register = 4, kind = "input", type = "f32" }
  # Slaves that fail: silent, corrupt, refusing.
  [[fields.sensors]]
  device_id = "dead-2"
  sensor_type = "soil_moisture"
  modbus = { port = "bus", unit = 2, register = 0 }
  [[fields.sensors]]
  device_id = "crc-3"
  sensor_type = "soil_moisture"
  modbus = { port = "bus", unit = 3, register = 0 }
  [[fields.sensors]]
  device_id = "exc-4"
  sensor_type = "soil_moisture"
  modbus = { port = "bus", unit = 4, register = 0 }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modbus_bus_good_slaves_read_and_scaled_faulty_ones_counted_not_flooding() {
    let started = time::OffsetDateTime::now_utc();
    let nats = Nats::with_platform_stream().await;
    let mut link = SerialLink::plugged("usb-FTDI_USB-RS485_Cable_FT1X2Y3Z-if00-port0");
    let bus = SimBus::spawn(
        link.take_pty().into_async(),
        vec![
            Slave::new(1).holding(0, &[315, (-45i16) as u16]),
            Slave::new(5)
                .input(0, &words32(23.75f32.to_bits(), true))
                .input(2, &words32(101_325, false))
                .input(4, &words32(f32::NAN.to_bits(), false)),
            Slave::new(2).holding(0, &[1]).behaving(Behaviour::Silent),
            Slave::new(3).holding(0, &[1]).behaving(Behaviour::BadCrc),
            Slave::new(4)
                .holding(0, &[1])
                .behaving(Behaviour::Exception(0x02)),
        ],
    );
    let gateway = start_with_port(
        &nats,
        &link,
        "bus",
        r#"
protocol = "modbus-rtu"
baud = 19200
timeout = "200ms"
poll_interval = "300ms"
"#,
        MODBUS_SENSORS,
    );

    let good = [
        ("soil-1", "soil_moisture"),
        ("soil-1", "soil_temperature"),
        ("wx-5", "air_temperature"),
        ("wx-5", "atmospheric_pressure"),
    ];
    wait_rounds(&nats, &gateway, &good, 3).await;
    gateway.wait_until("three rounds of every fault counted", WITHIN, |g| {
        modbus_count(g, 2, "timeout") >= 3.0
            && modbus_count(g, 3, "crc") >= 3.0
            && modbus_count(g, 4, "exception") >= 3.0
            && g.metric(
                "sahool_gateway_serial_errors_total",
                "port=\"bus\",reason=\"not_finite\"",
            ) >= 3.0
    });
    // The good slaves keep being read while the others fail.
    let before = of(&readings(&nats).await, "soil-1", "soil_moisture").len();
    wait_rounds(&nats, &gateway, &[("soil-1", "soil_moisture")], before + 3).await;

    let got = readings(&nats).await;
    let expect = |device, sensor_type, value: f64, unit: &str, raw: Option<f64>| {
        let all = of(&got, device, sensor_type);
        assert!(!all.is_empty(), "{device} {sensor_type}: {got:#?}");
        for g in &all {
            assert!(
                close_to(g.value, value) && g.unit == unit,
                "{device} {sensor_type}: {g:?}, expected {value} {unit}"
            );
            assert_eq!(g.raw_value.is_some(), raw.is_some(), "{g:?}");
            if let (Some(r), Some(expected)) = (g.raw_value, raw) {
                assert!(close_to(r, expected), "{g:?}");
            }
        }
    };
    expect("soil-1", "soil_moisture", 31.5, "%", Some(315.0));
    expect("soil-1", "soil_temperature", -4.5, "°C", Some(-45.0));
    expect("wx-5", "air_temperature", 23.75, "°C", None);
    expect(
        "wx-5",
        "atmospheric_pressure",
        1013.25,
        "hPa",
        Some(101_325.0),
    );
    for (device, sensor_type) in [
        ("wx-5", "air_humidity"),
        ("dead-2", "soil_moisture"),
        ("crc-3", "soil_moisture"),
        ("exc-4", "soil_moisture"),
    ] {
        assert!(
            of(&got, device, sensor_type).is_empty(),
            "no reading from a failing point: {device} {sensor_type}"
        );
    }
    // Each value is observed when its answer arrived: after the start, one time per poll.
    let times: Vec<time::OffsetDateTime> = of(&got, "soil-1", "soil_moisture")
        .iter()
        .map(|g| {
            time::OffsetDateTime::parse(
                &g.timestamp,
                &time::format_description::well_known::Rfc3339,
            )
            .expect("RFC 3339")
        })
        .collect();
    assert!(times[0] > started, "{times:?}");
    assert!(times.windows(2).all(|w| w[0] < w[1]), "{times:?}");
    let validator = support::event_validator();
    for e in nats.read_readings("SAHOOL_IOT").await {
        assert!(validator.is_valid(&e.body), "{}", e.body);
    }

    // The requests: the good slaves answered, the failures are counted by slave and reason.
    assert!(modbus_count(&gateway, 1, "ok") >= 6.0);
    assert!(modbus_count(&gateway, 5, "ok") >= 6.0);
    for (unit, outcome) in [(2, "ok"), (3, "ok"), (4, "ok"), (1, "timeout"), (5, "crc")] {
        assert_eq!(
            modbus_count(&gateway, unit, outcome),
            0.0,
            "{unit} {outcome}"
        );
    }
    assert!(gateway.metric("sahool_gateway_serial_bytes_received_total", "port=\"bus\"") > 0.0);

    // Bad input is dead-lettered with its bytes, once per slave and reason in ten minutes
    // however often it recurs; silence is only counted.
    let letters = gateway.dead_letters();
    let reasons = dead_letter_reasons(&letters, "bus");
    let expected: BTreeMap<String, usize> =
        [("malformed", 1), ("missing_value", 1), ("not_finite", 1)]
            .into_iter()
            .map(|(r, n)| (r.to_string(), n))
            .collect();
    assert_eq!(reasons, expected, "{letters:#?}");
    let find = |reason: &str| {
        letters
            .iter()
            .find(|d| d["reason"] == reason)
            .expect("dead-letter")
    };
    let crc = find("malformed");
    let detail = crc["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("Modbus unit 3") && detail.contains("CRC"),
        "{crc}"
    );
    let modbus = crc::Crc::<u16>::new(&crc::CRC_16_MODBUS);
    let mut frame = vec![3, 0x03, 2, 0, 1];
    frame.extend_from_slice(&(modbus.checksum(&frame) ^ 0xA5A5).to_le_bytes());
    assert_eq!(crc["raw"], shown(&frame), "the corrupt answer's bytes");
    let refused = find("missing_value");
    let detail = refused["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("Modbus unit 4") && detail.contains("illegal data address"),
        "{refused}"
    );
    let nan = find("not_finite");
    assert!(
        nan["detail"]
            .as_str()
            .is_some_and(|d| d.contains("Modbus unit 5 input register 4")),
        "{nan}"
    );
    let log = gateway.log();
    let warned = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("no answer within the response timeout"))
        .count();
    assert_eq!(
        warned, 1,
        "a silent slave is logged once per ten minutes:\n{log}"
    );
    drop(bus);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdi12_sensors_measured_and_mapped_by_index() {
    let nats = Nats::with_platform_stream().await;
    let mut link = SerialLink::plugged("usb-Arduino_LLC_SDI-12_USB_Adapter-if00");
    let sim = SimSdi12::spawn(
        link.take_pty().into_async(),
        vec![
            // Needs two data commands, and sends a service request when done.
            Sensor::new('0', &[21.5, 30.25, 1.5])
                .per_data(2)
                .timing(1, Duration::from_millis(300)),
            Sensor::new('1', &[12.0, 0.5]),
            Sensor::new('b', &[1.0]).behaving(sim_sdi12::Behaviour::BadCrc),
        ],
        false,
    );
    let gateway = start_with_port(
        &nats,
        &link,
        "sdi",
        r#"
protocol = "sdi12"
timeout = "500ms"
poll_interval = "1s"
"#,
        r#"
[[fields]]
id = "field-1"
  [[fields.sensors]]
  device_id = "profile-0"
  sensor_type = "soil_moisture"
  sdi12 = { port = "sdi", address = "0", index = 2 }
  [[fields.sensors]]
  device_id = "profile-0"
  sensor_type = "soil_temperature"
  sdi12 = { port = "sdi", address = "0", index = 1 }
  [[fields.sensors]]
  device_id = "profile-0"
  sensor_type = "soil_ec"
  sdi12 = { port = "sdi", address = "0", index = 3 }
  [[fields.sensors]]
  device_id = "wx-1"
  sensor_type = "air_temperature"
  sdi12 = { port = "sdi", address = "1", index = 1, command = "MC" }
  # The sensor sends two values: nothing at index 3.
  [[fields.sensors]]
  device_id = "wx-1"
  sensor_type = "air_humidity"
  sdi12 = { port = "sdi", address = "1", index = 3, command = "MC" }
  [[fields.sensors]]
  device_id = "broken-b"
  sensor_type = "soil_moisture"
  sdi12 = { port = "sdi", address = "b", index = 1, command = "MC" }
"#,
    );

    let good = [
        ("profile-0", "soil_moisture"),
        ("profile-0", "soil_temperature"),
        ("profile-0", "soil_ec"),
        ("wx-1", "air_temperature"),
    ];
    wait_rounds(&nats, &gateway, &good, 3).await;
    let count = |g: &Gateway, address: &str, outcome: &str| {
        g.metric(
            "sahool_gateway_sdi12_measurements_total",
            &format!("port=\"sdi\",address=\"{address}\",outcome=\"{outcome}\""),
        )
    };
    gateway.wait_until("faults counted", WITHIN, |g| {
        count(g, "b", "crc") >= 3.0
            && g.metric(
                "sahool_gateway_serial_errors_total",
                "port=\"sdi\",reason=\"missing_value\"",
            ) >= 3.0
    });

    let got = readings(&nats).await;
    for (device, sensor_type, value, unit) in [
        ("profile-0", "soil_moisture", 30.25, "%"),
        ("profile-0", "soil_temperature", 21.5, "°C"),
        ("profile-0", "soil_ec", 1.5, "mS/cm"),
        ("wx-1", "air_temperature", 12.0, "°C"),
    ] {
        for g in of(&got, device, sensor_type) {
            assert!(
                close_to(g.value, value) && g.unit == unit,
                "{g:?}: expected {value} {unit}"
            );
        }
    }
    assert!(of(&got, "wx-1", "air_humidity").is_empty());
    assert!(of(&got, "broken-b", "soil_moisture").is_empty());
    let validator = support::event_validator();
    for e in nats.read_readings("SAHOOL_IOT").await {
        assert!(validator.is_valid(&e.body), "{}", e.body);
    }
    assert!(count(&gateway, "0", "ok") >= 3.0 && count(&gateway, "1", "ok") >= 3.0);
    assert_eq!(count(&gateway, "b", "ok"), 0.0);

    let letters = gateway.dead_letters();
    let reasons = dead_letter_reasons(&letters, "sdi");
    let expected: BTreeMap<String, usize> = [("malformed", 1), ("missing_value", 1)]
        .into_iter()
        .map(|(r, n)| (r.to_string(), n))
        .collect();
    assert_eq!(reasons, expected, "{letters:#?}");
    let crc = letters
        .iter()
        .find(|d| d["reason"] == "malformed")
        .expect("the CRC fault");
    assert!(
        crc["raw"].as_str().is_some_and(|r| r.starts_with("b+1")),
        "the response with its wrong CRC: {crc}"
    );
    let missing = letters
        .iter()
        .find(|d| d["reason"] == "missing_value")
        .expect("the missing index");
    assert_eq!(missing["raw"], "1+12+0.5", "{missing}");

    // The commands on the bus: M for address 0, MC for 1 and b, data fetched in two parts.
    let heard: Vec<String> = sim.heard().into_iter().map(|h| h.command).collect();
    for command in ["0M!", "0D0!", "0D1!", "1MC!", "1D0!", "bMC!"] {
        assert!(heard.iter().any(|c| c == command), "{command}: {heard:?}");
    }
    assert!(!heard.iter().any(|c| c == "1M!"), "{heard:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unplugged_modbus_adapter_is_polled_again_when_plugged_back_in() {
    let nats = Nats::with_platform_stream().await;
    let mut link = SerialLink::plugged("usb-FTDI_USB-RS485_Cable_A1B2C3-if00-port0");
    let slave = |moisture: u16| vec![Slave::new(7).holding(0, &[moisture])];
    let bus = SimBus::spawn(link.take_pty().into_async(), slave(100));
    let mut gateway = start_with_port(
        &nats,
        &link,
        "bus",
        r#"
protocol = "modbus-rtu"
timeout = "200ms"
poll_interval = "300ms"
"#,
        r#"
[[fields]]
id = "field-1"
  [[fields.sensors]]
  device_id = "soil-7"
  sensor_type = "soil_moisture"
  modbus = { port = "bus", unit = 7, register = 0, scale = 0.1 }
"#,
    );
    let sensor = [("soil-7", "soil_moisture")];
    wait_rounds(&nats, &gateway, &sensor, 2).await;

    // Unplugged: the far end closes and the by-id link dangles.
    bus.close().await;
    gateway.wait_until("the port noticed lost", WITHIN, |g| {
        g.metric("sahool_gateway_serial_port_up", "port=\"bus\"") == 0.0
            && g.metric(
                "sahool_gateway_serial_errors_total",
                "port=\"bus\",reason=\"lost\"",
            ) >= 1.0
    });
    let before = readings(&nats).await.len();

    // Plugged back in (another pseudo-terminal behind the same link), now reading 20 %.
    link.plug();
    let _bus = SimBus::spawn(link.take_pty().into_async(), slave(200));
    wait_port_open(&gateway, "bus");
    wait_rounds(&nats, &gateway, &sensor, before + 2).await;

    let values: Vec<f64> = of(&readings(&nats).await, "soil-7", "soil_moisture")
        .iter()
        .map(|g| g.value)
        .collect();
    let switch = values
        .iter()
        .position(|v| close_to(*v, 20.0))
        .expect("readings after the re-plug");
    assert!(switch >= 2, "{values:?}");
    assert!(
        values[..switch].iter().all(|v| close_to(*v, 10.0))
            && values[switch..].iter().all(|v| close_to(*v, 20.0)),
        "old device's values, then the new one's: {values:?}"
    );
    assert_eq!(
        gateway.metric("sahool_gateway_serial_reconnects_total", "port=\"bus\""),
        1.0
    );
    assert!(gateway.is_running(), "no restart");
    assert_eq!(gateway.log().matches("serial port open").count(), 2);
    assert_eq!(gateway.terminate(), Some(0));
}
