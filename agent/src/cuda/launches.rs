//! Kernel launches are the hot path: an eager-mode inference process launches 50,000–100,000
//! kernels a second, and every uprobe hit costs a trap (~0.7 µs here, ~0.33 µs on bare metal)
//! whatever the program does. So the launch probes are duty-cycled: attached for a window
//! of every period, the counts seen in the window extrapolated to the period, and the window
//! sized so that the busiest process's launch rate × trap cost, plus what attaching and
//! detaching the probes once a period costs, stays under the budget
//! (`--cuda-overhead-budget`, percent of one core per process).
//!
//! A cycle is not free, and not only for the agent:
//! - attaching and detaching install and remove breakpoints in every process that maps the
//!   library, on the agent's thread: its CPU time is measured every cycle;
//! - detaching stalls the probed process. Closing a perf-event uprobe removes its breakpoints
//!   with `uprobe_apply`, which holds the uprobe's `register_rwsem` for writing while
//!   `percpu_down_write(&dup_mmap_sem)` waits for an RCU grace period; a thread that hits the
//!   breakpoint meanwhile blocks in `handler_chain` on that rwsem for the rest of the grace
//!   period (traced with `sched_switch` stacks on 6.18: 8–16 ms per detached launch function
//!   the process was calling, docs/benchmarks.md). Detaches are serialised by the kernel's
//!   `event_mutex`, so each such function costs its own grace period. The agent measures a
//!   grace period every cycle (`membarrier(MEMBARRIER_CMD_GLOBAL)` is one `synchronize_rcu`)
//!   and charges it once per launch function the busiest process called in the window;
//!   attaching stalls nobody (the breakpoint goes in after the grace period).
//!
//! The probes also slow what they count: a launch-bound thread loses one hit's cost per launch
//! while they are attached, so a window sees fewer launches per second than the process makes
//! outside it (~5 % fewer for a loop that launches every 20 µs on the development VM). The
//! rest of the period is extrapolated from the window's rate with that time given back: the
//! window's launches × hit cost ([`super::calibrate`] measures it at start-up). This assumes
//! the launching thread was busy throughout, as in eager-mode inference; a thread that waits
//! for the GPU absorbs the hits instead, and is then over-counted by at most that share
//! (launches per second × hit cost, ~3 % at 100,000 launches/s on bare metal).
//!
//! Both are charged to the budget as cost / period, from the median of the last few cycles
//! (one slow cycle must not swing the period); when that alone would take more than half the
//! budget, the period is lengthened. (Detaching also waits for RCU tasks-trace grace periods,
//! ~100 ms of the agent's wall time here, DataDog/datadog-agent #55730 — idle, after the
//! breakpoints are gone: latency, not overhead. It is measured and exported too.)

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

/// What one launch-probe hit costs the probed thread until (or where) it is measured
/// ([`super::calibrate`]): the trap (~0.68 µs on the development VM, ~0.3 µs on bare metal,
/// docs/design.md) plus the program (~0.09 µs), as `cargo xtask bench uprobe` measured it.
/// On faster hosts it errs on the side of less probing.
pub const DEFAULT_HIT_COST: Duration = Duration::from_nanos(800);
/// The shortest window: below it attach/detach latency dominates.
pub const MIN_DUTY: f64 = 0.01;

/// How kernel launches are counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LaunchMode {
    /// Probes always attached: exact counts (`--cuda-overhead-budget 100`).
    #[default]
    Exact,
    /// Probes attached for a window of every period; counts extrapolated.
    Sampled,
    /// Not counted (`--cuda-overhead-budget 0`).
    Off,
}

impl LaunchMode {
    pub fn as_str(self) -> &'static str {
        match self {
            LaunchMode::Exact => "exact",
            LaunchMode::Sampled => "sampled",
            LaunchMode::Off => "off",
        }
    }
}

/// The counting mode for a budget given in percent of a core.
pub fn mode(budget_percent: f64) -> LaunchMode {
    if budget_percent <= 0.0 {
        LaunchMode::Off
    } else if budget_percent >= 100.0 {
        LaunchMode::Exact
    } else {
        LaunchMode::Sampled
    }
}

/// The period to use: `configured`, or longer when one attach/detach cycle (its
/// [`CycleCost::charged`] cost) would otherwise take more than half the budget.
pub fn period(configured: Duration, budget_percent: f64, cycle_cost: Duration) -> Duration {
    let budget = budget_percent / 100.0;
    if budget <= 0.0 {
        return configured;
    }
    configured.max(cycle_cost.mul_f64(2.0 / budget))
}

/// The fraction of the next period to keep the launch probes attached, given the current
/// one, the highest per-process launch rate seen in its window (launches per second), what
/// one hit costs, and what one attach/detach cycle costs ([`CycleCost::charged`]) over
/// `period`.
///
/// Always attached (1.0) costs no cycle; below it, the budget pays the cycle first:
/// cycle / period + duty × rate × hit ≤ budget. The duty falls at once to what the budget
/// allows, but rises at most 2× per period: a process that is idle (or launches rarely) and
/// then starts launching 100,000 kernels a second must not find the probes attached for a
/// whole period.
pub fn next_duty(
    current: f64,
    budget_percent: f64,
    max_rate: f64,
    hit_cost: Duration,
    cycle_cost: Duration,
    period: Duration,
) -> f64 {
    let budget = budget_percent / 100.0;
    let overhead_if_always_on = max_rate * hit_cost.as_secs_f64();
    let allowed = if overhead_if_always_on <= budget {
        1.0
    } else {
        let cycle_share = cycle_cost.as_secs_f64() / period.as_secs_f64().max(1e-9);
        ((budget - cycle_share) / overhead_if_always_on).min(1.0 - f64::EPSILON)
    };
    allowed.min(current * 2.0).clamp(MIN_DUTY, 1.0)
}

/// What one attach + detach of the launch probes cost.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CycleCost {
    /// The agent's CPU time (the attaching and detaching thread's).
    pub cpu: Duration,
    /// The agent's wall time (detaches wait for grace periods, idle).
    pub wall: Duration,
    /// The stall of the busiest probed process: one grace period per launch function it
    /// called in the window (see the module's documentation).
    pub stall: Duration,
}

impl CycleCost {
    /// What the budget is charged for one cycle: the agent's CPU and the probed process's
    /// stall.
    pub fn charged(&self) -> Duration {
        self.cpu + self.stall
    }
}

/// The stall a detach costs a process that called `hot_functions` launch functions in the
/// window, given one RCU grace period as measured now.
pub fn detach_stall(grace_period: Duration, hot_functions: usize) -> Duration {
    grace_period.saturating_mul(hot_functions.min(u32::MAX as usize) as u32)
}

/// The last few cycles' costs; the budget is charged their median, field by field, so one
/// cycle slowed by something else on the machine does not lengthen the period tenfold.
#[derive(Debug, Default)]
pub struct CycleHistory(VecDeque<CycleCost>);

impl CycleHistory {
    const LEN: usize = 5;

    pub fn push(&mut self, cost: CycleCost) {
        if self.0.len() == Self::LEN {
            self.0.pop_front();
        }
        self.0.push_back(cost);
    }

    /// The median of each field over the remembered cycles (zero before the first).
    pub fn typical(&self) -> CycleCost {
        let median = |field: fn(&CycleCost) -> Duration| {
            let mut v: Vec<Duration> = self.0.iter().map(field).collect();
            v.sort_unstable();
            v.get(v.len() / 2).copied().unwrap_or_default()
        };
        CycleCost {
            cpu: median(|c| c.cpu),
            wall: median(|c| c.wall),
            stall: median(|c| c.stall),
        }
    }
}

/// What one window saw, for the next duty and the cycle's charge.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct WindowSummary {
    /// The highest per-process launch rate (launches per second).
    pub max_rate: f64,
    /// The most launch functions one process called.
    pub hot_functions: usize,
}

/// A process image's function: (tgid, CUDA counter generation, function id).
pub type ProcessFunction = (u32, u32, u8);

/// Extrapolated launch totals per process image and function, and the duty cycle's state.
#[derive(Debug, Default)]
pub struct LaunchEstimates {
    pub mode: LaunchMode,
    pub duty: f64,
    /// The period in use (see [`period`]).
    pub period: Duration,
    /// What one attach + detach of the launch probes costs (the median of the last cycles).
    pub cycle: CycleCost,
    /// What one probe hit costs a probed thread, once measured ([`super::calibrate`]).
    pub measured_hit_cost: Option<Duration>,
    totals: HashMap<ProcessFunction, f64>,
}

impl LaunchEstimates {
    pub fn new(mode: LaunchMode) -> Self {
        let duty = match mode {
            LaunchMode::Off => 0.0,
            LaunchMode::Exact => 1.0,
            LaunchMode::Sampled => MIN_DUTY,
        };
        LaunchEstimates {
            mode,
            duty,
            period: Duration::ZERO,
            cycle: CycleCost::default(),
            measured_hit_cost: None,
            totals: HashMap::new(),
        }
    }

    /// Adds one window: `seen` launches per key during `window`, standing for `period`: the
    /// window's own launches, plus the rest of the period at the rate the process had without
    /// the probes (the window less the hits' cost; see the module's documentation).
    pub fn add_window(
        &mut self,
        seen: &HashMap<ProcessFunction, u64>,
        window: Duration,
        period: Duration,
    ) -> WindowSummary {
        let window_s = window.as_secs_f64().max(1e-6);
        let rest_s = (period.as_secs_f64() - window_s).max(0.0);
        let mut per_process: HashMap<(u32, u32), (u64, HashSet<u8>)> = HashMap::new();
        for (&(tgid, generation, function), &count) in seen.iter().filter(|(_, &c)| c > 0) {
            let (calls, functions) = per_process.entry((tgid, generation)).or_default();
            *calls += count;
            functions.insert(function);
        }
        let hit_s = self.hit_cost().as_secs_f64();
        for (&(tgid, generation, function), &count) in seen.iter().filter(|(_, &c)| c > 0) {
            let calls = per_process[&(tgid, generation)].0 as f64;
            // At most half the window given back: beyond that the hit cost is not this host's.
            let unprobed_s = window_s - (calls * hit_s).min(window_s / 2.0);
            *self.totals.entry((tgid, generation, function)).or_default() +=
                count as f64 * (1.0 + rest_s / unprobed_s);
        }
        per_process
            .values()
            .fold(WindowSummary::default(), |s, (calls, functions)| {
                WindowSummary {
                    max_rate: s.max_rate.max(*calls as f64 / window_s),
                    hot_functions: s.hot_functions.max(functions.len()),
                }
            })
    }

    /// What one probe hit costs: as measured, or [`DEFAULT_HIT_COST`] until then.
    pub fn hit_cost(&self) -> Duration {
        self.measured_hit_cost.unwrap_or(DEFAULT_HIT_COST)
    }

    pub fn total(&self, key: ProcessFunction) -> Option<f64> {
        self.totals.get(&key).copied()
    }

    /// Forgets a process image whose counters are retired.
    pub fn forget(&mut self, tgid: u32, generation: u32) {
        self.totals
            .retain(|&(t, g, _), _| (t, g) != (tgid, generation));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HIT: Duration = Duration::from_nanos(800);

    #[test]
    fn modes_from_the_budget() {
        assert_eq!(mode(0.0), LaunchMode::Off);
        assert_eq!(mode(0.5), LaunchMode::Sampled);
        assert_eq!(mode(100.0), LaunchMode::Exact);
    }

    #[test]
    fn the_window_keeps_the_overhead_under_the_budget() {
        let second = Duration::from_secs(1);
        let free = Duration::ZERO;
        // 100,000 launches/s × 0.8 µs = 8 % of a core if always attached; 0.5 % allows 1/16.
        let duty = next_duty(1.0, 0.5, 100_000.0, HIT, free, second);
        assert!((duty - 0.5 / 8.0).abs() < 1e-9, "{duty}");
        assert!(100_000.0 * HIT.as_secs_f64() * duty <= 0.005 + 1e-12);
        assert_eq!(
            next_duty(1.0, 0.5, 1_000.0, HIT, free, second),
            1.0,
            "1,000/s costs 0.08 %: always attached"
        );
        assert_eq!(next_duty(1.0, 0.5, 1e9, HIT, free, second), MIN_DUTY);
        // Idle: it rises, but only 2× per period, so a burst never meets a fully attached period.
        assert_eq!(
            next_duty(MIN_DUTY, 0.5, 0.0, HIT, free, second),
            2.0 * MIN_DUTY
        );
        assert_eq!(next_duty(0.6, 0.5, 0.0, HIT, free, second), 1.0);
    }

    #[test]
    fn the_budget_pays_for_the_attach_detach_cycle() {
        let second = Duration::from_secs(1);
        // A 2 ms cycle per 1 s period takes 0.2 % of the 0.5 %: 0.3 % is left for traps.
        let cycle = Duration::from_millis(2);
        let duty = next_duty(1.0, 0.5, 100_000.0, HIT, cycle, second);
        assert!((duty - 0.3 / 8.0).abs() < 1e-9, "{duty}");
        let overhead = cycle.as_secs_f64() / 1.0 + 100_000.0 * HIT.as_secs_f64() * duty;
        assert!(overhead <= 0.005 + 1e-12, "{overhead}");
        // A 40 ms cycle would take 4 % of a 1 s period: the period grows to 16 s (half the
        // budget for the cycle), and the duty then fits the other half.
        let slow = Duration::from_millis(40);
        let p = period(second, 0.5, slow);
        assert_eq!(p, Duration::from_secs(16));
        let duty = next_duty(1.0, 0.5, 100_000.0, HIT, slow, p);
        let overhead = slow.as_secs_f64() / p.as_secs_f64() + 100_000.0 * 8e-7 * duty;
        assert!((overhead - 0.005).abs() < 1e-9, "{overhead}");
        assert_eq!(period(second, 0.5, Duration::from_micros(100)), second);
    }

    #[test]
    fn windows_are_extrapolated_to_the_period() {
        // A free hit: the window's rate is the process's.
        let mut e = LaunchEstimates::new(LaunchMode::Sampled);
        e.measured_hit_cost = Some(Duration::ZERO);
        let seen = HashMap::from([((7, 3, 1), 1_000u64), ((7, 3, 2), 500), ((8, 5, 1), 10)]);
        let period = Duration::from_secs(1);
        let summary = e.add_window(&seen, Duration::from_millis(100), period);
        assert!((summary.max_rate - 15_000.0).abs() < 1e-6, "{summary:?}");
        assert_eq!(
            summary.hot_functions, 2,
            "process 7 called two launch functions"
        );
        assert_eq!(e.total((7, 3, 1)), Some(10_000.0));
        e.add_window(&seen, Duration::from_secs(1), period);
        assert_eq!(
            e.total((7, 3, 1)),
            Some(11_000.0),
            "a full window adds what it saw"
        );
        e.forget(7, 3);
        assert_eq!(
            (e.total((7, 3, 1)), e.total((8, 5, 1))),
            (None, Some(110.0))
        );
    }

    #[test]
    fn the_rest_of_the_period_runs_at_the_unprobed_rate() {
        // A thread that launches every 19 µs, slowed to every 20 µs by a 1 µs hit: the window
        // (0.1 s) sees 5,000 launches; the other 0.9 s it made 0.9 / 19 µs of them.
        let mut e = LaunchEstimates::new(LaunchMode::Sampled);
        e.measured_hit_cost = Some(Duration::from_micros(1));
        let seen = HashMap::from([((7, 3, 1), 4_000u64), ((7, 3, 2), 1_000)]);
        e.add_window(&seen, Duration::from_millis(100), Duration::from_secs(1));
        let truth = 5_000.0 + 0.9 / 19e-6;
        let counted = e.total((7, 3, 1)).unwrap() + e.total((7, 3, 2)).unwrap();
        assert!((counted / truth - 1.0).abs() < 1e-9, "{counted} vs {truth}");
        assert!(
            (e.total((7, 3, 1)).unwrap() / e.total((7, 3, 2)).unwrap() - 4.0).abs() < 1e-9,
            "each function keeps its share"
        );
        // A hit cost that would give back more than half the window is not believed.
        let mut e = LaunchEstimates::new(LaunchMode::Sampled);
        e.measured_hit_cost = Some(Duration::from_millis(1));
        e.add_window(&seen, Duration::from_millis(100), Duration::from_secs(1));
        let counted = e.total((7, 3, 1)).unwrap() + e.total((7, 3, 2)).unwrap();
        assert!((counted - 5_000.0 * 19.0).abs() < 1e-6, "{counted}");
    }

    #[test]
    fn one_slow_cycle_does_not_swing_the_charge() {
        let ms = Duration::from_millis;
        let mut h = CycleHistory::default();
        assert_eq!(h.typical(), CycleCost::default());
        for cpu in [3, 4, 36, 3, 5] {
            h.push(CycleCost {
                cpu: ms(cpu),
                wall: ms(100),
                stall: ms(12),
            });
        }
        assert_eq!(h.typical().cpu, ms(4), "the 36 ms outlier is not charged");
        assert_eq!(h.typical().charged(), ms(16));
        // Only the last five count.
        for _ in 0..3 {
            h.push(CycleCost::default());
        }
        assert_eq!(h.typical().cpu, Duration::ZERO);
    }

    #[test]
    fn the_stall_is_a_grace_period_per_launch_function_called() {
        let gp = Duration::from_millis(12);
        assert_eq!(
            detach_stall(gp, 0),
            Duration::ZERO,
            "an idle process is not stalled"
        );
        assert_eq!(detach_stall(gp, 2), Duration::from_millis(24));
    }
}
