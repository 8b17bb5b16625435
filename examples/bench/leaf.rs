//! The peer of record: what a farm that wanted NATS-native store-and-forward would run. A leaf
//! nats-server on the gateway (MQTT listener, a JetStream domain of its own, a local stream
//! capturing the MQTT subjects), linked by a leaf-node connection to the platform's hub
//! nats-server, whose stream *sources* the leaf's stream across the domain
//! (`external.api = "$JS.<leaf domain>.API"`). A reading counts as delivered once it is in the
//! hub's stream.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream::stream::{Config, External, Source};

use crate::measure;
use crate::support::{free_port, wait_for_port};

/// The leaf's stream, on the gateway: every MQTT topic under `sahool/sensors/`.
pub const LEAF_STREAM: &str = "LEAF";
pub const LEAF_SUBJECTS: &str = "sahool.sensors.>";
/// The hub's stream, sourcing the leaf's; the messages keep their subjects.
pub const HUB_STREAM: &str = "HUB";
const LEAF_DOMAIN: &str = "leaf";
const HUB_DOMAIN: &str = "hub";

/// The nats-server binary, as the test support finds it.
fn nats_server() -> &'static str {
    if Path::new("/usr/sbin/nats-server").exists() {
        "/usr/sbin/nats-server"
    } else {
        "nats-server"
    }
}

/// One nats-server with a config of its own, killed on drop.
pub struct Server {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Child,
}

impl Server {
    /// Starts nats-server on a free client port with `config` (the `listen` line is added).
    fn start(config: &str) -> Self {
        let port = free_port();
        let dir = tempfile::tempdir().expect("tempdir");
        let conf = dir.path().join("nats.conf");
        let config = config.replace("{store}", &dir.path().join("js").display().to_string());
        std::fs::write(&conf, format!("listen: 127.0.0.1:{port}\n{config}\n"))
            .expect("write nats.conf");
        let log = std::fs::File::create(dir.path().join("nats.log")).expect("nats log");
        let child = Command::new(nats_server())
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start nats-server");
        wait_for_port(port, Duration::from_secs(10));
        Self { port, dir, child }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether the installed nats-server takes `sync_interval` in its `jetstream` block (2.10 and
/// later do; 2.9 rejects the field), tested with `nats-server -t` on a config that has it.
pub fn sync_interval_supported() -> bool {
    let Ok(dir) = tempfile::tempdir() else {
        return false;
    };
    let conf = dir.path().join("probe.conf");
    let text = format!(
        "listen: 127.0.0.1:{}\njetstream {{ store_dir: \"{}\", sync_interval: always }}\n",
        free_port(),
        dir.path().join("js").display()
    );
    if std::fs::write(&conf, text).is_err() {
        return false;
    }
    Command::new(nats_server())
        .arg("-t")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The leaf (on the gateway) and the hub (the platform), linked and sourcing.
pub struct LeafHub {
    pub mqtt_port: u16,
    pub leaf: Server,
    pub hub: Server,
}

impl LeafHub {
    /// Starts hub and leaf, creates both streams, and waits until a probe message published
    /// on the leaf has reached the hub's stream (so the link and the sourcing consumer are up
    /// before readings are timed). The hub's stream then holds 1 message besides the readings.
    pub async fn start(sync_always: bool) -> Self {
        let leaf_port = free_port();
        let hub = Server::start(&format!(
            r#"server_name: bench_hub
jetstream {{ store_dir: "{{store}}", domain: {HUB_DOMAIN} }}
leafnodes {{ listen: "127.0.0.1:{leaf_port}" }}"#
        ));
        let mqtt_port = free_port();
        let sync = if sync_always {
            ", sync_interval: always"
        } else {
            ""
        };
        let leaf = Server::start(&format!(
            r#"server_name: bench_leaf
jetstream {{ store_dir: "{{store}}", domain: {LEAF_DOMAIN}{sync} }}
mqtt {{ listen: "127.0.0.1:{mqtt_port}" }}
leafnodes {{ remotes: [ {{ url: "nats-leaf://127.0.0.1:{leaf_port}" }} ] }}"#
        ));
        wait_for_port(mqtt_port, Duration::from_secs(20));

        let leaf_client = async_nats::connect(leaf.url()).await.expect("leaf client");
        let leaf_js = async_nats::jetstream::new(leaf_client.clone());
        leaf_js
            .create_stream(Config {
                name: LEAF_STREAM.to_string(),
                subjects: vec![LEAF_SUBJECTS.to_string()],
                ..Default::default()
            })
            .await
            .expect("create the leaf's stream");
        let hub_js = measure::jetstream(&hub.url()).await;
        hub_js
            .create_stream(Config {
                name: HUB_STREAM.to_string(),
                sources: Some(vec![Source {
                    name: LEAF_STREAM.to_string(),
                    external: Some(External {
                        api_prefix: format!("$JS.{LEAF_DOMAIN}.API"),
                        delivery_prefix: None,
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            })
            .await
            .expect("create the hub's sourcing stream");

        leaf_js
            .publish("sahool.sensors.bench.probe", "{\"probe\":true}".into())
            .await
            .expect("probe publish")
            .await
            .expect("probe stored on the leaf");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if measure::stream_state(&hub_js, HUB_STREAM).await.messages >= 1 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the hub's stream did not source the probe within 60 s\nleaf log:\n{}\nhub log:\n{}",
                leaf.log(),
                hub.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Self {
            mqtt_port,
            leaf,
            hub,
        }
    }
}
