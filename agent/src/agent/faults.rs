//! Test-only fault injection, compiled only with the `test-faults` feature (which
//! `cargo xtask test` enables and no release build does): `LLMSCOPE_TEST_FAULT` names a
//! fault the integration tests use to see /healthz, the exit code and a failing collector
//! tell the truth.

use std::time::{Duration, Instant};

use crate::metrics::{CollectError, Collector, Families};

fn injected() -> String {
    std::env::var("LLMSCOPE_TEST_FAULT").unwrap_or_default()
}

/// A fault of the ring reader: it panics (`events_panic`) or stops reading
/// (`events_stall`) a second after start, or rests 300 ms before every turn (`events_slow`:
/// events wait in the ring, as they do behind a busy reader).
pub struct EventsFault {
    fault: String,
    started: Instant,
}

impl EventsFault {
    pub fn injected() -> EventsFault {
        EventsFault {
            fault: injected(),
            started: Instant::now(),
        }
    }

    /// Called on every turn of the ring reader's loop.
    pub fn strike(&self, stopping: impl Fn() -> bool) {
        if self.started.elapsed() < Duration::from_secs(1) {
            return;
        }
        match self.fault.as_str() {
            "events_panic" => panic!("fault injected by LLMSCOPE_TEST_FAULT=events_panic"),
            "events_stall" => {
                while !stopping() {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            "events_slow" => std::thread::sleep(Duration::from_millis(300)),
            _ => {}
        }
    }
}

/// With `collector_panic`, a collector that panics on every scrape.
pub fn collector() -> Option<Box<dyn Collector>> {
    (injected() == "collector_panic").then(|| Box::new(PanickingCollector) as Box<dyn Collector>)
}

struct PanickingCollector;

impl Collector for PanickingCollector {
    fn name(&self) -> &'static str {
        "fault"
    }

    fn collect(&self, _: &mut Families) -> Result<(), CollectError> {
        panic!("fault injected by LLMSCOPE_TEST_FAULT=collector_panic")
    }
}
