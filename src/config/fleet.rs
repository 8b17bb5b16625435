//! `[fleet]`: what the platform sees of this gateway and how it steers it (DESIGN §9): the
//! heartbeat's interval, and remote config from a NATS KV bucket (off unless `config_bucket`
//! is set) with its probation.

use std::time::Duration;

use serde::Deserialize;

use super::{DurationValue, Gateway};

/// Heartbeats closer than this would mostly report the same state and crowd the outbox.
const MIN_STATUS_INTERVAL: Duration = Duration::from_secs(5);
/// A probation shorter than this cannot see a source fail to connect.
const MIN_PROBATION: Duration = Duration::from_secs(1);
const TENANT_ID: &str = "{tenant_id}";
const GATEWAY_ID: &str = "{gateway_id}";

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fleet {
    /// How often a heartbeat (`sahool.iot.gateway.status`) goes into the outbox.
    #[serde(default = "default_status_interval")]
    pub status_interval: DurationValue,
    /// The KV bucket holding this gateway's config under the key `{gateway_id}`; remote
    /// config is off without it.
    #[serde(default)]
    pub config_bucket: Option<BucketTemplate>,
    /// How long a remote revision must keep the gateway healthy before it is kept.
    #[serde(default = "default_probation")]
    pub probation: DurationValue,
}

impl Default for Fleet {
    fn default() -> Self {
        Self {
            status_interval: default_status_interval(),
            config_bucket: None,
            probation: default_probation(),
        }
    }
}

impl Fleet {
    /// Problems of the section with the gateway it belongs to; `line` is its header's.
    pub(super) fn check(
        &self,
        line: usize,
        gateway: Option<&Gateway>,
        push: &mut impl FnMut(usize, String),
    ) {
        if self.status_interval.0 < MIN_STATUS_INTERVAL {
            push(line, "[fleet] status_interval must be at least 5s".into());
        }
        if self.probation.0 < MIN_PROBATION {
            push(line, "[fleet] probation must be at least 1s".into());
        }
        if let (Some(_), Some(g)) = (&self.config_bucket, gateway) {
            // KV keys allow letters, digits and `-/_=.`; an id's `:` and `@` do not fit.
            if let Some(c) = g.id.as_str().chars().find(|c| matches!(c, ':' | '@')) {
                push(line, format!(
                    "[fleet] config_bucket: the gateway id `{}` is the KV key, which may not contain `{c}`",
                    g.id
                ));
            }
            if let Some(c) = g
                .tenant_id
                .as_str()
                .chars()
                .find(|c| matches!(c, ':' | '@'))
            {
                push(line, format!(
                    "[fleet] config_bucket: the tenant id `{}` may not be part of a bucket name (`{c}`)",
                    g.tenant_id
                ));
            }
        }
    }

    /// The bucket's name for this gateway, when remote config is on.
    pub fn bucket(&self, gateway: &Gateway) -> Option<String> {
        self.config_bucket.as_ref().map(|b| {
            b.0.replace(TENANT_ID, gateway.tenant_id.as_str())
                .replace(GATEWAY_ID, gateway.id.as_str())
        })
    }
}

/// A KV bucket name with `{tenant_id}` and `{gateway_id}` placeholders; checked while parsing
/// that, once expanded, it is a valid bucket name (letters, digits, `-` and `_`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct BucketTemplate(String);

impl TryFrom<String> for BucketTemplate {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let sample = s.replace(TENANT_ID, "t").replace(GATEWAY_ID, "g");
        if sample.contains(['{', '}']) {
            return Err(format!(
                "config_bucket `{s}`: the only placeholders are {TENANT_ID} and {GATEWAY_ID}"
            ));
        }
        if sample.is_empty()
            || sample.len() > 200
            || !sample
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
        {
            return Err(format!(
                "config_bucket `{s}` is not a KV bucket name: letters, digits, `-` and `_`"
            ));
        }
        Ok(Self(s))
    }
}

fn default_status_interval() -> DurationValue {
    DurationValue(Duration::from_secs(60))
}

fn default_probation() -> DurationValue {
    DurationValue(Duration::from_secs(120))
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{problems, MINIMAL};

    #[test]
    fn status_interval_defaults_to_a_minute_and_has_a_floor() {
        let c = super::super::parse(MINIMAL).unwrap();
        assert_eq!(c.fleet.status_interval.0.as_secs(), 60);
        let c = super::super::parse(&format!("{MINIMAL}\n[fleet]\nstatus_interval = \"5s\"\n"));
        assert_eq!(c.unwrap().fleet.status_interval.0.as_secs(), 5);
        assert_eq!(
            problems("\n[fleet]\nstatus_interval = \"2s\"\n"),
            "line 9: [fleet] status_interval must be at least 5s"
        );
        let unknown = problems("\n[fleet]\nconfig_buckets = \"x\"\n");
        assert!(
            unknown.starts_with("line 10") && unknown.contains("config_buckets"),
            "{unknown}"
        );
    }

    #[test]
    fn remote_config_is_off_by_default_and_its_bucket_is_expanded() {
        let c = super::super::parse(MINIMAL).unwrap();
        assert_eq!(c.fleet.bucket(&c.gateway), None);
        assert_eq!(c.fleet.probation.0.as_secs(), 120);
        let text = format!(
            "{MINIMAL}\n[fleet]\nconfig_bucket = \"sahool_gateway_config_{{tenant_id}}\"\nprobation = \"3s\"\n"
        );
        let c = super::super::parse(&text).unwrap();
        assert_eq!(
            c.fleet.bucket(&c.gateway).as_deref(),
            Some("sahool_gateway_config_tenant-a")
        );
        assert_eq!(c.fleet.probation.0.as_secs(), 3);
    }

    #[test]
    fn bad_buckets_and_probations_are_refused_with_their_line() {
        let p = problems("\n[fleet]\nconfig_bucket = \"cfg.{tenant_id}\"\n");
        assert!(
            p.starts_with("line 10") && p.contains("not a KV bucket name"),
            "{p}"
        );
        let p = problems("\n[fleet]\nconfig_bucket = \"cfg_{site}\"\n");
        assert!(p.contains("only placeholders"), "{p}");
        assert_eq!(
            problems("\n[fleet]\nprobation = \"500ms\"\n"),
            "line 9: [fleet] probation must be at least 1s"
        );
        let text = MINIMAL.replace("gw-1", "gw@1");
        let c = super::super::parse(&format!("{text}\n[fleet]\nconfig_bucket = \"c\"\n"));
        let p = c.unwrap_err();
        assert!(p[0].message.contains("KV key"), "{p:?}");
    }
}
