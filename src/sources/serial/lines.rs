//! The `lines` protocol: ASCII talkers (Arduino-style) that print one reading set per line.
//!
//! Sans-IO core, tested without a port: [`LineBuffer`] cuts bytes into lines of at most
//! `max_line` bytes; [`parse_line`] reads one line in its port's [`LineSpec`] form; [`map_line`]
//! is both through the mapping, as `mappings test --serial-line` shows it. [`run`] is the I/O.
//!
//! Framing: a line ends at `\n`; a `\r` before it is dropped. A line longer than `max_line` is
//! dead-lettered (`oversized`) with its first `max_line` bytes, and the rest up to the next
//! `\n` is dropped. After the port opens, bytes up to the first `\n` are dropped when they
//! arrive at once ([`SETTLE`]): that line began before the port was open.
//!
//! Forms (`line_format`):
//! - `kv`: `key=value` pairs separated by `separator`, by default commas and/or whitespace:
//!   `soil_t=21.5,vwc=31.2` or `soil_t=21.5 vwc=31.2`.
//! - `csv`: values in the order of `columns`, separated by `separator` (default `,`); a line
//!   equal to the column names (a header) is skipped; an empty value means "not measured".
//! - `json`: one JSON object per line; numbers, or strings holding numbers.
//!
//! In every form the gateway itself reads `device` (or `device_id`): the device of the line's
//! values, default the port's `device_id`; `ts` (or `timestamp`): the observation time, RFC 3339
//! or epoch seconds / milliseconds; `battery`: percent. Every other key is a value: a sensor
//! binds it with `line = { port, key }`; keys no sensor binds are skipped.

use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::AsyncReadExt;
use tokio_serial::SerialStream;

use super::{stop_requested, Batch, PortContext, PortFault};
use crate::config::serial::LineFormat;
use crate::config::SerialSource;
use crate::ingest::mapping::{
    parse_device_time, Mapped, Mapper, RawValue, Reason, Rejection, SerialKey, SerialValue,
};
use crate::reading::Timestamp;

/// Bytes that arrive this soon after the port opened may continue a line begun before.
pub const SETTLE: Duration = Duration::from_millis(100);

/// How a port's lines are written.
#[derive(Debug, Clone, PartialEq)]
pub struct LineSpec {
    pub format: LineFormat,
    /// CSV column names.
    pub columns: Vec<String>,
    /// `None`: kv pairs split at commas and whitespace, CSV at commas. `' '`: any whitespace.
    pub(crate) separator: Option<char>,
    pub max_line: usize,
    /// Device of lines that name none.
    pub device_id: Option<String>,
}

impl LineSpec {
    pub fn of(port: &SerialSource) -> Self {
        Self {
            format: port.line_format.unwrap_or(LineFormat::Kv),
            columns: port.columns.clone().unwrap_or_default(),
            separator: port.separator.map(|s| s.0),
            max_line: port.max_line(),
            device_id: port.device_id.as_ref().map(|d| d.to_string()),
        }
    }
}

/// A unit [`LineBuffer`] cut from the byte stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Framed {
    /// A line without its terminator (possibly empty).
    Line(Vec<u8>),
    /// The first `max_line` bytes of a longer line; its rest is dropped.
    Overlong(Vec<u8>),
}

/// Cuts a byte stream into lines, holding at most `max_line + 1` bytes.
#[derive(Debug)]
pub struct LineBuffer {
    buf: Vec<u8>,
    max: usize,
    /// Dropping bytes until the next line end.
    skipping: bool,
}

impl LineBuffer {
    pub fn new(max_line: usize) -> Self {
        Self {
            buf: Vec::with_capacity(max_line.min(4096) + 1),
            max: max_line,
            skipping: false,
        }
    }

    /// Drops what is held and what comes up to the next line end.
    pub(crate) fn skip_to_next_line(&mut self) {
        self.buf.clear();
        self.skipping = true;
    }

    /// Appends bytes; complete lines (and overlong heads) go to `out`.
    pub fn push(&mut self, mut bytes: &[u8], out: &mut Vec<Framed>) {
        while !bytes.is_empty() {
            let (part, ended) = match bytes.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    let part = &bytes[..i];
                    bytes = &bytes[i + 1..];
                    (part, true)
                }
                None => (std::mem::take(&mut bytes), false),
            };
            if !self.skipping {
                // One byte over `max` may be the `\r` of a `\r\n`.
                let room = (self.max + 1).saturating_sub(self.buf.len());
                if part.len() > room {
                    self.buf.extend_from_slice(&part[..room]);
                    self.buf.truncate(self.max);
                    out.push(Framed::Overlong(std::mem::take(&mut self.buf)));
                    self.skipping = true;
                } else {
                    self.buf.extend_from_slice(part);
                }
            }
            if ended {
                if self.skipping {
                    self.skipping = false;
                    self.buf.clear();
                    continue;
                }
                let mut line = std::mem::take(&mut self.buf);
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                if line.len() > self.max {
                    line.truncate(self.max);
                    out.push(Framed::Overlong(line));
                } else {
                    out.push(Framed::Line(line));
                }
            }
        }
    }
}

/// What one line says: its device, time and battery, and its values by key.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedLine {
    pub device: Option<String>,
    pub at: Option<Timestamp>,
    pub battery: Option<f64>,
    pub values: Vec<(String, RawValue)>,
}

impl ParsedLine {
    /// The line's values for the mapping; the port's `device_id` stands in for a missing device.
    pub(crate) fn serial_values(self, spec: &LineSpec) -> Vec<SerialValue> {
        let device = self.device.or_else(|| spec.device_id.clone());
        self.values
            .into_iter()
            .map(|(key, value)| SerialValue {
                key: SerialKey::Line(key),
                device: device.clone(),
                value,
                at: self.at,
                battery: self.battery,
                rssi: None,
            })
            .collect()
    }
}

fn malformed(detail: impl Into<String>) -> Rejection {
    Rejection::new(Reason::Malformed, detail)
}

/// Reads one line (without its terminator). `Ok(None)`: nothing to read (blank, or a CSV
/// header). A line that cannot be read is rejected whole, with the reason.
pub fn parse_line(spec: &LineSpec, line: &[u8]) -> Result<Option<ParsedLine>, Rejection> {
    let text = std::str::from_utf8(line).map_err(|e| {
        malformed(format!(
            "not UTF-8 text (byte {:#04x} at {})",
            line[e.valid_up_to()],
            e.valid_up_to()
        ))
    })?;
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    if let Some(c) = text.chars().find(|c| c.is_control() && *c != '\t') {
        return Err(malformed(format!(
            "holds the control character {:?}: line noise or binary data",
            c
        )));
    }
    let pairs: Vec<(String, Value)> = match spec.format {
        LineFormat::Kv => kv_pairs(spec, text)?,
        LineFormat::Csv => match csv_pairs(spec, text)? {
            Some(pairs) => pairs,
            None => return Ok(None),
        },
        LineFormat::Json => json_pairs(text)?,
    };
    let mut parsed = ParsedLine {
        device: None,
        at: None,
        battery: None,
        values: Vec::with_capacity(pairs.len()),
    };
    for (key, value) in pairs {
        match key.as_str() {
            "device" | "device_id" => {
                parsed.device = Some(match value {
                    Value::String(s) => s,
                    other => other.to_string(),
                })
            }
            "ts" | "timestamp" => {
                parsed.at = Some(parse_device_time(&value).ok_or_else(|| {
                    Rejection::new(
                        Reason::BadTimestamp,
                        format!("cannot read timestamp {value}"),
                    )
                })?)
            }
            "battery" => {
                let battery = match &value {
                    Value::Number(n) => n.as_f64(),
                    Value::String(s) => s.trim().parse().ok(),
                    _ => None,
                };
                parsed.battery = Some(
                    battery.ok_or_else(|| malformed(format!("battery {value} is not a number")))?,
                );
            }
            _ => {
                let raw = match value {
                    Value::Number(n) => n
                        .as_f64()
                        .map_or_else(|| RawValue::Text(n.to_string()), RawValue::Number),
                    Value::String(s) => RawValue::Text(s),
                    other => RawValue::Text(other.to_string()),
                };
                parsed.values.push((key, raw));
            }
        }
    }
    Ok(Some(parsed))
}

/// Splits at the separator, trimming each part: `' '` is any whitespace, `None` a comma or any
/// whitespace (kv's default).
fn split(text: &str, separator: Option<char>) -> impl Iterator<Item = &str> {
    text.split(move |c: char| match separator {
        Some(' ') => c.is_whitespace(),
        Some(sep) => c == sep,
        None => c == ',' || c.is_whitespace(),
    })
    .map(str::trim)
}

fn kv_pairs(spec: &LineSpec, text: &str) -> Result<Vec<(String, Value)>, Rejection> {
    let mut pairs: Vec<(String, Value)> = Vec::new();
    for pair in split(text, spec.separator).filter(|p| !p.is_empty()) {
        let Some((key, value)) = pair.split_once('=') else {
            return Err(malformed(format!("`{pair}` is not key=value")));
        };
        let (key, value) = (key.trim(), value.trim());
        if key.is_empty() || value.is_empty() {
            return Err(malformed(format!("`{pair}` has an empty key or value")));
        }
        if pairs.iter().any(|(k, _)| k == key) {
            return Err(malformed(format!("key `{key}` appears twice")));
        }
        pairs.push((key.to_string(), Value::String(value.to_string())));
    }
    Ok(pairs)
}

fn csv_pairs(spec: &LineSpec, text: &str) -> Result<Option<Vec<(String, Value)>>, Rejection> {
    // The default delimiter is a comma alone: CSV values may hold spaces.
    let fields: Vec<&str> = split(text, Some(spec.separator.unwrap_or(',')))
        .map(|f| {
            f.strip_prefix('"')
                .and_then(|f| f.strip_suffix('"'))
                .unwrap_or(f)
        })
        .collect();
    if fields.len() == spec.columns.len() && fields.iter().zip(&spec.columns).all(|(f, c)| f == c) {
        return Ok(None);
    }
    if fields.len() != spec.columns.len() {
        return Err(malformed(format!(
            "{} values, but the port has {} columns ({})",
            fields.len(),
            spec.columns.len(),
            spec.columns.join(",")
        )));
    }
    Ok(Some(
        spec.columns
            .iter()
            .zip(fields)
            .filter(|(_, f)| !f.is_empty())
            .map(|(c, f)| (c.clone(), Value::String(f.to_string())))
            .collect(),
    ))
}

fn json_pairs(text: &str) -> Result<Vec<(String, Value)>, Rejection> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => Ok(map.into_iter().collect()),
        Ok(_) => Err(malformed("not a JSON object")),
        Err(e) => Err(malformed(format!("not JSON: {e}"))),
    }
}

/// What the gateway makes of one line on a `lines` port (empty for a blank or header line).
pub fn map_line(
    mapper: &Mapper,
    port: &str,
    spec: &LineSpec,
    line: &[u8],
    received: Timestamp,
) -> Mapped {
    match parse_line(spec, line) {
        Ok(Some(parsed)) => mapper.map_serial(port, &parsed.serial_values(spec), received),
        Ok(None) => Mapped::default(),
        Err(rejection) => Mapped {
            readings: Vec::new(),
            rejections: vec![rejection],
        },
    }
}

/// The batch one framed line commits, or `None` for a blank or header line.
fn batch_of(spec: &LineSpec, framed: Framed) -> Option<Batch> {
    match framed {
        Framed::Line(line) => match parse_line(spec, &line) {
            Ok(Some(parsed)) => Some(Batch::values(parsed.serial_values(spec), &line)),
            Ok(None) => None,
            Err(rejection) => Some(Batch::rejected(rejection, &line)),
        },
        Framed::Overlong(head) => Some(Batch::rejected(
            Rejection::new(
                Reason::Oversized,
                format!(
                    "line longer than max_line ({} bytes); its first bytes are kept, the rest was dropped",
                    spec.max_line
                ),
            ),
            &head,
        )),
    }
}

/// Reads lines from the port and commits each until the port is lost or the gateway stops.
pub async fn run(mut io: SerialStream, ctx: &mut PortContext) -> Result<(), PortFault> {
    let spec = LineSpec::of(&ctx.port);
    let mut lines = LineBuffer::new(spec.max_line);
    let opened = Instant::now();
    let mut first_read = true;
    let mut stop = ctx.stop_signal();
    let mut buf = [0u8; 1024];
    let mut framed = Vec::new();
    loop {
        let n = tokio::select! {
            read = io.read(&mut buf) => read?,
            _ = stop_requested(&mut stop) => return Err(PortFault::Stopping),
        };
        if n == 0 {
            return Err(PortFault::Closed);
        }
        ctx.bytes.inc_by(n as u64);
        if std::mem::take(&mut first_read) && opened.elapsed() < SETTLE {
            lines.skip_to_next_line();
            ctx.error("partial_line");
        }
        lines.push(&buf[..n], &mut framed);
        for item in framed.drain(..) {
            if let Some(batch) = batch_of(&spec, item) {
                ctx.messages.inc();
                ctx.commit(&batch).await?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(format: LineFormat) -> LineSpec {
        LineSpec {
            format,
            columns: vec!["device".into(), "soil_t".into(), "vwc".into()],
            separator: None,
            max_line: 16,
            device_id: Some("probe-1".into()),
        }
    }

    fn frame(max: usize, chunks: &[&[u8]]) -> Vec<Framed> {
        let mut b = LineBuffer::new(max);
        let mut out = Vec::new();
        for c in chunks {
            b.push(c, &mut out);
        }
        out
    }

    fn line(s: &str) -> Framed {
        Framed::Line(s.as_bytes().to_vec())
    }

    #[test]
    fn lines_end_at_newline_with_or_without_cr_across_chunks() {
        assert_eq!(
            frame(16, &[b"a=1\r\nb=", b"2\n", b"\n", b"c=3"]),
            vec![line("a=1"), line("b=2"), line("")],
            "the unterminated `c=3` waits"
        );
        assert_eq!(
            frame(4, &[b"abcd\r\n"]),
            vec![line("abcd")],
            "\\r is not counted"
        );
    }

    #[test]
    fn an_overlong_line_is_cut_and_the_stream_resyncs_at_the_next_newline() {
        let out = frame(4, &[b"abc", b"defgh", b"ij\nok\n"]);
        assert_eq!(
            out,
            vec![Framed::Overlong(b"abcd".to_vec()), line("ok")],
            "one head, the rest dropped"
        );
        assert_eq!(
            frame(4, &[b"abcde\nx\n"]),
            vec![Framed::Overlong(b"abcd".to_vec()), line("x")]
        );
        let mut b = LineBuffer::new(8);
        let mut out = Vec::new();
        b.skip_to_next_line();
        b.push(b"ial_t=2\nt=1\n", &mut out);
        assert_eq!(
            out,
            vec![line("t=1")],
            "a fragment before the first newline is dropped"
        );
    }

    #[test]
    fn how_the_bytes_are_cut_into_reads_does_not_change_the_lines() {
        let stream: &[u8] = b"a=1\r\nbbbbbbbbbbbb\n\nc=3\nddddd\r\n\r\ne\n";
        let whole = frame(5, &[stream]);
        assert_eq!(
            whole,
            vec![
                line("a=1"),
                Framed::Overlong(b"bbbbb".to_vec()),
                line(""),
                line("c=3"),
                line("ddddd"),
                line(""),
                line("e"),
            ]
        );
        for i in 0..=stream.len() {
            for j in i..=stream.len() {
                let cut = frame(5, &[&stream[..i], &stream[i..j], &stream[j..]]);
                assert_eq!(cut, whole, "cut at {i} and {j}");
            }
        }
    }

    #[test]
    fn kv_pairs_with_commas_or_whitespace_and_the_recognised_keys() {
        let s = spec(LineFormat::Kv);
        let p = parse_line(&s, b"soil_t=21.5, vwc=31 ts=1780287300 battery=88")
            .unwrap()
            .unwrap();
        assert_eq!(
            p.values,
            vec![
                ("soil_t".into(), RawValue::Text("21.5".into())),
                ("vwc".into(), RawValue::Text("31".into()))
            ]
        );
        assert_eq!(
            p.at.map(|t| t.to_rfc3339()).as_deref(),
            Some("2026-06-01T04:15:00Z")
        );
        assert_eq!(p.battery, Some(88.0));
        let values = p.serial_values(&s);
        assert_eq!(
            values[0].device.as_deref(),
            Some("probe-1"),
            "the port's device"
        );
        let p = parse_line(&s, b"device=probe-9;x=1").unwrap().unwrap();
        assert_eq!(
            p.device.as_deref(),
            Some("probe-9;x=1"),
            "`;` is no separator by default"
        );
        let semi = LineSpec {
            separator: Some(';'),
            ..s.clone()
        };
        let p = parse_line(&semi, b"device=probe-9; x = 1")
            .unwrap()
            .unwrap();
        assert_eq!(p.device.as_deref(), Some("probe-9"));
        assert_eq!(p.values, vec![("x".into(), RawValue::Text("1".into()))]);
        for bad in [
            &b"hello world"[..],
            b"a=1,a=2",
            b"=5",
            b"a=",
            b"t=1 ts=soon",
        ] {
            assert!(
                parse_line(&s, bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            parse_line(&s, b"t=1 ts=soon").unwrap_err().reason,
            Reason::BadTimestamp
        );
    }

    #[test]
    fn csv_by_columns_skips_the_header_and_counts_values() {
        let s = spec(LineFormat::Csv);
        assert_eq!(
            parse_line(&s, b"device,soil_t,vwc").unwrap(),
            None,
            "header"
        );
        let p = parse_line(&s, b"probe-2, 21.5 ,").unwrap().unwrap();
        assert_eq!(p.device.as_deref(), Some("probe-2"));
        assert_eq!(
            p.values,
            vec![("soil_t".into(), RawValue::Text("21.5".into()))],
            "an empty value is not measured"
        );
        let e = parse_line(&s, b"probe-2,21.5").unwrap_err();
        assert!(
            e.detail.contains("2 values") && e.detail.contains("3 columns"),
            "{e:?}"
        );
        let tabs = LineSpec {
            separator: Some('\t'),
            ..s
        };
        let p = parse_line(&tabs, b"\"probe-3\"\t1\t2").unwrap().unwrap();
        assert_eq!(p.device.as_deref(), Some("probe-3"));
        assert_eq!(p.values.len(), 2);
    }

    #[test]
    fn json_objects_with_numbers_strings_and_the_recognised_keys() {
        let s = spec(LineFormat::Json);
        let p = parse_line(
            &s,
            br#"{"device":"probe-4","soil_t":21.5,"vwc":"31","ts":"2026-06-01T04:15:00Z","ok":true}"#,
        )
        .unwrap()
        .unwrap();
        assert_eq!(p.device.as_deref(), Some("probe-4"));
        assert!(p.at.is_some());
        assert_eq!(
            p.values,
            vec![
                ("ok".into(), RawValue::Text("true".into())),
                ("soil_t".into(), RawValue::Number(21.5)),
                ("vwc".into(), RawValue::Text("31".into())),
            ]
        );
        for bad in [&b"[1,2]"[..], b"{\"a\":", b"42"] {
            assert_eq!(parse_line(&s, bad).unwrap_err().reason, Reason::Malformed);
        }
    }

    #[test]
    fn garbage_is_rejected_with_a_reason() {
        let s = spec(LineFormat::Kv);
        let e = parse_line(&s, b"t=1\xff\xfe").unwrap_err();
        assert!(
            e.detail.contains("UTF-8") && e.detail.contains("0xff"),
            "{e:?}"
        );
        let e = parse_line(&s, b"t=\x1b[2J").unwrap_err();
        assert!(e.detail.contains("control"), "{e:?}");
        assert_eq!(parse_line(&s, b"   \t ").unwrap(), None);
    }

    #[test]
    fn overlong_and_bad_lines_become_rejection_batches() {
        let s = spec(LineFormat::Kv);
        let b = batch_of(&s, Framed::Overlong(b"aaaa".to_vec())).unwrap();
        assert_eq!(b.rejected[0].reason, Reason::Oversized);
        assert_eq!(&*b.raw, b"aaaa");
        let b = batch_of(&s, line("nonsense")).unwrap();
        assert_eq!(b.rejected[0].reason, Reason::Malformed);
        assert_eq!(&*b.raw, b"nonsense");
        assert!(batch_of(&s, line("")).is_none());
        let b = batch_of(&s, line("t=1")).unwrap();
        assert!(b.rejected.is_empty() && b.values.len() == 1);
    }
}
