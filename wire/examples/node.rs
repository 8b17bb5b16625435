//! What firmware does with this crate, in the crate's no_std, allocation-free API: keep
//! readings in a ring until acked, send them as frames, forget them when an ack arrives.
//! A stand-in gateway answers over an in-memory "UART" so the example runs anywhere:
//! `cargo run -p sahool-wire --example node`.

use heapless::Deque;
use sahool_wire::{encode, Ack, AckStatus, Frame, FrameDecoder, Message, Reading, MAX_FRAME};

/// Frames a node keeps until the gateway acknowledges them (the oldest goes when full).
const RING: usize = 8;

struct Node {
    id: u32,
    next_seq: u32,
    /// Unacked frames, oldest first, as `(seq, reading)`.
    ring: Deque<(u32, Reading), RING>,
    acks: FrameDecoder,
}

impl Node {
    /// Buffers a new measurement under the next sequence number.
    fn measure(&mut self, moisture: f32, temperature: f32, battery: u8) {
        let mut r = Reading {
            battery: Some(battery),
            ..Reading::default()
        };
        // Two values fit easily: a frame holds up to MAX_VALUES.
        let _ = r.push(0, moisture);
        let _ = r.push(1, temperature);
        if self.ring.is_full() {
            self.ring.pop_front(); // a node with no room loses its oldest, and knows it
        }
        let _ = self.ring.push_back((self.next_seq, r));
        self.next_seq = self.next_seq.wrapping_add(1);
    }

    /// Sends (or resends) every unacked frame; real firmware does this on a timer.
    fn transmit(&self, uart: &mut impl FnMut(&[u8])) {
        let mut buf = [0u8; MAX_FRAME];
        for (seq, reading) in &self.ring {
            if let Ok(n) = encode(&Frame::reading(self.id, *seq, reading.clone()), &mut buf) {
                uart(&buf[..n]);
            }
        }
    }

    /// Feeds received bytes; every ack for this node removes its frame from the ring.
    fn receive(&mut self, bytes: &[u8]) {
        // Garbage, and frames for other nodes, are ignored: the node resends until acked.
        for (item, _) in self.acks.frames(bytes) {
            if let Ok(Frame {
                node,
                seq,
                message: Message::Ack(_),
            }) = item
            {
                if node == self.id {
                    // Acks may come late, twice or out of order: drop exactly that frame.
                    self.ring.retain(|(s, _)| *s != seq);
                }
            }
        }
    }
}

fn main() {
    let mut node = Node {
        id: 42,
        next_seq: 0,
        ring: Deque::new(),
        acks: FrameDecoder::new(),
    };
    node.measure(23.5, 18.25, 87);
    node.measure(23.4, 18.5, 87);

    // The stand-in gateway: decodes what the node sent and acks every reading frame.
    let mut to_gateway = Vec::new();
    node.transmit(&mut |bytes| to_gateway.extend_from_slice(bytes));
    let mut gateway = FrameDecoder::new();
    let mut to_node = Vec::new();
    for (item, _) in gateway.frames(&to_gateway) {
        if let Ok(frame) = item {
            println!(
                "gateway got node {} seq {}: {:?}",
                frame.node, frame.seq, frame.message
            );
            let ack = Ack {
                status: AckStatus::Stored,
                gateway_time_ms: 1_700_000_000_000,
            };
            let mut buf = [0u8; MAX_FRAME];
            let n = encode(&Frame::ack(frame.node, frame.seq, ack), &mut buf).expect("fits");
            to_node.extend_from_slice(&buf[..n]);
        }
    }
    println!(
        "{} bytes to the gateway, {} bytes of acks back",
        to_gateway.len(),
        to_node.len()
    );
    node.receive(&to_node);
    println!("unacked frames left on the node: {}", node.ring.len());
}
