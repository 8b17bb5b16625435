//! `[[mqtt_listener]]`: the gateway's own MQTT ingest endpoint, where devices publish straight
//! to the gateway. Its keys, their defaults, and the checks that keep a listener on the farm LAN
//! safe: authentication unless on loopback, TLS files that belong together, sane limits.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{ByteSize, DurationValue, Format, Ident, TopicFilter};

/// How a device proves who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ListenerAuth {
    /// User name and password, checked against the argon2 hashes in `password_file`.
    Password,
    /// A client certificate signed by `tls_client_ca_file` (TLS required).
    Certificate,
    /// Anyone who can connect. Only allowed on a loopback address.
    None,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttListener {
    /// Names the source in mappings, metrics and dead-letters; unique among all MQTT inputs.
    pub name: Ident,
    /// Socket address to listen on, e.g. `0.0.0.0:8883`.
    pub listen: SocketAddr,
    pub format: Format,
    /// Topic filters devices may publish to; other publishes are refused.
    pub topics: Vec<TopicFilter>,
    #[serde(default = "default_auth")]
    pub auth: ListenerAuth,
    /// `user:$argon2id$...` lines, as `sahool-gateway passwd` writes them.
    pub password_file: Option<PathBuf>,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// When set, every client must present a certificate signed by this CA.
    pub(crate) tls_client_ca_file: Option<PathBuf>,
    /// Connections open at once; more are refused.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// Largest packet accepted; a larger one closes the connection.
    #[serde(default = "default_max_packet_size")]
    pub(crate) max_packet_size: ByteSize,
    /// PUBLISHes per connection awaiting their commit (MQTT 5 Receive Maximum).
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: u16,
    /// Keep-alive bounds: MQTT 5 clients asking for less or more are told to use the bound;
    /// any client silent for 1.5 × its keep-alive (at most `keep_alive_max`) is dropped.
    #[serde(default = "default_keep_alive_min")]
    pub(crate) keep_alive_min: DurationValue,
    #[serde(default = "default_keep_alive_max")]
    pub(crate) keep_alive_max: DurationValue,
    /// How often sensors publishing here report, unless the sensor says otherwise.
    pub expected_interval: Option<DurationValue>,
    #[serde(skip)]
    pub line: usize,
}

fn default_auth() -> ListenerAuth {
    ListenerAuth::Password
}
fn default_max_connections() -> u32 {
    100
}
fn default_max_packet_size() -> ByteSize {
    ByteSize(64 << 10)
}
fn default_max_in_flight() -> u16 {
    32
}
fn default_keep_alive_min() -> DurationValue {
    DurationValue(Duration::from_secs(5))
}
fn default_keep_alive_max() -> DurationValue {
    DurationValue(Duration::from_secs(300))
}

/// MQTT's largest remaining length.
const MQTT_MAX_PACKET: u64 = 268_435_455;

impl MqttListener {
    pub fn tls(&self) -> bool {
        self.tls_cert_file.is_some()
    }

    /// Problems of this entry on its own.
    pub(super) fn check(&self, push: &mut impl FnMut(usize, String)) {
        let mut problem = |what: String| {
            push(
                self.line,
                format!("[[mqtt_listener]] `{}`: {what}", self.name),
            )
        };
        if self.topics.is_empty() {
            problem("topics: list at least one topic filter devices may publish to".into());
        }
        match self.auth {
            ListenerAuth::Password if self.password_file.is_none() => problem(
                "auth = \"password\" needs password_file (create it with `sahool-gateway passwd FILE USER`)".into(),
            ),
            ListenerAuth::Certificate if self.tls_client_ca_file.is_none() => problem(
                "auth = \"certificate\" needs tls_client_ca_file (with tls_cert_file and tls_key_file)".into(),
            ),
            ListenerAuth::None if !self.listen.ip().is_loopback() => problem(format!(
                "auth = \"none\" is only allowed on a loopback address, not {}; use auth = \"password\" or \"certificate\"",
                self.listen
            )),
            _ => {}
        }
        if self.password_file.is_some() && self.auth != ListenerAuth::Password {
            problem("password_file is only used with auth = \"password\"".into());
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            problem("tls_cert_file and tls_key_file go together".into());
        }
        if self.tls_client_ca_file.is_some() && !self.tls() {
            problem("tls_client_ca_file needs tls_cert_file and tls_key_file".into());
        }
        if self.max_connections == 0 {
            problem("max_connections must be at least 1".into());
        }
        if self.max_in_flight == 0 {
            problem("max_in_flight must be at least 1".into());
        }
        if !(1024..=MQTT_MAX_PACKET).contains(&self.max_packet_size.0) {
            problem(format!(
                "max_packet_size must be between 1KiB and {MQTT_MAX_PACKET} bytes (MQTT's limit)"
            ));
        }
        let (min, max) = (self.keep_alive_min.0, self.keep_alive_max.0);
        if min < Duration::from_secs(1)
            || max > Duration::from_secs(u64::from(u16::MAX))
            || min > max
        {
            problem(
                "keep_alive_min and keep_alive_max must satisfy 1s <= min <= max <= 65535s".into(),
            );
        }
    }
}

/// Checks across listeners and the rest of the config: one socket per address, and not the
/// HTTP endpoint's.
pub(super) fn check_addresses(
    listeners: &[MqttListener],
    http: SocketAddr,
    push: &mut impl FnMut(usize, String),
) {
    for (i, l) in listeners.iter().enumerate() {
        if l.listen == http {
            push(
                l.line,
                format!(
                    "[[mqtt_listener]] `{}`: listen {} is also [http] listen",
                    l.name, l.listen
                ),
            );
        }
        if let Some(first) = listeners[..i].iter().find(|o| o.listen == l.listen) {
            push(
                l.line,
                format!(
                    "[[mqtt_listener]] `{}`: listen {} is already used by `{}`",
                    l.name, l.listen, first.name
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::parse;

    use crate::config::test_support::{problems, MINIMAL as BASE};

    #[test]
    fn a_listener_with_defaults() {
        let c = parse(&format!(
            "{BASE}\n[[mqtt_listener]]\nname = \"lan\"\nlisten = \"0.0.0.0:1883\"\nformat = \"sahool\"\ntopics = [\"sahool/sensors/#\"]\npassword_file = \"/etc/sahool-gateway/mqtt-users\"\n\n[[fields]]\nid = \"f\"\n  [[fields.sensors]]\n  device_id = \"d\"\n  sensor_type = \"soil_moisture\"\n  source = \"lan\"\n  expected_interval = \"1m\"\n"
        ))
        .unwrap();
        let l = &c.mqtt_listener[0];
        assert_eq!(l.auth, super::ListenerAuth::Password);
        assert_eq!(l.max_packet_size.0, 64 << 10);
        assert_eq!((l.max_in_flight, l.max_connections), (32, 100));
        assert_eq!(l.line, 9);
    }

    #[test]
    fn unsafe_or_inconsistent_listeners_are_refused() {
        let all = problems(
            r#"
[[mqtt]]
name = "farm"
url = "mqtt://127.0.0.1:1883"
topics = ["x/#"]
format = "sahool"

[[mqtt_listener]]
name = "farm"
listen = "192.168.1.10:1883"
format = "sahool"
topics = []
auth = "none"
tls_client_ca_file = "/etc/ca.pem"
max_in_flight = 0
keep_alive_min = "10m"
keep_alive_max = "1m"

[[mqtt_listener]]
name = "certs"
listen = "127.0.0.1:9108"
format = "json"
topics = ["a/#"]
auth = "certificate"
tls_cert_file = "/etc/cert.pem"
max_packet_size = "512B"
colour = "blue"
"#,
        );
        for needle in [
            "name `farm` is already used",
            "only allowed on a loopback address",
            "list at least one topic filter",
            "tls_client_ca_file needs tls_cert_file",
            "max_in_flight must be at least 1",
            "keep_alive_min and keep_alive_max",
            "colour",
        ] {
            assert!(all.contains(needle), "missing `{needle}` in:\n{all}");
        }
        let all = problems(
            r#"
[[mqtt_listener]]
name = "certs"
listen = "127.0.0.1:9108"
format = "sahool"
topics = ["a/#"]
auth = "certificate"
tls_cert_file = "/etc/cert.pem"
max_packet_size = "512B"

[[mqtt_listener]]
name = "pw"
listen = "127.0.0.1:9108"
format = "sahool"
topics = ["a/#"]
"#,
        );
        for needle in [
            "auth = \"certificate\" needs tls_client_ca_file",
            "tls_cert_file and tls_key_file go together",
            "max_packet_size must be between",
            "is also [http] listen",
            "already used by `certs`",
            "needs password_file",
        ] {
            assert!(all.contains(needle), "missing `{needle}` in:\n{all}");
        }
    }
}
