//! Soak: ten thousand short-lived CUDA processes while /metrics is scraped. Afterwards the
//! agent holds nothing of them — no table entry, no kernel map entry, no series — and its
//! memory is back where it was. Run as root (`cargo xtask test`).

mod support;

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;

const PROCESSES: usize = 10_000;
/// Processes running at once.
const PARALLEL: usize = 8;

/// Entries of each of the agent's kernel maps that hold per-process state, by name.
fn kernel_map_entries(agent_pid: u32) -> Vec<(String, usize)> {
    const PER_PROCESS: &[&str] = &[
        "TRACKED",
        "CUDA_STATS",
        "CUDA_ALLOCS",
        "CUDA_LIVE",
        "CUDA_SEEN",
        "CUDA_PENDING",
    ];
    // The agent's maps: the map ids of its file descriptors.
    let mut ids: Vec<String> = std::fs::read_dir(format!("/proc/{agent_pid}/fdinfo"))
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("map_id:"))
                .map(|id| id.trim().to_owned())
        })
        .collect();
    ids.sort();
    ids.dedup();
    let bpftool = |args: &[&str]| -> serde_json::Value {
        let out = Command::new("bpftool")
            .arg("-j")
            .args(args)
            .output()
            .expect("running bpftool (cargo xtask test installs it)");
        assert!(out.status.success(), "bpftool {args:?}: {out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let mut found = Vec::new();
    for id in ids {
        let name = bpftool(&["map", "show", "id", &id])["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if PER_PROCESS.contains(&name.as_str()) {
            let entries = bpftool(&["map", "dump", "id", &id]);
            found.push((name, entries.as_array().map_or(0, Vec::len)));
        }
    }
    found
}

/// Runs `n` workloads, [`PARALLEL`] at a time, each running its plan at once and exiting;
/// returns their pids.
fn churn(program: &std::path::Path, plan: &[(&str, &str)], n: usize) -> HashSet<u32> {
    let go = std::env::temp_dir().join(format!("llmscope-soak-go-{}", std::process::id()));
    std::fs::write(&go, "go\n").unwrap();
    let mut pids = HashSet::new();
    let mut running: Vec<std::process::Child> = Vec::new();
    for i in 0..n {
        if running.len() == PARALLEL {
            let mut done = running.remove(0);
            assert!(done.wait().unwrap().success());
        }
        let child = Command::new(program)
            .args(["-m", &format!("/models/soak-{}.gguf", i % 4)])
            .envs(plan.iter().copied())
            .stdin(std::fs::File::open(&go).unwrap())
            .stdout(Stdio::null())
            .spawn()
            .expect("starting a workload");
        pids.insert(child.id());
        running.push(child);
    }
    for mut c in running {
        assert!(c.wait().unwrap().success());
    }
    std::fs::remove_file(&go).unwrap();
    pids
}

#[test]
fn ten_thousand_short_cuda_processes_leave_nothing_behind() {
    let agent = Agent::start(&["--rescan-interval", "5s", "--grace-period", "2s"]);
    let lib = tiny_cuda_library();
    let program = cuda_workload("llama-server");
    let plan = [
        ("CUDA_LIB", lib.to_str().unwrap()),
        ("ALLOCS", "2"),
        ("NO_FREE", "1"),
    ];
    // The library is probed before the churn starts.
    let mut first = CudaWorkload::start(&program, &["-m", "/models/soak.gguf"], &plan);
    agent.wait_cuda_libraries(1.0);
    first.run();
    drop(first);
    let maps_before = kernel_map_entries(agent.pid());
    assert!(
        maps_before.iter().any(|(n, _)| n == "CUDA_STATS"),
        "the agent's maps are not visible to bpftool: {maps_before:?}"
    );
    let settled = |agent: &Agent| {
        wait_for(Duration::from_secs(30), || {
            let m = agent.metrics();
            (m.value("llmscope_tracked_processes", &[]) == Some(0.0)).then_some(())
        })
        .is_some()
    };
    // A warm-up round first: what the agent allocates once (caches, buffers at their high
    // mark, thread stacks) is not growth.
    churn(&program, &plan, PROCESSES / 10);
    assert!(settled(&agent), "{}", agent.metrics().0);
    for _ in 0..5 {
        agent.metrics();
    }
    // The sampler hands free memory back once a second.
    std::thread::sleep(Duration::from_millis(1500));
    let rss_before = rss_bytes(agent.pid());

    // Scrapes all along.
    let stop = Arc::new(AtomicBool::new(false));
    let scrapes = Arc::new(AtomicU64::new(0));
    let scraper = {
        let (stop, scrapes, addr) = (stop.clone(), scrapes.clone(), agent.addr);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let (code, _, body) = http_get(addr, "/metrics", None).expect("scraping");
                assert_eq!(code, 200, "{body}");
                scrapes.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let started = Instant::now();
    let pids = churn(&program, &plan, PROCESSES);
    let churn = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    scraper.join().expect("every scrape answered 200");
    eprintln!(
        "{PROCESSES} processes in {churn:?}, {} scrapes meanwhile",
        scrapes.load(Ordering::Relaxed)
    );

    // After the grace period: no table entry, no series, no kernel map entry of them.
    assert!(settled(&agent), "{}", agent.metrics().0);
    let gone = wait_for(Duration::from_secs(30), || {
        let left: Vec<(String, usize)> = kernel_map_entries(agent.pid())
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .collect();
        left.is_empty().then_some(()).or_else(|| {
            eprintln!("kernel maps not empty yet: {left:?}");
            None
        })
    });
    assert!(
        gone.is_some(),
        "kernel maps keep entries: {:?}",
        kernel_map_entries(agent.pid())
    );
    let m = agent.metrics();
    let leftover: Vec<&str> =
        m.0.lines()
            .filter(|l| l.starts_with("llm_process_"))
            .filter(|l| {
                l.split("pid=\"")
                    .nth(1)
                    .and_then(|r| r.split('"').next())
                    .and_then(|p| p.parse::<u32>().ok())
                    .is_some_and(|p| pids.contains(&p))
            })
            .collect();
    assert!(
        leftover.is_empty(),
        "series of exited processes: {leftover:?}"
    );
    // Every exec was either received or counted as lost (nothing lost silently).
    let events = m
        .value("llmscope_events_total", &[("kind", "exec")])
        .unwrap();
    let lost = m
        .value("llmscope_events_lost_total", &[("kind", "exec")])
        .unwrap();
    eprintln!("exec events: {events} received, {lost} lost");
    assert!(
        events + lost >= PROCESSES as f64,
        "{events} exec events received and {lost} lost for {PROCESSES} processes"
    );
    for _ in 0..5 {
        agent.metrics();
    }
    std::thread::sleep(Duration::from_millis(1500));
    let rss_after = rss_bytes(agent.pid());
    eprintln!("agent RSS: {rss_before} bytes before, {rss_after} after");
    assert!(
        (rss_after as f64) <= rss_before as f64 * 1.10,
        "agent RSS grew from {rss_before} to {rss_after} bytes"
    );
}
