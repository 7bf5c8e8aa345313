//! The agent's JSON API for programs (`llmscope top`, scripts): `GET /api/v1/processes`, one
//! snapshot of the node — its GPUs, and every tracked process with its identity, /proc
//! reading, NVML share, CUDA totals and request totals.
//!
//! Versioned by its path and `api_version`: within a version fields are only added (readers
//! ignore what they do not know); removing a field or changing its meaning is a new version.
//! Counters are totals since the process was first seen; a reader takes rates between two
//! snapshots. Absent (`null`) means not known, never 0.

use serde::{Deserialize, Serialize};

use crate::metrics::{BuildInfo, ProcessSample};
use crate::state::GpuSample;

/// This API's version (its path is `/api/v{VERSION}/processes`).
pub const VERSION: u32 = 1;
pub const PATH: &str = "/api/v1/processes";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub api_version: u32,
    pub agent: Agent,
    pub gpus: Vec<Gpu>,
    pub processes: Vec<Process>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Agent {
    pub version: String,
    /// `ebpf` (the Linux agent) or `polling` (windows-fallback).
    pub mode: String,
}

/// One GPU as NVML (windows-fallback: nvidia-smi) last saw it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Gpu {
    pub index: u32,
    pub name: String,
    pub uuid: String,
    pub utilization_percent: Option<f64>,
    pub memory_used_bytes: Option<f64>,
    pub memory_total_bytes: Option<f64>,
    pub temperature_celsius: Option<f64>,
    pub power_watts: Option<f64>,
}

/// One tracked process (live, or exited within the grace period).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Process {
    pub pid: u32,
    pub ppid: u32,
    pub name: String,
    pub framework: String,
    pub model_name: String,
    pub llm_type: String,
    /// `server`, `worker` or `script`.
    pub role: String,
    pub container: String,
    pub pod: String,
    pub namespace: String,
    pub alive: bool,
    /// Percent of one core over the sampler's last window.
    pub cpu_percent: Option<f64>,
    pub cpu_seconds: f64,
    /// Resident set size.
    pub memory_bytes: u64,
    pub start_time_seconds: f64,
    /// Its share of the GPUs as NVML (windows-fallback: nvidia-smi) reports it, summed over
    /// GPUs.
    pub gpu: Option<ProcessGpu>,
    /// What the CUDA probes counted.
    pub cuda: Option<ProcessCuda>,
    /// What request telemetry measured (servers it follows).
    pub requests: Option<ProcessRequests>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ProcessGpu {
    pub memory_bytes: Option<f64>,
    pub sm_utilization_percent: Option<f64>,
}

/// One process's CUDA totals. Per counter, the larger of the two API layers: a runtime call
/// may also reach a probed driver function, so the layers are never added.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ProcessCuda {
    /// Live device memory from the allocations and frees seen.
    pub device_memory_bytes: u64,
    /// Kernel launches (extrapolated while launches are sampled).
    pub kernel_launches: f64,
    pub graph_launches: f64,
    /// Bytes copied, every direction.
    pub memcpy_bytes: f64,
    /// Time the CPU waited in synchronize calls.
    pub sync_seconds: f64,
    pub alloc_bytes: f64,
    /// Allocations that failed with out-of-memory.
    pub ooms: u64,
    /// Calls that returned an error (OOMs included).
    pub errors: u64,
}

/// One server's request totals.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ProcessRequests {
    /// Inference requests answered (every status).
    pub requests: u64,
    /// Their durations, summed: with `requests`, the mean latency over any interval.
    pub duration_seconds_sum: f64,
    /// Requests answered with a 5xx status.
    pub server_errors: u64,
    /// Requests read whose responses have not ended.
    pub in_flight: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// What one snapshot is made of; each part as its producer last published it.
pub struct Parts<'a> {
    pub build: BuildInfo,
    pub samples: &'a [ProcessSample],
    pub nvml: Option<&'a GpuSample>,
    pub cuda: &'a std::collections::BTreeMap<u32, ProcessCuda>,
    pub requests: &'a std::collections::BTreeMap<u32, ProcessRequests>,
}

impl Node {
    pub fn new(parts: Parts<'_>) -> Node {
        let gpus = parts
            .nvml
            .map(|s| {
                s.devices
                    .iter()
                    .map(|d| Gpu {
                        index: d.index,
                        name: d.name.clone(),
                        uuid: d.uuid.clone(),
                        utilization_percent: d.utilization_percent,
                        memory_used_bytes: d.memory_used_bytes,
                        memory_total_bytes: d.memory_total_bytes,
                        temperature_celsius: d.temperature_celsius,
                        power_watts: d.power_watts,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let processes = parts
            .samples
            .iter()
            .filter_map(|s| {
                let pid: u32 = s.labels.pid.parse().ok()?;
                let gpu = parts.nvml.and_then(|n| {
                    let mine: Vec<_> = n.processes.iter().filter(|p| p.pid == pid).collect();
                    let sum = |f: fn(&crate::state::ProcessGpu) -> Option<f64>| {
                        mine.iter().filter_map(|p| f(p)).reduce(|a, b| a + b)
                    };
                    (!mine.is_empty()).then(|| ProcessGpu {
                        memory_bytes: sum(|p| p.memory_bytes),
                        sm_utilization_percent: sum(|p| p.sm_utilization_percent),
                    })
                });
                let l = &s.labels;
                Some(Process {
                    pid,
                    ppid: s.ppid,
                    name: l.name.clone(),
                    framework: l.framework.clone(),
                    model_name: l.model_name.clone(),
                    llm_type: l.llm_type.clone(),
                    role: l.role.clone(),
                    container: l.container.container.clone(),
                    pod: l.container.pod.clone(),
                    namespace: l.container.namespace.clone(),
                    alive: s.alive,
                    cpu_percent: s.cpu_percent,
                    cpu_seconds: s.cpu_seconds,
                    memory_bytes: s.memory_bytes,
                    start_time_seconds: s.start_time_seconds,
                    gpu,
                    cuda: parts.cuda.get(&pid).cloned(),
                    requests: parts.requests.get(&pid).cloned(),
                })
            })
            .collect();
        Node {
            api_version: VERSION,
            agent: Agent {
                version: parts.build.version,
                mode: parts.build.mode,
            },
            gpus,
            processes,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;
    use crate::metrics::{ContainerLabels, ProcessLabels};
    use crate::state::{DeviceSample, ProcessGpu as NvmlProcess};

    fn keys(v: &serde_json::Value) -> BTreeSet<String> {
        v.as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// The README documents the API with an example and a list: both name exactly the
    /// fields a snapshot has.
    #[test]
    fn the_readme_documents_every_field() {
        let readme =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
        let section = &readme[readme.find("**`/api/v1/processes`**").expect("the section")..];
        let json = &section[section.find("```json").unwrap() + 7..];
        let example: serde_json::Value =
            serde_json::from_str(&json[..json.find("```").unwrap()]).expect("valid JSON");
        let listed: BTreeSet<String> = section[section.find("`requests` (for servers").unwrap()..]
            .split_once(" has ")
            .unwrap()
            .1
            .split('.')
            .next()
            .unwrap()
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect();

        let mut labels = ProcessLabels::new(
            7,
            "vllm",
            &crate::identity::Identity::new(
                crate::identity::Framework::Vllm,
                crate::identity::Role::Server,
                None,
            ),
        );
        labels.container = ContainerLabels::default();
        let samples = [ProcessSample {
            labels,
            ppid: 1,
            alive: true,
            cpu_seconds: 1.0,
            cpu_percent: Some(1.0),
            memory_bytes: 1,
            threads: Some(1),
            start_time_seconds: 1.0,
        }];
        let nvml = GpuSample {
            devices: vec![DeviceSample {
                index: 0,
                ..DeviceSample::default()
            }],
            processes: vec![NvmlProcess {
                pid: 7,
                memory_bytes: Some(1.0),
                ..NvmlProcess::default()
            }],
            ..GpuSample::default()
        };
        let node = Node::new(Parts {
            build: BuildInfo::new("ebpf"),
            samples: &samples,
            nvml: Some(&nvml),
            cuda: &BTreeMap::from([(7, ProcessCuda::default())]),
            requests: &BTreeMap::from([(7, ProcessRequests::default())]),
        });
        let ours = serde_json::to_value(&node).unwrap();
        let p = &ours["processes"][0];
        let documented = &example["processes"][0];
        for (what, a, b) in [
            ("node", &ours, &example),
            ("agent", &ours["agent"], &example["agent"]),
            ("gpu", &ours["gpus"][0], &example["gpus"][0]),
            ("process", p, documented),
            ("process gpu", &p["gpu"], &documented["gpu"]),
            ("process cuda", &p["cuda"], &documented["cuda"]),
        ] {
            assert_eq!(
                keys(a),
                keys(b),
                "{what}: the code's fields, then the README's"
            );
        }
        assert_eq!(keys(&p["requests"]), listed, "requests");
        assert_eq!(ours["api_version"], VERSION);
    }
}
