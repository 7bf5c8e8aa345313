//! The agent's own kernel-side health: events received and lost, repairs made.

use std::sync::Arc;

use crate::ebpf::LostCounters;
use crate::metrics::{CollectError, Collector, KindCount, Snapshot};
use crate::state::Counters;

pub struct KernelCollector {
    counters: Arc<Counters>,
    lost: LostCounters,
}

impl KernelCollector {
    pub fn new(counters: Arc<Counters>, lost: LostCounters) -> Self {
        KernelCollector { counters, lost }
    }
}

impl Collector for KernelCollector {
    fn name(&self) -> &'static str {
        "kernel"
    }

    fn collect(&self, snapshot: &mut Snapshot) -> Result<(), CollectError> {
        let c = &self.counters;
        let load = Counters::get;
        let agent = &mut snapshot.agent;
        agent.events = KindCount::list(&[
            ("exec", load(&c.exec)),
            ("exit", load(&c.exit)),
            ("fork", load(&c.fork)),
            ("library_map", load(&c.library_map)),
            ("malformed", load(&c.malformed)),
        ]);
        agent.repairs = KindCount::list(&[
            ("missed_exec", load(&c.missed_exec)),
            ("missed_exit", load(&c.missed_exit)),
        ]);
        let [exec, exit, fork, cuda_event, cuda_counter, cuda_allocation, library_map] = self
            .lost
            .read()
            .map_err(|e| CollectError(format!("reading the LOST map: {e}")))?;
        agent.events_lost = KindCount::list(&[
            ("exec", exec),
            ("exit", exit),
            ("fork", fork),
            ("cuda_event", cuda_event),
            ("cuda_counter", cuda_counter),
            ("cuda_allocation", cuda_allocation),
            ("library_map", library_map + load(&c.library_map_lost)),
        ]);
        Ok(())
    }
}
