//! One poll: the process list, gpu-info reports and nvidia-smi output in, the views the
//! collectors read out ([`Poll`]) — classified with the agent's own code, tracked with its
//! table (pid + start time, grace period). Pure over its inputs, so tests drive it with fakes.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use llmscope::collectors::nvml::GpuIndex;
use llmscope::gpuinfo::{Rejections, Scan};
use llmscope::identity::ProcessFacts;
use llmscope::metrics::{KindCount, ProcessLabels, ProcessSample};
use llmscope::state::{DeviceSample, GpuInfoView, Member, ProcessView};
use llmscope::tracker::Tracker;

use crate::smi::{SmiApp, SmiResult};
use crate::source::ProcInfo;

/// What nvidia-smi said on its last run, joined to the tracked processes.
#[derive(Debug, Default)]
pub struct SmiView {
    pub devices: Vec<DeviceSample>,
    /// GPU memory each tracked process holds, by GPU.
    pub processes: Vec<(ProcessLabels, GpuIndex, f64)>,
    pub error: Option<String>,
}

/// The views one poll publishes. `None` for a source that is not configured.
#[derive(Debug, Default)]
pub struct Poll {
    pub processes: ProcessView,
    pub gpu_info: Option<GpuInfoView>,
    pub smi: Option<SmiView>,
}

/// What one poll saw. `None` for a source that is not configured.
pub struct Inputs {
    pub processes: Vec<ProcInfo>,
    pub gpu_info: Option<Result<Scan, String>>,
    pub smi: Option<SmiResult>,
    pub now: Instant,
}

pub struct Poller {
    tracker: Tracker,
    grace: Duration,
    /// Last reading of every tracked process: CPU-percent baseline, and the values an exited
    /// process keeps through its grace period.
    last: HashMap<u32, (ProcInfo, Instant)>,
    rejected: Rejections,
}

impl Poller {
    pub fn new(grace: Duration, max_processes: usize) -> Self {
        Poller {
            tracker: Tracker::new(max_processes),
            grace,
            last: HashMap::new(),
            rejected: Rejections::default(),
        }
    }

    /// Classifies with `rules` (user rules before the built-in ones) from the next poll on.
    pub fn set_rules(&mut self, rules: Option<std::sync::Arc<llmscope::identity::Rules>>) {
        self.tracker.set_rules(rules);
    }

    pub fn rules_reload_failed(&mut self) {
        self.tracker.rules_reload_failed();
    }

    pub fn poll(&mut self, inputs: Inputs) -> Poll {
        let now = inputs.now;
        let mut processes = inputs.processes;
        // Parents before children, so children can inherit.
        processes.sort_by_key(|p| (p.start_time, p.pid));
        let by_pid: HashMap<u32, &ProcInfo> = processes.iter().map(|p| (p.pid, p)).collect();
        for pid in self.tracker.live_pids() {
            if !by_pid.contains_key(&pid) {
                self.tracker.exited(pid, now);
            }
        }
        for p in &processes {
            self.tracker.refresh(&facts(p), || Some(p.start_time), now);
        }
        // Whatever reports GPU use is tracked, classified or not.
        let gpu_pids: Vec<u32> = gpu_report_pids(&inputs.gpu_info, &inputs.smi);
        for pid in gpu_pids {
            if let Some(p) = by_pid.get(&pid) {
                self.tracker
                    .observe_gpu_user(&facts(p), || Some(p.start_time));
            }
        }
        self.tracker.expire(now, self.grace);

        let mut view = ProcessView::default();
        let mut last = HashMap::new();
        let mut labels: HashMap<u32, ProcessLabels> = HashMap::new();
        for t in self.tracker.all() {
            let l = ProcessLabels::new(t.pid, &t.name, &t.identity);
            view.members.push(Member {
                pid: t.pid,
                labels: l.clone(),
                alive: t.is_alive(),
            });
            let previous = self
                .last
                .remove(&t.pid)
                .filter(|(p, _)| Some(p.start_time) == t.start_ticks);
            let current = by_pid
                .get(&t.pid)
                .filter(|_| t.is_alive())
                .map(|p| ((*p).clone(), now));
            let cpu_percent = match (&current, &previous) {
                (Some((c, at)), Some((p, before))) => {
                    let wall = at.duration_since(*before).as_secs_f64();
                    (wall > 0.0).then(|| (c.cpu_seconds - p.cpu_seconds).max(0.0) / wall * 100.0)
                }
                _ => None,
            };
            let Some((info, at)) = current.or(previous) else {
                continue;
            };
            view.samples.push(ProcessSample {
                labels: l.clone(),
                ppid: t.ppid,
                alive: t.is_alive(),
                cpu_seconds: info.cpu_seconds,
                cpu_percent,
                memory_bytes: info.memory_bytes,
                threads: info.threads,
                start_time_seconds: info.start_time as f64,
            });
            labels.insert(t.pid, l);
            last.insert(t.pid, (info, at));
        }
        self.last = last;
        view.members.sort_by_key(|m| m.pid);
        view.dropped = self.tracker.dropped();
        view.model_names_capped = self.tracker.model_names_capped();
        view.rules = self.tracker.rule_counts();
        Poll {
            gpu_info: inputs.gpu_info.map(|scan| self.gpu_info(scan, &labels)),
            smi: inputs.smi.map(|smi| smi_view(smi, &labels)),
            processes: view,
        }
    }

    fn gpu_info(
        &mut self,
        scan: Result<Scan, String>,
        labels: &HashMap<u32, ProcessLabels>,
    ) -> GpuInfoView {
        let mut view = GpuInfoView::default();
        match scan {
            Ok(scan) => {
                self.rejected.count(&scan);
                view.reports = scan
                    .accepted
                    .into_iter()
                    .filter_map(|info| Some((labels.get(&info.pid)?.clone(), info)))
                    .collect();
            }
            Err(e) => {
                tracing::debug!(error = %e, "reading gpu-info reports failed");
                view.error = Some(e);
            }
        }
        view.scans_truncated = self.rejected.scans_truncated();
        view.rejected = self
            .rejected
            .totals()
            .map(|(kind, value)| KindCount { kind, value })
            .collect();
        view
    }
}

fn facts(p: &ProcInfo) -> ProcessFacts {
    ProcessFacts {
        pid: p.pid,
        ppid: p.ppid,
        comm: p.name.clone(),
        exe: p.exe.clone(),
        argv: p.argv.clone(),
        env: Vec::new(),
        libraries: Vec::new(),
    }
}

fn gpu_report_pids(gpu_info: &Option<Result<Scan, String>>, smi: &Option<SmiResult>) -> Vec<u32> {
    let from_files = gpu_info
        .iter()
        .flatten()
        .flat_map(|s| s.accepted.iter().map(|i| i.pid));
    let from_smi = smi
        .iter()
        .flatten()
        .flat_map(|(_, apps)| apps.iter().map(|a| a.pid));
    from_files.chain(from_smi).collect()
}

fn smi_view(smi: SmiResult, labels: &HashMap<u32, ProcessLabels>) -> SmiView {
    let (gpus, apps): (Vec<DeviceSample>, Vec<SmiApp>) = match smi {
        Ok(answer) => answer,
        Err(e) => {
            return SmiView {
                error: Some(e),
                ..Default::default()
            }
        }
    };
    let index_of: HashMap<&str, u32> = gpus.iter().map(|d| (d.uuid.as_str(), d.index)).collect();
    let processes = apps
        .iter()
        .filter_map(|app| {
            let l = labels.get(&app.pid)?;
            let index = index_of.get(app.gpu_uuid.as_str())?;
            Some((l.clone(), GpuIndex::new(*index), app.memory_bytes?))
        })
        .collect();
    SmiView {
        devices: gpus,
        processes,
        error: None,
    }
}

#[cfg(test)]
mod tests;
