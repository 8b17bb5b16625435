//! Actuators on a Modbus RTU bus: an actuator id (from `[[fields.actuators]]`) becomes the bus
//! request that carries out a write or a read-back, sent to its port's task through
//! [`BusRequests`]. A switch is a coil (write 0x05, read back 0x01); a setpoint a holding
//! register (write 0x06, or 0x10 for a 32-bit type; read back 0x03), its value encoded and
//! decoded with the binding's type, scale and offset, high word first.

use std::collections::HashMap;

use futures_util::future::BoxFuture;

use super::Value;
use crate::config::{self, Config};
use crate::sources::serial::modbus::bus::{BusError, BusReply, BusRequestKind, BusRequests};
use crate::sources::serial::modbus::bus::{Read, Write};
use crate::sources::serial::modbus::decode::{decode_value, encode_value};
use crate::sources::serial::modbus::{ValueType, WordOrder};

/// What an actuator drives: a coil, or a holding register as `value = raw * scale + offset`.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Target {
    Coil(u16),
    Register {
        register: u16,
        value_type: ValueType,
        scale: f64,
        offset: f64,
    },
}

#[derive(Debug, Clone, PartialEq)]
struct Binding {
    port: String,
    unit: u8,
    target: Target,
}

impl Binding {
    fn of(m: &config::ModbusActuator) -> Option<Self> {
        let target = match (m.coil, m.register) {
            (Some(coil), _) => Target::Coil(coil),
            (None, Some(register)) => Target::Register {
                register,
                value_type: m.value_type(),
                scale: m.scale(),
                offset: m.offset(),
            },
            (None, None) => return None,
        };
        Some(Self {
            port: m.port.to_string(),
            unit: m.unit.0,
            target,
        })
    }
}

/// The Modbus-bound actuators of a config, and the ports' request registry.
#[derive(Debug, Clone)]
pub struct ModbusActuators {
    bus: BusRequests,
    bindings: HashMap<String, Binding>,
}

/// 32-bit setpoints are written and read high word first (`[fields.actuators.modbus]`).
const ORDER: WordOrder = WordOrder::Big;

impl ModbusActuators {
    /// The actuators of `config` with a `modbus` binding; build a new one after a reload.
    pub fn new(config: &Config, bus: BusRequests) -> Self {
        let bindings = config
            .fields
            .iter()
            .flat_map(|f| &f.actuators)
            .filter_map(|a| Some((a.id.to_string(), Binding::of(a.modbus.as_ref()?)?)))
            .collect();
        Self { bus, bindings }
    }

    /// After a reload: the new config's bindings, plus those of actuators it removed, which
    /// the core still switches off before it forgets them.
    pub(crate) fn keeping_removed(mut self, old: &Self) -> Self {
        for (id, binding) in &old.bindings {
            self.bindings
                .entry(id.clone())
                .or_insert_with(|| binding.clone());
        }
        self
    }

    /// True when `actuator_id` is driven here.
    pub fn drives(&self, actuator_id: &str) -> bool {
        self.bindings.contains_key(actuator_id)
    }

    /// Writes `value` (a switch's on/off, a setpoint's number) and waits for the slave's echo.
    pub async fn write(&self, actuator_id: &str, value: Value) -> Result<(), BusError> {
        let b = self.binding(actuator_id)?;
        let write = match (b.target, value) {
            (Target::Coil(coil), Value::Switch(on)) => Write::Coil {
                unit: b.unit,
                coil,
                on,
            },
            (
                Target::Register {
                    register,
                    value_type,
                    scale,
                    offset,
                },
                Value::Number(v),
            ) => {
                let raw = (v - offset) / scale;
                let words = encode_value(value_type, ORDER, raw).map_err(|e| BusError::Value {
                    actuator: actuator_id.to_string(),
                    detail: format!("{v} cannot be written: raw {e}"),
                })?;
                Write::Registers {
                    unit: b.unit,
                    register,
                    words,
                }
            }
            (target, value) => return Err(wrong_kind(actuator_id, target, value)),
        };
        let kind = BusRequestKind::Write(write);
        match self.bus.call(&b.port, kind.clone()).await? {
            BusReply::Written => Ok(()),
            _ => Err(unexpected(&b.port, &kind)),
        }
    }

    /// Reads the actuator's state back: the coil, or the register(s) decoded as configured.
    pub async fn read(&self, actuator_id: &str) -> Result<Value, BusError> {
        let b = self.binding(actuator_id)?;
        let (unit, port) = (b.unit, b.port.as_str());
        match b.target {
            Target::Coil(coil) => {
                let kind = BusRequestKind::Read(Read::Coil { unit, coil });
                match self.bus.call(port, kind.clone()).await? {
                    BusReply::Coil(on) => Ok(Value::Switch(on)),
                    _ => Err(unexpected(port, &kind)),
                }
            }
            Target::Register {
                register,
                value_type,
                scale,
                offset,
            } => {
                let count = value_type.registers();
                let kind = BusRequestKind::Read(Read::Registers {
                    unit,
                    register,
                    count,
                });
                let BusReply::Registers(words) = self.bus.call(port, kind.clone()).await? else {
                    return Err(unexpected(port, &kind));
                };
                let raw = decode_value(value_type, ORDER, &words).map_err(|e| BusError::Value {
                    actuator: actuator_id.to_string(),
                    detail: format!("the read-back of holding register {register}: {e}"),
                })?;
                Ok(Value::Number(raw * scale + offset))
            }
        }
    }

    fn binding(&self, actuator_id: &str) -> Result<&Binding, BusError> {
        self.bindings
            .get(actuator_id)
            .ok_or_else(|| BusError::NotModbus {
                actuator: actuator_id.to_string(),
            })
    }
}

fn wrong_kind(actuator_id: &str, target: Target, value: Value) -> BusError {
    let wants = match target {
        Target::Coil(_) => "a switch (coil) takes on or off",
        Target::Register { .. } => "a setpoint (holding register) takes a number",
    };
    BusError::Value {
        actuator: actuator_id.to_string(),
        detail: format!("{wants}, not {value:?}"),
    }
}

/// A reply of the wrong shape (the port task answered another kind of request).
fn unexpected(port: &str, kind: &BusRequestKind) -> BusError {
    BusError::Unexpected {
        port: port.to_string(),
        unit: kind.unit(),
        what: kind.describe(),
    }
}

impl super::driver::Devices for ModbusActuators {
    fn write(&self, actuator_id: &str, value: Value) -> BoxFuture<'static, Result<(), String>> {
        let (this, id) = (self.clone(), actuator_id.to_string());
        Box::pin(async move { this.write(&id, value).await.map_err(|e| e.to_string()) })
    }

    fn read(&self, actuator_id: &str) -> BoxFuture<'static, Result<Value, String>> {
        let (this, id) = (self.clone(), actuator_id.to_string());
        Box::pin(async move { this.read(&id).await.map_err(|e| e.to_string()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shared with `tests/serial_engines.rs`.
    const ACTUATORS: &str = include_str!("../../tests/fixtures/modbus/actuators.toml");

    fn actuators(bus: BusRequests) -> ModbusActuators {
        let text = format!("[gateway]\nid = \"gw-1\"\ntenant_id = \"t\"\n{ACTUATORS}");
        let config = crate::config::parse(&text).unwrap_or_else(|p| panic!("{p:?}"));
        ModbusActuators::new(&config, bus)
    }

    /// A port task that answers each request with `reply(request)` and records them.
    fn port(
        bus: &BusRequests,
        reply: fn(&BusRequestKind) -> BusReply,
    ) -> tokio::sync::mpsc::UnboundedReceiver<BusRequestKind> {
        let (registration, mut requests) = bus.register("rs485-1");
        let (seen, seen_rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let _registration = registration;
            while let Some(r) = requests.recv().await {
                let _ = r.reply.send(Ok(reply(&r.kind)));
                let _ = seen.send(r.kind);
            }
        });
        seen_rx
    }

    #[tokio::test]
    async fn writes_become_coil_and_register_requests() {
        let bus = BusRequests::default();
        let a = actuators(bus.clone());
        let mut seen = port(&bus, |_| BusReply::Written);
        a.write("pump-1", Value::Switch(true)).await.unwrap();
        a.write("dosing-1", Value::Number(12.34)).await.unwrap();
        a.write("pressure-1", Value::Number(-1.5)).await.unwrap();
        let expected = [
            Write::Coil {
                unit: 7,
                coil: 0,
                on: true,
            },
            Write::Registers {
                unit: 7,
                register: 10,
                words: vec![123],
            },
            // (-1.5 - 1.0) / 0.001 = -2500 = 0xFFFF_F63C, high word first.
            Write::Registers {
                unit: 8,
                register: 0,
                words: vec![0xFFFF, 0xF63C],
            },
        ];
        for write in expected {
            assert_eq!(seen.recv().await, Some(BusRequestKind::Write(write)));
        }
        let refused = a
            .write("dosing-1", Value::Number(7000.0))
            .await
            .unwrap_err();
        assert!(
            refused.to_string().contains("does not fit a U16"),
            "{refused}"
        );
        let refused = a.write("pump-1", Value::Number(1.0)).await.unwrap_err();
        assert!(refused.to_string().contains("takes on or off"), "{refused}");
        let unknown = a.write("valve-9", Value::Switch(true)).await.unwrap_err();
        assert_eq!(
            unknown,
            BusError::NotModbus {
                actuator: "valve-9".into()
            }
        );
    }

    #[tokio::test]
    async fn read_backs_are_decoded_with_type_scale_and_offset() {
        let bus = BusRequests::default();
        let a = actuators(bus.clone());
        let mut seen = port(&bus, |kind| match kind {
            BusRequestKind::Read(Read::Coil { .. }) => BusReply::Coil(true),
            BusRequestKind::Read(Read::Registers { count: 1, .. }) => {
                BusReply::Registers(vec![123])
            }
            _ => BusReply::Registers(vec![0xFFFF, 0xF63C]),
        });
        assert_eq!(a.read("pump-1").await, Ok(Value::Switch(true)));
        let Ok(Value::Number(dosing)) = a.read("dosing-1").await else {
            panic!("a number")
        };
        assert!((dosing - 12.3).abs() < 1e-9, "{dosing}");
        let Ok(Value::Number(pressure)) = a.read("pressure-1").await else {
            panic!("a number")
        };
        assert!((pressure + 1.5).abs() < 1e-9, "{pressure}");
        assert_eq!(
            seen.recv().await,
            Some(BusRequestKind::Read(Read::Coil { unit: 7, coil: 0 }))
        );
        assert_eq!(
            seen.recv().await,
            Some(BusRequestKind::Read(Read::Registers {
                unit: 7,
                register: 10,
                count: 1
            }))
        );
    }
}
