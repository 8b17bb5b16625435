//! Value types that check themselves while the config is parsed, so a bad value is reported
//! with its key and line by the TOML deserializer itself.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use crate::reading::SensorType;

/// An identifier: gateway, field, device, source names. Printable ASCII without spaces, so it is
/// safe in subjects, topics, metric labels and file names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(try_from = "String")]
pub struct Ident(String);

impl Ident {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Ident {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if s.is_empty() {
            return Err("must not be empty".into());
        }
        if s.len() > 128 {
            return Err(format!("`{s}` is longer than 128 characters"));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | ':' | '@')))
        {
            return Err(format!(
                "`{s}` contains `{c}`; use letters, digits, `-`, `_`, `:` or `@`"
            ));
        }
        Ok(Self(s))
    }
}

impl fmt::Display for Ident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A secret given inline in the config. Never printed: `Debug` shows a mask, and a value of
/// the wrong type is refused without quoting it (serde's own message would).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct SecretVisitor;
        fn not_a_string<E: de::Error>() -> E {
            E::custom("a secret must be a string (its value is not shown)")
        }
        impl<'de> Visitor<'de> for SecretVisitor {
            type Value = Secret;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Secret, E> {
                Ok(Secret(v.to_string()))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Secret, E> {
                Err(not_a_string())
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Secret, E> {
                Err(not_a_string())
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Secret, E> {
                Err(not_a_string())
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Secret, E> {
                Err(not_a_string())
            }
            fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<Secret, E> {
                Err(not_a_string())
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, _: A) -> Result<Secret, A::Error> {
                Err(not_a_string())
            }
            fn visit_map<A: de::MapAccess<'de>>(self, _: A) -> Result<Secret, A::Error> {
                Err(not_a_string())
            }
        }
        d.deserialize_str(SecretVisitor)
    }
}

impl Secret {
    pub fn new(s: String) -> Self {
        Self(s)
    }
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// A size: an integer of bytes or a string such as `"256MiB"`, `"64 KiB"`, `"1GB"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: f64 = num
            .parse()
            .map_err(|_| format!("`{text}` is not a size; write e.g. \"256MiB\" or \"64KiB\""))?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1_000,
            "kib" => 1 << 10,
            "m" | "mb" => 1_000_000,
            "mib" => 1 << 20,
            "g" | "gb" => 1_000_000_000,
            "gib" => 1 << 30,
            "t" | "tb" => 1_000_000_000_000,
            "tib" => 1 << 40,
            other => {
                return Err(format!(
                    "unknown size unit `{other}` in `{text}`; use B, KiB, MiB, GiB, KB, MB or GB"
                ))
            }
        };
        let bytes = n * mult as f64;
        if !bytes.is_finite() || bytes >= u64::MAX as f64 {
            return Err(format!("`{text}` is too large"));
        }
        Ok(Self(bytes.round() as u64))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size such as \"256MiB\" or a number of bytes")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                ByteSize::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// A duration: a string such as `"30d"`, `"5s"`, `"250ms"`, `"1h 30m"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(try_from = "String")]
pub struct DurationValue(pub Duration);

impl TryFrom<String> for DurationValue {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        humantime::parse_duration(s.trim()).map(Self).map_err(|e| {
            format!("`{s}` is not a duration ({e}); write e.g. \"30d\", \"5s\", \"250ms\"")
        })
    }
}

/// A sensor type name: canonical SAHOOL names only in config, so a typo is not silently aliased.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct SensorTypeName(pub SensorType);

impl TryFrom<String> for SensorTypeName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        SensorType::ALL
            .iter()
            .find(|t| t.as_str() == s)
            .map(|t| Self(*t))
            .ok_or_else(|| {
                let names: Vec<_> = SensorType::ALL.iter().map(|t| t.as_str()).collect();
                format!(
                    "unknown sensor type `{s}`; expected one of {}",
                    names.join(", ")
                )
            })
    }
}

/// An RFC 6901 JSON pointer (`/object/water_SOIL`, `/rxInfo/0/rssi`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct JsonPointer(String);

impl JsonPointer {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for JsonPointer {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if !s.starts_with('/') {
            return Err(format!(
                "`{s}` is not a JSON pointer; it must start with `/`, e.g. \"/{s}\""
            ));
        }
        Ok(Self(s))
    }
}

/// An MQTT topic filter (`sahool/sensors/#`, `zigbee2mqtt/+`), checked against MQTT's rules.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct TopicFilter(String);

impl TopicFilter {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// MQTT matching: `+` one level, `#` the rest (including none).
    pub fn matches(&self, topic: &str) -> bool {
        let mut filter = self.0.split('/');
        let mut levels = topic.split('/');
        loop {
            match (filter.next(), levels.next()) {
                (Some("#"), _) => return true,
                (Some("+"), Some(_)) => {}
                (Some(f), Some(l)) if f == l => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }
}

impl TryFrom<String> for TopicFilter {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if s.is_empty() || s.len() > 65_535 {
            return Err("a topic filter must not be empty".into());
        }
        let levels: Vec<&str> = s.split('/').collect();
        for (i, level) in levels.iter().enumerate() {
            let wild = level.contains('#') || level.contains('+');
            let ok = match *level {
                "#" => i == levels.len() - 1,
                "+" => true,
                _ => !wild,
            };
            if !ok {
                return Err(format!(
                    "`{s}` is not a valid MQTT topic filter: `+` and `#` must fill a whole level, `#` only the last"
                ));
            }
        }
        Ok(Self(s))
    }
}

/// A fixed UTC offset such as `"+03:00"`, for devices that send local time without an offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct UtcOffsetValue(pub time::UtcOffset);

impl TryFrom<String> for UtcOffsetValue {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let format =
            time::macros::format_description!("[offset_hour sign:mandatory]:[offset_minute]");
        if s == "Z" {
            return Ok(Self(time::UtcOffset::UTC));
        }
        time::UtcOffset::parse(&s, &format)
            .map(Self)
            .map_err(|_| format!("`{s}` is not a UTC offset; write e.g. \"+03:00\" or \"-05:30\""))
    }
}

/// A NATS subject with placeholders, e.g. `sahool.tenant.{tenant_id}.iot.sensor.reading`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct SubjectTemplate(String);

pub(super) const SUBJECT_PLACEHOLDERS: [&str; 6] = [
    "tenant_id",
    "field_id",
    "gateway_id",
    "device_id",
    "sensor_type",
    "status",
];

impl SubjectTemplate {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Replaces `{name}` with `lookup(name)`; names were checked when the template was parsed.
    pub fn render(&self, lookup: impl Fn(&str) -> String) -> String {
        let mut out = String::with_capacity(self.0.len() + 16);
        let mut rest = self.0.as_str();
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            let close = rest[open..].find('}').map_or(rest.len(), |c| open + c);
            out.push_str(&lookup(&rest[open + 1..close]));
            rest = rest.get(close + 1..).unwrap_or("");
        }
        out.push_str(rest);
        out
    }
}

impl Default for SubjectTemplate {
    fn default() -> Self {
        Self("sahool.iot.sensor.reading".into())
    }
}

impl SubjectTemplate {
    /// Default for liveness events: `sahool.iot.sensor.connected` / `.disconnected` / `.warning`.
    pub fn default_status() -> Self {
        Self("sahool.iot.sensor.{status}".into())
    }
}

impl TryFrom<String> for SubjectTemplate {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let mut rest = s.as_str();
        while let Some(open) = rest.find('{') {
            let Some(close) = rest[open..].find('}').map(|c| open + c) else {
                return Err(format!("`{s}` has an unclosed `{{`"));
            };
            let name = &rest[open + 1..close];
            if !SUBJECT_PLACEHOLDERS.contains(&name) {
                return Err(format!(
                    "unknown placeholder `{{{name}}}` in subject `{s}`; use {}",
                    SUBJECT_PLACEHOLDERS.map(|p| format!("{{{p}}}")).join(", ")
                ));
            }
            rest = &rest[close + 1..];
        }
        let sample = Self(s.clone()).render(|_| "x".into());
        let bad_token = sample.split('.').any(|t| t.is_empty());
        if bad_token
            || sample
                .chars()
                .any(|c| c.is_whitespace() || c == '*' || c == '>' || c == '}')
        {
            return Err(format!(
                "`{s}` is not a valid NATS subject for publishing: dot-separated tokens, no spaces or wildcards"
            ));
        }
        Ok(Self(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(ByteSize::parse("256MiB").unwrap().0, 256 << 20);
        assert_eq!(ByteSize::parse("64 KiB").unwrap().0, 64 << 10);
        assert_eq!(ByteSize::parse("1.5GB").unwrap().0, 1_500_000_000);
        assert!(ByteSize::parse("lots").is_err());
        assert!(ByteSize::parse("10 parsecs").is_err());
    }

    #[test]
    fn topic_filters() {
        let f = TopicFilter::try_from("sahool/sensors/#".to_string()).unwrap();
        assert!(f.matches("sahool/sensors/a/b/c"));
        assert!(f.matches("sahool/sensors"));
        assert!(!f.matches("sahool/other"));
        let f = TopicFilter::try_from("zigbee2mqtt/+".to_string()).unwrap();
        assert!(f.matches("zigbee2mqtt/th-1"));
        assert!(!f.matches("zigbee2mqtt/th-1/set"));
        assert!(TopicFilter::try_from("a/#/b".to_string()).is_err());
        assert!(TopicFilter::try_from("a/b+".to_string()).is_err());
    }

    #[test]
    fn subjects() {
        let t =
            SubjectTemplate::try_from("sahool.tenant.{tenant_id}.iot.sensor.reading".to_string())
                .unwrap();
        assert_eq!(
            t.render(|k| if k == "tenant_id" {
                "t1".into()
            } else {
                "?".into()
            }),
            "sahool.tenant.t1.iot.sensor.reading"
        );
        assert!(SubjectTemplate::try_from("a.{nope}".to_string()).is_err());
        assert!(SubjectTemplate::try_from("a..b".to_string()).is_err());
        assert!(SubjectTemplate::try_from("a.>".to_string()).is_err());
    }

    #[test]
    fn idents_and_offsets() {
        assert!(Ident::try_from("gw-farm-001".to_string()).is_ok());
        assert!(Ident::try_from("has space".to_string()).is_err());
        assert!(Ident::try_from(String::new()).is_err());
        assert_eq!(
            UtcOffsetValue::try_from("+03:00".to_string()).unwrap().0,
            time::UtcOffset::from_hms(3, 0, 0).unwrap()
        );
        assert!(UtcOffsetValue::try_from("3h".to_string()).is_err());
    }
}
