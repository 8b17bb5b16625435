//! Requests from outside the poll loop (actuator writes and their read-backs) to a
//! `modbus-rtu` port. The port task owns the bus; others hand it a [`BusRequest`] through the
//! port's channel, found by port name in [`BusRequests`], and await the reply. The port task
//! serves them between its poll requests, so a request waits at most for the request in
//! progress and the bus still carries one frame at a time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::{exception_name, Fault};

/// Requests a port holds before senders wait for room.
const QUEUE: usize = 16;

/// How long a caller waits for a port to take and answer a request. Far longer than one
/// request (the port serves requests between its own, and while its values wait for room in
/// the buffer), but bounded: a port task that is stuck must not hold the caller for ever.
pub const CALL_BOUND: Duration = Duration::from_secs(30);

/// A write to one slave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// Function 0x05.
    Coil { unit: u8, coil: u16, on: bool },
    /// Function 0x06 for one register, 0x10 for more (a 32-bit value).
    Registers {
        unit: u8,
        register: u16,
        words: Vec<u16>,
    },
}

/// A read of one slave's state, to confirm a write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Read {
    /// Function 0x01, one coil.
    Coil { unit: u8, coil: u16 },
    /// Function 0x03.
    Registers { unit: u8, register: u16, count: u16 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusRequestKind {
    Write(Write),
    Read(Read),
}

impl BusRequestKind {
    pub fn unit(&self) -> u8 {
        match self {
            Self::Write(Write::Coil { unit, .. } | Write::Registers { unit, .. })
            | Self::Read(Read::Coil { unit, .. } | Read::Registers { unit, .. }) => *unit,
        }
    }

    /// How messages name the request: "the write of coil 3".
    pub fn describe(&self) -> String {
        match self {
            Self::Write(Write::Coil { coil, on, .. }) => {
                format!(
                    "the write of coil {coil} ({})",
                    if *on { "on" } else { "off" }
                )
            }
            Self::Write(Write::Registers {
                register, words, ..
            }) => format!("the write of holding register {register} ({words:?})"),
            Self::Read(Read::Coil { coil, .. }) => format!("the read of coil {coil}"),
            Self::Read(Read::Registers {
                register, count, ..
            }) => format!("the read of {count} holding register(s) from {register}"),
        }
    }
}

/// What a served request got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusReply {
    /// The slave echoed the write.
    Written,
    Coil(bool),
    Registers(Vec<u16>),
}

/// One request and where its answer goes.
#[derive(Debug)]
pub struct BusRequest {
    pub kind: BusRequestKind,
    pub reply: oneshot::Sender<Result<BusReply, BusError>>,
}

/// Why a request to a bus got no answer, said so that an operator knows where to look.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BusError {
    #[error("serial port `{port}` is not running: not a configured modbus-rtu port, or not open (missing, or lost and being reopened; see /readyz)")]
    NotRunning { port: String },
    #[error("serial port `{port}` did not answer the request within {}s: its task is held up (see the log and /readyz)", CALL_BOUND.as_secs())]
    Busy { port: String },
    #[error("Modbus unit {unit} on port `{port}` did not answer {what} within the response timeout: check its power, wiring and unit id")]
    Timeout {
        port: String,
        unit: u8,
        what: String,
    },
    #[error("Modbus unit {unit} on port `{port}` refused {what} with exception {code:#04x} ({}): check the address and that the device allows it", exception_name(*code))]
    Exception {
        port: String,
        unit: u8,
        what: String,
        code: u8,
    },
    #[error("the answer of Modbus unit {unit} on port `{port}` to {what} failed its CRC check: line noise, termination or a second master on the bus")]
    Crc {
        port: String,
        unit: u8,
        what: String,
    },
    #[error("Modbus unit {unit} on port `{port}` answered {what} with something else (a wrong echo, or a late answer): the write is unconfirmed")]
    Unexpected {
        port: String,
        unit: u8,
        what: String,
    },
    #[error("serial port `{port}` was lost during {what} ({detail}); it is being reopened")]
    PortLost {
        port: String,
        what: String,
        detail: String,
    },
    #[error(
        "actuator `{actuator}` has no [fields.actuators.modbus] binding in the config in force"
    )]
    NotModbus { actuator: String },
    #[error("actuator `{actuator}`: {detail}")]
    Value { actuator: String, detail: String },
}

impl BusError {
    /// The error for a request that got `fault` from the bus.
    pub(crate) fn from_fault(port: &str, kind: &BusRequestKind, fault: &Fault) -> Self {
        let (port, unit, what) = (port.to_string(), kind.unit(), kind.describe());
        match fault {
            Fault::Timeout => Self::Timeout { port, unit, what },
            Fault::Crc => Self::Crc { port, unit, what },
            Fault::Exception(code) => Self::Exception {
                port,
                unit,
                what,
                code: *code,
            },
            Fault::Unexpected | Fault::NotFinite => Self::Unexpected { port, unit, what },
        }
    }
}

type Senders = HashMap<String, mpsc::Sender<BusRequest>>;

/// The running `modbus-rtu` ports by name: where requests go. Cheap to clone; every clone is
/// the same registry. A port is in it while its engine runs with the device open.
#[derive(Debug, Clone, Default)]
pub struct BusRequests {
    ports: Arc<Mutex<Senders>>,
}

impl BusRequests {
    fn ports(&self) -> MutexGuard<'_, Senders> {
        self.ports.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// True when `port` is running and takes requests.
    pub fn is_running(&self, port: &str) -> bool {
        self.ports().get(port).is_some_and(|s| !s.is_closed())
    }

    /// Sends `kind` to `port` and waits for the answer, at most [`CALL_BOUND`].
    pub async fn call(&self, port: &str, kind: BusRequestKind) -> Result<BusReply, BusError> {
        let not_running = || BusError::NotRunning {
            port: port.to_string(),
        };
        let sender = self.ports().get(port).cloned().ok_or_else(not_running)?;
        let what = kind.describe();
        let (reply, answer) = oneshot::channel();
        let exchange = async {
            sender
                .send(BusRequest { kind, reply })
                .await
                .map_err(|_| not_running())?;
            // The port task dropped the request: it stopped or lost the port meanwhile.
            answer.await.map_err(|_| BusError::PortLost {
                port: port.to_string(),
                what,
                detail: "the port task ended".into(),
            })?
        };
        tokio::time::timeout(CALL_BOUND, exchange)
            .await
            .map_err(|_| BusError::Busy {
                port: port.to_string(),
            })?
    }

    /// Enters `port`; requests arrive on the receiver until the [`Registration`] is dropped.
    pub(crate) fn register(&self, port: &str) -> (Registration, mpsc::Receiver<BusRequest>) {
        let (sender, receiver) = mpsc::channel(QUEUE);
        let previous = self.ports().insert(port.to_string(), sender.clone());
        if previous.is_some_and(|p| !p.is_closed()) {
            tracing::warn!(
                port,
                "a second engine registered for this port; requests go to the newer one"
            );
        }
        let registration = Registration {
            requests: self.clone(),
            port: port.to_string(),
            sender,
        };
        (registration, receiver)
    }
}

/// A port's entry in [`BusRequests`]; dropping it removes the entry (if it is still this
/// one's: a restarted port task may have replaced it already).
#[derive(Debug)]
pub(crate) struct Registration {
    requests: BusRequests,
    port: String,
    sender: mpsc::Sender<BusRequest>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut ports = self.requests.ports();
        if ports
            .get(&self.port)
            .is_some_and(|s| s.same_channel(&self.sender))
        {
            ports.remove(&self.port);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read() -> BusRequestKind {
        BusRequestKind::Read(Read::Coil { unit: 7, coil: 0 })
    }

    #[tokio::test]
    async fn a_port_is_reachable_while_registered_and_only_then() {
        let requests = BusRequests::default();
        let err = requests.call("rs485-1", read()).await.unwrap_err();
        assert_eq!(
            err,
            BusError::NotRunning {
                port: "rs485-1".into()
            }
        );
        assert!(err.to_string().contains("not running"), "{err}");

        let (registration, mut rx) = requests.clone().register("rs485-1");
        let served = tokio::spawn(async move {
            let request = rx.recv().await.unwrap();
            assert_eq!(request.kind, read());
            request.reply.send(Ok(BusReply::Coil(true))).unwrap();
            rx
        });
        assert_eq!(
            requests.call("rs485-1", read()).await,
            Ok(BusReply::Coil(true))
        );
        let rx = served.await.unwrap();

        // A newer registration of the same name survives the older one's removal.
        let (newer, _rx2) = requests.register("rs485-1");
        drop(registration);
        assert!(requests.is_running("rs485-1"));
        drop(newer);
        assert!(!requests.is_running("rs485-1"));
        drop(rx);
    }

    #[tokio::test]
    async fn a_request_dropped_by_the_port_is_a_lost_port() {
        let requests = BusRequests::default();
        let (_registration, mut rx) = requests.register("bus");
        tokio::spawn(async move { drop(rx.recv().await) });
        let err = requests.call("bus", read()).await.unwrap_err();
        assert!(matches!(err, BusError::PortLost { .. }), "{err}");
    }

    #[test]
    fn faults_become_errors_that_say_where_to_look() {
        let kind = BusRequestKind::Write(Write::Coil {
            unit: 7,
            coil: 3,
            on: true,
        });
        let e = BusError::from_fault("rs485-1", &kind, &Fault::Exception(2));
        assert_eq!(
            e.to_string(),
            "Modbus unit 7 on port `rs485-1` refused the write of coil 3 (on) with exception 0x02 (illegal data address): check the address and that the device allows it"
        );
        let e = BusError::from_fault("rs485-1", &kind, &Fault::Timeout);
        assert!(e
            .to_string()
            .contains("did not answer the write of coil 3 (on)"));
    }
}
