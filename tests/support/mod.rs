//! Real parts for integration tests: nats-server and mosquitto on free loopback ports in temp
//! directories, the gateway binary itself, an MQTT publisher and a stream reader. Every process
//! is killed when its handle drops.
#![allow(dead_code)]

pub mod commands;
pub mod pty;
pub mod sim_node;
pub mod steady;

use std::collections::{BTreeMap, HashSet};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::Value;

/// The gateway binary. Cargo names it for integration tests; examples (`--example demo`, in
/// `target/<profile>/examples/`) get no such variable, so they use the binary Cargo builds one
/// directory up, in `target/<profile>/`.
pub fn gateway_binary() -> PathBuf {
    if let Some(path) = option_env!("CARGO_BIN_EXE_sahool-gateway") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("path of the running executable");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the executable lives in target/<profile>/examples/");
    let binary = profile_dir.join("sahool-gateway");
    let release = if profile_dir.ends_with("release") {
        " --release"
    } else {
        ""
    };
    assert!(
        binary.exists(),
        "{} not found: build it first with `cargo build{release} --bin sahool-gateway`",
        binary.display()
    );
    binary
}

/// A loopback port free now and not handed out before in this test process: the kernel may
/// give a just-closed port again, and two listeners of one config on one port fail `validate`.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free loopback port");
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

pub fn wait_for_port(port: u16, within: Duration) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("nothing listens on 127.0.0.1:{port} after {within:?}");
}

fn require(binary: &str, package: &str) -> PathBuf {
    for dir in ["/usr/sbin", "/usr/bin", "/usr/local/bin", "/usr/local/sbin"] {
        let p = Path::new(dir).join(binary);
        if p.exists() {
            return p;
        }
    }
    panic!("{binary} not found: install the Debian package `{package}` (the README's test command does)");
}

fn kill(child: &mut Child, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(child.id().to_string())
        .status();
}

/// nats-server with a config file, its log to `log`.
fn spawn_nats_server(conf: &Path, log: std::fs::File) -> Child {
    Command::new(require("nats-server", "nats-server"))
        .arg("-c")
        .arg(conf)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start nats-server")
}

/// How the test's own client connects to a server that wants TLS or credentials.
pub type ClientOptions = Arc<dyn Fn() -> async_nats::ConnectOptions + Send + Sync>;

/// A nats-server with JetStream, restartable on the same port and store directory.
pub struct Nats {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    extra_config: String,
    client_options: Option<ClientOptions>,
}

impl Nats {
    pub fn start() -> Self {
        Self::start_with("")
    }

    /// `extra_config` is appended to the server config (e.g. `max_payload: 2048`).
    pub fn start_with(extra_config: &str) -> Self {
        let mut n = Self {
            port: free_port(),
            dir: tempfile::tempdir().expect("tempdir"),
            child: None,
            extra_config: extra_config.to_string(),
            client_options: None,
        };
        n.resume();
        n
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// A server with the platform's stream, `SAHOOL_IOT` on `sahool.iot.>`.
    pub async fn with_platform_stream() -> Self {
        let n = Self::start();
        n.create_stream("SAHOOL_IOT", &["sahool.iot.>"]).await;
        n
    }

    /// Starts the server again (after `stop`), keeping its JetStream data.
    pub fn resume(&mut self) {
        let conf = self.dir.path().join("nats.conf");
        let store = self.dir.path().join("js");
        std::fs::write(
            &conf,
            format!(
                "listen: 127.0.0.1:{}\njetstream {{ store_dir: \"{}\" }}\n{}\n",
                self.port,
                store.display(),
                self.extra_config
            ),
        )
        .expect("write nats.conf");
        let log = std::fs::File::create(self.dir.path().join("nats.log")).expect("nats log");
        self.child = Some(spawn_nats_server(&conf, log));
        wait_for_port(self.port, Duration::from_secs(10));
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The running server's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn freeze(&mut self) {
        if let Some(c) = self.child.as_mut() {
            kill(c, "STOP");
        }
    }

    pub fn thaw(&mut self) {
        if let Some(c) = self.child.as_mut() {
            kill(c, "CONT");
        }
    }

    /// The test's own client connects with these options (TLS, credentials) from now on.
    pub fn with_client_options(mut self, options: ClientOptions) -> Self {
        self.client_options = Some(options);
        self
    }

    /// The server's temp directory (config, log, JetStream store).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// What the server logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default()
    }

    pub async fn client(&self) -> async_nats::Client {
        match &self.client_options {
            Some(options) => options().connect(self.url()).await,
            None => async_nats::connect(self.url()).await,
        }
        .expect("test client connects to nats-server")
    }

    /// Creates a stream the way the platform does (`SAHOOL_IOT` on `sahool.iot.>`, 120 s
    /// duplicate window), or with other subjects.
    pub async fn create_stream(&self, name: &str, subjects: &[&str]) {
        let js = async_nats::jetstream::new(self.client().await);
        js.create_stream(async_nats::jetstream::stream::Config {
            name: name.to_string(),
            subjects: subjects.iter().map(|s| s.to_string()).collect(),
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .expect("create stream");
    }

    /// The `sensor_reading` events in the stream, in stream order (liveness events left out).
    pub async fn read_readings(&self, name: &str) -> Vec<StreamMessage> {
        let mut events = self.read_stream(name).await;
        events.retain(|e| e.body["event_type"] == "sensor_reading");
        events
    }

    /// Every message in the stream, in stream order: (subject, headers, body).
    pub async fn read_stream(&self, name: &str) -> Vec<StreamMessage> {
        read_stream_from(self.client().await, name).await
    }

    /// Hands every message in the stream to `visit`, in stream order, without keeping them:
    /// for streams too long to hold as JSON values.
    pub async fn visit_stream(&self, name: &str, visit: impl FnMut(StreamMessage)) -> usize {
        visit_stream_from(self.client().await, name, visit).await
    }
}

/// Every message in the stream, read through `client`, in stream order.
pub async fn read_stream_from(client: async_nats::Client, name: &str) -> Vec<StreamMessage> {
    let mut out = Vec::new();
    visit_stream_from(client, name, |m| out.push(m)).await;
    out
}

/// Hands every message in the stream, read through `client`, to `visit` in stream order;
/// returns how many there were.
pub async fn visit_stream_from(
    client: async_nats::Client,
    name: &str,
    mut visit: impl FnMut(StreamMessage),
) -> usize {
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream(name).await.expect("stream exists");
    let total = stream.info().await.expect("stream info").state.messages as usize;
    if total == 0 {
        return 0;
    }
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            ack_policy: async_nats::jetstream::consumer::AckPolicy::None,
            ..Default::default()
        })
        .await
        .expect("consumer");
    let mut messages = consumer.messages().await.expect("messages");
    for _ in 0..total {
        let next = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .expect("stream read timed out")
            .expect("stream ended")
            .expect("message");
        let headers = next
            .headers
            .as_ref()
            .map(|h| {
                h.iter()
                    .map(|(k, v)| {
                        (
                            k.to_string(),
                            v.first().map(|v| v.to_string()).unwrap_or_default(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let stored = next.info().expect("JetStream message info").published;
        visit(StreamMessage {
            subject: next.subject.to_string(),
            headers,
            body: serde_json::from_slice(&next.payload).expect("event is JSON"),
            stored,
        });
    }
    total
}

impl Drop for Nats {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            kill(c, "CONT");
        }
        self.stop();
    }
}

/// A nats-server cluster with JetStream on loopback: node `i` can be killed and restarted on its
/// own ports and store; every node is killed on drop.
pub struct Cluster {
    dir: tempfile::TempDir,
    ports: Vec<(u16, u16)>,
    children: Vec<Option<Child>>,
}

impl Cluster {
    pub fn start(nodes: usize) -> Self {
        let mut c = Self {
            dir: tempfile::tempdir().expect("tempdir"),
            ports: (0..nodes).map(|_| (free_port(), free_port())).collect(),
            children: (0..nodes).map(|_| None).collect(),
        };
        for i in 0..nodes {
            c.spawn(i);
        }
        for (port, _) in &c.ports {
            wait_for_port(*port, Duration::from_secs(10));
        }
        c
    }

    fn spawn(&mut self, i: usize) {
        let routes: Vec<String> = self
            .ports
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, (_, route))| format!("nats-route://127.0.0.1:{route}"))
            .collect();
        let (port, route) = self.ports[i];
        let conf = self.dir.path().join(format!("n{i}.conf"));
        std::fs::write(
            &conf,
            format!(
                "server_name: n{i}\nlisten: 127.0.0.1:{port}\njetstream {{ store_dir: \"{}\" }}\n\
                 cluster {{\n  name: sahool\n  listen: 127.0.0.1:{route}\n  routes: [{}]\n}}\n",
                self.dir.path().join(format!("n{i}")).display(),
                routes.join(", ")
            ),
        )
        .expect("write node config");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("n{i}.log")))
            .expect("node log");
        self.children[i] = Some(spawn_nats_server(&conf, log));
    }

    /// `nats://127.0.0.1:port` of every node.
    pub fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|(port, _)| format!("nats://127.0.0.1:{port}"))
            .collect()
    }

    /// Node `i`'s `server_name`.
    pub fn name(&self, i: usize) -> String {
        format!("n{i}")
    }

    /// SIGKILL to node `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts node `i` again with its store.
    pub fn restart(&mut self, i: usize) {
        self.spawn(i);
        wait_for_port(self.ports[i].0, Duration::from_secs(10));
    }

    /// A client that may use any node that is up.
    pub async fn client(&self) -> async_nats::Client {
        let addrs: Vec<async_nats::ServerAddr> = self
            .urls()
            .iter()
            .map(|u| u.parse().expect("node url"))
            .collect();
        async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect(addrs)
            .await
            .expect("test client connects to the cluster")
    }

    /// Creates a stream once the cluster has elected its JetStream leader (120 s duplicate
    /// window, as the platform's).
    pub async fn create_stream(&self, name: &str, subjects: &[&str], replicas: usize) {
        let js = async_nats::jetstream::new(self.client().await);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let created = js
                .create_stream(async_nats::jetstream::stream::Config {
                    name: name.to_string(),
                    subjects: subjects.iter().map(|s| s.to_string()).collect(),
                    duplicate_window: Duration::from_secs(120),
                    num_replicas: replicas,
                    ..Default::default()
                })
                .await;
            match created {
                Ok(_) => return,
                // Not yet: the cluster is still electing its JetStream leader.
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => panic!("cannot create stream {name} on the cluster: {e}"),
            }
        }
    }

    /// The index of the node leading the stream, once one does and every other replica is
    /// current (so killing one node leaves a quorum that has everything).
    pub async fn stream_leader(&self, name: &str) -> usize {
        let js = async_nats::jetstream::new(self.client().await);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(mut stream) = js.get_stream(name).await {
                if let Ok(info) = stream.info().await {
                    let replicas_current = info.cluster.as_ref().is_some_and(|c| {
                        c.replicas.len() + 1 == self.ports.len()
                            && c.replicas.iter().all(|r| r.current && !r.offline)
                    });
                    let leader = info
                        .cluster
                        .as_ref()
                        .and_then(|c| c.leader.clone())
                        .filter(|_| replicas_current);
                    if let Some(i) =
                        leader.and_then(|l| (0..self.ports.len()).find(|i| self.name(*i) == l))
                    {
                        return i;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "stream {name} has no leader with current replicas after 60 s"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Every message in the stream, in stream order.
    pub async fn read_stream(&self, name: &str) -> Vec<StreamMessage> {
        read_stream_from(self.client().await, name).await
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.children.len() {
            self.kill(i);
        }
    }
}

#[derive(Debug, Clone)]
pub struct StreamMessage {
    pub subject: String,
    pub headers: Vec<(String, String)>,
    pub body: Value,
    /// When the server stored it (JetStream's own timestamp).
    pub stored: time::OffsetDateTime,
}

impl StreamMessage {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A mosquitto broker with persistence, configured as the README advises.
pub struct Mosquitto {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    extra_listeners: String,
}

impl Mosquitto {
    pub fn start() -> Self {
        Self::start_with("")
    }

    /// With more listeners (`listener PORT 127.0.0.1` and their settings) after the plaintext,
    /// anonymous one on `port` that test publishers use; settings are then per listener.
    pub fn start_with(extra_listeners: &str) -> Self {
        let mut m = Self {
            port: free_port(),
            dir: tempfile::tempdir().expect("tempdir"),
            child: None,
            extra_listeners: extra_listeners.to_string(),
        };
        m.resume();
        m
    }

    /// What the broker logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// The running broker's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn resume(&mut self) {
        let conf = self.dir.path().join("mosquitto.conf");
        let per_listener = if self.extra_listeners.is_empty() {
            ""
        } else {
            "per_listener_settings true\n"
        };
        // `user root`: started as root, mosquitto would otherwise switch to its own user, which
        // cannot write the temp directory, and silently persist nothing across a restart
        // (sessions and queued messages gone). Without root the line has no effect.
        std::fs::write(
            &conf,
            format!(
                "{per_listener}listener {} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\n\
                 max_inflight_messages 0\nmax_queued_messages 0\nmax_queued_bytes 0\nautosave_interval 1\nuser root\n{}\n",
                self.port,
                self.dir.path().display(),
                self.extra_listeners
            ),
        )
        .expect("write mosquitto.conf");
        let log = std::fs::File::create(self.dir.path().join("mosquitto.log")).expect("log");
        let child = Command::new(require("mosquitto", "mosquitto"))
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start mosquitto");
        self.child = Some(child);
        wait_for_port(self.port, Duration::from_secs(10));
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill(&mut c, "TERM");
            let _ = c.wait();
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The gateway binary with a config written to its own temp directory.
pub struct Gateway {
    pub dir: tempfile::TempDir,
    pub http_port: u16,
    pub config_path: PathBuf,
    child: Option<Child>,
    starts: usize,
    env: Vec<(String, String)>,
}

impl Gateway {
    /// `config` is the TOML without `[gateway]` and `[http]`, which the harness adds.
    pub fn start(config: &str) -> Self {
        Self::start_with_env(config, &[])
    }

    /// As `start`, with extra environment variables for the gateway process.
    pub fn start_with_env(config: &str, env: &[(&str, &str)]) -> Self {
        let mut g = Self::configure(config, env);
        g.resume();
        g
    }

    /// Writes the config (as `start_with_env`) without starting the binary: `resume` starts it.
    /// For work on the buffer before the gateway opens it.
    pub fn configure(config: &str, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let http_port = free_port();
        let config_path = dir.path().join("gateway.toml");
        let full = Self::compose(dir.path(), http_port, config);
        std::fs::write(&config_path, full).expect("write config");
        Self {
            dir,
            http_port,
            config_path,
            child: None,
            starts: 0,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    /// The full config file: `[gateway]` and `[http]` from the harness, then `config`.
    fn compose(dir: &Path, http_port: u16, config: &str) -> String {
        format!(
            "[gateway]\nid = \"gw-test\"\ntenant_id = \"tenant-a\"\ndata_dir = \"{}\"\n\n[http]\nlisten = \"127.0.0.1:{http_port}\"\n\n{config}",
            dir.join("data").display()
        )
    }

    /// Replaces the config file (as `start` composed it) without restarting.
    pub fn rewrite_config(&self, config: &str) {
        std::fs::write(
            &self.config_path,
            Self::compose(self.dir.path(), self.http_port, config),
        )
        .expect("rewrite config");
    }

    /// Writes the config file verbatim, valid or not.
    pub fn write_raw_config(&self, text: &str) {
        std::fs::write(&self.config_path, text).expect("write config");
    }

    /// Sends a signal (`HUP`, `TERM`, ...) to the running gateway.
    pub fn signal(&mut self, name: &str) {
        if let Some(c) = self.child.as_mut() {
            kill(c, name);
        }
    }

    /// The running process's id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn log(&self) -> String {
        (1..=self.starts)
            .map(|i| {
                std::fs::read_to_string(self.dir.path().join(format!("gateway-{i}.log")))
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Starts the binary (again) and waits for its HTTP endpoint.
    pub fn resume(&mut self) {
        self.starts += 1;
        let log =
            std::fs::File::create(self.dir.path().join(format!("gateway-{}.log", self.starts)))
                .expect("log");
        let stdout = log.try_clone().expect("log");
        let child = Command::new(gateway_binary())
            .args(["run", "--config"])
            .arg(&self.config_path)
            .env(
                "RUST_LOG",
                std::env::var("GATEWAY_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            // Both streams in one log, so tests can search everything the gateway printed.
            .stdout(stdout)
            .stderr(log)
            .spawn()
            .expect("start gateway");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.get("/healthz").is_none() {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("gateway exited with {status} at start:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "gateway HTTP not up:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        kill(&mut c, "TERM");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!(
                    "gateway did not stop within 20 s of SIGTERM:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the gateway to exit by itself; returns the exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let mut c = self.child.take()?;
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!("gateway did not exit within {within:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// GET on the gateway's HTTP port: (status, body).
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.http_port, path)
    }

    /// A metric's value, summed over label sets that contain `labels` (e.g. `reason="oversized"`).
    pub fn metric(&self, name: &str, labels: &str) -> f64 {
        let (_, body) = self.get("/metrics").unwrap_or_default();
        metric_value(&body, name, labels)
    }

    /// Waits until `sources` MQTT sources are connected, then a moment for their SUBSCRIBE
    /// (sent right after CONNACK) to take effect at the broker.
    pub async fn wait_subscribed(&self, sources: usize) {
        self.wait_until("MQTT sources connected", Duration::from_secs(20), |g| {
            g.metric("sahool_gateway_mqtt_connected", "") >= sources as f64
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    /// Polls until `f` holds, or panics with the gateway log.
    pub fn wait_until(&self, what: &str, within: Duration, mut f: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + within;
        while !f(self) {
            if Instant::now() >= deadline {
                let metrics = self.get("/metrics").map(|(_, b)| b).unwrap_or_default();
                let metrics: Vec<&str> = metrics
                    .lines()
                    .filter(|l| !l.starts_with('#') && !l.contains("_bucket"))
                    .collect();
                panic!(
                    "timed out waiting for {what}\n--- metrics ---\n{}\n--- gateway log ---\n{}",
                    metrics.join("\n"),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs a CLI subcommand against this gateway's config.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = Command::new(gateway_binary());
        cmd.args(args).arg("--config").arg(&self.config_path);
        cmd.output().expect("run gateway CLI")
    }

    /// `dead-letters list`: every dead-letter, newest first, as JSON.
    pub fn dead_letters(&self) -> Vec<Value> {
        let out = self.cli(&["dead-letters", "list"]);
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("dead-letter JSON"))
            .collect()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn metric_value(body: &str, name: &str, labels: &str) -> f64 {
    sahool_gateway::common::metrics::sample(body, name, labels)
}

pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let status = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, dechunk(&body)))
}

fn dechunk(body: &str) -> String {
    // hyper answers with a content-length for full bodies; keep this tolerant of chunking.
    let mut out = String::new();
    let mut rest = body;
    loop {
        let Some((size, after)) = rest.split_once("\r\n") else {
            return body.to_string();
        };
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            return body.to_string();
        };
        if n == 0 {
            return out;
        }
        if after.len() < n {
            return body.to_string();
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
}

/// Publishes at QoS 1 and returns the number of messages the broker acknowledged (PUBACK).
pub async fn publish_all(
    broker_port: u16,
    client_id: &str,
    messages: Vec<(String, Vec<u8>)>,
) -> usize {
    use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
    let mut o = MqttOptions::new(client_id, "127.0.0.1", broker_port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_inflight(200);
    o.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(o, 256);
    let total = messages.len();
    let sender = tokio::spawn(async move {
        for (topic, payload) in messages {
            client
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await
                .expect("queue publish");
        }
        client
    });
    let mut acked = 0;
    let mut sent = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while acked < total {
        assert!(
            Instant::now() < deadline,
            "publisher stalled at {acked}/{total} acked"
        );
        match tokio::time::timeout(Duration::from_secs(30), eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
            Ok(Ok(Event::Outgoing(Outgoing::Publish(_)))) => sent += 1,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                panic!("publisher connection failed after {sent} sent, {acked} acked: {e}")
            }
            Err(_) => panic!("publisher got no event for 30 s ({acked}/{total} acked)"),
        }
    }
    let client = sender.await.expect("sender");
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while eventloop.poll().await.is_ok() {}
    })
    .await;
    acked
}

/// Values in stream order, with the checks every test shares: unique event ids, `seq`
/// strictly increasing in stream order, and `Nats-Msg-Id` equal to `event_id`.
pub fn values_in_order(events: &[StreamMessage]) -> Vec<usize> {
    let mut ids = HashSet::new();
    let mut last_seq = 0;
    events
        .iter()
        .map(|e| {
            let id = e.body["event_id"].as_str().expect("event_id");
            assert!(
                ids.insert(id.to_string()),
                "event {id} is in the stream twice"
            );
            assert_eq!(e.header("Nats-Msg-Id"), Some(id));
            let seq = e.body["source"]["seq"].as_u64().expect("seq");
            assert!(
                seq > last_seq,
                "seq {seq} after {last_seq}: stream order must follow seq"
            );
            last_seq = seq;
            e.body["payload"]["value"].as_f64().expect("value") as usize
        })
        .collect()
}

/// Asserts every value in `0..n` is present exactly once.
pub fn assert_exactly_once(values: &[usize], n: usize) {
    let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
    for v in values {
        *counts.entry(*v).or_default() += 1;
    }
    let doubled: Vec<_> = counts
        .iter()
        .filter(|(_, c)| **c > 1)
        .map(|(v, _)| *v)
        .collect();
    let missing: Vec<_> = (0..n).filter(|v| !counts.contains_key(v)).collect();
    assert!(
        doubled.is_empty(),
        "{} readings doubled, e.g. {:?}",
        doubled.len(),
        &doubled[..doubled.len().min(10)]
    );
    assert!(
        missing.is_empty(),
        "{} readings lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    assert_eq!(values.len(), n);
}

/// A section of the shipped `config/gateway.example.toml`: its header and every key as the file
/// sets it (comments left out). Tests that claim to run with the product's defaults take them
/// from the file users get.
pub fn shipped_section(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/gateway.example.toml");
    let text = std::fs::read_to_string(&path).expect("config/gateway.example.toml");
    let header = format!("[{name}]");
    let mut lines = text.lines().skip_while(|l| l.trim() != header);
    let first = lines
        .next()
        .unwrap_or_else(|| panic!("no {header} in the example config"));
    let keys: Vec<&str> = lines
        .take_while(|l| !l.trim_start().starts_with('['))
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .collect();
    format!("{first}\n{}\n", keys.join("\n"))
}

/// A farm as users configure it: the shipped `[buffer]` (with a disk reserve small enough for a
/// test machine) and `[quality]`, one broker source in SAHOOL's format, and a `sensor_type`
/// sensor for each of `devices` in `field-1`.
pub fn shipped_farm_config(
    nats: &Nats,
    broker: &Mosquitto,
    sensor_type: &str,
    devices: &[&str],
) -> String {
    let sensors: String = devices
        .iter()
        .map(|d| {
            format!(
                "  [[fields.sensors]]\n  device_id = \"{d}\"\n  sensor_type = \"{sensor_type}\"\n"
            )
        })
        .collect();
    format!(
        "[nats]\nservers = [\"{}\"]\n\n{}\n{}\n[[mqtt]]\nname = \"farm\"\nurl = \"{}\"\ntopics = [\"sahool/sensors/#\"]\nformat = \"sahool\"\n\n[[fields]]\nid = \"field-1\"\n{sensors}",
        nats.url(),
        shipped_section("buffer").replace("min_free_disk = \"64MiB\"", "min_free_disk = \"1MiB\""),
        shipped_section("quality"),
        broker.url(),
    )
}

/// A gateway config reading `probe-1` water levels (no default range) from the broker, with
/// `buffer` lines added to `[buffer]` and `extra` lines to `[nats]`.
pub fn probe_config(nats: &Nats, broker: &Mosquitto, buffer: &str, extra: &str) -> String {
    probe_config_for(&[nats.url()], broker, buffer, extra)
}

/// `probe_config` for any list of NATS server URLs (`tls://`, a cluster's nodes).
pub fn probe_config_for(
    servers: &[String],
    broker: &Mosquitto,
    buffer: &str,
    extra: &str,
) -> String {
    let input = format!(
        "[[mqtt]]\nname = \"farm\"\nurl = \"{}\"\ntopics = [\"sahool/sensors/#\"]\nformat = \"sahool\"\n",
        broker.url()
    );
    probe_config_with_input_for(servers, buffer, extra, &input)
}

/// [`probe_config`] with `input` (`[[mqtt]]` or `[[mqtt_listener]]` blocks) as its MQTT input.
pub fn probe_config_with_input(nats: &Nats, buffer: &str, extra: &str, input: &str) -> String {
    probe_config_with_input_for(&[nats.url()], buffer, extra, input)
}

fn probe_config_with_input_for(
    servers: &[String],
    buffer: &str,
    extra: &str,
    input: &str,
) -> String {
    let servers: Vec<String> = servers.iter().map(|s| format!("\"{s}\"")).collect();
    format!(
        r#"
[nats]
servers = [{servers}]
ack_timeout = "2s"
{extra}

[buffer]
min_free_disk = "1MiB"
{buffer}

# probe-1 stands in for a whole farm's traffic, one reading a second of its own clock: the
# shipped flood protection applies as users get it.
{quality}
{input}
[[fields]]
id = "field-1"
  [[fields.sensors]]
  device_id = "probe-1"
  sensor_type = "water_level"
"#,
        servers = servers.join(", "),
        quality = shipped_section("quality"),
    )
}

/// Reading `i` as a SAHOOL standard payload; `value` identifies it in the stream.
pub fn probe_reading(i: usize) -> (String, Vec<u8>) {
    // One observation per second from 2026-06-01T04:15:00Z (epoch ms): each is a distinct
    // device observation, so none is taken for a repeat of another.
    let ts = 1_780_287_300_000u64 + i as u64 * 1000;
    let payload = format!(
        r#"{{"device_id":"probe-1","field_id":"field-1","type":"water_level","value":{i},"unit":"cm","timestamp":{ts},"battery":90.5,"rssi":-70,"note":"{pad}"}}"#,
        pad = "x".repeat(128)
    );
    (
        "sahool/sensors/probe-1/field-1/water_level".to_string(),
        payload.into_bytes(),
    )
}

pub fn probe_readings(range: std::ops::Range<usize>) -> Vec<(String, Vec<u8>)> {
    range.map(probe_reading).collect()
}

/// The event schema with its `$ref` to SAHOOL's payload schema resolved in memory.
pub fn event_validator() -> jsonschema::Validator {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("contracts");
    let read = |p: &str| -> Value {
        serde_json::from_str(&std::fs::read_to_string(root.join(p)).expect("contract file"))
            .expect("contract JSON")
    };
    let mut event = read("sensor_reading_event.v1.json");
    let payload = read("sahool/sensor_reading.v1.json");
    assert_eq!(
        event["properties"]["payload"]["$ref"],
        "sahool/sensor_reading.v1.json"
    );
    event["properties"]["payload"] = payload;
    jsonschema::options()
        .should_validate_formats(true)
        .build(&event)
        .expect("event schema compiles")
}

/// SAHOOL's device status schema (`contracts/sahool/device_status.v1.json`).
pub fn status_validator() -> jsonschema::Validator {
    contract_validator("sahool/device_status.v1.json")
}

/// A schema of `contracts/` without references (path relative to `contracts/`), formats checked.
pub fn contract_validator(name: &str) -> jsonschema::Validator {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("contracts")
        .join(name);
    let schema: Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("contract file"))
            .expect("contract JSON");
    jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .unwrap_or_else(|e| panic!("{name} compiles: {e}"))
}

/// A fixture file from `tests/fixtures`.
pub fn fixture(name: &str) -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(&p).expect("fixture")).expect("fixture JSON")
}

// Simulated serial devices for the far end of a pseudo-terminal.
pub mod sim_modbus;
pub mod sim_sdi12;

fn numbers_equal(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => (x - y).abs() < 1e-9 * x.abs().max(1.0),
        _ => a == b,
    }
}

/// True if an event payload is the reading a fixture's `expect` entry describes.
pub fn matches_expected(payload: &Value, expect: &Value) -> bool {
    let keys = ["device_id", "field_id", "sensor_type", "unit"];
    if keys.iter().any(|k| payload[k] != expect[k]) {
        return false;
    }
    if !numbers_equal(&payload["value"], &expect["value"]) {
        return false;
    }
    if let Some(ts) = expect.get("timestamp") {
        if &payload["timestamp"] != ts {
            return false;
        }
    }
    let empty = serde_json::Map::new();
    let got = payload
        .get("metadata")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let want = expect
        .get("metadata")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    got.len() == want.len()
        && want
            .iter()
            .all(|(k, v)| got.get(k).is_some_and(|g| numbers_equal(g, v)))
}

/// A gateway config like [`probe_config`], but `probe-1` publishes straight to an
/// `[[mqtt_listener]]` named `devices` on `127.0.0.1:{port}`, with `auth = "none"` (loopback
/// only) and `listener` lines added to it; no broker involved.
pub fn probe_listener_config(nats: &Nats, port: u16, buffer: &str, listener: &str) -> String {
    let input = format!(
        "[[mqtt_listener]]\nname = \"devices\"\nlisten = \"127.0.0.1:{port}\"\ntopics = [\"sahool/sensors/#\"]\nformat = \"sahool\"\nauth = \"none\"\n{listener}\n"
    );
    probe_config_with_input(nats, buffer, "", &input)
}

/// The passwords of [`Nats::with_shipped_gateway_user`]'s users.
pub const GATEWAY_PASSWORD: &str = "t7Q-wR2m-Xv9c-Jn4e";
const PLATFORM_PASSWORD: &str = "Lm3-vB8q-Zr6t-Hd1y";

impl Nats {
    /// nats-server with two users: `gw-farm`, with exactly the shipped
    /// `config/nats-server.gateway-user.template`'s permissions filled in with `fill`
    /// (placeholder, value; `{user}` is filled here), and `platform`, allowed everything, as
    /// which the test's own client connects.
    pub fn with_shipped_gateway_user(fill: &[(&str, &str)]) -> Self {
        let template = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("config/nats-server.gateway-user.template"),
        )
        .expect("config/nats-server.gateway-user.template");
        let user = format!("user: gw-farm, password: \"{GATEWAY_PASSWORD}\"");
        let mut block = template.replace("{user}", &user);
        for (placeholder, value) in fill {
            block = block.replace(placeholder, value);
        }
        Nats::start_with(&format!(
            "authorization {{\n  users: [\n{block}\n    {{ user: platform, password: \"{PLATFORM_PASSWORD}\" }}\n  ]\n}}\n"
        ))
        .with_client_options(Arc::new(|| {
            async_nats::ConnectOptions::new()
                .user_and_password("platform".into(), PLATFORM_PASSWORD.into())
        }))
    }

    /// [`Nats::with_shipped_gateway_user`] filled in for the harness's gateway (`gw-test` of
    /// `tenant-a`, its default commands consumer, remote config in `bucket`), with the
    /// platform's `SAHOOL_IOT` stream.
    pub async fn with_shipped_permissions_for_gw_test(bucket: &str) -> Self {
        let nats = Self::with_shipped_gateway_user(&[
            ("{consumer}", "gw-gw-test"),
            ("{filter}", "sahool.commands.iot.actuator.tenant-a.gw-test"),
            ("{bucket}", bucket),
            ("{gateway_id}", "gw-test"),
        ]);
        nats.create_stream("SAHOOL_IOT", &["sahool.iot.>"]).await;
        nats
    }

    /// A client as the gateway's user (`gw-farm`) of [`Nats::with_shipped_gateway_user`].
    pub async fn gateway_user_client(&self) -> async_nats::Client {
        async_nats::ConnectOptions::new()
            .user_and_password("gw-farm".into(), GATEWAY_PASSWORD.into())
            .connect(self.url())
            .await
            .expect("the gateway's user connects")
    }
}

/// The `[nats]` lines that make the gateway `gw-farm` of [`Nats::with_shipped_gateway_user`],
/// its password in a 0600 file under `dir`.
pub fn gateway_user_auth(dir: &Path) -> String {
    use std::os::unix::fs::PermissionsExt;
    let password_file = dir.join("nats.password");
    std::fs::write(&password_file, format!("{GATEWAY_PASSWORD}\n")).expect("password file");
    std::fs::set_permissions(&password_file, std::fs::Permissions::from_mode(0o600))
        .expect("chmod 600");
    format!(
        "user = \"gw-farm\"\npassword_file = \"{}\"",
        password_file.display()
    )
}

/// A KV bucket, made as its stream directly: the client's `create_key_value` first reads
/// account details nats-server 2.9 (Debian's) does not send in the form it expects. Direct
/// gets allowed, as for buckets nats-server 2.9 and later make.
pub async fn create_bucket(
    client: async_nats::Client,
    bucket: &str,
) -> async_nats::jetstream::kv::Store {
    use async_nats::jetstream;
    let js = jetstream::new(client);
    js.create_stream(jetstream::stream::Config {
        name: format!("KV_{bucket}"),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 5,
        discard: jetstream::stream::DiscardPolicy::New,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        ..Default::default()
    })
    .await
    .expect("create the bucket's stream");
    js.get_key_value(bucket).await.expect("open bucket")
}
