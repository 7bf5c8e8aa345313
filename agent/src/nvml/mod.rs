//! NVML, sampled off the scrape path: one thread owns the library, makes at most one call at
//! a time, and publishes a [`GpuSample`]. A scrape reads the last good sample and never
//! waits on NVML — a hung driver call cannot hang `/metrics`.
//!
//! What a device does not support (`NotSupported`, `FunctionNotFound`) is left out, never
//! reported as 0. `NotFound` from the process-utilisation call means "no samples".

use std::path::PathBuf;

use crate::state::{DeviceSample, GpuSample, ProcessGpu};
use nvml_wrapper::enum_wrappers::device::{
    Clock, EccCounter, MemoryError, PcieUtilCounter, TemperatureSensor,
};
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{Device, Nvml};

/// Loads NVML: the library at `lib` when given, else the system's libnvidia-ml.so.1.
pub fn init(lib: Option<&PathBuf>) -> Result<Nvml, NvmlError> {
    let mut builder = Nvml::builder();
    if let Some(lib) = lib {
        builder.lib_path(lib.as_os_str());
    }
    builder.init()
}

/// `Ok(Some)`, `Ok(None)` for "not supported here" (by the device, the driver, or the
/// library: an older libnvidia-ml lacks newer symbols), `Err` for everything else.
fn optional<T>(r: Result<T, NvmlError>) -> Result<Option<T>, NvmlError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(
            NvmlError::NotSupported
            | NvmlError::FunctionNotFound
            | NvmlError::FailedToLoadSymbol(_)
            | NvmlError::NotFound
            | NvmlError::InvalidArg,
        ) => Ok(None),
        Err(e) => Err(e),
    }
}

fn is_lost(e: &NvmlError) -> bool {
    matches!(
        e,
        NvmlError::GpuLost
            | NvmlError::Uninitialized
            | NvmlError::DriverNotLoaded
            | NvmlError::ResetRequired
    )
}

/// Samples every device and its processes. A device that fails (GpuLost) is left out of
/// this sample — its series go away — and asks for re-initialisation.
pub fn sample(nvml: &Nvml) -> Result<GpuSample, NvmlError> {
    let count = nvml.device_count()?;
    let mut out = GpuSample {
        driver_version: optional(nvml.sys_driver_version())?,
        cuda_version: optional(nvml.sys_cuda_driver_version())?
            .map(|v| format!("{}.{}", v / 1000, (v % 1000) / 10)),
        ..Default::default()
    };
    for index in 0..count {
        let result = nvml
            .device_by_index(index)
            .and_then(|d| sample_device(index, &d));
        match result {
            Ok((device, processes)) => {
                out.devices.push(device);
                out.processes.extend(processes);
            }
            Err(e) if is_lost(&e) => {
                tracing::warn!(gpu = index, error = %e, "GPU lost: its series are dropped until it is back");
                out.needs_reinit = true;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

fn sample_device(index: u32, d: &Device) -> Result<(DeviceSample, Vec<ProcessGpu>), NvmlError> {
    let memory = optional(d.memory_info())?;
    let utilization = optional(d.utilization_rates())?;
    let mhz = |c: Clock| -> Result<Option<f64>, NvmlError> {
        Ok(optional(d.clock_info(c))?.map(|v| f64::from(v) * 1e6))
    };
    let pcie = |c: PcieUtilCounter| -> Result<Option<f64>, NvmlError> {
        Ok(optional(d.pcie_throughput(c))?.map(|kb| f64::from(kb) * 1024.0))
    };
    let ecc = |e: MemoryError| -> Result<Option<f64>, NvmlError> {
        Ok(optional(d.total_ecc_errors(e, EccCounter::Volatile))?.map(|v| v as f64))
    };
    let throttle_reasons = match optional(d.current_throttle_reasons())? {
        Some(active) => nvml_wrapper::bitmasks::device::ThrottleReasons::all()
            .iter_names()
            .map(|(name, flag)| (name.to_ascii_lowercase(), active.contains(flag)))
            .collect(),
        None => Vec::new(),
    };
    let device = DeviceSample {
        index,
        uuid: d.uuid()?,
        name: d.name()?,
        utilization_percent: utilization.as_ref().map(|u| f64::from(u.gpu)),
        memory_utilization_percent: utilization.as_ref().map(|u| f64::from(u.memory)),
        memory_total_bytes: memory.as_ref().map(|m| m.total as f64),
        memory_used_bytes: memory.as_ref().map(|m| m.used as f64),
        memory_free_bytes: memory.as_ref().map(|m| m.free as f64),
        temperature_celsius: optional(d.temperature(TemperatureSensor::Gpu))?.map(f64::from),
        power_watts: optional(d.power_usage())?.map(|mw| f64::from(mw) / 1000.0),
        power_limit_watts: optional(d.enforced_power_limit())?.map(|mw| f64::from(mw) / 1000.0),
        sm_clock_hertz: mhz(Clock::SM)?,
        memory_clock_hertz: mhz(Clock::Memory)?,
        fan_speed_percent: optional(d.fan_speed(0))?.map(f64::from),
        energy_joules: optional(d.total_energy_consumption())?.map(|mj| mj as f64 / 1000.0),
        pcie_tx_bytes_per_second: pcie(PcieUtilCounter::Send)?,
        pcie_rx_bytes_per_second: pcie(PcieUtilCounter::Receive)?,
        ecc_corrected_errors: ecc(MemoryError::Corrected)?,
        ecc_uncorrected_errors: ecc(MemoryError::Uncorrected)?,
        throttle_reasons,
    };
    let mut processes: Vec<ProcessGpu> = Vec::new();
    let compute = optional(d.running_compute_processes())?.unwrap_or_default();
    let graphics = optional(d.running_graphics_processes())?.unwrap_or_default();
    for p in compute.into_iter().chain(graphics) {
        let memory = match p.used_gpu_memory {
            UsedGpuMemory::Used(bytes) => Some(bytes as f64),
            UsedGpuMemory::Unavailable => None,
        };
        match processes.iter_mut().find(|q| q.pid == p.pid) {
            Some(q) => q.memory_bytes = Some(q.memory_bytes.unwrap_or(0.0) + memory.unwrap_or(0.0)),
            None => processes.push(ProcessGpu {
                pid: p.pid,
                gpu: index,
                memory_bytes: memory,
                ..Default::default()
            }),
        }
    }
    for s in optional(d.process_utilization_stats(None))?.unwrap_or_default() {
        let entry = match processes.iter_mut().position(|q| q.pid == s.pid) {
            Some(i) => &mut processes[i],
            None => {
                processes.push(ProcessGpu {
                    pid: s.pid,
                    gpu: index,
                    ..Default::default()
                });
                processes.last_mut().unwrap()
            }
        };
        entry.sm_utilization_percent = Some(f64::from(s.sm_util));
        entry.memory_utilization_percent = Some(f64::from(s.mem_util));
    }
    Ok((device, processes))
}
