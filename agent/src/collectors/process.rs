//! Per-process CPU, memory and threads of every tracked LLM process, from /proc.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use crate::agent::Shared;
use crate::metrics::{CollectError, Collector, ProcessLabels, ProcessSample, Snapshot};
use crate::proc::{ProcError, ProcSample};

pub struct ProcessCollector {
    shared: Arc<Shared>,
    /// Last reading per pid: the baseline for CPU percent, and the values an exited process
    /// keeps during its grace period.
    last: HashMap<u32, (ProcSample, Instant)>,
}

impl ProcessCollector {
    pub fn new(shared: Arc<Shared>) -> Self {
        ProcessCollector {
            shared,
            last: HashMap::new(),
        }
    }
}

impl Collector for ProcessCollector {
    fn name(&self) -> &'static str {
        "process"
    }

    fn collect(&mut self, snapshot: &mut Snapshot) -> Result<(), CollectError> {
        let now = Instant::now();
        let (tracked, dropped, capped) = {
            let mut tracker = self.shared.tracker();
            tracker.expire(now, self.shared.grace);
            (
                tracker.all(),
                tracker.dropped(),
                tracker.model_names_capped(),
            )
        };
        snapshot.agent.tracked_processes = tracked.len() as u64;
        snapshot.agent.tracked_dropped = dropped;
        snapshot.agent.model_names_capped = capped;
        let proc = &self.shared.proc;
        let tps = proc.ticks_per_second as f64;
        let mut failures = Vec::new();
        let mut last = HashMap::with_capacity(tracked.len());
        for t in tracked {
            let previous = self
                .last
                .remove(&t.pid)
                .filter(|(s, _)| t.start_ticks.is_none_or(|st| st == s.start_ticks));
            let mut alive = t.is_alive();
            let mut cpu_percent = None;
            let reading = if alive {
                match proc.sample(t.pid) {
                    Ok(s) if t.start_ticks.is_none_or(|st| st == s.start_ticks) => {
                        cpu_percent = previous.and_then(|(p, at)| {
                            let wall = now.duration_since(at).as_secs_f64();
                            (wall > 0.0).then(|| {
                                s.cpu_ticks.saturating_sub(p.cpu_ticks) as f64 / tps / wall * 100.0
                            })
                        });
                        Some((s, now))
                    }
                    // Gone, or the pid now belongs to another process: the exit was missed.
                    Ok(_) | Err(ProcError::Gone(_)) => {
                        if self.shared.exited(t.pid) {
                            self.shared
                                .counters
                                .missed_exit
                                .fetch_add(1, Ordering::Relaxed);
                        }
                        alive = false;
                        previous
                    }
                    Err(e) => {
                        failures.push(e.to_string());
                        previous
                    }
                }
            } else {
                previous
            };
            let Some((sample, at)) = reading else {
                continue;
            };
            last.insert(t.pid, (sample, at));
            snapshot.processes.push(ProcessSample {
                labels: ProcessLabels::new(t.pid, &t.name, &t.identity),
                alive,
                cpu_seconds: sample.cpu_ticks as f64 / tps,
                cpu_percent,
                memory_bytes: sample.rss_bytes,
                threads: Some(sample.threads),
                start_time_seconds: proc.boot_time_seconds as f64 + sample.start_ticks as f64 / tps,
            });
        }
        self.last = last;
        match failures.first() {
            None => Ok(()),
            Some(first) => Err(CollectError(format!(
                "{} process(es) unreadable, first: {first}",
                failures.len()
            ))),
        }
    }
}
