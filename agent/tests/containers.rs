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
