//! The NVML sampler thread: owns the library, samples every `--nvml-interval`, re-initialises
//! with back-off when the driver is missing or a GPU is lost, and logs each new problem once.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::Shared;
use crate::nvml::{init, sample, GpuSample};
use crate::tracker::Observed;

/// What the collector reads.
#[derive(Debug, Default, Clone)]
pub struct NvmlState {
    pub sample: Option<GpuSample>,
    pub last_success: Option<SystemTime>,
    /// The current problem, when there is one.
    pub error: Option<String>,
}

const MAX_BACKOFF: Duration = Duration::from_secs(60);

pub(super) fn spawn(
    shared: Arc<Shared>,
    lib: Option<PathBuf>,
    interval: Duration,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    // No stall limit: a driver call may hang for long (the collector reports it: stale
    // values, collector_success 0), and restarting the agent would not help.
    let heartbeat = shared.health.register("nvml", None);
    std::thread::Builder::new()
        .name("llmscope-nvml".into())
        .spawn(move || {
            let _heartbeat = heartbeat;
            let mut nvml = None;
            let mut backoff = interval;
            while !shared.stopping() {
                if nvml.is_none() {
                    match init(lib.as_ref()) {
                        Ok(n) => {
                            tracing::info!(library = ?lib, "NVML initialised");
                            nvml = Some(n);
                            backoff = interval;
                        }
                        Err(e) => {
                            report(&shared, format!("NVML unavailable: {e}"), true);
                            super::cuda::sleep_unless_stopping(&shared, backoff);
                            backoff = (backoff * 2).min(MAX_BACKOFF);
                            continue;
                        }
                    }
                }
                let Some(n) = nvml.as_ref() else { continue };
                match sample(n) {
                    Ok(s) => {
                        track_gpu_processes(&shared, &s);
                        let reinit = s.needs_reinit;
                        {
                            let mut state = shared.nvml_state_mut();
                            state.sample = Some(s);
                            state.last_success = Some(SystemTime::now());
                            if state.error.take().is_some() {
                                tracing::info!("NVML sampling works again");
                            }
                        }
                        if reinit {
                            nvml = None;
                        }
                    }
                    Err(e) => {
                        report(&shared, format!("NVML sampling failed: {e}"), false);
                        nvml = None;
                    }
                }
                super::cuda::sleep_unless_stopping(&shared, interval);
            }
        })
}

/// Records a problem; logs it only when it is new (not once per sample or scrape).
fn report(shared: &Shared, message: String, clear_sample: bool) {
    let mut state = shared.nvml_state_mut();
    if state.error.as_deref() != Some(message.as_str()) {
        tracing::warn!(
            "{message}; GPU metrics are left out until it works (retrying with back-off)"
        );
    }
    state.error = Some(message);
    if clear_sample {
        state.sample = None;
    }
}

/// Every process NVML sees on a GPU gets series, classified or not.
fn track_gpu_processes(shared: &Shared, s: &GpuSample) {
    for p in &s.processes {
        if shared.tracker().get(p.pid).is_some_and(|t| t.is_alive()) {
            continue;
        }
        let Ok((facts, sample)) = shared.proc.facts(p.pid) else {
            continue;
        };
        let observed = shared
            .tracker()
            .observe_gpu_user(&facts, || Some(sample.start_ticks));
        shared.note(p.pid, &observed);
        if let Observed::Added(id) = &observed {
            super::events::log_detected(p.pid, id, "NVML");
        }
    }
}
