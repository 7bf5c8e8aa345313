//! The metric model shared by every llmscope binary: a [`Snapshot`] gathered by collectors,
//! encoded by prometheus-client, served as Prometheus text or OpenMetrics.
//!
//! Gather and encode are separate: collectors do the slow work (/proc, kernel maps) and fill
//! a snapshot; encoding the snapshot is cheap and cannot fail halfway through a collector.

pub mod cuda;
mod encode;
pub mod exposition;
pub mod gpu;

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::identity::Identity;

/// The labels of every per-process series.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct ProcessLabels {
    pub pid: String,
    pub name: String,
    pub llm_type: String,
    pub model_name: String,
    pub framework: String,
    pub role: String,
    #[serde(flatten)]
    pub container: ContainerLabels,
}

/// Where a process runs (the cAdvisor / kube-state-metrics label names). Empty fields are
/// left out of the label set: a process in no container has none of them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
pub struct ContainerLabels {
    /// The container's id, 12 hex digits (as `docker ps` shows it).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub container_id: String,
    /// Its name: the Kubernetes container name, or the runtime's (Docker's) name.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub container: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub pod: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub namespace: String,
}

impl ProcessLabels {
    pub fn new(pid: u32, name: &str, identity: &Identity) -> Self {
        ProcessLabels {
            pid: pid.to_string(),
            name: name.to_owned(),
            llm_type: identity.llm_type.clone(),
            model_name: identity.model_name.clone(),
            framework: identity.framework.as_str().to_owned(),
            role: identity.role.as_str().to_owned(),
            container: ContainerLabels::default(),
        }
    }

    pub fn in_container(mut self, container: ContainerLabels) -> Self {
        self.container = container;
        self
    }
}

impl prometheus_client::encoding::EncodeLabelSet for ProcessLabels {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelSetEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeLabel;
        let c = &self.container;
        let always = [
            ("pid", &self.pid),
            ("name", &self.name),
            ("llm_type", &self.llm_type),
            ("model_name", &self.model_name),
            ("framework", &self.framework),
            ("role", &self.role),
        ];
        let where_ = [
            ("container_id", &c.container_id),
            ("container", &c.container),
            ("pod", &c.pod),
            ("namespace", &c.namespace),
        ];
        for (key, value) in always
            .into_iter()
            .chain(where_.into_iter().filter(|(_, v)| !v.is_empty()))
        {
            (key, value.as_str()).encode(encoder.encode_label())?;
        }
        Ok(())
    }
}

/// One process's resource use at the last reading.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProcessSample {
    #[serde(flatten)]
    pub labels: ProcessLabels,
    /// False during the grace period after exit (values are the last reading).
    pub alive: bool,
    pub cpu_seconds: f64,
    /// CPU use over the last window of at least a second, in percent of one core; None
    /// until the first window closes.
    pub cpu_percent: Option<f64>,
    pub memory_bytes: u64,
    /// None where the platform does not say (Windows): the series is left out, not 0.
    pub threads: Option<u64>,
    pub start_time_seconds: f64,
}

/// Whether a collector worked on this scrape, and how long it took.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CollectorStatus {
    pub collector: &'static str,
    pub success: bool,
    pub duration_seconds: f64,
}

/// A counter with one label, `kind`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KindCount {
    pub kind: &'static str,
    pub value: u64,
}

impl KindCount {
    pub fn list(counts: &[(&'static str, u64)]) -> Vec<KindCount> {
        counts
            .iter()
            .map(|&(kind, value)| KindCount { kind, value })
            .collect()
    }
}

/// The agent's own health.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct AgentStats {
    pub tracked_processes: u64,
    pub tracked_dropped: u64,
    /// Processes exported with `model_name="other"` because of the distinct-name cap.
    pub model_names_capped: u64,
    /// Kernel events received, by kind (exec, exit).
    pub events: Vec<KindCount>,
    /// Kernel events lost (ring buffer full), by kind.
    pub events_lost: Vec<KindCount>,
    /// What reconciliation repaired, by kind (missed_exec, missed_exit).
    pub repairs: Vec<KindCount>,
    /// Container name lookups by result (ok, not_found, error, dropped).
    pub container_lookups: Vec<KindCount>,
    /// Probes of inference servers' endpoints, by outcome.
    pub server_probes: Vec<KindCount>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Snapshot {
    pub processes: Vec<ProcessSample>,
    pub cuda: cuda::CudaSnapshot,
    /// Inference servers' own endpoints: (process, `host:port`, state).
    pub server_endpoints: Vec<(ProcessLabels, String, &'static str)>,
    /// Models Ollama servers have loaded (`model_name`: the loaded model).
    pub ollama_models: Vec<(ProcessLabels, crate::servers::LoadedModel)>,
    pub gpu: gpu::GpuSnapshot,
    pub collectors: Vec<CollectorStatus>,
    pub agent: AgentStats,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CollectError(pub String);

/// A source of metrics. A collector that fails never fails the scrape: it shows up as
/// `llmscope_collector_success{collector="…"} 0`, and whatever it did fill in stays.
/// Collectors only read what producers published (`&self`): any number of scrapes may run
/// at once and see the same values.
pub trait Collector: Send + Sync {
    fn name(&self) -> &'static str;
    fn collect(&self, snapshot: &mut Snapshot) -> Result<(), CollectError>;
}

/// Runs every collector into one snapshot, recording success and duration of each; a
/// collector that fails or panics shows as `llmscope_collector_success{collector} 0`.
pub fn gather(collectors: &[Box<dyn Collector>]) -> Snapshot {
    let mut snapshot = Snapshot::default();
    for c in collectors {
        let started = Instant::now();
        // A collector that panics fails alone: what it filled in stays, the scrape goes on.
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c.collect(&mut snapshot)))
                .unwrap_or_else(|_| Err(CollectError("the collector panicked".into())));
        if let Err(e) = &result {
            tracing::debug!(collector = c.name(), error = %e, "collector failed");
        }
        snapshot.collectors.push(CollectorStatus {
            collector: c.name(),
            success: result.is_ok(),
            duration_seconds: secs(started.elapsed()),
        });
    }
    snapshot
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Static facts about this build, exported as `llmscope_build_info`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelSet)]
pub struct BuildInfo {
    pub version: String,
    /// `ebpf` for the Linux agent, `polling` for windows-fallback.
    pub mode: String,
}

impl BuildInfo {
    pub fn new(mode: &str) -> Self {
        BuildInfo {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            mode: mode.to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Panics;
    impl Collector for Panics {
        fn name(&self) -> &'static str {
            "panics"
        }
        fn collect(&self, _: &mut Snapshot) -> Result<(), CollectError> {
            panic!("a bug in a collector")
        }
    }

    struct Counts;
    impl Collector for Counts {
        fn name(&self) -> &'static str {
            "counts"
        }
        fn collect(&self, s: &mut Snapshot) -> Result<(), CollectError> {
            s.agent.tracked_processes = 3;
            Ok(())
        }
    }

    #[test]
    fn a_panicking_collector_fails_alone() {
        let collectors: Vec<Box<dyn Collector>> = vec![Box::new(Panics), Box::new(Counts)];
        let snapshot = gather(&collectors);
        let status: Vec<(&str, bool)> = snapshot
            .collectors
            .iter()
            .map(|c| (c.collector, c.success))
            .collect();
        assert_eq!(status, [("panics", false), ("counts", true)]);
        assert_eq!(snapshot.agent.tracked_processes, 3);
    }
}
