//! Writing the process table: every producer that learns of a process goes through here, so
//! the kernel's tracked set, the log line and the sampler's wake-up follow every change.

use crate::identity::{Identity, ProcessFacts, Rules, UNKNOWN};
use crate::tracker::Observed;

use super::table::Table;

/// The `process_detected` log event (`via`: what found it).
pub(super) fn log_detected(table: &Table, pid: u32, id: &Identity, via: &str) {
    log_identity(
        table,
        pid,
        id,
        via,
        "process_detected",
        "LLM process detected",
    );
}

/// The `process_reclassified` log event: a tracked process (a GPU user no rule named yet)
/// got its identity (`via`: what told).
pub(super) fn log_reclassified(table: &Table, pid: u32, id: &Identity, via: &str) {
    log_identity(
        table,
        pid,
        id,
        via,
        "process_reclassified",
        "LLM process reclassified",
    );
}

fn log_identity(table: &Table, pid: u32, id: &Identity, via: &str, event: &str, message: &str) {
    let c = table.container_labels(pid);
    tracing::info!(
        event,
        pid,
        framework = id.framework.as_str(),
        model_name = %id.model_name,
        role = id.role.as_str(),
        container_id = %c.container_id,
        container = %c.container,
        pod = %c.pod,
        namespace = %c.namespace,
        via,
        "{message}"
    );
}

/// The `process_exited` log event (`how`: what told the agent).
pub(super) fn log_exited(table: &Table, t: &crate::tracker::Tracked, how: &str) {
    let c = t
        .container
        .as_ref()
        .map(|c| table.containers.labels(c))
        .unwrap_or_default();
    tracing::info!(
        event = "process_exited",
        pid = t.pid,
        framework = t.identity.framework.as_str(),
        model_name = %t.identity.model_name,
        role = t.identity.role.as_str(),
        container_id = %c.container_id,
        container = %c.container,
        pod = %c.pod,
        namespace = %c.namespace,
        how,
        "LLM process exited"
    );
}

/// What an observation stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum How {
    /// An exec or fork: the process image is new; what was known about the pid is replaced.
    New,
    /// A scan or re-examination of a process that did not exec, with facts read at
    /// `read_at` from the process that started at `start_ticks` (read with them: the pid may
    /// be gone or reused by the time they are used): it adds or re-identifies, never removes,
    /// and never overwrites a newer event's facts (see [`crate::tracker::Tracker::refresh`]).
    Refresh {
        read_at: std::time::Instant,
        start_ticks: u64,
    },
}

impl How {
    fn observe(
        self,
        tracker: &mut crate::tracker::Tracker,
        facts: &ProcessFacts,
        start: impl FnOnce() -> Option<u64>,
    ) -> Observed {
        match self {
            How::New => tracker.observe(facts, start),
            How::Refresh {
                read_at,
                start_ticks,
            } => tracker.refresh(facts, || Some(start_ticks), read_at),
        }
    }
}

/// Classifies `facts`; when the result names no model, reads the model variables from the
/// environment and classifies again. Reads first what a user rule that the command line
/// matches needs: the environment, and (not at an exec: nothing is mapped yet) the mapped
/// libraries. Keeps the kernel's tracked set in step.
pub(super) fn observe_with_env(table: &Table, facts: &mut ProcessFacts, how: How) -> Observed {
    let pid = facts.pid;
    let start = || table.proc.start_ticks(pid).ok();
    let rules = table.tracker().rules();
    let extra = rules.as_deref().map_or(&[][..], Rules::env_names);
    let needs = rules.as_deref().map(|r| r.needs(facts)).unwrap_or_default();
    if needs.env {
        facts.env = table.proc.model_env(pid, extra).unwrap_or_default();
    }
    if needs.libraries && facts.libraries.is_empty() && how != How::New {
        facts.libraries = table.proc.libraries(pid).unwrap_or_default();
    }
    let mut observed = table.observe(pid, |t| how.observe(t, facts, start));
    if let Observed::Added(id) = &observed {
        if id.model_name == UNKNOWN && !needs.env {
            if let Ok(env) = table.proc.model_env(pid, extra) {
                if !env.is_empty() {
                    facts.env = env;
                    if let Observed::Added(with_model) =
                        table.observe(pid, |t| how.observe(t, facts, start))
                    {
                        observed = Observed::Added(with_model);
                    }
                }
            }
        }
    }
    observed
}

/// A process that uses CUDA is always worth a series: tracked with its own identity when it
/// has one, else as `framework="unknown"`.
pub(super) fn track_gpu_user(table: &Table, pid: u32, via: &str) {
    if table
        .tracker()
        .get(pid)
        .is_some_and(super::super::tracker::Tracked::is_alive)
    {
        return;
    }
    let Ok((facts, sample)) = table.proc.facts(pid) else {
        return;
    };
    let observed = table.observe(pid, |t| {
        t.observe_gpu_user(&facts, || Some(sample.start_ticks))
    });
    if let Observed::Added(id) = &observed {
        log_detected(table, pid, id, via);
    }
}
