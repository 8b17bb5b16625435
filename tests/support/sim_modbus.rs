//! A simulated RS-485 Modbus RTU bus for the far end of a pseudo-terminal: several slaves with
//! holding and input registers, each answering, silent, answering with a bad CRC, with an
//! exception, or late. Written from the Modbus specification with the `crc` crate, independent
//! of the gateway's own code, and generic over the stream so end-to-end tests can reuse it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::task::JoinHandle;

const MODBUS: crc::Crc<u16> = crc::Crc::<u16>::new(&crc::CRC_16_MODBUS);

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Behaviour {
    Answer,
    /// Never answers (a dead or missing slave).
    Silent,
    /// Answers with the right data and a wrong CRC.
    BadCrc,
    /// Answers every read with this exception code.
    Exception(u8),
    /// Reads starting at `register` are answered after `delay`; others at once.
    LateFor {
        register: u16,
        delay: Duration,
    },
}

#[derive(Debug, Clone)]
pub struct Slave {
    pub unit: u8,
    pub holding: BTreeMap<u16, u16>,
    pub input: BTreeMap<u16, u16>,
    pub behaviour: Behaviour,
}

impl Slave {
    pub fn new(unit: u8) -> Self {
        Self {
            unit,
            holding: BTreeMap::new(),
            input: BTreeMap::new(),
            behaviour: Behaviour::Answer,
        }
    }

    pub fn holding(mut self, start: u16, words: &[u16]) -> Self {
        for (i, w) in words.iter().enumerate() {
            self.holding.insert(start + i as u16, *w);
        }
        self
    }

    pub fn input(mut self, start: u16, words: &[u16]) -> Self {
        for (i, w) in words.iter().enumerate() {
            self.input.insert(start + i as u16, *w);
        }
        self
    }

    pub fn behaving(mut self, behaviour: Behaviour) -> Self {
        self.behaviour = behaviour;
        self
    }
}

/// Register images of 32-bit values as a device holds them.
pub fn words32(bits: u32, little_word_order: bool) -> [u16; 2] {
    let (high, low) = ((bits >> 16) as u16, bits as u16);
    if little_word_order {
        [low, high]
    } else {
        [high, low]
    }
}

/// A read request the bus saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    pub unit: u8,
    pub function: u8,
    pub start: u16,
    pub count: u16,
}

/// The running bus; dropping it closes the far end of the port.
pub struct SimBus {
    seen: Arc<Mutex<Vec<Seen>>>,
    task: JoinHandle<()>,
}

impl SimBus {
    pub fn spawn<S>(stream: S, slaves: Vec<Slave>) -> Self
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let slaves = slaves.into_iter().map(|s| (s.unit, s)).collect();
        let task = tokio::spawn(serve(stream, slaves, Arc::clone(&seen)));
        Self { seen, task }
    }

    /// Every well-formed request so far, in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Closes the far end, as an unplugged adapter would.
    pub async fn close(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

impl Drop for SimBus {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve<S>(mut stream: S, slaves: BTreeMap<u8, Slave>, seen: Arc<Mutex<Vec<Seen>>>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 256];
    loop {
        // A read request is always 8 bytes: unit, function, start, count, CRC.
        while buf.len() >= 8 {
            let frame: [u8; 8] = buf[..8].try_into().unwrap();
            if MODBUS.checksum(&frame[..6]).to_le_bytes() != [frame[6], frame[7]] {
                buf.remove(0); // not a frame start: resynchronise byte by byte
                continue;
            }
            buf.drain(..8);
            let request = Seen {
                unit: frame[0],
                function: frame[1],
                start: u16::from_be_bytes([frame[2], frame[3]]),
                count: u16::from_be_bytes([frame[4], frame[5]]),
            };
            seen.lock().unwrap().push(request);
            let Some(slave) = slaves.get(&request.unit) else {
                continue; // nobody at that address
            };
            let Some(answer) = answer(slave, request) else {
                continue;
            };
            if let Behaviour::LateFor { register, delay } = slave.behaviour {
                if register == request.start {
                    tokio::time::sleep(delay).await;
                }
            }
            if stream.write_all(&answer).await.is_err() {
                return;
            }
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn answer(slave: &Slave, request: Seen) -> Option<Vec<u8>> {
    let mut body = vec![slave.unit];
    let exception = |code: u8| vec![slave.unit, request.function | 0x80, code];
    let table = match request.function {
        0x03 => Some(&slave.holding),
        0x04 => Some(&slave.input),
        _ => None,
    };
    match (slave.behaviour, table) {
        (Behaviour::Silent, _) => return None,
        (Behaviour::Exception(code), _) => body = exception(code),
        (_, None) => body = exception(0x01),
        (_, Some(table)) => {
            let words: Option<Vec<u16>> = (0..request.count)
                .map(|i| table.get(&(request.start + i)).copied())
                .collect();
            match words {
                None => body = exception(0x02),
                Some(words) => {
                    body.extend_from_slice(&[request.function, (words.len() * 2) as u8]);
                    for w in words {
                        body.extend_from_slice(&w.to_be_bytes());
                    }
                }
            }
        }
    }
    let mut crc = MODBUS.checksum(&body);
    if slave.behaviour == Behaviour::BadCrc {
        crc ^= 0xA5A5;
    }
    body.extend_from_slice(&crc.to_le_bytes());
    Some(body)
}
