//! The CUDA side of the agent runtime: reacting to the probes' rare events (first CUDA use,
//! OOM), retiring the counters of process images that ended, and the kernel-launch duty
//! cycle. Finding and probing libraries is in `libraries.rs`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_common::cuda::{cookie, AllocKey, CudaKey, FUNCTIONS, KIND_LAUNCH};

use super::health::Health;
use super::libraries::AttachJob;
use super::observe::track_gpu_user;
use super::table::{Life, Table};
use super::CudaState;
use crate::collectors::cuda::{CudaReading, CudaSource};
use crate::cuda::calibrate::thread_cpu_time;
use crate::cuda::launches::{
    self, detach_stall, next_duty, CycleCost, CycleHistory, ProcessFunction,
};
use crate::identity::Framework;
use crate::state::Member;

/// Most retired generations waiting for their grace period; past it the oldest are removed
/// from the maps early (their series end sooner; nothing grows without bound).
const MAX_RETIRED: usize = 65_536;

/// The first probe hit of a process: track it (as `framework="unknown"` when nothing
/// classifies it) and probe any other CUDA library it maps.
pub(super) fn on_first_use(table: &Table, cuda: &CudaState, pid: u32) {
    track_gpu_user(table, pid, "first CUDA call");
    cuda.queue.send(AttachJob::Discover { pid });
}

/// Counter generations of process images that ended (exit, or exec after calling CUDA): the
/// kernel already forgot their live memory; their counters stay in the maps for the grace
/// period, so their series do too, and are then removed.
#[derive(Default)]
pub struct Retired {
    /// (tgid, generation, when), oldest first; generation 0: the image called no CUDA.
    entries: VecDeque<(u32, u32, Instant)>,
    /// The generation of each tgid's last ended image, while it is in its grace period.
    latest: HashMap<u32, u32>,
    members: HashSet<(u32, u32)>,
    /// Counters of no live and no retired image at the last sweep (their end was lost).
    suspects: HashSet<(u32, u32)>,
}

impl Retired {
    /// Image `generation` of `tgid` ended (0: it called no CUDA — recorded only when an
    /// earlier image of the pid is still in its grace period, so that one is not shown for it).
    pub fn retire(&mut self, tgid: u32, generation: u32, now: Instant) {
        if generation == 0 && !self.latest.contains_key(&tgid) {
            return;
        }
        self.entries.push_back((tgid, generation, now));
        self.latest.insert(tgid, generation);
        self.members.insert((tgid, generation));
    }

    /// The generation of `tgid`'s last ended image, if one is in its grace period.
    pub fn latest(&self, tgid: u32) -> Option<u32> {
        self.latest.get(&tgid).copied().filter(|g| *g != 0)
    }

    /// Takes the generations whose grace period is over (or that overflow the bound).
    fn expire(&mut self, now: Instant, grace: Duration) -> HashSet<(u32, u32)> {
        let mut expired = HashSet::new();
        while let Some(&(tgid, generation, at)) = self.entries.front() {
            if now.duration_since(at) < grace && self.entries.len() <= MAX_RETIRED {
                break;
            }
            self.entries.pop_front();
            self.members.remove(&(tgid, generation));
            if self.latest.get(&tgid) == Some(&generation) {
                self.latest.remove(&tgid);
            }
            if generation != 0 {
                expired.insert((tgid, generation));
            }
        }
        if self.entries.capacity() > 4 * self.entries.len() + 64 {
            self.entries.shrink_to_fit();
            self.latest.shrink_to_fit();
            self.members.shrink_to_fit();
        }
        expired
    }
}

/// Removes from the kernel maps the counters and allocations of retired images whose grace
/// period is over, and of images whose end was never reported (found orphaned twice in a
/// row: an end drained but not yet retired when one sweep ran is retired by the next).
/// Runs on the sampler thread once a second.
pub(super) fn sweep(cuda: &CudaState, grace: Duration, now: Instant) {
    // What is retired, copied out: the events thread takes this lock on every exit, and
    // must not wait for the pass over the maps below.
    let (expired, retired, suspects) = {
        let mut retired = cuda.retired();
        let expired = retired.expire(now, grace);
        (
            expired,
            retired.members.clone(),
            std::mem::take(&mut retired.suspects),
        )
    };
    let mut maps = cuda.maps();
    let current: HashMap<u32, u32> = maps.seen.iter().filter_map(Result::ok).collect();
    let mut orphans: HashSet<(u32, u32)> = HashSet::new();
    let mut doomed = |tgid: u32, generation: u32| {
        let id = (tgid, generation);
        if expired.contains(&id) {
            return true;
        }
        if current.get(&tgid) == Some(&generation) || retired.contains(&id) {
            return false;
        }
        orphans.insert(id);
        suspects.contains(&id)
    };
    let stats: Vec<CudaKey> = maps
        .stats
        .keys()
        .filter_map(Result::ok)
        .filter(|k| doomed(k.tgid, k.generation))
        .collect();
    let allocs: Vec<AllocKey> = maps
        .allocs
        .keys()
        .filter_map(Result::ok)
        .filter(|k| doomed(k.tgid, k.generation))
        .collect();
    for k in &stats {
        let _ = maps.stats.remove(k);
    }
    for k in &allocs {
        let _ = maps.allocs.remove(k);
    }
    drop(maps);
    cuda.retired().suspects = orphans;
    if !expired.is_empty() {
        let mut launches = cuda.launches();
        for (tgid, generation) in expired {
            launches.forget(tgid, generation);
        }
    }
}

impl CudaSource for CudaState {
    fn read(&self, members: &[Member]) -> CudaReading {
        // The ended image each exited member shows, under the events thread's lock only as
        // long as these lookups take.
        let ended: HashMap<u32, u32> = {
            let retired = self.retired();
            members
                .iter()
                .filter(|m| !m.alive)
                .filter_map(|m| Some((m.pid, retired.latest(m.pid)?)))
                .collect()
        };
        let (stats, live) = {
            let maps = self.maps();
            let current: HashMap<u32, u32> = maps.seen.iter().filter_map(Result::ok).collect();
            // The one image whose counters each member shows.
            let generation: HashMap<u32, u32> = members
                .iter()
                .filter_map(|m| {
                    let g = if m.alive {
                        current.get(&m.pid).copied()
                    } else {
                        ended.get(&m.pid).copied()
                    };
                    g.map(|g| (m.pid, g))
                })
                .collect();
            let stats: Vec<_> = maps
                .stats
                .iter()
                .filter_map(Result::ok)
                .filter(|(k, _)| generation.get(&k.tgid) == Some(&k.generation))
                .collect();
            // Live bytes are the current image's (the kernel drops them at exit and exec).
            let alive: HashSet<u32> = members.iter().filter(|m| m.alive).map(|m| m.pid).collect();
            let live: Vec<_> = maps
                .live
                .iter()
                .filter_map(Result::ok)
                .filter(|(tgid, _)| alive.contains(tgid))
                .collect();
            (stats, live)
        };
        let launches = self.launches();
        let launch_totals = stats
            .iter()
            .filter_map(|(k, _)| {
                launches
                    .total((k.tgid, k.generation, k.function))
                    .map(|t| ((k.tgid, k.function), t))
            })
            .collect();
        CudaReading {
            stats,
            live,
            launch_totals,
            launch_mode: launches.mode,
            duty: launches.duty,
            period: launches.period,
            cycle: launches.cycle,
            hit_cost: launches.measured_hit_cost,
            attacher: self.attacher_stats(),
            detach_backlog: self.detach_backlog.load(Ordering::Relaxed),
            attach_requests_dropped: self.attach_requests_dropped(),
            library_hook: self.mmap_hook.as_str(),
        }
    }
}

/// The `cuda_oom` log event.
pub(super) fn on_oom(table: &Table, pid: u32, function: u32, code: u32, size: u64) {
    let (framework, model_name) = table
        .tracker()
        .get(pid)
        .map(|t| (t.identity.framework, t.identity.model_name.clone()))
        .unwrap_or((Framework::Unknown, "unknown".into()));
    let framework = framework.as_str();
    let c = table.container_labels(pid);
    let function = FUNCTIONS.get(function as usize).map_or("?", |f| f.name);
    tracing::warn!(
        event = "cuda_oom",
        pid,
        framework,
        model_name = %model_name,
        container_id = %c.container_id,
        container = %c.container,
        pod = %c.pod,
        namespace = %c.namespace,
        function,
        code,
        size,
        "CUDA out of memory"
    );
}

/// Runs the launch-probe duty cycle until the agent stops.
pub(super) fn spawn_launch_sampler(
    cuda: Arc<CudaState>,
    life: Arc<Life>,
    health: &Arc<Health>,
    budget_percent: f64,
    configured_period: Duration,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    // Beats once a period; the period can grow to whatever the budget needs.
    let heartbeat = health.register("launches", Some(Duration::from_secs(600)));
    std::thread::Builder::new()
        .name("llmscope-launches".into())
        .spawn(move || {
            measure_hit_cost(&cuda);
            let mut duty = launches::MIN_DUTY;
            let mut history = CycleHistory::default();
            while !life.stopping() {
                heartbeat.beat();
                let started = Instant::now();
                let period = launches::period(
                    configured_period,
                    budget_percent,
                    history.typical().charged(),
                );
                // The window sits in the middle of its period: a process that starts or stops
                // launching mid-period is then mis-counted by at most half a period per edge.
                let window = period.mul_f64(duty);
                let gap = period.saturating_sub(window) / 2;
                life.sleep(gap);
                let attach = Timed::measure(|| drop(cuda.attacher().set_launches(true)));
                let before = launch_counts(&cuda);
                let opened = Instant::now();
                life.sleep(window);
                let after = launch_counts(&cuda);
                let observed = opened.elapsed();
                let seen: HashMap<ProcessFunction, u64> = after
                    .iter()
                    .map(|(k, v)| (*k, v.saturating_sub(before.get(k).copied().unwrap_or(0))))
                    .filter(|(_, c)| *c > 0)
                    .collect();
                if duty < 1.0 {
                    // The attacher is unlocked before the links are dropped (a statement's
                    // temporaries go first).
                    let detach = Timed::measure(|| {
                        let detached = cuda.attacher().set_launches(false);
                        drop(detached);
                    });
                    // Only a real cycle is a measurement (1.0 keeps the probes attached).
                    let hot = hot_functions(&seen);
                    history.push(CycleCost {
                        cpu: attach.cpu + detach.cpu,
                        wall: attach.wall + detach.wall,
                        stall: if hot == 0 {
                            Duration::ZERO
                        } else {
                            detach_stall(grace_period(), hot)
                        },
                    });
                }
                // The window stands for the whole period it was in, as long as it really was.
                life.sleep(period.saturating_sub(started.elapsed()));
                let cost = history.typical();
                let next_period =
                    launches::period(configured_period, budget_percent, cost.charged());
                let mut estimates = cuda.launches();
                let summary = estimates.add_window(&seen, observed, started.elapsed());
                duty = next_duty(
                    duty,
                    budget_percent,
                    summary.max_rate,
                    estimates.hit_cost(),
                    cost.charged(),
                    next_period,
                );
                estimates.duty = duty;
                estimates.period = next_period;
                estimates.cycle = cost;
                tracing::trace!(?summary, duty, ?cost, ?period, "launch probe window");
            }
            let detached = cuda.attacher().set_launches(false);
            drop(detached);
        })
}

/// Measures what a launch-probe hit costs on this host, for the launch estimates (on this
/// thread, before its first window; the attacher is locked for the attach and the detach
/// only). The launch program counts into the agent's own tgid meanwhile: a generation is set
/// for it first (so the program reports no first CUDA use), and its counters removed after.
fn measure_hit_cost(cuda: &CudaState) {
    let me = std::process::id();
    const GENERATION: u32 = 1;
    if let Err(e) = cuda.maps().seen.insert(me, GENERATION, 0) {
        tracing::warn!(error = %e, "could not measure what a launch-probe hit costs here: launch estimates use the default");
        return;
    }
    let launch = FUNCTIONS
        .iter()
        .position(|f| f.kind == KIND_LAUNCH)
        .expect("a launch function") as u8;
    let lend = |f: &mut dyn FnMut(&mut aya::Ebpf)| f(cuda.attacher().programs());
    let measured = crate::cuda::calibrate::hit_cost(&lend, "cuda_entry", cookie(launch));
    {
        let mut maps = cuda.maps();
        let mine: Vec<CudaKey> = maps
            .stats
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.tgid == me)
            .collect();
        for k in &mine {
            let _ = maps.stats.remove(k);
        }
        let _ = maps.seen.remove(&me);
    }
    match measured {
        Ok(cost) => {
            tracing::info!(
                ?cost,
                "measured what one launch-probe hit costs a thread here"
            );
            cuda.launches().measured_hit_cost = Some(cost);
        }
        Err(e) => {
            tracing::warn!(error = %e, default = ?launches::DEFAULT_HIT_COST, "could not measure what a launch-probe hit costs here: launch estimates use the default");
        }
    }
}

/// The most launch functions one process called in a window.
fn hot_functions(seen: &HashMap<ProcessFunction, u64>) -> usize {
    let mut per_process: HashMap<(u32, u32), usize> = HashMap::new();
    for &(tgid, generation, _) in seen.keys() {
        *per_process.entry((tgid, generation)).or_default() += 1;
    }
    per_process.into_values().max().unwrap_or(0)
}

/// One RCU grace period, as the kernel takes it now: `MEMBARRIER_CMD_GLOBAL` is one
/// `synchronize_rcu()`. The thread waits, idle. Where the kernel refuses it (no membarrier,
/// or `nohz_full` CPUs), [`ASSUMED_GRACE_PERIOD`] is charged instead.
fn grace_period() -> Duration {
    const MEMBARRIER_CMD_GLOBAL: libc::c_int = 1;
    let started = Instant::now();
    // SAFETY: membarrier takes no pointers; a refusal is an error return.
    let done = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) } == 0;
    if done {
        started.elapsed()
    } else {
        ASSUMED_GRACE_PERIOD
    }
}

/// What a grace period is taken to last where it cannot be measured: longer than the 8–20 ms
/// measured at HZ=250 here, as at HZ=100, so the budget errs on the side of less probing.
const ASSUMED_GRACE_PERIOD: Duration = Duration::from_millis(30);

/// The agent's side of attaching or detaching the launch probes: the calling thread's CPU
/// time (the kernel installs and removes breakpoints in every process mapping the library,
/// and runs a closed link's release as task work, on this thread) and the wall time (a
/// detach also waits for RCU grace periods, idle).
#[derive(Debug, Default, Clone, Copy)]
struct Timed {
    cpu: Duration,
    wall: Duration,
}

impl Timed {
    fn measure(f: impl FnOnce()) -> Timed {
        let (cpu, wall) = (thread_cpu_time(), Instant::now());
        f();
        Timed {
            cpu: thread_cpu_time().saturating_sub(cpu),
            wall: wall.elapsed(),
        }
    }
}

/// Raw launch counts per process image and function from the kernel's counters.
pub(super) fn launch_counts(cuda: &CudaState) -> HashMap<ProcessFunction, u64> {
    let maps = cuda.maps();
    maps.stats
        .iter()
        .filter_map(Result::ok)
        .filter(|(k, _)| {
            k.code == 0
                && FUNCTIONS
                    .get(k.function as usize)
                    .is_some_and(|f| f.kind == KIND_LAUNCH)
        })
        .map(|(k, v)| ((k.tgid, k.generation, k.function), v.calls))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retired_generations_last_the_grace_period() {
        let t0 = Instant::now();
        let grace = Duration::from_secs(10);
        let mut r = Retired::default();
        r.retire(7, 0, t0);
        assert_eq!(r.latest(7), None, "an image without CUDA leaves nothing");
        assert!(r.entries.is_empty());
        r.retire(7, 41, t0);
        assert_eq!(r.latest(7), Some(41));
        // The pid's next image called no CUDA and ended too: the old counters are not its.
        r.retire(7, 0, t0 + Duration::from_secs(1));
        assert_eq!(r.latest(7), None);
        assert!(
            r.members.contains(&(7, 41)),
            "still kept for its grace period"
        );
        assert!(r.expire(t0 + Duration::from_secs(5), grace).is_empty());
        let expired = r.expire(t0 + Duration::from_secs(10), grace);
        assert_eq!(expired, HashSet::from([(7, 41)]));
        assert!(!r.members.contains(&(7, 41)));
        r.expire(t0 + Duration::from_secs(11), grace);
        assert!(r.entries.is_empty() && r.latest.is_empty() && r.members.is_empty());
    }
}
