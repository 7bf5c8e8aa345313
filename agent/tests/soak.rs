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

/// `churn` under a poll storm: `/metrics` 10 times a second (from two scrapers: a scrape of
/// the churn's table can take longer than 100 ms here) and `/api/processes` 100 times a
/// second. (pids, scrapes, process lists); every poll must answer 200.
fn polled_churn(
    agent: &Agent,
    program: &std::path::Path,
    plan: &[(&str, &str)],
    processes: usize,
) -> (HashSet<u32>, u64, u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let poller = |path: &'static str, every: Duration, clients: usize| {
        let count = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..clients)
            .map(|_| {
                let (stop, addr, polled) = (stop.clone(), agent.addr, count.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let asked = Instant::now();
                        let (code, _, body) = http_get(addr, path, None).expect("polling");
                        assert_eq!(code, 200, "{path}: {body}");
                        polled.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(every.saturating_sub(asked.elapsed()));
                    }
                })
            })
            .collect();
        (threads, count)
    };
    let (scrapers, scrapes) = poller("/metrics", Duration::from_millis(200), 2);
    let (listers, lists) = poller("/api/processes", Duration::from_millis(10), 1);
    let pids = churn(program, plan, processes);
    stop.store(true, Ordering::Relaxed);
    for t in scrapers.into_iter().chain(listers) {
        t.join().expect("every poll answered 200");
    }
    (
        pids,
        scrapes.load(Ordering::Relaxed),
        lists.load(Ordering::Relaxed),
    )
}

/// Every event lost so far, whatever its kind.
fn lost_events(agent: &Agent) -> f64 {
    agent
        .metrics()
        .samples("llmscope_events_lost_total")
        .iter()
        .map(|(_, v)| v)
        .sum()
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
    // A warm-up round first, under the same poll storm: what the agent allocates once
    // (caches, buffers at their high mark, the stacks and heaps of the threads serving
    // concurrent requests) is not growth.
    polled_churn(&agent, &program, &plan, PROCESSES / 10);
    assert!(settled(&agent), "{}", agent.metrics().0);
    for _ in 0..5 {
        agent.metrics();
    }
    // The sampler hands free memory back once a second.
    std::thread::sleep(Duration::from_millis(1500));
    let rss_before = rss_bytes(agent.pid());

    let lost_before = lost_events(&agent);
    let missed_exits = |agent: &Agent| {
        agent.metrics().value(
            "llmscope_reconcile_repairs_total",
            &[("kind", "missed_exit")],
        )
    };
    let missed_before = missed_exits(&agent);
    let log_before = agent.log().len();
    let started = Instant::now();
    let (pids, scrapes, lists) = polled_churn(&agent, &program, &plan, PROCESSES);
    let churn = started.elapsed();
    let secs = churn.as_secs_f64();
    eprintln!(
        "{PROCESSES} processes in {churn:?}; meanwhile {scrapes} scrapes ({:.1}/s) and {lists} process lists ({:.1}/s)",
        scrapes as f64 / secs,
        lists as f64 / secs
    );
    // Nothing lost in the kernel, so every process was seen to start and to end, once.
    let lost = lost_events(&agent) - lost_before;
    assert_eq!(
        lost,
        0.0,
        "events lost under the poll storm:\n{}",
        agent.metrics().0
    );
    let log = agent.log();
    let mut detected = HashSet::new();
    let twice: Vec<&str> = log[log_before..]
        .lines()
        .filter(|l| l.contains("process_detected"))
        .filter_map(|l| l.split("pid=").nth(1)?.split_whitespace().next())
        .filter(|pid| !detected.insert(*pid))
        .collect();
    assert!(
        twice.is_empty(),
        "{} processes detected twice, e.g. {:?}",
        twice.len(),
        &twice[..twice.len().min(5)]
    );
    assert_eq!(
        missed_exits(&agent),
        missed_before,
        "exits repaired by the safety net though nothing was lost"
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
