//! The CUDA families of a snapshot, grouped by the collector so encoding only writes them.

use prometheus_client::encoding::EncodeLabelSet;
use serde::Serialize;

use super::{KindCount, ProcessLabels};

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, EncodeLabelSet)]
pub struct Api {
    pub api: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, EncodeLabelSet)]
pub struct ApiFunction {
    pub api: String,
    pub function: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, EncodeLabelSet)]
pub struct ApiFunctionCode {
    pub api: String,
    pub function: String,
    pub code: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, EncodeLabelSet)]
pub struct ApiDirection {
    pub api: String,
    pub direction: String,
}

pub type Series<L> = Vec<((ProcessLabels, L), f64)>;

/// How kernel launches are counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LaunchMode {
    /// Probes always attached: exact counts (`--cuda-overhead-budget 100`).
    #[default]
    Exact,
    /// Probes attached for a window of every period; counts extrapolated.
    Sampled,
    /// Not counted (`--cuda-overhead-budget 0`).
    Off,
}

impl LaunchMode {
    pub fn as_str(self) -> &'static str {
        match self {
            LaunchMode::Exact => "exact",
            LaunchMode::Sampled => "sampled",
            LaunchMode::Off => "off",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CudaSnapshot {
    pub calls: Series<ApiFunction>,
    pub errors: Series<ApiFunctionCode>,
    pub oom: Vec<(ProcessLabels, f64)>,
    pub alloc_bytes: Series<Api>,
    pub frees: Series<Api>,
    pub device_memory: Vec<(ProcessLabels, f64)>,
    pub launches: Series<Api>,
    pub graph_launches: Series<Api>,
    pub memcpy_bytes: Series<ApiDirection>,
    pub sync_seconds: Series<Api>,
    /// Uprobe links attached now.
    pub attachments: u64,
    /// Library files probed, by API.
    pub libraries: Vec<KindCount>,
    pub attach_failures: Vec<KindCount>,
    /// Library files whose probes were removed because no process mapped them any more.
    pub library_detaches: u64,
    /// Uprobe links of removed libraries still being detached.
    pub detach_backlog: u64,
    /// Attach requests dropped because the attach queue was full.
    pub attach_requests_dropped: u64,
    /// How the kernel reports library mappings: fentry, kprobe or none.
    pub library_hook: &'static str,
    pub launch_mode: LaunchMode,
    /// Fraction of the next period the launch probes will be attached.
    pub launch_duty: f64,
    /// Time the launch probes were attached since start.
    pub launch_attached_seconds: f64,
    /// The duty cycle's period in use, and what one attach + detach of its probes cost in
    /// CPU time (charged to the budget) and in wall time.
    pub launch_period_seconds: f64,
    pub launch_cycle_cpu_seconds: f64,
    pub launch_cycle_wall_seconds: f64,
}
