//! Secure links through the real binary and real servers: NATS over TLS (server name override,
//! mTLS, a wrong CA fixed by reload), NKey and JWT (`.creds`, operator mode) users, a
//! least-privilege user with the shipped permission block and a permission violation, MQTT
//! over TLS with passwords, a 3-node JetStream cluster losing its stream leader and then every
//! node, and every secret searched for in everything the gateway prints and serves.

mod support;

#[path = "support/nats_jwt.rs"]
mod nats_jwt;
#[path = "support/pki.rs"]
mod pki;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use pki::{write_private, Pki};
use support::{
    probe_config, probe_config_for, probe_readings, publish_all, Gateway, Mosquitto, Nats,
};

/// A gateway config for `probe-1` (see `probe_config`) with these servers and `[nats]` lines.
fn config(servers: &[String], broker: &Mosquitto, nats_extra: &str) -> String {
    probe_config_for(servers, broker, "", nats_extra)
}

fn tls_url(nats: &Nats) -> String {
    format!("tls://127.0.0.1:{}", nats.port)
}

fn quoted(path: &Path) -> String {
    format!("\"{}\"", path.display())
}

/// nats-server TLS settings; `verify` asks every client for a certificate from `ca`.
fn server_tls(pki: &Pki, name: &str, names: &[&str], verify: bool) -> String {
    let server = pki.server_for(name, names);
    format!(
        "tls {{\n  cert_file: {}\n  key_file: {}\n  ca_file: {}\n  verify: {verify}\n  timeout: 5\n}}\n",
        quoted(&server.cert),
        quoted(&server.key),
        quoted(&pki.ca_file())
    )
}

async fn wait_stream_readings(nats: &Nats, n: usize) -> Vec<support::StreamMessage> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let events = nats.read_readings("SAHOOL_IOT").await;
        if events.len() >= n || std::time::Instant::now() > deadline {
            return events;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Readings `0..n` published, forwarded, and in the stream exactly once, in order; then a
/// clean stop.
async fn assert_forwards(mut gateway: Gateway, broker: &Mosquitto, nats: &Nats, n: usize) {
    assert_eq!(
        publish_all(broker.port, "p1", probe_readings(0..n)).await,
        n
    );
    gateway.wait_until("forwarded", Duration::from_secs(30), |g| {
        forwarded(g) == n as f64 && buffered(g) == 0.0
    });
    let events = wait_stream_readings(nats, n).await;
    support::assert_exactly_once(&support::values_in_order(&events), n);
    assert_eq!(gateway.terminate(), Some(0));
}

fn forwarded(g: &Gateway) -> f64 {
    g.metric("sahool_gateway_readings_forwarded_total", "")
}

fn buffered(g: &Gateway) -> f64 {
    g.metric("sahool_gateway_buffer_readings", "")
}

/// A server whose certificate names only `nats.sahool.test`: reached by IP address, the
/// gateway refuses it and says why; with `tls_server_name` it forwards over `tls://`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_server_name_override() {
    let pki = Pki::new("platform");
    let checked_name = sahool_gateway::common::tls::client_config(
        &sahool_gateway::common::tls::TlsFiles {
            ca: Some(&pki.ca_file()),
            cert: None,
            key: None,
            server_name: Some("nats.sahool.test"),
        },
        "test client",
    )
    .expect("test TLS config");
    let nats = Nats::start_with(&server_tls(&pki, "nats", &["nats.sahool.test"], false))
        .with_client_options(Arc::new(move || {
            async_nats::ConnectOptions::new()
                .tls_client_config(checked_name.config.as_ref().clone())
                .require_tls(true)
        }));
    nats.create_stream("SAHOOL_IOT", &["sahool.iot.>"]).await;
    let broker = Mosquitto::start();
    let ca = format!("tls_ca_file = {}", quoted(&pki.ca_file()));
    let mut gateway = Gateway::start(&config(&[tls_url(&nats)], &broker, &ca));
    gateway.wait_subscribed(1).await;
    gateway.wait_until("the name mismatch logged", Duration::from_secs(20), |g| {
        g.log()
            .contains("server certificate rejected for 127.0.0.1")
            && g.log().contains("set tls_server_name")
    });

    let fixed = format!("{ca}\ntls_server_name = \"nats.sahool.test\"");
    gateway.rewrite_config(&config(&[tls_url(&nats)], &broker, &fixed));
    gateway.signal("HUP");
    assert_forwards(gateway, &broker, &nats, 20).await;
}

/// A server that verifies clients (mTLS): without a client certificate, then with a CA that did
/// not sign the server's certificate, readings stay buffered and the log and `/readyz` say why;
/// a reload with the right files delivers them all, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_and_a_wrong_ca_keep_readings_buffered_until_a_reload_fixes_them() {
    let pki = Pki::new("platform");
    let rogue = Pki::new("rogue");
    let admin = pki.client("platform-admin");
    let (ca, admin_cert, admin_key) = (pki.ca_file(), admin.cert.clone(), admin.key.clone());
    let nats = Nats::start_with(&server_tls(&pki, "nats", &["localhost", "127.0.0.1"], true))
        .with_client_options(Arc::new(move || {
            async_nats::ConnectOptions::new()
                .add_root_certificates(ca.clone())
                .add_client_certificate(admin_cert.clone(), admin_key.clone())
                .require_tls(true)
        }));
    nats.create_stream("SAHOOL_IOT", &["sahool.iot.>"]).await;
    let broker = Mosquitto::start();
    let client = pki.client("gw-test");
    let servers = [tls_url(&nats)];

    // 1. No client certificate.
    let no_cert = format!("tls_ca_file = {}", quoted(&pki.ca_file()));
    let mut gateway = Gateway::start(&config(&servers, &broker, &no_cert));
    gateway.wait_subscribed(1).await;
    assert_eq!(
        publish_all(broker.port, "p1", probe_readings(0..30)).await,
        30
    );
    gateway.wait_until(
        "readings buffered, the missing certificate named",
        Duration::from_secs(20),
        |g| {
            buffered(g) == 30.0
                && g.log().contains("asks for a client certificate")
                && g.get("/readyz")
                    .is_some_and(|(code, body)| code == 503 && body.contains("client certificate"))
        },
    );

    // 2. A client certificate, but the wrong CA for the server.
    let wrong_ca = format!(
        "tls_ca_file = {}\ntls_cert_file = {}\ntls_key_file = {}",
        quoted(&rogue.ca_file()),
        quoted(&client.cert),
        quoted(&client.key)
    );
    gateway.rewrite_config(&config(&servers, &broker, &wrong_ca));
    gateway.signal("HUP");
    gateway.wait_until("the unknown issuer named", Duration::from_secs(20), |g| {
        g.log().contains("UnknownIssuer")
            && g.log()
                .contains("is tls_ca_file the CA that signed the server's certificate?")
            && g.get("/readyz").is_some_and(|(code, body)| {
                code == 503 && body.contains("server certificate rejected")
            })
    });
    let stats = gateway.cli(&["buffer", "stats", "--json"]);
    let stats: serde_json::Value = serde_json::from_slice(&stats.stdout).expect("stats JSON");
    assert_eq!(stats["readings"], 30, "every reading is still buffered");
    assert_eq!(forwarded(&gateway), 0.0);

    // 3. The right CA: everything arrives, once.
    let fixed = wrong_ca.replace(
        &rogue.ca_file().display().to_string(),
        &pki.ca_file().display().to_string(),
    );
    gateway.rewrite_config(&config(&servers, &broker, &fixed));
    gateway.signal("HUP");
    gateway.wait_until("forwarded after the fix", Duration::from_secs(30), |g| {
        forwarded(g) == 30.0 && buffered(g) == 0.0
    });
    let events = wait_stream_readings(&nats, 30).await;
    support::assert_exactly_once(&support::values_in_order(&events), 30);
    assert_eq!(gateway.get("/readyz").map(|(code, _)| code), Some(200));
    assert_eq!(gateway.terminate(), Some(0));
}

/// An NKey user (keys from the nkeys crate) forwards with its seed file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nkey_user_forwards() {
    let gateway_key = nkeys::KeyPair::new_user();
    let platform_key = nkeys::KeyPair::new_user();
    let platform_seed = platform_key.seed().expect("seed");
    let nats = Nats::start_with(&format!(
        "authorization {{ users: [ {{ nkey: {} }}, {{ nkey: {} }} ] }}",
        gateway_key.public_key(),
        platform_key.public_key()
    ))
    .with_client_options(Arc::new(move || {
        async_nats::ConnectOptions::new().nkey(platform_seed.clone())
    }));
    nats.create_stream("SAHOOL_IOT", &["sahool.iot.>"]).await;
    let broker = Mosquitto::start();
    let secrets = tempfile::tempdir().expect("tempdir");
    let seed_file = secrets.path().join("gateway.nk");
    write_private(
        &seed_file,
        &format!("{}\n", gateway_key.seed().expect("seed")),
    );

    let seed_line = format!("nkey_seed_file = {}", quoted(&seed_file));
    let gateway = Gateway::start(&config(&[nats.url()], &broker, &seed_line));
    gateway.wait_subscribed(1).await;
    assert_forwards(gateway, &broker, &nats, 20).await;
}

/// Operator mode without nsc: operator, account and user JWTs signed in the test; the gateway
/// authenticates with a `.creds` file and forwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creds_user_in_operator_mode_forwards() {
    let operator = nats_jwt::operator("sahool-test");
    let account = nats_jwt::account(&operator, "SAHOOL");
    let gateway_user = nats_jwt::user(&account, "gw-test", None);
    let platform = nats_jwt::user(&account, "platform", None);
    let dir = tempfile::tempdir().expect("tempdir");
    let platform_creds = platform.creds();
    let nats = Nats::start_with(&nats_jwt::server_config(dir.path(), &operator, &account))
        .with_client_options(Arc::new(move || {
            async_nats::ConnectOptions::new()
                .credentials(&platform_creds)
                .expect("platform creds")
        }));
    nats.create_stream("SAHOOL_IOT", &["sahool.iot.>"]).await;
    let broker = Mosquitto::start();
    let creds_file = dir.path().join("gateway.creds");
    write_private(&creds_file, &gateway_user.creds());

    let creds_line = format!("creds_file = {}", quoted(&creds_file));
    let gateway = Gateway::start(&config(&[nats.url()], &broker, &creds_line));
    gateway.wait_subscribed(1).await;
    assert_forwards(gateway, &broker, &nats, 20).await;
}

/// The shipped permission block, verbatim.
fn least_privilege_block() -> String {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config/nats-server.least-privilege.conf");
    std::fs::read_to_string(path).expect("config/nats-server.least-privilege.conf")
}

/// A user with only the shipped permissions forwards readings and status events. A subject
/// template outside its space is refused by the server: each such reading is dead-lettered
/// once with the reason, never retried, while status events keep flowing; after a reload with
/// an allowed subject, readings flow again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_privilege_user_forwards_and_permission_violations_are_dead_lettered() {
    let nats = Nats::start_with(&format!(
        "{}\nauthorization {{\n  users: [\n    {{ user: gw-farm, password: \"q8V-3tLr-Wz9k-Pm2d\", permissions: $SAHOOL_GATEWAY }}\n    {{ user: platform, password: \"Hj4-xN7p-Qs2v-Lk8w\" }}\n  ]\n}}\n",
        least_privilege_block()
    ))
    .with_client_options(Arc::new(|| {
        async_nats::ConnectOptions::new()
            .user_and_password("platform".into(), "Hj4-xN7p-Qs2v-Lk8w".into())
    }));
    nats.create_stream("SAHOOL_IOT", &["sahool.iot.>"]).await;
    // A stream does capture the forbidden subject: only the permission stands in the way.
    nats.create_stream("FARM", &["farm.>"]).await;
    let broker = Mosquitto::start();
    let secrets = tempfile::tempdir().expect("tempdir");
    let password_file = secrets.path().join("nats.password");
    write_private(&password_file, "q8V-3tLr-Wz9k-Pm2d\n");
    let auth = format!(
        "user = \"gw-farm\"\npassword_file = {}",
        quoted(&password_file)
    );
    let forbidden = format!("{auth}\nsubject = \"farm.{{tenant_id}}.reading\"");

    let mut gateway = Gateway::start(&config(&[nats.url()], &broker, &forbidden));
    gateway.wait_subscribed(1).await;
    gateway.wait_until("connected", Duration::from_secs(20), |g| {
        g.metric("sahool_gateway_nats_connected", "") == 1.0
    });
    assert_eq!(
        publish_all(broker.port, "p1", probe_readings(0..10)).await,
        10
    );
    gateway.wait_until(
        "every reading dead-lettered",
        Duration::from_secs(30),
        |g| {
            g.metric(
                "sahool_gateway_readings_rejected_total",
                "reason=\"publish_refused\"",
            ) == 10.0
                && buffered(g) == 0.0
        },
    );
    // Nothing was retried: no publish timed out, and the count stays at one per reading.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        gateway.metric(
            "sahool_gateway_readings_rejected_total",
            "reason=\"publish_refused\""
        ),
        10.0
    );
    assert_eq!(
        gateway.metric(
            "sahool_gateway_nats_publish_errors_total",
            "reason=\"timeout\""
        ),
        0.0
    );
    let list = gateway.cli(&["dead-letters", "list"]);
    let list = String::from_utf8_lossy(&list.stdout);
    assert_eq!(list.lines().count(), 10, "{list}");
    for line in list.lines() {
        let d: serde_json::Value = serde_json::from_str(line).expect("dead-letter JSON");
        assert_eq!(d["reason"], "publish_refused");
        let detail = d["detail"].as_str().unwrap_or_default();
        assert!(
            detail.contains("permission denied") && detail.contains("farm.tenant-a.reading"),
            "{detail}"
        );
    }
    assert!(gateway
        .log()
        .contains("denies this user publishing to the subject"));
    assert!(
        nats.read_stream("FARM").await.is_empty(),
        "the server stored nothing it refused"
    );
    // The status event (sahool.iot.sensor.connected) is inside the allowed space and arrived.
    let status = nats.read_stream("SAHOOL_IOT").await;
    assert!(
        status
            .iter()
            .any(|e| e.subject == "sahool.iot.sensor.connected"),
        "{:?}",
        status.iter().map(|e| &e.subject).collect::<Vec<_>>()
    );
    assert!(gateway.is_running());

    // The default subject is allowed: later readings flow.
    gateway.rewrite_config(&config(&[nats.url()], &broker, &auth));
    gateway.signal("HUP");
    gateway.wait_until("reloaded", Duration::from_secs(20), |g| {
        g.log().contains("config reloaded")
    });
    assert_eq!(
        publish_all(broker.port, "p1", probe_readings(10..20)).await,
        10
    );
    gateway.wait_until("forwarded", Duration::from_secs(30), |g| {
        forwarded(g) == 10.0 && buffered(g) == 0.0
    });
    let events = wait_stream_readings(&nats, 10).await;
    let values = support::values_in_order(&events);
    assert_eq!(values, (10..20).collect::<Vec<_>>());
    assert_eq!(gateway.terminate(), Some(0));
}

/// mosquitto over TLS with passwords (hashed by mosquitto_passwd) and the shipped ACL, through
/// the shipped listener snippet: one listener checks the server only, one also wants a client
/// certificate. Both sources connect and read; a wrong password is refused by the broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_over_tls_with_passwords_and_client_certificates() {
    let pki = Pki::new("farm");
    let server = pki.server("mosquitto");
    let client = pki.client("gw-farm-001");
    let dir = tempfile::tempdir().expect("tempdir");
    let passwords = dir.path().join("mosquitto.passwd");
    let made = std::process::Command::new("mosquitto_passwd")
        .args(["-c", "-b"])
        .arg(&passwords)
        .args(["gw-farm-001", "Tz7-mK4q-Xw2n-Rb9s"])
        .status()
        .expect("mosquitto_passwd (package mosquitto)");
    assert!(made.success());
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let snippet = std::fs::read_to_string(shipped.join("mosquitto.tls.conf")).expect("snippet");
    let (tls_port, mtls_port) = (support::free_port(), support::free_port());
    let listener = |port: u16, require: bool| {
        snippet
            // The harness sets it, before its own listener.
            .replace("per_listener_settings true", "")
            .replace("listener 8883", &format!("listener {port} 127.0.0.1"))
            .replace("/etc/mosquitto/passwd", &passwords.display().to_string())
            .replace(
                "/etc/mosquitto/sahool-gateway.acl",
                &shipped
                    .join("mosquitto.sahool-gateway.acl")
                    .display()
                    .to_string(),
            )
            .replace(
                "/etc/mosquitto/certs/ca.pem",
                &pki.ca_file().display().to_string(),
            )
            .replace(
                "/etc/mosquitto/certs/broker.pem",
                &server.cert.display().to_string(),
            )
            .replace(
                "/etc/mosquitto/certs/broker.key",
                &server.key.display().to_string(),
            )
            .replace(
                "require_certificate false",
                &format!("require_certificate {require}"),
            )
    };
    // The harness runs mosquitto as root: its own user could not read the test's key files.
    let broker = Mosquitto::start_with(&format!(
        "{}\n{}",
        listener(tls_port, false),
        listener(mtls_port, true)
    ));
    support::wait_for_port(tls_port, Duration::from_secs(10));
    let nats = Nats::with_platform_stream().await;
    let password_file = dir.path().join("mqtt.password");
    write_private(&password_file, "Tz7-mK4q-Xw2n-Rb9s\n");
    let wrong_file = dir.path().join("wrong.password");
    write_private(&wrong_file, "Not-the-Right-One-42\n");
    let source = |name: &str, url: String, password: &Path, extra: &str| {
        format!(
            "\n[[mqtt]]\nname = \"{name}\"\nurl = \"{url}\"\ntopics = [\"sahool/sensors/#\"]\nformat = \"sahool\"\nusername = \"gw-farm-001\"\npassword_file = {}\ntls_ca_file = {}\n{extra}\n",
            quoted(password),
            quoted(&pki.ca_file())
        )
    };
    let sources = [
        source(
            "tls",
            format!("mqtts://127.0.0.1:{tls_port}"),
            &password_file,
            "",
        ),
        source(
            "mtls",
            format!("mqtts://localhost:{mtls_port}"),
            &password_file,
            &format!(
                "tls_cert_file = {}\ntls_key_file = {}",
                quoted(&client.cert),
                quoted(&client.key)
            ),
        ),
        source(
            "intruder",
            format!("mqtts://127.0.0.1:{tls_port}"),
            &wrong_file,
            "",
        ),
    ];
    // The plaintext source of probe_config is replaced by the TLS ones.
    let base = probe_config(&nats, &broker, "", "");
    let (head, tail) = base
        .split_once("[[mqtt]]")
        .expect("probe config has a source");
    let fields = &tail[tail.find("[[fields]]").expect("fields")..];
    let mut gateway = Gateway::start(&format!("{head}{}\n{fields}", sources.concat()));
    gateway.wait_until("both TLS sources connected", Duration::from_secs(30), |g| {
        g.metric("sahool_gateway_mqtt_connected", "source=\"tls\"") == 1.0
            && g.metric("sahool_gateway_mqtt_connected", "source=\"mtls\"") == 1.0
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        publish_all(broker.port, "p1", probe_readings(0..20)).await,
        20
    );
    gateway.wait_until(
        "read by both and forwarded once",
        Duration::from_secs(30),
        |g| {
            g.metric("sahool_gateway_mqtt_messages_total", "source=\"tls\"") == 20.0
                && g.metric("sahool_gateway_mqtt_messages_total", "source=\"mtls\"") == 20.0
                && forwarded(g) == 20.0
                && buffered(g) == 0.0
        },
    );
    assert_eq!(
        gateway.metric("sahool_gateway_mqtt_connected", "source=\"intruder\""),
        0.0
    );
    assert!(gateway.log().contains("NotAuthorized"), "{}", gateway.log());
    let events = nats.read_readings("SAHOOL_IOT").await;
    support::assert_exactly_once(&support::values_in_order(&events), 20);
    assert_eq!(gateway.terminate(), Some(0));
    drop(broker);
}

fn wait_forwarded_at_least(gateway: &Gateway, n: usize) {
    gateway.wait_until(&format!("{n} forwarded"), Duration::from_secs(120), |g| {
        forwarded(g) >= n as f64
    });
}

/// A 3-node JetStream cluster with the stream at 3 replicas, a broker, and a gateway with all
/// three servers in its config, subscribed to the broker.
async fn gateway_on_a_cluster() -> (support::Cluster, Mosquitto, Gateway) {
    let cluster = support::Cluster::start(3);
    cluster
        .create_stream("SAHOOL_IOT", &["sahool.iot.>"], 3)
        .await;
    let broker = Mosquitto::start();
    let gateway = Gateway::start(&config(&cluster.urls(), &broker, ""));
    gateway.wait_subscribed(1).await;
    (cluster, broker, gateway)
}

/// Readings `0..n` are in the cluster's stream exactly once, in the order of their values and
/// of their `seq`.
async fn assert_in_the_stream_once_in_order(cluster: &support::Cluster, n: usize) {
    let events: Vec<_> = cluster
        .read_stream("SAHOOL_IOT")
        .await
        .into_iter()
        .filter(|e| e.body["event_type"] == "sensor_reading")
        .collect();
    let values = support::values_in_order(&events);
    support::assert_exactly_once(&values, n);
    assert!(values.windows(2).all(|w| w[0] < w[1]), "readings in order");
}

/// A 3-node JetStream cluster with the stream at 3 replicas, all three servers in the config:
/// 20,000 readings forwarded while the stream's leader is killed and restarted, then another
/// node; then the whole cluster is down for 30 s while readings arrive. Every reading is in the
/// stream exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_losing_its_leader_then_everything_loses_and_doubles_nothing() {
    const N: usize = 20_000;
    const DURING_OUTAGE: usize = 2_000;
    let (mut cluster, broker, gateway) = gateway_on_a_cluster().await;
    let started = std::time::Instant::now();
    let publisher = tokio::spawn(publish_all(broker.port, "p1", probe_readings(0..N)));

    wait_forwarded_at_least(&gateway, 4_000);
    let first = cluster.stream_leader("SAHOOL_IOT").await;
    cluster.kill(first);
    wait_forwarded_at_least(&gateway, 8_000);
    cluster.restart(first);
    wait_forwarded_at_least(&gateway, 11_000);
    let leader = cluster.stream_leader("SAHOOL_IOT").await;
    let second = if leader == first {
        (first + 1) % 3
    } else {
        leader
    };
    cluster.kill(second);
    wait_forwarded_at_least(&gateway, 14_000);
    cluster.restart(second);
    assert_eq!(publisher.await.expect("publisher"), N);
    gateway.wait_until("all forwarded", Duration::from_secs(120), |g| {
        forwarded(g) == N as f64 && buffered(g) == 0.0
    });
    eprintln!(
        "{N} readings through two node losses in {:.1} s ({} publishes without PubAck, resent)",
        started.elapsed().as_secs_f64(),
        gateway.metric("sahool_gateway_nats_publish_errors_total", "")
    );

    // The whole cluster goes for 30 s; readings keep arriving and are buffered.
    let outage = std::time::Instant::now();
    for i in 0..3 {
        cluster.kill(i);
    }
    assert_eq!(
        publish_all(broker.port, "p2", probe_readings(N..N + DURING_OUTAGE)).await,
        DURING_OUTAGE
    );
    gateway.wait_until("buffered during the outage", Duration::from_secs(25), |g| {
        buffered(g) == DURING_OUTAGE as f64
    });
    tokio::time::sleep(Duration::from_secs(30).saturating_sub(outage.elapsed())).await;
    assert_eq!(
        forwarded(&gateway),
        N as f64,
        "nothing counts as forwarded while down"
    );
    for i in 0..3 {
        cluster.restart(i);
    }
    gateway.wait_until("the backlog forwarded", Duration::from_secs(120), |g| {
        forwarded(g) == (N + DURING_OUTAGE) as f64 && buffered(g) == 0.0
    });

    assert_in_the_stream_once_in_order(&cluster, N + DURING_OUTAGE).await;
    eprintln!(
        "after a 30 s outage of every node: {} readings exactly once, in order; {:.1} s in all",
        N + DURING_OUTAGE,
        started.elapsed().as_secs_f64()
    );
    let mut gateway = gateway;
    assert_eq!(gateway.terminate(), Some(0));
}

/// The whole cluster coming back, node after node, to a gateway holding a backlog, three times:
/// the gateway's link opens before the stream has a leader again, and a leader is elected while
/// it publishes. Every reading is in the stream exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_coming_back_whole_stores_each_backlog_in_order() {
    const CYCLES: usize = 3;
    const BACKLOG: usize = 1_500;
    let (mut cluster, broker, gateway) = gateway_on_a_cluster().await;
    for cycle in 0..CYCLES {
        for i in 0..3 {
            cluster.kill(i);
        }
        let first = cycle * BACKLOG;
        let readings = probe_readings(first..first + BACKLOG);
        let client = format!("p{cycle}");
        assert_eq!(publish_all(broker.port, &client, readings).await, BACKLOG);
        gateway.wait_until("the backlog buffered", Duration::from_secs(30), |g| {
            buffered(g) == BACKLOG as f64
        });
        // One node alone has no quorum: the gateway's link opens and its publishes go
        // unanswered until the second node makes a leader possible.
        for i in 0..3 {
            cluster.restart(i);
            tokio::time::sleep(Duration::from_millis(1_500)).await;
        }
        gateway.wait_until("the backlog forwarded", Duration::from_secs(120), |g| {
            forwarded(g) == (first + BACKLOG) as f64 && buffered(g) == 0.0
        });
        // The next cycle (and the read) starts from a whole cluster: a leader, every replica
        // current. Killed with a replica still behind, nats-server can take minutes to elect.
        cluster.stream_leader("SAHOOL_IOT").await;
    }
    assert_in_the_stream_once_in_order(&cluster, CYCLES * BACKLOG).await;
    eprintln!(
        "{CYCLES} whole-cluster restarts: {} readings exactly once, in order ({} publishes without PubAck, resent)",
        CYCLES * BACKLOG,
        gateway.metric("sahool_gateway_nats_publish_errors_total", "")
    );
    let mut gateway = gateway;
    assert_eq!(gateway.terminate(), Some(0));
}

/// Fails naming the secret and where it showed, without printing the secret.
fn assert_no_secret(output: &str, secrets: &[(&str, String)], place: &str) {
    for (name, value) in secrets {
        assert!(
            !output.contains(value.as_str()),
            "the {name} appears in {place}"
        );
    }
}

/// The base64 lines of a PEM key: any of them in an output is a leak.
fn key_lines(name: &str, pem: &str) -> Vec<(String, String)> {
    pem.lines()
        .filter(|l| !l.starts_with("-----") && l.len() >= 16)
        .map(|l| (format!("{name} (a line of it)"), l.to_string()))
        .collect()
}

/// Everything a gateway prints or serves while it runs with `nats_extra` in `[nats]` and the
/// TLS MQTT source, at trace level: its log (stdout and stderr), `/metrics`, `/readyz`, and
/// the output of `status` and `validate`. Three readings must arrive, so the secrets were used.
async fn everything_printed(
    servers: &[String],
    nats_extra: &str,
    broker: &Mosquitto,
    source: &str,
) -> String {
    let text = config(servers, broker, nats_extra);
    let (head, tail) = text
        .split_once("[[mqtt]]")
        .expect("probe config has a source");
    let fields = &tail[tail.find("[[fields]]").expect("fields")..];
    let mut gateway = Gateway::start_with_env(
        &format!("{head}{source}\n{fields}"),
        &[("RUST_LOG", "trace")],
    );
    gateway.wait_until("TLS source connected", Duration::from_secs(30), |g| {
        g.metric("sahool_gateway_mqtt_connected", "") == 1.0
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        publish_all(broker.port, "p1", probe_readings(0..3)).await,
        3
    );
    gateway.wait_until(
        "forwarded with these secrets",
        Duration::from_secs(30),
        |g| forwarded(g) == 3.0 && buffered(g) == 0.0,
    );
    let mut out = String::new();
    for path in ["/metrics", "/readyz"] {
        out.push_str(&gateway.get(path).map(|(_, body)| body).unwrap_or_default());
    }
    for args in [&["status"][..], &["validate"][..]] {
        let o = gateway.cli(args);
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        out.push_str(&String::from_utf8_lossy(&o.stdout));
        out.push_str(&String::from_utf8_lossy(&o.stderr));
    }
    assert_eq!(gateway.terminate(), Some(0));
    out.push_str(&gateway.log());
    assert!(out.contains("TRACE"), "the gateway logged at trace level");
    out
}

/// `validate` output for a config that fails; it must fail.
fn failing_validate(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write config");
    let o = std::process::Command::new(support::gateway_binary())
        .args(["validate", "--config"])
        .arg(&path)
        .output()
        .expect("run validate");
    assert_eq!(o.status.code(), Some(1), "{name} must fail validate");
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Every kind of secret configured in turn (NATS password, token, NKey seed, creds; MQTT
/// password; TLS client keys), the gateway at trace level: none appears in its logs,
/// `/metrics`, `/readyz`, `status` or `validate` output, nor in the output of validates that
/// fail (a wrong key, a secret of the wrong type, a weak password in a file), nor when `run`
/// refuses a weak password file at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_appears_in_any_output() {
    let pki = Pki::new("platform");
    let nats_client = pki.client("gw-nats");
    let mqtt_client = pki.client("gw-mqtt");
    let admin = pki.client("platform-admin");
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = |name: &str, text: &str| {
        let path = dir.path().join(name);
        write_private(&path, &format!("{text}\n"));
        path
    };
    let nats_password = "Np-4vX8-qLr2-Zt7m".to_string();
    let token = "Tk-9dQ2-wE5r-Yh3u-Bn6c".to_string();
    let mqtt_password = "Mq-3sD7-kP9w-Jx4f".to_string();
    let nkey = nkeys::KeyPair::new_user();
    let operator = nats_jwt::operator("sahool-test");
    let account = nats_jwt::account(&operator, "SAHOOL");
    let creds_user = nats_jwt::user(&account, "gw-test", None);
    let platform_user = nats_jwt::user(&account, "platform", None);
    let mut secrets: Vec<(&str, String)> = vec![
        ("NATS password", nats_password.clone()),
        ("NATS token", token.clone()),
        ("MQTT password", mqtt_password.clone()),
        ("NKey seed", nkey.seed().expect("seed")),
        ("creds seed", creds_user.seed()),
        ("creds JWT", creds_user.jwt.clone()),
    ];
    let key_secrets: Vec<(String, String)> = [
        ("NATS client key", &nats_client),
        ("MQTT client key", &mqtt_client),
    ]
    .iter()
    .flat_map(|(name, files)| key_lines(name, &files.key_pem()))
    .collect();
    secrets.extend(key_secrets.iter().map(|(n, v)| (n.as_str(), v.clone())));

    // MQTT: mosquitto over mTLS with a password, read by a source with an inline password.
    let passwords = dir.path().join("mosquitto.passwd");
    let made = std::process::Command::new("mosquitto_passwd")
        .args(["-c", "-b"])
        .arg(&passwords)
        .args(["gw-test", &mqtt_password])
        .status()
        .expect("mosquitto_passwd");
    assert!(made.success());
    let broker_cert = pki.server("mosquitto");
    let mqtt_port = support::free_port();
    let broker = Mosquitto::start_with(&format!(
        "listener {mqtt_port} 127.0.0.1\nallow_anonymous false\npassword_file {}\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
        passwords.display(),
        pki.ca_file().display(),
        broker_cert.cert.display(),
        broker_cert.key.display()
    ));
    support::wait_for_port(mqtt_port, Duration::from_secs(10));
    let source = format!(
        "[[mqtt]]\nname = \"farm\"\nurl = \"mqtts://127.0.0.1:{mqtt_port}\"\ntopics = [\"sahool/sensors/#\"]\nformat = \"sahool\"\nusername = \"gw-test\"\npassword = \"{mqtt_password}\"\ntls_ca_file = {}\ntls_cert_file = {}\ntls_key_file = {}\n",
        quoted(&pki.ca_file()),
        quoted(&mqtt_client.cert),
        quoted(&mqtt_client.key)
    );
    let nats_tls = format!(
        "tls_ca_file = {}\ntls_cert_file = {}\ntls_key_file = {}",
        quoted(&pki.ca_file()),
        quoted(&nats_client.cert),
        quoted(&nats_client.key)
    );
    let admin_tls = {
        let (ca, cert, key) = (pki.ca_file(), admin.cert.clone(), admin.key.clone());
        move || {
            async_nats::ConnectOptions::new()
                .add_root_certificates(ca.clone())
                .add_client_certificate(cert.clone(), key.clone())
                .require_tls(true)
        }
    };
    let tls_server = server_tls(&pki, "nats", &["localhost", "127.0.0.1"], true);

    // Users with passwords and NKeys on one server, a token on another, JWTs on a third.
    let users = Nats::start_with(&format!(
        "{tls_server}authorization {{ users: [ {{ user: gw, password: \"{nats_password}\" }}, {{ nkey: {} }}, {{ user: platform, password: \"Pl-7hG3-nB8v-Qz2x\" }} ] }}",
        nkey.public_key()
    ))
    .with_client_options(Arc::new({
        let tls = admin_tls.clone();
        move || tls().user_and_password("platform".into(), "Pl-7hG3-nB8v-Qz2x".into())
    }));
    users.create_stream("SAHOOL_IOT", &["sahool.iot.>"]).await;
    let token_server = Nats::start_with(&format!(
        "{tls_server}authorization {{ token: \"{token}\" }}"
    ))
    .with_client_options(Arc::new({
        let (tls, token) = (admin_tls.clone(), token.clone());
        move || tls().token(token.clone())
    }));
    token_server
        .create_stream("SAHOOL_IOT", &["sahool.iot.>"])
        .await;
    let platform_creds = platform_user.creds();
    let jwt_server = Nats::start_with(&format!(
        "{tls_server}{}",
        nats_jwt::server_config(dir.path(), &operator, &account)
    ))
    .with_client_options(Arc::new({
        let tls = admin_tls.clone();
        move || tls().credentials(&platform_creds).expect("platform creds")
    }));
    jwt_server
        .create_stream("SAHOOL_IOT", &["sahool.iot.>"])
        .await;

    let runs = [
        (
            &users,
            format!("user = \"gw\"\npassword = \"{nats_password}\""),
        ),
        (
            &users,
            format!(
                "user = \"gw\"\npassword_file = {}",
                quoted(&secret("nats.password", &nats_password))
            ),
        ),
        (
            &users,
            format!(
                "nkey_seed_file = {}",
                quoted(&secret("gw.nk", &nkey.seed().expect("seed")))
            ),
        ),
        (&token_server, format!("token = \"{token}\"")),
        (
            &token_server,
            format!("token_file = {}", quoted(&secret("nats.token", &token))),
        ),
        (
            &jwt_server,
            format!(
                "creds_file = {}",
                quoted(&secret("gw.creds", &creds_user.creds()))
            ),
        ),
    ];
    for (server, auth) in &runs {
        let servers = [tls_url(server)];
        let printed =
            everything_printed(&servers, &format!("{auth}\n{nats_tls}"), &broker, &source).await;
        assert_no_secret(
            &printed,
            &secrets,
            &format!(
                "the output of a gateway with `{}`",
                auth.lines().next().unwrap_or_default()
            ),
        );
    }

    // Validates that fail print no secret either.
    let servers = [tls_url(&users)];
    let full = |auth: &str| {
        let text = config(&servers, &broker, &format!("{auth}\n{nats_tls}"));
        let (head, tail) = text.split_once("[[mqtt]]").expect("source");
        let fields = &tail[tail.find("[[fields]]").expect("fields")..];
        format!(
            "[gateway]\nid = \"gw-1\"\ntenant_id = \"t\"\ndata_dir = \"{}\"\n[http]\nlisten = \"127.0.0.1:{}\"\n{head}{source}\n{fields}",
            dir.path().join("data").display(),
            support::free_port()
        )
    };
    let unknown_key = failing_validate(
        dir.path(),
        "unknown.toml",
        &full(&format!("{}\ncolour = \"green\"", runs[0].1)),
    );
    assert!(unknown_key.contains("colour"), "{unknown_key}");
    let numeric_token = "98765432109876".to_string();
    let wrong_type = failing_validate(
        dir.path(),
        "wrong-type.toml",
        &full(&format!("token = {numeric_token}")),
    );
    assert!(
        wrong_type.contains("a secret must be a string"),
        "{wrong_type}"
    );
    let weak = "Password123".to_string();
    let weak_file = failing_validate(
        dir.path(),
        "weak.toml",
        &full(&format!(
            "user = \"gw\"\npassword_file = {}",
            quoted(&secret("weak.password", &weak))
        )),
    );
    assert!(weak_file.contains("known default"), "{weak_file}");
    // `run` refuses the same file at start.
    let run = std::process::Command::new(support::gateway_binary())
        .args(["run", "--config"])
        .arg(dir.path().join("weak.toml"))
        .env("RUST_LOG", "trace")
        .output()
        .expect("run the gateway");
    assert_eq!(run.status.code(), Some(1));
    let run = format!(
        "{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(run.contains("known default"), "{run}");
    secrets.push(("numeric token", numeric_token));
    secrets.push(("weak password", weak));
    for (what, output) in [
        ("an unknown key", unknown_key),
        ("a secret of the wrong type", wrong_type),
        ("a weak password file", weak_file),
    ] {
        assert_no_secret(&output, &secrets, &format!("the output of {what}"));
    }
}
