//! The events thread: drains the ring buffer every [`DRAIN_INTERVAL`], turns exec records
//! into facts and classifies them, classifies interpreters when they map a framework's
//! library, and retires what ended (processes, CUDA counters).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aya::maps::{MapData, RingBuf};

use super::{Counters, Shared, DRAIN_INTERVAL};
use crate::cuda::library::classify_name;
use crate::ebpf::perf_mmap::MmapRecords;
use crate::ebpf::{decode, ExecRecord, KernelEvent};
use crate::identity::{Identity, ProcessFacts, UNKNOWN};
use crate::tracker::Observed;

/// How often exited processes past their grace period are expired.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_millis(100);
/// How often retired CUDA counters are removed from the kernel maps (a pass over them).
const CUDA_SWEEP_INTERVAL: Duration = Duration::from_secs(1);

pub(super) fn spawn(
    shared: Arc<Shared>,
    ring: RingBuf<MapData>,
    mmap_records: Option<MmapRecords>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let heartbeat = shared.health.register("events", Some(STALL_LIMIT));
    std::thread::Builder::new()
        .name("llmscope-events".into())
        .spawn(move || run(&shared, ring, mmap_records, &heartbeat))
}

/// The events thread beats every drain (10 ms); silent this long, it is reported stalled.
const STALL_LIMIT: Duration = Duration::from_secs(10);

fn run(
    shared: &Shared,
    mut ring: RingBuf<MapData>,
    mut mmap_records: Option<MmapRecords>,
    heartbeat: &super::health::Heartbeat,
) {
    // Test-only fault injection: the integration tests kill (`events_panic`) or stall
    // (`events_stall`) the ring reader a second after start, to see /healthz and the exit
    // code tell the truth.
    let fault = std::env::var("LLMSCOPE_TEST_FAULT").unwrap_or_default();
    let started = Instant::now();
    let mut last_housekeeping = Instant::now();
    let mut last_sweep = Instant::now();
    while !shared.stopping() {
        heartbeat.beat();
        if !fault.is_empty() && started.elapsed() > Duration::from_secs(1) {
            match fault.as_str() {
                "events_panic" => panic!("fault injected by LLMSCOPE_TEST_FAULT=events_panic"),
                "events_stall" => {
                    while !shared.stopping() {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
                _ => {}
            }
        }
        while let Some(item) = ring.next() {
            let event = decode(&item);
            drop(item);
            match event {
                KernelEvent::Exec(rec) => {
                    Counters::add(&shared.counters.exec, 1);
                    on_exec(shared, rec);
                }
                KernelEvent::Exit {
                    pid,
                    cuda_generation,
                    ..
                } => {
                    Counters::add(&shared.counters.exit, 1);
                    shared.exited(pid);
                    shared
                        .cuda
                        .retired()
                        .retire(pid, cuda_generation, Instant::now());
                }
                KernelEvent::CudaRetired {
                    pid,
                    cuda_generation,
                } => shared
                    .cuda
                    .retired()
                    .retire(pid, cuda_generation, Instant::now()),
                KernelEvent::Fork { pid, ppid, .. } => {
                    Counters::add(&shared.counters.fork, 1);
                    on_fork(shared, pid, ppid);
                }
                KernelEvent::CudaFirstUse { pid } => super::cuda::on_first_use(shared, pid),
                KernelEvent::CudaOom {
                    pid,
                    function,
                    code,
                    size,
                } => super::cuda::on_oom(shared, pid, function, code, size),
                KernelEvent::LibraryMap(map) => {
                    Counters::add(&shared.counters.library_map, 1);
                    super::libraries::on_library_map(shared, map)
                }
                KernelEvent::Malformed => Counters::add(&shared.counters.malformed, 1),
            }
        }
        if let Some(records) = &mut mmap_records {
            records.drain(classify_name, |map| {
                Counters::add(&shared.counters.library_map, 1);
                super::libraries::on_library_map(shared, map);
            });
            shared
                .counters
                .library_map_lost
                .store(records.lost(), Ordering::Relaxed);
        }
        if last_housekeeping.elapsed() >= HOUSEKEEPING_INTERVAL {
            last_housekeeping = Instant::now();
            shared.tracker().expire(Instant::now(), shared.grace);
        }
        if last_sweep.elapsed() >= CUDA_SWEEP_INTERVAL {
            last_sweep = Instant::now();
            super::cuda::sweep(shared, Instant::now());
        }
        std::thread::sleep(DRAIN_INTERVAL);
    }
}

fn on_exec(shared: &Shared, rec: ExecRecord) {
    let pid = rec.pid;
    let mut facts = ProcessFacts {
        pid,
        ppid: rec.ppid,
        comm: rec.comm,
        exe: rec.filename,
        argv: rec.argv,
        env: Vec::new(),
        libraries: Vec::new(),
    };
    if rec.argv_truncated {
        // The kernel copied the first bytes; /proc has the rest while the process lives.
        if let Ok(full) = shared.proc.cmdline(pid) {
            if !full.is_empty() {
                facts.argv = full;
            }
        }
    }
    if facts.ppid == 0 {
        facts.ppid = shared.proc.sample(pid).map(|s| s.ppid).unwrap_or(0);
    }
    match observe_with_env(shared, &mut facts, How::New) {
        Observed::Added(id) => log_detected(pid, &id, "exec"),
        Observed::Dropped => {
            tracing::warn!(pid, "process table full (--max-processes): not tracked")
        }
        _ => {}
    }
}

/// A tracked process forked without exec (the kernel reports only those): the child runs
/// the same program, so it is classified from the parent's program and its own command line.
/// A fork that execs soon after is re-classified by its exec event.
fn on_fork(shared: &Shared, pid: u32, ppid: u32) {
    let Some(parent) = shared.tracker().get(ppid).cloned() else {
        return;
    };
    let mut facts = ProcessFacts {
        pid,
        ppid,
        comm: parent.name,
        exe: parent.exe,
        argv: shared.proc.cmdline(pid).unwrap_or_default(),
        env: Vec::new(),
        libraries: Vec::new(),
    };
    if let Observed::Added(id) = observe_with_env(shared, &mut facts, How::New) {
        tracing::debug!(
            pid,
            ppid,
            role = id.role.as_str(),
            "forked child of an LLM process"
        );
    }
}

pub(super) fn log_detected(pid: u32, id: &Identity, via: &str) {
    tracing::info!(
        pid,
        framework = id.framework.as_str(),
        model = %id.model_name,
        role = id.role.as_str(),
        via,
        "LLM process detected"
    );
}

/// What an observation stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum How {
    /// An exec or fork: the process image is new; what was known about the pid is replaced.
    New,
    /// A scan or re-examination of a process that did not exec: it adds or re-identifies,
    /// never removes (see [`crate::tracker::Tracker::refresh`]).
    Refresh,
}

impl How {
    fn observe(
        self,
        tracker: &mut crate::tracker::Tracker,
        facts: &ProcessFacts,
        start: impl FnOnce() -> Option<u64>,
    ) -> Observed {
        match self {
            How::New => tracker.observe(facts, start),
            How::Refresh => tracker.refresh(facts, start),
        }
    }
}

/// Classifies `facts`; when the result names no model, reads the model variables from the
/// environment and classifies again. Keeps the kernel's tracked set in step.
pub(super) fn observe_with_env(shared: &Shared, facts: &mut ProcessFacts, how: How) -> Observed {
    let pid = facts.pid;
    let start = || shared.proc.start_ticks(pid).ok();
    let mut observed = how.observe(&mut shared.tracker(), facts, start);
    if let Observed::Added(id) = &observed {
        if id.model_name == UNKNOWN {
            if let Ok(env) = shared.proc.model_env(pid) {
                if !env.is_empty() {
                    facts.env = env;
                    if let Observed::Added(with_model) =
                        how.observe(&mut shared.tracker(), facts, start)
                    {
                        observed = Observed::Added(with_model);
                    }
                }
            }
        }
    }
    shared.note(pid, &observed);
    observed
}
