//! The sampler thread: the one writer of what scrapes read about processes. Every
//! [`SAMPLE_INTERVAL`], and as soon as the table changes, it reads each tracked process in
//! /proc (CPU percent over windows of at least [`CPU_WINDOW`], memory, threads), ends the
//! processes whose exit was missed, reads `--gpu-info-dir` (tracking the processes that
//! report), and publishes a [`ProcessView`] and a [`GpuInfoView`] for the collectors.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::health::Health;
use super::observe::track_gpu_user;
use super::table::Table;
use super::CudaState;
use crate::ebpf::{LostCounters, LostCounts};
use crate::gpuinfo::{scan, Limits, Processes, Rejections};
use crate::metrics::{KindCount, ProcessLabels, ProcessSample};
use crate::proc::{ProcError, ProcRoot, ProcSample};
use crate::state::{Counters, GpuInfoView, Member, ProcessView, Published};

/// CPU percent is measured over windows of at least this long, whatever the scrape rate.
pub const CPU_WINDOW: Duration = Duration::from_secs(1);
/// How often every tracked process is read, and `--gpu-info-dir` scanned.
const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
/// After a pass the sampler rests this many times as long as the pass took before it looks
/// for changes again: passes take at most a fifth of a core however fast the table changes,
/// and a burst of execs during the rest costs one pass, not one each. A change after a quiet
/// spell is passed at once; such a pass reads only the processes it has no reading of, every
/// process is read again on the next full pass.
const REST_PER_PASS: u32 = 4;
/// A process found gone (or its pid reused) this long ago that is still alive in the table,
/// once the events thread has drained the ring since, missed its exit event; younger, or
/// before that drain, its exit event may still be in the ring buffer.
const EXIT_EVENT_SLACK: Duration = Duration::from_millis(200);
/// Longest a new containerised process is held back from export while its container's names
/// are looked up (a lookup is bounded by 2 s; Docker and CRI bundles answer in milliseconds).
/// Past it the process is exported with `container_id` alone, and gains the names when the
/// lookup answers.
const NAME_HOLD: Duration = Duration::from_secs(2);
/// Silent this long, the thread is reported stalled (a pass over a full table is far shorter).
const STALL_LIMIT: Duration = Duration::from_secs(30);

/// What the sampler publishes.
#[derive(Default)]
pub(super) struct Views {
    pub processes: Arc<Published<ProcessView>>,
    pub gpu_info: Arc<Published<GpuInfoView>>,
}

/// Reads every process of `table` (and the reports of `--gpu-info-dir`) into `views`; removes
/// what ended from `cuda`'s maps; logs what the kernel lost.
pub(super) fn spawn(
    table: Arc<Table>,
    cuda: Arc<CudaState>,
    counters: Arc<Counters>,
    health: &Arc<Health>,
    views: Views,
    gpu_info: Option<(PathBuf, Limits)>,
    lost: Arc<LostCounters>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let heartbeat = health.register("sampler", Some(STALL_LIMIT));
    std::thread::Builder::new()
        .name("llmscope-sampler".into())
        .spawn(move || {
            let mut sampler = Sampler::new(views, counters.clone());
            let mut lost_before = LostCounts::default();
            let mut next_full = Instant::now();
            while !table.stopping() {
                heartbeat.beat();
                let full = Instant::now() >= next_full;
                if full {
                    next_full = Instant::now() + SAMPLE_INTERVAL;
                    if let Some((dir, limits)) = &gpu_info {
                        sampler.scan_gpu_info(&table, dir, limits);
                    }
                    log_lost(&counters, &lost, &mut lost_before);
                    // Here, not on the events thread: a pass over the CUDA maps waits for
                    // scrapes reading them, and the ring must never wait.
                    super::cuda::sweep(&cuda, table.grace, Instant::now());
                }
                let started = Instant::now();
                sampler.pass(&table, started, full);
                if full {
                    // SAFETY: returns free heap memory to the kernel; no preconditions.
                    unsafe { libc::malloc_trim(0) };
                }
                table.sleep(started.elapsed() * REST_PER_PASS);
                let wait = next_full.saturating_duration_since(Instant::now());
                table.wait_for_change(wait);
            }
        })
}

/// The `events_lost` log event: once a second at most, for each kind that lost records
/// since the last look (the counts themselves are `llmscope_events_lost_total`).
fn log_lost(counters: &Counters, lost: &LostCounters, before: &mut LostCounts) {
    let Ok(now) = lost.read(Counters::get(&counters.library_map_lost)) else {
        return;
    };
    for (kind, is) in now.iter() {
        let was = before.get(kind);
        if is > was {
            tracing::warn!(
                event = "events_lost",
                kind = kind.as_str(),
                lost = is - was,
                total = is,
                "kernel events lost (ring buffer or map full); the /proc scans repair what they missed"
            );
        }
    }
    *before = now;
}

/// The last reading of a pid: the values an exited process keeps during its grace period,
/// and the CPU window (its start, and the percent over the last completed one).
#[derive(Clone, Copy)]
struct Reading {
    sample: ProcSample,
    window_start: (u64, Instant),
    cpu_percent: Option<f64>,
}

#[derive(Default)]
pub(super) struct Sampler {
    views: Views,
    counters: Arc<Counters>,
    last: HashMap<u32, Reading>,
    /// Tracked live processes found gone, and since when.
    gone: HashMap<u32, Instant>,
    rejections: Rejections,
    /// Accepted reports of the last gpu-info scan (labelled at each pass).
    reports: Vec<crate::gpuinfo::GpuInfo>,
    gpu_info_error: Option<String>,
    /// Start times of host pids, for finding the writers of reports from containers.
    host_starts: HashMap<u32, u64>,
}

impl Sampler {
    pub(super) fn new(views: Views, counters: Arc<Counters>) -> Sampler {
        Sampler {
            views,
            counters,
            ..Sampler::default()
        }
    }

    /// A full pass reads every live process; another only those without a reading yet.
    pub(super) fn pass(&mut self, table: &Table, now: Instant, full: bool) {
        let (tracked, dropped, model_names_capped, rules) = {
            let tracker = table.tracker();
            (
                tracker.all(),
                tracker.dropped(),
                tracker.model_names_capped(),
                tracker.rule_counts(),
            )
        };
        let proc = &table.proc;
        let tps = proc.ticks_per_second as f64;
        let mut view = ProcessView {
            dropped,
            model_names_capped,
            rules,
            ..ProcessView::default()
        };
        let mut failures = 0;
        let mut last = HashMap::with_capacity(tracked.len());
        let mut gone = HashMap::new();
        let tracked_containers: Vec<String> = tracked
            .iter()
            .filter_map(|t| Some(t.container.as_ref()?.id.clone()))
            .collect();
        for t in tracked {
            let previous = self
                .last
                .remove(&t.pid)
                .filter(|r| t.start_ticks.is_none_or(|st| st == r.sample.start_ticks));
            let mut alive = t.is_alive();
            // Processes found gone are read on every pass until their exit is settled.
            let known = previous.is_some() && !self.gone.contains_key(&t.pid);
            let reading = if !alive || (!full && known) {
                previous
            } else {
                match proc.sample(t.pid) {
                    Ok(s) if t.start_ticks.is_none_or(|st| st == s.start_ticks) => {
                        Some(advance(previous, s, now, tps))
                    }
                    // Gone, or the pid now belongs to another process.
                    Ok(_) | Err(ProcError::Gone(_)) => {
                        let since = self.gone.get(&t.pid).copied().unwrap_or(now);
                        if now.duration_since(since) >= EXIT_EVENT_SLACK
                            && table.drained_after(since)
                        {
                            if table.exited_as_of(t.pid, t.start_ticks, since) {
                                Counters::add(&self.counters.missed_exit, 1);
                            }
                            alive = false;
                        } else {
                            gone.insert(t.pid, since);
                        }
                        previous
                    }
                    Err(e) => {
                        if failures == 0 {
                            view.error = Some(e.to_string());
                        }
                        failures += 1;
                        previous
                    }
                }
            };
            // A new process is held back until its container is read and that container's
            // names are known (or the lookup is over, or NAME_HOLD passed): its series start
            // with their final labels, never container_id alone and then the names.
            let naming = (!t.container_read
                || t.container
                    .as_ref()
                    .is_some_and(|c| !table.containers.settled(&c.id)))
                && now.saturating_duration_since(t.observed_at) < NAME_HOLD;
            if naming && alive {
                if let Some(reading) = reading {
                    last.insert(t.pid, reading);
                }
                continue;
            }
            let mut labels = ProcessLabels::new(t.pid, &t.name, &t.identity);
            if let Some(c) = &t.container {
                labels = labels.in_container(table.containers.labels(c));
            }
            if let Some(reading) = reading {
                last.insert(t.pid, reading);
                let sample = reading.sample;
                view.samples.push(ProcessSample {
                    labels: labels.clone(),
                    ppid: t.ppid,
                    alive,
                    cpu_seconds: sample.cpu_ticks as f64 / tps,
                    cpu_percent: alive.then_some(reading.cpu_percent).flatten(),
                    memory_bytes: sample.rss_bytes,
                    threads: Some(sample.threads),
                    start_time_seconds: proc.boot_time_seconds as f64
                        + sample.start_ticks as f64 / tps,
                });
            }
            view.members.push(Member {
                pid: t.pid,
                labels,
                alive,
            });
        }
        if failures > 1 {
            view.error = view
                .error
                .map(|first| format!("{failures} process(es) unreadable, first: {first}"));
        }
        if full {
            let in_use: HashSet<&str> = tracked_containers.iter().map(String::as_str).collect();
            table.containers.retain(&in_use);
            // Lookups that failed are retried when due, and dropped ones asked again.
            for id in &in_use {
                table.containers.request(id);
            }
        }
        view.container_lookups = table.containers.results();
        self.last = last;
        self.gone = gone;
        self.publish_gpu_info(&view.members);
        self.views.processes.set(view);
    }

    /// Reads the reports; a process that reports GPU use is tracked (as a GPU user).
    fn scan_gpu_info(&mut self, table: &Table, dir: &std::path::Path, limits: &Limits) {
        let owners = Owners::new(&table.proc, &mut self.host_starts);
        match scan(dir, limits, &owners, SystemTime::now()) {
            Ok(found) => {
                for r in self.rejections.count(&found) {
                    tracing::warn!(
                        event = "gpu_info_rejected",
                        file = %r.file.escape_debug(),
                        reason = r.reason.as_str(),
                        "gpu-info report refused"
                    );
                }
                for info in &found.accepted {
                    track_gpu_user(table, info.pid, "gpu-info report");
                }
                self.reports = found.accepted;
                self.gpu_info_error = None;
            }
            Err(e) => {
                self.reports.clear();
                self.gpu_info_error = Some(format!("--gpu-info-dir {}: {e}", dir.display()));
            }
        }
    }

    fn publish_gpu_info(&self, members: &[Member]) {
        let live: HashMap<u32, &ProcessLabels> = members
            .iter()
            .filter(|m| m.alive)
            .map(|m| (m.pid, &m.labels))
            .collect();
        self.views.gpu_info.set(GpuInfoView {
            reports: self
                .reports
                .iter()
                .filter_map(|info| Some(((*live.get(&info.pid)?).clone(), info.clone())))
                .collect(),
            rejected: self
                .rejections
                .totals()
                .map(|(kind, value)| KindCount { kind, value })
                .collect(),
            scans_truncated: self.rejections.scans_truncated(),
            error: self.gpu_info_error.clone(),
        });
    }
}

/// The owner (effective uid: the owner of /proc/<pid>) and start time of live processes, and
/// the writers of reports from other PID namespaces.
struct Owners<'a> {
    proc: &'a ProcRoot,
    /// Start time of every host pid, kept across scans, so that a scan reads `stat` of new
    /// pids only. A pid reused between two scans keeps a stale entry: a lookup that finds
    /// nothing reads every pid afresh, once per scan.
    starts: std::cell::RefCell<&'a mut HashMap<u32, u64>>,
    /// Live pids by start time, listed once per scan when a report asks (and again, fresh,
    /// when a lookup misses).
    by_start: std::cell::RefCell<Option<HashMap<u64, Vec<u32>>>>,
    fresh: std::cell::Cell<bool>,
}

impl<'a> Owners<'a> {
    fn new(proc: &'a ProcRoot, starts: &'a mut HashMap<u32, u64>) -> Self {
        Owners {
            proc,
            starts: std::cell::RefCell::new(starts),
            by_start: std::cell::RefCell::new(None),
            fresh: std::cell::Cell::new(false),
        }
    }

    /// Live pids by start time; `fresh`: every start read again.
    fn list(&self, fresh: bool) -> HashMap<u64, Vec<u32>> {
        let pids = self.proc.pids().unwrap_or_default();
        let mut starts = self.starts.borrow_mut();
        if fresh {
            starts.clear();
        } else {
            let listed: HashSet<u32> = pids.iter().copied().collect();
            starts.retain(|p, _| listed.contains(p));
        }
        let mut by_start: HashMap<u64, Vec<u32>> = HashMap::new();
        for p in pids {
            let start = match starts.get(&p) {
                Some(&s) => s,
                None => match self.proc.start_ticks(p) {
                    Ok(s) => *starts.entry(p).or_insert(s),
                    Err(_) => continue,
                },
            };
            by_start.entry(start).or_default().push(p);
        }
        by_start
    }

    fn lookup(&self, pid: u32, start_time_ticks: u64) -> Vec<u32> {
        let by_start = self.by_start.borrow();
        by_start
            .as_ref()
            .and_then(|b| b.get(&start_time_ticks))
            .into_iter()
            .flatten()
            .copied()
            .filter(|&host| {
                self.proc.start_ticks(host).ok() == Some(start_time_ticks)
                    && self.proc.ns_pid(host).ok() == Some(pid)
            })
            .collect()
    }
}

impl Processes for Owners<'_> {
    fn find(&self, pid: u32, start_time_ticks: u64) -> Vec<u32> {
        if self.by_start.borrow().is_none() {
            *self.by_start.borrow_mut() = Some(self.list(false));
        }
        let found = self.lookup(pid, start_time_ticks);
        if !found.is_empty() || self.fresh.replace(true) {
            return found;
        }
        *self.by_start.borrow_mut() = Some(self.list(true));
        self.lookup(pid, start_time_ticks)
    }

    fn owner_and_start(&self, pid: u32) -> Option<(Option<u32>, f64)> {
        let proc = self.proc;
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
        // Sampled every 50 ms (a burst of changes): no window closes, nothing is computed
        // from 50 ms.
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
