//! What the producer threads publish and the collectors read: the contract between the two
//! sides, importing neither. A producer computes a whole view and swaps it in at once
//! ([`Published::set`]); a scrape takes the current one ([`Published::get`]) and changes
//! nothing, so any number of scrapers see the same values.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::Serialize;

use crate::gpuinfo::GpuInfo;
use crate::metrics::{KindCount, ProcessLabels, ProcessSample};
use crate::servers::Answer;

/// The latest value a producer published.
#[derive(Debug, Default)]
pub struct Published<T>(Mutex<Arc<T>>);

impl<T> Published<T> {
    pub fn new(value: T) -> Self {
        Published(Mutex::new(Arc::new(value)))
    }

    pub fn get(&self) -> Arc<T> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub fn set(&self, value: T) {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(value);
    }
}

/// Event and repair counts, written by the events and reconcile threads.
#[derive(Debug, Default)]
pub struct Counters {
    pub exec: AtomicU64,
    pub exit: AtomicU64,
    pub fork: AtomicU64,
    pub library_map: AtomicU64,
    /// Perf mmap records lost (buffer full), when that is the library hook.
    pub library_map_lost: AtomicU64,
    /// 1 while the perf buffers of library mappings batch (`perf_mmap::Mode::Batching`).
    pub library_map_batching: AtomicU64,
    pub malformed: AtomicU64,
    pub missed_exec: AtomicU64,
    pub missed_exit: AtomicU64,
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// One tracked process as of the last sampling pass.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub pid: u32,
    pub labels: ProcessLabels,
    pub alive: bool,
}

/// The process table and each process's /proc reading, as of the sampler's last pass.
#[derive(Debug, Default)]
pub struct ProcessView {
    /// Every tracked process (live, and exited within the grace period), in pid order.
    pub members: Vec<Member>,
    /// The readings: members read at least once (an exited one keeps its last).
    pub samples: Vec<ProcessSample>,
    pub dropped: u64,
    pub model_names_capped: u64,
    /// What the user classification rules did (None: no rules file).
    pub rules: Option<crate::tracker::RuleCounts>,
    /// Processes that could not be read on the last pass (the first error).
    pub error: Option<String>,
    /// Container name lookups by result (ok, not_found, error, dropped).
    pub container_lookups: Vec<KindCount>,
}

/// The `gpu-info-<pid>.json` reports as of the sampler's last scan of `--gpu-info-dir`.
#[derive(Debug, Default)]
pub struct GpuInfoView {
    /// Accepted reports, joined to their process's labels.
    pub reports: Vec<(ProcessLabels, GpuInfo)>,
    /// Refused report versions since start, by reason (every reason, from 0).
    pub rejected: Vec<KindCount>,
    /// Scans that stopped at the most directory entries looked at, since start.
    pub scans_truncated: u64,
    /// The directory could not be read.
    pub error: Option<String>,
}

/// An inference server's own endpoint, as the discovery thread last found it.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    pub labels: ProcessLabels,
    /// `host:port` for Prometheus.
    pub target: String,
    pub path: &'static str,
    pub answer: Answer,
}

/// What the server discovery thread publishes.
#[derive(Debug, Default)]
pub struct ServersView {
    pub endpoints: Vec<Endpoint>,
    /// Probes since start, by outcome (every outcome, from 0).
    pub probes: Vec<KindCount>,
}

/// What the NVML sampler (`crate::nvml`) publishes.
#[derive(Debug, Default, Clone)]
pub struct NvmlState {
    pub sample: Option<GpuSample>,
    pub last_success: Option<SystemTime>,
    /// The current problem, when there is one.
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DeviceSample {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    pub utilization_percent: Option<f64>,
    pub memory_utilization_percent: Option<f64>,
    pub memory_total_bytes: Option<f64>,
    pub memory_used_bytes: Option<f64>,
    pub memory_free_bytes: Option<f64>,
    pub temperature_celsius: Option<f64>,
    pub power_watts: Option<f64>,
    pub power_limit_watts: Option<f64>,
    pub sm_clock_hertz: Option<f64>,
    pub memory_clock_hertz: Option<f64>,
    pub fan_speed_percent: Option<f64>,
    pub energy_joules: Option<f64>,
    pub pcie_tx_bytes_per_second: Option<f64>,
    pub pcie_rx_bytes_per_second: Option<f64>,
    pub ecc_corrected_errors: Option<f64>,
    pub ecc_uncorrected_errors: Option<f64>,
    /// Active clock throttle reasons by name; empty when unsupported.
    pub throttle_reasons: Vec<(String, bool)>,
}

/// One process on one GPU.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ProcessGpu {
    pub pid: u32,
    pub gpu: u32,
    pub memory_bytes: Option<f64>,
    pub sm_utilization_percent: Option<f64>,
    pub memory_utilization_percent: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct GpuSample {
    pub driver_version: Option<String>,
    pub cuda_version: Option<String>,
    pub devices: Vec<DeviceSample>,
    pub processes: Vec<ProcessGpu>,
    /// A device answered GpuLost (or NVML lost its initialisation): re-initialise.
    pub needs_reinit: bool,
}
