//! Per-process CUDA counters, read from the kernel's maps at scrape time and joined to the
//! process identities. Each process image's counters carry a generation: a live process
//! shows its current image's, an exited one (in its grace period) its last image's, and
//! nothing of another image is ever shown under its pid. Removing what ended is the events
//! thread's job (`agent::cuda::sweep`); a scrape changes nothing.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use agent_common::cuda::{
    CUDA_OOM, DIR_D2D, DIR_D2H, DIR_DEFAULT, DIR_H2D, DIR_H2H, FUNCTIONS, KIND_ALLOC, KIND_FREE,
    KIND_GRAPH, KIND_LAUNCH, KIND_MEMCPY, KIND_SYNC,
};

use crate::agent::Shared;
use crate::cuda::library::api_name;
use crate::metrics::cuda::{Api, ApiDirection, ApiFunction, ApiFunctionCode, LaunchMode};
use crate::metrics::{CollectError, Collector, KindCount, ProcessLabels, Snapshot};

pub struct CudaCollector {
    shared: Arc<Shared>,
}

impl CudaCollector {
    pub fn new(shared: Arc<Shared>) -> Self {
        CudaCollector { shared }
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

impl Collector for CudaCollector {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn collect(&mut self, snapshot: &mut Snapshot) -> Result<(), CollectError> {
        let tracked = self.shared.tracker().all();
        let labels: HashMap<u32, ProcessLabels> = tracked
            .iter()
            .map(|t| (t.pid, ProcessLabels::new(t.pid, &t.name, &t.identity)))
            .collect();
        let (stats, live) = {
            let retired = self.shared.cuda.retired();
            let maps = self.shared.cuda.maps();
            let current: HashMap<u32, u32> = maps.seen.iter().filter_map(Result::ok).collect();
            // The one image whose counters each tracked pid shows.
            let generation: HashMap<u32, u32> = tracked
                .iter()
                .filter_map(|t| {
                    let g = if t.is_alive() {
                        current.get(&t.pid).copied()
                    } else {
                        retired.latest(t.pid)
                    };
                    g.map(|g| (t.pid, g))
                })
                .collect();
            let stats: Vec<_> = maps
                .stats
                .iter()
                .filter_map(Result::ok)
                .filter(|(k, _)| generation.get(&k.tgid) == Some(&k.generation))
                .collect();
            // Live bytes are the current image's (the kernel drops them at exit and exec).
            let alive: HashSet<u32> = tracked
                .iter()
                .filter(|t| t.is_alive())
                .map(|t| t.pid)
                .collect();
            let live: Vec<_> = maps
                .live
                .iter()
                .filter_map(Result::ok)
                .filter(|(tgid, _)| alive.contains(tgid))
                .collect();
            (stats, live)
        };
        let (mode, duty, period, cycle_cpu, cycle_wall, launch_totals) = {
            let launches = self.shared.cuda.launches();
            let totals: HashMap<(u32, u8), f64> = stats
                .iter()
                .filter_map(|(k, _)| {
                    launches
                        .total((k.tgid, k.generation, k.function))
                        .map(|t| ((k.tgid, k.function), t))
                })
                .collect();
            (
                launches.mode,
                launches.duty,
                launches.period,
                launches.cycle_cpu,
                launches.cycle_wall,
                totals,
            )
        };

        let mut calls: Sums<(u32, u8)> = BTreeMap::new();
        let mut errors: Sums<(u32, u8, u16)> = BTreeMap::new();
        let mut oom: Sums<u32> = BTreeMap::new();
        let mut alloc_bytes: Sums<(u32, u8)> = BTreeMap::new();
        let mut frees: Sums<(u32, u8)> = BTreeMap::new();
        let mut launches: Sums<(u32, u8)> = BTreeMap::new();
        let mut graphs: Sums<(u32, u8)> = BTreeMap::new();
        let mut copies: Sums<(u32, u8, u8)> = BTreeMap::new();
        let mut syncs: Sums<(u32, u8)> = BTreeMap::new();
        for (k, v) in &stats {
            // Every CUDA process has an OOM counter from its first call, at 0 until an OOM:
            // increase() cannot see growth in a series' first sample.
            oom.entry(k.tgid).or_default();
            let Some(f) = FUNCTIONS.get(k.function as usize) else {
                continue;
            };
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
            let per_api = (k.tgid, f.api);
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
            .into_iter()
            .map(|(tgid, bytes)| (l(&tgid), (bytes as i64).max(0) as f64))
            .collect();
        device_memory.sort_by(|a, b| a.0.pid.cmp(&b.0.pid));
        cuda.device_memory = device_memory;

        let attacher = self.shared.cuda.attacher_stats();
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
        cuda.detach_backlog = self
            .shared
            .cuda
            .detach_backlog
            .load(std::sync::atomic::Ordering::Relaxed);
        cuda.launch_attached_seconds = attacher.launches_attached_seconds();
        cuda.attach_failures = attacher
            .failures
            .iter()
            .map(|(&kind, &value)| KindCount { kind, value })
            .collect();
        cuda.launch_mode = mode;
        cuda.launch_duty = duty;
        cuda.launch_period_seconds = period.as_secs_f64();
        cuda.launch_cycle_cpu_seconds = cycle_cpu.as_secs_f64();
        cuda.launch_cycle_wall_seconds = cycle_wall.as_secs_f64();
        cuda.attach_requests_dropped = self.shared.cuda.attach_requests_dropped();
        cuda.library_hook = self.shared.cuda.mmap_hook.as_str();

        Ok(())
    }
}
