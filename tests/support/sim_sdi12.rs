//! Simulated SDI-12 sensors behind a transparent adapter, for the far end of a
//! pseudo-terminal: commands arrive as ASCII ending in `!`, responses leave as lines ending in
//! `<CR><LF>`. A sensor announces a measurement time, has its values ready after its own delay
//! (sending a service request then for `M`/`MC`), answers `D` commands with a few values each
//! (with the CRC for `MC`/`CC`) and answers "no data" to a `D` command sent too early.
//! Generic over the stream so end-to-end tests can reuse it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sahool_gateway::sources::serial::sdi12::crc_chars;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::task::JoinHandle;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Behaviour {
    Answer,
    Silent,
    /// `D` responses carry a wrong CRC.
    BadCrc,
    /// Answers as if it had this address.
    AnswersAs(char),
    /// Answers measurement commands with something that is no `atttn`.
    Garbage,
}

#[derive(Debug, Clone)]
pub struct Sensor {
    pub address: char,
    pub values: Vec<f64>,
    /// Values it announces (defaults to `values.len()`; more than it has → fewer values).
    pub announced: usize,
    /// The `ttt` it announces.
    pub announce_secs: u16,
    /// When its values are really ready (and the service request goes out).
    pub ready_after: Duration,
    /// Values per `D` response.
    pub per_data: usize,
    pub behaviour: Behaviour,
}

impl Sensor {
    pub fn new(address: char, values: &[f64]) -> Self {
        Self {
            address,
            values: values.to_vec(),
            announced: values.len(),
            announce_secs: 0,
            ready_after: Duration::ZERO,
            per_data: 3,
            behaviour: Behaviour::Answer,
        }
    }

    pub fn timing(mut self, announce_secs: u16, ready_after: Duration) -> Self {
        self.announce_secs = announce_secs;
        self.ready_after = ready_after;
        self
    }

    pub fn per_data(mut self, n: usize) -> Self {
        self.per_data = n;
        self
    }

    pub fn announcing(mut self, n: usize) -> Self {
        self.announced = n;
        self
    }

    pub fn behaving(mut self, behaviour: Behaviour) -> Self {
        self.behaviour = behaviour;
        self
    }
}

/// A command the adapter passed on, and when.
#[derive(Debug, Clone)]
pub struct Heard {
    pub command: String,
    pub at: Instant,
}

/// A measurement in progress.
struct Pending {
    ready_at: Instant,
    crc: bool,
    service_request: bool,
}

pub struct SimSdi12 {
    heard: Arc<Mutex<Vec<Heard>>>,
    task: JoinHandle<()>,
}

impl SimSdi12 {
    /// `echo`: the adapter echoes each command before the answer, as some do.
    pub fn spawn<S>(stream: S, sensors: Vec<Sensor>, echo: bool) -> Self
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let heard = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn(serve(stream, sensors, echo, Arc::clone(&heard)));
        Self { heard, task }
    }

    pub fn heard(&self) -> Vec<Heard> {
        self.heard.lock().unwrap().clone()
    }

    pub async fn close(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

impl Drop for SimSdi12 {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve<S>(mut stream: S, sensors: Vec<Sensor>, echo: bool, heard: Arc<Mutex<Vec<Heard>>>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut pending: BTreeMap<char, Pending> = BTreeMap::new();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 128];
    loop {
        // The next service request due, if any.
        let next_request = pending
            .iter()
            .filter(|(_, p)| p.service_request)
            .map(|(a, p)| (*a, p.ready_at))
            .min_by_key(|(_, at)| *at);
        let read = tokio::select! {
            read = stream.read(&mut chunk) => read,
            () = sleep_until_some(next_request.map(|(_, at)| at)) => {
                let (address, _) = next_request.unwrap();
                if let Some(p) = pending.get_mut(&address) {
                    p.service_request = false;
                }
                if stream.write_all(format!("{address}\r\n").as_bytes()).await.is_err() {
                    return;
                }
                continue;
            }
        };
        match read {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        while let Some(end) = buf.iter().position(|&b| b == b'!') {
            let command: String = String::from_utf8_lossy(&buf[..=end]).into_owned();
            buf.drain(..=end);
            heard.lock().unwrap().push(Heard {
                command: command.clone(),
                at: Instant::now(),
            });
            let mut out = if echo { command.clone() } else { String::new() };
            if let Some(reply) = respond(&command, &sensors, &mut pending) {
                out.push_str(&reply);
            }
            if !out.is_empty() && stream.write_all(out.as_bytes()).await.is_err() {
                return;
            }
        }
    }
}

async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn respond(
    command: &str,
    sensors: &[Sensor],
    pending: &mut BTreeMap<char, Pending>,
) -> Option<String> {
    let body = command.strip_suffix('!')?;
    if body == "?" {
        return sensors.first().map(|s| format!("{}\r\n", s.address));
    }
    let mut chars = body.chars();
    let address = chars.next()?;
    let rest: String = chars.collect();
    let sensor = sensors.iter().find(|s| s.address == address)?;
    let from = match sensor.behaviour {
        Behaviour::Silent => return None,
        Behaviour::AnswersAs(other) => other,
        _ => address,
    };
    let line = |text: String| format!("{text}\r\n");
    match rest.as_str() {
        "" => Some(line(from.to_string())),
        "M" | "MC" | "C" | "CC" => {
            if sensor.behaviour == Behaviour::Garbage {
                return Some(line(format!("{from}#?x")));
            }
            let concurrent = rest.starts_with('C');
            pending.insert(
                address,
                Pending {
                    ready_at: Instant::now() + sensor.ready_after,
                    crc: rest.len() == 2,
                    service_request: !concurrent && !sensor.ready_after.is_zero(),
                },
            );
            let count = if concurrent {
                format!("{:02}", sensor.announced)
            } else {
                sensor.announced.to_string()
            };
            Some(line(format!("{from}{:03}{count}", sensor.announce_secs)))
        }
        data if data.len() == 2 && data.starts_with('D') => {
            let n: usize = data[1..].parse().ok()?;
            let p = pending.get(&address)?;
            let mut text = from.to_string();
            if Instant::now() >= p.ready_at {
                for v in sensor
                    .values
                    .iter()
                    .skip(n * sensor.per_data)
                    .take(sensor.per_data)
                {
                    text.push_str(&format!("{v:+}"));
                }
            }
            if p.crc {
                let mut crc = crc_chars(text.as_bytes());
                if sensor.behaviour == Behaviour::BadCrc {
                    crc[2] ^= 0x01;
                }
                text.push_str(std::str::from_utf8(&crc).ok()?);
            }
            Some(line(text))
        }
        _ => None,
    }
}
