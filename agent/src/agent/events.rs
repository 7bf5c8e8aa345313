//! The events thread: drains the ring buffer every [`DRAIN_INTERVAL`], turns exec records
//! into facts, classifies them, and re-examines interpreters whose imports may say more later.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aya::maps::{MapData, RingBuf};

use super::{Counters, Shared, DRAIN_INTERVAL};
use crate::ebpf::{decode, ExecRecord, KernelEvent};
use crate::identity::{worth_rechecking, Identity, ProcessFacts, UNKNOWN};
use crate::tracker::Observed;

/// Interpreters waiting for their imports: re-read at 0.5 s, 1 s, 2 s … up to this delay.
const RECHECK_MAX_DELAY: Duration = Duration::from_secs(32);
/// Most interpreters waiting at once; past it, new ones are left to the periodic scan.
const RECHECK_CAPACITY: usize = 1024;
/// When a newly tracked process's maps are read for CUDA libraries.
const LIBRARY_CHECK_DELAY: Duration = Duration::from_millis(100);
/// How often expiry and rechecks run.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_millis(100);

pub(super) fn spawn(
    shared: Arc<Shared>,
    ring: RingBuf<MapData>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("llmscope-events".into())
        .spawn(move || run(&shared, ring))
}

fn run(shared: &Shared, mut ring: RingBuf<MapData>) {
    shared.reader_alive.store(true, Ordering::Relaxed);
    let mut rechecks = Rechecks::default();
    let mut last_housekeeping = Instant::now();
    while !shared.stopping() {
        while let Some(item) = ring.next() {
            let event = decode(&item);
            drop(item);
            match event {
                KernelEvent::Exec(rec) => {
                    Counters::add(&shared.counters.exec, 1);
                    on_exec(shared, &mut rechecks, rec);
                }
                KernelEvent::Exit { pid, .. } => {
                    Counters::add(&shared.counters.exit, 1);
                    rechecks.waiting.remove(&pid);
                    rechecks.libraries.remove(&pid);
                    shared.exited(pid);
                }
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
                KernelEvent::LibraryOpen { pid, path } => {
                    super::cuda::on_library_open(shared, pid, &path)
                }
                KernelEvent::Malformed => Counters::add(&shared.counters.malformed, 1),
            }
        }
        if last_housekeeping.elapsed() >= HOUSEKEEPING_INTERVAL {
            last_housekeeping = Instant::now();
            rechecks.run_due(shared);
            shared.tracker().expire(Instant::now(), shared.grace);
        }
        std::thread::sleep(DRAIN_INTERVAL);
    }
    shared.reader_alive.store(false, Ordering::Relaxed);
}

fn on_exec(shared: &Shared, rechecks: &mut Rechecks, rec: ExecRecord) {
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
    rechecks.waiting.remove(&pid);
    match observe_with_env(shared, &mut facts, How::New) {
        Observed::Added(id) => {
            log_detected(pid, &id, "exec");
            rechecks.check_libraries_soon(pid);
        }
        Observed::Ignored if worth_rechecking(&facts) => rechecks.add(pid),
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

#[derive(Default)]
struct Rechecks {
    /// pid → (when to look again, current delay)
    waiting: HashMap<u32, (Instant, Duration)>,
    /// pid → when to look for CUDA libraries it loaded before the kernel knew to report its
    /// opens (the ≤10 ms between its exec and the agent adding it to the tracked set).
    libraries: HashMap<u32, Instant>,
}

impl Rechecks {
    fn check_libraries_soon(&mut self, pid: u32) {
        if self.libraries.len() < RECHECK_CAPACITY {
            self.libraries
                .insert(pid, Instant::now() + LIBRARY_CHECK_DELAY);
        }
    }

    fn add(&mut self, pid: u32) {
        if self.waiting.len() < RECHECK_CAPACITY {
            let delay = Duration::from_millis(500);
            self.waiting.insert(pid, (Instant::now() + delay, delay));
        }
    }

    fn run_due(&mut self, shared: &Shared) {
        let now = Instant::now();
        let due: Vec<u32> = self
            .waiting
            .iter()
            .filter(|(_, (at, _))| *at <= now)
            .map(|(pid, _)| *pid)
            .collect();
        let libraries_due: Vec<u32> = self
            .libraries
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(pid, _)| *pid)
            .collect();
        for pid in libraries_due {
            self.libraries.remove(&pid);
            super::cuda::discover_libraries(shared, pid);
        }
        for pid in due {
            let Some((_, delay)) = self.waiting.remove(&pid) else {
                continue;
            };
            let Ok((mut facts, _)) = shared.proc.facts(pid) else {
                continue;
            };
            facts.libraries = shared.proc.libraries(pid).unwrap_or_default();
            let observed = observe_with_env(shared, &mut facts, How::Refresh);
            if let Observed::Added(_) = observed {
                self.check_libraries_soon(pid);
            }
            let next = delay * 2;
            if matches!(observed, Observed::Ignored)
                && next <= RECHECK_MAX_DELAY
                && worth_rechecking(&facts)
            {
                self.waiting.insert(pid, (now + next, next));
            }
        }
    }
}
