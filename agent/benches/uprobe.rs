//! `cargo xtask bench uprobe`: what llmscope's CUDA probes cost the probed process, measured
//! in one run on this machine.
//!
//! 1. Per call: a loop of 2,000,000 calls into a library function with no probe, with a bare
//!    empty uprobe (bpftrace, `{ }`), and with llmscope's probes attached (launch-counting
//!    entry probe; entry+return pair on a synchronize call). The figure of merit is the ratio
//!    of llmscope's added cost to the bare trap's (goal ≤ 1.1× counting, ≤ 2.2× pairs).
//! 2. Throughput: a launch-bound loop (launch, then ~20 µs of work: ~50,000 launches/s) for
//!    LLMSCOPE_BENCH_SECONDS (default 30) per round, in alternating rounds without the agent
//!    and with it at the default settings (duty-cycled launch probes). Goal: median ratio
//!    ≥ 0.995, with the launches the agent extrapolates within ±5 % of the loop's own count
//!    (both printed). The duty printed is time-weighted over the workload's run (the increase
//!    of `llmscope_cuda_launch_probe_attached_seconds_total`), with the attach/detach cycle
//!    cost the agent measured meanwhile: its own CPU, the stall it charges the probed
//!    process, and the wall time; and what one hit costs, as the agent measured it at
//!    start-up (compare the bare trap above).

#[path = "../tests/support/mod.rs"]
mod support;

use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::*;

const LOOP: &str = "2000000";
const ROUNDS: usize = 9;

/// Runs the CUDA workload's `mode`; its pid and its "done" line.
fn run(lib: &Path, env: &[(&str, &str)]) -> (u32, String) {
    let mut all = vec![("CUDA_LIB", lib.to_str().unwrap())];
    all.extend_from_slice(env);
    let mut w = CudaWorkload::start(
        &cuda_workload("llama-bench"),
        &["-m", "/models/bench.gguf"],
        &all,
    );
    std::thread::sleep(Duration::from_millis(300));
    (w.pid(), w.run())
}

/// The value of `field` in a workload's "done" line.
fn field(done: &str, field: &str) -> f64 {
    done.split_whitespace()
        .find_map(|f| f.strip_prefix(field))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in {done:?}"))
}

fn measure(lib: &Path, env: &[(&str, &str)], name: &str) -> f64 {
    field(&run(lib, env).1, name)
}

fn per_call(lib: &Path, call: &str) -> f64 {
    measure(lib, &[("CALL_LOOP", LOOP), ("CALL", call)], "ns_per_call=")
}

/// Runs `f` while bpftrace holds an empty probe (the bare trap cost).
fn with_bpftrace<T>(script: &str, f: impl FnOnce() -> T) -> T {
    let mut bpftrace = Command::new("bpftrace")
        .args(["-e", script])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting bpftrace (cargo xtask bench installs it)");
    let mut out = std::io::BufReader::new(bpftrace.stdout.take().unwrap());
    let mut line = String::new();
    while out.read_line(&mut line).unwrap_or(0) > 0 && !line.contains("Attaching") {
        line.clear();
    }
    std::thread::sleep(Duration::from_millis(500));
    let result = f();
    let _ = bpftrace.kill();
    let _ = bpftrace.wait();
    result
}

/// An agent that has probed `lib` (a short workload maps it first).
fn agent_with_probed(lib: &Path, args: &[&str]) -> Agent {
    let agent = Agent::start(args);
    let mut w = CudaWorkload::start(
        &cuda_workload("llama-bench"),
        &["-m", "/models/warm.gguf"],
        &[("CUDA_LIB", lib.to_str().unwrap())],
    );
    agent.wait_cuda_libraries(1.0);
    w.run();
    agent
}

fn main() {
    require_root();
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let lib = fake_cuda_library("runtime");
    let l = lib.display();
    println!("llmscope uprobe benchmark: {LOOP} calls per measurement, stand-in libcudart\n");

    let none_launch = per_call(&lib, "launch");
    let none_sync = per_call(&lib, "sync");
    let bare_entry = with_bpftrace(&format!("uprobe:{l}:cudaLaunchKernel {{ }}"), || {
        per_call(&lib, "launch")
    });
    let bare_pair = with_bpftrace(
        &format!(
            "uprobe:{l}:cudaDeviceSynchronize {{ }} uretprobe:{l}:cudaDeviceSynchronize {{ }}"
        ),
        || per_call(&lib, "sync"),
    );
    let (ours_entry, ours_pair) = {
        // Held for the measurements below: the probes live as long as the agent.
        let _agent = agent_with_probed(
            &lib,
            &["--cuda-overhead-budget", "100", "--rescan-interval", "1h"],
        );
        (per_call(&lib, "launch"), per_call(&lib, "sync"))
    };
    let ratio = |ours: f64, bare: f64, none: f64| (ours - none) / (bare - none);
    println!("| probe | ns per call | added ns | added vs bare trap |");
    println!("| --- | --- | --- | --- |");
    println!("| none (cudaLaunchKernel) | {none_launch:.1} | | |");
    println!(
        "| bare empty uprobe | {bare_entry:.1} | {:.1} | 1.00× |",
        bare_entry - none_launch
    );
    println!(
        "| llmscope launch counter | {ours_entry:.1} | {:.1} | {:.2}× (goal ≤ 1.1×) |",
        ours_entry - none_launch,
        ratio(ours_entry, bare_entry, none_launch)
    );
    println!("| none (cudaDeviceSynchronize) | {none_sync:.1} | | |");
    println!(
        "| bare empty uprobe + uretprobe | {bare_pair:.1} | {:.1} | 1.00× |",
        bare_pair - none_sync
    );
    println!(
        "| llmscope entry + return | {ours_pair:.1} | {:.1} | {:.2}× (goal ≤ 2.2×) |",
        ours_pair - none_sync,
        ratio(ours_pair, bare_pair, none_sync)
    );

    let seconds = std::env::var("LLMSCOPE_BENCH_SECONDS").unwrap_or_else(|_| "30".into());
    let busy = [("BUSY_US", "20"), ("SECONDS", seconds.as_str())];
    let s: f64 = seconds.parse().unwrap();
    println!("\nlaunch-bound loop (launch + 20 µs of work), {s} s per run, {ROUNDS} alternating rounds, default settings:");
    println!("| round | without agent | with agent | ratio | duty while it ran | launches counted / true | period | cycle CPU | cycle stall | cycle wall | hit cost |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    let (mut ratios, mut errors) = (Vec::new(), Vec::new());
    for round in 1..=ROUNDS {
        let without = measure(&lib, &busy, "iterations=");
        let agent = agent_with_probed(&lib, &["--rescan-interval", "1h"]);
        let attached = |m: &Exposition| {
            m.value("llmscope_cuda_launch_probe_attached_seconds_total", &[])
                .unwrap_or(f64::NAN)
        };
        let (before, started) = (attached(&agent.metrics()), std::time::Instant::now());
        let (pid, done) = run(&lib, &busy);
        let (with, truth) = (field(&done, "iterations="), field(&done, "launches="));
        let duty = (attached(&agent.metrics()) - before) / started.elapsed().as_secs_f64();
        // The last window closes within a period after the loop stops launching.
        let period = agent
            .metrics()
            .value("llmscope_cuda_launch_probe_period_seconds", &[])
            .unwrap_or(1.0);
        std::thread::sleep(Duration::from_secs_f64(period + 0.5));
        let m = agent.metrics();
        let counted = m
            .value(
                "llm_process_cuda_kernel_launches_total",
                &[("pid", &pid.to_string())],
            )
            .unwrap_or(0.0);
        let gauge = |name: &str| m.value(name, &[]).unwrap_or(f64::NAN);
        ratios.push(with / without);
        errors.push(counted / truth);
        println!(
            "| {round} | {:.0} launches/s | {:.0} launches/s | {:.4} | {duty:.3} | {counted:.0} / {truth:.0} ({:+.1} %) | {period:.1} s | {:.0} µs | {:.1} ms | {:.0} ms | {:.0} ns |",
            without / s,
            with / s,
            with / without,
            (counted / truth - 1.0) * 100.0,
            gauge("llmscope_cuda_launch_probe_cycle_cpu_seconds") * 1e6,
            gauge("llmscope_cuda_launch_probe_cycle_stall_seconds") * 1e3,
            gauge("llmscope_cuda_launch_probe_cycle_wall_seconds") * 1e3,
            gauge("llmscope_cuda_launch_probe_hit_seconds") * 1e9,
        );
    }
    println!(
        "launch-bound throughput with / without: {} (goal: median ≥ 0.995)",
        ratio_summary(&ratios)
    );
    println!(
        "launches counted / true: {} (goal: within 0.95–1.05)",
        ratio_summary(&errors)
    );
}
