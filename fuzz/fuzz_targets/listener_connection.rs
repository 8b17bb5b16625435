//! Random bytes into an MQTT listener connection's protocol handling (codec, session rules,
//! replies), as a client would send them: it must never panic, and every reply it writes must
//! parse as MQTT. `cargo +nightly fuzz run listener_connection` from the repository root.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    sahool_gateway::sources::listener::session::exercise(data);
});
