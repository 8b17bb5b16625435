//! `[[mqtt]]`: the brokers the gateway subscribes to as a client, and the payload [`Format`] that
//! every MQTT input (client or listener) declares. The broker URL is parsed once, here.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::address::{is_loopback_host, parse_host_port};
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
    pub url: MqttUrl,
    pub topics: Vec<TopicFilter>,
    pub format: Format,
    pub username: Option<String>,
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
    pub receive_maximum: u16,
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

/// `[[mqtt]] url`: `mqtt://host[:port]` or `mqtts://host[:port]` (default ports 1883, 8883).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(from = "String")]
pub struct MqttUrl {
    /// TLS is chosen by the `mqtts://` scheme.
    pub tls: bool,
    pub host: String,
    pub port: u16,
    text: String,
    /// Why `text` is not a broker URL. Kept for the entry's check rather than failing the entry,
    /// so the entry's other problems are reported too, all at its line.
    problem: Option<String>,
}

impl From<String> for MqttUrl {
    fn from(text: String) -> Self {
        let tls = text.starts_with("mqtts://");
        let default_port = if tls { 8883 } else { 1883 };
        let (host, port, problem) = match parse_host_port(&text, &["mqtt", "mqtts"], default_port) {
            Ok((host, port)) => (host, port, None),
            Err(e) => (String::new(), 0, Some(e)),
        };
        Self {
            tls,
            host,
            port,
            text,
            problem,
        }
    }
}

impl fmt::Display for MqttUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl MqttSource {
    pub fn client_id(&self, gateway: &Gateway) -> String {
        self.client_id
            .clone()
            .unwrap_or_else(|| format!("sahool-gw-{}-{}", gateway.id, self.name))
    }

    /// The TLS settings, when the broker is reached over TLS.
    pub fn tls_files(&self) -> Option<TlsFiles<'_>> {
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
