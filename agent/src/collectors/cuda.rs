//! Per-process CUDA counters, read from the kernel's maps at scrape time and joined to the
//! process identities. Each process image's counters carry a generation: a live process
//! shows its current image's, an exited one (in its grace period) its last image's, and
//! nothing of another image is ever shown under its pid. Removing what ended is the events
//! thread's job (`agent::cuda::sweep`); a scrape changes nothing.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use agent_common::cuda::{
    CudaKey, CudaStat, CUDA_OOM, DIR_D2D, DIR_D2H, DIR_DEFAULT, DIR_H2D, DIR_H2H, FUNCTIONS,
    KIND_ALLOC, KIND_FREE, KIND_GRAPH, KIND_LAUNCH, KIND_MEMCPY, KIND_SYNC,
};

use prometheus_client::encoding::EncodeLabelSet;

use crate::api::ProcessCuda;
use crate::cuda::attach::AttacherStats;
use crate::cuda::launches::{CycleCost, LaunchMode};
use crate::cuda::library::api_name;
use crate::metrics::{CollectError, Collector, Families, Family, ProcessLabels};
use crate::state::{Member, ProcessView, Published};

static CALLS: Family = Family::counter("llm_process_cuda_calls", "CUDA API calls by API layer and function. Runtime calls may also reach probed driver functions: never add the two layers.");
static ERRORS: Family = Family::counter("llm_process_cuda_errors", "CUDA API calls that returned an error, by function and error code (functions with return probes: not kernel launches).");
static OOM: Family = Family::counter("llm_process_cuda_oom", "CUDA allocations that failed with out-of-memory (cudaErrorMemoryAllocation / CUDA_ERROR_OUT_OF_MEMORY).");
static ALLOC_BYTES: Family = Family::counter(
    "llm_process_cuda_alloc_bytes",
    "Bytes of device memory allocated successfully.",
);
static FREES: Family = Family::counter("llm_process_cuda_free", "Device memory frees.");
static DEVICE_MEMORY: Family = Family::gauge(
    "llm_process_cuda_device_memory_bytes",
    "Live device memory from allocation/free pairs seen by the probes.",
);
static LAUNCHES: Family = Family::counter(
    "llm_process_cuda_kernel_launches",
    "Kernel launches (cudaLaunchKernel*, cuLaunchKernel*), counted exactly.",
);
/// The same family while launches are sampled: its help says so.
static LAUNCHES_SAMPLED: Family = Family::counter("llm_process_cuda_kernel_launches", "Kernel launches. EXTRAPOLATED: launch probes are attached for a window of each period (--cuda-overhead-budget); see llmscope_cuda_launch_probe_duty_ratio.");
static GRAPH_LAUNCHES: Family =
    Family::counter("llm_process_cuda_graph_launches", "CUDA graph launches.");
static MEMCPY_BYTES: Family = Family::counter(
    "llm_process_cuda_memcpy_bytes",
    "Bytes copied by cudaMemcpy* / cuMemcpy*, by direction (h2d, d2h, d2d, h2h, default).",
);
static SYNC_SECONDS: Family = Family::counter(
    "llm_process_cuda_sync_seconds",
    "Time the CPU waited in stream / device / event / context synchronize calls.",
);
static ATTACHMENTS: Family = Family::gauge(
    "llmscope_uprobe_attachments",
    "Uprobe links attached to CUDA libraries now.",
);
static LIBRARIES: Family = Family::gauge(
    "llmscope_cuda_libraries",
    "CUDA library files probed, by API.",
);
static ATTACH_FAILURES: Family = Family::counter(
    "llmscope_uprobe_attach_failures",
    "CUDA libraries that could not be probed, by reason.",
);
static LIBRARY_DETACHES: Family = Family::counter("llmscope_cuda_library_detaches", "CUDA library files whose probes were removed because no process mapped them any more (--cuda-library-idle-timeout).");
static DETACH_BACKLOG: Family = Family::gauge("llmscope_uprobe_detach_backlog", "Uprobe links of removed libraries not detached yet: each detach waits for a kernel grace period, done while no attach waits.");
static ATTACH_REQUESTS_DROPPED: Family = Family::counter("llmscope_cuda_attach_requests_dropped", "Requests to probe a newly mapped CUDA library dropped because the attach queue was full; the next /proc scan probes the library.");
static LIBRARY_HOOK: Family = Family::gauge("llmscope_library_hook", "How the kernel reports libraries being mapped: fentry or kprobe on security_mmap_file, or none (found by /proc scans only); always 1.");
static LAUNCH_COUNTING: Family = Family::gauge(
    "llmscope_cuda_launch_counting",
    "How kernel launches are counted now (exact, sampled or off); always 1.",
);
static LAUNCH_DUTY: Family = Family::gauge(
    "llmscope_cuda_launch_probe_duty_ratio",
    "Fraction of the next period the kernel-launch probes will be attached.",
);
static LAUNCH_ATTACHED: Family = Family::counter(
    "llmscope_cuda_launch_probe_attached_seconds",
    "Time the kernel-launch probes were attached; its rate is the time-weighted duty.",
);
static LAUNCH_PERIOD: Family = Family::gauge(
    "llmscope_cuda_launch_probe_period_seconds",
    "Period of the launch-probe duty cycle in use (lengthened when a cycle is costly).",
);
static LAUNCH_CYCLE_CPU: Family = Family::gauge("llmscope_cuda_launch_probe_cycle_cpu_seconds", "CPU time one attach and detach of the launch probes cost the agent (median of the last cycles); charged to --cuda-overhead-budget.");
static LAUNCH_CYCLE_WALL: Family = Family::gauge("llmscope_cuda_launch_probe_cycle_wall_seconds", "Wall time one attach and detach of the launch probes took (median of the last cycles; detaches wait for RCU grace periods).");
static LAUNCH_HIT_COST: Family = Family::gauge("llmscope_cuda_launch_probe_hit_seconds", "What one launch-probe hit costs a probed thread on this host, measured at start-up (the launch estimates give it back); only while launches are sampled.");
static LAUNCH_CYCLE_STALL: Family = Family::gauge("llmscope_cuda_launch_probe_cycle_stall_seconds", "Stall one detach of the launch probes costs the busiest probed process: an RCU grace period per launch function it called (median of the last cycles); charged to --cuda-overhead-budget.");

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct Api {
    api: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ApiFunction {
    api: &'static str,
    function: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ApiFunctionCode {
    api: &'static str,
    function: &'static str,
    code: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ApiDirection {
    api: &'static str,
    direction: &'static str,
}

/// What the CUDA collector reads, and nothing more: implemented by the agent's CUDA state.
pub trait CudaSource: Send + Sync {
    /// The counters of the image each member shows (a live process: its current image; an
    /// exited one: its last), and the live device bytes of the live members.
    fn read(&self, members: &[Member]) -> CudaReading;
}

/// One read of the CUDA state.
#[derive(Debug, Default)]
pub struct CudaReading {
    pub stats: Vec<(CudaKey, CudaStat)>,
    pub live: Vec<(u32, u64)>,
    /// Estimated launches per (tgid, function) when launches are sampled.
    pub launch_totals: HashMap<(u32, u8), f64>,
    pub launch_mode: LaunchMode,
    pub duty: f64,
    pub period: Duration,
    pub cycle: CycleCost,
    /// What one launch-probe hit costs here, when launches are sampled.
    pub hit_cost: Option<Duration>,
    pub attacher: AttacherStats,
    pub detach_backlog: u64,
    pub attach_requests_dropped: u64,
    pub library_hook: &'static str,
}

/// The counters of one reading summed per process (and per API, function, direction): what
/// the families show, and what the JSON API totals.
struct CudaSums {
    calls: Sums<(u32, u8)>,
    errors: Sums<(u32, u8, u16)>,
    oom: Sums<u32>,
    alloc_bytes: Sums<(u32, u8)>,
    frees: Sums<(u32, u8)>,
    launches: Sums<(u32, u8)>,
    graphs: Sums<(u32, u8)>,
    copies: Sums<(u32, u8, u8)>,
    syncs: Sums<(u32, u8)>,
}

impl CudaSums {
    fn of(reading: &CudaReading) -> CudaSums {
        let (stats, launch_totals, mode) =
            (&reading.stats, &reading.launch_totals, reading.launch_mode);

        let mut calls: Sums<(u32, u8)> = BTreeMap::new();
        let mut errors: Sums<(u32, u8, u16)> = BTreeMap::new();
        let mut oom: Sums<u32> = BTreeMap::new();
        let mut alloc_bytes: Sums<(u32, u8)> = BTreeMap::new();
        let mut frees: Sums<(u32, u8)> = BTreeMap::new();
        let mut launches: Sums<(u32, u8)> = BTreeMap::new();
        let mut graphs: Sums<(u32, u8)> = BTreeMap::new();
        let mut copies: Sums<(u32, u8, u8)> = BTreeMap::new();
        let mut syncs: Sums<(u32, u8)> = BTreeMap::new();
        for (k, v) in stats {
            let Some(f) = FUNCTIONS.get(k.function as usize) else {
                continue;
            };
            // Every CUDA process has its counters from its first call, at 0 until something
            // happens (increase() cannot see growth in a series' first sample): OOMs, and per
            // API it called, allocated bytes, frees, launches, graph launches, sync time and
            // the usual copy directions.
            oom.entry(k.tgid).or_default();
            let per_api = (k.tgid, f.api);
            for sums in [
                &mut alloc_bytes,
                &mut frees,
                &mut launches,
                &mut graphs,
                &mut syncs,
            ] {
                sums.entry(per_api).or_default();
            }
            for d in USUAL_DIRECTIONS {
                copies.entry((k.tgid, f.api, d)).or_default();
            }
            if k.code != 0 {
                *errors.entry((k.tgid, k.function, k.code)).or_default() += v.calls as f64;
                if f.kind == KIND_ALLOC && i32::from(k.code) == CUDA_OOM {
                    *oom.entry(k.tgid).or_default() += v.calls as f64;
                }
                continue;
            }
            let n = match (f.kind, mode) {
                (KIND_LAUNCH, LaunchMode::Sampled) => launch_totals
                    .get(&(k.tgid, k.function))
                    .copied()
                    .unwrap_or(0.0),
                _ => v.calls as f64,
            };
            *calls.entry((k.tgid, k.function)).or_default() += n;
            match f.kind {
                KIND_ALLOC => *alloc_bytes.entry(per_api).or_default() += v.bytes as f64,
                KIND_FREE => *frees.entry(per_api).or_default() += n,
                KIND_LAUNCH => *launches.entry(per_api).or_default() += n,
                KIND_GRAPH => *graphs.entry(per_api).or_default() += n,
                KIND_MEMCPY => {
                    *copies.entry((k.tgid, f.api, k.direction)).or_default() += v.bytes as f64;
                }
                KIND_SYNC => *syncs.entry(per_api).or_default() += v.nanos as f64 / 1e9,
                _ => {}
            }
        }

        CudaSums {
            calls,
            errors,
            oom,
            alloc_bytes,
            frees,
            launches,
            graphs,
            copies,
            syncs,
        }
    }
}

/// The CUDA totals of every process in `reading`.
pub fn per_process(reading: &CudaReading) -> BTreeMap<u32, ProcessCuda> {
    let s = CudaSums::of(reading);
    let mut out: BTreeMap<u32, ProcessCuda> = BTreeMap::new();
    let mut larger = |sums: &Sums<(u32, u8)>, field: fn(&mut ProcessCuda) -> &mut f64| {
        for (&(tgid, _), &v) in sums {
            let f = field(out.entry(tgid).or_default());
            *f = f.max(v);
        }
    };
    larger(&s.launches, |p| &mut p.kernel_launches);
    larger(&s.graphs, |p| &mut p.graph_launches);
    larger(&s.syncs, |p| &mut p.sync_seconds);
    larger(&s.alloc_bytes, |p| &mut p.alloc_bytes);
    let mut copies: Sums<(u32, u8)> = BTreeMap::new();
    for (&(tgid, api, _), &v) in &s.copies {
        *copies.entry((tgid, api)).or_default() += v;
    }
    larger(&copies, |p| &mut p.memcpy_bytes);
    for (&tgid, &n) in &s.oom {
        out.entry(tgid).or_default().ooms = n as u64;
    }
    for (&(tgid, _, _), &n) in &s.errors {
        out.entry(tgid).or_default().errors += n as u64;
    }
    for &(tgid, bytes) in &reading.live {
        out.entry(tgid).or_default().device_memory_bytes = (bytes as i64).max(0) as u64;
    }
    out
}

pub struct CudaCollector {
    source: Arc<dyn CudaSource>,
    processes: Arc<Published<ProcessView>>,
}

impl CudaCollector {
    pub fn new(source: Arc<dyn CudaSource>, processes: Arc<Published<ProcessView>>) -> Self {
        CudaCollector { source, processes }
    }
}

fn direction_name(direction: u8) -> &'static str {
    match direction {
        DIR_H2H => "h2h",
        DIR_H2D => "h2d",
        DIR_D2H => "d2h",
        DIR_D2D => "d2d",
        DIR_DEFAULT => "default",
        _ => "unknown",
    }
}

/// Sums per key, in key order (stable output).
type Sums<K> = BTreeMap<K, f64>;

/// The copy directions every CUDA process shows from its first call, at 0 until it copies.
const USUAL_DIRECTIONS: [u8; 3] = [DIR_H2D, DIR_D2H, DIR_D2D];

impl Collector for CudaCollector {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn collect(&self, out: &mut Families) -> Result<(), CollectError> {
        let view = self.processes.get();
        let labels: HashMap<u32, &ProcessLabels> =
            view.members.iter().map(|m| (m.pid, &m.labels)).collect();
        let reading = self.source.read(&view.members);
        let sums = CudaSums::of(&reading);
        let (live, mode) = (&reading.live, reading.launch_mode);

        // Every key comes from a member (the source reads members' images only).
        let l = |tgid: &u32| labels[tgid].clone();
        let api = |a: u8| Api { api: api_name(a) };
        let mut per_api = |family: &'static Family, values: Sums<(u32, u8)>| {
            out.extend(
                family,
                values.into_iter().map(|((t, a), v)| ((l(&t), api(a)), v)),
            );
        };
        per_api(&ALLOC_BYTES, sums.alloc_bytes);
        per_api(&FREES, sums.frees);
        let launch_family = match mode {
            LaunchMode::Sampled => &LAUNCHES_SAMPLED,
            _ => &LAUNCHES,
        };
        per_api(launch_family, sums.launches);
        per_api(&GRAPH_LAUNCHES, sums.graphs);
        per_api(&SYNC_SECONDS, sums.syncs);
        out.extend(
            &CALLS,
            sums.calls.into_iter().map(|((t, f), v)| {
                let f = &FUNCTIONS[f as usize];
                let function = ApiFunction {
                    api: api_name(f.api),
                    function: f.name,
                };
                ((l(&t), function), v)
            }),
        );
        out.extend(
            &ERRORS,
            sums.errors.into_iter().map(|((t, f, code), v)| {
                let f = &FUNCTIONS[f as usize];
                let labels = ApiFunctionCode {
                    api: api_name(f.api),
                    function: f.name,
                    code: code.to_string(),
                };
                ((l(&t), labels), v)
            }),
        );
        out.extend(&OOM, sums.oom.into_iter().map(|(t, v)| (l(&t), v)));
        out.extend(
            &MEMCPY_BYTES,
            sums.copies.into_iter().map(|((t, a, d), v)| {
                let direction = ApiDirection {
                    api: api_name(a),
                    direction: direction_name(d),
                };
                ((l(&t), direction), v)
            }),
        );
        // Frees subtract in two's complement; a free seen without its allocation (probes
        // attached mid-run) cannot take the total below zero.
        let mut device_memory: Vec<_> = live
            .iter()
            .map(|(tgid, bytes)| (*tgid, (*bytes as i64).max(0) as f64))
            .collect();
        device_memory.sort_by_key(|&(tgid, _)| tgid);
        out.extend(
            &DEVICE_MEMORY,
            device_memory.into_iter().map(|(t, v)| (l(&t), v)),
        );

        let attacher = &reading.attacher;
        out.set(&ATTACHMENTS, attacher.probes as f64);
        out.extend(
            &LIBRARIES,
            attacher
                .libraries
                .iter()
                .map(|&(kind, n)| ([("api", kind)], n as f64)),
        );
        out.extend(
            &ATTACH_FAILURES,
            attacher
                .failures
                .iter()
                .map(|(reason, &n)| ([("reason", reason.as_str())], n as f64)),
        );
        out.set(&LIBRARY_DETACHES, attacher.detached as f64);
        out.set(&DETACH_BACKLOG, reading.detach_backlog as f64);
        out.set(
            &ATTACH_REQUESTS_DROPPED,
            reading.attach_requests_dropped as f64,
        );
        out.add(&LIBRARY_HOOK, [("hook", reading.library_hook)], 1.0);
        out.add(&LAUNCH_COUNTING, [("mode", mode.as_str())], 1.0);
        out.set(&LAUNCH_DUTY, reading.duty);
        out.set(&LAUNCH_ATTACHED, attacher.launches_attached_seconds());
        out.set(&LAUNCH_PERIOD, reading.period.as_secs_f64());
        out.set(&LAUNCH_CYCLE_CPU, reading.cycle.cpu.as_secs_f64());
        out.set(&LAUNCH_CYCLE_WALL, reading.cycle.wall.as_secs_f64());
        out.set(&LAUNCH_CYCLE_STALL, reading.cycle.stall.as_secs_f64());
        if let Some(cost) = reading.hit_cost {
            out.set(&LAUNCH_HIT_COST, cost.as_secs_f64());
        }
        Ok(())
    }
}
