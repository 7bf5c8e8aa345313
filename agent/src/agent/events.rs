//! The events thread: drains the ring buffer (and the perf buffers of library mappings) as
//! soon as the kernel says it wrote to them, turns exec records into facts and classifies
//! them, classifies interpreters when they map a framework's library, and retires what ended
//! (processes, CUDA counter generations; the sampler removes retired counters from the kernel
//! maps).

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aya::maps::{MapData, RingBuf};

use super::health::Health;
use super::observe::{log_detected, observe_with_env, How};
use super::table::Table;
use super::wakeup::{Spacing, Wakeup};
use super::CudaState;
use crate::cuda::library::classify_name;
use crate::ebpf::events::LibraryMap;
use crate::ebpf::perf_mmap::{MmapRecords, Mode, ModePolicy};
use crate::ebpf::{decode, ExecRecord, KernelEvent};
use crate::identity::ProcessFacts;
use crate::state::Counters;
use crate::tracker::Observed;

/// How often exited processes past their grace period are expired; the longest the thread
/// sleeps with nothing to read.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_millis(100);
/// The rest between two drains grows from the shortest to the longest while drains find at
/// least [`BURST`] records ([`Spacing`]): the first records after a quiet spell are read at
/// once, an exec storm (each exec brings its exit and a few mapping records) costs at most a
/// hundred drains a second, as many as the timed drain this replaced.
const SHORTEST_REST: Duration = Duration::from_millis(1);
const BURST: usize = 16;
const LONGEST_REST: Duration = Duration::from_millis(10);
/// How long batching perf buffers wait to be read when nothing else wakes the thread. Back
/// to back process starts (a test suite, a bench spawning Python) make the buffers batch
/// while each start still waits to be classified: read on the longest rest, a framework
/// library mapped in one was seen 10 ms late (library → classified p90 10.7 ms). In a real
/// storm the drains find bursts and rest the longest anyway, so this adds few wake-ups.
const BATCHED_READ: Duration = Duration::from_millis(2);
/// While a drain reads the ring, the perf buffers are read again this often.
const PERF_READ_WHILE_RING: Duration = Duration::from_millis(2);

/// Reads the kernel's records into `table` (and `cuda`'s retired generations and attach
/// queue), counting them in `counters`.
pub(super) fn spawn(
    table: Arc<Table>,
    cuda: Arc<CudaState>,
    counters: Arc<Counters>,
    health: &Arc<Health>,
    ring: RingBuf<MapData>,
    mmap_records: Option<MmapRecords>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let heartbeat = health.register("events", Some(STALL_LIMIT));
    let wakeup = Wakeup::new()?;
    wakeup.add(ring.as_raw_fd())?;
    for fd in mmap_records.iter().flat_map(MmapRecords::fds) {
        wakeup.add(fd)?;
    }
    std::thread::Builder::new()
        .name("llmscope-events".into())
        .spawn(move || {
            let handles = Handles {
                table: &table,
                cuda: &cuda,
                counters: &counters,
            };
            run(handles, ring, mmap_records, &wakeup, &heartbeat);
        })
}

/// What the events thread writes.
#[derive(Clone, Copy)]
struct Handles<'a> {
    table: &'a Table,
    cuda: &'a CudaState,
    counters: &'a Counters,
}

/// The events thread beats at every wake-up (at least every [`HOUSEKEEPING_INTERVAL`]);
/// silent this long, it is reported stalled.
const STALL_LIMIT: Duration = Duration::from_secs(10);

fn run(
    Handles {
        table,
        cuda,
        counters,
    }: Handles,
    mut ring: RingBuf<MapData>,
    mut mmap_records: Option<MmapRecords>,
    wakeup: &Wakeup,
    heartbeat: &super::health::Heartbeat,
) {
    #[cfg(feature = "test-faults")]
    let fault = super::faults::EventsFault::injected();
    let mut last_housekeeping = Instant::now();
    let mut spacing = Spacing::new(SHORTEST_REST, LONGEST_REST, BURST);
    let mut policy = ModePolicy::default();
    while !table.stopping() {
        heartbeat.beat();
        #[cfg(feature = "test-faults")]
        fault.strike(|| table.stopping());
        // Library mappings from the perf records are taken before the ring is read (and
        // while it is read), and handled after it: every exec that preceded a mapping is in
        // the ring by then, so a process is never tracked from its mapping before its exec
        // is seen (and detected twice). A process whose exit is read here made its mappings
        // before it: they are dropped (the kernel reports every process's exit, tracked or
        // not).
        let drain_started = Instant::now();
        let mut mappings = Vec::new();
        let mut exited = std::collections::HashSet::new();
        // Records read by this drain, perf and ring: what sets the rest after it.
        let mut records = 0;
        let mut perf_read = drain_started;
        if let Some(perf) = &mut mmap_records {
            let mode = policy.next(perf.mode(), perf.mappings(), drain_started);
            switch_mode(perf, mode, wakeup, &mut mappings);
            counters
                .library_map_batching
                .store(u64::from(perf.mode() == Mode::Batching), Ordering::Relaxed);
            records = read_perf(perf, &mut mappings, counters);
        }
        while let Some(item) = ring.next() {
            records += 1;
            // Each record is handled here (an exec classified from /proc): a burst of them
            // took the thread up to 150 ms under the soak with three CPU hogs and a disk writer, in which the
            // perf buffers, a fraction of the ring's size, could fill and lose records.
            if let Some(perf) = mmap_records
                .as_mut()
                .filter(|_| perf_read.elapsed() >= PERF_READ_WHILE_RING)
            {
                records += read_perf(perf, &mut mappings, counters);
                perf_read = Instant::now();
            }
            let event = decode(&item);
            drop(item);
            match event {
                KernelEvent::Exec(rec) => {
                    Counters::add(&counters.exec, 1);
                    on_exec(table, rec);
                }
                KernelEvent::Exit {
                    pid,
                    cuda_generation,
                    ..
                } => {
                    Counters::add(&counters.exit, 1);
                    table.exited(pid);
                    // A mapping read later in this drain may be this process's.
                    if mmap_records.is_some() {
                        exited.insert(pid);
                    }
                    cuda.retired().retire(pid, cuda_generation, Instant::now());
                }
                KernelEvent::CudaRetired {
                    pid,
                    cuda_generation,
                } => cuda.retired().retire(pid, cuda_generation, Instant::now()),
                KernelEvent::Fork { pid, ppid, .. } => {
                    Counters::add(&counters.fork, 1);
                    on_fork(table, pid, ppid);
                }
                KernelEvent::CudaFirstUse { pid } => super::cuda::on_first_use(table, cuda, pid),
                KernelEvent::CudaOom {
                    pid,
                    function,
                    code,
                    size,
                } => super::cuda::on_oom(table, pid, function, code, size),
                KernelEvent::LibraryMap(map) => {
                    Counters::add(&counters.library_map, 1);
                    super::libraries::on_library_map(table, cuda, map);
                }
                KernelEvent::Malformed => Counters::add(&counters.malformed, 1),
            }
        }
        for map in mappings {
            Counters::add(&counters.library_map, 1);
            if !exited.contains(&map.pid) {
                super::libraries::on_library_map(table, cuda, map);
            }
        }
        table.set_drained(drain_started);
        if last_housekeeping.elapsed() >= HOUSEKEEPING_INTERVAL {
            last_housekeeping = Instant::now();
            let expired = table.tracker().expire(Instant::now(), table.grace);
            if expired > 0 {
                table.table_changed();
            }
        }
        std::thread::sleep(spacing.after(records));
        // Batching perf buffers do not say when they hold a record: they are read on a timer.
        let batching = mmap_records
            .as_ref()
            .is_some_and(|r| r.mode() == Mode::Batching);
        wakeup.wait(if batching {
            BATCHED_READ
        } else {
            HOUSEKEEPING_INTERVAL
        });
    }
}

/// Hands the library mappings the perf buffers hold to `mappings`; how many executable
/// mappings they held.
fn read_perf(perf: &mut MmapRecords, mappings: &mut Vec<LibraryMap>, counters: &Counters) -> usize {
    let before = perf.mappings();
    perf.drain(classify_name, |map| mappings.push(map));
    counters
        .library_map_lost
        .store(perf.lost(), Ordering::Relaxed);
    (perf.mappings() - before) as usize
}

/// Reopens the perf buffers in `mode` (when it is not theirs already), their records into
/// `mappings`, and lets their new fds wake the thread.
fn switch_mode(
    records: &mut MmapRecords,
    mode: Mode,
    wakeup: &Wakeup,
    mappings: &mut Vec<LibraryMap>,
) {
    if mode == records.mode() {
        return;
    }
    if let Err(e) = records.set_mode(mode, classify_name, |map| mappings.push(map)) {
        tracing::warn!(error = %e, ?mode, "cannot reopen the perf buffers of library mappings");
        return;
    }
    tracing::debug!(?mode, "perf buffers of library mappings reopened");
    for fd in records.fds() {
        if let Err(e) = wakeup.add(fd) {
            tracing::warn!(error = %e, "cannot wait on a perf buffer: read on the timer only");
        }
    }
}

fn on_exec(table: &Table, rec: ExecRecord) {
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
        if let Ok(full) = table.proc.cmdline(pid) {
            if !full.is_empty() {
                facts.argv = full;
            }
        }
    }
    if facts.ppid == 0 {
        facts.ppid = table.proc.sample(pid).map(|s| s.ppid).unwrap_or(0);
    }
    match observe_with_env(table, &mut facts, How::New) {
        Observed::Added(id) => log_detected(table, pid, &id, "exec"),
        Observed::Dropped => {
            tracing::warn!(pid, "process table full (--max-processes): not tracked");
        }
        _ => {}
    }
}

/// A tracked process forked without exec (the kernel reports only those): the child runs
/// the same program, so it is classified from the parent's program and its own command line.
/// A fork that execs soon after is re-classified by its exec event.
fn on_fork(table: &Table, pid: u32, ppid: u32) {
    let Some(parent) = table.tracker().get(ppid).cloned() else {
        return;
    };
    let mut facts = ProcessFacts {
        pid,
        ppid,
        comm: parent.name,
        exe: parent.exe,
        argv: table.proc.cmdline(pid).unwrap_or_default(),
        env: Vec::new(),
        libraries: Vec::new(),
    };
    if let Observed::Added(id) = observe_with_env(table, &mut facts, How::New) {
        tracing::debug!(
            pid,
            ppid,
            role = id.role.as_str(),
            "forked child of an LLM process"
        );
    }
}
