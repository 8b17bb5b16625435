//! `sahool-gateway status` against the real running binary.

mod support;

use std::time::Duration;

use support::{probe_config, probe_readings, publish_all, Gateway, Mosquitto, Nats};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_summarises_links_backlog_sources_and_dead_letters() {
    let mut nats = Nats::with_platform_stream().await;
    let broker = Mosquitto::start();
    let gateway = Gateway::start(&probe_config(&nats, &broker, "", ""));
    gateway.wait_subscribed(1).await;
    nats.stop();
    let mut messages = probe_readings(0..5);
    messages.push(("sahool/sensors/x".into(), b"not json".to_vec()));
    assert_eq!(publish_all(broker.port, "status", messages).await, 6);
    gateway.wait_until("buffered", Duration::from_secs(20), |g| {
        g.metric("sahool_gateway_buffer_readings", "") == 5.0
    });

    let out = gateway.cli(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("NOT READY"), "{text}");
    assert!(text.contains("NATS:          DISCONNECTED"), "{text}");
    assert!(text.contains("backlog:       5 readings"), "{text}");
    assert!(
        text.contains("farm") && text.contains("connected"),
        "{text}"
    );
    assert!(
        text.contains("dead-letters:  1") && text.contains("malformed"),
        "{text}"
    );

    // --json: the same report, typed.
    let out = gateway.cli(&["status", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: sahool_gateway::common::status::StatusReport =
        serde_json::from_slice(&out.stdout).expect("status --json is a StatusReport");
    assert!(!report.ready && !report.nats_connected, "{report:?}");
    assert_eq!(report.backlog_readings, 5, "{report:?}");
    assert_eq!(
        report.dead_letters_by_reason,
        [("malformed".to_string(), 1)].into(),
        "{report:?}"
    );
    assert!(
        report.sources.iter().any(|s| s.name == "farm" && s.up),
        "{report:?}"
    );

    let mut gateway = gateway;
    gateway.kill9();
    let stopped = gateway.cli(&["status"]);
    assert!(String::from_utf8_lossy(&stopped.stderr).contains("cannot reach the gateway"));
    assert_eq!(stopped.status.code(), Some(1));
}
