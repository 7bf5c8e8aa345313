//! The CUDA side of the agent runtime: finding libraries to probe, reacting to the probes'
//! rare events (first CUDA use, OOM), and the kernel-launch duty cycle.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_common::cuda::{FUNCTIONS, KIND_LAUNCH};

use super::Shared;
use crate::cuda::launches::next_duty;
use crate::cuda::library::{cuda_libraries, library_api, MappedLibrary};
use crate::tracker::Observed;

/// Probes every CUDA library process `pid` maps (start-up scan, reconciliation, first use).
pub(super) fn discover_libraries(shared: &Shared, pid: u32) {
    let Ok(maps) = shared.proc.maps(pid) else {
        return;
    };
    let libraries = cuda_libraries(&maps);
    if libraries.is_empty() {
        return;
    }
    let mut attacher = shared.cuda.attacher();
    for lib in &libraries {
        attacher.attach(shared.proc.path(), pid, lib);
    }
}

/// A tracked process opened a file named like a CUDA library (reported by the kernel).
pub(super) fn on_library_open(shared: &Shared, pid: u32, path: &str) {
    let Some(api) = library_api(path) else { return };
    if !path.starts_with('/') {
        // A relative path resolves against the process's cwd at open time; the next scan
        // reads the mapped path from /proc instead.
        return;
    }
    let lib = MappedLibrary {
        api,
        path: path.to_owned(),
        deleted: false,
        range: String::new(),
    };
    shared.cuda.attacher().attach(shared.proc.path(), pid, &lib);
}

/// The first probe hit of a process: track it (as `framework="unknown"` when nothing
/// classifies it) and probe any other CUDA library it maps.
pub(super) fn on_first_use(shared: &Shared, pid: u32) {
    let already = shared.tracker().get(pid).is_some_and(|t| t.is_alive());
    if !already {
        let Ok((facts, sample)) = shared.proc.facts(pid) else {
            return;
        };
        let observed = shared
            .tracker()
            .observe_gpu_user(&facts, || Some(sample.start_ticks));
        shared.note(pid, &observed);
        if let Observed::Added(id) = &observed {
            super::events::log_detected(pid, id, "first CUDA call");
        }
    }
    discover_libraries(shared, pid);
}

pub(super) fn on_oom(shared: &Shared, pid: u32, function: u32, code: u32, size: u64) {
    let model = shared
        .tracker()
        .get(pid)
        .map(|t| t.identity.model_name.clone())
        .unwrap_or_else(|| "unknown".into());
    let function = FUNCTIONS.get(function as usize).map_or("?", |f| f.name);
    tracing::warn!(pid, model = %model, function, code, size, "CUDA out of memory");
}

/// Runs the launch-probe duty cycle until the agent stops.
pub(super) fn spawn_launch_sampler(
    shared: Arc<Shared>,
    budget_percent: f64,
    period: Duration,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("llmscope-launches".into())
        .spawn(move || {
            let mut duty = crate::cuda::launches::MIN_DUTY;
            while !shared.stopping() {
                // The window sits in the middle of its period: a process that starts or stops
                // launching mid-period is then mis-counted by at most half a period per edge.
                let started = Instant::now();
                let window = period.mul_f64(duty);
                let gap = period.saturating_sub(window) / 2;
                sleep_unless_stopping(&shared, gap);
                shared.cuda.attacher().set_launches(true);
                let before = launch_counts(&shared);
                let opened = Instant::now();
                sleep_unless_stopping(&shared, window);
                let after = launch_counts(&shared);
                let observed = opened.elapsed();
                if duty < 1.0 {
                    shared.cuda.attacher().set_launches(false);
                }
                let seen: HashMap<(u32, u8), u64> = after
                    .iter()
                    .map(|(k, v)| (*k, v.saturating_sub(before.get(k).copied().unwrap_or(0))))
                    .filter(|(_, c)| *c > 0)
                    .collect();
                let max_rate = {
                    let mut estimates = shared.cuda.launches();
                    let max_rate = estimates.add_window(&seen, observed, observed.max(period));
                    duty = next_duty(duty, budget_percent, max_rate);
                    estimates.duty = duty;
                    max_rate
                };
                tracing::trace!(max_rate, duty, "launch probe window");
                sleep_unless_stopping(&shared, period.saturating_sub(started.elapsed()));
            }
            shared.cuda.attacher().set_launches(false);
        })
}

pub(super) fn sleep_unless_stopping(shared: &Shared, total: Duration) {
    let deadline = Instant::now() + total;
    while !shared.stopping() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
}

/// Raw launch counts per (process, function) from the kernel's counters.
pub(super) fn launch_counts(shared: &Shared) -> HashMap<(u32, u8), u64> {
    let maps = shared.cuda.maps();
    maps.stats
        .iter()
        .filter_map(Result::ok)
        .filter(|(k, _)| {
            k.code == 0
                && FUNCTIONS
                    .get(k.function as usize)
                    .is_some_and(|f| f.kind == KIND_LAUNCH)
        })
        .map(|(k, v)| ((k.tgid, k.function), v.calls))
        .collect()
}
