//! The heartbeat through the real binary and a real nats-server (issue 17 item 1): every
//! `[fleet] status_interval` on `sahool.iot.gateway.status`, valid against its contract, and
//! the heartbeats of a NATS outage delivered after it, each once, in order; with the shipped
//! defaults too (a minute apart, the first soon after start).

mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use support::{contract_validator, shipped_farm_config, Gateway, Mosquitto, Nats, StreamMessage};

/// The heartbeats in the platform's stream, in stream order.
async fn heartbeats(nats: &Nats) -> Vec<StreamMessage> {
    let mut events = nats.read_stream("SAHOOL_IOT").await;
    events.retain(|e| e.body["event_type"] == "gateway_status");
    events
}

/// Waits until the stream holds at least `n` heartbeats; returns them.
async fn wait_heartbeats(nats: &Nats, n: usize, within: Duration) -> Vec<StreamMessage> {
    let deadline = Instant::now() + within;
    loop {
        let got = heartbeats(nats).await;
        if got.len() >= n {
            return got;
        }
        assert!(Instant::now() < deadline, "{} of {n} heartbeats", got.len());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn buffered_heartbeats(gateway: &Gateway) -> u64 {
    let out = gateway.cli(&["buffer", "stats", "--json"]);
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stats JSON");
    stats["heartbeats"].as_u64().expect("heartbeats in stats")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_arrive_valid_and_an_outages_arrive_after_it_once_in_order() {
    let mut nats = Nats::with_platform_stream().await;
    let config = format!(
        "[nats]\nservers = [\"{}\"]\n\n[fleet]\nstatus_interval = \"5s\"\n",
        nats.url()
    );
    let gateway = Gateway::start(&config);
    let live = wait_heartbeats(&nats, 2, Duration::from_secs(30)).await;
    let validator = contract_validator("gateway_status.v1.json");
    for h in &live {
        assert!(validator.is_valid(&h.body), "{}", h.body);
        assert_eq!(h.subject, "sahool.iot.gateway.status");
        assert_eq!(h.header("Nats-Msg-Id"), h.body["event_id"].as_str());
        assert_eq!(h.body["payload"]["gateway_id"], "gw-test");
    }
    assert_eq!(live[0].body["payload"]["nats"]["connected"], true);

    let before = heartbeats(&nats).await.len();
    nats.stop();
    gateway.wait_until("NATS loss noticed", Duration::from_secs(10), |g| {
        g.metric("sahool_gateway_nats_connected", "") == 0.0
    });
    tokio::time::sleep(Duration::from_secs(20)).await;
    let during = buffered_heartbeats(&gateway);
    assert!(
        during >= 3,
        "{during} heartbeats buffered during the outage"
    );
    assert_eq!(
        gateway.metric("sahool_gateway_buffer_readings", ""),
        0.0,
        "heartbeats are not readings"
    );

    nats.resume();
    let all = wait_heartbeats(&nats, before + during as usize, Duration::from_secs(60)).await;
    let ids: HashSet<&str> = all
        .iter()
        .filter_map(|h| h.body["event_id"].as_str())
        .collect();
    assert_eq!(ids.len(), all.len(), "each once");
    let seqs: Vec<u64> = all
        .iter()
        .filter_map(|h| h.body["source"]["seq"].as_u64())
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order: {seqs:?}");
    let offline = all
        .iter()
        .filter(|h| h.body["payload"]["nats"]["connected"] == false);
    assert!(
        offline.count() as u64 >= during,
        "the outage's heartbeats say so"
    );
    for h in &all {
        assert!(validator.is_valid(&h.body), "{}", h.body);
    }
    gateway.wait_until("heartbeats drained", Duration::from_secs(30), |g| {
        buffered_heartbeats(g) <= 1
    });
}

/// The shipped defaults (no `[fleet]` section: a heartbeat a minute): the first comes soon
/// after start, valid, and the one taken while NATS is down arrives after it comes back,
/// complete (the outage's own state, not a summary). About 90 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_shipped_defaults_the_first_comes_soon_and_an_outages_arrives_after_it() {
    let mut nats = Nats::with_platform_stream().await;
    let broker = Mosquitto::start();
    let config = shipped_farm_config(&nats, &broker, "soil_moisture", &["probe-1"]);
    assert!(!config.contains("[fleet]"), "{config}");
    let started = Instant::now();
    let gateway = Gateway::start(&config);
    let validator = contract_validator("gateway_status.v1.json");
    let first = wait_heartbeats(&nats, 1, Duration::from_secs(25)).await;
    let first_after = started.elapsed();
    assert!(validator.is_valid(&first[0].body), "{}", first[0].body);
    assert_eq!(first[0].body["payload"]["nats"]["connected"], true);
    assert_eq!(
        first[0].body["payload"]["sources"][0]["up"], true,
        "{}",
        first[0].body
    );

    // The next one is due a minute after the first: NATS is down then.
    nats.stop();
    // Due 70 s after start (10 s, then a minute); the first's row is long forwarded by then.
    gateway.wait_until(
        "a heartbeat buffered offline",
        Duration::from_secs(80),
        |g| started.elapsed() > Duration::from_secs(71) && buffered_heartbeats(g) >= 1,
    );
    let offline_after = started.elapsed();
    nats.resume();
    let all = wait_heartbeats(&nats, 2, Duration::from_secs(45)).await;
    let late = &all[1].body;
    assert!(validator.is_valid(late), "{late}");
    assert_eq!(late["payload"]["nats"]["connected"], false, "{late}");
    assert!(late["payload"]["nats"]["problem"].is_string(), "{late}");
    assert!(late["payload"]["uptime_s"].as_u64() > first[0].body["payload"]["uptime_s"].as_u64());
    eprintln!(
        "first heartbeat after {first_after:?}, offline one buffered after {offline_after:?}, delivered after {:?}",
        started.elapsed()
    );
}
