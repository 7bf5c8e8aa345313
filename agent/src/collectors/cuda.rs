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

use crate::cuda::attach::AttacherStats;
use crate::cuda::library::api_name;
use crate::metrics::cuda::{Api, ApiDirection, ApiFunction, ApiFunctionCode, LaunchMode};
use crate::metrics::{CollectError, Collector, KindCount, ProcessLabels, Snapshot};
use crate::state::{Member, ProcessView, Published};

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
    pub cycle_cpu: Duration,
    pub cycle_wall: Duration,
    pub attacher: AttacherStats,
    pub detach_backlog: u64,
    pub attach_requests_dropped: u64,
    pub library_hook: &'static str,
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

    fn collect(&self, snapshot: &mut Snapshot) -> Result<(), CollectError> {
        let view = self.processes.get();
        let labels: HashMap<u32, &ProcessLabels> =
            view.members.iter().map(|m| (m.pid, &m.labels)).collect();
        let reading = self.source.read(&view.members);
        let (stats, live, launch_totals, mode) = (
            &reading.stats,
            &reading.live,
            &reading.launch_totals,
            reading.launch_mode,
        );

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
                    *copies.entry((k.tgid, f.api, k.direction)).or_default() += v.bytes as f64
                }
                KIND_SYNC => *syncs.entry(per_api).or_default() += v.nanos as f64 / 1e9,
                _ => {}
            }
        }

        // Every key comes from a member (the source reads members' images only).
        let l = |tgid: &u32| labels[tgid].clone();
        let api = |a: u8| Api {
            api: api_name(a).to_owned(),
        };
        let per_api = |sums: Sums<(u32, u8)>| {
            sums.into_iter()
                .map(|((t, a), v)| ((l(&t), api(a)), v))
                .collect()
        };
        let cuda = &mut snapshot.cuda;
        cuda.calls = calls
            .into_iter()
            .map(|((t, f), v)| {
                let f = &FUNCTIONS[f as usize];
                (
                    (
                        l(&t),
                        ApiFunction {
                            api: api_name(f.api).to_owned(),
                            function: f.name.to_owned(),
                        },
                    ),
                    v,
                )
            })
            .collect();
        cuda.errors = errors
            .into_iter()
            .map(|((t, f, code), v)| {
                let f = &FUNCTIONS[f as usize];
                let labels = ApiFunctionCode {
                    api: api_name(f.api).to_owned(),
                    function: f.name.to_owned(),
                    code: code.to_string(),
                };
                ((l(&t), labels), v)
            })
            .collect();
        cuda.oom = oom.into_iter().map(|(t, v)| (l(&t), v)).collect();
        cuda.alloc_bytes = per_api(alloc_bytes);
        cuda.frees = per_api(frees);
        cuda.launches = per_api(launches);
        cuda.graph_launches = per_api(graphs);
        cuda.sync_seconds = per_api(syncs);
        cuda.memcpy_bytes = copies
            .into_iter()
            .map(|((t, a, d), v)| {
                (
                    (
                        l(&t),
                        ApiDirection {
                            api: api_name(a).to_owned(),
                            direction: direction_name(d).to_owned(),
                        },
                    ),
                    v,
                )
            })
            .collect();
        // Frees subtract in two's complement; a free seen without its allocation (probes
        // attached mid-run) cannot take the total below zero.
        let mut device_memory: Vec<_> = live
            .iter()
            .map(|(tgid, bytes)| (l(tgid), (*bytes as i64).max(0) as f64))
            .collect();
        device_memory.sort_by(|a, b| a.0.pid.cmp(&b.0.pid));
        cuda.device_memory = device_memory;

        let attacher = &reading.attacher;
        cuda.attachments = attacher.probes as u64;
        cuda.libraries = attacher
            .libraries
            .iter()
            .map(|&(kind, n)| KindCount {
                kind,
                value: n as u64,
            })
            .collect();
        cuda.library_detaches = attacher.detached;
        cuda.detach_backlog = reading.detach_backlog;
        cuda.launch_attached_seconds = attacher.launches_attached_seconds();
        cuda.attach_failures = attacher
            .failures
            .iter()
            .map(|(&kind, &value)| KindCount { kind, value })
            .collect();
        cuda.launch_mode = mode;
        cuda.launch_duty = reading.duty;
        cuda.launch_period_seconds = reading.period.as_secs_f64();
        cuda.launch_cycle_cpu_seconds = reading.cycle_cpu.as_secs_f64();
        cuda.launch_cycle_wall_seconds = reading.cycle_wall.as_secs_f64();
        cuda.attach_requests_dropped = reading.attach_requests_dropped;
        cuda.library_hook = reading.library_hook;

        Ok(())
    }
}
