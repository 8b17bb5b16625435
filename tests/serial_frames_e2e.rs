//! Firmware nodes on `frames` ports through the real binary, with simulated nodes on
//! pseudo-terminals that keep every frame until acked and resend it: the gateway killed with
//! SIGKILL again and again mid-stream and restarted on the same data and device paths, garbage
//! on a line, a node unplugged and plugged in again. Every frame a node saw acked must be in
//! JetStream once, in the order the gateway acked it; nothing may be stored twice.

mod support;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use sahool_wire::AckStatus;
use serde_json::Value;
use support::pty::{wait_port_open, DeviceSide, SerialLink};
use support::sim_node::{NodeSpec, SimNode};
use support::{values_in_order, Gateway, Nats, StreamMessage};

/// Deadline for anything to happen on a loaded machine.
const WITHIN: Duration = Duration::from_secs(120);
/// The sensor type of channel 0 and of channel 1 (types without a default range, as the values
/// grow with seq).
const TYPES: [&str; 2] = ["water_level", "water_flow"];

/// A node on a port of its own: the port's device link, the node's side of it, its spec.
struct Wired {
    port: &'static str,
    link: SerialLink,
    side: DeviceSide,
    spec: NodeSpec,
}

impl Wired {
    fn new(port: &'static str, spec: NodeSpec) -> Self {
        let mut link = SerialLink::unplugged(&format!("usb-node-{}", spec.id));
        let side = DeviceSide::default();
        link.plug_into(&side);
        Self {
            port,
            link,
            side,
            spec,
        }
    }

    fn device(&self) -> String {
        format!("node-{}", self.spec.id)
    }
}

/// A config with one `frames` port per node; channel `c` of node `n` is sensor `TYPES[c]` of
/// device `node-n`. No flood limits: the nodes send faster than any real one.
fn config(nats: &Nats, nodes: &[&Wired]) -> String {
    let mut ports = String::new();
    let mut sensors = String::new();
    for w in nodes {
        ports += &format!(
            "[[serial]]\nname = \"{}\"\npath = \"{}\"\nprotocol = \"frames\"\nbaud = 115200\n\n",
            w.port,
            w.link.path.display()
        );
        for (channel, sensor_type) in TYPES.iter().enumerate() {
            sensors += &format!(
                "  [[fields.sensors]]\n  device_id = \"{}\"\n  sensor_type = \"{sensor_type}\"\n  frame = {{ port = \"{}\", node = {}, channel = {channel} }}\n",
                w.device(),
                w.port,
                w.spec.id
            );
        }
    }
    format!(
        r#"
[nats]
servers = ["{nats}"]
ack_timeout = "2s"

[quality]
device_rate = 1000000.0
device_burst = 1000000.0
source_rate = 1000000.0
source_burst = 1000000.0

{ports}
[[fields]]
id = "field-1"
{sensors}"#,
        nats = nats.url()
    )
}

/// Records the order in which a node settles its frames (the first ack it accepts for each),
/// and wakes a test waiting for the next one.
#[derive(Clone)]
struct AckOrder {
    seqs: Arc<Mutex<Vec<u32>>>,
    count: Arc<watch::Sender<usize>>,
}

impl AckOrder {
    fn new() -> Self {
        Self {
            seqs: Arc::default(),
            count: Arc::new(watch::channel(0).0),
        }
    }

    fn spec(&self, spec: NodeSpec) -> NodeSpec {
        let this = self.clone();
        NodeSpec {
            on_ack: Some(Arc::new(move |seq| {
                this.seqs.lock().unwrap().push(seq);
                this.count.send_modify(|n| *n += 1);
            })),
            ..spec
        }
    }

    fn seqs(&self) -> Vec<u32> {
        self.seqs.lock().unwrap().clone()
    }

    /// Resolves the moment the node has accepted `more` acks beyond those it has now.
    async fn more(&self, more: usize) {
        let mut count = self.count.subscribe();
        let target = *count.borrow_and_update() + more;
        tokio::time::timeout(WITHIN, count.wait_for(|n| *n >= target))
            .await
            .expect("acks keep coming")
            .expect("the node runs");
    }
}

/// The value a node sends, as the gateway passes it on: the shortest decimal of the f32.
fn sent(spec: &NodeSpec, seq: u32, channel: u8) -> f64 {
    spec.value(seq, channel).to_string().parse().unwrap()
}

/// The frames of `w`'s node in the stream, in stream order, identified by their values: each
/// frame's channel 0 and channel 1 readings must be there together, with the values of one
/// frame the node sent. Panics on a reading no frame of the node holds.
fn frames_in_stream(events: &[StreamMessage], w: &Wired) -> Vec<u32> {
    let spec = &w.spec;
    let by_value: HashMap<u64, u32> = (0..spec.readings)
        .map(|seq| (sent(spec, seq, 0).to_bits(), seq))
        .collect();
    let readings: Vec<(&str, f64)> = events
        .iter()
        .map(|e| &e.body["payload"])
        .filter(|p| p["device_id"] == w.device().as_str())
        .map(|p| {
            (
                p["sensor_type"].as_str().unwrap(),
                p["value"].as_f64().unwrap(),
            )
        })
        .collect();
    assert!(
        readings.len().is_multiple_of(2),
        "{}: a frame's readings are committed together: {readings:?}",
        w.device()
    );
    readings
        .chunks(2)
        .map(|pair| {
            let [(t0, v0), (t1, v1)] = pair else {
                unreachable!()
            };
            assert_eq!([*t0, *t1], TYPES, "{}: {pair:?}", w.device());
            let seq = *by_value
                .get(&v0.to_bits())
                .unwrap_or_else(|| panic!("{}: no frame sent {v0}", w.device()));
            assert_eq!(*v1, sent(spec, seq, 1), "{}: frame {seq}", w.device());
            seq
        })
        .collect()
}

/// Checks `w`'s node against the stream: every frame it produced (all acked) is there once,
/// and the frames acked `Stored` are in the order the node got those acks.
fn check_node(events: &[StreamMessage], w: &Wired, node: &SimNode, order: &AckOrder) {
    let state = node.state();
    let in_stream = frames_in_stream(events, w);
    let once: BTreeSet<u32> = in_stream.iter().copied().collect();
    assert_eq!(
        once.len(),
        in_stream.len(),
        "{}: a frame stored twice: {in_stream:?}",
        w.device()
    );
    let acked: BTreeSet<u32> = state.acked.keys().copied().collect();
    let missing: Vec<&u32> = acked.difference(&once).collect();
    assert!(
        missing.is_empty(),
        "{}: frames acked but not in the stream: {missing:?}",
        w.device()
    );
    assert_eq!(
        once,
        (0..w.spec.readings).collect(),
        "{}: exactly the frames it sent",
        w.device()
    );
    let stored = |seq: &u32| state.acked[seq] == AckStatus::Stored;
    let ack_order: Vec<u32> = order.seqs().into_iter().filter(stored).collect();
    let stream_order: Vec<u32> = in_stream.into_iter().filter(stored).collect();
    assert_eq!(
        stream_order,
        ack_order,
        "{}: the stream holds the frames in the order the gateway committed and acked them",
        w.device()
    );
}

/// Waits until the gateway's buffer has no reading left to forward.
fn wait_drained(gateway: &Gateway) {
    gateway.wait_until("the buffer drained", WITHIN, |g| {
        g.metric("sahool_gateway_buffer_readings", "") == 0.0
    });
}

fn dead_letters(gateway: &Gateway) -> Vec<Value> {
    let out = gateway.cli(&["dead-letters", "list", "--limit", "100000"]);
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("dead-letter JSON"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_frame_a_node_saw_acked_is_in_the_stream_once_in_ack_order_across_sigkills() {
    const KILLS: usize = 5;
    // 15 s of measuring: room for the kills on a loaded machine.
    const FRAMES: u32 = 1500;
    let nats = Nats::with_platform_stream().await;
    let node = |id| NodeSpec {
        id,
        readings: FRAMES,
        channels: 2,
        interval: Duration::from_millis(10),
        resend_after: Duration::from_millis(400),
        ring: 1000,
        ..NodeSpec::default()
    };
    let (order_a, order_b) = (AckOrder::new(), AckOrder::new());
    // Node 7 sends its clock's time; node 8 has garbage on its line and misses acks.
    let a = Wired::new(
        "nodes-a",
        order_a.spec(NodeSpec {
            with_time: true,
            ..node(7)
        }),
    );
    let b = Wired::new(
        "nodes-b",
        order_b.spec(NodeSpec {
            garbage_every: Some(9),
            lose_first_ack_every: Some(40),
            ..node(8)
        }),
    );
    let mut gateway = Gateway::start(&config(&nats, &[&a, &b]));
    wait_port_open(&gateway, a.port);
    wait_port_open(&gateway, b.port);
    let node_a = SimNode::start(a.side.clone(), a.spec.clone());
    let node_b = SimNode::start(b.side.clone(), b.spec.clone());

    // After every fiftieth ack a node gets from this gateway, kill the gateway at once, while
    // the next frames are being committed, leave the line dead a while (the nodes keep
    // measuring into their rings), and start it again on the same data directory and devices.
    for round in 0..KILLS {
        [&order_a, &order_b][round % 2].more(50).await;
        gateway.kill9();
        tokio::time::sleep(Duration::from_millis(50 + 100 * round as u64)).await;
        gateway.resume();
    }
    let produced = node_a.state().produced + node_b.state().produced;
    assert!(
        produced < 2 * FRAMES,
        "the last kill came after the nodes had measured everything: not mid-stream"
    );
    node_a.wait_done(WITHIN).await;
    node_b.wait_done(WITHIN).await;
    wait_drained(&gateway);

    let events = nats.read_readings("SAHOOL_IOT").await;
    // Unique event ids, Nats-Msg-Id = event_id, source.seq increasing in stream order.
    values_in_order(&events);
    check_node(&events, &a, &node_a, &order_a);
    check_node(&events, &b, &node_b, &order_b);
    assert_eq!(
        events.len(),
        2 * FRAMES as usize * 2,
        "nothing but the nodes' readings"
    );
    let resends = node_a.state().resends + node_b.state().resends;
    assert!(resends > 0, "the kills made the nodes resend");

    // Garbage on node 8's line: kept with its bytes, never taken for a reading (every reading
    // in the stream is one of the frames the nodes sent, checked above).
    let letters = dead_letters(&gateway);
    assert!(
        letters.iter().all(|d| d["source"] == b.port),
        "only the garbage is dead-lettered: {letters:#?}"
    );
    assert!(!letters.is_empty(), "{} pieces of garbage sent", {
        node_b.state().garbage_sent
    });
    for d in &letters {
        assert!(
            ["malformed", "oversized"].contains(&d["reason"].as_str().unwrap()),
            "{d}"
        );
        assert!(d["detail"].as_str().unwrap().contains("bad frame"), "{d}");
        assert!(!d["raw"].as_str().unwrap().is_empty(), "{d}");
    }

    // The last gateway's own count of what it handled.
    let frames = |port: &str, outcome: &str| {
        gateway.metric(
            "sahool_gateway_serial_frames_total",
            &format!("port=\"{port}\",outcome=\"{outcome}\""),
        )
    };
    for port in [a.port, b.port] {
        assert!(
            frames(port, "stored") + frames(port, "duplicate") > 0.0,
            "{port}: frames acked"
        );
        assert_eq!(frames(port, "refused") + frames(port, "failed"), 0.0);
    }
    for (w, node) in [(&a, &node_a), (&b, &node_b)] {
        let s = node.state();
        let duplicates = s
            .acked
            .values()
            .filter(|st| **st == AckStatus::Duplicate)
            .count();
        println!(
            "{}: {} frames, {} sent ({} resends), {duplicates} settled by a duplicate ack, {} acks ignored, {} garbage, {} line errors",
            w.device(), s.produced, s.frames_sent, s.resends, s.acks_lost, s.garbage_sent, s.line_errors
        );
    }
    println!("{KILLS} SIGKILLs, {} dead letters", letters.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_unplugged_and_plugged_in_again_resumes_without_a_restart() {
    let nats = Nats::with_platform_stream().await;
    let order = AckOrder::new();
    let mut w = Wired::new(
        "nodes",
        order.spec(NodeSpec {
            id: 5,
            readings: 300,
            interval: Duration::from_millis(20),
            resend_after: Duration::from_millis(300),
            ring: 1000,
            ..NodeSpec::default()
        }),
    );
    let mut gateway = Gateway::start(&config(&nats, &[&w]));
    wait_port_open(&gateway, w.port);
    let pid = gateway.pid();
    let node = SimNode::start(w.side.clone(), w.spec.clone());
    node.wait_for("30 frames acked", WITHIN, |s| s.acked.len() >= 30)
        .await;

    // Pulled: the gateway's reads end; the node keeps measuring into its ring.
    w.side.unplug();
    let port = format!("port=\"{}\"", w.port);
    gateway.wait_until("the port down", WITHIN, |g| {
        g.metric("sahool_gateway_serial_port_up", &port) == 0.0
    });
    let produced = node.state().produced;
    node.wait_for("measuring while unplugged", WITHIN, |s| {
        s.produced >= produced + 20
    })
    .await;

    w.link.plug_into(&w.side);
    node.wait_done(WITHIN).await;
    wait_drained(&gateway);
    assert!(gateway.is_running() && gateway.pid() == pid, "no restart");
    assert!(gateway.metric("sahool_gateway_serial_reconnects_total", &port) >= 1.0);
    assert!(
        gateway.metric(
            "sahool_gateway_serial_errors_total",
            &format!("{port},reason=\"lost\"")
        ) >= 1.0
    );

    let events = nats.read_readings("SAHOOL_IOT").await;
    values_in_order(&events);
    check_node(&events, &w, &node, &order);
    assert!(
        node.state().resends > 0,
        "frames measured while unplugged were resent"
    );
}
