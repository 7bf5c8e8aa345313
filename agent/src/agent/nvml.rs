//! The NVML sampler thread: owns the library, samples every `--nvml-interval`, re-initialises
//! with back-off when the driver is missing or a GPU is lost, and logs each new problem once.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::health::Health;
use super::observe::track_gpu_user;
use super::table::Table;
use crate::nvml::{init, sample};
use crate::state::{GpuSample, NvmlState, Published};

const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Samples NVML into `view`; every process NVML sees on a GPU is tracked in `table`.
pub(super) fn spawn(
    table: Arc<Table>,
    health: &Arc<Health>,
    view: Arc<Published<NvmlState>>,
    lib: Option<PathBuf>,
    interval: Duration,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    // No stall limit: a driver call may hang for long (the collector reports it: stale
    // values, collector_success 0), and restarting the agent would not help.
    let heartbeat = health.register("nvml", None);
    std::thread::Builder::new()
        .name("llmscope-nvml".into())
        .spawn(move || {
            let _heartbeat = heartbeat;
            let mut nvml = None;
            let mut backoff = interval;
            while !table.stopping() {
                if nvml.is_none() {
                    match init(lib.as_ref()) {
                        Ok(n) => {
                            tracing::info!(library = ?lib, "NVML initialised");
                            nvml = Some(n);
                            backoff = interval;
                        }
                        Err(e) => {
                            report(&view, format!("NVML unavailable: {e}"), true);
                            table.sleep(backoff);
                            backoff = (backoff * 2).min(MAX_BACKOFF);
                            continue;
                        }
                    }
                }
                let Some(n) = nvml.as_ref() else { continue };
                match sample(n) {
                    Ok(s) => {
                        track_gpu_processes(&table, &s);
                        let reinit = s.needs_reinit;
                        if view.get().error.is_some() {
                            tracing::info!("NVML sampling works again");
                        }
                        view.set(NvmlState {
                            sample: Some(s),
                            last_success: Some(SystemTime::now()),
                            error: None,
                        });
                        if reinit {
                            nvml = None;
                        }
                    }
                    Err(e) => {
                        report(&view, format!("NVML sampling failed: {e}"), false);
                        nvml = None;
                    }
                }
                table.sleep(interval);
            }
        })
}

/// Records a problem; logs it only when it is new (not once per sample or scrape).
fn report(view: &Published<NvmlState>, message: String, clear_sample: bool) {
    let old = view.get();
    if old.error.as_deref() != Some(message.as_str()) {
        tracing::warn!(
            event = "nvml_unavailable",
            error = %message,
            "NVML unavailable: GPU metrics are left out until it works (retrying with back-off)"
        );
    }
    view.set(NvmlState {
        sample: if clear_sample {
            None
        } else {
            old.sample.clone()
        },
        last_success: old.last_success,
        error: Some(message),
    });
}

/// Every process NVML sees on a GPU gets series, classified or not.
fn track_gpu_processes(table: &Table, s: &GpuSample) {
    for p in &s.processes {
        track_gpu_user(table, p.pid, "NVML");
    }
}
