//! One collector per file, each behind [`crate::metrics::Collector`]: each declares the
//! families it fills and adds their samples from what one producer published. The portable
//! ones (processes, gpu-info reports, GPU families, servers) are shared with windows-fallback.

#[cfg(all(target_os = "linux", feature = "ebpf"))]
pub mod cuda;
pub mod gpuinfo;
#[cfg(all(target_os = "linux", feature = "ebpf"))]
pub mod kernel;
pub mod nvml;
pub mod process;
#[cfg(all(target_os = "linux", feature = "ebpf"))]
pub mod requests;
pub mod servers;

#[cfg(all(test, target_os = "linux", feature = "ebpf"))]
mod tests;
