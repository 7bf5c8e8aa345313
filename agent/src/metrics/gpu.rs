//! The GPU-device and per-process GPU families of a snapshot (NVML).

use prometheus_client::encoding::EncodeLabelSet;
use serde::Serialize;

use super::ProcessLabels;

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, EncodeLabelSet)]
pub struct GpuLabels {
    pub gpu: String,
    pub uuid: String,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, EncodeLabelSet)]
pub struct GpuInfoLabels {
    pub gpu: String,
    pub uuid: String,
    pub name: String,
    pub driver_version: String,
    pub cuda_version: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, EncodeLabelSet)]
pub struct GpuKindLabels {
    pub gpu: String,
    pub uuid: String,
    pub name: String,
    /// ECC error type (`corrected`, `uncorrected`) or throttle reason.
    pub kind: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, EncodeLabelSet)]
pub struct GpuIndex {
    pub gpu: String,
}

pub type DeviceSeries = Vec<(GpuLabels, f64)>;
pub type ProcessGpuSeries = Vec<((ProcessLabels, GpuIndex), f64)>;

/// Device metrics by family name (the name is the metric's), so that a device that does not
/// support a metric simply has no sample in it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct GpuSnapshot {
    /// (family name, help, samples), in export order.
    pub devices: Vec<(&'static str, &'static str, DeviceSeries)>,
    pub energy_joules: DeviceSeries,
    pub ecc_errors: Vec<(GpuKindLabels, f64)>,
    pub throttle_reasons: Vec<(GpuKindLabels, f64)>,
    pub info: Vec<(GpuInfoLabels, f64)>,
    pub process_memory: ProcessGpuSeries,
    pub process_utilization: ProcessGpuSeries,
    pub process_memory_utilization: ProcessGpuSeries,
    /// From gpu-info reports: what the framework allocated / reserved.
    pub process_allocated: ProcessGpuSeries,
    pub process_reserved: ProcessGpuSeries,
    /// gpu-info reports accepted on the last scan (None without --gpu-info-dir).
    pub info_reports: Option<f64>,
    pub info_rejected: Vec<super::KindCount>,
    /// Scans of --gpu-info-dir that stopped at the most entries looked at.
    pub info_scans_truncated: u64,
    /// Unix time of the last successful NVML sample, when there was one.
    pub last_success_seconds: Option<f64>,
}

/// The device gauges every llmscope binary exports, with their help: (name, help).
pub const DEVICE_GAUGES: &[(&str, &str)] = &[
    (
        "nvidia_gpu_utilization",
        "GPU utilisation, percent of the last sample period.",
    ),
    (
        "nvidia_gpu_memory_utilization",
        "GPU memory-controller utilisation, percent.",
    ),
    ("nvidia_gpu_memory_used_bytes", "GPU memory in use."),
    ("nvidia_gpu_memory_total_bytes", "GPU memory in total."),
    ("nvidia_gpu_memory_free_bytes", "GPU memory free."),
    (
        "nvidia_gpu_temperature",
        "GPU core temperature, degrees Celsius.",
    ),
    ("nvidia_gpu_power_usage", "GPU power draw, watts."),
    ("nvidia_gpu_power_limit", "Enforced GPU power limit, watts."),
    ("nvidia_gpu_sm_clock_hertz", "SM clock."),
    ("nvidia_gpu_memory_clock_hertz", "Memory clock."),
    ("nvidia_gpu_fan_speed", "Fan speed, percent of maximum."),
    (
        "nvidia_gpu_pcie_tx_bytes_per_second",
        "PCIe transmit throughput.",
    ),
    (
        "nvidia_gpu_pcie_rx_bytes_per_second",
        "PCIe receive throughput.",
    ),
];

/// The help of a device gauge of [`DEVICE_GAUGES`].
pub fn device_help(name: &str) -> &'static str {
    DEVICE_GAUGES
        .iter()
        .find(|(n, _)| *n == name)
        .map_or("GPU device metric.", |(_, h)| h)
}

impl GpuSnapshot {
    /// Adds what a gpu-info report says about a process. Utilisation from the report is
    /// used only where NVML gave none for that process and GPU: one series per pair.
    pub fn add_report(&mut self, labels: ProcessLabels, info: &crate::gpuinfo::GpuInfo) {
        let key = (
            labels,
            GpuIndex {
                gpu: info.gpu_index.to_string(),
            },
        );
        self.process_allocated
            .push((key.clone(), info.gpu_memory_allocated_bytes));
        self.process_reserved
            .push((key.clone(), info.gpu_memory_reserved_bytes));
        if let Some(util) = info.gpu_utilization {
            let known = self
                .process_utilization
                .iter()
                .any(|((l, g), _)| l.pid == key.0.pid && g.gpu == key.1.gpu);
            if !known {
                self.process_utilization.push((key, util));
            }
        }
    }
}
