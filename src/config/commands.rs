//! `[commands]`: whether the gateway takes actuator commands from the platform (DESIGN §8), and
//! the JetStream stream and durable consumer it reads them from. Off unless enabled.

use serde::Deserialize;

use super::{Gateway, Ident};

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Commands {
    /// Off by default: a gateway drives nothing until its operator says so.
    #[serde(default)]
    pub enabled: bool,
    /// The stream holding `sahool.commands.>`.
    #[serde(default = "default_stream")]
    pub stream: Ident,
    /// Durable pull consumer name; `{gateway_id}` is replaced by `[gateway] id`.
    #[serde(default)]
    pub consumer: ConsumerTemplate,
    /// Create the consumer if missing; false: it must exist (least privilege).
    #[serde(default = "yes")]
    pub create_consumer: bool,
    /// Refuse `on` and `set` while the clock is unsynchronised (`off` is always allowed).
    #[serde(default = "yes")]
    pub require_clock_sync: bool,
}

impl Default for Commands {
    fn default() -> Self {
        Self {
            enabled: false,
            stream: default_stream(),
            consumer: ConsumerTemplate::default(),
            create_consumer: true,
            require_clock_sync: true,
        }
    }
}

impl Commands {
    /// The durable consumer's name for this gateway.
    pub fn consumer_name(&self, gateway: &Gateway) -> String {
        self.consumer.0.replace(GATEWAY_ID, gateway.id.as_str())
    }

    /// The subject the platform publishes this gateway's commands to; the consumer filters it.
    pub fn filter_subject(&self, gateway: &Gateway) -> String {
        format!(
            "sahool.commands.iot.actuator.{}.{}",
            gateway.tenant_id.as_str(),
            gateway.id.as_str()
        )
    }

    /// Problems of the section against the rest of the config. `actuators`: how many
    /// `[[fields.actuators]]` are declared.
    pub(super) fn check(
        &self,
        line: usize,
        actuators: usize,
        push: &mut impl FnMut(usize, String),
    ) {
        if self.enabled && actuators == 0 {
            push(line, "[commands] enabled = true, but no [[fields.actuators]] are declared, so every command would be rejected; declare the actuators commands may drive, or set enabled = false".into());
        }
    }
}

fn default_stream() -> Ident {
    Ident::try_from("SAHOOL_COMMANDS".to_string()).expect("a valid identifier")
}

fn yes() -> bool {
    true
}

const GATEWAY_ID: &str = "{gateway_id}";

/// A durable consumer name, `{gateway_id}` being the only placeholder. Checked while parsing:
/// once expanded it is a valid JetStream name (no spaces, `.`, `*`, `>`, `/` or `\`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct ConsumerTemplate(String);

impl Default for ConsumerTemplate {
    fn default() -> Self {
        Self(format!("gw-{GATEWAY_ID}"))
    }
}

impl TryFrom<String> for ConsumerTemplate {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        // A gateway id is an Ident: letters, digits and `-_:@`, all fine in a consumer name.
        let sample = s.replace(GATEWAY_ID, "gw");
        if sample.contains(['{', '}']) {
            return Err(format!(
                "consumer `{s}`: the only placeholder is {GATEWAY_ID}"
            ));
        }
        if sample.is_empty()
            || sample.len() > 200
            || sample
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || ".*>/\\".contains(c))
        {
            return Err(format!(
                "consumer `{s}` is not a JetStream consumer name: 1 to 200 characters without spaces, `.`, `*`, `>`, `/` or `\\`"
            ));
        }
        Ok(Self(s))
    }
}

#[cfg(test)]
mod tests {
    use crate::config::parse;
    use crate::config::test_support::{problems, MINIMAL};

    #[test]
    fn commands_are_off_by_default_with_the_designed_names() {
        let c = parse(MINIMAL).unwrap();
        assert!(!c.commands.enabled);
        assert_eq!(c.commands.stream.as_str(), "SAHOOL_COMMANDS");
        assert_eq!(c.commands.consumer_name(&c.gateway), "gw-gw-1");
        assert_eq!(
            c.commands.filter_subject(&c.gateway),
            "sahool.commands.iot.actuator.tenant-a.gw-1"
        );
        assert!(c.commands.create_consumer && c.commands.require_clock_sync);
    }

    #[test]
    fn a_consumer_template_is_expanded() {
        let c = parse(&format!(
            "{MINIMAL}\n[commands]\nconsumer = \"farm-{{gateway_id}}-cmd\"\ncreate_consumer = false\n"
        ))
        .unwrap();
        assert_eq!(c.commands.consumer_name(&c.gateway), "farm-gw-1-cmd");
        assert!(!c.commands.create_consumer);
    }

    #[test]
    fn bad_names_and_keys_are_refused_with_their_line() {
        let all = problems("\n[commands]\nconsumer = \"gw.{gateway_id}\"\n");
        assert!(
            all.contains("line 10") && all.contains("not a JetStream consumer name"),
            "{all}"
        );
        let all = problems("\n[commands]\nconsumer = \"gw-{tenant_id}\"\n");
        assert!(
            all.contains("the only placeholder is {gateway_id}"),
            "{all}"
        );
        let all = problems("\n[commands]\nstream = \"SAHOOL.COMMANDS\"\n");
        assert!(all.contains("contains `.`"), "{all}");
        let all = problems("\n[commands]\nenable = true\n");
        assert!(all.contains("unknown field `enable`"), "{all}");
    }

    #[test]
    fn enabled_without_actuators_is_refused() {
        let all = problems("\n[commands]\nenabled = true\n");
        assert!(
            all.contains("line 9") && all.contains("no [[fields.actuators]] are declared"),
            "{all}"
        );
    }
}
