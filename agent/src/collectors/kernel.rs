//! The agent's own kernel-side health: events received and lost, repairs made.

use std::sync::Arc;

use crate::ebpf::{LostCounters, LOST_KINDS};
use crate::metrics::{CollectError, Collector, KindCount, Snapshot};
use crate::state::Counters;

pub struct KernelCollector {
    counters: Arc<Counters>,
    lost: Arc<LostCounters>,
}

impl KernelCollector {
    pub fn new(counters: Arc<Counters>, lost: Arc<LostCounters>) -> Self {
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
        let mut lost = self
            .lost
            .read()
            .map_err(|e| CollectError(format!("reading the LOST map: {e}")))?;
        // Perf mmap records lost in user space count with the kernel's library_map losses.
        lost[6] += load(&c.library_map_lost);
        agent.events_lost = LOST_KINDS
            .iter()
            .zip(lost)
            .map(|(&kind, value)| KindCount { kind, value })
            .collect();
        Ok(())
    }
}
