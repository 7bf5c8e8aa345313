//! Kernel launches are the hot path: an eager-mode inference process launches 50,000–100,000
//! kernels a second, and every uprobe hit costs a trap (~0.7 µs here, ~0.33 µs on bare metal)
//! whatever the program does. So the launch probes are duty-cycled: attached for a window
//! of every period, the counts seen in the window extrapolated to the period, and the window
//! sized so that the busiest process's launch rate × trap cost stays under the budget
//! (`--cuda-overhead-budget`, percent of one core per process).

use std::collections::HashMap;
use std::time::Duration;

use crate::metrics::cuda::LaunchMode;

/// What one launch-probe hit costs the probed thread: the trap (~0.68 µs on the development
/// VM, ~0.33 µs on bare metal per DESIGN.md) plus the program (~0.09 µs), as `cargo xtask
/// bench uprobe` measured it. Used to turn a launch rate into an overhead; on faster hosts
/// it errs on the side of less probing.
pub const TRAP_COST: Duration = Duration::from_nanos(800);
/// The shortest window: below it attach/detach latency dominates.
pub const MIN_DUTY: f64 = 0.01;

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

/// The fraction of the next period to keep the launch probes attached, given the current
/// one and the highest per-process launch rate seen in its window (launches per second).
///
/// It falls at once to what the budget allows, but rises at most 2× per period: a process
/// that is idle (or launches rarely) and then starts launching 100,000 kernels a second must
/// not find the probes attached for a whole period.
pub fn next_duty(current: f64, budget_percent: f64, max_rate: f64) -> f64 {
    let overhead_if_always_on = max_rate * TRAP_COST.as_secs_f64();
    let allowed = if overhead_if_always_on <= 0.0 {
        1.0
    } else {
        budget_percent / 100.0 / overhead_if_always_on
    };
    allowed.min(current * 2.0).clamp(MIN_DUTY, 1.0)
}

/// Extrapolated launch totals per (process, function id), and the duty cycle's state.
#[derive(Debug, Default)]
pub struct LaunchEstimates {
    pub mode: LaunchMode,
    pub duty: f64,
    totals: HashMap<(u32, u8), f64>,
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
            totals: HashMap::new(),
        }
    }

    /// Adds one window: `seen` launches per key during `window`, standing for `period`.
    /// Returns the highest per-process rate in the window (launches per second).
    pub fn add_window(
        &mut self,
        seen: &HashMap<(u32, u8), u64>,
        window: Duration,
        period: Duration,
    ) -> f64 {
        let window_s = window.as_secs_f64().max(1e-6);
        let scale = (period.as_secs_f64() / window_s).max(1.0);
        let mut per_process: HashMap<u32, u64> = HashMap::new();
        for (&(tgid, function), &count) in seen {
            *self.totals.entry((tgid, function)).or_default() += count as f64 * scale;
            *per_process.entry(tgid).or_default() += count;
        }
        per_process
            .values()
            .map(|&c| c as f64 / window_s)
            .fold(0.0, f64::max)
    }

    pub fn total(&self, tgid: u32, function: u8) -> Option<f64> {
        self.totals.get(&(tgid, function)).copied()
    }

    /// Forgets processes that are gone.
    pub fn retain(&mut self, alive: impl Fn(u32) -> bool) {
        self.totals.retain(|(tgid, _), _| alive(*tgid));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_from_the_budget() {
        assert_eq!(mode(0.0), LaunchMode::Off);
        assert_eq!(mode(0.5), LaunchMode::Sampled);
        assert_eq!(mode(100.0), LaunchMode::Exact);
    }

    #[test]
    fn the_window_keeps_the_overhead_under_the_budget() {
        // 100,000 launches/s × 0.8 µs = 8 % of a core if always attached; 0.5 % allows 1/16.
        let duty = next_duty(1.0, 0.5, 100_000.0);
        assert!((duty - 0.5 / 8.0).abs() < 1e-9, "{duty}");
        assert!(100_000.0 * TRAP_COST.as_secs_f64() * duty <= 0.005 + 1e-12);
        assert_eq!(
            next_duty(1.0, 0.5, 1_000.0),
            1.0,
            "1,000/s costs 0.08 %: always attached"
        );
        assert_eq!(next_duty(1.0, 0.5, 1e9), MIN_DUTY);
        // Idle: it rises, but only 2× per period, so a burst never meets a fully attached period.
        assert_eq!(next_duty(MIN_DUTY, 0.5, 0.0), 2.0 * MIN_DUTY);
        assert_eq!(next_duty(0.6, 0.5, 0.0), 1.0);
    }

    #[test]
    fn windows_are_extrapolated_to_the_period() {
        let mut e = LaunchEstimates::new(LaunchMode::Sampled);
        let seen = HashMap::from([((7, 1), 1_000u64), ((7, 2), 500), ((8, 1), 10)]);
        let period = Duration::from_secs(1);
        let max_rate = e.add_window(&seen, Duration::from_millis(100), period);
        assert!((max_rate - 15_000.0).abs() < 1e-6, "{max_rate}");
        assert_eq!(e.total(7, 1), Some(10_000.0));
        e.add_window(&seen, Duration::from_secs(1), period);
        assert_eq!(
            e.total(7, 1),
            Some(11_000.0),
            "a full window adds what it saw"
        );
        e.retain(|tgid| tgid != 7);
        assert_eq!((e.total(7, 1), e.total(8, 1)), (None, Some(110.0)));
    }
}
