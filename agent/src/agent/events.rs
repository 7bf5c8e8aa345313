//! The events thread: drains the ring buffer every [`DRAIN_INTERVAL`], turns exec records
//! into facts and classifies them, classifies interpreters when they map a framework's
//! library, and retires what ended (processes, CUDA counter generations; the sampler
//! removes retired counters from the kernel maps).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aya::maps::{MapData, RingBuf};

use super::health::Health;
use super::observe::{log_detected, observe_with_env, How};
use super::table::Table;
use super::CudaState;
use super::DRAIN_INTERVAL;
use crate::cuda::library::classify_name;
use crate::ebpf::perf_mmap::MmapRecords;
use crate::ebpf::{decode, ExecRecord, KernelEvent};
use crate::identity::ProcessFacts;
use crate::state::Counters;
use crate::tracker::Observed;

/// How often exited processes past their grace period are expired.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_millis(100);

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
    std::thread::Builder::new()
        .name("llmscope-events".into())
        .spawn(move || {
            let handles = Handles {
                table: &table,
                cuda: &cuda,
                counters: &counters,
            };
            run(handles, ring, mmap_records, &heartbeat);
        })
}

/// What the events thread writes.
#[derive(Clone, Copy)]
struct Handles<'a> {
    table: &'a Table,
    cuda: &'a CudaState,
    counters: &'a Counters,
}

/// The events thread beats every drain (10 ms); silent this long, it is reported stalled.
const STALL_LIMIT: Duration = Duration::from_secs(10);

fn run(
    Handles {
        table,
        cuda,
        counters,
    }: Handles,
    mut ring: RingBuf<MapData>,
    mut mmap_records: Option<MmapRecords>,
    heartbeat: &super::health::Heartbeat,
) {
    #[cfg(feature = "test-faults")]
    let fault = super::faults::EventsFault::injected();
    let mut last_housekeeping = Instant::now();
    while !table.stopping() {
        heartbeat.beat();
        #[cfg(feature = "test-faults")]
        fault.strike(|| table.stopping());
        // Library mappings from the perf records are taken before the ring is read, and
        // handled after it: every exec that preceded a mapping is in the ring by then, so a
        // process is never tracked from its mapping before its exec is seen (and detected
        // twice). A process whose exit is read here made its mappings before it: they are
        // dropped (the kernel reports every process's exit, tracked or not).
        let drain_started = Instant::now();
        let mut mappings = Vec::new();
        let mut exited = std::collections::HashSet::new();
        if let Some(records) = &mut mmap_records {
            records.drain(classify_name, |map| mappings.push(map));
            counters
                .library_map_lost
                .store(records.lost(), Ordering::Relaxed);
        }
        while let Some(item) = ring.next() {
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
                    if !mappings.is_empty() {
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
        std::thread::sleep(DRAIN_INTERVAL);
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
