//! `gpu-info-<pid>.json` reports (`--gpu-info-dir`): what each process says it has allocated
//! and reserved on the GPU, as the sampler last read them with the hardened reader
//! (`crate::gpuinfo`), and the refusals by reason.

use std::collections::HashSet;
use std::sync::Arc;

use super::nvml::{GpuIndex, PROCESS_UTILIZATION};
use crate::metrics::{CollectError, Collector, Families, Family};
use crate::state::{GpuInfoView, NvmlState, Published};

static ALLOCATED: Family = Family::gauge("llm_process_gpu_memory_allocated_bytes", "GPU memory the process reports its framework has allocated (gpu-info file; PyTorch: memory_allocated).");
static RESERVED: Family = Family::gauge("llm_process_gpu_memory_reserved_bytes", "GPU memory the process reports its framework has reserved from the driver (gpu-info file; PyTorch: memory_reserved). Reserved minus allocated is fragmentation and cache.");
static REPORTS: Family = Family::gauge(
    "llmscope_gpu_info_reports",
    "gpu-info reports accepted on the last scan of --gpu-info-dir (once a second).",
);
static REJECTED: Family = Family::counter(
    "llmscope_gpu_info_rejected",
    "gpu-info reports refused, by reason; each version of a file is counted once.",
);
static SCANS_TRUNCATED: Family = Family::counter("llmscope_gpu_info_scans_truncated", "Scans of --gpu-info-dir that stopped after 4096 directory entries (the rest of the directory was not looked at that second).");

pub struct GpuInfoCollector {
    view: Arc<Published<GpuInfoView>>,
    /// Utilisation from a report is exported only where NVML has none for that process and
    /// GPU: one series per pair.
    nvml: Option<Arc<Published<NvmlState>>>,
}

impl GpuInfoCollector {
    pub fn new(view: Arc<Published<GpuInfoView>>, nvml: Option<Arc<Published<NvmlState>>>) -> Self {
        GpuInfoCollector { view, nvml }
    }
}

impl Collector for GpuInfoCollector {
    fn name(&self) -> &'static str {
        "gpu_info"
    }

    fn collect(&self, out: &mut Families) -> Result<(), CollectError> {
        let view = self.view.get();
        let nvml = self.nvml.as_ref().map(|n| n.get());
        let measured: HashSet<(String, u32)> = nvml
            .iter()
            .filter_map(|n| n.sample.as_ref())
            .flat_map(|s| &s.processes)
            .filter(|p| p.sm_utilization_percent.is_some())
            .map(|p| (p.pid.to_string(), p.gpu))
            .collect();
        for (labels, info) in &view.reports {
            let key = (labels.clone(), GpuIndex::new(info.gpu_index));
            out.add(&ALLOCATED, key.clone(), info.gpu_memory_allocated_bytes);
            out.add(&RESERVED, key.clone(), info.gpu_memory_reserved_bytes);
            match info.gpu_utilization {
                Some(util) if !measured.contains(&(labels.pid.clone(), info.gpu_index)) => {
                    out.add(&PROCESS_UTILIZATION, key, util);
                }
                _ => {}
            }
        }
        out.set(&REPORTS, view.reports.len() as f64);
        out.counts(&REJECTED, "reason", &view.rejected);
        out.set(&SCANS_TRUNCATED, view.scans_truncated as f64);
        match &view.error {
            None => Ok(()),
            Some(e) => Err(CollectError(e.clone())),
        }
    }
}
