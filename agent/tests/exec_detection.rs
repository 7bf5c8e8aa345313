//! Privileged end-to-end tests: the real eBPF object loaded by the real agent binary, real
//! processes, and assertions on the agent's real /metrics. Run as root (`cargo xtask test`).

mod support;

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::*;

const LLAMA_MODEL: &str = "/models/qwen2.5-7b-instruct-q4_k_m.gguf";
const VLLM_MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";
const WAIT: Duration = Duration::from_secs(15);

fn pid_series(agent: &Agent, pid: u32) -> Option<Labels> {
    agent.process_labels(pid)
}

fn wait_series(agent: &Agent, pid: u32) -> Labels {
    wait_for(WAIT, || pid_series(agent, pid)).unwrap_or_else(|| {
        panic!(
            "no series for pid {pid}:\n{}\nagent log:\n{}",
            agent.metrics().0,
            agent.log()
        )
    })
}

/// Reads the child's next output line and checks it.
fn expect_line(out: &mut impl std::io::BufRead, expected: &str) {
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), expected);
}

/// Starts `python script args…` with stdin and stdout piped; its stdout, to read lines from.
fn start_script(
    python: &OsStr,
    script: &std::path::Path,
    args: &[&OsStr],
) -> (
    std::process::Child,
    std::io::BufReader<std::process::ChildStdout>,
) {
    let mut child = Command::new(python)
        .arg(script)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = std::io::BufReader::new(child.stdout.take().unwrap());
    (child, out)
}

fn assert_identity(labels: &Labels, framework: &str, model: &str, role: &str) {
    let got = |k: &str| labels.get(k).map(String::as_str).unwrap_or("");
    assert_eq!(
        (got("framework"), got("model_name"), got("role")),
        (framework, model, role),
        "{labels:?}"
    );
}

/// Detection through exec events only: the periodic scan is pushed out of the test's reach.
#[test]
fn exec_detection_lineage_secrets_and_grace_period() {
    let agent = Agent::start(&["--grace-period", "2s", "--rescan-interval", "1h"]);
    let (mut vllm, engine_core) = start_vllm(VLLM_MODEL, "spawn");
    let mut llama = spawn(
        &workload("llama-server"),
        &["-m", LLAMA_MODEL, "--port", "8080"],
    );

    let server = wait_series(&agent, vllm.pid());
    assert_identity(&server, "vllm", VLLM_MODEL, "server");
    assert_eq!(server["llm_type"], "llama");
    let worker = wait_series(&agent, engine_core);
    assert_identity(&worker, "vllm", VLLM_MODEL, "worker");
    let llama_labels = wait_series(&agent, llama.pid());
    assert_identity(
        &llama_labels,
        "llama.cpp",
        "qwen2.5-7b-instruct-q4_k_m",
        "server",
    );
    assert_eq!(llama_labels["name"], "llama-server");

    let m = agent.metrics();
    assert_eq!(
        m.value(
            "llm_process_count",
            &[("framework", "vllm"), ("model_name", VLLM_MODEL)]
        ),
        Some(2.0)
    );
    assert_eq!(
        m.value("llm_process_count", &[("framework", "llama.cpp")]),
        Some(1.0)
    );
    for family in [
        "llm_process_cpu_seconds_total",
        "llm_process_threads",
        "llm_process_start_time_seconds",
    ] {
        assert!(
            m.value(family, &[("pid", &llama.pid().to_string())])
                .is_some(),
            "{family}"
        );
    }
    // The first reading can be a millisecond after the exec, before the interpreter has
    // loaded much; the next full pass (within a second) reads it again.
    let memory = wait_for(WAIT, || {
        agent
            .metrics()
            .value(
                "llm_process_memory_bytes",
                &[("pid", &vllm.pid().to_string())],
            )
            .filter(|bytes| *bytes > 1e6)
    });
    assert!(memory.is_some(), "the server's memory is read");
    assert_eq!(
        m.value("llmscope_collector_success", &[("collector", "process")]),
        Some(1.0)
    );
    assert!(
        m.value("llmscope_events_total", &[("kind", "exec")])
            .unwrap()
            >= 3.0
    );
    assert_eq!(
        m.value(
            "llmscope_reconcile_repairs_total",
            &[("kind", "missed_exec")]
        ),
        Some(0.0),
        "found by exec events, not by a scan"
    );

    // No secret anywhere: labels, the JSON API, the landing page, the log.
    let (_, api) = agent.get("/api/processes").unwrap();
    let (_, landing) = agent.get("/").unwrap();
    assert!(api.contains(&format!("\"pid\":\"{engine_core}\"")), "{api}");
    for (what, text) in [
        ("metrics", &m.0),
        ("api", &api),
        ("landing", &landing),
        ("log", &agent.log()),
    ] {
        for secret in ["sk-secret", "hf_TopSecret", "--api-key"] {
            assert!(
                !text.contains(secret),
                "{secret} leaked into the {what}:\n{text}"
            );
        }
    }

    // OpenMetrics by content negotiation.
    let (code, content_type, body) = http_get(
        agent.addr,
        "/metrics",
        Some("application/openmetrics-text;version=1.0.0,text/plain;q=0.5"),
    )
    .unwrap();
    assert_eq!(code, 200);
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    assert!(body.ends_with("# EOF\n"));

    // Exit: the series stay through the grace period (marked not alive), then go.
    vllm.kill();
    llama.kill();
    // SAFETY: signalling a process this test started (it also dies with its parent).
    unsafe { libc::kill(engine_core as i32, libc::SIGKILL) };
    let exited = wait_for(WAIT, || {
        let (_, api) = agent.get("/api/processes").ok()?;
        let procs: Vec<serde_json::Value> = serde_json::from_str(&api).ok()?;
        let dead = procs.iter().filter(|p| p["alive"] == false).count();
        (dead >= 3).then_some(procs)
    });
    assert!(exited.is_some(), "exits not seen:\n{}", agent.log());
    let gone = wait_for(WAIT, || {
        let m = agent.metrics();
        (m.samples("llm_process_memory_bytes").is_empty()
            && m.samples("llm_process_count").is_empty())
        .then_some(())
    });
    assert!(
        gone.is_some(),
        "series still there after the grace period:\n{}",
        agent.metrics().0
    );
    // The engine core died with its parent (daemon child) or is still being reaped: either
    // way nothing of the old processes is left.
}

/// A worker forked without exec (vLLM's `fork` start method, PyTorch DataLoader workers) is
/// reported by the kernel's fork program, not left to the periodic scan.
#[test]
fn forked_workers_are_detected_without_exec() {
    let agent = Agent::start(&["--rescan-interval", "1h"]);
    let (vllm, engine_core) = start_vllm(VLLM_MODEL, "fork");
    assert_identity(
        &wait_series(&agent, vllm.pid()),
        "vllm",
        VLLM_MODEL,
        "server",
    );
    assert_identity(
        &wait_series(&agent, engine_core),
        "vllm",
        VLLM_MODEL,
        "worker",
    );
    let m = agent.metrics();
    assert!(
        m.value("llmscope_events_total", &[("kind", "fork")])
            .unwrap()
            >= 1.0
    );
    assert_eq!(
        m.value(
            "llmscope_reconcile_repairs_total",
            &[("kind", "missed_exec")]
        ),
        Some(0.0)
    );
    drop(vllm);
    // SAFETY: signalling a process this test started (it also dies with its parent).
    unsafe { libc::kill(engine_core as i32, libc::SIGKILL) };
}

#[test]
fn processes_already_running_are_found_at_start_up() {
    let llama = spawn(&workload("llama-server"), &["-m", LLAMA_MODEL]);
    let plain = spawn(&workload("plain-program"), &["-m", LLAMA_MODEL]);
    std::thread::sleep(Duration::from_millis(100));
    let agent = Agent::start(&["--rescan-interval", "1h"]);
    let labels = wait_series(&agent, llama.pid());
    assert_identity(&labels, "llama.cpp", "qwen2.5-7b-instruct-q4_k_m", "server");
    assert!(
        pid_series(&agent, plain.pid()).is_none(),
        "a program that only mentions a model is not an LLM process"
    );
}

#[test]
fn hostile_command_lines() {
    let agent = Agent::start(&["--grace-period", "1s", "--rescan-interval", "1h"]);

    // 1 MiB of arguments: the kernel copies 1 KiB, /proc gives the bounded rest.
    let filler = "x".repeat(64 * 1024);
    let mut args = vec!["-m", "/models/big-model.gguf"];
    args.extend(std::iter::repeat_n(filler.as_str(), 16));
    let big = spawn(&workload("llama-server"), &args);
    assert_identity(
        &wait_series(&agent, big.pid()),
        "llama.cpp",
        "big-model",
        "server",
    );

    // Non-UTF-8 bytes and quotes.
    let weird = Proc(
        Command::new(workload("llama-server"))
            .arg("-m")
            .arg(OsStr::from_bytes(b"/models/caf\xe9-\"q\"'x'.gguf"))
            .arg(OsStr::from_bytes(b"\xff\xfe"))
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert_identity(
        &wait_series(&agent, weird.pid()),
        "llama.cpp",
        "caf_-_q_x",
        "server",
    );

    // A process that exits between exec and any /proc read: classified from the kernel's
    // copy of argv, never sampled, and nothing of it stays.
    let quick = Command::new(workload("llama-server"))
        .args(["-m", "/models/quick.gguf"])
        .env("LLMSCOPE_EXIT_AT_ONCE", "1")
        .status()
        .unwrap();
    assert!(quick.success());
    let detected = wait_for(WAIT, || {
        agent.log().contains("model_name=quick").then_some(())
    });
    assert!(
        detected.is_some(),
        "the short-lived process was not classified:\n{}",
        agent.log()
    );
    // The same with an empty environment: nothing follows argv on the new stack but the
    // executable's name, and the kernel's copy must stop where argv does.
    let bare = Command::new(workload("llama-server"))
        .args(["-m", "/models/bare.gguf", "--exit-at-once"])
        .env_clear()
        .status()
        .unwrap();
    assert!(bare.success());
    let detected = wait_for(WAIT, || {
        agent.log().contains("model_name=bare").then_some(())
    });
    assert!(
        detected.is_some(),
        "a process with an empty environment lost its argv:\n{}",
        agent.log()
    );

    std::thread::sleep(Duration::from_millis(1500));
    let m = agent.metrics();
    assert!(m
        .find("llm_process_count", &[("model_name", "quick")])
        .is_empty());
    assert_eq!(agent.get("/healthz").unwrap().0, 200);
    let total_label_bytes: usize = m
        .samples("llm_process_memory_bytes")
        .iter()
        .flat_map(|(l, _)| l.values())
        .map(String::len)
        .sum();
    assert!(total_label_bytes < 2048, "label values are bounded");
}

/// Forces the kernel to hand an exited LLM process's pid to a new process
/// (/proc/sys/kernel/ns_last_pid) and checks the new one inherits nothing.
#[test]
fn a_reused_pid_never_inherits_old_series() {
    let agent = Agent::start(&["--grace-period", "30s", "--rescan-interval", "1h"]);
    let mut old = spawn(&workload("llama-server"), &["-m", "/models/old.gguf"]);
    let pid = old.pid();
    wait_series(&agent, pid);
    old.kill();
    wait_for(WAIT, || {
        pid_series(&agent, pid).is_none().then_some(()).or_else(|| {
            let (_, api) = agent.get("/api/processes").ok()?;
            api.contains("\"alive\":false").then_some(())
        })
    })
    .expect("exit seen");

    let reuse = |program: &str, args: &[&str]| -> Option<Proc> {
        for _ in 0..200 {
            std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).unwrap();
            let p = spawn(&workload(program), args);
            if p.pid() == pid {
                return Some(p);
            }
        }
        None
    };
    let plain = reuse("plain-program", &[]).expect("could not get the old pid back");
    let gone = wait_for(WAIT, || pid_series(&agent, pid).is_none().then_some(()));
    assert!(
        gone.is_some(),
        "a non-LLM process inherited the old series:\n{}",
        agent.metrics().0
    );
    drop(plain);

    let new =
        reuse("llama-server", &["-m", "/models/new.gguf"]).expect("could not get the old pid back");
    let labels = wait_for(WAIT, || {
        pid_series(&agent, pid).filter(|l| l["model_name"] == "new")
    })
    .expect("new process series");
    assert_identity(&labels, "llama.cpp", "new", "server");
    assert!(agent
        .metrics()
        .find("llm_process_memory_bytes", &[("model_name", "old")])
        .is_empty());
    drop(new);
}

/// Thousands of short-lived processes while an LLM process starts: it is still detected, and
/// every exec is either received or counted as lost (and then repaired by the scan).
#[test]
fn exec_storm() {
    storm(&["--rescan-interval", "2s"]);
}

/// The same storm through a one-page ring buffer (three exec records): losses are certain.
/// They are counted, and the LLM process is found anyway — by its event or by the scan.
#[test]
fn exec_storm_through_a_tiny_ring_loses_events_and_repairs() {
    let (_, lost) = storm(&["--rescan-interval", "1s", "--ring-buffer-bytes", "4096"]);
    assert!(lost > 0.0, "a one-page ring under a storm must lose events");
}

/// Runs 3,000 short-lived processes while an LLM process starts; returns (received, lost).
fn storm(args: &[&str]) -> (f64, f64) {
    const STORM: usize = 3000;
    let agent = Agent::start(args);
    let before = agent
        .metrics()
        .value("llmscope_events_total", &[("kind", "exec")])
        .unwrap();
    let storm = std::thread::spawn(|| {
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    for _ in 0..STORM / 2 {
                        Command::new("/bin/true").status().unwrap();
                    }
                });
            }
        });
    });
    std::thread::sleep(Duration::from_millis(300));
    let llm = spawn(&workload("llama-server"), &["-m", "/models/storm.gguf"]);
    storm.join().unwrap();
    assert_identity(
        &wait_series(&agent, llm.pid()),
        "llama.cpp",
        "storm",
        "server",
    );

    // The last execs are read within the next drain (10 ms at most in a storm): wait for the
    // accounts to settle.
    let counts = || {
        let m = agent.metrics();
        let received = m
            .value("llmscope_events_total", &[("kind", "exec")])
            .unwrap()
            - before;
        let lost = m
            .value("llmscope_events_lost_total", &[("kind", "exec")])
            .unwrap();
        (received, lost)
    };
    let settled = wait_for(WAIT, || {
        Some(counts()).filter(|(r, l)| r + l >= STORM as f64)
    });
    let (received, lost) = counts();
    assert!(
        settled.is_some(),
        "received {received} + lost {lost} < {STORM}"
    );
    println!("{received} exec events received, {lost} lost");
    (received, lost)
}

/// A process whose leader thread exits while another thread runs is alive: it stays
/// tracked (past a short grace period) until its last thread exits.
#[test]
fn a_process_outlives_its_leader_thread() {
    let agent = Agent::start(&["--grace-period", "500ms", "--rescan-interval", "1h"]);
    let mut child = Command::new(workload("llama-server"))
        .args(["-m", "/models/leader.gguf"])
        .env("LLMSCOPE_LEADER_EXITS", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    expect_line(&mut out, "leader exiting");
    wait_series(&agent, pid);
    // The leader is gone (a zombie thread); the process is not.
    std::thread::sleep(Duration::from_millis(1500));
    let labels = pid_series(&agent, pid).unwrap_or_else(|| {
        panic!(
            "the process lost its series when its leader exited:\n{}",
            agent.log()
        )
    });
    assert_identity(&labels, "llama.cpp", "leader", "server");
    let mut proc = Proc(child);
    proc.kill();
    let gone = wait_for(WAIT, || pid_series(&agent, pid).is_none().then_some(()));
    assert!(gone.is_some(), "its last thread exited: series must go");
}

/// A script no rule knows by its command line is classified the moment it maps a framework's
/// library (here a library at PyTorch's path, loaded a second after start the way an import
/// loads it) — not by a later re-check or scan.
#[test]
fn a_script_is_classified_when_it_maps_a_framework_library() {
    let agent = Agent::start(&["--rescan-interval", "1h"]);
    let dir = std::env::temp_dir().join(format!("llmscope-import-{}", std::process::id()));
    let lib = torch_library(&dir);
    let script = dir.join("chat.py");
    std::fs::write(
        &script,
        "import ctypes, sys, time\nprint('started', flush=True)\ntime.sleep(1)\n\
         ctypes.CDLL(sys.argv[1])\nprint('imported', flush=True)\nsys.stdin.read()\n",
    )
    .unwrap();
    let (mut child, mut out) = start_script(
        OsStr::new("python3"),
        &script,
        &[
            lib.as_os_str(),
            OsStr::new("--model"),
            OsStr::new("Qwen/Qwen2.5-0.5B-Instruct"),
        ],
    );
    let pid = child.id();
    expect_line(&mut out, "started");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        pid_series(&agent, pid).is_none(),
        "nothing says what it runs before the import"
    );
    expect_line(&mut out, "imported");
    let imported = std::time::Instant::now();
    let labels = wait_series(&agent, pid);
    let after = imported.elapsed();
    assert_identity(&labels, "pytorch", "Qwen/Qwen2.5-0.5B-Instruct", "script");
    assert!(
        after < Duration::from_secs(1),
        "classified {after:?} after the import: not by the mapping"
    );
    assert!(agent.log().contains("framework library mapped"));
    let _ = child.kill();
    let _ = child.wait();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `/bin/true` run back to back on two threads until dropped (a panicking test stops it too).
struct Storm {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Storm {
    fn start() -> Storm {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let threads = (0..2)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        Command::new("/bin/true").status().unwrap();
                    }
                })
            })
            .collect();
        Storm { stop, threads }
    }
}

impl Drop for Storm {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Where the perf records are the library hook (this development VM), their buffers stop
/// waking the agent per record while executable mappings are frequent (an exec storm: each
/// waking record costs an interrupt) and read on a timer instead — a script that maps a
/// framework library meanwhile is still classified by its mapping — and wake per record
/// again once mappings are rare. With a BPF hook the kernel filters and nothing batches.
#[test]
fn library_mappings_batch_in_an_exec_storm_and_are_still_seen() {
    let agent = Agent::start(&["--rescan-interval", "1h"]);
    let batching = || agent.metrics().value("llmscope_library_map_batching", &[]);
    let hook = agent.library_hook();
    if hook != "perf_mmap" {
        assert_eq!(batching(), Some(0.0), "a BPF hook ({hook}) never batches");
        return;
    }
    assert_eq!(
        batching(),
        Some(0.0),
        "an idle node's mappings wake the agent"
    );
    let dir = std::env::temp_dir().join(format!("llmscope-batch-{}", std::process::id()));
    let lib = torch_library(&dir);
    let script = dir.join("chat.py");
    std::fs::write(
        &script,
        "import ctypes, sys\nsys.stdin.readline()\nctypes.CDLL(sys.argv[1])\n\
         print('imported', flush=True)\nsys.stdin.read()\n",
    )
    .unwrap();
    let classified_by_its_mapping = |when: &str| {
        let (mut child, mut out) = start_script(
            OsStr::new("python3"),
            &script,
            &[
                lib.as_os_str(),
                OsStr::new("--model"),
                OsStr::new("Qwen/Qwen2.5-0.5B-Instruct"),
            ],
        );
        std::io::Write::write_all(child.stdin.as_mut().unwrap(), b"go\n").unwrap();
        expect_line(&mut out, "imported");
        let labels = wait_series(&agent, child.id());
        assert_identity(&labels, "pytorch", "Qwen/Qwen2.5-0.5B-Instruct", "script");
        println!("classified {when}");
        let _ = child.kill();
        let _ = child.wait();
    };
    {
        let storm = Storm::start();
        let batched = wait_for(WAIT, || batching().filter(|b| *b == 1.0));
        assert!(
            batched.is_some(),
            "an exec storm must make the buffers batch"
        );
        classified_by_its_mapping("while the buffers batch");
        drop(storm);
    }
    let waking = wait_for(WAIT, || batching().filter(|b| *b == 0.0));
    assert!(
        waking.is_some(),
        "after the storm the buffers wake per record again"
    );
    classified_by_its_mapping("after the storm");
    // Both by their mapping (the next /proc scan is an hour away).
    assert_eq!(agent.log().matches("framework library mapped").count(), 2);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A script that maps libcudart before any framework library (what `import torch` does with
/// the CUDA wheels) is tracked as a GPU user first, then reclassified the moment the
/// framework's library shows up — not left `framework="unknown"` for life.
#[test]
fn a_gpu_user_is_reclassified_when_it_maps_a_framework_library() {
    let agent = Agent::start(&["--rescan-interval", "1h"]);
    let dir = std::env::temp_dir().join(format!("llmscope-reclassify-{}", std::process::id()));
    let torch = torch_library(&dir);
    let script = dir.join("train.py");
    std::fs::write(
        &script,
        "import ctypes, sys\nctypes.CDLL(sys.argv[1])\nprint('cuda', flush=True)\n\
         sys.stdin.readline()\nctypes.CDLL(sys.argv[2])\nprint('imported', flush=True)\n\
         sys.stdin.read()\n",
    )
    .unwrap();
    let cudart = real_libcudart();
    let (mut child, mut out) = start_script(
        OsStr::new("python3"),
        &script,
        &[
            cudart.as_os_str(),
            torch.as_os_str(),
            OsStr::new("--model"),
            OsStr::new("Qwen/Qwen2.5-0.5B-Instruct"),
        ],
    );
    let pid = child.id();
    expect_line(&mut out, "cuda");
    let labels = wait_series(&agent, pid);
    assert_identity(&labels, "unknown", "unknown", "script");
    {
        use std::io::Write;
        let stdin = child.stdin.as_mut().unwrap();
        stdin.write_all(b"import\n").unwrap();
        stdin.flush().unwrap();
    }
    expect_line(&mut out, "imported");
    let imported = std::time::Instant::now();
    let labels = wait_for(WAIT, || {
        pid_series(&agent, pid)
            .filter(|l| l.get("framework").map(String::as_str) == Some("pytorch"))
    })
    .unwrap_or_else(|| {
        panic!(
            "never reclassified:\n{}\n{}",
            agent.metrics().0,
            agent.log()
        )
    });
    let after = imported.elapsed();
    eprintln!("reclassified {after:?} after the framework library was mapped");
    assert_identity(&labels, "pytorch", "Qwen/Qwen2.5-0.5B-Instruct", "script");
    // With --rescan-interval 1h only the mapping can have done it.
    assert!(
        after < Duration::from_secs(1),
        "reclassified {after:?} after the mapping"
    );
    let log = agent.log();
    assert!(
        log.contains("process_reclassified") && log.matches("process_detected").count() == 1,
        "detected once, then reclassified:\n{log}"
    );
    let _ = child.kill();
    let _ = child.wait();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The real thing: PyTorch 2.15 and its CUDA 13 wheels from PyPI (installed by `cargo xtask
/// test`). `import torch` maps `nvidia/cu13/lib/libcudart.so.13` before `libtorch_cpu.so`.
#[test]
fn a_real_import_torch_is_pytorch() {
    let python = std::env::var_os("LLMSCOPE_TORCH_PYTHON").expect(
        "LLMSCOPE_TORCH_PYTHON is not set: run the tests with `cargo xtask test`, which installs PyTorch",
    );
    let agent = Agent::start(&["--rescan-interval", "1h"]);
    let dir = std::env::temp_dir().join(format!("llmscope-torch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("train.py");
    std::fs::write(
        &script,
        "import sys, torch\nprint('imported', flush=True)\nsys.stdin.read()\n",
    )
    .unwrap();
    let (mut child, mut out) = start_script(
        &python,
        &script,
        &[OsStr::new("--model"), OsStr::new("meta-llama/Llama-3.2-1B")],
    );
    let pid = child.id();
    expect_line(&mut out, "imported");
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    assert!(
        maps.contains("libcudart.so.13") && maps.contains("libtorch_cpu.so"),
        "the real wheels map libcudart and libtorch_cpu"
    );
    let labels = wait_for(WAIT, || {
        pid_series(&agent, pid)
            .filter(|l| l.get("framework").map(String::as_str) == Some("pytorch"))
    })
    .unwrap_or_else(|| {
        panic!(
            "import torch not named:\n{}\n{}",
            agent.metrics().0,
            agent.log()
        )
    });
    assert_identity(&labels, "pytorch", "meta-llama/Llama-3.2-1B", "script");
    let _ = child.kill();
    let _ = child.wait();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A model fetched from a signed URL: the signature (query string), fragment and user-info
/// appear in no label, API response or log line; and made-up model names past
/// --max-model-names are exported as "other" and counted.
#[test]
fn signed_urls_leak_nothing_and_model_names_are_capped() {
    let agent = Agent::start(&["--rescan-interval", "1h", "--max-model-names", "2"]);
    let signed = spawn(
        &workload("llama-server"),
        &[
            "-m",
            "https://user:PASSWORD1@host/models/Llama-3.2-3B-Instruct-Q4_K_M.gguf?sig=SECRET1&se=2026#FRAGMENT1",
        ],
    );
    let labels = wait_series(&agent, signed.pid());
    assert_identity(
        &labels,
        "llama.cpp",
        "Llama-3.2-3B-Instruct-Q4_K_M",
        "server",
    );
    let second = spawn(&workload("llama-server"), &["-m", "/models/second.gguf"]);
    wait_series(&agent, second.pid());
    let third = spawn(
        &workload("llama-server"),
        &["-m", "/models/made-up-name.gguf"],
    );
    let labels = wait_series(&agent, third.pid());
    assert_eq!(labels["model_name"], "other");
    let m = agent.metrics();
    assert_eq!(m.value("llmscope_model_names_capped_total", &[]), Some(1.0));
    let (_, api) = agent.get("/api/processes").unwrap();
    for secret in ["SECRET1", "PASSWORD1", "FRAGMENT1", "sig="] {
        assert!(!m.0.contains(secret), "{secret} in /metrics");
        assert!(!api.contains(secret), "{secret} in /api/processes");
        assert!(!agent.log().contains(secret), "{secret} in the log");
    }
}

/// An agent with a fault injected: the faults exist only in a build with the `test-faults`
/// feature, which `cargo xtask test` enables.
fn agent_with_fault(fault: &str) -> Agent {
    if !cfg!(feature = "test-faults") {
        panic!("LLMSCOPE_TEST_FAULT needs the test-faults feature: run cargo xtask test");
    }
    Agent::start_with_env(
        &["--rescan-interval", "1h"],
        &[("LLMSCOPE_TEST_FAULT", fault)],
    )
}

/// The ring reader stalls, then dies (faults injected for tests): /healthz answers 503
/// naming the thread while it is stalled, and a dead one stops the agent with a non-zero exit
/// code so that a supervisor restarts it.
#[test]
fn a_stalled_or_dead_ring_reader_fails_health_and_the_process() {
    let stalled = agent_with_fault("events_stall");
    let unhealthy = wait_for(Duration::from_secs(30), || {
        stalled.get("/healthz").ok().filter(|(code, body)| {
            *code == 503 && body.contains("thread events has made no progress")
        })
    });
    assert!(unhealthy.is_some(), "{:?}", stalled.get("/healthz"));
    assert_eq!(
        stalled.get("/metrics").unwrap().0,
        200,
        "scrapes still answer"
    );
    drop(stalled);

    let mut dead = agent_with_fault("events_panic");
    let status = dead
        .exit_status(Duration::from_secs(20))
        .expect("the agent keeps running without its ring reader");
    assert!(!status.success(), "exit status {status}");
    let log = dead.log();
    assert!(
        log.contains("thread panicked") && log.contains("the events thread died"),
        "{log}"
    );
    assert!(!log.contains("did not stop within"), "{log}");
}

/// A collector that panics fails alone: its success gauge is 0, the scrape is 200, and the
/// next scrapes work too (nothing poisoned).
#[test]
fn a_panicking_collector_fails_alone() {
    let agent = agent_with_fault("collector_panic");
    for _ in 0..3 {
        let m = agent.metrics();
        assert_eq!(
            m.value("llmscope_collector_success", &[("collector", "fault")]),
            Some(0.0)
        );
        for collector in ["process", "kernel", "cuda"] {
            assert_eq!(
                m.value("llmscope_collector_success", &[("collector", collector)]),
                Some(1.0),
                "{collector}"
            );
        }
        assert_eq!(agent.get("/api/processes").unwrap().0, 200);
    }
    assert_eq!(agent.get("/healthz").unwrap().0, 200);
}

/// A library hook forced with `--library-hook` is the one the agent uses, or the agent stops
/// at start-up naming the hook and the kernel feature it needs; perf records and the scans
/// alone need nothing this kernel lacks.
#[test]
fn a_forced_library_hook_is_used_or_refused_by_name() {
    for (hook, label) in [
        ("fentry", "fentry"),
        ("kprobe", "kprobe"),
        ("perf", "perf_mmap"),
        ("scan", "none"),
    ] {
        let mut agent = Agent::spawn(&["--library-hook", hook, "--rescan-interval", "1h"], &[]);
        let exited = wait_for(Duration::from_secs(30), || {
            if agent.exit_status(Duration::ZERO).is_some() {
                return Some(true);
            }
            let healthy = agent.get("/healthz").is_ok_and(|(code, _)| code == 200);
            healthy.then_some(false)
        })
        .unwrap_or_else(|| panic!("--library-hook {hook}: neither up nor stopped"));
        if exited {
            let log = agent.log();
            assert!(
                matches!(hook, "fentry" | "kprobe"),
                "--library-hook {hook} must work on every kernel:\n{log}"
            );
            assert!(
                log.contains(&format!("--library-hook {hook}:")) && log.contains("this hook needs"),
                "{log}"
            );
        } else {
            let m = agent.metrics();
            let used = m.value("llmscope_library_hook", &[("hook", label)]);
            assert_eq!(used, Some(1.0), "--library-hook {hook}");
            // Read from the program's info where it is a BPF one: 0, nothing recursed.
            let missed = m.value("llmscope_library_hook_missed_total", &[]);
            assert_eq!(missed, Some(0.0), "--library-hook {hook}");
            let kernel_ok = m.value("llmscope_collector_success", &[("collector", "kernel")]);
            assert_eq!(kernel_ok, Some(1.0), "--library-hook {hook}");
        }
    }
}

/// A /proc scan that reads a process whose exec event still waits in the ring (a busy events
/// thread, made so by LLMSCOPE_TEST_FAULT=events_slow: 300 ms before every drain) leaves the
/// process to its event: each is detected once, by its exec, and no exec is counted missed.
#[test]
fn a_scan_never_takes_an_exec_still_in_the_ring_for_a_missed_one() {
    let agent = Agent::start_with_env(
        &["--rescan-interval", "1s"],
        &[("LLMSCOPE_TEST_FAULT", "events_slow")],
    );
    let program = workload("llama-server");
    let mut procs = Vec::new();
    for i in 0..30 {
        procs.push(spawn(&program, &["-m", &format!("/models/race-{i}.gguf")]));
        std::thread::sleep(Duration::from_millis(100));
    }
    for p in &procs {
        wait_series(&agent, p.pid());
    }
    // Another scan or two over them all.
    std::thread::sleep(Duration::from_millis(2500));
    let log = agent.log();
    for p in &procs {
        let needle = format!("pid={} ", p.pid());
        let detected: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("process_detected") && l.contains(&needle))
            .collect();
        assert!(
            detected.len() == 1 && detected[0].contains("via=\"exec\""),
            "pid {} detected {} times:\n{}",
            p.pid(),
            detected.len(),
            detected.join("\n")
        );
    }
    assert_eq!(
        agent.metrics().value(
            "llmscope_reconcile_repairs_total",
            &[("kind", "missed_exec")]
        ),
        Some(0.0)
    );
    for p in &mut procs {
        p.kill();
    }
}
