//! Per-process CPU, memory and threads of every tracked LLM process, as the sampler last
//! read them (`agent::sampler`): a scrape copies the published view and changes nothing.

use std::sync::Arc;

use crate::metrics::{CollectError, Collector, Snapshot};
use crate::state::{ProcessView, Published};

pub struct ProcessCollector {
    view: Arc<Published<ProcessView>>,
}

impl ProcessCollector {
    pub fn new(view: Arc<Published<ProcessView>>) -> Self {
        ProcessCollector { view }
    }
}

impl Collector for ProcessCollector {
    fn name(&self) -> &'static str {
        "process"
    }

    fn collect(&self, snapshot: &mut Snapshot) -> Result<(), CollectError> {
        let view = self.view.get();
        snapshot.agent.tracked_processes = view.members.len() as u64;
        snapshot.agent.tracked_dropped = view.dropped;
        snapshot.agent.model_names_capped = view.model_names_capped;
        snapshot.agent.container_lookups = view.container_lookups.clone();
        snapshot.processes = view.samples.clone();
        match &view.error {
            None => Ok(()),
            Some(e) => Err(CollectError(e.clone())),
        }
    }
}
