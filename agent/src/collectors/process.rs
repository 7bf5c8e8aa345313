//! Per-process CPU, memory and threads of every tracked LLM process, as the sampler last
//! read them (`agent::sampler`), and the process table's own counts: a scrape copies the
//! published view and changes nothing.

use std::collections::BTreeMap;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;

use crate::metrics::{CollectError, Collector, Families, Family, ProcessSample};
use crate::state::{ProcessView, Published};

static COUNT: Family = Family::gauge(
    "llm_process_count",
    "Running LLM processes by model family, model and framework.",
);
static CPU_PERCENT: Family = Family::gauge("llm_process_cpu_percent", "CPU use of the process over its last window of at least 1 s, as the agent samples it every second (not since the previous scrape), in percent of one core.");
static CPU_SECONDS: Family = Family::counter(
    "llm_process_cpu_seconds",
    "CPU time (user + system) the process has used.",
);
static MEMORY: Family = Family::gauge(
    "llm_process_memory_bytes",
    "Resident set size of the process.",
);
static THREADS: Family = Family::gauge("llm_process_threads", "Threads in the process.");
static START_TIME: Family = Family::gauge(
    "llm_process_start_time_seconds",
    "Start time of the process, seconds since the Unix epoch.",
);
static TRACKED: Family = Family::gauge(
    "llmscope_tracked_processes",
    "LLM processes in the agent's table, including those in their grace period after exit.",
);
static DROPPED: Family = Family::counter(
    "llmscope_tracked_processes_dropped",
    "LLM processes not tracked because the table was full (--max-processes).",
);
static CAPPED: Family = Family::counter("llmscope_model_names_capped", "LLM processes exported with model_name=\"other\" because the distinct model names reached --max-model-names.");
static RULE_MATCHES: Family = Family::counter("llmscope_classify_rule_matches", "Processes each user classification rule (--classify.rules) matched: named, or excluded by an ignore rule.");
static RULES_RELOAD_FAILURES: Family = Family::counter("llmscope_classify_rules_reload_failures", "Changed rules files (--classify.rules) that could not be used; the rules in use were kept (the agent's log says why).");
static CONTAINER_LOOKUPS: Family = Family::counter("llmscope_container_lookups", "Container name lookups in the container runtime, by result (ok, not_found, error; dropped: the lookup queue was full).");

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, EncodeLabelSet)]
struct CountLabels {
    llm_type: String,
    model_name: String,
    framework: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RuleLabel {
    rule: String,
}

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

    fn collect(&self, out: &mut Families) -> Result<(), CollectError> {
        let view = self.view.get();
        let samples = &view.samples;
        let mut counts: BTreeMap<CountLabels, f64> = BTreeMap::new();
        for p in samples.iter().filter(|p| p.alive) {
            let key = CountLabels {
                llm_type: p.labels.llm_type.clone(),
                model_name: p.labels.model_name.clone(),
                framework: p.labels.framework.clone(),
            };
            *counts.entry(key).or_default() += 1.0;
        }
        out.extend(&COUNT, counts);
        let mut each = |family: &'static Family, value: fn(&ProcessSample) -> Option<f64>| {
            out.extend(
                family,
                samples
                    .iter()
                    .filter_map(|p| Some((p.labels.clone(), value(p)?))),
            );
        };
        each(&CPU_PERCENT, |p| p.cpu_percent);
        each(&CPU_SECONDS, |p| Some(p.cpu_seconds));
        each(&MEMORY, |p| Some(p.memory_bytes as f64));
        each(&THREADS, |p| p.threads.map(|t| t as f64));
        each(&START_TIME, |p| Some(p.start_time_seconds));
        out.set(&TRACKED, view.members.len() as f64);
        out.set(&DROPPED, view.dropped as f64);
        out.set(&CAPPED, view.model_names_capped as f64);
        out.counts(&CONTAINER_LOOKUPS, "kind", &view.container_lookups);
        if let Some(rules) = &view.rules {
            out.extend(
                &RULE_MATCHES,
                rules
                    .matches
                    .iter()
                    .map(|(rule, n)| (RuleLabel { rule: rule.clone() }, *n as f64)),
            );
            out.set(&RULES_RELOAD_FAILURES, rules.reload_failures as f64);
        }
        match &view.error {
            None => Ok(()),
            Some(e) => Err(CollectError(e.clone())),
        }
    }
}
