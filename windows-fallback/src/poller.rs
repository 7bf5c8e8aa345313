//! One poll: the process list, gpu-info reports and nvidia-smi output in, a [`Snapshot`]
//! out — classified with the agent's own code, tracked with its table (pid + start time, grace
//! period), encoded by its metric model. Pure over its inputs, so tests drive it with fakes.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use llmscope::gpuinfo::{Rejections, Scan};
use llmscope::identity::ProcessFacts;
use llmscope::metrics::gpu::{GpuIndex, GpuLabels, GpuSnapshot};
use llmscope::metrics::{CollectorStatus, KindCount, ProcessLabels, ProcessSample, Snapshot};
use llmscope::tracker::Tracker;

use crate::smi::{SmiApp, SmiGpu, SmiResult};
use crate::source::ProcInfo;

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

    pub fn poll(&mut self, inputs: Inputs) -> Snapshot {
        let started = Instant::now();
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

        let mut snapshot = Snapshot::default();
        let mut last = HashMap::new();
        let mut labels: HashMap<u32, ProcessLabels> = HashMap::new();
        for t in self.tracker.all() {
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
            let l = ProcessLabels::new(t.pid, &t.name, &t.identity);
            snapshot.processes.push(ProcessSample {
                labels: l.clone(),
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
        snapshot.agent.tracked_processes = self.tracker.len() as u64;
        snapshot.agent.tracked_dropped = self.tracker.dropped();
        snapshot.agent.model_names_capped = self.tracker.model_names_capped();
        snapshot.collectors.push(CollectorStatus {
            collector: "process",
            success: true,
            duration_seconds: started.elapsed().as_secs_f64(),
        });

        if let Some(gpu_info) = inputs.gpu_info {
            let ok = self.add_gpu_info(&mut snapshot.gpu, gpu_info, &labels);
            snapshot.collectors.push(CollectorStatus {
                collector: "gpu_info",
                success: ok,
                duration_seconds: 0.0,
            });
        }
        if let Some(smi) = inputs.smi {
            let ok = smi.is_ok();
            if let Ok((gpus, apps)) = smi {
                add_smi(&mut snapshot.gpu, &gpus, &apps, &labels);
            }
            snapshot.collectors.push(CollectorStatus {
                collector: "nvidia_smi",
                success: ok,
                duration_seconds: 0.0,
            });
        }
        snapshot
    }

    fn add_gpu_info(
        &mut self,
        g: &mut GpuSnapshot,
        scan: Result<Scan, String>,
        labels: &HashMap<u32, ProcessLabels>,
    ) -> bool {
        let ok = match scan {
            Ok(scan) => {
                self.rejected.count(&scan);
                for info in &scan.accepted {
                    if let Some(l) = labels.get(&info.pid) {
                        g.add_report(l.clone(), info);
                    }
                }
                g.info_reports = Some(scan.accepted.len() as f64);
                true
            }
            Err(e) => {
                tracing::debug!(error = %e, "reading gpu-info reports failed");
                g.info_reports = Some(0.0);
                false
            }
        };
        g.info_scans_truncated = self.rejected.scans_truncated();
        g.info_rejected = self
            .rejected
            .totals()
            .map(|(kind, value)| KindCount { kind, value })
            .collect();
        ok
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

fn add_smi(
    g: &mut GpuSnapshot,
    gpus: &[SmiGpu],
    apps: &[SmiApp],
    labels: &HashMap<u32, ProcessLabels>,
) {
    let gl = |d: &SmiGpu| GpuLabels {
        gpu: d.index.to_string(),
        uuid: d.uuid.clone(),
        name: d.name.clone(),
    };
    let family = |name: &'static str, f: fn(&SmiGpu) -> Option<f64>| {
        let series = gpus
            .iter()
            .filter_map(|d| f(d).map(|v| (gl(d), v)))
            .collect();
        (name, llmscope::metrics::gpu::device_help(name), series)
    };
    g.devices = vec![
        family("nvidia_gpu_utilization", |d| d.utilization_percent),
        family("nvidia_gpu_memory_used_bytes", |d| d.memory_used_bytes),
        family("nvidia_gpu_memory_total_bytes", |d| d.memory_total_bytes),
        family("nvidia_gpu_temperature", |d| d.temperature_celsius),
        family("nvidia_gpu_power_usage", |d| d.power_watts),
    ];
    let index_of: HashMap<&str, u32> = gpus.iter().map(|d| (d.uuid.as_str(), d.index)).collect();
    for app in apps {
        let (Some(l), Some(index), Some(bytes)) = (
            labels.get(&app.pid),
            index_of.get(app.gpu_uuid.as_str()),
            app.memory_bytes,
        ) else {
            continue;
        };
        g.process_memory.push((
            (
                l.clone(),
                GpuIndex {
                    gpu: index.to_string(),
                },
            ),
            bytes,
        ));
    }
}

#[cfg(test)]
mod tests;
