//! A simulated RS-485 Modbus RTU bus for the far end of a pseudo-terminal: several slaves with
//! coils, holding and input registers, each answering, silent, answering with a bad CRC, with an
//! exception, or late. Coils and holding registers take writes (functions 0x05, 0x06, 0x10),
//! each counted per unit and address; a "stuck" slave acknowledges writes and ignores them. Written from the Modbus specification with the `crc` crate, independent
//! of the gateway's own code, and generic over the stream so end-to-end tests can reuse it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    /// Answers every request with this exception code.
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
    pub coils: BTreeMap<u16, bool>,
    pub holding: BTreeMap<u16, u16>,
    pub input: BTreeMap<u16, u16>,
    pub behaviour: Behaviour,
    /// Acknowledges writes without changing anything (a relay welded, a setpoint locked).
    pub stuck: bool,
}

impl Slave {
    pub fn new(unit: u8) -> Self {
        Self {
            unit,
            coils: BTreeMap::new(),
            holding: BTreeMap::new(),
            input: BTreeMap::new(),
            behaviour: Behaviour::Answer,
            stuck: false,
        }
    }

    pub fn coil(mut self, address: u16, on: bool) -> Self {
        self.coils.insert(address, on);
        self
    }

    pub fn stuck(mut self) -> Self {
        self.stuck = true;
        self
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

/// A request the bus saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    pub unit: u8,
    pub function: u8,
    /// The first coil or register.
    pub start: u16,
    /// How many (reads, 0x10), or the value written (0x05, 0x06).
    pub count: u16,
    pub at: Instant,
}

/// Writes per (unit, function, address): function 0x05 for coils, 0x06 for holding registers
/// (written by 0x06 or 0x10, counted at the first register).
type Writes = BTreeMap<(u8, u8, u16), u32>;

/// What the slaves hold and what was written, shared with the test.
#[derive(Default)]
struct State {
    slaves: BTreeMap<u8, Slave>,
    writes: Writes,
}

/// The running bus; dropping it closes the far end of the port.
pub struct SimBus {
    seen: Arc<Mutex<Vec<Seen>>>,
    state: Arc<Mutex<State>>,
    task: JoinHandle<()>,
}

impl SimBus {
    pub fn spawn<S>(stream: S, slaves: Vec<Slave>) -> Self
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let state = Arc::new(Mutex::new(State {
            slaves: slaves.into_iter().map(|s| (s.unit, s)).collect(),
            writes: Writes::new(),
        }));
        let task = tokio::spawn(serve(stream, Arc::clone(&state), Arc::clone(&seen)));
        Self { seen, state, task }
    }

    /// Writes of coil `address` of `unit` so far (stuck or not).
    pub fn coil_writes(&self, unit: u8, address: u16) -> u32 {
        self.writes_of(unit, 0x05, address)
    }

    /// Writes starting at holding register `address` of `unit` so far.
    pub fn register_writes(&self, unit: u8, address: u16) -> u32 {
        self.writes_of(unit, 0x06, address)
    }

    fn writes_of(&self, unit: u8, function: u8, address: u16) -> u32 {
        let state = self.state.lock().unwrap();
        state
            .writes
            .get(&(unit, function, address))
            .copied()
            .unwrap_or(0)
    }

    /// The coil as the slave holds it now.
    pub fn coil_state(&self, unit: u8, address: u16) -> Option<bool> {
        let state = self.state.lock().unwrap();
        state.slaves.get(&unit)?.coils.get(&address).copied()
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

async fn serve<S>(mut stream: S, state: Arc<Mutex<State>>, seen: Arc<Mutex<Vec<Seen>>>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 256];
    loop {
        while let Some(len) = request_len(&buf) {
            if buf.len() < len {
                break; // the rest of the frame is still on its way
            }
            if MODBUS.checksum(&buf[..len - 2]).to_le_bytes() != [buf[len - 2], buf[len - 1]] {
                buf.remove(0); // not a frame start: resynchronise byte by byte
                continue;
            }
            let frame: Vec<u8> = buf.drain(..len).collect();
            let request = Seen {
                unit: frame[0],
                function: frame[1],
                start: u16::from_be_bytes([frame[2], frame[3]]),
                count: u16::from_be_bytes([frame[4], frame[5]]),
                at: Instant::now(),
            };
            seen.lock().unwrap().push(request);
            let Some((answer, behaviour)) = respond(&state, request, &frame) else {
                continue; // nobody at that address, or silent
            };
            if let Behaviour::LateFor { register, delay } = behaviour {
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

/// The length of the request `buf` starts with, once enough of it is there to tell: 8 bytes,
/// or for 0x10 the header's 7, the byte count's data and the CRC.
fn request_len(buf: &[u8]) -> Option<usize> {
    match buf.get(1)? {
        0x10 => buf.get(6).map(|&n| 9 + usize::from(n)),
        _ if buf.len() >= 8 => Some(8),
        _ => None,
    }
}

/// The answer of the addressed slave (after carrying out a write), and how it behaves.
fn respond(state: &Mutex<State>, request: Seen, frame: &[u8]) -> Option<(Vec<u8>, Behaviour)> {
    let mut state = state.lock().unwrap();
    let State { slaves, writes } = &mut *state;
    let slave = slaves.get_mut(&request.unit)?;
    let behaviour = slave.behaviour;
    let body = match behaviour {
        Behaviour::Silent => return None,
        Behaviour::Exception(code) => vec![slave.unit, request.function | 0x80, code],
        _ => match request.function {
            0x01 | 0x03 | 0x04 => read(slave, request),
            _ => write(slave, request, frame, writes),
        },
    };
    let mut crc = MODBUS.checksum(&body);
    if behaviour == Behaviour::BadCrc {
        crc ^= 0xA5A5;
    }
    let mut answer = body;
    answer.extend_from_slice(&crc.to_le_bytes());
    Some((answer, behaviour))
}

fn exception(slave: &Slave, request: Seen, code: u8) -> Vec<u8> {
    vec![slave.unit, request.function | 0x80, code]
}

fn read(slave: &Slave, request: Seen) -> Vec<u8> {
    let addresses = (0..request.count).map(|i| request.start.checked_add(i));
    let data: Option<Vec<u8>> = match request.function {
        0x01 => addresses
            .map(|a| slave.coils.get(&a?).copied())
            .collect::<Option<Vec<bool>>>()
            .map(|coils| {
                coils
                    .chunks(8)
                    .map(|byte| {
                        byte.iter()
                            .enumerate()
                            .fold(0u8, |b, (i, &on)| b | (u8::from(on) << i))
                    })
                    .collect()
            }),
        function => {
            let table = if function == 0x03 {
                &slave.holding
            } else {
                &slave.input
            };
            addresses
                .map(|a| table.get(&a?).copied())
                .collect::<Option<Vec<u16>>>()
                .map(|words| words.iter().flat_map(|w| w.to_be_bytes()).collect())
        }
    };
    match data {
        None => exception(slave, request, 0x02),
        Some(data) => {
            let mut body = vec![slave.unit, request.function, data.len() as u8];
            body.extend_from_slice(&data);
            body
        }
    }
}

/// Carries out a write (unless the slave is stuck), counts it, and echoes it.
fn write(slave: &mut Slave, request: Seen, frame: &[u8], writes: &mut Writes) -> Vec<u8> {
    let words: Vec<u16> = match request.function {
        0x05 | 0x06 => vec![request.count],
        0x10 => frame[7..frame.len() - 2]
            .chunks_exact(2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .collect(),
        _ => return exception(slave, request, 0x01),
    };
    let addresses: Vec<u16> = (0..words.len() as u16).map(|i| request.start + i).collect();
    let (known, counted_as) = match request.function {
        0x05 if !matches!(request.count, 0xFF00 | 0x0000) => {
            return exception(slave, request, 0x03)
        }
        0x05 => (slave.coils.contains_key(&request.start), 0x05),
        _ => (
            addresses.iter().all(|a| slave.holding.contains_key(a)),
            0x06,
        ),
    };
    if !known {
        return exception(slave, request, 0x02);
    }
    *writes
        .entry((slave.unit, counted_as, request.start))
        .or_insert(0) += 1;
    if !slave.stuck {
        for (address, word) in addresses.iter().zip(&words) {
            match request.function {
                0x05 => slave.coils.insert(*address, *word == 0xFF00).map(drop),
                _ => slave.holding.insert(*address, *word).map(drop),
            };
        }
    }
    frame[..6].to_vec()
}
