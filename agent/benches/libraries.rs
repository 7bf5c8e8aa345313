//! `cargo xtask bench libraries`: how fast the agent acts on a library being mapped, measured
//! in one run (the /proc scan is an hour away: only the mapping hook can explain a result).
//!
//! 1. A process no rule classifies maps its own fresh copy of libcudart (a new file, as in a
//!    new container image) and calls it every millisecond from the moment dlopen returns:
//!    the calls the agent did not count tell when its probes took effect
//!    (mapped → first counted call; goal p99 ≤ 100 ms).
//! 2. A Python script maps a library at PyTorch's path (what `import torch` does) at a random
//!    time after start: from its return to the script being listed by /api/processes as
//!    pytorch, polled every millisecond (goal p99 ≤ 5 ms).

#[path = "../tests/support/mod.rs"]
mod support;

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

const SAMPLES: usize = 100;
const CALLS: u32 = 400;
const EVERY_US: u32 = 1000;

fn report(what: &str, samples: &mut [f64]) {
    samples.sort_by(f64::total_cmp);
    println!("{what} ({} samples):", samples.len());
    println!("| p50 | p90 | p99 | max |");
    println!("| --- | --- | --- | --- |");
    println!(
        "| {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms |\n",
        percentile(samples, 0.5),
        percentile(samples, 0.9),
        percentile(samples, 0.99),
        percentile(samples, 1.0)
    );
}

fn main() {
    require_root();
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let agent = Agent::start(&["--rescan-interval", "1h", "--cuda-overhead-budget", "100"]);
    let hook = agent.library_hook();
    println!("llmscope library benchmark (library hook: {hook})\n");

    let dir = std::env::temp_dir().join(format!("llmscope-bench-libs-{}", std::process::id()));
    let original = fake_cuda_library("runtime");
    let program = cuda_workload("my-inference-worker");
    let mut cuda = Vec::new();
    for i in 0..SAMPLES {
        let copy_dir = dir.join(i.to_string());
        std::fs::create_dir_all(&copy_dir).unwrap();
        let copy = copy_dir.join("libcudart.so.12");
        std::fs::copy(&original, &copy).unwrap();
        // Returns once the timed calls are done.
        let w = CudaWorkload::start(
            &program,
            &[],
            &[
                ("CUDA_LIB", copy.to_str().unwrap()),
                ("TIMED_CALLS", &CALLS.to_string()),
                ("CALL_EVERY_US", &EVERY_US.to_string()),
            ],
        );
        let pid = w.pid().to_string();
        let counted = wait_for(Duration::from_secs(5), || {
            agent.metrics().value(
                "llm_process_cuda_calls_total",
                &[("pid", &pid), ("function", "cudaDeviceSynchronize")],
            )
        })
        .unwrap_or(0.0);
        assert!(counted > 0.0, "no call of pid {pid} counted");
        cuda.push((f64::from(CALLS) - counted) * f64::from(EVERY_US) / 1e3);
        drop(w);
        // Let the copy be detached before the next, as in churn.
        std::fs::remove_dir_all(&copy_dir).unwrap();
    }
    report(
        "unclassified process, fresh libcudart copy: mapped → first counted call (1 ms resolution)",
        &mut cuda,
    );

    let lib = torch_library(&dir);
    let script = dir.join("chat.py");
    std::fs::write(
        &script,
        "import ctypes, random, sys, time\ntime.sleep(random.uniform(0.05, 0.3))\n\
         ctypes.CDLL(sys.argv[1])\nprint('imported', flush=True)\nsys.stdin.read()\n",
    )
    .unwrap();
    // The interpreter itself: a `python3` on PATH may be a version manager's shim (pyenv's
    // is a shell script that runs a dozen programs per start), which would time the shim.
    let interpreter = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .expect("running python3");
    let interpreter = String::from_utf8(interpreter.stdout).unwrap();
    let mut python = Vec::new();
    for _ in 0..SAMPLES {
        let mut child = Command::new(interpreter.trim())
            .arg(&script)
            .arg(&lib)
            .args(["--model", "Qwen/Qwen2.5-0.5B-Instruct"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let needle = format!("\"pid\":\"{}\"", child.id());
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let imported = Instant::now();
        let seen = poll_for(Duration::from_secs(10), Duration::from_millis(1), || {
            agent
                .get("/api/processes")
                .ok()
                .filter(|(_, body)| body.contains(&needle))
                .map(|_| imported.elapsed())
        });
        python.push(seen.expect("the script was never classified").as_secs_f64() * 1e3);
        let _ = child.kill();
        let _ = child.wait();
    }
    report(
        "script maps a framework library → classified in /api/processes (polled every 1 ms)",
        &mut python,
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
