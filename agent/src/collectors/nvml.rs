//! GPU devices and per-process GPU memory and utilisation, from the NVML sampler's last
//! good sample (never from NVML itself: the scrape path must not wait on the driver).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::metrics::gpu::{
    device_help, DeviceSeries, GpuIndex, GpuInfoLabels, GpuKindLabels, GpuLabels,
};
use crate::metrics::{CollectError, Collector, ProcessLabels, Snapshot};
use crate::nvml::{DeviceSample, NvmlState};
use crate::state::{ProcessView, Published};

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

type Field = fn(&DeviceSample) -> Option<f64>;

/// How each device gauge of `metrics::gpu::DEVICE_GAUGES` is read from a sample.
const DEVICE_FIELDS: &[(&str, Field)] = &[
    ("nvidia_gpu_utilization", |d| d.utilization_percent),
    ("nvidia_gpu_memory_utilization", |d| {
        d.memory_utilization_percent
    }),
    ("nvidia_gpu_memory_used_bytes", |d| d.memory_used_bytes),
    ("nvidia_gpu_memory_total_bytes", |d| d.memory_total_bytes),
    ("nvidia_gpu_memory_free_bytes", |d| d.memory_free_bytes),
    ("nvidia_gpu_temperature", |d| d.temperature_celsius),
    ("nvidia_gpu_power_usage", |d| d.power_watts),
    ("nvidia_gpu_power_limit", |d| d.power_limit_watts),
    ("nvidia_gpu_sm_clock_hertz", |d| d.sm_clock_hertz),
    ("nvidia_gpu_memory_clock_hertz", |d| d.memory_clock_hertz),
    ("nvidia_gpu_fan_speed", |d| d.fan_speed_percent),
    ("nvidia_gpu_pcie_tx_bytes_per_second", |d| {
        d.pcie_tx_bytes_per_second
    }),
    ("nvidia_gpu_pcie_rx_bytes_per_second", |d| {
        d.pcie_rx_bytes_per_second
    }),
];

impl Collector for NvmlCollector {
    fn name(&self) -> &'static str {
        "nvml"
    }

    fn collect(&self, snapshot: &mut Snapshot) -> Result<(), CollectError> {
        let state = self.state.get();
        let g = &mut snapshot.gpu;
        g.last_success_seconds = state
            .last_success
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_secs_f64());
        if let Some(sample) = &state.sample {
            let labels = |d: &DeviceSample| GpuLabels {
                gpu: d.index.to_string(),
                uuid: d.uuid.clone(),
                name: d.name.clone(),
            };
            for (name, field) in DEVICE_FIELDS {
                let series: DeviceSeries = sample
                    .devices
                    .iter()
                    .filter_map(|d| field(d).map(|v| (labels(d), v)))
                    .collect();
                g.devices.push((name, device_help(name), series));
            }
            g.energy_joules = sample
                .devices
                .iter()
                .filter_map(|d| d.energy_joules.map(|v| (labels(d), v)))
                .collect();
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
                        g.ecc_errors.push((kind(k), v));
                    }
                }
                for (reason, active) in &d.throttle_reasons {
                    g.throttle_reasons
                        .push((kind(reason), if *active { 1.0 } else { 0.0 }));
                }
                let info = GpuInfoLabels {
                    gpu: d.index.to_string(),
                    uuid: d.uuid.clone(),
                    name: d.name.clone(),
                    driver_version: sample.driver_version.clone().unwrap_or_default(),
                    cuda_version: sample.cuda_version.clone().unwrap_or_default(),
                };
                g.info.push((info, 1.0));
            }
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
                let key = (
                    (*l).clone(),
                    GpuIndex {
                        gpu: p.gpu.to_string(),
                    },
                );
                if let Some(v) = p.memory_bytes {
                    g.process_memory.push((key.clone(), v));
                }
                if let Some(v) = p.sm_utilization_percent {
                    g.process_utilization.push((key.clone(), v));
                }
                if let Some(v) = p.memory_utilization_percent {
                    g.process_memory_utilization.push((key, v));
                }
            }
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
