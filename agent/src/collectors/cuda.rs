//! Per-process CUDA counters, read from the kernel's maps at scrape time and joined to the
//! process identities; entries of processes that are gone are removed from the maps.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use agent_common::cuda::{
    AllocKey, CUDA_OOM, DIR_D2D, DIR_D2H, DIR_DEFAULT, DIR_H2D, DIR_H2H, FUNCTIONS, KIND_ALLOC,
    KIND_FREE, KIND_GRAPH, KIND_LAUNCH, KIND_MEMCPY, KIND_SYNC,
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
        let labels: HashMap<u32, ProcessLabels> = self
            .shared
            .tracker()
            .all()
            .into_iter()
            .map(|t| (t.pid, ProcessLabels::new(t.pid, &t.name, &t.identity)))
            .collect();
        let (stats, live) = {
            let maps = self.shared.cuda.maps();
            let stats: Vec<_> = maps.stats.iter().filter_map(Result::ok).collect();
            let live: Vec<_> = maps.live.iter().filter_map(Result::ok).collect();
            (stats, live)
        };
        let (mode, duty, launch_totals) = {
            let mut launches = self.shared.cuda.launches();
            launches.retain(|tgid| labels.contains_key(&tgid));
            let totals: HashMap<(u32, u8), f64> = stats
                .iter()
                .filter_map(|(k, _)| {
                    launches
                        .total(k.tgid, k.function)
                        .map(|t| ((k.tgid, k.function), t))
                })
                .collect();
            (launches.mode, launches.duty, totals)
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
        let mut gone: HashSet<u32> = HashSet::new();
        for (k, v) in &stats {
            if !labels.contains_key(&k.tgid) {
                gone.insert(k.tgid);
                continue;
            }
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
        let mut device_memory = Vec::new();
        for (tgid, bytes) in live {
            match labels.get(&tgid) {
                // Frees subtract in two's complement; a free seen without its allocation
                // (probes attached mid-run) cannot take the total below zero.
                Some(l) => device_memory.push((l.clone(), (bytes as i64).max(0) as f64)),
                None => {
                    gone.insert(tgid);
                }
            }
        }
        device_memory.sort_by(|a, b| a.0.pid.cmp(&b.0.pid));
        cuda.device_memory = device_memory;

        {
            let attacher = self.shared.cuda.attacher();
            cuda.attachments = attacher.probes() as u64;
            cuda.libraries = attacher
                .libraries()
                .into_iter()
                .map(|(kind, n)| KindCount {
                    kind,
                    value: n as u64,
                })
                .collect();
            cuda.attach_failures = attacher
                .failures()
                .iter()
                .map(|(&kind, &value)| KindCount { kind, value })
                .collect();
        }
        cuda.launch_mode = mode;
        cuda.launch_duty = duty;

        gone.retain(|tgid| !self.shared.proc.path().join(tgid.to_string()).exists());
        if !gone.is_empty() {
            self.forget(&gone, &stats);
        }
        Ok(())
    }
}

impl CudaCollector {
    /// Removes every kernel map entry of processes that are gone and no longer tracked.
    fn forget(
        &self,
        gone: &HashSet<u32>,
        stats: &[(agent_common::cuda::CudaKey, agent_common::cuda::CudaStat)],
    ) {
        let mut maps = self.shared.cuda.maps();
        for (k, _) in stats.iter().filter(|(k, _)| gone.contains(&k.tgid)) {
            let _ = maps.stats.remove(k);
        }
        let allocations: Vec<AllocKey> = maps
            .allocs
            .keys()
            .filter_map(Result::ok)
            .filter(|k| gone.contains(&k.tgid))
            .collect();
        for k in &allocations {
            let _ = maps.allocs.remove(k);
        }
        for tgid in gone {
            let _ = maps.live.remove(tgid);
            let _ = maps.seen.remove(tgid);
        }
    }
}
