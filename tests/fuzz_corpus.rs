//! Replays every committed fuzz corpus input (`fuzz/corpus/TARGET/`) through the fuzz targets'
//! own entry points and checks, so `cargo test` keeps them passing without a nightly toolchain
//! or the fuzzer. A crash the fuzzer finds lands here too: its input goes into the corpus.

#[path = "../fuzz/src/lib.rs"]
mod entry;

use std::path::Path;

/// A fuzz target's entry point.
type Entry = fn(&[u8]);

/// Target name → entry point; a new fuzz target (a serial decoder, say) adds its line here.
const TARGETS: [(&str, Entry); 6] = [
    ("sahool_payload", entry::sahool_payload),
    ("json_mapping", entry::json_mapping),
    ("config_parse", entry::config_parse),
    ("modbus_response", entry::modbus_response),
    ("sdi12_response", entry::sdi12_response),
    ("serial_line", entry::serial_line),
];

#[test]
fn every_committed_corpus_input_passes_its_target() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (target, run) in TARGETS {
        let dir = root.join(target);
        let mut inputs: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("corpus entry").path())
            .collect();
        inputs.sort();
        assert!(
            inputs.len() >= 10,
            "{target}: only {} corpus inputs committed",
            inputs.len()
        );
        for input in &inputs {
            let data = std::fs::read(input).expect("corpus input");
            let outcome = std::panic::catch_unwind(|| run(&data));
            assert!(outcome.is_ok(), "{target}: {} fails", input.display());
        }
    }
}

/// Inputs that once broke a target (found while fuzzing), kept in the corpus and named here so
/// their intent stays readable.
#[test]
fn inputs_that_once_failed_pass() {
    entry::sahool_payload(
        b"sahool/sensors/soil-probe-7/field-north-12\0{\"device_id\":\"soil-probe-7\",\"type\":\"vwc\",\"value\":20,\"battery\":\"nan\"}",
    );
    entry::sahool_payload(
        b"sahool/sensors/wx-3/field-south-2\0{\"d\":\"wx-3\",\"t\":\"wind_speed\",\"v\":1e308,\"u\":\"km/h\"}",
    );
    entry::json_mapping(b"fuzz/a/escaped\0{\"a/b\":{\"m~n\":[1e10]},\"b\":\"inf\"}");
    // A talker's battery that overflows f64 became an infinite battery in the reading.
    entry::serial_line(
        b"{\"temp\":24.5,\"rh\":\"55\",\"ts\":1780287300250,\"battery\":\"974444444444444444E44444444444444\"}\n",
    );
}
