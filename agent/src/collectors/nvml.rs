//! GPU devices and per-process GPU memory and utilisation, from the NVML sampler's last
//! good sample (never from NVML itself: the scrape path must not wait on the driver). The
//! device gauges and the per-process GPU memory family are shared with windows-fallback,
//! which fills them from nvidia-smi ([`devices`], [`PROCESS_MEMORY`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;

use crate::metrics::{CollectError, Collector, Families, Family, ProcessLabels};
use crate::state::{DeviceSample, NvmlState, ProcessView, Published};

type Field = fn(&DeviceSample) -> Option<f64>;

/// The device gauges, each with how it is read from a sample: a device that does not
/// support one simply has no sample in it.
static DEVICE_GAUGES: [(Family, Field); 13] = [
    (
        Family::gauge(
            "nvidia_gpu_utilization",
            "GPU utilisation, percent of the last sample period.",
        ),
        |d| d.utilization_percent,
    ),
    (
        Family::gauge(
            "nvidia_gpu_memory_utilization",
            "GPU memory-controller utilisation, percent.",
        ),
        |d| d.memory_utilization_percent,
    ),
    (
        Family::gauge("nvidia_gpu_memory_used_bytes", "GPU memory in use."),
        |d| d.memory_used_bytes,
    ),
    (
        Family::gauge("nvidia_gpu_memory_total_bytes", "GPU memory in total."),
        |d| d.memory_total_bytes,
    ),
    (
        Family::gauge("nvidia_gpu_memory_free_bytes", "GPU memory free."),
        |d| d.memory_free_bytes,
    ),
    (
        Family::gauge(
            "nvidia_gpu_temperature",
            "GPU core temperature, degrees Celsius.",
        ),
        |d| d.temperature_celsius,
    ),
    (
        Family::gauge("nvidia_gpu_power_usage", "GPU power draw, watts."),
        |d| d.power_watts,
    ),
    (
        Family::gauge("nvidia_gpu_power_limit", "Enforced GPU power limit, watts."),
        |d| d.power_limit_watts,
    ),
    (
        Family::gauge("nvidia_gpu_sm_clock_hertz", "SM clock."),
        |d| d.sm_clock_hertz,
    ),
    (
        Family::gauge("nvidia_gpu_memory_clock_hertz", "Memory clock."),
        |d| d.memory_clock_hertz,
    ),
    (
        Family::gauge("nvidia_gpu_fan_speed", "Fan speed, percent of maximum."),
        |d| d.fan_speed_percent,
    ),
    (
        Family::gauge(
            "nvidia_gpu_pcie_tx_bytes_per_second",
            "PCIe transmit throughput.",
        ),
        |d| d.pcie_tx_bytes_per_second,
    ),
    (
        Family::gauge(
            "nvidia_gpu_pcie_rx_bytes_per_second",
            "PCIe receive throughput.",
        ),
        |d| d.pcie_rx_bytes_per_second,
    ),
];
static ENERGY: Family = Family::counter(
    "nvidia_gpu_energy_joules",
    "Energy the GPU consumed since the driver loaded.",
);
static ECC_ERRORS: Family = Family::counter(
    "nvidia_gpu_ecc_errors",
    "Volatile ECC errors since the driver loaded, by type (corrected, uncorrected) in `kind`.",
);
static THROTTLE_REASON: Family = Family::gauge(
    "nvidia_gpu_throttle_reason",
    "1 when the clock throttle reason in `kind` is active.",
);
static INFO: Family = Family::gauge(
    "nvidia_gpu_info",
    "GPU identity with driver and CUDA versions; always 1.",
);
pub static PROCESS_MEMORY: Family = Family::gauge(
    "llm_process_gpu_memory_bytes",
    "GPU memory the process holds on `gpu`, from NVML's running compute and graphics processes.",
);
/// Filled from NVML here, and from gpu-info reports for the pairs NVML has no samples for
/// (`collectors::gpuinfo`).
pub static PROCESS_UTILIZATION: Family = Family::gauge(
    "llm_process_gpu_utilization",
    "SM utilisation of the process on `gpu`, percent, from NVML's process utilisation samples.",
);
static PROCESS_MEMORY_UTILIZATION: Family = Family::gauge(
    "llm_process_gpu_memory_utilization",
    "Memory-controller utilisation of the process on `gpu`, percent.",
);
static LAST_SUCCESS: Family = Family::gauge("llmscope_nvml_last_success_timestamp_seconds", "Unix time of the last successful NVML sample. GPU values come from that sample: NVML is read off the scrape path, so a hung NVML call leaves them stale rather than hanging the scrape.");

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct GpuLabels {
    gpu: String,
    uuid: String,
    name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct GpuInfoLabels {
    gpu: String,
    uuid: String,
    name: String,
    driver_version: String,
    cuda_version: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct GpuKindLabels {
    gpu: String,
    uuid: String,
    name: String,
    /// ECC error type (`corrected`, `uncorrected`) or throttle reason.
    kind: String,
}

/// The label a per-process GPU series adds to the process's labels.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct GpuIndex {
    pub gpu: String,
}

impl GpuIndex {
    pub fn new(index: u32) -> GpuIndex {
        GpuIndex {
            gpu: index.to_string(),
        }
    }
}

fn gpu_labels(d: &DeviceSample) -> GpuLabels {
    GpuLabels {
        gpu: d.index.to_string(),
        uuid: d.uuid.clone(),
        name: d.name.clone(),
    }
}

/// The device gauges of `devices`.
pub fn devices(out: &mut Families, devices: &[DeviceSample]) {
    for (family, field) in &DEVICE_GAUGES {
        out.extend(
            family,
            devices
                .iter()
                .filter_map(|d| Some((gpu_labels(d), field(d)?))),
        );
    }
}

pub struct NvmlCollector {
    state: Arc<Published<NvmlState>>,
    processes: Arc<Published<ProcessView>>,
    /// A sample older than this fails the collector (the sampler is stuck or failing).
    stale_after: Duration,
}

impl NvmlCollector {
    pub fn new(
        state: Arc<Published<NvmlState>>,
        processes: Arc<Published<ProcessView>>,
        interval: Duration,
    ) -> Self {
        NvmlCollector {
            state,
            processes,
            stale_after: interval * 3 + Duration::from_secs(2),
        }
    }
}

impl Collector for NvmlCollector {
    fn name(&self) -> &'static str {
        "nvml"
    }

    fn collect(&self, out: &mut Families) -> Result<(), CollectError> {
        let state = self.state.get();
        if let Some(sample) = &state.sample {
            devices(out, &sample.devices);
            out.extend(
                &ENERGY,
                sample
                    .devices
                    .iter()
                    .filter_map(|d| Some((gpu_labels(d), d.energy_joules?))),
            );
            for d in &sample.devices {
                let kind = |k: &str| GpuKindLabels {
                    gpu: d.index.to_string(),
                    uuid: d.uuid.clone(),
                    name: d.name.clone(),
                    kind: k.to_owned(),
                };
                for (k, v) in [
                    ("corrected", d.ecc_corrected_errors),
                    ("uncorrected", d.ecc_uncorrected_errors),
                ] {
                    if let Some(v) = v {
                        out.add(&ECC_ERRORS, kind(k), v);
                    }
                }
                for (reason, active) in &d.throttle_reasons {
                    out.add(&THROTTLE_REASON, kind(reason), f64::from(u8::from(*active)));
                }
            }
            out.extend(
                &INFO,
                sample.devices.iter().map(|d| {
                    let info = GpuInfoLabels {
                        gpu: d.index.to_string(),
                        uuid: d.uuid.clone(),
                        name: d.name.clone(),
                        driver_version: sample.driver_version.clone().unwrap_or_default(),
                        cuda_version: sample.cuda_version.clone().unwrap_or_default(),
                    };
                    (info, 1.0)
                }),
            );
            let view = self.processes.get();
            let tracked: HashMap<u32, &ProcessLabels> = view
                .members
                .iter()
                .filter(|m| m.alive)
                .map(|m| (m.pid, &m.labels))
                .collect();
            for p in &sample.processes {
                // The sampler tracks every GPU process (as framework="unknown" when nothing
                // classifies it); one that is gone already has no series.
                let Some(l) = tracked.get(&p.pid) else {
                    continue;
                };
                let key = ((*l).clone(), GpuIndex::new(p.gpu));
                for (family, value) in [
                    (&PROCESS_MEMORY, p.memory_bytes),
                    (&PROCESS_UTILIZATION, p.sm_utilization_percent),
                    (&PROCESS_MEMORY_UTILIZATION, p.memory_utilization_percent),
                ] {
                    if let Some(v) = value {
                        out.add(family, key.clone(), v);
                    }
                }
            }
        }
        if let Some(d) = state
            .last_success
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        {
            out.set(&LAST_SUCCESS, d.as_secs_f64());
        }
        let fresh = state.last_success.is_some_and(|t| {
            SystemTime::now().duration_since(t).unwrap_or_default() <= self.stale_after
        });
        match (&state.error, fresh) {
            (None, true) => Ok(()),
            (Some(e), _) => Err(CollectError(e.clone())),
            (None, false) => Err(CollectError(
                "no NVML sample within the last intervals: the sampler is stuck".into(),
            )),
        }
    }
}
