//! The table of LLM processes the agent exports: who they are, when they exited, and what
//! was dropped because the table was full.
//!
//! Portable (no /proc, no eBPF): the agent feeds it from exec/exit events and /proc scans,
//! windows-fallback from its polling loop. Keyed by pid; a process is identified across pid
//! reuse by its start time, so a new process never inherits an old one's series.

use std::cell::OnceCell;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::identity::{
    derive, sanitize_label, Framework, Identity, ProcessFacts, Role, Rules, Verdict,
};

#[derive(Debug, Clone, Serialize)]
pub struct Tracked {
    pub pid: u32,
    pub ppid: u32,
    /// Sanitised `comm`: the `name` label.
    pub name: String,
    #[serde(flatten)]
    pub identity: Identity,
    /// Start time in clock ticks since boot (None when the process was gone before it was read).
    pub start_ticks: Option<u64>,
    /// Executable path, kept for lineage (a child running the same program inherits).
    #[serde(skip)]
    pub exe: String,
    #[serde(skip)]
    pub exited_at: Option<Instant>,
    /// The container it runs in (None: none, or not known on this platform).
    #[serde(skip)]
    pub container: Option<crate::identity::ContainerRef>,
    /// Whether [`Tracked::container`] was read (false between tracking and the cgroup read).
    #[serde(skip)]
    pub container_read: bool,
    /// When the facts this entry holds were read: a scan that read older facts does not
    /// overwrite it, nor mark it exited.
    #[serde(skip)]
    pub observed_at: Instant,
    /// Its identity is a user rule's (`--classify.rules`): when no rule matches it any
    /// more, it is no longer tracked.
    #[serde(skip)]
    pub by_rule: bool,
}

impl Tracked {
    pub fn is_alive(&self) -> bool {
        self.exited_at.is_none()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Replace {
    /// An exec: the process image changed, whatever was known about the pid goes.
    Always,
    /// A scan, with facts read at this time: only a new identity replaces a live entry, and
    /// never one observed after the facts were read.
    OnlyWithIdentity(Instant),
}

/// What [`Tracker::observe`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    /// A new LLM process (or a new identity for a pid that exec'd something else).
    Added(Identity),
    /// Known already, same identity.
    Unchanged,
    /// A tracked pid now runs something that is not an LLM process: its series are gone.
    Removed,
    /// Not an LLM process, not tracked.
    Ignored,
    /// The table is full of live processes.
    Dropped,
}

/// What the user rules did: processes each matched, and rules files refused on reload.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleCounts {
    pub matches: Vec<(String, u64)>,
    pub reload_failures: u64,
}

/// Distinct `model_name` values exported at once by default (`--max-model-names`).
pub const DEFAULT_MAX_MODEL_NAMES: usize = 256;
/// What a model name past the cap is exported as.
pub const OTHER_MODEL: &str = "other";

#[derive(Debug)]
pub struct Tracker {
    procs: HashMap<u32, Tracked>,
    capacity: usize,
    dropped: u64,
    /// Any local user can start processes with made-up model names: past this many distinct
    /// names in the table, new ones are exported as [`OTHER_MODEL`].
    max_model_names: usize,
    model_names_capped: u64,
    /// How many entries carry each model name ([`OTHER_MODEL`] aside): the cap is checked
    /// without a pass over the table.
    model_names: HashMap<String, usize>,
    /// (exited at, pid) in exit order: expiry and eviction take the oldest without a pass
    /// over the table. An entry is stale when its pid was replaced or removed meanwhile.
    exits: VecDeque<(Instant, u32)>,
    /// User rules, tried before the built-in ones.
    rules: Option<Arc<Rules>>,
    /// Bumped when the rules change: scans then look at tracked processes again.
    rules_generation: u64,
    /// Processes each current rule matched (`llmscope_classify_rule_matches_total`).
    rule_matches: BTreeMap<String, u64>,
    /// Changed rules files that could not be used (the rules in use were kept).
    rules_reload_failures: u64,
    /// Pids an ignore rule excluded since their exec: counted once, not at every scan.
    /// Bounded by the table's capacity (cleared when full: at worst a process counts again).
    ignored: HashSet<u32>,
}

impl Tracker {
    pub fn new(capacity: usize) -> Self {
        Tracker {
            procs: HashMap::new(),
            capacity,
            dropped: 0,
            max_model_names: DEFAULT_MAX_MODEL_NAMES,
            model_names_capped: 0,
            model_names: HashMap::new(),
            exits: VecDeque::new(),
            rules: None,
            rules_generation: 0,
            rule_matches: BTreeMap::new(),
            rules_reload_failures: 0,
            ignored: HashSet::new(),
        }
    }

    /// Uses `rules` from now on (None: the built-in rules only). Counts of rules that keep
    /// their name carry over; processes already tracked are looked at again by the next scan
    /// (see [`Tracker::rules_generation`]).
    pub fn set_rules(&mut self, rules: Option<Arc<Rules>>) {
        let old = std::mem::take(&mut self.rule_matches);
        if let Some(r) = &rules {
            self.rule_matches = r
                .names()
                .map(|n| (n.to_owned(), old.get(n).copied().unwrap_or(0)))
                .collect();
        }
        self.rules = rules;
        self.rules_generation += 1;
        // `ignored` stays: a process excluded before a reload and still excluded after it is
        // not counted again.
    }

    pub fn rules(&self) -> Option<Arc<Rules>> {
        self.rules.clone()
    }

    pub fn rules_generation(&self) -> u64 {
        self.rules_generation
    }

    /// (rule, processes it matched), in name order.
    pub fn rule_matches(&self) -> Vec<(String, u64)> {
        self.rule_matches
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }

    /// A changed rules file could not be used: the rules in use stay.
    pub fn rules_reload_failed(&mut self) {
        self.rules_reload_failures += 1;
    }

    /// What the rules did, for the metrics; None without a rules file.
    pub fn rule_counts(&self) -> Option<RuleCounts> {
        self.rules.as_ref().map(|_| RuleCounts {
            matches: self.rule_matches(),
            reload_failures: self.rules_reload_failures,
        })
    }

    fn count_match(&mut self, rule: &str) {
        if let Some(n) = self.rule_matches.get_mut(rule) {
            *n += 1;
        }
    }

    /// Caps the distinct model names in the table (at least 1).
    pub fn with_max_model_names(mut self, max: usize) -> Self {
        self.max_model_names = max.max(1);
        self
    }

    /// Processes whose model name was exported as [`OTHER_MODEL`] because of the cap.
    pub fn model_names_capped(&self) -> u64 {
        self.model_names_capped
    }

    /// `identity` with its model name replaced by [`OTHER_MODEL`] when it is a new name and
    /// the table already holds `max_model_names` distinct ones (`pid`'s own entry aside: a
    /// process keeps its name across re-observations). True when it was replaced.
    fn cap_model_name(&self, pid: u32, identity: &mut Identity) -> bool {
        let name = identity.model_name.as_str();
        if name == OTHER_MODEL || self.model_names.contains_key(name) {
            return false;
        }
        // `pid`'s entry is replaced: its name does not count against the new one.
        let own = self
            .procs
            .get(&pid)
            .map(|p| p.identity.model_name.as_str())
            .filter(|n| *n != OTHER_MODEL && self.model_names.get(*n) == Some(&1));
        if self.model_names.len() - usize::from(own.is_some()) < self.max_model_names {
            return false;
        }
        identity.model_name = OTHER_MODEL.to_owned();
        true
    }

    /// Every change to the table goes through here and [`Tracker::remove`], so that the
    /// model-name counts follow it.
    fn insert(&mut self, entry: Tracked) {
        let name = entry.identity.model_name.clone();
        if let Some(old) = self.procs.insert(entry.pid, entry) {
            self.forget_name(&old.identity.model_name);
        }
        if name != OTHER_MODEL {
            *self.model_names.entry(name).or_default() += 1;
        }
    }

    fn remove(&mut self, pid: u32) -> Option<Tracked> {
        let old = self.procs.remove(&pid)?;
        self.forget_name(&old.identity.model_name);
        Some(old)
    }

    fn forget_name(&mut self, name: &str) {
        if let Some(n) = self.model_names.get_mut(name) {
            *n -= 1;
            if *n == 0 {
                self.model_names.remove(name);
            }
        }
    }

    /// Classifies `facts` (with the identity of its parent, when tracked) and records the
    /// result. Called for every exec and for every process a scan finds.
    /// `start_ticks` is asked for only when the process is an LLM process, so the many
    /// processes that are not cost no /proc read.
    pub fn observe(
        &mut self,
        facts: &ProcessFacts,
        start_ticks: impl FnOnce() -> Option<u64>,
    ) -> Observed {
        self.observe_as(facts, start_ticks, None, Replace::Always)
    }

    /// Like [`Tracker::observe`], for what a /proc scan or a re-examination finds, with
    /// facts read at `read_at`: it adds or re-identifies, but never removes a live process it
    /// has no new identity for (the process did not exec; it may be a GPU user the probes
    /// reported meanwhile), and never overwrites what an event told after `read_at`.
    pub fn refresh(
        &mut self,
        facts: &ProcessFacts,
        start_ticks: impl FnOnce() -> Option<u64>,
        read_at: Instant,
    ) -> Observed {
        self.observe_as(facts, start_ticks, None, Replace::OnlyWithIdentity(read_at))
    }

    /// A process seen using the GPU: tracked with its own identity when it has one, else as
    /// `framework="unknown"` — a GPU user is always worth a series.
    pub fn observe_gpu_user(
        &mut self,
        facts: &ProcessFacts,
        start_ticks: impl FnOnce() -> Option<u64>,
    ) -> Observed {
        self.observe_as(
            facts,
            start_ticks,
            Some(Identity::new(Framework::Unknown, Role::Script, None)),
            Replace::Always,
        )
    }

    fn observe_as(
        &mut self,
        facts: &ProcessFacts,
        start_ticks: impl FnOnce() -> Option<u64>,
        fallback: Option<Identity>,
        replace: Replace,
    ) -> Observed {
        // Read once, and only when needed: most processes observed are not LLM processes.
        let mut read_start = Some(start_ticks);
        let start_cell = OnceCell::new();
        let mut start = || *start_cell.get_or_init(|| read_start.take().and_then(|f| f()));
        let observed_at = match replace {
            Replace::OnlyWithIdentity(read_at) => {
                if self
                    .procs
                    .get(&facts.pid)
                    .is_some_and(|t| t.observed_at > read_at)
                {
                    return Observed::Unchanged;
                }
                read_at
            }
            Replace::Always => Instant::now(),
        };
        // Only an exec replaces an image; what else reports a process (a scan, a library it
        // mapped, its first CUDA call) may be handled after its exit: the same process (same
        // start) is not brought back, nor one whose start cannot be read (it is gone).
        if replace != Replace::Always || fallback.is_some() {
            let Some(start) = start() else {
                return Observed::Ignored;
            };
            if self
                .procs
                .get(&facts.pid)
                .is_some_and(|t| !t.is_alive() && t.start_ticks == Some(start))
            {
                return Observed::Unchanged;
            }
        }
        let parent = self
            .procs
            .get(&facts.ppid)
            .filter(|p| p.is_alive() && facts.ppid != facts.pid)
            .map(|p| {
                (
                    ProcessFacts {
                        exe: p.exe.clone(),
                        ..ProcessFacts::default()
                    },
                    p.identity.clone(),
                )
            });
        // An exec is a new image: an ignore rule's match counts again. (A GPU user's first
        // call is not, nor is anything else that reports a process.)
        if replace == Replace::Always && fallback.is_none() {
            self.ignored.remove(&facts.pid);
        }
        let ruled = self.rules.clone().and_then(|rules| {
            let (index, verdict) = rules.decide(facts)?;
            Some((rules.name(index)?.to_owned(), verdict))
        });
        let (identity, rule) = match ruled {
            Some((rule, Verdict::Ignore)) => {
                if self.ignored.len() >= self.capacity {
                    self.ignored.clear();
                }
                if self.ignored.insert(facts.pid) {
                    self.count_match(&rule);
                }
                return match self.remove(facts.pid) {
                    Some(_) => Observed::Removed,
                    None => Observed::Ignored,
                };
            }
            Some((rule, Verdict::Classify(id))) => (Some(id), Some(rule)),
            None => (
                derive(facts, parent.as_ref().map(|(f, i)| (f, i))).or(fallback),
                None,
            ),
        };
        self.ignored.remove(&facts.pid);
        let Some(mut identity) = identity else {
            if matches!(replace, Replace::OnlyWithIdentity(_)) {
                // The same process (same start) keeps what is known about it; a reused pid
                // (another start) does not. One a user rule named, and no rule names now,
                // is not an LLM process any more.
                let start = start();
                let same = |t: &Tracked| {
                    t.is_alive()
                        && !t.by_rule
                        && (start.is_none() || t.start_ticks.is_none() || t.start_ticks == start)
                };
                if self.procs.get(&facts.pid).is_some_and(same) {
                    return Observed::Unchanged;
                }
            }
            return match self.remove(facts.pid) {
                Some(_) => Observed::Removed,
                None => Observed::Ignored,
            };
        };
        let capped = self.cap_model_name(facts.pid, &mut identity);
        let start_ticks = start();
        if let Some(existing) = self.procs.get(&facts.pid) {
            if existing.is_alive()
                && existing.identity == identity
                && existing.by_rule == rule.is_some()
                && (existing.start_ticks == start_ticks || start_ticks.is_none())
            {
                return Observed::Unchanged;
            }
        } else if self.procs.len() >= self.capacity && !self.evict_one_exited() {
            self.dropped += 1;
            return Observed::Dropped;
        }
        self.insert(Tracked {
            pid: facts.pid,
            ppid: facts.ppid,
            name: sanitize_label(&facts.comm),
            identity: identity.clone(),
            start_ticks,
            exe: facts.exe.clone(),
            exited_at: None,
            observed_at,
            container: None,
            container_read: false,
            by_rule: rule.is_some(),
        });
        if capped {
            self.model_names_capped += 1;
        }
        if let Some(rule) = rule {
            self.count_match(&rule);
        }
        Observed::Added(identity)
    }

    /// The process exited: its series stay for the grace period, then go.
    pub fn exited(&mut self, pid: u32, now: Instant) -> bool {
        match self.procs.get_mut(&pid) {
            Some(p) if p.exited_at.is_none() => {
                p.exited_at = Some(now);
                self.exits.push_back((now, pid));
                true
            }
            _ => false,
        }
    }

    /// Records the container process `pid` runs in, read after it was tracked as started at
    /// `start_ticks` (not recorded when the pid now stands for another process).
    pub fn set_container(
        &mut self,
        pid: u32,
        start_ticks: Option<u64>,
        container: Option<crate::identity::ContainerRef>,
    ) {
        if let Some(p) = self
            .procs
            .get_mut(&pid)
            .filter(|p| p.start_ticks == start_ticks)
        {
            p.container = container;
            p.container_read = true;
        }
    }

    /// A reading taken after `as_of` found the process gone, or its pid reused (another start
    /// than `start_ticks`): marks it exited, unless the entry is newer than `as_of` (an event
    /// replaced it meanwhile) or has another start. True when it was marked.
    pub fn exited_as_of(
        &mut self,
        pid: u32,
        start_ticks: Option<u64>,
        as_of: Instant,
        now: Instant,
    ) -> bool {
        match self.procs.get(&pid) {
            Some(p) if p.observed_at <= as_of && p.start_ticks == start_ticks => {
                self.exited(pid, now)
            }
            _ => false,
        }
    }

    /// Removes processes that exited more than `grace` ago; returns how many.
    pub fn expire(&mut self, now: Instant, grace: Duration) -> usize {
        let mut expired = 0;
        while let Some(&(at, _)) = self.exits.front() {
            if now.saturating_duration_since(at) < grace {
                break;
            }
            expired += usize::from(self.remove_oldest_exit());
        }
        // After a burst, the table gives its memory back.
        if self.procs.capacity() > 4 * self.procs.len() + 64 {
            self.procs.shrink_to_fit();
            self.exits.shrink_to_fit();
        }
        expired
    }

    /// Takes the oldest exit off the queue; true when its entry was still the exited
    /// process (not replaced since) and is now removed.
    fn remove_oldest_exit(&mut self) -> bool {
        let Some((at, pid)) = self.exits.pop_front() else {
            return false;
        };
        if self
            .procs
            .get(&pid)
            .is_some_and(|p| p.exited_at == Some(at))
        {
            self.remove(pid);
            return true;
        }
        false
    }

    pub fn get(&self, pid: u32) -> Option<&Tracked> {
        self.procs.get(&pid)
    }

    pub fn contains(&self, pid: u32) -> bool {
        self.procs.contains_key(&pid)
    }

    /// Live and recently exited processes, in pid order.
    pub fn all(&self) -> Vec<Tracked> {
        let mut v: Vec<Tracked> = self.procs.values().cloned().collect();
        v.sort_by_key(|p| p.pid);
        v
    }

    pub fn live_pids(&self) -> Vec<u32> {
        self.procs
            .values()
            .filter(|p| p.is_alive())
            .map(|p| p.pid)
            .collect()
    }

    pub fn len(&self) -> usize {
        self.procs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.procs.is_empty()
    }

    /// Processes not recorded because the table was full.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Removes the process that exited first, to make room.
    fn evict_one_exited(&mut self) -> bool {
        while !self.exits.is_empty() {
            if self.remove_oldest_exit() {
                return true;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(pid: u32, ppid: u32, cmdline: &str) -> ProcessFacts {
        let argv: Vec<String> = cmdline.split(' ').map(str::to_owned).collect();
        ProcessFacts {
            pid,
            ppid,
            comm: argv[0]
                .rsplit('/')
                .next()
                .unwrap()
                .chars()
                .take(15)
                .collect(),
            exe: argv[0].clone(),
            argv,
            ..Default::default()
        }
    }

    const VLLM: &str = "/usr/bin/python3 -m vllm.entrypoints.openai.api_server --model m/x";

    fn rules(text: &str) -> Option<Arc<Rules>> {
        Some(Arc::new(Rules::parse(text).unwrap()))
    }

    #[test]
    fn user_rules_name_exclude_and_count_and_a_reload_applies_to_tracked_processes() {
        let mut t = Tracker::new(64);
        t.set_rules(rules(
            "rules:\n\
             - {name: acme, match: {name: '^acme-infer$', argv: '--weights (?P<model>\\S+)'}, framework: acme-infer}\n\
             - {name: no-vllm, match: {argv: 'api_server'}, ignore: true}\n",
        ));
        let acme = facts(20, 1, "/opt/acme-infer --weights /m/ranker-v3.gguf");
        let Observed::Added(id) = t.observe(&acme, || Some(5)) else {
            panic!("named by the rule")
        };
        assert_eq!(
            (id.framework.as_str(), id.model_name.as_str(), id.role),
            ("acme-infer", "ranker-v3", Role::Server)
        );
        let vllm = facts(21, 1, VLLM);
        assert_eq!(t.observe(&vllm, || Some(6)), Observed::Ignored);
        // A scan sees both again: nothing changes, nothing is counted twice.
        let now = Instant::now();
        assert_eq!(t.refresh(&acme, || Some(5), now), Observed::Unchanged);
        assert_eq!(t.refresh(&vllm, || Some(6), now), Observed::Ignored);
        assert_eq!(
            t.rule_matches(),
            [("acme".to_owned(), 1), ("no-vllm".to_owned(), 1)]
        );
        // A GPU user an ignore rule excludes is not tracked either, nor counted again.
        assert_eq!(t.observe_gpu_user(&vllm, || Some(6)), Observed::Ignored);
        assert_eq!(t.rule_matches()[1], ("no-vllm".to_owned(), 1));

        // The same rules again: an excluded process is not counted again.
        let same = t.rules();
        t.set_rules(same);
        assert_eq!(
            t.refresh(&vllm, || Some(6), Instant::now()),
            Observed::Ignored
        );
        assert_eq!(t.rule_matches()[1], ("no-vllm".to_owned(), 1));

        // Reload: the acme rule goes, vllm is no longer ignored.
        let generation = t.rules_generation();
        t.set_rules(rules(
            "rules: [{name: other, match: {name: '^nothing$'}, framework: x}]",
        ));
        assert_ne!(t.rules_generation(), generation);
        let later = Instant::now();
        assert_eq!(t.refresh(&acme, || Some(5), later), Observed::Removed);
        assert!(matches!(
            t.refresh(&vllm, || Some(6), later),
            Observed::Added(id) if id.framework == Framework::Vllm
        ));
        assert_eq!(t.rule_matches(), [("other".to_owned(), 0)]);
    }

    #[test]
    fn distinct_model_names_are_capped() {
        let mut t = Tracker::new(64).with_max_model_names(2);
        let server =
            |pid: u32, model: &str| facts(pid, 1, &format!("llama-server -m /m/{model}.gguf"));
        for (pid, model) in [(10, "a"), (11, "b"), (12, "a")] {
            assert!(matches!(
                t.observe(&server(pid, model), || Some(1)),
                Observed::Added(_)
            ));
        }
        let Observed::Added(id) = t.observe(&server(13, "c"), || Some(1)) else {
            panic!("tracked")
        };
        assert_eq!(id.model_name, OTHER_MODEL);
        assert_eq!(t.model_names_capped(), 1);
        assert_eq!(
            t.observe(&server(13, "c"), || Some(1)),
            Observed::Unchanged,
            "a re-observation is not counted again"
        );
        assert_eq!(t.model_names_capped(), 1);
        // Once "b" is gone, "c" has room.
        t.exited(11, Instant::now());
        t.expire(
            Instant::now() + Duration::from_secs(60),
            Duration::from_secs(1),
        );
        let Observed::Added(id) = t.observe(&server(14, "c"), || Some(1)) else {
            panic!("tracked")
        };
        assert_eq!(id.model_name, "c");
    }

    #[test]
    fn children_inherit_and_everything_expires_after_the_grace_period() {
        let mut t = Tracker::new(16);
        let t0 = Instant::now();
        assert!(matches!(
            t.observe(&facts(10, 1, VLLM), || Some(5)),
            Observed::Added(_)
        ));
        let child = facts(11, 10, "/usr/bin/python3 -c from multiprocessing.spawn import spawn_main --multiprocessing-fork");
        assert!(matches!(t.observe(&child, || Some(6)), Observed::Added(_)));
        assert_eq!(t.get(11).unwrap().identity.role, Role::Worker);
        assert_eq!(
            t.observe(&facts(12, 10, "/bin/sh -c nvidia-smi"), || Some(7)),
            Observed::Ignored
        );
        assert_eq!(
            t.observe(&facts(10, 1, VLLM), || Some(5)),
            Observed::Unchanged
        );

        assert!(t.exited(10, t0));
        assert!(!t.exited(10, t0), "an exit is counted once");
        assert_eq!(
            t.expire(t0 + Duration::from_secs(5), Duration::from_secs(10)),
            0
        );
        assert_eq!(
            t.all().len(),
            2,
            "exited processes stay during the grace period"
        );
        assert_eq!(
            t.expire(t0 + Duration::from_secs(10), Duration::from_secs(10)),
            1
        );
        assert_eq!(t.live_pids(), vec![11]);
    }

    #[test]
    fn a_reused_pid_never_inherits_old_series() {
        let mut t = Tracker::new(16);
        t.observe(&facts(10, 1, VLLM), || Some(5));
        t.exited(10, Instant::now());
        // Same pid, new process that is not an LLM process: the old entry goes at once.
        assert_eq!(
            t.observe(&facts(10, 1, "/bin/ls"), || Some(99)),
            Observed::Removed
        );
        assert!(t.is_empty());
        // Same pid, another LLM process: replaced, with the new start time.
        t.observe(&facts(10, 1, VLLM), || Some(5));
        let llama = facts(10, 1, "llama-server -m /m/q.gguf");
        assert!(matches!(
            t.observe(&llama, || Some(100)),
            Observed::Added(_)
        ));
        let p = t.get(10).unwrap();
        assert_eq!(
            (p.identity.model_name.as_str(), p.start_ticks),
            ("q", Some(100))
        );
        // Same command line, new start time (the exit event was lost): a new process.
        assert!(matches!(
            t.observe(&llama, || Some(200)),
            Observed::Added(_)
        ));
    }

    #[test]
    fn a_scan_never_overwrites_newer_event_facts() {
        let mut t = Tracker::new(4);
        // The scan reads /proc/30 (still the shell), then the exec event arrives.
        let scan_read = Instant::now();
        let shell = facts(30, 1, "/opt/llama/llama-server -m /m/stale.gguf");
        let exec = facts(30, 1, "/opt/llama/llama-server -m /m/fresh.gguf");
        assert!(matches!(t.observe(&exec, || Some(5)), Observed::Added(_)));
        assert_eq!(
            t.refresh(&shell, || Some(5), scan_read),
            Observed::Unchanged
        );
        assert_eq!(t.get(30).unwrap().identity.model_name, "fresh");
        // Nor is it marked exited by a reading taken before the event.
        assert!(!t.exited_as_of(30, Some(5), scan_read, Instant::now()));
        assert!(t.get(30).unwrap().is_alive());
        // A reading of another process (pid reused) does not end the new one.
        assert!(!t.exited_as_of(30, Some(4), Instant::now(), Instant::now()));
        assert!(t.exited_as_of(30, Some(5), Instant::now(), Instant::now()));
        // Facts read after the event do apply.
        assert!(matches!(
            t.refresh(&shell, || Some(6), Instant::now()),
            Observed::Added(_)
        ));
    }

    #[test]
    fn gpu_users_are_tracked_even_when_unclassified() {
        let mut t = Tracker::new(4);
        let plain = facts(20, 1, "/opt/app/bin/render-frames --fast");
        assert_eq!(t.observe(&plain, || Some(1)), Observed::Ignored);
        let Observed::Added(id) = t.observe_gpu_user(&plain, || Some(1)) else {
            panic!("not added")
        };
        assert_eq!(
            (id.framework, id.model_name.as_str()),
            (Framework::Unknown, "unknown")
        );
        assert_eq!(t.observe_gpu_user(&plain, || Some(1)), Observed::Unchanged);
        assert_eq!(
            t.refresh(&plain, || Some(1), Instant::now()),
            Observed::Unchanged,
            "a scan keeps a GPU user"
        );
        assert_eq!(
            t.refresh(&plain, || Some(9), Instant::now()),
            Observed::Removed,
            "but not across pid reuse"
        );
        t.observe_gpu_user(&plain, || Some(1));
        assert_eq!(
            t.observe(&plain, || Some(1)),
            Observed::Removed,
            "an exec replaces it"
        );
        let Observed::Added(id) = t.observe_gpu_user(&facts(21, 1, VLLM), || Some(2)) else {
            panic!()
        };
        assert_eq!(
            id.framework,
            Framework::Vllm,
            "a classified GPU user keeps its identity"
        );
    }

    #[test]
    fn what_is_reported_after_an_exit_does_not_bring_the_process_back() {
        // A library mapping or a first CUDA call of a process, handled after its exit event
        // (the perf records are drained after the ring): the same process stays exited.
        let mut t = Tracker::new(4);
        let llm = facts(40, 1, VLLM);
        t.observe(&llm, || Some(7));
        assert!(t.exited(40, Instant::now()));
        assert_eq!(t.observe_gpu_user(&llm, || Some(7)), Observed::Unchanged);
        assert_eq!(
            t.refresh(&llm, || Some(7), Instant::now()),
            Observed::Unchanged
        );
        assert!(!t.get(40).unwrap().is_alive());
        // Another process on the same pid is new.
        assert!(matches!(
            t.observe_gpu_user(&llm, || Some(8)),
            Observed::Added(_)
        ));
        assert!(t.get(40).unwrap().is_alive());
        // An exec of a new image always applies.
        t.exited(40, Instant::now());
        assert!(matches!(t.observe(&llm, || Some(8)), Observed::Added(_)));
    }

    #[test]
    fn a_gpu_user_is_classified_again_when_a_framework_library_shows_up() {
        let mut t = Tracker::new(4);
        let mut script = facts(50, 1, "/usr/bin/python3 train.py --epochs 3");
        let Observed::Added(id) = t.observe_gpu_user(&script, || Some(3)) else {
            panic!("tracked")
        };
        assert_eq!(id.framework, Framework::Unknown);
        script.libraries = vec![
            "/venv/site-packages/nvidia/cu13/lib/libcudart.so.13".into(),
            "/venv/site-packages/torch/lib/libtorch_cpu.so".into(),
        ];
        let Observed::Added(id) = t.refresh(&script, || Some(3), Instant::now()) else {
            panic!("reclassified")
        };
        assert_eq!(id.framework, Framework::Pytorch);
        assert_eq!(t.live_pids(), vec![50]);
    }

    #[test]
    fn model_name_counts_follow_replacements_and_expiry() {
        let mut t = Tracker::new(8).with_max_model_names(2);
        let server =
            |pid: u32, model: &str| facts(pid, 1, &format!("llama-server -m /m/{model}.gguf"));
        t.observe(&server(11, "a"), || Some(1));
        t.observe(&server(12, "b"), || Some(2));
        // pid 12 exec's another model: "b" is gone, so "c" fits.
        let Observed::Added(id) = t.observe(&server(12, "c"), || Some(3)) else {
            panic!()
        };
        assert_eq!(id.model_name, "c");
        let Observed::Added(id) = t.observe(&server(13, "d"), || Some(4)) else {
            panic!()
        };
        assert_eq!(id.model_name, OTHER_MODEL);
        // Removed by an exec of something else, then expired: names free up.
        assert_eq!(
            t.observe(&facts(11, 1, "/bin/ls"), || Some(5)),
            Observed::Removed
        );
        let Observed::Added(id) = t.observe(&server(14, "e"), || Some(6)) else {
            panic!()
        };
        assert_eq!(id.model_name, "e");
        let t0 = Instant::now();
        t.exited(12, t0);
        t.exited(14, t0 + Duration::from_secs(1));
        assert_eq!(
            t.expire(t0 + Duration::from_secs(5), Duration::from_secs(5)),
            1
        );
        assert!(t.contains(14) && !t.contains(12), "oldest exit first");
        let Observed::Added(id) = t.observe(&server(15, "f"), || Some(7)) else {
            panic!()
        };
        assert_eq!(id.model_name, "f");
    }

    #[test]
    fn the_table_is_bounded_and_drops_are_counted() {
        let mut t = Tracker::new(2);
        t.observe(&facts(1, 0, VLLM), || None);
        t.observe(&facts(2, 0, VLLM), || None);
        assert_eq!(t.observe(&facts(3, 0, VLLM), || None), Observed::Dropped);
        assert_eq!((t.len(), t.dropped()), (2, 1));
        t.exited(2, Instant::now());
        t.exited(1, Instant::now() + Duration::from_millis(1));
        assert!(
            matches!(t.observe(&facts(3, 0, VLLM), || None), Observed::Added(_)),
            "an exited entry makes room"
        );
        assert_eq!(t.len(), 2);
        assert!(t.contains(1) && !t.contains(2), "the one that exited first");
    }
}
