//! llmscope: a Linux node agent that sees every LLM / inference process the moment it execs
//! and exports what it uses to Prometheus.
//!
//! Portable modules (classification, process table, metric model, HTTP, the inference-server
//! probes) build everywhere and
//! are shared with windows-fallback; the eBPF sensor, the /proc reader and the agent runtime
//! are Linux-only.

pub mod api;
pub mod collectors;
pub mod config;
pub mod gpuinfo;
pub mod http;
pub mod http_client;
pub mod identity;
pub mod logging;
pub mod metrics;
pub mod servers;
pub mod state;
pub mod tracker;
pub mod web_config;

#[cfg(target_os = "linux")]
pub mod proc;

#[cfg(all(target_os = "linux", feature = "ebpf"))]
pub mod agent;
#[cfg(all(target_os = "linux", feature = "ebpf"))]
pub mod cuda;
#[cfg(all(target_os = "linux", feature = "ebpf"))]
pub mod ebpf;
#[cfg(target_os = "linux")]
pub mod nvml;
#[cfg(all(target_os = "linux", feature = "ebpf"))]
pub mod requests;

#[cfg(feature = "top")]
pub mod top;

#[cfg(all(target_os = "linux", feature = "ebpf", feature = "fuzzing"))]
pub mod fuzzing;
