//! `[[mqtt]]`: the brokers the gateway subscribes to as a client, and the payload [`Format`] that
//! every MQTT input (client or listener) declares.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::address::{is_loopback_host, Schemes, ServerUrl};
use super::credentials::{check_server_name, weak_password, TlsFiles};
use super::{ByteSize, DurationValue, Gateway, Ident, Secret, TopicFilter};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// SAHOOL device convention: topic `sahool/sensors/{device}/{field}/{type}`.
    Sahool,
    /// Per-sensor bindings: topic filter + JSON pointers.
    Json,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSource {
    pub name: Ident,
    #[serde(deserialize_with = "mqtt_url")]
    pub url: ServerUrl,
    pub topics: Vec<TopicFilter>,
    pub format: Format,
    pub(crate) username: Option<String>,
    pub password: Option<Secret>,
    pub password_file: Option<PathBuf>,
    pub tls_ca_file: Option<PathBuf>,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// Name the broker's certificate must carry, when it differs from the host in `url`.
    pub tls_server_name: Option<String>,
    /// Defaults to `sahool-gw-{gateway.id}-{name}`: stable, so the broker keeps the session.
    pub client_id: Option<String>,
    /// MQTT 5 Receive Maximum: QoS 1 messages the broker may have in flight to us.
    #[serde(default = "default_receive_maximum")]
    pub(crate) receive_maximum: u16,
    #[serde(default = "default_keep_alive")]
    pub keep_alive: DurationValue,
    /// Larger payloads are dead-lettered (and refused by the client above 2× this).
    #[serde(default = "default_max_payload")]
    pub max_payload: ByteSize,
    /// How often sensors on this source report, unless the sensor says otherwise.
    pub expected_interval: Option<DurationValue>,
    /// Permit plaintext MQTT to a non-loopback broker (warned about at every start).
    #[serde(default)]
    pub allow_insecure: bool,
    #[serde(skip)]
    pub line: usize,
}

/// `[[mqtt]] url`: `mqtt://host[:port]` or `mqtts://host[:port]`.
const MQTT: Schemes = Schemes {
    plain: ("mqtt", 1883),
    tls: ("mqtts", 8883),
};

fn mqtt_url<'de, D: Deserializer<'de>>(d: D) -> Result<ServerUrl, D::Error> {
    String::deserialize(d).map(|text| ServerUrl::parse(text, &MQTT))
}

impl MqttSource {
    pub fn client_id(&self, gateway: &Gateway) -> String {
        self.client_id
            .clone()
            .unwrap_or_else(|| format!("sahool-gw-{}-{}", gateway.id, self.name))
    }

    /// The TLS settings, when the broker is reached over TLS.
    pub(crate) fn tls_files(&self) -> Option<TlsFiles<'_>> {
        self.url.tls.then_some(TlsFiles::new(
            &self.tls_ca_file,
            &self.tls_cert_file,
            &self.tls_key_file,
            &self.tls_server_name,
        ))
    }

    /// Problems of this entry on its own (its name's uniqueness is checked with the others').
    pub(super) fn check(&self, push: &mut impl FnMut(usize, String)) {
        // `what` goes on after the name with a space or a colon, as the messages always have.
        let mut problem = |what: String| push(self.line, format!("[[mqtt]] `{}`{what}", self.name));
        if let Some(e) = &self.url.problem {
            problem(format!(" url: {e}"));
        }
        if self.topics.is_empty() {
            problem(" topics: list at least one topic filter".into());
        }
        if let Some(why) = self
            .password
            .as_ref()
            .and_then(|p| weak_password(p.expose()))
        {
            problem(format!(" password is {why}; use a long random one"));
        }
        let url = &self.url;
        if url.problem.is_none() && !url.tls && !is_loopback_host(&url.host) && !self.allow_insecure
        {
            problem(format!(
                ": `{url}` is plaintext to a non-loopback broker; use mqtts:// (with tls_ca_file), keep the broker on loopback, or set allow_insecure = true"
            ));
        }
        if self.password.is_some() && self.password_file.is_some() {
            problem(": set password or password_file, not both".into());
        }
        let tls_keys = self.tls_ca_file.is_some()
            || self.tls_cert_file.is_some()
            || self.tls_key_file.is_some()
            || self.tls_server_name.is_some();
        if tls_keys && !url.tls {
            problem(": TLS settings need an mqtts:// url (TLS is chosen by the scheme)".into());
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            problem(": tls_cert_file and tls_key_file go together".into());
        }
        if let Some(why) = check_server_name(self.tls_server_name.as_deref()) {
            problem(format!(": {why}"));
        }
        if self.receive_maximum == 0 {
            problem(" receive_maximum must be at least 1".into());
        }
    }
}

fn default_receive_maximum() -> u16 {
    1024
}
fn default_keep_alive() -> DurationValue {
    DurationValue(Duration::from_secs(30))
}
fn default_max_payload() -> ByteSize {
    ByteSize(64 << 10)
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{all_problems, MINIMAL};
    use super::super::{parse, weak_password};
    use super::{ServerUrl, MQTT};

    #[test]
    fn urls_are_parsed_once_with_their_scheme_port() {
        let url = ServerUrl::parse("mqtts://[::1]".into(), &MQTT);
        assert_eq!((url.tls, url.host.as_str(), url.port), (true, "::1", 8883));
        let url = ServerUrl::parse("mqtt://broker:1884/".into(), &MQTT);
        assert_eq!(
            (url.tls, url.host.as_str(), url.port),
            (false, "broker", 1884)
        );
        let bad = ServerUrl::parse("mqtts://broker:x".into(), &MQTT);
        assert!(bad.tls, "TLS is the scheme's even when the rest is wrong");
        assert!(bad.problem.unwrap().contains("is not a port"));
        assert_eq!(
            ServerUrl::parse("mqtt://h".into(), &MQTT).to_string(),
            "mqtt://h"
        );
    }

    #[test]
    fn weak_passwords_and_plaintext_brokers_are_refused() {
        assert!(weak_password("changeme").is_some());
        assert!(weak_password("Password123").is_some());
        assert!(weak_password("short").is_some());
        assert!(weak_password("aaaaaaaaaaaaaaaa").is_some());
        assert!(weak_password("k3v-9Lq!tr8z-WmX").is_none());
        let text = format!(
            "{MINIMAL}\n{}",
            r##"
[[mqtt]]
name = "lan"
url = "mqtt://192.168.1.20:1883"
topics = ["#"]
format = "sahool"
username = "gw"
password = "mosquitto"
"##
        );
        let all = all_problems(&text);
        assert!(all.contains("known default"), "{all}");
        assert!(all.contains("non-loopback broker"), "{all}");
        assert!(
            !all.contains("mosquitto\""),
            "the secret is not echoed: {all}"
        );
        let ok = text.replace(
            "password = \"mosquitto\"",
            "password_file = \"/etc/x\"\nallow_insecure = true",
        );
        assert!(parse(&ok).is_ok());
    }

    #[test]
    fn mqtt_tls_is_chosen_by_the_scheme() {
        let source = |url: &str, extra: &str| {
            format!("{MINIMAL}\n[[mqtt]]\nname = \"lan\"\nurl = \"{url}\"\ntopics = [\"#\"]\nformat = \"sahool\"\n{extra}\n")
        };
        let c = parse(&source(
            "mqtts://broker.farm.example",
            "tls_ca_file = \"/etc/ca.pem\"",
        ))
        .unwrap();
        let url = &c.mqtt[0].url;
        assert_eq!(
            (url.tls, url.host.as_str(), url.port),
            (true, "broker.farm.example", 8883)
        );
        assert!(c.mqtt[0].tls_files().is_some());
        let text = all_problems(&source("mqtt://127.0.0.1", "tls_ca_file = \"/etc/ca.pem\""));
        assert!(text.contains("need an mqtts:// url"), "{text}");
        let text = all_problems(&source(
            "mqtts://10.0.0.2",
            "tls_cert_file = \"/etc/c.pem\"\ntls_server_name = \"not a name\"",
        ));
        assert!(
            text.contains("tls_cert_file and tls_key_file go together"),
            "{text}"
        );
        assert!(text.contains("`not a name` is not a DNS name"), "{text}");
        assert!(!text.contains("plaintext"), "{text}");
    }
}
