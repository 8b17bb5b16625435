//! `dead-letters replay` through the real binary, with nats-server and mosquitto: a reading
//! of a sensor not yet configured is dead-lettered, the operator adds the sensor (SIGHUP) and
//! replays, and the reading reaches the stream exactly once, however often or concurrently
//! the replay runs and whatever live traffic flows meanwhile. Also without a running gateway,
//! and for a batch stored in part (only its refused reading comes back).

mod support;

use std::process::{Command, Output};
use std::time::Duration;

use sahool_gateway::reading::Timestamp;
use support::pty::{wait_port_open, SerialLink};
use support::{
    assert_exactly_once, gateway_binary, probe_config, probe_readings, publish_all,
    values_in_order, Gateway, Mosquitto, Nats, StreamMessage,
};

const PROBE_2: &str = r#"
  [[fields.sensors]]
  device_id = "probe-2"
  sensor_type = "water_level"
"#;

const PROBE_2_TOPIC: &str = "sahool/sensors/probe-2/field-1/water_level";

/// Without a device timestamp: only the replay's own bookkeeping keeps it single (no
/// observation key to recognise a repeat by).
fn probe_2_readings(range: std::ops::Range<usize>) -> Vec<(String, Vec<u8>)> {
    range
        .map(|i| {
            (
                PROBE_2_TOPIC.to_string(),
                format!(r#"{{"device_id":"probe-2","type":"water_level","value":{i}}}"#)
                    .into_bytes(),
            )
        })
        .collect()
}

fn replay(gateway: &Gateway, args: &[&str]) -> Output {
    let mut all = vec!["dead-letters", "replay"];
    all.extend_from_slice(args);
    gateway.cli(&all)
}

/// Replays and returns stdout, asserting exit 0.
fn replay_ok(gateway: &Gateway, args: &[&str]) -> String {
    let out = replay(gateway, args);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "replay {args:?} failed:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The `N` of "replayed N dead-letter(s)".
fn replayed(stdout: &str) -> usize {
    stdout
        .split("replayed ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {stdout}"))
}

fn of_device(events: &[StreamMessage], device: &str) -> Vec<StreamMessage> {
    events
        .iter()
        .filter(|e| e.body["payload"]["device_id"] == device)
        .cloned()
        .collect()
}

async fn rejected_then_mapped(n: usize) -> (Nats, Mosquitto, Gateway, String) {
    let nats = Nats::with_platform_stream().await;
    let broker = Mosquitto::start();
    let base = probe_config(&nats, &broker, "", "");
    let mut gateway = Gateway::start(&base);
    gateway.wait_subscribed(1).await;
    assert_eq!(
        publish_all(broker.port, "p2", probe_2_readings(0..n)).await,
        n
    );
    gateway.wait_until("probe-2 dead-lettered", Duration::from_secs(20), |g| {
        g.metric(
            "sahool_gateway_readings_rejected_total",
            "reason=\"unknown_device\"",
        ) == n as f64
    });
    let with_sensor = base + PROBE_2;
    gateway.rewrite_config(&with_sensor);
    gateway.signal("HUP");
    gateway.wait_until("reloaded", Duration::from_secs(20), |g| {
        g.log().contains("config reloaded")
    });
    (nats, broker, gateway, with_sensor)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sensor_added_after_the_fact_gets_its_readings_once_and_filters_and_dry_runs_work() {
    let (nats, _broker, mut gateway, _) = rejected_then_mapped(20).await;
    let letters = gateway.dead_letters();
    assert_eq!(letters.len(), 20);
    assert!(
        letters.iter().all(|d| d["topic"] == PROBE_2_TOPIC),
        "{letters:?}"
    );

    // The endpoint changes the buffer: a GET (what a link or a crawler sends) is refused.
    assert_eq!(
        gateway.get("/dead-letters/replay").map(|(code, _)| code),
        Some(405)
    );

    // Filters that match nothing change nothing.
    let out = replay_ok(&gateway, &["--reason", "out_of_range"]);
    assert!(out.contains("no dead-letters match"), "{out}");
    let out = replay_ok(&gateway, &["--source", "elsewhere"]);
    assert!(out.contains("no dead-letters match"), "{out}");
    let out = replay_ok(&gateway, &["--since", "2099-01-01T00:00:00Z"]);
    assert!(out.contains("no dead-letters match"), "{out}");

    // A dry run says what would happen and changes nothing.
    let out = replay_ok(&gateway, &["--dry-run"]);
    assert!(
        out.contains("dry run") && out.contains("would replay 20"),
        "{out}"
    );
    assert!(
        out.contains("unknown_device") && out.contains("(20 readings)"),
        "{out}"
    );
    assert_eq!(gateway.dead_letters().len(), 20);
    assert_eq!(
        gateway.metric("sahool_gateway_readings_accepted_total", ""),
        0.0
    );

    // The oldest 5 first, then the rest, then again: nothing twice.
    let out = replay_ok(
        &gateway,
        &[
            "--limit",
            "5",
            "--since",
            "2h",
            "--reason",
            "unknown_device",
        ],
    );
    assert_eq!(replayed(&out), 5, "{out}");
    assert!(out.contains("running gateway"), "{out}");
    assert_eq!(gateway.dead_letters().len(), 15);
    assert_eq!(replayed(&replay_ok(&gateway, &[])), 15);
    assert_eq!(replayed(&replay_ok(&gateway, &[])), 0);
    assert!(gateway.dead_letters().is_empty());

    gateway.wait_until("forwarded", Duration::from_secs(30), |g| {
        g.metric("sahool_gateway_readings_forwarded_total", "") == 20.0
            && g.metric("sahool_gateway_buffer_readings", "") == 0.0
    });
    let events = nats.read_readings("SAHOOL_IOT").await;
    let probe_2 = of_device(&events, "probe-2");
    assert_exactly_once(&values_in_order(&probe_2), 20);
    // No device time: observed when the gateway received them, not at the replay.
    let received: Vec<Timestamp> = letters
        .iter()
        .filter_map(|d| d["at"].as_str().and_then(Timestamp::parse_rfc3339))
        .collect();
    for e in &probe_2 {
        let at = e.body["payload"]["timestamp"]
            .as_str()
            .and_then(Timestamp::parse_rfc3339)
            .expect("timestamp");
        assert!(
            received.contains(&at),
            "{at:?} is no dead-letter's receive time"
        );
    }
    assert_eq!(gateway.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_replays_during_live_traffic_store_everything_once() {
    let (nats, broker, mut gateway, _) = rejected_then_mapped(100).await;
    let live = tokio::spawn(publish_all(broker.port, "p1", probe_readings(0..2000)));
    let replays: Vec<_> = (0..3)
        .map(|_| {
            let config = gateway.config_path.clone();
            std::thread::spawn(move || {
                Command::new(gateway_binary())
                    .args(["dead-letters", "replay", "--config"])
                    .arg(config)
                    .output()
                    .expect("run replay")
            })
        })
        .collect();
    let mut total = 0;
    for r in replays {
        let out = r.join().expect("replay thread");
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        total += replayed(&stdout);
    }
    assert_eq!(
        total, 100,
        "every dead-letter replayed by exactly one of the replays"
    );
    assert_eq!(live.await.expect("publisher"), 2000);
    gateway.wait_until("everything forwarded", Duration::from_secs(60), |g| {
        g.metric("sahool_gateway_readings_forwarded_total", "") == 2100.0
            && g.metric("sahool_gateway_buffer_readings", "") == 0.0
    });
    let events = nats.read_readings("SAHOOL_IOT").await;
    assert_eq!(events.len(), 2100);
    assert_exactly_once(&values_in_order(&of_device(&events, "probe-1")), 2000);
    assert_exactly_once(&values_in_order(&of_device(&events, "probe-2")), 100);
    assert_eq!(gateway.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_running_gateway_the_replay_opens_the_buffer_under_its_lock() {
    let (nats, _broker, mut gateway, _) = rejected_then_mapped(10).await;
    assert_eq!(gateway.terminate(), Some(0));

    // Another process holds the buffer (a gateway starting): refused, clearly, and nothing
    // changed.
    let lock_path = gateway.data_dir().join("buffer.db.lock");
    let lock = std::fs::File::open(&lock_path).expect("the gateway made the lock file");
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).expect("flock");
    let out = replay(&gateway, &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("buffer.db.lock") && err.contains("Try again"),
        "{err}"
    );
    drop(lock);
    assert_eq!(gateway.dead_letters().len(), 10);

    let out = replay_ok(&gateway, &[]);
    assert!(out.contains("no gateway running"), "{out}");
    assert_eq!(replayed(&out), 10, "{out}");
    assert_eq!(replayed(&replay_ok(&gateway, &[])), 0);

    gateway.resume();
    gateway.wait_until("forwarded", Duration::from_secs(30), |g| {
        g.metric("sahool_gateway_readings_forwarded_total", "") == 10.0
    });
    let events = nats.read_readings("SAHOOL_IOT").await;
    assert_exactly_once(&values_in_order(&of_device(&events, "probe-2")), 10);
    assert_eq!(gateway.terminate(), Some(0));
}

/// A `lines` talker's line that no sensor was bound to is parsed again with the port's
/// settings once a sensor is; a line that does not parse stays dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_talkers_line_is_replayed_once_a_sensor_is_bound_to_its_key() {
    let nats = Nats::with_platform_stream().await;
    let mut link = SerialLink::plugged("usb-talker");
    let config = format!(
        r#"
[nats]
servers = ["{nats}"]
ack_timeout = "2s"

[[serial]]
name = "talker"
path = "{path}"
protocol = "lines"
line_format = "kv"
device_id = "tank-1"

[[fields]]
id = "field-1"
  [[fields.sensors]]
  device_id = "tank-1"
  sensor_type = "water_level"
  line = {{ port = "talker", key = "level" }}
"#,
        nats = nats.url(),
        path = link.path.display(),
    );
    let mut gateway = Gateway::start(&config);
    wait_port_open(&gateway, "talker");
    link.write(b"level=5\n");
    link.write(b"temp=21.5\n");
    link.write(b"garbage ###\n");
    gateway.wait_until("rejected and stored", Duration::from_secs(30), |g| {
        g.metric("sahool_gateway_readings_rejected_total", "") == 2.0
            && g.metric("sahool_gateway_readings_forwarded_total", "") == 1.0
    });
    gateway.rewrite_config(&format!(
        "{config}  [[fields.sensors]]\n  device_id = \"tank-1\"\n  sensor_type = \"air_temperature\"\n  line = {{ port = \"talker\", key = \"temp\" }}\n"
    ));
    gateway.signal("HUP");
    gateway.wait_until("reloaded", Duration::from_secs(20), |g| {
        g.log().contains("config reloaded")
    });

    let out = replay_ok(&gateway, &["--source", "talker"]);
    assert_eq!(replayed(&out), 1, "{out}");
    assert!(out.contains("still rejected 1"), "{out}");
    assert_eq!(replayed(&replay_ok(&gateway, &[])), 0);
    let left = gateway.dead_letters();
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0]["reason"], "malformed");

    gateway.wait_until("forwarded", Duration::from_secs(30), |g| {
        g.metric("sahool_gateway_readings_forwarded_total", "") == 2.0
    });
    let events = nats.read_readings("SAHOOL_IOT").await;
    let temps: Vec<f64> = events
        .iter()
        .filter(|e| e.body["payload"]["sensor_type"] == "air_temperature")
        .filter_map(|e| e.body["payload"]["value"].as_f64())
        .collect();
    assert_eq!(temps, vec![21.5]);
    assert_eq!(events.len(), 2);
    assert_eq!(gateway.terminate(), Some(0));
}

#[test]
fn a_buffer_that_does_not_exist_is_reported_and_exits_1() {
    let gateway = Gateway::configure("[nats]\nservers = [\"nats://127.0.0.1:4222\"]\n", &[]);
    let out = replay(&gateway, &["--dry-run"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("has the gateway run"), "{err}");
    let out = replay(&gateway, &["--since", "yesterday-ish"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--since"));
}

/// A SAHOOL batch without timestamps stored in part: probe-1's water levels were stored, its
/// soil moisture (no such sensor yet) dead-lettered. Once the sensor is configured, a replay
/// stores the soil moisture alone; the water levels, with no device time to recognise them
/// by, must not reach the stream a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_stored_in_part_replays_only_the_refused_reading() {
    const N: usize = 5;
    let nats = Nats::with_platform_stream().await;
    let broker = Mosquitto::start();
    let base = probe_config(&nats, &broker, "", "");
    let mut gateway = Gateway::start(&base);
    gateway.wait_subscribed(1).await;
    // Batch i: water levels 3i and 3i+1, soil moisture 3i+2.
    let batches = (0..N)
        .map(|i| {
            let (a, b, c) = (3 * i, 3 * i + 1, 3 * i + 2);
            (
                "sahool/sensors/probe-1/field-1".to_string(),
                format!(
                    r#"{{"device_id":"probe-1","readings":[{{"type":"water_level","value":{a}}},{{"type":"water_level","value":{b}}},{{"type":"soil_moisture","value":{c}}}]}}"#
                )
                .into_bytes(),
            )
        })
        .collect();
    assert_eq!(publish_all(broker.port, "batches", batches).await, N);
    gateway.wait_until("stored in part", Duration::from_secs(20), |g| {
        g.metric(
            "sahool_gateway_readings_rejected_total",
            "reason=\"unknown_sensor_type\"",
        ) == N as f64
            && g.metric("sahool_gateway_readings_forwarded_total", "") == 2.0 * N as f64
    });
    let letters = gateway.dead_letters();
    assert_eq!(letters.len(), N);
    assert!(
        letters
            .iter()
            .all(|d| d["device"] == "probe-1" && d["sensor_type"] == "soil_moisture"),
        "{letters:?}"
    );

    gateway.rewrite_config(&format!(
        "{base}  [[fields.sensors]]\n  device_id = \"probe-1\"\n  sensor_type = \"soil_moisture\"\n"
    ));
    gateway.signal("HUP");
    gateway.wait_until("reloaded", Duration::from_secs(20), |g| {
        g.log().contains("config reloaded")
    });
    let out = replay_ok(&gateway, &[]);
    assert_eq!(replayed(&out), N, "{out}");
    assert!(out.contains(&format!("({N} readings)")), "{out}");
    assert_eq!(replayed(&replay_ok(&gateway, &[])), 0);
    assert!(gateway.dead_letters().is_empty());

    // The replay stored before it answered: once the buffer is empty, all is in the stream.
    gateway.wait_until("forwarded", Duration::from_secs(30), |g| {
        g.metric("sahool_gateway_readings_forwarded_total", "") >= 3.0 * N as f64
            && g.metric("sahool_gateway_buffer_readings", "") == 0.0
    });
    let events = nats.read_readings("SAHOOL_IOT").await;
    assert_exactly_once(&values_in_order(&events), 3 * N);
    assert_eq!(events.len(), 3 * N);
    assert_eq!(gateway.terminate(), Some(0));
}
