//! Per-process CPU, memory and threads of every tracked LLM process, from /proc.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::agent::Shared;
use crate::metrics::{CollectError, Collector, ProcessLabels, ProcessSample, Snapshot};
use crate::proc::{ProcError, ProcSample};

/// CPU percent is measured over windows of at least this long, whatever the scrape rate: a
/// scraper polling every 50 ms neither resets another's baseline nor sees a 50 ms sample.
pub const CPU_WINDOW: Duration = Duration::from_secs(1);

/// The last reading of a pid: the values an exited process keeps during its grace period,
/// and the CPU window (its start, and the percent over the last completed one).
#[derive(Clone, Copy)]
struct Reading {
    sample: ProcSample,
    window_start: (u64, Instant),
    cpu_percent: Option<f64>,
}

pub struct ProcessCollector {
    shared: Arc<Shared>,
    last: HashMap<u32, Reading>,
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
                .filter(|r| t.start_ticks.is_none_or(|st| st == r.sample.start_ticks));
            let mut alive = t.is_alive();
            let reading = if alive {
                match proc.sample(t.pid) {
                    Ok(s) if t.start_ticks.is_none_or(|st| st == s.start_ticks) => {
                        Some(advance(previous, s, now, tps))
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
            let Some(reading) = reading else {
                continue;
            };
            last.insert(t.pid, reading);
            let sample = reading.sample;
            snapshot.processes.push(ProcessSample {
                labels: ProcessLabels::new(t.pid, &t.name, &t.identity),
                alive,
                cpu_seconds: sample.cpu_ticks as f64 / tps,
                cpu_percent: alive.then_some(reading.cpu_percent).flatten(),
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

/// A new sample: the CPU window closes (and its percent is computed) once it is at least
/// [`CPU_WINDOW`] long; until then the last completed window's percent stands.
fn advance(previous: Option<Reading>, sample: ProcSample, now: Instant, tps: f64) -> Reading {
    let Some(prev) = previous else {
        return Reading {
            sample,
            window_start: (sample.cpu_ticks, now),
            cpu_percent: None,
        };
    };
    let (start_ticks, start_at) = prev.window_start;
    let wall = now.duration_since(start_at);
    if wall < CPU_WINDOW {
        return Reading { sample, ..prev };
    }
    let percent =
        sample.cpu_ticks.saturating_sub(start_ticks) as f64 / tps / wall.as_secs_f64() * 100.0;
    Reading {
        sample,
        window_start: (sample.cpu_ticks, now),
        cpu_percent: Some(percent),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(cpu_ticks: u64) -> ProcSample {
        ProcSample {
            cpu_ticks,
            ..Default::default()
        }
    }

    #[test]
    fn cpu_percent_is_over_windows_of_at_least_a_second() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let r = advance(None, sample(0), t0, 100.0);
        assert_eq!(r.cpu_percent, None);
        // Polled every 50 ms: no window closes, nothing is computed from 50 ms.
        let mut r = r;
        for i in 1..20 {
            r = advance(Some(r), sample(5 * i), ms(50 * i), 100.0);
            assert_eq!(r.cpu_percent, None);
        }
        // One core for 1 s at 100 ticks/s.
        let r = advance(Some(r), sample(100), ms(1000), 100.0);
        assert_eq!(r.cpu_percent, Some(100.0));
        let r = advance(Some(r), sample(102), ms(1050), 100.0);
        assert_eq!(r.cpu_percent, Some(100.0), "the last window stands");
    }
}
