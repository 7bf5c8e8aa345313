//! `gpu-info-<pid>.json` reports (`--gpu-info-dir`): what each process says it has allocated
//! and reserved on the GPU, as the sampler last read them with the hardened reader
//! (`crate::gpuinfo`), and the refusals by reason.

use std::sync::Arc;

use crate::metrics::{CollectError, Collector, Snapshot};
use crate::state::{GpuInfoView, Published};

pub struct GpuInfoCollector {
    view: Arc<Published<GpuInfoView>>,
}

impl GpuInfoCollector {
    pub fn new(view: Arc<Published<GpuInfoView>>) -> Self {
        GpuInfoCollector { view }
    }
}

impl Collector for GpuInfoCollector {
    fn name(&self) -> &'static str {
        "gpu_info"
    }

    fn collect(&self, snapshot: &mut Snapshot) -> Result<(), CollectError> {
        let view = self.view.get();
        let g = &mut snapshot.gpu;
        for (labels, info) in &view.reports {
            g.add_report(labels.clone(), info);
        }
        g.info_reports = Some(view.reports.len() as f64);
        g.info_rejected = view.rejected.clone();
        g.info_scans_truncated = view.scans_truncated;
        match &view.error {
            None => Ok(()),
            Some(e) => Err(CollectError(e.clone())),
        }
    }
}
