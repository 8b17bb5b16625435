//! The MQTT publisher: a separate process (this program started as `bench publish ...`), so
//! its work is not counted against the system under test and it cannot borrow its runtime.
//! It publishes 300-byte SAHOOL payloads at QoS 1, as fast as its in-flight window allows or
//! paced at a steady rate, and reports when it sent and when the last PUBACK came, as one JSON
//! line on stdout. With a send log it also writes each message's send time (u64 LE nanoseconds
//! since the Unix epoch, in index order) for the latency figures.

use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde::{Deserialize, Serialize};

use crate::measure::unix_ns;

/// The first argument that makes this program a publisher.
pub const COMMAND: &str = "publish";

/// Every payload is exactly this long, as the issue specifies.
pub const PAYLOAD_BYTES: usize = 300;

/// QoS 1 publishes awaiting their PUBACK at once.
const IN_FLIGHT: u16 = 1024;

/// Reading `i` as a SAHOOL standard payload of [`PAYLOAD_BYTES`]; `value` is `i`, and each
/// index has its own device timestamp (one per second from 2026-06-01), so no reading is
/// taken for a repeat of another.
pub fn payload(i: u64) -> (String, Vec<u8>) {
    let ts = 1_780_287_300_000u64 + i * 1000;
    let head = format!(
        r#"{{"device_id":"probe-1","field_id":"field-1","type":"water_level","value":{i},"unit":"cm","timestamp":{ts},"battery":90.5,"rssi":-70,"note":""#
    );
    let pad = PAYLOAD_BYTES.saturating_sub(head.len() + 2);
    let mut body = head.into_bytes();
    body.resize(body.len() + pad, b'x');
    body.extend_from_slice(b"\"}");
    (
        "sahool/sensors/probe-1/field-1/water_level".to_string(),
        body,
    )
}

/// What one publisher process does.
#[derive(Debug, Clone)]
pub struct Job {
    pub port: u16,
    pub first: u64,
    pub count: u64,
    /// Messages per second; 0 = as fast as the in-flight window allows.
    pub rate: f64,
    pub send_log: Option<PathBuf>,
}

/// What the publisher saw, in wall-clock nanoseconds (comparable with nats-server's times).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outcome {
    pub acked: u64,
    pub first_send_ns: i128,
    pub last_send_ns: i128,
    pub last_ack_ns: i128,
}

/// A publisher process running.
pub struct Publisher {
    child: tokio::process::Child,
}

impl Publisher {
    pub fn spawn(job: &Job) -> Self {
        let exe = std::env::current_exe().expect("path of the bench executable");
        let mut cmd = tokio::process::Command::new(exe);
        cmd.arg(COMMAND)
            .arg(job.port.to_string())
            .arg(job.first.to_string())
            .arg(job.count.to_string())
            .arg(job.rate.to_string());
        if let Some(log) = &job.send_log {
            cmd.arg(log);
        }
        let child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start the publisher process");
        Self { child }
    }

    /// Waits for the publisher to finish and returns what it reported.
    pub async fn finish(self) -> Outcome {
        let out = self
            .child
            .wait_with_output()
            .await
            .expect("wait for the publisher");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "publisher failed ({}): {text}",
            out.status
        );
        serde_json::from_str(text.lines().last().unwrap_or_default())
            .unwrap_or_else(|e| panic!("publisher report `{text}`: {e}"))
    }
}

/// Reads a send log written by a publisher.
pub fn read_send_log(path: &Path) -> Vec<i128> {
    let bytes = std::fs::read(path).expect("read the send log");
    bytes
        .chunks_exact(8)
        .map(|c| i128::from(u64::from_le_bytes(c.try_into().expect("8 bytes"))))
        .collect()
}

/// `bench publish PORT FIRST COUNT RATE [SEND_LOG]`
pub fn child_main(args: &[String]) -> ExitCode {
    let job = match parse(args) {
        Some(job) => job,
        None => {
            eprintln!("usage: bench publish PORT FIRST COUNT RATE [SEND_LOG]");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(run(job)) {
        Ok(outcome) => {
            println!("{}", serde_json::to_string(&outcome).expect("report"));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("publisher: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parse(args: &[String]) -> Option<Job> {
    Some(Job {
        port: args.first()?.parse().ok()?,
        first: args.get(1)?.parse().ok()?,
        count: args.get(2)?.parse().ok()?,
        rate: args.get(3)?.parse().ok()?,
        send_log: args.get(4).map(PathBuf::from),
    })
}

async fn run(job: Job) -> Result<Outcome, String> {
    let mut o = MqttOptions::new(
        format!("bench-publisher-{}", std::process::id()),
        "127.0.0.1",
        job.port,
    );
    o.set_keep_alive(Duration::from_secs(30));
    o.set_inflight(IN_FLIGHT);
    o.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(o, usize::from(IN_FLIGHT));
    loop {
        match tokio::time::timeout(Duration::from_secs(10), eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => break,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(format!("cannot connect to 127.0.0.1:{}: {e}", job.port)),
            Err(_) => return Err("no CONNACK within 10 s".into()),
        }
    }

    let (count, first, rate) = (job.count, job.first, job.rate);
    let sender = tokio::spawn(async move {
        let mut sent = Vec::with_capacity(count as usize);
        let start = Instant::now();
        for k in 0..count {
            if rate > 0.0 {
                let due = start + Duration::from_secs_f64(k as f64 / rate);
                if due > Instant::now() {
                    tokio::time::sleep_until(due.into()).await;
                }
            }
            let (topic, body) = payload(first + k);
            if client
                .publish(topic, QoS::AtLeastOnce, false, body)
                .await
                .is_err()
            {
                break;
            }
            sent.push(unix_ns());
        }
        (client, sent)
    });

    let mut acked = 0u64;
    let mut last_ack_ns = 0;
    while acked < count {
        match tokio::time::timeout(Duration::from_secs(60), eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => {
                acked += 1;
                last_ack_ns = unix_ns();
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(format!("connection failed after {acked} PUBACKs: {e}")),
            Err(_) => return Err(format!("no event for 60 s ({acked}/{count} acknowledged)")),
        }
    }
    let (client, sent) = sender.await.map_err(|e| e.to_string())?;
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while eventloop.poll().await.is_ok() {}
    })
    .await;
    if let Some(path) = &job.send_log {
        let bytes: Vec<u8> = sent
            .iter()
            .flat_map(|t| (*t as u64).to_le_bytes())
            .collect();
        std::fs::write(path, bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(Outcome {
        acked,
        first_send_ns: sent.first().copied().unwrap_or(0),
        last_send_ns: sent.last().copied().unwrap_or(0),
        last_ack_ns,
    })
}
