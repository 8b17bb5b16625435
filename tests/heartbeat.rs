//! The heartbeat through the real binary and a real nats-server (issue 17 item 1): every
//! `[fleet] status_interval` on `sahool.iot.gateway.status`, valid against its contract, and
//! the heartbeats of a NATS outage delivered after it, each once, in order.

mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use support::{contract_validator, Gateway, Nats, StreamMessage};

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
