//! Remote config from NATS KV through the real binary and a real nats-server (issue 17 item 2,
//! DESIGN §9): a revision applied and kept, one that does not validate rejected, one that
//! breaks a source rolled back after its probation, a SIGKILL and a SIGHUP during probation,
//! KV missing at start, and revisions replayed or older than the last one acted on ignored. Each outcome is
//! checked as a `sahool.iot.gateway.config` event against its contract.

mod support;

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use serde_json::Value;
use support::{
    contract_validator, free_port, gateway_user_auth, probe_config, probe_readings, publish_all,
    Gateway, Mosquitto, Nats, StreamMessage,
};

const BUCKET: &str = "sahool_gateway_config_tenant-a";

/// probe-2 mapped, through a second source on its own topic.
fn probe_2_and_second_source(broker: &Mosquitto) -> String {
    format!(
        r#"
[[mqtt]]
name = "second"
url = "{}"
topics = ["sahool/other/#"]
format = "sahool"

[[fields]]
id = "field-2"
  [[fields.sensors]]
  device_id = "probe-2"
  sensor_type = "water_level"
"#,
        broker.url()
    )
}

fn probe_2_reading(value: usize) -> (String, Vec<u8>) {
    (
        "sahool/other/probe-2/field-2/water_level".into(),
        format!(r#"{{"device_id":"probe-2","type":"water_level","value":{value}}}"#).into_bytes(),
    )
}

/// The local config: the probe config with remote config on.
fn local_config(nats: &Nats, broker: &Mosquitto, probation: &str) -> String {
    local_config_as(nats, broker, probation, "")
}

/// [`local_config`] with `nats_auth` in its `[nats]` section (the gateway's user).
fn local_config_as(nats: &Nats, broker: &Mosquitto, probation: &str, nats_auth: &str) -> String {
    format!(
        "{}\n[fleet]\nconfig_bucket = \"sahool_gateway_config_{{tenant_id}}\"\nprobation = \"{probation}\"\n",
        probe_config(nats, broker, "", nats_auth)
    )
}

/// The tenant's bucket.
async fn bucket(nats: &Nats) -> kv::Store {
    support::create_bucket(nats.client().await, BUCKET).await
}

/// nats-server with the platform's stream and the tenant's bucket, a broker, and the gateway
/// on its local config with remote config on, its source subscribed.
async fn start(probation: &str) -> (Nats, Mosquitto, kv::Store, Gateway) {
    let nats = Nats::with_platform_stream().await;
    let broker = Mosquitto::start();
    let kv = bucket(&nats).await;
    let gateway = Gateway::start(&local_config(&nats, &broker, probation));
    gateway.wait_subscribed(1).await;
    (nats, broker, kv, gateway)
}

/// Puts `text` under the gateway's key; returns its revision.
async fn put(kv: &kv::Store, text: String) -> u64 {
    kv.put("gw-test", text.into()).await.expect("put")
}

/// Puts a revision adding probe-2 and a second source, and waits until it is on probation;
/// returns its revision.
async fn put_on_probation(kv: &kv::Store, gateway: &Gateway, broker: &Mosquitto) -> u64 {
    let revision = put(kv, remote_text(gateway, &probe_2_and_second_source(broker))).await;
    gateway.wait_until("on probation", Duration::from_secs(20), |g| {
        g.log().contains("on probation")
    });
    revision
}

/// The gateway's running config file as the harness wrote it, plus `extra`.
fn remote_text(gateway: &Gateway, extra: &str) -> String {
    let local = std::fs::read_to_string(&gateway.config_path).expect("config");
    format!("{local}\n{extra}")
}

async fn config_events(nats: &Nats) -> Vec<StreamMessage> {
    let mut events = nats.read_stream("SAHOOL_IOT").await;
    events.retain(|e| e.body["event_type"] == "gateway_config");
    events
}

/// Waits for the config event of `revision`; checks it against the contract and returns its
/// payload.
async fn wait_outcome(nats: &Nats, revision: u64, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    let validator = contract_validator("gateway_config.v1.json");
    loop {
        let events = config_events(nats).await;
        if let Some(e) = events
            .iter()
            .find(|e| e.body["payload"]["revision"] == revision)
        {
            assert!(validator.is_valid(&e.body), "{}", e.body);
            assert_eq!(e.subject, "sahool.iot.gateway.config");
            assert_eq!(e.header("Nats-Msg-Id"), e.body["event_id"].as_str());
            assert_eq!(e.body["payload"]["gateway_id"], "gw-test");
            return e.body["payload"].clone();
        }
        assert!(
            Instant::now() < deadline,
            "no config event for revision {revision}: {:?}",
            events
                .iter()
                .map(|e| &e.body["payload"])
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// `status --json`'s config part.
fn status_config(gateway: &Gateway) -> Value {
    let out = gateway.cli(&["status", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let report: Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    report["config"].clone()
}

/// Waits until the stream holds a reading of `device` with `value`.
async fn wait_reading(nats: &Nats, device: &str, value: f64, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let readings = nats.read_readings("SAHOOL_IOT").await;
        if readings.iter().any(|e| {
            e.body["payload"]["device_id"] == device && e.body["payload"]["value"] == value
        }) {
            return;
        }
        assert!(Instant::now() < deadline, "no {device} reading {value}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Asserts an outcome's status and failed check.
fn assert_outcome(outcome: &Value, status: &str, check: &str) {
    assert_eq!(
        (outcome["status"].as_str(), outcome["check"].as_str()),
        (Some(status), Some(check)),
        "{outcome}"
    );
}

/// The local source carries probe-1's readings through: `n` more reach JetStream.
async fn assert_probe_1_forwards(gateway: &Gateway, broker: &Mosquitto, n: usize) {
    gateway.wait_subscribed(1).await;
    let before = gateway.metric("sahool_gateway_readings_forwarded_total", "");
    assert_eq!(
        publish_all(broker.port, "p1", probe_readings(0..n)).await,
        n
    );
    gateway.wait_until("forwarded", Duration::from_secs(20), |g| {
        g.metric("sahool_gateway_readings_forwarded_total", "") >= before + n as f64
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revision_is_applied_kept_across_restarts_without_kv_and_older_ones_are_ignored() {
    let mut nats = Nats::with_platform_stream().await;
    let broker = Mosquitto::start();
    let kv = bucket(&nats).await;
    // Other gateways' keys first, so this gateway's revision is above 1.
    kv.put("gw-other", "x".into()).await.unwrap();
    kv.put("gw-other", "y".into()).await.unwrap();
    let mut gateway = Gateway::start(&local_config(&nats, &broker, "2s"));
    gateway.wait_subscribed(1).await;
    assert_eq!(status_config(&gateway)["source"], "local");

    let revision = put(
        &kv,
        remote_text(&gateway, &probe_2_and_second_source(&broker)),
    )
    .await;
    assert!(revision > 1);
    let outcome = wait_outcome(&nats, revision, Duration::from_secs(30)).await;
    assert_eq!(outcome["status"], "applied", "{outcome}");
    assert!(outcome.get("check").is_none(), "{outcome}");
    let status = status_config(&gateway);
    assert_eq!(
        (&status["source"], &status["revision"]),
        (&"remote".into(), &revision.into()),
        "{status}"
    );
    // The new source and mapping are in effect.
    gateway.wait_subscribed(2).await;
    assert_eq!(
        publish_all(broker.port, "p2", vec![probe_2_reading(7)]).await,
        1
    );
    wait_reading(&nats, "probe-2", 7.0, Duration::from_secs(20)).await;

    // Restarted with NATS down: it starts at once, on the last known good revision.
    assert_eq!(gateway.terminate(), Some(0));
    nats.stop();
    gateway.resume();
    gateway.wait_subscribed(2).await;
    let status = status_config(&gateway);
    assert_eq!(
        (&status["source"], &status["revision"]),
        (&"remote".into(), &revision.into())
    );
    gateway.wait_until("NATS unreachable logged", Duration::from_secs(10), |g| {
        g.log().contains("KV not reachable")
    });
    assert_eq!(gateway.terminate(), Some(0));
    nats.resume();

    // Restarted with the bucket gone (KV unreachable): it starts from the last known good
    // revision at once, and says KV is not reachable.
    let js = jetstream::new(nats.client().await);
    js.delete_key_value(BUCKET).await.expect("delete bucket");
    gateway.resume();
    gateway.wait_subscribed(2).await;
    assert_eq!(status_config(&gateway)["revision"], revision);
    gateway.wait_until("KV unreachable logged", Duration::from_secs(10), |g| {
        g.log().contains("KV not reachable")
    });
    assert_eq!(
        publish_all(broker.port, "p2", vec![probe_2_reading(8)]).await,
        1
    );
    wait_reading(&nats, "probe-2", 8.0, Duration::from_secs(20)).await;

    // The bucket again, from revision 1: older than the one applied, so ignored.
    let kv = bucket(&nats).await;
    let older = put(&kv, remote_text(&gateway, "")).await;
    assert!(older < revision);
    gateway.wait_until("older revision ignored", Duration::from_secs(30), |g| {
        g.log().contains("not newer than the last one acted on")
    });
    assert_eq!(status_config(&gateway)["revision"], revision);
    assert_eq!(config_events(&nats).await.len(), 1);
    assert_eq!(gateway.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_revisions_are_rejected_and_one_breaking_a_source_rolls_back() {
    let (nats, broker, kv, mut gateway) = start("3s").await;

    // Not valid: refused, the running config untouched.
    let bad = put(&kv, remote_text(&gateway, "[[mqtt]]\nname = \"farm\"\n")).await;
    let outcome = wait_outcome(&nats, bad, Duration::from_secs(20)).await;
    assert_outcome(&outcome, "rejected", "validate");
    assert!(
        outcome["reason"].as_str().unwrap().contains("line"),
        "{outcome}"
    );

    // [buffer] needs a restart: refused remotely.
    let text =
        remote_text(&gateway, "").replace("min_free_disk = \"1MiB\"", "min_free_disk = \"2MiB\"");
    let restart = put(&kv, text).await;
    let outcome = wait_outcome(&nats, restart, Duration::from_secs(20)).await;
    assert_eq!(outcome["check"], "restart_required", "{outcome}");
    assert!(
        outcome["reason"].as_str().unwrap().contains("[buffer]"),
        "{outcome}"
    );
    assert_eq!(status_config(&gateway)["source"], "local");

    // Valid, but its broker port is wrong: applied, then rolled back after the probation.
    let wrong = broker
        .url()
        .replace(&broker.port.to_string(), &free_port().to_string());
    let text = remote_text(&gateway, "").replace(&broker.url(), &wrong);
    let broken = put(&kv, text).await;
    let outcome = wait_outcome(&nats, broken, Duration::from_secs(30)).await;
    assert_outcome(&outcome, "rolled_back", "source farm");
    assert_eq!(status_config(&gateway)["source"], "local");
    // The old source works again.
    assert_probe_1_forwards(&gateway, &broker, 3).await;
    assert!(gateway.is_running());
    assert_eq!(config_events(&nats).await.len(), 3);

    // After a restart the watch delivers the newest revision again: acted on, so ignored.
    assert_eq!(gateway.terminate(), Some(0));
    gateway.resume();
    gateway.wait_until("replayed revision ignored", Duration::from_secs(20), |g| {
        g.log().contains(&format!("ignored revision={broken}"))
    });
    assert_eq!(status_config(&gateway)["source"], "local");
    assert_eq!(config_events(&nats).await.len(), 3);
    assert!(
        !gateway.log().contains("cannot write its files"),
        "{}",
        gateway.log()
    );
    assert_eq!(gateway.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_or_sighup_during_probation_returns_to_the_last_good_config_and_reports_it() {
    let (nats, broker, kv, mut gateway) = start("60s").await;

    let revision = put_on_probation(&kv, &gateway, &broker).await;
    gateway.kill9();
    gateway.resume();
    let outcome = wait_outcome(&nats, revision, Duration::from_secs(30)).await;
    assert_outcome(&outcome, "rolled_back", "restart");
    // Usable: the local config runs, its source forwards; the same revision, delivered again
    // by the watch, is not tried again.
    assert_eq!(status_config(&gateway)["source"], "local");
    assert_probe_1_forwards(&gateway, &broker, 2).await;
    gateway.wait_until("replayed revision ignored", Duration::from_secs(20), |g| {
        g.log().contains("not newer than the last one acted on")
    });
    assert_eq!(config_events(&nats).await.len(), 1);

    // A local reload during the next probation: the local file (no revision kept) is applied
    // and the revision ends rolled back.
    let next = put(
        &kv,
        remote_text(&gateway, &probe_2_and_second_source(&broker)),
    )
    .await;
    gateway.wait_until("on probation again", Duration::from_secs(20), |g| {
        g.log().matches("on probation").count() == 2
    });
    gateway.signal("HUP");
    let outcome = wait_outcome(&nats, next, Duration::from_secs(20)).await;
    assert_outcome(&outcome, "rolled_back", "sighup");
    assert_eq!(status_config(&gateway)["source"], "local");
    assert_eq!(gateway.terminate(), Some(0));
}

/// A gateway whose NATS user has exactly `config/nats-server.gateway-user.template`'s
/// permissions, filled in for it, watches and applies its own key; the same user can read
/// another gateway's key neither by a watch (named or not) nor by a direct get.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_user_with_the_shipped_permissions_applies_its_key_and_reads_no_other() {
    let nats = Nats::with_shipped_permissions_for_gw_test(BUCKET).await;
    let kv = bucket(&nats).await;
    kv.put("gw-other", "secret = true".into()).await.unwrap();
    let broker = Mosquitto::start();
    let secrets = tempfile::tempdir().expect("tempdir");
    let auth = gateway_user_auth(secrets.path());
    let mut gateway = Gateway::start(&local_config_as(&nats, &broker, "2s", &auth));
    gateway.wait_subscribed(1).await;

    let revision = put(
        &kv,
        remote_text(&gateway, &probe_2_and_second_source(&broker)),
    )
    .await;
    let outcome = wait_outcome(&nats, revision, Duration::from_secs(30)).await;
    assert_eq!(outcome["status"], "applied", "{outcome}");
    assert_eq!(status_config(&gateway)["revision"], revision);
    assert!(
        !gateway.log().contains("KV not reachable"),
        "{}",
        gateway.log()
    );

    // The same user, as another gateway or a curious process would use it.
    let user = nats.gateway_user_client().await;
    let js = jetstream::new(user.clone());
    let within = Duration::from_secs(5);
    let own = js.get_key_value(BUCKET).await.expect("the bucket opens");
    let latest = tokio::time::timeout(within, own.entry("gw-test")).await;
    assert!(
        matches!(&latest, Ok(Ok(Some(e))) if e.revision == revision),
        "its own key by direct get: {latest:?}"
    );
    let other = tokio::time::timeout(within, own.entry("gw-other")).await;
    assert!(
        !matches!(other, Ok(Ok(Some(_)))),
        "another gateway's key was read: {other:?}"
    );
    let nameless = tokio::time::timeout(within, own.watch_with_history("gw-other")).await;
    assert!(
        !matches!(nameless, Ok(Ok(_))),
        "a watch of another gateway's key was created"
    );
    let stream = js.get_stream(format!("KV_{BUCKET}")).await.expect("stream");
    let named = tokio::time::timeout(
        within,
        stream.create_consumer(jetstream::consumer::push::OrderedConfig {
            name: Some("cfg-other".into()),
            deliver_subject: user.new_inbox(),
            filter_subject: format!("$KV.{BUCKET}.gw-other"),
            ..Default::default()
        }),
    )
    .await;
    assert!(
        !matches!(named, Ok(Ok(_))),
        "a named watch of another gateway's key was created"
    );
    assert_eq!(gateway.terminate(), Some(0));
}

/// The probation watches its whole period: a broker that goes away for a few seconds in the
/// middle of it (past the 10 s grace) and comes back before its end still fails the revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_failing_and_recovering_within_the_probation_rolls_it_back() {
    let (nats, mut broker, kv, mut gateway) = start("30s").await;
    let revision = put_on_probation(&kv, &gateway, &broker).await;
    gateway.wait_subscribed(2).await;
    tokio::time::sleep(Duration::from_secs(12)).await;
    broker.stop();
    tokio::time::sleep(Duration::from_secs(4)).await;
    broker.resume();
    let outcome = wait_outcome(&nats, revision, Duration::from_secs(30)).await;
    assert_eq!(outcome["status"], "rolled_back", "{outcome}");
    assert!(
        outcome["check"]
            .as_str()
            .is_some_and(|c| c.starts_with("source ")),
        "{outcome}"
    );
    assert_eq!(status_config(&gateway)["source"], "local");
    assert_probe_1_forwards(&gateway, &broker, 2).await;
    assert_eq!(gateway.terminate(), Some(0));
}
