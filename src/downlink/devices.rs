//! The devices the driver writes through: each actuator to its binding, a Modbus coil or
//! register ([`ModbusActuators`]) or an MQTT topic ([`MqttActuators`]).

use futures_util::future::BoxFuture;

use super::driver::Devices;
use super::modbus::ModbusActuators;
use super::mqtt::MqttActuators;
use super::Value;
use crate::config::Config;
use crate::sources::serial::modbus::BusRequests;

#[derive(Clone)]
pub(crate) struct Router {
    modbus: ModbusActuators,
    mqtt: MqttActuators,
}

impl Router {
    /// The actuators of `config`; `previous` (after a reload) lends its MQTT clients where the
    /// source did not change, and its bindings of removed actuators, which the core still
    /// switches off before it forgets them.
    pub(crate) fn new(config: &Config, bus: BusRequests, previous: Option<&Self>) -> Self {
        let modbus = ModbusActuators::new(config, bus);
        let mqtt = MqttActuators::new(config, previous.map(|p| &p.mqtt));
        let Some(old) = previous else {
            return Self { modbus, mqtt };
        };
        // An actuator moved from MQTT to Modbus is driven on its new bus only (the router asks
        // MQTT first, so a move the other way needs no such care).
        let mqtt = mqtt.keeping_removed(&old.mqtt, |id| modbus.drives(id));
        Self {
            modbus: modbus.keeping_removed(&old.modbus),
            mqtt,
        }
    }
}

impl Devices for Router {
    fn write(&self, actuator_id: &str, value: Value) -> BoxFuture<'static, Result<(), String>> {
        let id = actuator_id.to_string();
        if self.mqtt.drives(actuator_id) {
            let mqtt = self.mqtt.clone();
            return Box::pin(
                async move { mqtt.write(&id, value).await.map_err(|e| e.to_string()) },
            );
        }
        // Modbus also answers for ids bound nowhere, with its "not a Modbus actuator" error.
        let modbus = self.modbus.clone();
        Box::pin(async move { modbus.write(&id, value).await.map_err(|e| e.to_string()) })
    }

    fn read(&self, actuator_id: &str) -> BoxFuture<'static, Result<Value, String>> {
        let id = actuator_id.to_string();
        if self.mqtt.drives(actuator_id) {
            let mqtt = self.mqtt.clone();
            return Box::pin(async move { mqtt.read(&id).await.map_err(|e| e.to_string()) });
        }
        let modbus = self.modbus.clone();
        Box::pin(async move { modbus.read(&id).await.map_err(|e| e.to_string()) })
    }
}
