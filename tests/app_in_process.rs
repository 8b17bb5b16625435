//! The app started in-process, as `main` starts it but with the parts a test controls:
//! `app::run` with an HTTP listener on port 0, a oneshot as shutdown and a channel of configs as
//! reloads, against real nats-server and mosquitto. A reload of the mapping and `[nats]` keeps
//! the buffer; reloads that add, change and remove an MQTT source, a serial port and an MQTT
//! listener leave the unchanged ones running; a source that cannot start leaves the rest
//! running and starts on the next reload; and the shutdown order: every committed reading is
//! forwarded or kept, and nothing the gateway acknowledged to its sender was left uncommitted. Signals and exit codes are the binary's
//! and stay tested through it (reload.rs, guarantees.rs, systemd_notify.rs).

mod support;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sahool_gateway::{app, config};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use support::pty::SerialLink;
use support::{
    assert_exactly_once, free_port, http_get, metric_value, probe_config, probe_reading,
    probe_readings, publish_all, values_in_order, Mosquitto, Nats,
};

const STREAM: &str = "SAHOOL_IOT";
const WITHIN: Duration = Duration::from_secs(30);

/// A gateway running in this process.
struct App {
    dir: AppDir,
    stop: oneshot::Sender<()>,
    reloads: mpsc::Sender<config::Config>,
    run: JoinHandle<Result<(), app::RunError>>,
}

impl App {
    /// Starts the app with `config` (TOML without `[gateway]` and `[http]`), keeping its
    /// config file and buffer in `dir`.
    async fn start(dir: &Path, config: &str) -> Self {
        let http = TcpListener::bind("127.0.0.1:0").await.expect("bind HTTP");
        let dir = AppDir {
            config_path: dir.join("gateway.toml"),
            data_dir: dir.join("data"),
            http_port: http.local_addr().expect("HTTP address").port(),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let (reloads, reloaded) = mpsc::channel(1);
        let shutdown = async {
            let _ = stopped.await;
        };
        let run = tokio::spawn(app::run(dir.load(config), http, shutdown, reloaded));
        Self {
            dir,
            stop,
            reloads,
            run,
        }
    }

    /// Hands the app `config` and returns once it is applied. The channel holds one config:
    /// the third send goes through only after the app took the second, which it does only
    /// after applying the first (the second and third change nothing).
    async fn reload(&self, config: &str) {
        let new = self.dir.load(config);
        for _ in 0..3 {
            self.reloads.send(new.clone()).await.expect("app running");
        }
    }

    fn metric(&self, name: &str, labels: &str) -> f64 {
        http_get(self.dir.http_port, "/metrics")
            .map_or(0.0, |(_, body)| metric_value(&body, name, labels))
    }

    async fn wait_until(&self, what: &str, mut done: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + WITHIN;
        while !done(self) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}:\n{}",
                http_get(self.dir.http_port, "/metrics").map_or_else(String::new, |(_, b)| b)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_forwarded(&self, n: usize) {
        self.wait_until(&format!("{n} readings forwarded"), |a| {
            a.metric("sahool_gateway_readings_forwarded_total", "") >= n as f64
        })
        .await;
    }

    /// Shuts the app down in order and returns how `run` ended.
    async fn shut_down(self) -> Result<(), app::RunError> {
        let _ = self.stop.send(());
        tokio::time::timeout(WITHIN, self.run)
            .await
            .expect("shut down in time")
            .expect("run did not panic")
    }
}

/// NATS, a broker, and an app in `dir` reading probe readings through the `[[mqtt]]` source
/// `farm` (the config without `[gateway]` and `[http]` is `base`).
struct Farm {
    nats: Nats,
    broker: Mosquitto,
    dir: tempfile::TempDir,
    base: String,
    app: App,
}

impl Farm {
    /// Starts them all and waits until `farm` is connected.
    async fn start() -> Self {
        let nats = Nats::with_platform_stream().await;
        let broker = Mosquitto::start();
        let dir = tempfile::tempdir().expect("tempdir");
        let base = probe_config(&nats, &broker, "", "");
        let app = App::start(dir.path(), &base).await;
        app.wait_until("farm connected", |a| {
            a.metric("sahool_gateway_mqtt_connected", "") == 1.0
        })
        .await;
        Self {
            nats,
            broker,
            dir,
            base,
            app,
        }
    }
}

/// Where an app keeps its config file and buffer.
struct AppDir {
    config_path: PathBuf,
    data_dir: PathBuf,
    http_port: u16,
}

impl AppDir {
    /// Writes the full config file and reads it as `run` and SIGHUP do.
    fn load(&self, config: &str) -> config::Config {
        let full = format!(
            "[gateway]\nid = \"gw-test\"\ntenant_id = \"tenant-a\"\ndata_dir = \"{}\"\n\n[http]\nlisten = \"127.0.0.1:{}\"\n\n{config}",
            self.data_dir.display(),
            self.http_port
        );
        std::fs::write(&self.config_path, full).expect("write config");
        config::load(&self.config_path).expect("a valid config")
    }
}

/// (device, value) of each reading in the stream, in stream order.
async fn readings(nats: &Nats) -> Vec<(String, f64)> {
    nats.read_readings(STREAM)
        .await
        .iter()
        .map(|m| {
            let p = &m.body["payload"];
            (
                p["device_id"].as_str().unwrap_or_default().to_string(),
                p["value"].as_f64().unwrap_or(f64::NAN),
            )
        })
        .collect()
}

fn values_of(readings: &[(String, f64)], device: &str) -> Vec<f64> {
    readings
        .iter()
        .filter(|(d, _)| d == device)
        .map(|(_, v)| *v)
        .collect()
}

/// An `[[mqtt]]` source on `broker` for probe readings published under `prefix`.
fn mqtt_source(broker: &Mosquitto, name: &str, prefix: &str) -> String {
    format!(
        "\n[[mqtt]]\nname = \"{name}\"\nurl = \"{}\"\ntopics = [\"{prefix}/#\"]\nformat = \"sahool\"\n",
        broker.url()
    )
}

/// Probe readings `range` published under `prefix` instead of `sahool/sensors`.
fn readings_under(prefix: &str, range: std::ops::Range<usize>) -> Vec<(String, Vec<u8>)> {
    probe_readings(range)
        .into_iter()
        .map(|(topic, payload)| (topic.replacen("sahool/sensors", prefix, 1), payload))
        .collect()
}

/// Reloads with `base` and a source named `second` for topics under `prefix`, and checks
/// that it carries readings `range` through (the earlier ones forwarded already).
async fn second_source_carries(
    app: &App,
    broker: &Mosquitto,
    base: &str,
    prefix: &str,
    range: std::ops::Range<usize>,
) {
    app.reload(&format!("{base}{}", mqtt_source(broker, "second", prefix)))
        .await;
    app.wait_until("second connected", |a| {
        a.metric("sahool_gateway_mqtt_connected", "") == 2.0
    })
    .await;
    // Connected comes just before the subscription.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (len, end) = (range.len(), range.end);
    let acked = publish_all(broker.port, "p", readings_under(prefix, range)).await;
    assert_eq!(acked, len);
    app.wait_forwarded(end).await;
}

/// How often mosquitto saw a client with this id connect.
fn connects(broker: &Mosquitto, client_id: &str) -> usize {
    broker
        .log()
        .lines()
        .filter(|l| l.contains("New client connected") && l.contains(&format!(" as {client_id} ")))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_add_change_and_remove_an_mqtt_source_and_leave_the_others_running() {
    let f = Farm::start().await;

    // Added: a second connection, for topics under sahool/other; then changed to sahool/more.
    second_source_carries(&f.app, &f.broker, &f.base, "sahool/other", 0..3).await;
    second_source_carries(&f.app, &f.broker, &f.base, "sahool/more", 3..6).await;

    // Removed: what comes under sahool/more is no longer read; farm still is.
    f.app.reload(&f.base).await;
    let p = publish_all(f.broker.port, "p", readings_under("sahool/more", 100..103)).await;
    assert_eq!(p, 3);
    let p = publish_all(f.broker.port, "p", probe_readings(6..9)).await;
    assert_eq!(p, 3);
    f.app.wait_forwarded(9).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        f.app.metric("sahool_gateway_readings_forwarded_total", ""),
        9.0
    );

    assert_eq!(
        connects(&f.broker, "sahool-gw-gw-test-farm"),
        1,
        "farm never restarted:\n{}",
        f.broker.log()
    );
    assert_eq!(connects(&f.broker, "sahool-gw-gw-test-second"), 2);
    f.app.shut_down().await.expect("a clean stop");
    assert_exactly_once(&values_in_order(&f.nats.read_readings(STREAM).await), 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_of_mapping_and_nats_keeps_the_buffer_and_sends_each_reading_once() {
    let mut f = Farm::start().await;
    let probe_2 = |value: usize| {
        let (topic, payload) = probe_reading(value);
        let swap = |t: &str| t.replace("probe-1", "probe-2");
        (
            swap(&topic),
            swap(&String::from_utf8_lossy(&payload)).into_bytes(),
        )
    };
    f.nats.stop();
    assert_eq!(
        publish_all(f.broker.port, "p", probe_readings(0..50)).await,
        50
    );
    f.app
        .wait_until("buffered", |a| {
            a.metric("sahool_gateway_buffer_readings", "") == 50.0
        })
        .await;

    // probe-2 mapped, and a new [nats] setting: the forwarder reconnects, the buffer stays.
    let new = f
        .base
        .replace("ack_timeout = \"2s\"", "ack_timeout = \"3s\"")
        + "  [[fields.sensors]]\n  device_id = \"probe-2\"\n  sensor_type = \"water_level\"\n";
    f.app.reload(&new).await;
    assert_eq!(f.app.metric("sahool_gateway_buffer_readings", ""), 50.0);
    assert_eq!(
        publish_all(f.broker.port, "p", vec![probe_2(1000)]).await,
        1
    );
    f.nats.resume();
    f.app.wait_forwarded(51).await;

    f.app.shut_down().await.expect("a clean stop");
    let got = readings(&f.nats).await;
    assert_eq!(values_of(&got, "probe-2"), [1000.0]);
    let probe_1: Vec<usize> = values_of(&got, "probe-1")
        .iter()
        .map(|v| *v as usize)
        .collect();
    assert_eq!(probe_1, (0..50).collect::<Vec<_>>(), "once each, in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_that_cannot_start_leaves_the_rest_running_and_starts_on_the_next_reload() {
    let f = Farm::start().await;
    let secret = f.dir.path().join("mqtt.password");
    let with_second = format!(
        "{}{}username = \"gw\"\npassword_file = \"{}\"\n",
        f.base,
        mqtt_source(&f.broker, "second", "sahool/other"),
        secret.display()
    );
    // The password file does not exist yet: second cannot start, farm goes on.
    f.app.reload(&with_second).await;
    let acked = publish_all(f.broker.port, "p", probe_readings(0..5)).await;
    assert_eq!(acked, 5);
    f.app.wait_forwarded(5).await;
    assert_eq!(f.app.metric("sahool_gateway_mqtt_connected", ""), 1.0);

    // Once the file is there, the same config starts it.
    std::fs::write(&secret, "a-long-random-broker-password-1\n").expect("write password");
    f.app.reload(&with_second).await;
    f.app
        .wait_until("second connected", |a| {
            a.metric("sahool_gateway_mqtt_connected", "") == 2.0
        })
        .await;
    f.app.shut_down().await.expect("a clean stop");
}

/// Ports `a`, `b` and `c` as `present` names them (`b` in `b_form`), each with a kv or csv
/// talker printing `level` for its own water level sensor `probe-<port>`.
fn ports_config(nats: &Nats, links: &[(&str, &SerialLink)], b_form: &str) -> String {
    let mut text = format!("[nats]\nservers = [\"{}\"]\n", nats.url());
    for (name, link) in links {
        let form = if *name == "b" {
            b_form
        } else {
            "line_format = \"kv\""
        };
        text += &format!(
            "\n[[serial]]\nname = \"{name}\"\npath = \"{}\"\nprotocol = \"lines\"\ndevice_id = \"probe-{name}\"\n{form}\n",
            link.path.display()
        );
    }
    text += "\n[[fields]]\nid = \"field-1\"\n";
    for (name, _) in links {
        text += &format!(
            "  [[fields.sensors]]\n  device_id = \"probe-{name}\"\n  sensor_type = \"water_level\"\n  line = {{ port = \"{name}\", key = \"level\" }}\n"
        );
    }
    text
}

/// Waits until the port is open and past the moment in which bytes may still belong to a line
/// begun before (`lines::SETTLE`).
async fn wait_port_open(app: &App, port: &str) {
    let label = format!("port=\"{port}\"");
    app.wait_until(&format!("serial port {port} open"), |a| {
        a.metric("sahool_gateway_serial_port_up", &label) == 1.0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_add_change_and_remove_a_serial_port_and_leave_the_others_open() {
    let nats = Nats::with_platform_stream().await;
    let mut a = SerialLink::plugged("usb-a");
    let mut b = SerialLink::plugged("usb-b");
    let mut c = SerialLink::plugged("usb-c");
    let dir = tempfile::tempdir().expect("tempdir");
    let kv = "line_format = \"kv\"";
    let csv = "line_format = \"csv\"\ncolumns = [\"level\"]";
    let app = App::start(
        dir.path(),
        &ports_config(&nats, &[("a", &a), ("b", &b)], kv),
    )
    .await;
    wait_port_open(&app, "a").await;
    wait_port_open(&app, "b").await;
    a.write(b"level=1\n");
    b.write(b"level=2\n");
    app.wait_forwarded(2).await;

    // Changed: b reads CSV now. a is unchanged: a line begun before the reload and finished
    // after it arrives whole only if a kept its device open.
    a.write(b"level=");
    tokio::time::sleep(Duration::from_millis(300)).await;
    app.reload(&ports_config(&nats, &[("a", &a), ("b", &b)], csv))
        .await;
    wait_port_open(&app, "b").await;
    a.write(b"3\n");
    b.write(b"level\n4\n");
    app.wait_forwarded(4).await;

    // Added c, removed a.
    app.reload(&ports_config(&nats, &[("b", &b), ("c", &c)], csv))
        .await;
    wait_port_open(&app, "c").await;
    app.wait_until("a closed", |app| {
        app.metric("sahool_gateway_serial_port_up", "port=\"a\"") == 0.0
    })
    .await;
    a.write(b"level=6\n");
    c.write(b"level=5\n");
    app.wait_forwarded(5).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    app.shut_down().await.expect("a clean stop");
    let got = readings(&nats).await;
    assert_eq!(
        values_of(&got, "probe-a"),
        [1.0, 3.0],
        "a kept its device open"
    );
    assert_eq!(values_of(&got, "probe-b"), [2.0, 4.0], "b reads CSV");
    assert_eq!(values_of(&got, "probe-c"), [5.0], "c was added, a removed");
}

/// An `[[mqtt_listener]]` for probe readings on `127.0.0.1:{port}`.
fn listener(port: u16) -> String {
    format!(
        "\n[[mqtt_listener]]\nname = \"devices\"\nlisten = \"127.0.0.1:{port}\"\ntopics = [\"sahool/sensors/#\"]\nformat = \"sahool\"\nauth = \"none\"\n"
    )
}

fn listening(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_add_change_and_remove_a_listener() {
    let f = Farm::start().await;
    let (first, second) = (free_port(), free_port());
    assert!(!listening(first));

    f.app
        .reload(&format!("{}{}", f.base, listener(first)))
        .await;
    assert_eq!(publish_all(first, "dev", probe_readings(0..5)).await, 5);
    f.app.wait_forwarded(5).await;

    f.app
        .reload(&format!("{}{}", f.base, listener(second)))
        .await;
    assert!(!listening(first), "the old address is closed");
    assert_eq!(publish_all(second, "dev", probe_readings(5..10)).await, 5);
    f.app.wait_forwarded(10).await;

    f.app.reload(&f.base).await;
    assert!(!listening(second), "a removed listener is closed");
    assert_eq!(
        publish_all(f.broker.port, "p", probe_readings(10..12)).await,
        2
    );
    f.app.wait_forwarded(12).await;

    assert_eq!(
        connects(&f.broker, "sahool-gw-gw-test-farm"),
        1,
        "the MQTT source was not touched"
    );
    f.app.shut_down().await.expect("a clean stop");
    assert_exactly_once(&values_in_order(&f.nats.read_readings(STREAM).await), 12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_mid_stream_forwards_or_keeps_every_committed_reading_and_acks_no_other() {
    let n = 5000;
    let Farm {
        mut nats,
        broker,
        dir,
        base: config,
        app,
    } = Farm::start().await;
    let port = broker.port;
    let publisher = tokio::spawn(async move { publish_all(port, "p", probe_readings(0..n)).await });
    let accepted = |at_least: f64| {
        move |a: &App| a.metric("sahool_gateway_readings_accepted_total", "") >= at_least
    };
    app.wait_until("forwarding under way", accepted(100.0))
        .await;
    // NATS goes away mid-drain, so the stop finds readings to keep and PubAcks outstanding.
    nats.stop();
    app.wait_until("readings buffered", accepted(600.0)).await;
    let data_dir = app.dir.data_dir.clone();
    app.shut_down().await.expect("a clean stop");

    // Committed = forwarded + kept; a row is deleted only after its PubAck, so the stream
    // holds at least the forwarded ones (one stored whose PubAck was lost is sent again).
    let stats = sahool_gateway::store::Inspector::open(&data_dir.join("buffer.db"))
        .and_then(|i| i.stats())
        .expect("buffer stats");
    assert_eq!(
        stats.counts.accepted,
        stats.counts.forwarded + stats.readings,
        "every committed reading forwarded or kept: {stats:?}"
    );
    assert!(
        stats.counts.accepted < n as u64 && stats.readings > 0,
        "the stop came while readings arrived and before they were forwarded: {stats:?}"
    );
    nats.resume();
    let in_stream = nats.read_readings(STREAM).await.len() as u64;
    assert!(
        (stats.counts.forwarded..=stats.counts.accepted).contains(&in_stream),
        "{in_stream} in the stream: {stats:?}"
    );
    assert_eq!(publisher.await.expect("publisher"), n);

    // What the stop left unacknowledged comes again from the broker's session; what was kept
    // is forwarded: each reading once.
    let app = App::start(dir.path(), &config).await;
    let rest = (n as u64 - stats.counts.accepted) as f64;
    app.wait_until("everything forwarded", |a| {
        a.metric("sahool_gateway_buffer_readings", "") == 0.0
            && a.metric("sahool_gateway_readings_accepted_total", "") >= rest
    })
    .await;
    app.shut_down().await.expect("a clean stop");
    assert_exactly_once(&values_in_order(&nats.read_readings(STREAM).await), n);
}
