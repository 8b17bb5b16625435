//! The systemd notify protocol spoken by the real binary to a socket this test owns: READY once
//! the store and sources are up, STATUS lines, WATCHDOG pings while the pipeline makes progress,
//! none while it is wedged, RELOADING and READY around a SIGHUP, STOPPING on SIGTERM.

mod support;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use support::{probe_config, Gateway, Mosquitto, Nats};

/// Collects datagrams for `within`.
fn collect(sock: &UnixDatagram, within: Duration) -> Vec<String> {
    let deadline = Instant::now() + within;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        sock.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .expect("timeout");
        match sock.recv(&mut buf) {
            Ok(n) => out.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(_) => break,
        }
    }
    out
}

fn pings(messages: &[String]) -> usize {
    messages
        .iter()
        .filter(|m| m.as_str() == "WATCHDOG=1")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_status_watchdog_and_stopping() {
    let nats = Nats::with_platform_stream().await;
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).expect("bind notify socket");
    let socket_path = path.display().to_string();
    // WatchdogSec=1.5s: the gateway checks its pipeline every 0.5 s.
    let mut gateway = Gateway::start_with_env(
        &probe_config(&nats, &broker, "", ""),
        &[
            ("NOTIFY_SOCKET", &socket_path),
            ("WATCHDOG_USEC", "1500000"),
        ],
    );

    let healthy = collect(&sock, Duration::from_secs(3));
    assert_eq!(
        healthy.first().map(String::as_str),
        Some("READY=1"),
        "{healthy:?}"
    );
    assert!(pings(&healthy) >= 3, "pings while healthy: {healthy:?}");
    assert!(
        healthy
            .iter()
            .any(|m| m.starts_with("STATUS=backlog 0 readings")),
        "{healthy:?}"
    );

    // Wedge the store: another connection holds the write lock, so the writer thread blocks in
    // its commit (busy timeout) and cannot answer the progress check.
    let db = rusqlite::Connection::open(gateway.data_dir().join("buffer.db")).expect("open buffer");
    db.execute_batch("BEGIN EXCLUSIVE")
        .expect("lock the buffer");
    let _ = collect(&sock, Duration::from_millis(1500)); // a check may have passed just before
    let wedged = collect(&sock, Duration::from_secs(3));
    assert_eq!(pings(&wedged), 0, "no pings while wedged: {wedged:?}");
    db.execute_batch("COMMIT").expect("unlock");
    drop(db);

    let recovered = collect(&sock, Duration::from_secs(8));
    assert!(pings(&recovered) >= 2, "pings resume: {recovered:?}");

    // A reload, good or refused, is RELOADING then READY again.
    let config = std::fs::read_to_string(&gateway.config_path).expect("read config");
    for (what, text) in [
        ("a good config", config.as_str()),
        ("a broken one", "not toml"),
    ] {
        gateway.write_raw_config(text);
        gateway.signal("HUP");
        let states: Vec<String> = collect(&sock, Duration::from_secs(2))
            .into_iter()
            .filter(|m| m == "RELOADING=1" || m == "READY=1")
            .collect();
        assert_eq!(states, ["RELOADING=1", "READY=1"], "reloading {what}");
    }

    assert_eq!(gateway.terminate(), Some(0));
    let rest = collect(&sock, Duration::from_millis(200));
    assert!(rest.iter().any(|m| m == "STOPPING=1"), "{rest:?}");
}
