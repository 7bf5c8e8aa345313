//! nvidia-smi's devices and per-process GPU memory, under the agent's family names (the
//! descriptors are the agent's NVML collector's: one declaration for both binaries).

use std::sync::Arc;

use llmscope::collectors::nvml::{devices, PROCESS_MEMORY};
use llmscope::metrics::{CollectError, Collector, Families};
use llmscope::state::Published;

use crate::poller::SmiView;

pub struct SmiCollector {
    view: Arc<Published<SmiView>>,
}

impl SmiCollector {
    pub fn new(view: Arc<Published<SmiView>>) -> Self {
        SmiCollector { view }
    }
}

impl Collector for SmiCollector {
    fn name(&self) -> &'static str {
        "nvidia_smi"
    }

    fn collect(&self, out: &mut Families) -> Result<(), CollectError> {
        let view = self.view.get();
        devices(out, &view.devices);
        out.extend(
            &PROCESS_MEMORY,
            view.processes
                .iter()
                .map(|(labels, gpu, bytes)| ((labels.clone(), gpu.clone()), *bytes)),
        );
        match &view.error {
            None => Ok(()),
            Some(e) => Err(CollectError(e.clone())),
        }
    }
}
