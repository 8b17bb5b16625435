//! A device's state message as a value: the payload itself, or the JSON value at
//! `state_pointer`. Devices say "on" in many ways (`true`, `1`, `"ON"`, their own payload), so
//! a switch accepts each of them; anything else is no state, never a guess.

use serde_json::Value as Json;

/// The state of a switch: `payload_on` / `payload_off` (the whole payload, or the value at the
/// pointer), `true`/`false`, `1`/`0`, `"ON"`/`"OFF"` (any case).
pub(super) fn switch_state(
    payload: &[u8],
    pointer: Option<&str>,
    on: &str,
    off: &str,
) -> Option<bool> {
    let token = match pointer {
        Some(p) => token(serde_json::from_slice::<Json>(payload).ok()?.pointer(p)?)?,
        None => {
            let text = std::str::from_utf8(payload).ok()?.trim();
            // The payload as the device was told it, before reading it as JSON.
            if !on.is_empty() && text == on.trim() {
                return Some(true);
            }
            if !off.is_empty() && text == off.trim() {
                return Some(false);
            }
            match serde_json::from_str::<Json>(text) {
                Ok(json) => token(&json)?,
                Err(_) => text.to_string(),
            }
        }
    };
    match token.as_str() {
        t if !on.is_empty() && t == on => Some(true),
        t if !off.is_empty() && t == off => Some(false),
        t if ["on", "true", "1"]
            .iter()
            .any(|w| t.eq_ignore_ascii_case(w)) =>
        {
            Some(true)
        }
        t if ["off", "false", "0"]
            .iter()
            .any(|w| t.eq_ignore_ascii_case(w)) =>
        {
            Some(false)
        }
        _ => None,
    }
}

/// The state of a setpoint: a JSON number, or a string holding one.
pub(super) fn number_state(payload: &[u8], pointer: Option<&str>) -> Option<f64> {
    let text = std::str::from_utf8(payload).ok()?.trim();
    let json = match pointer {
        Some(p) => serde_json::from_str::<Json>(text).ok()?.pointer(p)?.clone(),
        None => match serde_json::from_str::<Json>(text) {
            Ok(json) => json,
            Err(_) => Json::String(text.to_string()),
        },
    };
    let n = match json {
        Json::Number(n) => n.as_f64()?,
        Json::String(s) => s.trim().parse::<f64>().ok()?,
        _ => return None,
    };
    n.is_finite().then_some(n)
}

/// A scalar JSON value as the text a switch's words are compared with.
fn token(json: &Json) -> Option<String> {
    match json {
        Json::Bool(b) => Some(b.to_string()),
        Json::Number(n) => Some(n.to_string()),
        Json::String(s) => Some(s.trim().to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn switch(payload: &str, pointer: Option<&str>) -> Option<bool> {
        switch_state(payload.as_bytes(), pointer, "OPEN", "CLOSE")
    }

    #[test]
    fn a_switch_reads_its_payloads_and_the_common_words() {
        for on in [
            "OPEN", " OPEN\n", "true", "1", "ON", "on", "\"ON\"", "\"OPEN\"",
        ] {
            assert_eq!(switch(on, None), Some(true), "{on:?}");
        }
        for off in ["CLOSE", "false", "0", "OFF", "off", "\"off\""] {
            assert_eq!(switch(off, None), Some(false), "{off:?}");
        }
        for neither in [
            "",
            "2",
            "maybe",
            "{\"state\":\"ON\"}",
            "[1]",
            "null",
            "\u{fffd}",
        ] {
            assert_eq!(switch(neither, None), None, "{neither:?}");
        }
        assert_eq!(switch_state(&[0xff, 0xfe], None, "1", "0"), None);
    }

    #[test]
    fn a_switch_reads_the_value_at_its_pointer() {
        let at = Some("/state");
        assert_eq!(switch(r#"{"state":"ON","rssi":-60}"#, at), Some(true));
        assert_eq!(switch(r#"{"state":"CLOSE"}"#, at), Some(false));
        assert_eq!(switch(r#"{"state":false}"#, at), Some(false));
        assert_eq!(switch(r#"{"state":1}"#, at), Some(true));
        assert_eq!(
            switch(r#"{"relay":{"on":true}}"#, Some("/relay/on")),
            Some(true)
        );
        assert_eq!(switch(r#"{"other":"ON"}"#, at), None);
        assert_eq!(switch(r#"{"state":{"v":1}}"#, at), None);
        assert_eq!(switch("ON", at), None, "not JSON, with a pointer");
    }

    #[test]
    fn a_setpoint_reads_a_number() {
        assert_eq!(number_state(b"12.5", None), Some(12.5));
        assert_eq!(number_state(b" 7 \n", None), Some(7.0));
        assert_eq!(number_state(b"\"3.25\"", None), Some(3.25));
        assert_eq!(
            number_state(br#"{"rate":{"set":42}}"#, Some("/rate/set")),
            Some(42.0)
        );
        assert_eq!(
            number_state(br#"{"rate":"1e2"}"#, Some("/rate")),
            Some(100.0)
        );
        for bad in ["", "ON", "true", "NaN", "inf", "[1]", "{\"rate\":1}"] {
            assert_eq!(number_state(bad.as_bytes(), None), None, "{bad:?}");
        }
        assert_eq!(number_state(br#"{"rate":null}"#, Some("/rate")), None);
    }
}
