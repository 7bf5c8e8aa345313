//! The agent's own kernel-side health: events received and lost, repairs made.

use std::sync::Arc;

use crate::ebpf::{HookProgram, LostCounters};
use crate::metrics::{CollectError, Collector, Families, Family, KindCount};
use crate::state::Counters;

static EVENTS: Family = Family::counter("llmscope_events", "Kernel events received, by kind.");
static EVENTS_LOST: Family = Family::counter("llmscope_events_lost", "Kernel events lost because the ring buffer was full, by kind; reconciliation repairs what they missed.");
static HOOK_MISSED: Family = Family::counter("llmscope_library_hook_missed", "Runs of the library hook (fentry or kprobe on security_mmap_file) the kernel skipped because another BPF program was running on that CPU; the /proc scans repair what they missed. 0 without a BPF hook.");
static MAP_BATCHING: Family = Family::gauge("llmscope_library_map_batching", "1 while the perf buffers of library mappings wake the agent only when half full and are read every 2 ms (executable mappings above 500 a second: a record that wakes costs the mapping process an interrupt); 0 while they wake it per record, and without perf records (a BPF hook filters in the kernel).");
static REPAIRS: Family = Family::counter(
    "llmscope_reconcile_repairs",
    "Processes whose exec or exit the /proc reconciliation found missing, by kind.",
);

pub struct KernelCollector {
    counters: Arc<Counters>,
    lost: Arc<LostCounters>,
    hook: Arc<HookProgram>,
}

impl KernelCollector {
    pub fn new(counters: Arc<Counters>, lost: Arc<LostCounters>, hook: Arc<HookProgram>) -> Self {
        KernelCollector {
            counters,
            lost,
            hook,
        }
    }
}

impl Collector for KernelCollector {
    fn name(&self) -> &'static str {
        "kernel"
    }

    fn collect(&self, out: &mut Families) -> Result<(), CollectError> {
        let c = &self.counters;
        let load = Counters::get;
        let events = KindCount::list(&[
            ("exec", load(&c.exec)),
            ("exit", load(&c.exit)),
            ("fork", load(&c.fork)),
            ("library_map", load(&c.library_map)),
            ("malformed", load(&c.malformed)),
        ]);
        out.counts(&EVENTS, "kind", &events);
        let repairs = KindCount::list(&[
            ("missed_exec", load(&c.missed_exec)),
            ("missed_exit", load(&c.missed_exit)),
        ]);
        out.counts(&REPAIRS, "kind", &repairs);
        let missed = self
            .hook
            .missed()
            .map_err(|e| CollectError(format!("reading the library hook's program info: {e}")))?;
        out.set(&HOOK_MISSED, missed as f64);
        out.set(&MAP_BATCHING, load(&c.library_map_batching) as f64);
        let lost = self
            .lost
            .read(load(&c.library_map_lost))
            .map_err(|e| CollectError(format!("reading the LOST map: {e}")))?;
        out.extend(
            &EVENTS_LOST,
            lost.iter()
                .map(|(kind, value)| ([("kind", kind.as_str())], value as f64)),
        );
        Ok(())
    }
}
