//! W3C trace context across the gateway's hop, through the real binary: a device's
//! `traceparent` (MQTT 5 user property) reaches NATS unchanged through the built-in listener
//! and through a broker; events without one get a valid context derived from their event id;
//! and a row published again after SIGKILL and restart carries the same header.

mod support;

use std::collections::HashMap;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use futures_util::StreamExt;
use support::{
    free_port, probe_config, probe_listener_config, probe_reading, Gateway, Mosquitto, Nats,
    StreamMessage,
};

const STREAM: &str = "SAHOOL_IOT";
const DEVICE_PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const DEVICE_STATE: &str = "farm=north,vendor=t61rcWkgMzE";
const WITHIN: Duration = Duration::from_secs(30);

/// `mosquitto_pub` at QoS 1 (returns once the receiver acknowledged the commit) of probe
/// reading `i`, with `args` for the version and user properties.
fn publish<S: AsRef<std::ffi::OsStr>>(port: u16, i: usize, args: &[S]) -> Output {
    let (topic, payload) = probe_reading(i);
    Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-q",
            "1",
            "-t",
            &topic,
        ])
        .arg("-m")
        .arg(String::from_utf8(payload).expect("UTF-8 payload"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("mosquitto_pub (Debian package mosquitto-clients)")
}

fn published(out: Output) {
    assert!(
        out.status.success(),
        "mosquitto_pub: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `mosquitto_pub` arguments for MQTT 5 with these user properties.
fn v5_with(properties: &[(&str, &str)]) -> Vec<String> {
    let mut args = vec!["-V".to_string(), "5".to_string()];
    for (key, value) in properties {
        args.extend(["-D", "publish", "user-property", key, value].map(String::from));
    }
    args
}

/// MQTT 5 with the device's trace context as user properties.
fn traced() -> Vec<String> {
    v5_with(&[("traceparent", DEVICE_PARENT), ("tracestate", DEVICE_STATE)])
}

/// A valid version-00 traceparent: (trace-id, parent-id, flags).
fn parts(header: &str) -> (&str, &str, &str) {
    let fields: Vec<&str> = header.split('-').collect();
    assert_eq!(fields.len(), 4, "{header}");
    let (version, trace, parent, flags) = (fields[0], fields[1], fields[2], fields[3]);
    assert_eq!(version, "00", "{header}");
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    assert!(
        hex(trace, 32) && hex(parent, 16) && hex(flags, 2),
        "{header}"
    );
    assert!(trace.bytes().any(|b| b != b'0') && parent.bytes().any(|b| b != b'0'));
    (trace, parent, flags)
}

/// A context the gateway made: its trace-id is the event id's hex digits.
fn assert_generated(e: &StreamMessage) {
    let header = e
        .header("traceparent")
        .expect("every event has a traceparent");
    let (trace, _, flags) = parts(header);
    let event_id = e.header("Nats-Msg-Id").expect("msg id").replace('-', "");
    assert_eq!(trace, event_id, "derived from the event id");
    assert_eq!(flags, "01");
    assert_eq!(e.header("tracestate"), None);
}

fn by_value(events: &[StreamMessage]) -> HashMap<u64, &StreamMessage> {
    events
        .iter()
        .filter(|e| e.body["event_type"] == "sensor_reading")
        .map(|e| {
            (
                e.body["payload"]["value"].as_f64().expect("value") as u64,
                e,
            )
        })
        .collect()
}

async fn wait_in_stream(nats: &Nats, events: usize) -> Vec<StreamMessage> {
    let deadline = tokio::time::Instant::now() + WITHIN;
    loop {
        let mut found = nats.read_stream(STREAM).await;
        // The heartbeat comes 10 s after start, on a slow machine before the test is done.
        found.retain(|e| e.body["event_type"] != "gateway_status");
        if found.len() >= events || tokio::time::Instant::now() > deadline {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_keeps_the_device_trace_and_generates_valid_ones_otherwise() {
    let nats = Nats::with_platform_stream().await;
    let port = free_port();
    let gateway = Gateway::start(&probe_listener_config(&nats, port, "", ""));
    support::wait_for_port(port, WITHIN);
    published(publish(port, 0, &traced()));
    published(publish(port, 1, &v5_with(&[])));
    // Uppercase hex is invalid (W3C): ignored, the reading kept with a context of its own.
    let upper = DEVICE_PARENT.to_uppercase();
    published(publish(port, 2, &v5_with(&[("traceparent", &upper)])));
    published(publish(port, 3, &["-V", "311"]));

    // Four readings and the sensor's `connected` event.
    let events = wait_in_stream(&nats, 5).await;
    assert_eq!(events.len(), 5, "{events:#?}\n{}", gateway.log());
    let readings = by_value(&events);
    let device = readings[&0];
    assert_eq!(
        device.header("traceparent"),
        Some(DEVICE_PARENT),
        "the device's context, parent-id included"
    );
    assert_eq!(device.header("tracestate"), Some(DEVICE_STATE));
    for i in 1..=3 {
        assert_generated(readings[&i]);
    }
    for e in events
        .iter()
        .filter(|e| e.body["event_type"] != "sensor_reading")
    {
        assert_generated(e);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_client_keeps_the_device_trace() {
    let nats = Nats::with_platform_stream().await;
    let broker = Mosquitto::start();
    let gateway = Gateway::start(&probe_config(&nats, &broker, "", ""));
    gateway.wait_subscribed(1).await;
    let port: u16 = broker
        .url()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("broker port");
    published(publish(port, 0, &traced()));
    published(publish(port, 1, &v5_with(&[])));
    let events = wait_in_stream(&nats, 3).await;
    assert_eq!(events.len(), 3, "{events:#?}\n{}", gateway.log());
    let readings = by_value(&events);
    assert_eq!(readings[&0].header("traceparent"), Some(DEVICE_PARENT));
    assert_eq!(readings[&0].header("tracestate"), Some(DEVICE_STATE));
    assert_generated(readings[&1]);
}

/// Published into a frozen server, killed before any PubAck, restarted: every publish of a
/// row (seen by a plain subscriber, which JetStream's de-duplication does not hide) carries
/// the same `traceparent`, the device's kept in the buffer across the restart. A first reading
/// acknowledged before the freeze opens the link's window past its first publish, so both rows
/// go out before the kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_published_again_after_sigkill_carries_the_same_traceparent() {
    let mut nats = Nats::with_platform_stream().await;
    let mut copies = nats
        .client()
        .await
        .subscribe("sahool.iot.sensor.reading")
        .await
        .expect("subscribe");
    let port = free_port();
    let mut gateway = Gateway::start(&probe_listener_config(&nats, port, "", ""));
    support::wait_for_port(port, WITHIN);
    gateway.wait_until("linked", WITHIN, |g| {
        g.metric("sahool_gateway_nats_connected", "") == 1.0
    });
    published(publish(port, 2, &v5_with(&[])));
    gateway.wait_until("the first reading acknowledged", WITHIN, |g| {
        g.metric("sahool_gateway_buffer_readings", "") == 0.0
    });
    tokio::time::timeout(WITHIN, copies.next())
        .await
        .expect("the first reading's copy")
        .expect("subscribed");

    nats.freeze();
    published(publish(port, 0, &traced()));
    published(publish(port, 1, &v5_with(&[])));
    // Past the 2 s ack timeout: published at least once, never acknowledged.
    tokio::time::sleep(Duration::from_secs(3)).await;
    gateway.kill9();
    gateway.resume();
    nats.thaw();

    gateway.wait_until("backlog forwarded", WITHIN, |g| {
        g.metric("sahool_gateway_buffer_readings", "") == 0.0
    });
    let mut seen: HashMap<String, Vec<String>> = HashMap::new();
    let mut values: HashMap<String, u64> = HashMap::new();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(2), copies.next()).await {
        let headers = m.headers.as_ref().expect("headers");
        let id = headers.get("Nats-Msg-Id").expect("msg id").to_string();
        let parent = headers.get("traceparent").expect("traceparent").to_string();
        let body: serde_json::Value = serde_json::from_slice(&m.payload).expect("JSON");
        values.insert(
            id.clone(),
            body["payload"]["value"].as_f64().unwrap_or(-1.0) as u64,
        );
        seen.entry(id).or_default().push(parent);
    }
    assert_eq!(seen.len(), 2, "two rows: {seen:#?}\n{}", gateway.log());
    for (id, parents) in &seen {
        assert!(
            parents.len() >= 2,
            "{id} published before the kill and again after: {parents:?}\n{}",
            gateway.log()
        );
        assert!(
            parents.windows(2).all(|w| w[0] == w[1]),
            "{id}: {parents:?}"
        );
        if values[id] == 0 {
            assert_eq!(parents[0], DEVICE_PARENT, "kept in the buffer");
        } else {
            assert_eq!(parts(&parents[0]).0, id.replace('-', ""));
        }
    }
    assert_eq!(
        nats.read_readings(STREAM).await.len(),
        3,
        "stored once each, the first reading too"
    );
}
