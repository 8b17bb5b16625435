//! `sahool-gateway doctor` through the binary, against a real nats-server (JetStream), a real
//! mosquitto and a pseudo-terminal for the serial port: every check passes on a good setup,
//! and each is made to fail once, with exit code 1 and the line that says why.
//!
//! The clock check reads the kernel's state, which a test cannot change: the good setup
//! accepts either answer as long as the exit code follows it, and the reading of the kernel's
//! status bits is tested in `src/common/clock.rs`.

mod support;

#[path = "support/pki.rs"]
mod pki;

use std::time::{Duration, Instant};

use async_nats::jetstream;
use support::pty::Pty;
use support::{probe_config, Gateway, Mosquitto, Nats};

const GATEWAY_SUBJECTS: [&str; 3] = [
    "sahool.iot.gateway.status",
    "sahool.iot.gateway.config",
    "sahool.iot.actuator.result",
];

/// A farm whose every part doctor checks: NATS with the platform's streams, a broker, a port.
struct Farm {
    nats: Nats,
    broker: Mosquitto,
    port: Pty,
}

impl Farm {
    /// The platform as designed: `SAHOOL_IOT` on `sahool.iot.>` (2 min window), and
    /// `SAHOOL_COMMANDS` with this gateway's durable consumer.
    async fn good() -> Self {
        Self::with_streams(&["sahool.iot.>"], true).await
    }

    /// `SAHOOL_IOT` on `iot_subjects`, and `SAHOOL_COMMANDS`, with or without the consumer.
    async fn with_streams(iot_subjects: &[&str], consumer: bool) -> Self {
        let farm = Self::bare(Nats::start(), Mosquitto::start());
        farm.nats.create_stream("SAHOOL_IOT", iot_subjects).await;
        farm.commands_stream(consumer).await;
        farm
    }

    fn bare(nats: Nats, broker: Mosquitto) -> Self {
        Self {
            nats,
            broker,
            port: Pty::open(),
        }
    }

    async fn commands_stream(&self, with_consumer: bool) {
        self.nats
            .create_stream("SAHOOL_COMMANDS", &["sahool.commands.>"])
            .await;
        if !with_consumer {
            return;
        }
        let js = jetstream::new(self.nats.client().await);
        let stream = js.get_stream("SAHOOL_COMMANDS").await.expect("stream");
        stream
            .create_consumer(jetstream::consumer::pull::Config {
                durable_name: Some("gw-gw-test".into()),
                filter_subject: "sahool.commands.iot.actuator.tenant-a.gw-test".into(),
                ..Default::default()
            })
            .await
            .expect("create consumer");
    }

    /// The gateway's config: the probe farm, a `lines` port, an MQTT actuator and
    /// `[commands]`; `nats` lines go to `[nats]`, `buffer` to `[buffer]`, `more` at the end.
    fn config(&self, nats: &str, buffer: &str, more: &str) -> String {
        let config = probe_config(&self.nats, &self.broker, buffer, nats);
        format!(
            "{config}  [[fields.sensors]]\n  device_id = \"tank-1\"\n  sensor_type = \"water_level\"\n  line = {{ port = \"talker\", key = \"level\" }}\n\
             \x20 [[fields.actuators]]\n  id = \"valve-1\"\n  kind = \"switch\"\n  [fields.actuators.mqtt]\n  source = \"farm\"\n  command_topic = \"valve/1/set\"\n  payload_on = \"ON\"\n  payload_off = \"OFF\"\n\n\
             [[serial]]\nname = \"talker\"\npath = \"{}\"\nprotocol = \"lines\"\nline_format = \"kv\"\ndevice_id = \"tank-1\"\n\n\
             [commands]\nenabled = true\n{more}\n",
            self.port.slave_path().display()
        )
    }
}

const ADMIN_PASSWORD: &str = "Vb5nM8qR2tY6wE9uK3xZ";
const GATEWAY_PASSWORD: &str = "Gw7hJ3kL9pQ2sD5fA8zC";

/// A farm whose nats-server has two users, with `SAHOOL_IOT`: `admin`, the test's own, and
/// `gw` with `permissions` (a nats-server permissions value; `preamble` may define it).
async fn farm_with_gateway_user(preamble: &str, permissions: &str) -> Farm {
    let nats = Nats::start_with(&format!(
        "{preamble}\nauthorization {{\n  users: [\n    {{ user: admin, password: \"{ADMIN_PASSWORD}\" }}\n    \
         {{ user: gw, password: \"{GATEWAY_PASSWORD}\", permissions: {permissions} }}\n  ]\n}}\n"
    ))
    .with_client_options(std::sync::Arc::new(|| {
        async_nats::ConnectOptions::with_user_and_password("admin".into(), ADMIN_PASSWORD.into())
    }));
    let farm = Farm::bare(nats, Mosquitto::start());
    farm.nats
        .create_stream("SAHOOL_IOT", &["sahool.iot.>"])
        .await;
    farm
}

/// [`farm_with_gateway_user`] with the shipped `$SAHOOL_GATEWAY` permissions
/// (`config/nats-server.least-privilege.conf`).
async fn least_privilege_farm() -> Farm {
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("config/nats-server.least-privilege.conf");
    let shipped = std::fs::read_to_string(&shipped).expect("the shipped permissions");
    farm_with_gateway_user(&shipped, "$SAHOOL_GATEWAY").await
}

/// `[nats]` lines for the user `gw`.
fn as_gw() -> String {
    format!("user = \"gw\"\npassword = \"{GATEWAY_PASSWORD}\"")
}

/// What doctor printed and its exit code.
struct Report {
    code: Option<i32>,
    lines: Vec<String>,
}

impl Report {
    fn line(&self, start: &str) -> &str {
        self.lines
            .iter()
            .find(|l| l.starts_with(start))
            .unwrap_or_else(|| panic!("no line starting `{start}` in:\n{}", self.text()))
    }

    fn text(&self) -> String {
        self.lines.join("\n")
    }

    /// Fails with exit code 1, and the line starting with `start` contains each of `words`.
    fn fails_with(&self, start: &str, words: &[&str]) {
        assert_eq!(self.code, Some(1), "{}", self.text());
        let line = self.line(start);
        for w in words {
            assert!(line.contains(w), "`{w}` not in `{line}`");
        }
    }
}

fn doctor(config: &str) -> Report {
    doctor_on(&Gateway::configure(config, &[]))
}

/// `doctor` on a gateway's config as written.
fn doctor_on(gateway: &Gateway) -> Report {
    let started = Instant::now();
    let out = gateway.cli(&["doctor"]);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "doctor took {:?}",
        started.elapsed()
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Report {
        code: out.status.code(),
        lines: stdout.lines().map(String::from).collect(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_good_setup_passes_every_check() {
    let farm = Farm::good().await;
    let report = doctor(&farm.config("", "", "create_consumer = false"));
    let text = report.text();
    for start in [
        "ok    config: ",
        "ok    nats: connected to nats://127.0.0.1:",
        "ok    stream: SAHOOL_IOT captures ",
        "ok    commands: stream SAHOOL_COMMANDS captures sahool.commands.iot.actuator.tenant-a.gw-test; durable consumer gw-gw-test",
        "ok    mqtt farm: connected to mqtt://127.0.0.1:",
        "ok    serial talker: /dev/pts/",
        "ok    disk: ",
    ] {
        report.line(start);
    }
    let stream = report.line("ok    stream: ");
    for subject in GATEWAY_SUBJECTS
        .iter()
        .chain(&["sahool.iot.sensor.reading", "sahool.iot.sensor.connected"])
    {
        assert!(stream.contains(subject), "{subject} not in {stream}");
    }
    assert!(stream.contains("(duplicate window 2m)"), "{stream}");
    // Every line but the clock's passes; the clock is this machine's, and the exit code
    // follows it.
    let others: Vec<&String> = report
        .lines
        .iter()
        .filter(|l| !l.contains(" clock: "))
        .collect();
    assert!(others.iter().all(|l| l.starts_with("ok ")), "{text}");
    let clock = report
        .lines
        .iter()
        .find(|l| l.contains(" clock: "))
        .unwrap_or_else(|| panic!("no clock line:\n{text}"));
    if clock.starts_with("ok    clock: synchronised") {
        assert_eq!(report.code, Some(0), "{text}");
    } else {
        assert!(
            clock.starts_with("FAIL  clock: not synchronised"),
            "{clock}"
        );
        assert!(clock.contains("— fix: run a time service"), "{clock}");
        assert_eq!(report.code, Some(1), "{text}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_nats_password_fails_the_connection_and_skips_the_streams() {
    let password = "Tq8vN2rX5mZ4kLp7wS9y";
    let nats = Nats::start_with(&format!(
        "authorization {{ user: gw, password: \"{password}\" }}"
    ));
    let farm = Farm::bare(nats, Mosquitto::start());
    let wrong = "Hd3fK9sLq2Wn7Xv4Bz6M";
    let report = doctor(&farm.config(&format!("user = \"gw\"\npassword = \"{wrong}\""), "", ""));
    report.fails_with(
        "FAIL  nats: ",
        &[
            "refuses as user gw",
            "— fix: check [nats] user and password",
        ],
    );
    report.line("skip  stream: NATS not reached");
    report.line("skip  commands: NATS not reached");
    assert!(!report.text().contains(wrong), "the password was printed");
    // The other checks still run.
    report.line("ok    mqtt farm: ");
    report.line("ok    serial talker: ");
}

/// With a CA that did not sign the server's certificate, the line starting `start` fails and
/// says why.
fn another_ca_fails(config_with_ca: impl Fn(&std::path::Path) -> String, start: &str) {
    let other = pki::Pki::new("other");
    doctor(&config_with_ca(&other.ca_file())).fails_with(
        start,
        &[
            "failed: server certificate rejected for 127.0.0.1: invalid peer certificate: UnknownIssuer",
            "— fix: check tls_ca_file",
        ],
    );
}

/// NATS over TLS: connected with the configured CA, refused with another CA and the cause said.
#[tokio::test(flavor = "multi_thread")]
async fn nats_over_tls_passes_with_its_ca_and_fails_with_another() {
    let pki = pki::Pki::new("platform");
    let server = pki.server("nats");
    let client_tls = sahool_gateway::common::tls::client_config(
        &sahool_gateway::common::tls::TlsFiles {
            ca: Some(&pki.ca_file()),
            cert: None,
            key: None,
            server_name: None,
        },
        "test client",
    )
    .expect("test TLS config");
    let nats = Nats::start_with(&format!(
        "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  timeout: 5\n}}\n",
        server.cert.display(),
        server.key.display()
    ))
    .with_client_options(std::sync::Arc::new(move || {
        async_nats::ConnectOptions::new()
            .tls_client_config(client_tls.config.as_ref().clone())
            .require_tls(true)
    }));
    let farm = Farm::bare(nats, Mosquitto::start());
    farm.nats
        .create_stream("SAHOOL_IOT", &["sahool.iot.>"])
        .await;
    farm.commands_stream(true).await;
    let with_ca = |ca: &std::path::Path| {
        farm.config(&format!("tls_ca_file = \"{}\"", ca.display()), "", "")
            .replace(
                &farm.nats.url(),
                &format!("tls://127.0.0.1:{}", farm.nats.port),
            )
    };
    let report = doctor(&with_ca(&pki.ca_file()));
    let connected = report.line("ok    nats: connected to tls://127.0.0.1:");
    assert!(
        connected.ends_with("without credentials, TLS"),
        "{connected}"
    );
    report.line("ok    stream: SAHOOL_IOT captures ");
    report.line("ok    commands: ");
    another_ca_fails(with_ca, "FAIL  nats: TLS with tls://127.0.0.1:");
}

/// An MQTT broker over TLS: connected with the configured CA, refused with another.
#[tokio::test(flavor = "multi_thread")]
async fn an_mqtt_broker_over_tls_passes_with_its_ca_and_fails_with_another() {
    let pki = pki::Pki::new("farm");
    let server = pki.server("broker");
    let port = support::free_port();
    let broker = Mosquitto::start_with(&format!(
        "listener {port} 127.0.0.1\nallow_anonymous true\ncertfile {}\nkeyfile {}\n",
        server.cert.display(),
        server.key.display()
    ));
    let farm = Farm::bare(Nats::with_platform_stream().await, broker);
    farm.commands_stream(true).await;
    let with_ca = |ca: &std::path::Path| {
        farm.config("", "", "").replace(
            &format!("url = \"{}\"", farm.broker.url()),
            &format!(
                "url = \"mqtts://127.0.0.1:{port}\"\ntls_ca_file = \"{}\"",
                ca.display()
            ),
        )
    };
    let report = doctor(&with_ca(&pki.ca_file()));
    let connected = report.line("ok    mqtt farm: connected to mqtts://127.0.0.1:");
    assert!(
        connected.contains("anonymously, TLS; subscribed to sahool/sensors/#"),
        "{connected}"
    );
    another_ca_fails(with_ca, "FAIL  mqtt farm: TLS with mqtts://127.0.0.1:");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_subject_no_stream_captures_fails_and_names_the_edit() {
    let iot = [
        "sahool.iot.sensor.>",
        "sahool.iot.gateway.status",
        "sahool.iot.actuator.result",
    ];
    let farm = Farm::with_streams(&iot, false).await;
    let report = doctor(&farm.config("", "", ""));
    report.fails_with(
        "FAIL  stream: no stream captures sahool.iot.gateway.config",
        &["— fix: add it to the stream's subjects: nats stream edit SAHOOL_IOT --subjects \"sahool.iot.sensor.>,sahool.iot.gateway.status,sahool.iot.actuator.result,sahool.iot.gateway.config\""],
    );
    report.line("ok    stream: SAHOOL_IOT captures ");
    // create_consumer = true (the default): a missing consumer is the gateway's to create,
    // and the probe that says this user may creates nothing.
    report.line("ok    commands: stream SAHOOL_COMMANDS captures sahool.commands.iot.actuator.tenant-a.gw-test; durable consumer gw-gw-test does not exist yet: the gateway creates it at start (create_consumer = true, and this user may)");
    let js = jetstream::new(farm.nats.client().await);
    let stream = js.get_stream("SAHOOL_COMMANDS").await.expect("stream");
    assert_eq!(stream.cached_info().state.consumer_count, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn without_any_stream_every_subject_fails_and_the_stream_to_add_is_named() {
    let farm = Farm::bare(Nats::start(), Mosquitto::start());
    let report = doctor(
        &farm
            .config("", "", "")
            .replace("[commands]\nenabled = true", ""),
    );
    report.fails_with(
        "FAIL  stream: no stream captures sahool.iot.sensor.reading",
        &["— fix: have the platform create its stream: nats stream add SAHOOL_IOT --subjects \"sahool.iot.>\" --dupe-window 2m"],
    );
    let missing = report
        .lines
        .iter()
        .filter(|l| l.starts_with("FAIL  stream: no stream captures"));
    assert_eq!(missing.count(), 6, "{}", report.text());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_duplicate_window_shorter_than_a_resend_fails() {
    // nats-server refuses a stream without a duplicate window (and gives one of 2 min to a
    // stream that names none): 100 ms, the least it takes, is as good as none for a gateway
    // that resends after `ack_timeout`.
    let farm = Farm::bare(Nats::start(), Mosquitto::start());
    let js = jetstream::new(farm.nats.client().await);
    js.create_stream(jetstream::stream::Config {
        name: "SAHOOL_IOT".into(),
        subjects: vec!["sahool.iot.>".into()],
        duplicate_window: Duration::from_millis(100),
        ..Default::default()
    })
    .await
    .expect("create stream");
    farm.commands_stream(true).await;
    let report = doctor(&farm.config("", "", ""));
    report.fails_with(
        "FAIL  stream: SAHOOL_IOT captures ",
        &[
            "its duplicate window 100ms is shorter than one resend (2s ack_timeout + up to 5s backoff)",
            "— fix: nats stream edit SAHOOL_IOT --dupe-window 2m",
        ],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_commands_consumer_fails_when_the_gateway_may_not_create_it() {
    let farm = Farm::with_streams(&["sahool.iot.>"], false).await;
    let report = doctor(&farm.config("", "", "create_consumer = false"));
    report.fails_with(
        "FAIL  commands: durable consumer gw-gw-test does not exist on stream SAHOOL_COMMANDS, and create_consumer = false",
        &["— fix: have the platform create it: nats consumer add SAHOOL_COMMANDS gw-gw-test --pull --filter sahool.commands.iot.actuator.tenant-a.gw-test"],
    );
}

/// mosquitto's `acl_file` never refuses a SUBSCRIBE (it grants it and drops what the ACL
/// denies at delivery); its dynamic-security plugin refuses in the SUBACK. The user made by
/// `mosquitto_ctrl dynsec init` may subscribe to `#`; that grant removed, the plugin's default
/// (no subscriptions) denies `sahool/sensors/#`.
fn broker_denying_subscriptions(user: &str, password: &str) -> (Mosquitto, u16, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let dynsec = dir.path().join("dynsec.json");
    let made = std::process::Command::new("mosquitto_ctrl")
        .args(["dynsec", "init"])
        .arg(&dynsec)
        .args([user, password])
        .output()
        .expect("mosquitto_ctrl (Debian package mosquitto)");
    assert!(made.status.success(), "{made:?}");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&dynsec).expect("dynsec.json")).expect("JSON");
    for role in config["roles"].as_array_mut().expect("roles") {
        role["acls"]
            .as_array_mut()
            .expect("acls")
            .retain(|acl| !(acl["acltype"] == "subscribePattern" && acl["topic"] == "#"));
    }
    std::fs::write(&dynsec, config.to_string()).expect("write dynsec.json");
    let plugin = [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib",
    ]
    .iter()
    .map(|d| std::path::Path::new(d).join("mosquitto_dynamic_security.so"))
    .find(|p| p.exists())
    .expect("mosquitto_dynamic_security.so (Debian package mosquitto)");
    let port = support::free_port();
    let broker = Mosquitto::start_with(&format!(
        "listener {port} 127.0.0.1\nallow_anonymous false\nplugin {}\nplugin_opt_config_file {}\n",
        plugin.display(),
        dynsec.display()
    ));
    (broker, port, dir)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_consumer_this_user_may_not_create_fails() {
    let farm = farm_with_gateway_user(
        "",
        r#"{
        publish: { allow: ["sahool.iot.>", "$JS.API.STREAM.NAMES", "$JS.API.STREAM.INFO.*", "$JS.API.CONSUMER.INFO.>"] }
        subscribe: { allow: ["_INBOX.>"] } }"#,
    )
    .await;
    farm.commands_stream(false).await;
    let report = doctor(&farm.config(&as_gw(), "", ""));
    report.line("ok    nats: connected to nats://127.0.0.1:");
    report.line("ok    stream: SAHOOL_IOT captures ");
    report.fails_with(
        "FAIL  commands: stream SAHOOL_COMMANDS captures sahool.commands.iot.actuator.tenant-a.gw-test; durable consumer gw-gw-test does not exist yet, and this user may not create it (create_consumer = true)",
        &["— fix: have the platform create it: nats consumer add SAHOOL_COMMANDS gw-gw-test"],
    );
    // The probe created nothing.
    let js = jetstream::new(farm.nats.client().await);
    let stream = js.get_stream("SAHOOL_COMMANDS").await.expect("stream");
    assert_eq!(stream.cached_info().state.consumer_count, 0);
}

/// The shipped least-privilege permissions let the gateway ask which stream captures a subject,
/// but not read the stream: the window is unknown, a warning, not a failure.
#[tokio::test(flavor = "multi_thread")]
async fn a_least_privilege_user_sees_its_stream_but_not_its_window() {
    let farm = least_privilege_farm().await;
    let config = farm
        .config(&as_gw(), "", "")
        .replace("[commands]\nenabled = true", "[commands]\nenabled = false");
    let report = doctor(&config);
    report.line("ok    nats: connected to nats://127.0.0.1:");
    let window = report.line("WARN  stream: SAHOOL_IOT captures ");
    assert!(
        window.contains("its duplicate window is unknown: this user may not read it — fix: allow this user $JS.API.STREAM.INFO.SAHOOL_IOT"),
        "{window}"
    );
    assert!(!report.text().contains("commands:"), "{}", report.text());
    let failed: Vec<&String> = report
        .lines
        .iter()
        .filter(|l| l.starts_with("FAIL"))
        .collect();
    assert!(failed.iter().all(|l| l.contains(" clock: ")), "{failed:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_acl_that_denies_the_topic_fails_the_subscription() {
    let password = "Pz7wQ2nV8kXc4Rm6Ty3J";
    let (broker, port, _dir) = broker_denying_subscriptions("gw-farm", password);
    let farm = Farm::bare(Nats::with_platform_stream().await, broker);
    farm.commands_stream(true).await;
    let config = farm.config("", "", "").replace(
        &format!("url = \"{}\"", farm.broker.url()),
        &format!(
            "url = \"mqtt://127.0.0.1:{port}\"\nusername = \"gw-farm\"\npassword = \"{password}\""
        ),
    );
    let report = doctor(&config);
    report.fails_with(
        "FAIL  mqtt farm: ",
        &[
            "refuses as user gw-farm the subscription to sahool/sensors/# (NotAuthorized)",
            "— fix: let user gw-farm read sahool/sensors/#",
        ],
    );
    assert!(
        !report.text().contains(password),
        "the password was printed"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_serial_port_that_does_not_exist_fails() {
    let farm = Farm::good().await;
    let config = farm.config("", "", "").replace(
        &farm.port.slave_path().display().to_string(),
        "/dev/serial/by-id/usb-doctor-test-not-plugged-in",
    );
    let report = doctor(&config);
    report.fails_with(
        "FAIL  serial talker: /dev/serial/by-id/usb-doctor-test-not-plugged-in: no such device",
        &["— fix: plug the adapter in"],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_disk_reserve_larger_than_the_disk_fails() {
    let farm = Farm::good().await;
    let config = farm
        .config("", "", "")
        .replace("min_free_disk = \"1MiB\"", "min_free_disk = \"1000000TiB\"");
    let report = doctor(&config);
    report.fails_with(
        "FAIL  disk: ",
        &["below the reserve min_free_disk", "— fix: free space"],
    );
}

#[test]
fn an_invalid_config_fails_and_checks_nothing_else() {
    let report = doctor("[nats]\nservers = []\n");
    report.fails_with(
        "FAIL  config: ",
        &["servers: list at least one server", "— fix: correct it"],
    );
    report.line("skip  all: ");
    assert_eq!(report.lines.len(), 2, "{}", report.text());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_nats_server_fails_in_bounded_time() {
    let mut farm = Farm::good().await;
    farm.nats.freeze();
    let started = Instant::now();
    let report = doctor(&farm.config("", "", ""));
    farm.nats.thaw();
    report.fails_with("FAIL  nats: ", &[]);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
}

const BUCKET: &str = "sahool_gateway_config_tenant-a";

/// `[fleet]` with remote config on, the bucket the tenant's.
const REMOTE_CONFIG: &str = "[fleet]\nconfig_bucket = \"sahool_gateway_config_{tenant_id}\"\n";

/// With `[fleet] config_bucket`: a missing bucket fails, then a latest revision the gateway
/// would refuse, then one it would take passes.
#[tokio::test(flavor = "multi_thread")]
async fn the_config_bucket_must_exist_and_its_latest_revision_validate() {
    let farm = Farm::good().await;
    let config = farm.config("", "", &format!("create_consumer = false\n{REMOTE_CONFIG}"));
    doctor(&config).fails_with(
        "FAIL  config_bucket: bucket sahool_gateway_config_tenant-a does not exist",
        &["— fix: have the platform create it: nats kv add sahool_gateway_config_tenant-a"],
    );

    let kv = support::create_bucket(farm.nats.client().await, BUCKET).await;
    let report = doctor(&config);
    report
        .line("ok    config_bucket: bucket sahool_gateway_config_tenant-a has no key gw-test yet");

    let bad = kv
        .put("gw-test", "[gateway]\nid = \"gw-test\"\n".into())
        .await
        .unwrap();
    doctor(&config).fails_with(
        &format!("FAIL  config_bucket: bucket {BUCKET}: key gw-test revision {bad} would be refused (validate): "),
        &["missing section [nats]", "— fix: put a corrected revision: nats kv put"],
    );

    // The revision the gateway would take: its own file (same [gateway], [buffer], [http]).
    let gateway = Gateway::configure(&config, &[]);
    let good_text = std::fs::read_to_string(&gateway.config_path).expect("config");
    let good = kv.put("gw-test", good_text.into()).await.unwrap();
    let report = doctor_on(&gateway);
    report.line(&format!(
        "ok    config_bucket: bucket {BUCKET}: key gw-test revision {good} validates"
    ));
}

/// The shipped per-gateway permissions let doctor read the gateway's key; a user with only
/// the shared `$SAHOOL_GATEWAY` block may not open the bucket, and the line names the template.
#[tokio::test(flavor = "multi_thread")]
async fn the_config_bucket_is_read_with_the_shipped_permissions_only() {
    let farm = least_privilege_farm().await;
    support::create_bucket(farm.nats.client().await, BUCKET).await;
    let config = farm
        .config(&as_gw(), "", REMOTE_CONFIG)
        .replace("[commands]\nenabled = true", "[commands]\nenabled = false");
    doctor(&config).fails_with(
        &format!("FAIL  config_bucket: this user may not publish to $JS.API.STREAM.INFO.KV_{BUCKET}"),
        &["— fix: give the gateway's user the remote config lines of config/nats-server.gateway-user.template"],
    );

    let nats = Nats::with_shipped_permissions_for_gw_test(BUCKET).await;
    let kv = support::create_bucket(nats.client().await, BUCKET).await;
    let secrets = tempfile::tempdir().expect("tempdir");
    let farm = Farm::bare(nats, Mosquitto::start());
    let config = farm
        .config(
            &support::gateway_user_auth(secrets.path()),
            "",
            REMOTE_CONFIG,
        )
        .replace("[commands]\nenabled = true", "[commands]\nenabled = false");
    let revision = kv.put("gw-test", "not toml".into()).await.unwrap();
    doctor(&config).fails_with(
        &format!("FAIL  config_bucket: bucket {BUCKET}: key gw-test revision {revision} would be refused (validate)"),
        &[],
    );
}
