#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| llmscope::fuzzing::classify_rules(data));
