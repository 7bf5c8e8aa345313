//! `cargo xtask bench`: what the exec path costs and how fast it is, measured in one run.
//!
//! 1. Exec → visible: start an LLM process, poll /api/processes every millisecond, and record
//!    when its pid shows up — end to end, through the kernel, the ring buffer, the 10 ms drain
//!    and the HTTP server.
//! 2. Exec-storm overhead: the wall time of 4,000 short-lived processes without the agent and
//!    with it, alternating, and the agent's own CPU time per exec.
//!
//! Numbers are ratios and distributions from this run on this machine, not timed assertions.

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::*;

const STORM: usize = 4000;
const ROUNDS: usize = 3;
const LATENCY_SAMPLES: usize = 60;

fn storm() -> Duration {
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                for _ in 0..STORM / 2 {
                    Command::new("/bin/true").status().unwrap();
                }
            });
        }
    });
    started.elapsed()
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after "pid (comm) ".
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    require_root();
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    println!(
        "llmscope exec benchmark ({} CPUs)\n",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    // Exec-storm overhead, alternating without / with the agent.
    let (mut without, mut with, mut agent_cpu) = (Vec::new(), Vec::new(), 0.0);
    storm(); // warm the page cache
    for _ in 0..ROUNDS {
        without.push(storm().as_secs_f64());
        let agent = Agent::start(&["--rescan-interval", "1h"]);
        let cpu_before = cpu_seconds(agent.pid());
        with.push(storm().as_secs_f64());
        std::thread::sleep(Duration::from_millis(50));
        agent_cpu += cpu_seconds(agent.pid()) - cpu_before;
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (t0, t1) = (median(&mut without), median(&mut with));
    let execs = (STORM * ROUNDS) as f64;
    println!("exec storm: {STORM} processes × {ROUNDS} rounds, 2 spawning threads");
    println!("| | median wall time | execs/s |");
    println!("| --- | --- | --- |");
    println!("| without agent | {:.3} s | {:.0} |", t0, STORM as f64 / t0);
    println!("| with agent | {:.3} s | {:.0} |", t1, STORM as f64 / t1);
    println!("throughput ratio (with / without): {:.3}", t0 / t1);
    println!(
        "agent CPU: {:.1} µs per exec ({:.2} % of one core at the storm's rate)\n",
        agent_cpu / execs * 1e6,
        agent_cpu / with.iter().sum::<f64>() * 100.0
    );

    // Exec → visible in the agent's API.
    let agent = Agent::start(&["--rescan-interval", "1h"]);
    let program = workload("llama-server");
    let mut latencies = Vec::with_capacity(LATENCY_SAMPLES);
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..LATENCY_SAMPLES {
        // A detection lands just after a drain tick; without a random pause the next exec
        // would always start at the same phase of the 10 ms tick and measure only that phase.
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        std::thread::sleep(Duration::from_micros((seed >> 33) % 10_000 + 5_000));
        let model = format!("/models/bench-{i}.gguf");
        let started = Instant::now();
        let p = spawn(&program, &["-m", &model]);
        let needle = format!("\"pid\":\"{}\"", p.pid());
        let seen = poll_for(Duration::from_secs(10), Duration::from_millis(1), || {
            agent
                .get("/api/processes")
                .ok()
                .filter(|(_, body)| body.contains(&needle))
                .map(|_| started.elapsed())
        });
        latencies.push(seen.expect("the process was never seen").as_secs_f64() * 1e3);
        drop(p);
    }
    latencies.sort_by(f64::total_cmp);
    println!("exec → visible in /api/processes ({LATENCY_SAMPLES} processes, polled every 1 ms by the bench):");
    println!("| p50 | p95 | max |");
    println!("| --- | --- | --- |");
    println!(
        "| {:.1} ms | {:.1} ms | {:.1} ms |",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.95),
        percentile(&latencies, 1.0)
    );
}
