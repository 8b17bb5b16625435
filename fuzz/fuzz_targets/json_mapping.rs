#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sahool_gateway_fuzz::json_mapping(data));
