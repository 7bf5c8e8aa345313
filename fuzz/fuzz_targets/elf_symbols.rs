#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| llmscope::fuzzing::elf_symbols(data));
