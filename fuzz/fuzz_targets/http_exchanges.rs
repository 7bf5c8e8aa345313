#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| llmscope::fuzzing::http_exchanges(data));
