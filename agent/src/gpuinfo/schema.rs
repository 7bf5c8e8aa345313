//! The gpu-info JSON schema (version 1), as the original monitor defined it plus `version`.

use serde::{Deserialize, Serialize};

use super::Reason;

pub const SCHEMA_VERSION: u32 = 1;

/// One process's report about its use of one GPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuInfo {
    /// Absent in files written by the original monitor: version 1.
    #[serde(default = "default_version")]
    pub version: u32,
    /// The writer's pid as it sees it (in its own PID namespace, inside a container).
    pub pid: u32,
    /// The writer's start time: on Linux field 22 of `/proc/self/stat` (clock ticks since
    /// boot, the same in every PID namespace); on Windows the process creation time in Unix
    /// seconds. With it, a report is joined to the one process with this pid in its own
    /// namespace and this start time; without it (older writers), `pid` must be the pid the
    /// agent sees.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time_ticks: Option<u64>,
    /// Bytes the framework has allocated (PyTorch: `torch.cuda.memory_allocated()`).
    pub gpu_memory_allocated_bytes: f64,
    /// Bytes the framework has reserved from the driver (`torch.cuda.memory_reserved()`).
    pub gpu_memory_reserved_bytes: f64,
    /// Percent, when the process knows it.
    #[serde(default)]
    pub gpu_utilization: Option<f64>,
    #[serde(default)]
    pub gpu_index: u32,
    /// Unix seconds when the process wrote the report.
    pub timestamp: f64,
}

fn default_version() -> u32 {
    SCHEMA_VERSION
}

/// Parses and validates; the error is the rejection reason.
pub(crate) fn parse(text: &[u8]) -> Result<GpuInfo, Reason> {
    // serde_json refuses nesting deeper than 128 levels and NaN/Infinity literals itself.
    let info: GpuInfo = serde_json::from_slice(text).map_err(|_| Reason::Malformed)?;
    if info.version != SCHEMA_VERSION {
        return Err(Reason::UnsupportedVersion);
    }
    let bytes_ok = |v: f64| (0.0..1e18).contains(&v);
    let util_ok = info
        .gpu_utilization
        .is_none_or(|u| u.is_finite() && (0.0..=100.0).contains(&u));
    if !bytes_ok(info.gpu_memory_allocated_bytes)
        || !bytes_ok(info.gpu_memory_reserved_bytes)
        || !util_ok
        || !info.timestamp.is_finite()
        || info.gpu_index > 1024
    {
        return Err(Reason::InvalidValue);
    }
    Ok(info)
}
