//! The guarantees of DESIGN §1, each attacked through the real binary with real brokers:
//! NATS outages, SIGKILL mid-stream, the buffer bound under both policies, a corrupt buffer
//! file, hostile payloads, and publishes the server refuses for good.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use support::{assert_exactly_once, values_in_order};
use support::{probe_config as config, probe_reading as reading, probe_readings as readings};
use support::{publish_all, Gateway, Mosquitto, Nats};

async fn wait_forwarded(gateway: &Gateway, n: usize, within: Duration) {
    gateway.wait_until(&format!("{n} readings forwarded"), within, |g| {
        g.metric("sahool_gateway_readings_forwarded_total", "") >= n as f64
            && g.metric("sahool_gateway_buffer_readings", "") == 0.0
    });
}

/// A gateway that was forwarding, then NATS stopped and `n` readings published and buffered.
async fn backlog_during_an_outage(n: usize, publisher: &str) -> (Nats, Mosquitto, Gateway) {
    let mut nats = Nats::with_platform_stream().await;
    let broker = Mosquitto::start();
    let gateway = Gateway::start(&config(&nats, &broker, "", ""));
    gateway.wait_subscribed(1).await;
    gateway.wait_until("NATS connected", Duration::from_secs(10), |g| {
        g.metric("sahool_gateway_nats_connected", "") == 1.0
    });
    nats.stop();
    gateway.wait_until("NATS loss noticed", Duration::from_secs(10), |g| {
        g.metric("sahool_gateway_nats_connected", "") == 0.0
    });
    assert_eq!(publish_all(broker.port, publisher, readings(0..n)).await, n);
    gateway.wait_until("all buffered", Duration::from_secs(120), |g| {
        g.metric("sahool_gateway_buffer_readings", "") == n as f64
    });
    (nats, broker, gateway)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_down_while_10000_readings_arrive_then_all_delivered_once_in_order() {
    let n = 10_000;
    let (mut nats, _broker, gateway) = backlog_during_an_outage(n, "outage-publisher").await;
    let (status, body) = gateway.get("/readyz").expect("readyz");
    assert_eq!(status, 503, "not ready without NATS: {body}");
    let stats = gateway.cli(&["buffer", "stats", "--json"]);
    let stats: serde_json::Value = serde_json::from_slice(&stats.stdout).expect("stats JSON");
    assert_eq!(stats["readings"], n);

    nats.resume();
    wait_forwarded(&gateway, n, Duration::from_secs(120)).await;
    let events = nats.read_readings("SAHOOL_IOT").await;
    let values = values_in_order(&events);
    assert_exactly_once(&values, n);
    assert_eq!(
        values,
        (0..n).collect::<Vec<_>>(),
        "forwarded in arrival order"
    );
    assert_eq!(gateway.get("/readyz").map(|r| r.0), Some(200));
}

/// A link lost with a full window in flight: whatever the NATS client still queued for it must
/// never reach the server ahead of the earlier publishes the gateway resends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_killed_again_and_again_during_a_drain_keeps_seq_order() {
    let n = 40_000;
    let (mut nats, _broker, gateway) = backlog_during_an_outage(n, "drain-publisher").await;

    nats.resume();
    let mut kills = 0;
    for round in 0..10u64 {
        // Each kill waits until the drain is under way again, so it hits a full window.
        let forwarded = gateway.metric("sahool_gateway_readings_forwarded_total", "");
        gateway.wait_until("the drain moving", Duration::from_secs(60), |g| {
            g.metric("sahool_gateway_readings_forwarded_total", "") > forwarded + 500.0
                || g.metric("sahool_gateway_buffer_readings", "") < 3_000.0
        });
        if gateway.metric("sahool_gateway_buffer_readings", "") < 3_000.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20 * round)).await;
        nats.stop();
        kills += 1;
        nats.resume();
    }
    assert!(kills >= 3, "only {kills} kills landed during the drain");
    eprintln!("{kills} kills of nats-server during the drain");
    wait_forwarded(&gateway, n, Duration::from_secs(180)).await;
    let values = values_in_order(&nats.read_readings("SAHOOL_IOT").await);
    assert_exactly_once(&values, n);
    let late: Vec<_> = values.windows(2).filter(|w| w[1] < w[0]).take(5).collect();
    assert!(
        late.is_empty(),
        "stream out of seq order after {kills} kills, e.g. {late:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_loses_and_doubles_nothing() {
    let nats = Nats::with_platform_stream().await;
    let broker = Mosquitto::start();
    let mut gateway = Gateway::start(&config(&nats, &broker, "", ""));
    gateway.wait_subscribed(1).await;

    let n = 6_000;
    let port = broker.port;
    // Paced publishing, so the kills land while messages are arriving, committing and flowing.
    let publisher = tokio::spawn(async move {
        let mut acked = 0;
        for chunk in 0..(n / 500) {
            acked += publish_all(
                port,
                "kill-publisher",
                readings(chunk * 500..(chunk + 1) * 500),
            )
            .await;
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        acked
    });
    for round in 0..6 {
        tokio::time::sleep(Duration::from_millis(300 + 170 * round)).await;
        gateway.kill9();
        tokio::time::sleep(Duration::from_millis(100)).await;
        gateway.resume();
    }
    assert_eq!(
        publisher.await.expect("publisher"),
        n,
        "the broker acknowledged every publish"
    );
    // Redeliveries and re-sends happen after the last restart; then the stream must settle.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let events = loop {
        let events = nats.read_readings("SAHOOL_IOT").await;
        if events.len() >= n {
            // Anything doubled would arrive with the rest of the backlog: let it settle.
            gateway.wait_until("buffer drained", Duration::from_secs(30), |g| {
                g.metric("sahool_gateway_buffer_readings", "") == 0.0
            });
            tokio::time::sleep(Duration::from_millis(500)).await;
            break nats.read_readings("SAHOOL_IOT").await;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {n} in the stream\n{}",
            events.len(),
            gateway.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let values = values_in_order(&events);
    assert_exactly_once(&values, n);
}

/// A 32 KiB buffer with the `when_full` policy, NATS stopped, then `n` readings published
/// (all acknowledged by the broker): far more than the bound holds.
async fn outage_past_the_bound(when_full: &str, n: usize) -> (Nats, Mosquitto, Gateway) {
    let mut nats = Nats::with_platform_stream().await;
    let broker = Mosquitto::start();
    let buffer = format!("max_bytes = \"32KiB\"\nwhen_full = \"{when_full}\"");
    let gateway = Gateway::start(&config(&nats, &broker, &buffer, ""));
    gateway.wait_subscribed(1).await;
    nats.stop();
    assert_eq!(publish_all(broker.port, when_full, readings(0..n)).await, n);
    (nats, broker, gateway)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_oldest_drops_exactly_the_counted_oldest_readings() {
    let n = 1_000;
    let (mut nats, _broker, gateway) = outage_past_the_bound("drop_oldest", n).await;
    gateway.wait_until("all accepted", Duration::from_secs(30), |g| {
        g.metric("sahool_gateway_readings_accepted_total", "") == n as f64
    });
    let dropped = gateway.metric(
        "sahool_gateway_readings_dropped_total",
        "reason=\"buffer_full\"",
    ) as usize;
    let buffered = gateway.metric("sahool_gateway_buffer_readings", "") as usize;
    assert!(dropped > 0, "the bound was reached");
    assert_eq!(
        dropped + buffered,
        n,
        "every reading is either buffered or counted as dropped"
    );
    assert!(gateway.metric("sahool_gateway_buffer_bytes", "") <= 32.0 * 1024.0);

    nats.resume();
    wait_forwarded(&gateway, buffered, Duration::from_secs(60)).await;
    let values = values_in_order(&nats.read_readings("SAHOOL_IOT").await);
    assert_eq!(
        values,
        (dropped..n).collect::<Vec<_>>(),
        "exactly the {dropped} oldest are missing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_new_holds_readings_at_the_broker_and_loses_none() {
    let n = 1_000;
    let (mut nats, _broker, gateway) = outage_past_the_bound("reject_new", n).await;
    gateway.wait_until("intake paused at the bound", Duration::from_secs(30), |g| {
        g.metric("sahool_gateway_intake_paused", "") == 1.0
    });
    let buffered = gateway.metric("sahool_gateway_buffer_readings", "") as usize;
    assert!(
        buffered > 0 && buffered < n,
        "buffer holds {buffered}, the rest waits at the broker"
    );
    assert_eq!(
        gateway.metric("sahool_gateway_readings_dropped_total", ""),
        0.0
    );

    nats.resume();
    wait_forwarded(&gateway, n, Duration::from_secs(120)).await;
    let values = values_in_order(&nats.read_readings("SAHOOL_IOT").await);
    assert_exactly_once(&values, n);
    assert_eq!(gateway.metric("sahool_gateway_intake_paused", ""), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_buffer_file_is_moved_aside_and_the_gateway_runs() {
    let nats = Nats::with_platform_stream().await;
    let broker = Mosquitto::start();
    let mut gateway = Gateway::start(&config(&nats, &broker, "", ""));
    gateway.wait_subscribed(1).await;
    assert_eq!(publish_all(broker.port, "pre", readings(0..10)).await, 10);
    wait_forwarded(&gateway, 10, Duration::from_secs(30)).await;
    assert_eq!(gateway.terminate(), Some(0), "SIGTERM exits 0");

    let db = gateway.data_dir().join("buffer.db");
    let garbage: Vec<u8> = (0..20_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&db, garbage).expect("overwrite buffer");
    gateway.resume();
    gateway.wait_subscribed(1).await;
    assert_eq!(
        gateway.metric("sahool_gateway_store_corruption_recovered_total", ""),
        1.0
    );
    let aside: Vec<_> = std::fs::read_dir(gateway.data_dir())
        .expect("data dir")
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("buffer.db.corrupt-")
        })
        .collect();
    assert!(!aside.is_empty(), "the corrupt file is kept for inspection");
    assert!(
        gateway.log().contains("corrupt"),
        "the log says what happened"
    );

    assert_eq!(publish_all(broker.port, "post", readings(10..20)).await, 10);
    wait_forwarded(&gateway, 10, Duration::from_secs(30)).await;
    let values = values_in_order(&nats.read_readings("SAHOOL_IOT").await);
    assert_exactly_once(&values, 20);

    // Truncated mid-page while stopped: the same recovery.
    assert_eq!(gateway.terminate(), Some(0));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&db)
        .expect("open buffer");
    f.set_len(1000).expect("truncate");
    drop(f);
    gateway.resume();
    gateway.wait_subscribed(1).await;
    assert_eq!(
        gateway.metric("sahool_gateway_store_corruption_recovered_total", ""),
        1.0
    );
}

/// Every page after the first (header and schema) overwritten with garbage.
fn damage_pages(db: &std::path::Path) {
    use std::io::{Seek, SeekFrom, Write};
    let len = std::fs::metadata(db).expect("buffer file").len();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(db)
        .expect("open buffer");
    f.seek(SeekFrom::Start(4096)).expect("seek");
    f.write_all(&vec![0xA5; len.saturating_sub(4096) as usize])
        .expect("damage buffer");
    f.sync_all().expect("sync");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_buffer_file_while_running_stops_in_order_with_75_and_loses_nothing_unstored() {
    let nats = Nats::with_platform_stream().await;
    let broker = Mosquitto::start();
    let mut gateway = Gateway::start(&config(&nats, &broker, "", ""));
    gateway.wait_subscribed(1).await;
    assert_eq!(publish_all(broker.port, "pre", readings(0..10)).await, 10);
    wait_forwarded(&gateway, 10, Duration::from_secs(30)).await;

    let db = gateway.data_dir().join("buffer.db");
    // Another connection's commit and checkpoint leave the writer's page cache stale, so its
    // next transaction reads the damaged pages from the file.
    rusqlite::Connection::open(&db)
        .and_then(|c| {
            c.execute_batch(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('poke', 1);
                 PRAGMA wal_checkpoint(TRUNCATE);",
            )
        })
        .expect("poke the buffer");
    let mut n = 10;
    for _ in 0..10 {
        damage_pages(&db);
        assert_eq!(
            publish_all(broker.port, "during", readings(n..n + 1)).await,
            1
        );
        n += 1;
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while gateway.is_running() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if !gateway.is_running() {
            break;
        }
        // The once-a-second maintenance may have cached good pages again: once more.
        let _ = rusqlite::Connection::open(&db)
            .and_then(|c| c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);"));
    }
    assert_eq!(
        gateway.wait_exit(Duration::from_secs(20)),
        Some(75),
        "EX_TEMPFAIL, for systemd to restart it:\n{}",
        gateway.log()
    );
    let log = gateway.log();
    let corrupt = log
        .find("buffer file became corrupt while running")
        .unwrap_or_else(|| panic!("the cause is logged:\n{log}"));
    let after = &log[corrupt..];
    let intake_stopped = after.find("MQTT source stopping");
    let stopped = after.find("sahool_gateway::app: stopped");
    assert!(
        intake_stopped.is_some() && intake_stopped < stopped,
        "the ordered shutdown ran, intake first, to its end:\n{log}"
    );

    // The next start moves the file aside; what was offered meanwhile was never acknowledged
    // to the broker, so it comes again and is forwarded.
    gateway.resume();
    gateway.wait_subscribed(1).await;
    assert_eq!(
        gateway.metric("sahool_gateway_store_corruption_recovered_total", ""),
        1.0
    );
    gateway.wait_until(
        "redelivered readings forwarded",
        Duration::from_secs(30),
        |g| g.metric("sahool_gateway_readings_forwarded_total", "") >= (n - 10) as f64,
    );
    let values = values_in_order(&nats.read_readings("SAHOOL_IOT").await);
    assert_exactly_once(&values, n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_payloads_are_dead_lettered_and_the_pipeline_keeps_flowing() {
    let nats = Nats::with_platform_stream().await;
    let broker = Mosquitto::start();
    let cfg = config(&nats, &broker, "", "").replace(
        "sensor_type = \"water_level\"",
        "sensor_type = \"water_level\"\n  range = [0.0, 100000.0]",
    )
        + "\n  [[fields.sensors]]\n  device_id = \"probe-1\"\n  sensor_type = \"soil_moisture\"\n";
    let cfg = cfg.replace(
        "format = \"sahool\"",
        "format = \"sahool\"\nmax_payload = \"4KiB\"",
    );
    let gateway = Gateway::start(&cfg);
    gateway.wait_subscribed(1).await;

    let t = "sahool/sensors/probe-1/field-1/water_level".to_string();
    let mut messages = vec![reading(0)];
    let hostile: Vec<(&str, Vec<u8>)> = vec![
        ("malformed", b"\xff\xfe garbage {{{".to_vec()),
        (
            "malformed",
            b"{\"device_id\": \"probe-1\", \"value\": ".to_vec(),
        ),
        (
            "oversized",
            format!(
                r#"{{"device_id":"probe-1","type":"water_level","value":1,"pad":"{}"}}"#,
                "x".repeat(8000)
            )
            .into_bytes(),
        ),
        (
            "out_of_range",
            br#"{"device_id":"probe-1","type":"vwc","value":250}"#.to_vec(),
        ),
        (
            "out_of_range",
            br#"{"device_id":"probe-1","type":"water_level","value":-5}"#.to_vec(),
        ),
        (
            "not_finite",
            br#"{"device_id":"probe-1","type":"water_level","value":"inf"}"#.to_vec(),
        ),
        (
            "unknown_device",
            br#"{"device_id":"ghost-9","type":"water_level","value":1}"#.to_vec(),
        ),
        (
            "unknown_sensor_type",
            br#"{"device_id":"probe-1","type":"nitrogen","value":1}"#.to_vec(),
        ),
    ];
    for (_, payload) in &hostile {
        messages.push((t.clone(), payload.clone()));
    }
    messages.push(reading(1));
    assert_eq!(
        publish_all(broker.port, "hostile", messages).await,
        hostile.len() + 2
    );
    wait_forwarded(&gateway, 2, Duration::from_secs(30)).await;
    gateway.wait_until("rejections counted", Duration::from_secs(10), |g| {
        g.metric("sahool_gateway_readings_rejected_total", "") == hostile.len() as f64
    });
    let mut by_reason: BTreeMap<&str, f64> = BTreeMap::new();
    for (reason, _) in &hostile {
        *by_reason.entry(reason).or_default() += 1.0;
    }
    for (reason, count) in &by_reason {
        assert_eq!(
            gateway.metric(
                "sahool_gateway_readings_rejected_total",
                &format!("reason=\"{reason}\"")
            ),
            *count,
            "{reason}"
        );
    }
    let listed = gateway.cli(&["dead-letters", "list", "--limit", "100"]);
    assert!(listed.status.success());
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(rows.len(), hostile.len());
    assert!(
        rows.iter().any(|r| r["reason"] == "malformed"
            && r["raw"].as_str().is_some_and(|raw| raw.starts_with("fffe"))),
        "raw bytes kept (hex when not UTF-8): {rows:#?}"
    );
    let values = values_in_order(&nats.read_readings("SAHOOL_IOT").await);
    assert_eq!(values, vec![0, 1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_the_server_refuses_for_good_are_dead_lettered_and_later_readings_flow() {
    let nats = Nats::start();
    // The platform's stream captures tenant-a only; field-b's tenant has none.
    nats.create_stream("SAHOOL_IOT", &["sahool.tenant.tenant-a.>"])
        .await;
    let broker = Mosquitto::start();
    let cfg = config(
        &nats,
        &broker,
        "",
        "subject = \"sahool.tenant.{tenant_id}.iot.sensor.reading\"\nstatus_subject = \"sahool.tenant.{tenant_id}.iot.sensor.{status}\"",
    ) + r#"
[[fields]]
id = "field-b"
tenant_id = "tenant-b"
  [[fields.sensors]]
  device_id = "probe-b"
  sensor_type = "water_level"
"#;
    let gateway = Gateway::start(&cfg);
    gateway.wait_subscribed(1).await;
    let other = |i: usize| {
        let (_, p) = reading(i);
        let p = String::from_utf8(p)
            .unwrap()
            .replace("probe-1", "probe-b")
            .replace("field-1", "field-b");
        (
            "sahool/sensors/probe-b/field-b/water_level".to_string(),
            p.into_bytes(),
        )
    };
    let messages = vec![reading(0), other(100), reading(1), other(101), reading(2)];
    assert_eq!(publish_all(broker.port, "refused", messages).await, 5);
    // Refused: probe-b's two readings and its `connected` event, all for tenant-b.
    gateway.wait_until(
        "refusals dead-lettered and the rest forwarded",
        Duration::from_secs(60),
        |g| {
            g.metric(
                "sahool_gateway_readings_rejected_total",
                "reason=\"publish_refused\"",
            ) == 3.0
                && g.metric("sahool_gateway_readings_forwarded_total", "") == 3.0
        },
    );
    assert_eq!(gateway.metric("sahool_gateway_buffer_readings", ""), 0.0);
    let values = values_in_order(&nats.read_readings("SAHOOL_IOT").await);
    assert_eq!(values, vec![0, 1, 2]);
    let listed = gateway.cli(&["dead-letters", "list"]);
    let text = String::from_utf8_lossy(&listed.stdout);
    let refused: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("publish_refused"))
        .collect();
    assert_eq!(refused.len(), 3, "{text}");
    assert_eq!(
        refused
            .iter()
            .filter(|l| l.contains("sensor_reading"))
            .count(),
        2,
        "{text}"
    );
    assert!(
        text.contains("tenant-b"),
        "the refused event is kept: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_nats_is_a_half_open_link_and_nothing_is_marked_delivered() {
    let mut nats = Nats::with_platform_stream().await;
    let broker = Mosquitto::start();
    let gateway = Gateway::start(&config(&nats, &broker, "", ""));
    gateway.wait_subscribed(1).await;
    gateway.wait_until("NATS connected", Duration::from_secs(10), |g| {
        g.metric("sahool_gateway_nats_connected", "") == 1.0
    });
    assert_eq!(
        publish_all(broker.port, "before", readings(0..500)).await,
        500
    );
    wait_forwarded(&gateway, 500, Duration::from_secs(30)).await;

    // SIGSTOP: the TCP connection stays up but nothing answers.
    nats.freeze();
    assert_eq!(
        publish_all(broker.port, "during", readings(500..2500)).await,
        2000
    );
    gateway.wait_until("all accepted", Duration::from_secs(30), |g| {
        g.metric("sahool_gateway_readings_accepted_total", "") == 2500.0
    });
    tokio::time::sleep(Duration::from_secs(6)).await;
    let forwarded = gateway.metric("sahool_gateway_readings_forwarded_total", "");
    assert_eq!(
        forwarded, 500.0,
        "nothing counts as delivered while the server is frozen"
    );
    assert_eq!(gateway.metric("sahool_gateway_buffer_readings", ""), 2000.0);

    nats.thaw();
    wait_forwarded(&gateway, 2500, Duration::from_secs(90)).await;
    let values = values_in_order(&nats.read_readings("SAHOOL_IOT").await);
    assert_exactly_once(&values, 2500);
}
