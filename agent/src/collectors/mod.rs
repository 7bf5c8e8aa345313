//! One collector per file, each behind [`crate::metrics::Collector`].

pub mod cuda;
pub mod gpuinfo;
pub mod kernel;
pub mod nvml;
pub mod process;
pub mod servers;

#[cfg(test)]
mod tests;
