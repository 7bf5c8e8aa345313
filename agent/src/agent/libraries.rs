//! Libraries being mapped, as the kernel reports them (agent-ebpf/src/library.rs), and the
//! attach thread that probes CUDA libraries off the ring-draining thread.
//!
//! ```text
//!  events thread ── LibraryMap(CUDA) ──▶ track the process ──▶ AttachQueue (bounded) ──▶ attach thread
//!                └─ LibraryMap(framework) ──▶ classify the interpreter now
//!  attach thread: probes files (symbols cached per file), retries a mapping not yet in
//!                 /proc/<pid>/maps, and every second detaches libraries no process maps
//!                 (their links dropped one by one while no attach waits)
//! ```

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_common::{LIB_CUDA_DRIVER, LIB_CUDA_RUNTIME, LIB_FRAMEWORK};
use aya::programs::uprobe::UProbeLink;

use super::health::Health;
use super::observe::{log_detected, log_reclassified, observe_with_env, track_gpu_user, How};
use super::table::Table;
use super::CudaState;
use crate::cuda::library::{cuda_libraries, library_api};
use crate::ebpf::events::LibraryMap;
use crate::identity::{worth_rechecking, Framework};
use crate::proc::ProcRoot;
use crate::tracker::Observed;

/// Attach requests waiting at most; past it they are dropped, counted, and the next /proc
/// scan probes what they would have.
pub const ATTACH_QUEUE_CAPACITY: usize = 1024;
/// A mapping reported by the kernel is usually in /proc/<pid>/maps when the request is
/// handled; if not yet, it is looked for again after this, a few times.
const RETRY_DELAY: Duration = Duration::from_millis(20);
const RETRIES: u8 = 5;
/// How often idle libraries are looked for.
const IDLE_CHECK_INTERVAL: Duration = Duration::from_secs(1);

pub enum AttachJob {
    /// Process `pid` is mapping the CUDA library file `name`, (device, inode) `file`.
    Mapped {
        pid: u32,
        file: (u64, u64),
        name: String,
    },
    /// Probe every CUDA library process `pid` maps (its first CUDA call was seen).
    Discover { pid: u32 },
}

/// The sending side: never blocks the events thread.
pub struct AttachQueue {
    tx: SyncSender<AttachJob>,
    dropped: AtomicU64,
}

impl AttachQueue {
    pub fn new() -> (AttachQueue, Receiver<AttachJob>) {
        let (tx, rx) = std::sync::mpsc::sync_channel(ATTACH_QUEUE_CAPACITY);
        (
            AttachQueue {
                tx,
                dropped: AtomicU64::new(0),
            },
            rx,
        )
    }

    pub fn send(&self, job: AttachJob) {
        match self.tx.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
            // The attach thread is gone: the agent is stopping (or health reports it).
            Err(TrySendError::Disconnected(_)) => {}
        }
    }

    /// Requests dropped because the queue was full, since start.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// A library mapping reported by the kernel (events thread: nothing slow here).
pub(super) fn on_library_map(table: &Table, cuda: &CudaState, map: LibraryMap) {
    match map.class {
        LIB_CUDA_RUNTIME | LIB_CUDA_DRIVER => {
            if library_api(&map.name).is_none() {
                return;
            }
            track_gpu_user(table, map.pid, "CUDA library mapped");
            cuda.queue.send(AttachJob::Mapped {
                pid: map.pid,
                file: (map.dev, map.ino),
                name: map.name,
            });
        }
        LIB_FRAMEWORK => classify_interpreter(table, &map),
        _ => {}
    }
}

/// An interpreter no rule knows yet maps a framework's library: classify it now, from its
/// libraries (the one being mapped, by its directory and name, and those already mapped).
/// A process tracked only as a GPU user (`framework="unknown"`: it mapped a CUDA library
/// first, as `import torch` does with the CUDA wheels) is classified again too.
fn classify_interpreter(table: &Table, map: &LibraryMap) {
    let tracked = table
        .tracker()
        .get(map.pid)
        .filter(|t| t.is_alive())
        .map(|t| t.identity.framework);
    if tracked.is_some_and(|f| f != Framework::Unknown) {
        return;
    }
    let read_at = Instant::now();
    let Ok((mut facts, sample)) = table.proc.facts(map.pid) else {
        return;
    };
    let rules = table.tracker().rules();
    let a_rule_asks = rules.is_some_and(|r| r.needs(&facts).libraries);
    if !worth_rechecking(&facts) && !a_rule_asks {
        return;
    }
    facts.libraries = table.proc.libraries(map.pid).unwrap_or_default();
    facts.libraries.push(map.short_path());
    let how = How::Refresh {
        read_at,
        start_ticks: sample.start_ticks,
    };
    if let Observed::Added(id) = observe_with_env(table, &mut facts, how) {
        if tracked.is_some() {
            log_reclassified(table, map.pid, &id, "framework library mapped");
        } else {
            log_detected(table, map.pid, &id, "framework library mapped");
        }
    }
}

/// Probes the CUDA libraries `jobs` name (with `cuda`'s attacher), and detaches those no
/// process in `table` maps any more.
pub(super) fn spawn(
    table: Arc<Table>,
    cuda: Arc<CudaState>,
    health: &Arc<Health>,
    jobs: Receiver<AttachJob>,
    idle_after: Duration,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let heartbeat = health.register("attach", Some(STALL_LIMIT));
    std::thread::Builder::new()
        .name("llmscope-attach".into())
        .spawn(move || run(&table, &cuda, jobs, idle_after, &heartbeat))
}

/// An attach or detach can wait for the kernel (grace periods, a library's many links);
/// silent this long, the thread is reported stalled.
const STALL_LIMIT: Duration = Duration::from_secs(120);

fn run(
    table: &Table,
    cuda: &CudaState,
    jobs: Receiver<AttachJob>,
    idle_after: Duration,
    heartbeat: &super::health::Heartbeat,
) {
    let mut retries: VecDeque<(Instant, u8, AttachJob)> = VecDeque::new();
    // Links of detached libraries, dropped one at a time when no attach is waiting: a detach
    // holds the kernel's trace-event mutex for a grace period, which every attach waits for.
    let mut to_drop: VecDeque<UProbeLink> = VecDeque::new();
    let mut next_idle_check = Instant::now() + IDLE_CHECK_INTERVAL;
    while !table.stopping() {
        heartbeat.beat();
        let wait = if !to_drop.is_empty() {
            Duration::ZERO
        } else {
            retries
                .front()
                .map_or(Duration::from_millis(100), |(at, _, _)| {
                    at.saturating_duration_since(Instant::now())
                })
                .min(Duration::from_millis(100))
        };
        match jobs.recv_timeout(wait) {
            Ok(job) => {
                if let Some(job) = handle(&table.proc, cuda, job) {
                    retries.push_back((Instant::now() + RETRY_DELAY, 1, job));
                }
                continue;
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        while retries
            .front()
            .is_some_and(|(at, _, _)| *at <= Instant::now())
        {
            let (_, tries, job) = retries.pop_front().expect("checked");
            if let Some(job) = handle(&table.proc, cuda, job) {
                if tries < RETRIES {
                    retries.push_back((Instant::now() + RETRY_DELAY, tries + 1, job));
                }
            }
        }
        if Instant::now() >= next_idle_check {
            next_idle_check = Instant::now() + IDLE_CHECK_INTERVAL;
            let tracked = table.tracker().live_pids();
            let detached = cuda.attacher().detach_idle(
                table.proc.path(),
                &tracked,
                Instant::now(),
                idle_after,
            );
            to_drop.extend(detached.into_links());
        }
        // Nothing waits: detach one link (the attacher is not locked).
        drop(to_drop.pop_front());
        cuda.detach_backlog
            .store(to_drop.len() as u64, Ordering::Relaxed);
    }
}

/// Handles one request; returns it when the mapping is not in the process's maps yet.
fn handle(proc: &ProcRoot, cuda: &CudaState, job: AttachJob) -> Option<AttachJob> {
    match job {
        AttachJob::Discover { pid } => {
            discover_libraries(proc, cuda, pid);
            None
        }
        AttachJob::Mapped { pid, file, name } => {
            if file.1 != 0 && cuda.attacher().note_user(file, pid) {
                return None;
            }
            let Ok(maps) = proc.maps(pid) else {
                // Gone already: the next process mapping the file reports it again.
                return None;
            };
            let libraries = cuda_libraries(&maps);
            let mut attacher = cuda.attacher();
            for lib in &libraries {
                attacher.attach(proc.path(), pid, lib);
            }
            let found = libraries
                .iter()
                .any(|l| l.path.rsplit('/').next() == Some(name.as_str()));
            (!found).then_some(AttachJob::Mapped { pid, file, name })
        }
    }
}

/// Probes every CUDA library process `pid` maps (start-up scan, reconciliation, first use).
pub(super) fn discover_libraries(proc: &ProcRoot, cuda: &CudaState, pid: u32) {
    let Ok(maps) = proc.maps(pid) else {
        return;
    };
    let libraries = cuda_libraries(&maps);
    if libraries.is_empty() {
        return;
    }
    let mut attacher = cuda.attacher();
    for lib in &libraries {
        attacher.attach(proc.path(), pid, lib);
    }
}
