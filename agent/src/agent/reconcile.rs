//! The /proc scan: at start-up it finds the LLM processes that already run; then, every
//! `--rescan-interval`, it repairs what lost kernel events missed — processes that exec'd
//! unseen (`missed_exec`) and processes that exited unseen (`missed_exit`) — and probes every
//! CUDA library a process maps that is not probed yet — reading the maps only of processes it
//! has not read before, unless the kernel lost library mappings or first CUDA calls since
//! (what it would otherwise learn from them).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_common::Lost;

use super::health::Health;
use super::observe::{log_detected, log_reclassified, observe_with_env, How};
use super::table::Table;
use super::CudaState;
use crate::ebpf::LostCounters;
use crate::identity::{worth_rechecking, Framework, RulesFile};
use crate::state::Counters;
use crate::tracker::Observed;

/// A scan of a very large /proc can take long; past this without a beat the thread is
/// reported stalled.
const STALL_LIMIT: Duration = Duration::from_secs(300);

/// Scans /proc into `table` (probing CUDA libraries with `cuda`), counting repairs in
/// `counters`.
pub(super) fn spawn(
    table: Arc<Table>,
    cuda: Arc<CudaState>,
    counters: Arc<Counters>,
    health: &Arc<Health>,
    interval: Duration,
    lost: Arc<LostCounters>,
    mut rules: Option<RulesFile>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let heartbeat = health.register("reconcile", Some(STALL_LIMIT));
    std::thread::Builder::new()
        .name("llmscope-reconcile".into())
        .spawn(move || {
            let mut read = MapsRead::default();
            let found = scan(&table, &cuda, &counters, false, &mut read);
            tracing::info!(found, "start-up scan done");
            let mut next = Instant::now() + interval;
            let mut rules_checked = Instant::now();
            while !table.stopping() {
                heartbeat.beat();
                if rules_checked.elapsed() >= RULES_CHECK {
                    rules_checked = Instant::now();
                    if rules
                        .as_mut()
                        .is_some_and(|file| reload_rules(&table, file))
                    {
                        next = Instant::now();
                    }
                }
                if Instant::now() >= next {
                    let losses = library_losses(&counters, &lost);
                    if losses != read.losses {
                        // Something the kernel would have told was lost: read every maps.
                        read.processes.clear();
                        read.losses = losses;
                    }
                    scan(&table, &cuda, &counters, true, &mut read);
                    next = Instant::now() + interval;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
}

/// How often the rules file is looked at for changes (one `stat`).
const RULES_CHECK: Duration = Duration::from_secs(1);

/// Reads the rules file again when it changed; true when new rules are in use (tracked
/// processes are then classified again by a scan).
fn reload_rules(table: &Table, file: &mut RulesFile) -> bool {
    match file.reload_if_changed() {
        None => false,
        Some(Ok(rules)) => {
            tracing::info!(
                event = "classify_rules_reloaded",
                file = %file.path().display(),
                rules = rules.len(),
                "classification rules reloaded"
            );
            table.tracker().set_rules(Some(Arc::new(rules)));
            true
        }
        Some(Err(e)) => {
            tracing::warn!(
                event = "classify_rules_reload_failed",
                error = %e,
                "classification rules file changed but cannot be used: the rules in use are kept"
            );
            table.tracker().rules_reload_failed();
            false
        }
    }
}

/// The processes whose maps a scan read, (pid → start time), and the losses of library
/// mappings and first CUDA calls as of then.
#[derive(Default)]
pub(super) struct MapsRead {
    processes: HashMap<u32, u64>,
    losses: u64,
    /// The classification rules' generation the last scan applied.
    rules_generation: u64,
}

/// Library mappings and first CUDA calls the kernel lost, since start.
fn library_losses(counters: &Counters, lost: &LostCounters) -> u64 {
    lost.read(Counters::get(&counters.library_map_lost))
        .map_or(u64::MAX, |l| {
            l.get(Lost::LibraryMap) + l.get(Lost::CudaEvent)
        })
}

/// One pass over /proc; returns how many LLM processes it added. With `repair`, what it
/// finds is counted as missed by the kernel events. Maps are read of the processes not in
/// `read` (which it updates).
pub(super) fn scan(
    table: &Table,
    cuda: &CudaState,
    counters: &Counters,
    repair: bool,
    read: &mut MapsRead,
) -> usize {
    let listed_at = Instant::now();
    let pids = match table.proc.pids() {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "scanning /proc failed");
            return 0;
        }
    };
    let present: HashSet<u32> = pids.iter().copied().collect();
    let rules_generation = table.tracker().rules_generation();
    let rules_changed = rules_generation != read.rules_generation;

    // A pid the events thread added after /proc was listed is not in `present` but is alive:
    // only an entry older than the listing whose /proc entry is gone now has exited.
    let vanished: Vec<(u32, Option<u64>)> = table
        .tracker()
        .all()
        .into_iter()
        .filter(|t| t.is_alive() && t.observed_at <= listed_at && !present.contains(&t.pid))
        .map(|t| (t.pid, t.start_ticks))
        .collect();
    let checked = Instant::now();
    let gone: Vec<(u32, Option<u64>)> = vanished
        .into_iter()
        .filter(|(pid, _)| !table.proc.path().join(pid.to_string()).exists())
        .collect();
    // Their exit events may still be in the ring: only what a drain begun since has not
    // ended is a missed exit (a busy events thread is not a lost event). If none comes soon,
    // the sampler or the next scan settles them.
    let drained = gone.is_empty() || table.wait_drained_after(checked, Duration::from_secs(1));
    for (pid, start) in gone.into_iter().filter(|_| drained) {
        if table.exited_as_of(pid, start, listed_at) && repair {
            Counters::add(&counters.missed_exit, 1);
        }
    }

    // Untracked processes, and tracked ones whose start time changed (the pid was reused
    // while the exit and the exec were both lost). Parents first, so children inherit.
    let mut candidates = Vec::new();
    let mut maps_read = HashMap::with_capacity(pids.len());
    for pid in pids {
        let read_at = Instant::now();
        let Ok((mut facts, sample)) = table.proc.facts(pid) else {
            continue;
        };
        if read.processes.get(&pid) != Some(&sample.start_ticks) {
            super::libraries::discover_libraries(&table.proc, cuda, pid);
        }
        maps_read.insert(pid, sample.start_ticks);
        // (start, classified) of the live entry: a classified process whose start did not
        // change is known; one tracked only as a GPU user may have loaded a framework since.
        let tracked = {
            let tracker = table.tracker();
            tracker
                .get(pid)
                .filter(|t| t.is_alive())
                .map(|t| (t.start_ticks, t.identity.framework != Framework::Unknown))
        };
        match tracked {
            // Changed rules: every tracked process is looked at again.
            _ if rules_changed => {}
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
            facts.libraries = table.proc.libraries(pid).unwrap_or_default();
        }
        // A process tracked as this very one is reclassified, not missed.
        let known = match tracked {
            Some((Some(start), _)) => start == sample.start_ticks,
            Some((None, _)) => true,
            None => false,
        };
        candidates.push((sample.start_ticks, read_at, facts, known));
    }
    read.processes = maps_read;
    read.rules_generation = rules_generation;
    candidates.sort_by_key(|(start, _, facts, _)| (*start, facts.pid));

    // A process the scan read whose exec event is still in the ring is not a missed exec:
    // the events already queued are handled first, so that the exec event, handled after
    // the read, makes the scan's reading of that process stale (the tracker then keeps the
    // event's). Without this, a scan during a burst of execs detected some twice (soak test).
    if candidates.iter().any(|(_, _, _, known)| !known) {
        table.wait_drained_after(Instant::now(), Duration::from_secs(1));
    }
    let mut added = 0;
    let via = if rules_changed {
        "classification rules changed"
    } else {
        "scan"
    };
    for (start_ticks, read_at, mut facts, known) in candidates {
        let how = How::Refresh {
            read_at,
            start_ticks,
        };
        let id = match observe_with_env(table, &mut facts, how) {
            Observed::Added(id) => id,
            Observed::Removed if known => {
                tracing::info!(
                    event = "process_untracked",
                    pid = facts.pid,
                    via,
                    "no longer an LLM process"
                );
                continue;
            }
            _ => continue,
        };
        if known {
            log_reclassified(table, facts.pid, &id, via);
        } else {
            log_detected(
                table,
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
                Counters::add(&counters.missed_exec, 1);
            }
        }
    }
    added
}
