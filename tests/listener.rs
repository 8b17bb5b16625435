//! The MQTT ingest listener through the real binary: devices publish straight to the gateway
//! (mosquitto_pub, and rumqttc speaking MQTT 3.1.1 and 5) and a PUBACK means committed. SIGKILL
//! loses nothing PUBACKed; bad credentials, oversized packets, subscriptions, garbage and a
//! 1,000-connection flood are refused while a good client keeps publishing; TLS with a test CA,
//! with and without client certificates; `reject_new` withholds PUBACKs until there is room.

#[path = "support/pki.rs"]
mod pki;
mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rumqttc::v5::mqttbytes::v5::DisconnectReasonCode;
use support::{
    assert_exactly_once, event_validator, fixture, free_port, matches_expected,
    probe_config_with_input, probe_listener_config, probe_reading, probe_readings, values_in_order,
    Gateway, Nats,
};

const USER: &str = "node-1";
const PASSWORD: &str = "k3v-9Lq!tr8z-WmX";
const STREAM: &str = "SAHOOL_IOT";

/// A password file holding `user`, written by the gateway's own `passwd` command.
fn add_user(path: &Path, user: &str, password: &str) {
    let mut child = Command::new(support::gateway_binary())
        .arg("passwd")
        .arg(path)
        .arg(user)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run passwd");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(format!("{password}\n").as_bytes())
        .expect("write the password");
    let out = child.wait_with_output().expect("passwd");
    assert!(
        out.status.success(),
        "passwd failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(path).expect("password file");
    assert!(
        text.contains(&format!("{user}:$argon2id$")) && !text.contains(password),
        "only the argon2 hash is stored"
    );
}

fn password_file(dir: &Path) -> PathBuf {
    let path = dir.join("mqtt-users");
    add_user(&path, USER, PASSWORD);
    path
}

/// `[[mqtt_listener]]` with password auth on `port`, plus `extra` lines.
fn password_listener(name: &str, port: u16, passwords: &Path, extra: &str) -> String {
    format!(
        "\n[[mqtt_listener]]\nname = \"{name}\"\nlisten = \"127.0.0.1:{port}\"\nformat = \"sahool\"\n\
         topics = [\"sahool/sensors/#\"]\nauth = \"password\"\npassword_file = \"{}\"\n{extra}\n",
        passwords.display()
    )
}

/// The probe config with `listeners` as its MQTT inputs, plus the SAHOOL fixtures' sensors.
fn config(nats: &Nats, listeners: &str, buffer: &str) -> String {
    probe_config_with_input(nats, buffer, "", listeners) + FIXTURE_FIELDS
}

/// The fields and sensors of `tests/fixtures/mqtt/sahool-*.json`.
const FIXTURE_FIELDS: &str = r#"
[[fields]]
id = "field-north-12"
  [[fields.sensors]]
  device_id = "soil-probe-7"
  sensor_type = "soil_moisture"

[[fields]]
id = "field-south-2"
  [[fields.sensors]]
  device_id = "wx-3"
  sensor_type = "air_temperature"

[[fields]]
id = "field-east-4"
  [[fields.sensors]]
  device_id = "node-11"
  sensor_type = "soil_moisture"
  [[fields.sensors]]
  device_id = "node-11"
  sensor_type = "soil_temperature"
  [[fields.sensors]]
  device_id = "node-11"
  sensor_type = "soil_ec"
"#;

/// A gateway with NATS and one password listener, `devices`, whose file holds our user.
struct PasswordSetup {
    nats: Nats,
    port: u16,
    gateway: Gateway,
    passwords: PathBuf,
    /// Holds the password file.
    _secrets: tempfile::TempDir,
}

impl PasswordSetup {
    /// `extra`: more lines for the listener.
    async fn start(extra: &str) -> Self {
        let nats = Nats::with_platform_stream().await;
        let _secrets = tempfile::tempdir().expect("tempdir");
        let passwords = password_file(_secrets.path());
        let port = free_port();
        let listener = password_listener("devices", port, &passwords, extra);
        let gateway = Gateway::start(&config(&nats, &listener, ""));
        Self {
            nats,
            port,
            gateway,
            passwords,
            _secrets,
        }
    }
}

/// Runs `mosquitto_pub` with the message on stdin; `args` add host/port, auth, TLS, QoS.
fn mosquitto_pub<S: AsRef<std::ffi::OsStr>>(args: &[S], topic: &str, payload: &[u8]) -> Output {
    let mut child = Command::new("mosquitto_pub")
        .args(args)
        .args(["-t", topic, "-s"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mosquitto_pub (Debian package mosquitto-clients)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(payload)
        .expect("payload to mosquitto_pub");
    child.wait_with_output().expect("mosquitto_pub")
}

/// mosquitto_pub arguments for QoS 1 over TLS to `localhost:port`, trusting `ca`, with a
/// client certificate and key when given.
fn tls_args(port: u16, ca: &Path, client: Option<(&PathBuf, &PathBuf)>) -> Vec<String> {
    let mut args = vec![
        "-h".into(),
        "localhost".into(),
        "-p".into(),
        port.to_string(),
    ];
    args.extend([
        "--cafile".into(),
        ca.display().to_string(),
        "-q".into(),
        "1".into(),
    ]);
    if let Some((cert, key)) = client {
        args.extend(["--cert".into(), cert.display().to_string()]);
        args.extend(["--key".into(), key.display().to_string()]);
    }
    args
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Connection arguments for mosquitto tools: loopback `port`, with our user's credentials.
fn login(port: &str) -> Vec<&str> {
    vec!["-h", "127.0.0.1", "-p", port, "-u", USER, "-P", PASSWORD]
}

/// What one rumqttc event means to [`publish_until_acked`].
enum Seen {
    /// A PUBLISH went out with this packet id.
    Sent(u16),
    /// The PUBACK of this packet id came in.
    Acked(u16),
    /// The client held a publish back because its packet id was still unacknowledged: the
    /// server acknowledged out of order.
    Collision,
    Other,
}

/// One connection of [`publish_until_acked`] for either rumqttc client: queues `batch` (pausing
/// as `pace` says), polls until every message is PUBACKed or the connection fails, and returns
/// the indices PUBACKed. A fresh client sends in queue order, so the k-th PUBLISH out is the
/// k-th message queued; its packet id then names it until the PUBACK.
macro_rules! one_connection {
    ($client:expr, $eventloop:expr, $QoS:ident, $Event:ident, $Packet:ident, $batch:expr, $pace:expr, $acked:expr) => {{
        let classify = |e: $Event| match e {
            $Event::Outgoing(rumqttc::Outgoing::Publish(pkid)) => Seen::Sent(pkid),
            $Event::Incoming($Packet::PubAck(a)) => Seen::Acked(a.pkid),
            $Event::Outgoing(rumqttc::Outgoing::AwaitAck(_)) => Seen::Collision,
            _ => Seen::Other,
        };
        let (client, mut eventloop) = ($client, $eventloop);
        let batch: Vec<(usize, String, Vec<u8>)> = $batch;
        let pace: Option<Duration> = $pace;
        let order: Vec<usize> = batch.iter().map(|(i, _, _)| *i).collect();
        let sender = tokio::spawn(async move {
            for (k, (_, topic, payload)) in batch.into_iter().enumerate() {
                if client
                    .publish(topic, $QoS::AtLeastOnce, false, payload)
                    .await
                    .is_err()
                {
                    return None;
                }
                if let (Some(d), true) = (pace, k % 25 == 24) {
                    tokio::time::sleep(d).await;
                }
            }
            Some(client)
        });
        let mut names: std::collections::HashMap<u16, usize> = Default::default();
        let mut sent = 0;
        let mut done = Vec::new();
        while done.len() < order.len() {
            let event = match tokio::time::timeout(Duration::from_secs(60), eventloop.poll()).await
            {
                Ok(Ok(event)) => event,
                Ok(Err(_)) => break,
                Err(_) => panic!("no MQTT event for 60 s"),
            };
            match classify(event) {
                Seen::Sent(pkid) => {
                    names.insert(pkid, order[sent]);
                    sent += 1;
                }
                Seen::Acked(pkid) => {
                    let index = names.remove(&pkid).expect("a PUBACK for a PUBLISH sent");
                    done.push(index);
                    $acked.fetch_add(1, Ordering::Relaxed);
                }
                Seen::Collision => panic!("PUBACKs came out of order"),
                Seen::Other => {}
            }
        }
        if done.len() == order.len() {
            if let Ok(Some(client)) = sender.await {
                let _ = client.disconnect().await;
                let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
            }
        } else {
            sender.abort();
        }
        done
    }};
}

/// Publishes every message at QoS 1 (MQTT 3.1.1, or 5 when `v5`) until each has its PUBACK,
/// as a device with its own store-and-forward does: after any disconnect it connects afresh and
/// publishes again, in order, every message not yet PUBACKed; a PUBACKed one is never sent
/// again. `acked` counts PUBACKs as they come; `pace` sleeps after every 25 publishes.
async fn publish_until_acked(
    v5: bool,
    port: u16,
    client_id: &str,
    credentials: Option<(&str, &str)>,
    messages: Vec<(String, Vec<u8>)>,
    pace: Option<Duration>,
    acked: Arc<AtomicUsize>,
) -> usize {
    let total = messages.len();
    let mut unacked: std::collections::BTreeMap<usize, (String, Vec<u8>)> =
        messages.into_iter().enumerate().collect();
    let deadline = Instant::now() + Duration::from_secs(240);
    while !unacked.is_empty() {
        assert!(
            Instant::now() < deadline,
            "{}/{total} PUBACKed",
            total - unacked.len()
        );
        let batch: Vec<(usize, String, Vec<u8>)> = unacked
            .iter()
            .map(|(i, (t, p))| (*i, t.clone(), p.clone()))
            .collect();
        let done = if v5 {
            use rumqttc::v5::mqttbytes::v5::Packet;
            use rumqttc::v5::mqttbytes::QoS;
            use rumqttc::v5::{AsyncClient, Event, MqttOptions};
            let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
            o.set_keep_alive(Duration::from_secs(30));
            if let Some((u, p)) = credentials {
                o.set_credentials(u, p);
            }
            let (client, eventloop) = AsyncClient::new(o, 64);
            one_connection!(client, eventloop, QoS, Event, Packet, batch, pace, acked)
        } else {
            use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
            let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
            o.set_keep_alive(Duration::from_secs(30)).set_inflight(100);
            if let Some((u, p)) = credentials {
                o.set_credentials(u, p);
            }
            let (client, eventloop) = AsyncClient::new(o, 64);
            one_connection!(client, eventloop, QoS, Event, Packet, batch, pace, acked)
        };
        for i in done {
            unacked.remove(&i);
        }
        if !unacked.is_empty() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    total
}

/// An MQTT 3.1.1 CONNECT as bytes.
fn connect_packet(client_id: &str, credentials: Option<(&str, &str)>) -> Vec<u8> {
    connect_packet_keeping(client_id, credentials, 60)
}

/// An MQTT 3.1.1 CONNECT with its keep-alive in seconds.
fn connect_packet_keeping(
    client_id: &str,
    credentials: Option<(&str, &str)>,
    keep_alive: u16,
) -> Vec<u8> {
    let mut c = rumqttc::mqttbytes::v4::Connect::new(client_id);
    c.keep_alive = keep_alive;
    if let Some((u, p)) = credentials {
        c.set_login(u, p);
    }
    let mut b = BytesMut::new();
    c.write(&mut b).expect("encode CONNECT");
    b.to_vec()
}

/// What a raw socket got back: the CONNACK return code, or `None` if it was closed.
fn connack(stream: &mut TcpStream) -> Option<u8> {
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut b = [0u8; 4];
    stream.read_exact(&mut b).ok()?;
    assert_eq!(&b[..3], &[0x20, 0x02, 0x00], "a CONNACK");
    Some(b[3])
}

/// True once the gateway has closed the socket (reads return end of stream or an error).
fn closed_by_gateway(stream: &mut TcpStream, within: Duration) -> bool {
    stream.set_read_timeout(Some(within)).expect("timeout");
    let mut sink = [0u8; 1024];
    loop {
        match stream.read(&mut sink) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) => {
                return !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                )
            }
        }
    }
}

/// Polls an MQTT 5 client until the gateway's CONNACK.
async fn connack_v5(eventloop: &mut rumqttc::v5::EventLoop) -> rumqttc::v5::mqttbytes::v5::ConnAck {
    use rumqttc::v5::{mqttbytes::v5::Packet, Event};
    loop {
        if let Ok(Event::Incoming(Packet::ConnAck(ack))) = eventloop.poll().await {
            return ack;
        }
    }
}

/// Polls an MQTT 5 client until its connection ends: the reason code of the gateway's
/// DISCONNECT, or `None` if it ended without one. (rumqttc reports a server's DISCONNECT as the
/// error that ends the connection.)
async fn disconnect_reason(eventloop: &mut rumqttc::v5::EventLoop) -> Option<DisconnectReasonCode> {
    use rumqttc::v5::{ConnectionError, StateError};
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Err(e) = eventloop.poll().await {
                break e;
            }
        }
    })
    .await
    .expect("the connection ends within 20 s");
    match ended {
        ConnectionError::MqttState(StateError::ServerDisconnect { reason_code, .. }) => {
            Some(reason_code)
        }
        _ => None,
    }
}

async fn wait_forwarded(gateway: &Gateway, n: usize) {
    gateway.wait_until(
        &format!("{n} readings forwarded"),
        Duration::from_secs(120),
        |g| {
            g.metric("sahool_gateway_readings_forwarded_total", "") >= n as f64
                && g.metric("sahool_gateway_buffer_readings", "") == 0.0
        },
    );
}

fn rejects(gateway: &Gateway, reason: &str) -> f64 {
    gateway.metric(
        "sahool_gateway_mqtt_listener_rejects_total",
        &format!("reason=\"{reason}\""),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sahool_form_from_every_client_arrives_exactly_once() {
    let PasswordSetup {
        nats,
        port,
        mut gateway,
        _secrets,
        ..
    } = PasswordSetup::start("").await;
    assert_eq!(
        gateway
            .get("/readyz")
            .map(|(_, body)| body.contains("listener devices: listening")),
        Some(true)
    );
    let p = port.to_string();
    let mut expected = Vec::new();
    let mut publish_fixture = |name: &str, extra: &[&str]| {
        let f = fixture(name);
        let mut args = login(&p);
        args.extend_from_slice(extra);
        let out = mosquitto_pub(
            &args,
            f["topic"].as_str().expect("topic"),
            f["payload"].as_str().expect("payload").as_bytes(),
        );
        assert!(out.status.success(), "{name}: {}", text(&out));
        expected.extend(f["expect"].as_array().expect("expect").iter().cloned());
    };
    // mosquitto_pub: MQTT 3.1.1 at QoS 1, and MQTT 5 at QoS 2.
    publish_fixture("mqtt/sahool-standard.json", &["-q", "1"]);
    publish_fixture("mqtt/sahool-compact-epoch.json", &["-V", "5", "-q", "2"]);
    // rumqttc, MQTT 3.1.1: the batch form.
    let batch = fixture("mqtt/sahool-batch.json");
    let one = Arc::new(AtomicUsize::new(0));
    let batch_message = vec![(
        batch["topic"].as_str().expect("topic").to_string(),
        batch["payload"]
            .as_str()
            .expect("payload")
            .as_bytes()
            .to_vec(),
    )];
    let creds = Some((USER, PASSWORD));
    assert_eq!(
        publish_until_acked(
            false,
            port,
            "rumqttc-v4",
            creds,
            batch_message,
            None,
            one.clone()
        )
        .await,
        1
    );
    expected.extend(batch["expect"].as_array().expect("expect").iter().cloned());
    // rumqttc, MQTT 5: 200 readings in the standard form, many in flight at once.
    let n = 200;
    let acked = Arc::new(AtomicUsize::new(0));
    assert_eq!(
        publish_until_acked(
            true,
            port,
            "rumqttc-v5",
            creds,
            probe_readings(0..n),
            None,
            acked
        )
        .await,
        n
    );
    // QoS 0 is committed too (though nothing is acknowledged).
    let (topic, payload) = probe_reading(n);
    let mut args = login(&p);
    args.extend(["-q", "0"]);
    assert!(mosquitto_pub(&args, &topic, &payload).status.success());

    let total = expected.len() + n + 1;
    wait_forwarded(&gateway, total).await;
    let events = nats.read_readings(STREAM).await;
    assert_eq!(events.len(), total, "nothing doubled");
    let validator = event_validator();
    for e in &events {
        assert!(validator.is_valid(&e.body), "contract: {:#}", e.body);
    }
    for expect in &expected {
        let hits = events
            .iter()
            .filter(|e| matches_expected(&e.body["payload"], expect))
            .count();
        assert_eq!(hits, 1, "expected {expect} once");
    }
    let probes: Vec<_> = events
        .iter()
        .filter(|e| e.body["payload"]["device_id"] == "probe-1")
        .cloned()
        .collect();
    assert_exactly_once(&values_in_order(&probes), n + 1);
    assert_eq!(
        gateway.metric("sahool_gateway_readings_rejected_total", ""),
        0.0
    );
    assert!(
        gateway.metric("sahool_gateway_mqtt_listener_puback_seconds_count", "") >= (n + 3) as f64
    );

    // A second connection with the same client id takes over; the first is told why.
    let twin = |keep_alive: u64| {
        let mut o = rumqttc::v5::MqttOptions::new("twin", "127.0.0.1", port);
        o.set_credentials(USER, PASSWORD)
            .set_keep_alive(Duration::from_secs(keep_alive));
        rumqttc::v5::AsyncClient::new(o, 8)
    };
    let (_first, mut first) = twin(30);
    let (_second, mut second) = twin(31);
    connack_v5(&mut first).await;
    connack_v5(&mut second).await;
    assert_eq!(
        disconnect_reason(&mut first).await,
        Some(DisconnectReasonCode::SessionTakenOver)
    );
    drop(second);

    // Shutdown: a connected MQTT 5 client is told the server is going away.
    let mut o = rumqttc::v5::MqttOptions::new("idle-v5", "127.0.0.1", port);
    o.set_credentials(USER, PASSWORD).set_clean_start(false);
    let (_client, mut eventloop) = rumqttc::v5::AsyncClient::new(o, 8);
    // Resuming a session is always possible (a publisher's session holds nothing), so clients
    // resend what they had not got a PUBACK for.
    assert!(connack_v5(&mut eventloop).await.session_present);
    gateway.signal("TERM");
    assert_eq!(
        disconnect_reason(&mut eventloop).await,
        Some(DisconnectReasonCode::ServerShuttingDown)
    );
    assert_eq!(gateway.terminate(), Some(0), "SIGTERM exits 0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_clients_publish_loses_no_acknowledged_reading() {
    let nats = Nats::with_platform_stream().await;
    let port = free_port();
    let mut gateway = Gateway::start(&probe_listener_config(&nats, port, "", ""));
    let n = 2_000;
    let pace = Some(Duration::from_millis(15));
    let acked = Arc::new(AtomicUsize::new(0));
    let v4 = tokio::spawn(publish_until_acked(
        false,
        port,
        "kill-v4",
        None,
        probe_readings(0..n),
        pace,
        acked.clone(),
    ));
    let v5 = tokio::spawn(publish_until_acked(
        true,
        port,
        "kill-v5",
        None,
        probe_readings(n..2 * n),
        pace,
        acked.clone(),
    ));
    // Kill while readings arrive, commit and flow; the clients resend what was not PUBACKed.
    for round in 0..4u64 {
        let before = acked.load(Ordering::Relaxed);
        gateway.wait_until("publishes acknowledged", Duration::from_secs(60), |_| {
            acked.load(Ordering::Relaxed) > before + 100
        });
        tokio::time::sleep(Duration::from_millis(50 * round)).await;
        gateway.kill9();
        tokio::time::sleep(Duration::from_millis(300)).await;
        gateway.resume();
    }
    assert_eq!(v4.await.expect("v4 publisher"), n, "every publish PUBACKed");
    assert_eq!(v5.await.expect("v5 publisher"), n, "every publish PUBACKed");
    let deadline = Instant::now() + Duration::from_secs(120);
    let events = loop {
        let events = nats.read_readings(STREAM).await;
        if events.len() >= 2 * n {
            // Anything doubled would arrive with the rest of the backlog: let it settle.
            gateway.wait_until("buffer drained", Duration::from_secs(30), |g| {
                g.metric("sahool_gateway_buffer_readings", "") == 0.0
            });
            tokio::time::sleep(Duration::from_millis(500)).await;
            break nats.read_readings(STREAM).await;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} in the stream\n{}",
            events.len(),
            2 * n,
            gateway.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_exactly_once(&values_in_order(&events), 2 * n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_silent_past_its_keep_alive_is_closed_and_one_that_pings_is_kept() {
    let setup = PasswordSetup::start("keep_alive_min = \"1s\"").await;
    let open = |id: &str| {
        let mut s = TcpStream::connect(("127.0.0.1", setup.port)).expect("connect");
        s.write_all(&connect_packet_keeping(id, Some((USER, PASSWORD)), 2))
            .expect("CONNECT");
        assert_eq!(connack(&mut s), Some(0));
        s
    };
    // Keep-alive 2 s: silent for 3 s (1.5 ×), a client is dropped.
    let mut pinging = open("pinging");
    let mut silent = open("silent");
    for _ in 0..8 {
        pinging.write_all(&[0xC0, 0x00]).expect("PINGREQ");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(
        closed_by_gateway(&mut silent, Duration::from_secs(5)),
        "a client silent for 8 s with a keep-alive of 2 s is closed"
    );
    let mut answers = [0u8; 16];
    pinging
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    pinging.read_exact(&mut answers).expect("8 PINGRESPs");
    assert_eq!(answers, [0xD0, 0x00].repeat(8).as_slice());
    assert!(
        !closed_by_gateway(&mut pinging, Duration::from_millis(500)),
        "a client pinging every second for 8 s is kept"
    );
    assert!(
        closed_by_gateway(&mut pinging, Duration::from_secs(10)),
        "once it goes silent, it is closed too"
    );
    drop(setup);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_clients_are_refused_while_a_good_one_keeps_publishing() {
    let max_connections = 20;
    let PasswordSetup {
        nats,
        port,
        gateway,
        _secrets,
        ..
    } = PasswordSetup::start(&format!(
        "max_connections = {max_connections}\nmax_packet_size = \"16KiB\""
    ))
    .await;
    let n = 600;
    let acked = Arc::new(AtomicUsize::new(0));
    let good = tokio::spawn(publish_until_acked(
        false,
        port,
        "good-node",
        Some((USER, PASSWORD)),
        probe_readings(0..n),
        // Paced to go on publishing through every attack below.
        Some(Duration::from_millis(1000)),
        acked.clone(),
    ));
    gateway.wait_until(
        "the good client publishing",
        Duration::from_secs(30),
        |_| acked.load(Ordering::Relaxed) > 0,
    );
    let p = port.to_string();
    let (topic, bad_payload) = probe_reading(n + 1);

    // Wrong password, no credentials.
    let wrong = [
        "-h",
        "127.0.0.1",
        "-p",
        &p,
        "-u",
        USER,
        "-P",
        "not-the-password-1",
        "-q",
        "1",
    ];
    let out = mosquitto_pub(&wrong, &topic, &bad_payload);
    assert!(!out.status.success(), "a wrong password is refused");
    assert!(
        text(&out).contains("bad user name or password"),
        "{}",
        text(&out)
    );
    let out = mosquitto_pub(
        &["-h", "127.0.0.1", "-p", &p, "-q", "1"],
        &topic,
        &bad_payload,
    );
    assert!(!out.status.success(), "no credentials, no entry");
    let mut v5_wrong = wrong.to_vec();
    v5_wrong.extend(["-V", "5"]);
    assert!(!mosquitto_pub(&v5_wrong, &topic, &bad_payload)
        .status
        .success());
    assert!(rejects(&gateway, "auth") >= 3.0);

    // SUBSCRIBE, in both versions: refused with a reason code, the connection stays usable.
    for version in ["mqttv311", "5"] {
        let mut args = login(&p);
        args.extend(["-V", version, "-t", "#", "-C", "1", "-W", "5"]);
        let out = Command::new("mosquitto_sub")
            .args(&args)
            .output()
            .expect("mosquitto_sub");
        assert!(text(&out).contains("denied"), "{version}: {}", text(&out));
    }
    assert!(rejects(&gateway, "subscribe") >= 2.0);

    // An oversized packet: refused from its header, the connection closed.
    let mut big = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    big.write_all(&connect_packet("big", Some((USER, PASSWORD))))
        .expect("CONNECT");
    assert_eq!(connack(&mut big), Some(0));
    big.write_all(&[0x32, 0xA0, 0x8D, 0x06, 0x00, 0x01, b'x'])
        .expect("header of 100 kB");
    assert!(
        closed_by_gateway(&mut big, Duration::from_secs(15)),
        "oversized packet closes"
    );
    assert!(rejects(&gateway, "oversize") >= 1.0);

    // Garbage: before CONNECT, and after it.
    let mut http = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    http.write_all(b"GET / HTTP/1.1\r\nHost: gateway.local\r\nAccept: */*\r\n\r\n")
        .expect("write");
    assert!(closed_by_gateway(&mut http, Duration::from_secs(15)));
    let mut noise = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    noise
        .write_all(&connect_packet("noise", Some((USER, PASSWORD))))
        .expect("CONNECT");
    assert_eq!(connack(&mut noise), Some(0));
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8 | 0xF0)
        .collect();
    let _ = noise.write_all(&garbage);
    assert!(closed_by_gateway(&mut noise, Duration::from_secs(15)));
    assert!(rejects(&gateway, "protocol") >= 2.0);

    // A client opening 1,000 connections: beyond max_connections they are refused.
    let flood = tokio::task::spawn_blocking(move || {
        let mut streams = Vec::new();
        for i in 0..1000 {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
                let _ = s.write_all(&connect_packet(
                    &format!("flood-{i}"),
                    Some((USER, PASSWORD)),
                ));
                streams.push(s);
            }
        }
        let (mut accepted, mut busy, mut closed) = (0, 0, 0);
        for s in &mut streams {
            match connack(s) {
                Some(0) => accepted += 1,
                Some(3) => busy += 1,
                Some(code) => panic!("CONNACK {code}"),
                None => closed += 1,
            }
        }
        (streams, accepted, busy, closed)
    });
    let (streams, accepted, busy, closed) = flood.await.expect("flood");
    assert!(
        acked.load(Ordering::Relaxed) < n,
        "the good client is still publishing during the flood"
    );
    assert!(
        accepted < max_connections,
        "{accepted} accepted: the good client holds a slot"
    );
    assert_eq!(accepted + busy + closed, 1000);
    assert!(busy > 0, "some were told the server is busy");
    assert!(rejects(&gateway, "too_many_connections") >= (1000 - max_connections) as f64);
    // The good client is unaffected while the flood holds every other slot.
    let during = acked.load(Ordering::Relaxed);
    gateway.wait_until(
        "the good client still publishing",
        Duration::from_secs(30),
        |_| acked.load(Ordering::Relaxed) > during,
    );
    drop(streams);
    // Slots come back once the flood's connections close.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut args = login(&p);
        args.extend(["-q", "0"]);
        // QoS 0 to a topic no sensor maps: it only proves a client gets in again.
        let out = mosquitto_pub(&args, "sahool/sensors/nobody/none/water_level", b"{}");
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no slot after the flood: {}",
            text(&out)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    assert_eq!(
        good.await.expect("good client"),
        n,
        "every good publish PUBACKed"
    );
    wait_forwarded(&gateway, n).await;
    assert_exactly_once(&values_in_order(&nats.read_readings(STREAM).await), n);
    assert!(gateway.get("/healthz").is_some(), "still running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_test_ca_with_and_without_client_certificates() {
    let nats = Nats::with_platform_stream().await;
    let secrets = tempfile::tempdir().expect("tempdir");
    let pki = pki::Pki::new("listener");
    let server = pki.server("listener");
    let client = pki.client("device");
    let rogue = pki::Pki::new("rogue");
    let rogue_client = rogue.client("rogue-device");
    let (ca, rogue_ca) = (pki.ca_file(), rogue.ca_file());
    let passwords = password_file(secrets.path());
    let (pw_port, cert_port) = (free_port(), free_port());
    let listeners = format!(
        "{}\n[[mqtt_listener]]\nname = \"tls-cert\"\nlisten = \"127.0.0.1:{cert_port}\"\nformat = \"sahool\"\n\
         topics = [\"sahool/sensors/#\"]\nauth = \"certificate\"\ntls_cert_file = \"{cert}\"\n\
         tls_key_file = \"{key}\"\ntls_client_ca_file = \"{ca}\"\n",
        password_listener(
            "tls-pw",
            pw_port,
            &passwords,
            &format!(
                "tls_cert_file = \"{}\"\ntls_key_file = \"{}\"",
                server.cert.display(),
                server.key.display()
            )
        ),
        cert = server.cert.display(),
        key = server.key.display(),
        ca = ca.display(),
    );
    let gateway = Gateway::start(&config(&nats, &listeners, ""));
    let (topic, first) = probe_reading(0);
    let (_, second) = probe_reading(1);
    let (_, never) = probe_reading(2);
    let publishes = |args: Vec<String>, payload: &[u8]| {
        let out = mosquitto_pub(&args, &topic, payload);
        (out.status.success(), text(&out))
    };
    let credentials = ["-u", USER, "-P", PASSWORD].map(String::from);

    // Server certificate only, password auth; the client checks the server against the CA.
    let trusting = |port, ca| tls_args(port, ca, None);
    let (ok, out) = publishes(
        [trusting(pw_port, &ca), credentials.to_vec()].concat(),
        &first,
    );
    assert!(ok, "TLS + password: {out}");
    let untrusted = [trusting(pw_port, &rogue_ca), credentials.to_vec()].concat();
    assert!(!publishes(untrusted, &never).0, "server not trusted");
    let plaintext = [
        vec![
            "-h".into(),
            "127.0.0.1".into(),
            "-p".into(),
            pw_port.to_string(),
        ],
        credentials.to_vec(),
    ]
    .concat();
    assert!(!publishes(plaintext, &never).0, "plaintext refused");

    // Client certificates required: from our CA accepted, none or another CA's refused.
    let with_cert = tls_args(cert_port, &ca, Some((&client.cert, &client.key)));
    let (ok, out) = publishes(with_cert, &second);
    assert!(ok, "client certificate: {out}");
    assert!(
        !publishes(trusting(cert_port, &ca), &never).0,
        "no client certificate"
    );
    let rogue = tls_args(
        cert_port,
        &ca,
        Some((&rogue_client.cert, &rogue_client.key)),
    );
    assert!(!publishes(rogue, &never).0, "another CA's certificate");
    gateway.wait_until(
        "certificate refusals counted",
        Duration::from_secs(10),
        |g| rejects(g, "auth") >= 2.0 && rejects(g, "tls") >= 1.0,
    );

    wait_forwarded(&gateway, 2).await;
    assert_exactly_once(&values_in_order(&nats.read_readings(STREAM).await), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_new_withholds_pubacks_until_the_buffer_has_room() {
    let mut nats = Nats::with_platform_stream().await;
    let port = free_port();
    let gateway = Gateway::start(&probe_listener_config(
        &nats,
        port,
        "max_bytes = \"32KiB\"\nwhen_full = \"reject_new\"",
        "",
    ));
    nats.stop();
    let n = 1_000;
    let acked = Arc::new(AtomicUsize::new(0));
    let publisher = tokio::spawn(publish_until_acked(
        false,
        port,
        "held",
        None,
        probe_readings(0..n),
        None,
        acked.clone(),
    ));
    gateway.wait_until("intake paused at the bound", Duration::from_secs(60), |g| {
        g.metric("sahool_gateway_intake_paused", "") == 1.0
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let held_at = acked.load(Ordering::Relaxed);
    let accepted = gateway.metric("sahool_gateway_readings_accepted_total", "");
    assert!(held_at < n, "PUBACKs withheld: {held_at} of {n}");
    assert!(
        held_at as f64 <= accepted,
        "every PUBACK stands for a committed reading ({held_at} PUBACKed, {accepted} committed)"
    );
    assert_eq!(
        gateway.metric("sahool_gateway_readings_dropped_total", ""),
        0.0
    );

    nats.resume();
    assert_eq!(publisher.await.expect("publisher"), n);
    wait_forwarded(&gateway, n).await;
    assert_exactly_once(&values_in_order(&nats.read_readings(STREAM).await), n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_password_file_admits_new_users_and_keeps_connections() {
    let PasswordSetup {
        nats,
        port,
        mut gateway,
        passwords,
        _secrets,
    } = PasswordSetup::start("").await;
    let p = port.to_string();
    let (topic, payload) = probe_reading(0);
    let newcomer = [
        "-h",
        "127.0.0.1",
        "-p",
        &p,
        "-u",
        "node-2",
        "-P",
        "second-long-secret-2",
        "-q",
        "1",
    ];
    assert!(
        !mosquitto_pub(&newcomer, &topic, &payload).status.success(),
        "not yet a user"
    );

    let acked = Arc::new(AtomicUsize::new(0));
    let steady = tokio::spawn(publish_until_acked(
        true,
        port,
        "steady",
        Some((USER, PASSWORD)),
        probe_readings(1..301),
        Some(Duration::from_millis(1000)),
        acked.clone(),
    ));
    gateway.wait_until("steady client publishing", Duration::from_secs(30), |_| {
        acked.load(Ordering::Relaxed) > 0
    });
    add_user(&passwords, "node-2", "second-long-secret-2");
    let connections = gateway.metric("sahool_gateway_mqtt_listener_connections_total", "");
    gateway.signal("HUP");
    gateway.wait_until("config reloaded", Duration::from_secs(20), |g| {
        g.log().contains("SIGHUP: config reloaded")
    });
    let out = mosquitto_pub(&newcomer, &topic, &payload);
    assert!(
        out.status.success(),
        "new user after reload: {}",
        text(&out)
    );

    assert_eq!(steady.await.expect("steady"), 300);
    assert_eq!(
        gateway.metric("sahool_gateway_mqtt_listener_connections_total", ""),
        connections + 1.0,
        "the steady client kept its connection; only the newcomer connected"
    );
    wait_forwarded(&gateway, 301).await;
    assert_exactly_once(&values_in_order(&nats.read_readings(STREAM).await), 301);
}
