//! The /proc scan: at start-up it finds the LLM processes that already run; then, every
//! `--rescan-interval`, it repairs what lost kernel events missed — processes that exec'd
//! unseen (`missed_exec`) and processes that exited unseen (`missed_exit`) — and probes every
//! CUDA library a process maps that is not probed yet.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::observe::{log_detected, observe_with_env, How};
use super::Shared;
use crate::identity::{worth_rechecking, Framework};
use crate::state::Counters;
use crate::tracker::Observed;

/// A scan of a very large /proc can take long; past this without a beat the thread is
/// reported stalled.
const STALL_LIMIT: Duration = Duration::from_secs(300);

pub(super) fn spawn(
    shared: Arc<Shared>,
    interval: Duration,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let heartbeat = shared.health.register("reconcile", Some(STALL_LIMIT));
    std::thread::Builder::new()
        .name("llmscope-reconcile".into())
        .spawn(move || {
            let found = scan(&shared, false);
            tracing::info!(found, "start-up scan done");
            let mut next = Instant::now() + interval;
            while !shared.stopping() {
                heartbeat.beat();
                if Instant::now() >= next {
                    scan(&shared, true);
                    next = Instant::now() + interval;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
}

/// One pass over /proc; returns how many LLM processes it added. With `repair`, what it
/// finds is counted as missed by the kernel events.
pub(super) fn scan(shared: &Shared, repair: bool) -> usize {
    let listed_at = Instant::now();
    let pids = match shared.proc.pids() {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "scanning /proc failed");
            return 0;
        }
    };
    let present: HashSet<u32> = pids.iter().copied().collect();

    // A pid the events thread added after /proc was listed is not in `present` but is alive:
    // only an entry older than the listing whose /proc entry is gone now has exited.
    let vanished: Vec<(u32, Option<u64>)> = shared
        .tracker()
        .all()
        .into_iter()
        .filter(|t| t.is_alive() && t.observed_at <= listed_at && !present.contains(&t.pid))
        .map(|t| (t.pid, t.start_ticks))
        .collect();
    for (pid, start) in vanished {
        if shared.proc.path().join(pid.to_string()).exists() {
            continue;
        }
        if shared.exited_as_of(pid, start, listed_at) && repair {
            Counters::add(&shared.counters.missed_exit, 1);
        }
    }

    // Untracked processes, and tracked ones whose start time changed (the pid was reused
    // while the exit and the exec were both lost). Parents first, so children inherit.
    let mut candidates = Vec::new();
    for pid in pids {
        super::libraries::discover_libraries(shared, pid);
        // (start, classified) of the live entry: a classified process whose start did not
        // change is known; one tracked only as a GPU user may have loaded a framework since.
        let tracked = {
            let tracker = shared.tracker();
            tracker
                .get(pid)
                .filter(|t| t.is_alive())
                .map(|t| (t.start_ticks, t.identity.framework != Framework::Unknown))
        };
        let read_at = Instant::now();
        let Ok((mut facts, sample)) = shared.proc.facts(pid) else {
            continue;
        };
        match tracked {
            Some((Some(start), true)) if start == sample.start_ticks => continue,
            Some((None, true)) => continue,
            Some((Some(start), false))
                if start == sample.start_ticks && !worth_rechecking(&facts) =>
            {
                continue
            }
            _ => {}
        }
        if worth_rechecking(&facts) {
            facts.libraries = shared.proc.libraries(pid).unwrap_or_default();
        }
        candidates.push((sample.start_ticks, read_at, facts));
    }
    candidates.sort_by_key(|(start, _, facts)| (*start, facts.pid));

    let mut added = 0;
    for (_, read_at, mut facts) in candidates {
        if let Observed::Added(id) = observe_with_env(shared, &mut facts, How::Refresh(read_at)) {
            log_detected(
                shared,
                facts.pid,
                &id,
                if repair {
                    "scan (missed exec)"
                } else {
                    "start-up scan"
                },
            );
            added += 1;
            if repair {
                Counters::add(&shared.counters.missed_exec, 1);
            }
        }
    }
    added
}
