//! Containers in a real runtime (Debian's docker.io, images made here): the agent on the host
//! labels a containerized LLM process with Docker's id and name, counts the CUDA calls of a
//! container whose image carries its own libcudart copy (overlayfs), and leaves a host
//! process without container labels. Run as root (`cargo xtask test`).

mod support;

use std::time::Duration;

use support::docker::{image, Container};
use support::*;

/// The series of `family` for `pid`, once there is one.
fn series_of(agent: &Agent, family: &str, pid: u32, extra: &[(&str, &str)]) -> Labels {
    let pid = pid.to_string();
    let mut want = vec![("pid", pid.as_str())];
    want.extend_from_slice(extra);
    wait_for(Duration::from_secs(20), || {
        agent.metrics().find(family, &want).into_iter().next()
    })
    .map(|(labels, _)| labels)
    .unwrap_or_else(|| {
        panic!(
            "no {family} for pid {pid}:\n{}\n{}",
            agent.metrics().0,
            agent.log()
        )
    })
}

#[test]
fn containerized_processes_carry_their_container() {
    let sleeper = workload("llama-server");
    let cuda = cuda_workload("llama-server");
    let cudart = fake_cuda_library("runtime");
    let image = image(
        "llm",
        &[
            (&sleeper, "/bin/llama-server"),
            (&cuda, "/cuda/llama-server"),
            (&cudart, "/cuda/lib/libcudart.so.12"),
        ],
    );
    let agent = Agent::start(&["--cuda-overhead-budget", "100", "--rescan-interval", "1h"]);

    // A containerized llama.cpp server: Docker's id and name.
    let server = Container::run(
        "server",
        &image,
        &[],
        &[
            "/bin/llama-server",
            "-m",
            "/models/qwen2.5-7b-instruct-q4_k_m.gguf",
        ],
    );
    let labels = series_of(&agent, "llm_process_memory_bytes", server.pid(), &[]);
    assert_eq!(labels["container_id"], server.id[..12], "{labels:?}");
    assert_eq!(labels["container"], server.name, "{labels:?}");
    assert_eq!(labels["framework"], "llama.cpp");
    assert!(!labels.contains_key("pod"), "not on Kubernetes: {labels:?}");

    // A host process has no container labels at all.
    let host = spawn(&sleeper, &["-m", "/models/host.gguf"]);
    let labels = series_of(&agent, "llm_process_memory_bytes", host.pid(), &[]);
    for key in ["container_id", "container", "pod", "namespace"] {
        assert!(
            !labels.contains_key(key),
            "{key} on a host process: {labels:?}"
        );
    }

    // A container with its own libcudart copy, calling it: probed through its mount
    // namespace, counted, labelled.
    let worker = Container::run(
        "cuda",
        &image,
        &[
            ("CUDA_LIB", "/cuda/lib/libcudart.so.12"),
            ("TIMED_CALLS", "1200"),
            ("CALL_EVERY_US", "50000"),
        ],
        &["/cuda/llama-server", "-m", "/models/cuda.gguf"],
    );
    let pid = worker.pid();
    let labels = series_of(
        &agent,
        "llm_process_cuda_calls_total",
        pid,
        &[("function", "cudaDeviceSynchronize")],
    );
    assert_eq!(labels["container_id"], worker.id[..12], "{labels:?}");
    assert_eq!(labels["container"], worker.name, "{labels:?}");
    let m = agent.metrics();
    assert!(
        m.value("llmscope_container_lookups_total", &[("kind", "ok")]) >= Some(2.0),
        "{}",
        m.0
    );
    drop(server);
    drop(worker);
}

/// A containerized process (pid 1 in its own namespace, as a container's main process is)
/// writes its gpu-info report with its own pid and start time: joined to its host pid and to
/// no other; a report whose pid and start time match no process is refused and counted.
#[test]
fn gpu_info_reports_from_inside_a_container_join_the_right_process() {
    let writer = gpuinfo_writer();
    let image = image("gpuinfo", &[(&writer, "/bin/gpu-reporter")]);
    let dir = std::env::temp_dir().join(format!("llmscope-gpuinfo-ns-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // Like /tmp: any process may write its own report, none another's.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let agent = Agent::start(&[
        "--rescan-interval",
        "1h",
        "--gpu-info-dir",
        dir.to_str().unwrap(),
    ]);
    let mount = format!("{}:/gpu-info", dir.display());
    let reporter = Container::run_with(
        "reporter",
        &image,
        &["-v", &mount],
        &[("GPU_INFO_DIR", "/gpu-info")],
        &["/bin/gpu-reporter"],
    );
    let host_pid = reporter.pid();
    assert!(
        wait_for(Duration::from_secs(10), || dir
            .join("gpu-info-1.json")
            .exists()
            .then_some(()))
        .is_some(),
        "the container wrote no report as pid 1"
    );
    let labels = series_of(
        &agent,
        "llm_process_gpu_memory_allocated_bytes",
        host_pid,
        &[],
    );
    assert_eq!(labels["container_id"], reporter.id[..12], "{labels:?}");
    let m = agent.metrics();
    assert_eq!(
        m.find("llm_process_gpu_memory_allocated_bytes", &[("pid", "1")]),
        vec![],
        "joined to the host's pid 1"
    );

    // Same pid inside, a start time no process has: refused.
    let forged = Container::run_with(
        "forged",
        &image,
        &["-v", &mount],
        &[("GPU_INFO_DIR", "/gpu-info"), ("FAKE_START", "12345")],
        &["/bin/gpu-reporter"],
    );
    let refused = wait_for(Duration::from_secs(10), || {
        let n = agent.metrics().value(
            "llmscope_gpu_info_rejected_total",
            &[("reason", "no_matching_process")],
        )?;
        (n >= 1.0).then_some(n)
    });
    assert!(refused.is_some(), "{}", agent.metrics().0);
    drop(forged);
    drop(reporter);
    let _ = std::fs::remove_dir_all(&dir);
}
