//! `gpu-info-<pid>.json` reports (`--gpu-info-dir`): what each process says it has allocated
//! and reserved on the GPU, read with the hardened reader at scrape time (bounded: at most
//! `Limits::max_files` files of at most `Limits::max_bytes` each).

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use crate::agent::Shared;
use crate::gpuinfo::{scan, Limits, Processes};
use crate::metrics::{CollectError, Collector, KindCount, ProcessLabels, Snapshot};
use crate::tracker::Observed;

pub struct GpuInfoCollector {
    shared: Arc<Shared>,
    dir: PathBuf,
    limits: Limits,
    /// Refusals since start, by reason.
    rejected: BTreeMap<&'static str, u64>,
}

impl GpuInfoCollector {
    pub fn new(shared: Arc<Shared>, dir: PathBuf, limits: Limits) -> Self {
        GpuInfoCollector {
            shared,
            dir,
            limits,
            rejected: BTreeMap::new(),
        }
    }
}

/// The owner (effective uid: the owner of /proc/<pid>) and start time of live processes.
struct Proc<'a>(&'a Shared);

impl Processes for Proc<'_> {
    fn owner_and_start(&self, pid: u32) -> Option<(Option<u32>, f64)> {
        let proc = &self.0.proc;
        let uid = std::fs::metadata(proc.path().join(pid.to_string()))
            .ok()?
            .uid();
        let sample = proc.sample(pid).ok()?;
        Some((
            Some(uid),
            proc.boot_time_seconds as f64
                + sample.start_ticks as f64 / proc.ticks_per_second as f64,
        ))
    }
}

impl Collector for GpuInfoCollector {
    fn name(&self) -> &'static str {
        "gpu_info"
    }

    fn collect(&mut self, snapshot: &mut Snapshot) -> Result<(), CollectError> {
        let result = scan(
            &self.dir,
            &self.limits,
            &Proc(&self.shared),
            SystemTime::now(),
        )
        .map_err(|e| CollectError(format!("--gpu-info-dir {}: {e}", self.dir.display())));
        let scan = match result {
            Ok(scan) => scan,
            Err(e) => {
                self.export_rejections(snapshot);
                return Err(e);
            }
        };
        for (reason, n) in &scan.rejected {
            *self.rejected.entry(reason).or_default() += n;
        }
        let g = &mut snapshot.gpu;
        for info in &scan.accepted {
            if let Some(labels) = self.labels(info.pid) {
                g.add_report(labels, info);
            }
        }
        g.info_reports = Some(scan.accepted.len() as f64);
        self.export_rejections(snapshot);
        Ok(())
    }
}

impl GpuInfoCollector {
    /// The process's labels, tracking it first (as a GPU user) when it is not yet.
    fn labels(&self, pid: u32) -> Option<ProcessLabels> {
        if let Some(t) = self.shared.tracker().get(pid).filter(|t| t.is_alive()) {
            return Some(ProcessLabels::new(pid, &t.name, &t.identity));
        }
        let (facts, sample) = self.shared.proc.facts(pid).ok()?;
        let observed = self
            .shared
            .tracker()
            .observe_gpu_user(&facts, || Some(sample.start_ticks));
        self.shared.note(pid, &observed);
        let t = self.shared.tracker().get(pid).cloned()?;
        if let Observed::Added(_) = observed {
            tracing::info!(
                pid,
                framework = t.identity.framework.as_str(),
                "GPU process detected from its gpu-info report"
            );
        }
        Some(ProcessLabels::new(pid, &t.name, &t.identity))
    }

    fn export_rejections(&self, snapshot: &mut Snapshot) {
        snapshot.gpu.info_rejected = self
            .rejected
            .iter()
            .map(|(&kind, &value)| KindCount { kind, value })
            .collect();
    }
}
