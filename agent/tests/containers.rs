//! Containers in a real runtime (Debian's docker.io, images made here): the agent on the host
//! labels a containerized LLM process with Docker's id and name, counts the CUDA calls of a
//! container whose image carries its own libcudart copy (overlayfs), and leaves a host
//! process without container labels. Run as root (`cargo xtask test`).

mod support;

use std::time::Duration;

use support::docker::{have_image, image, Container, PodContainer, CONTAINERD_STATE};
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

/// Exact launch counting (`--cuda-overhead-budget 100`) in a container whose image carries
/// its own libcudart copy: launches made 2 s after the library was opened are all counted,
/// as allocations and synchronisations are — the launch probes reach a container's library
/// with the others.
#[test]
fn a_containers_launches_are_counted_from_its_first_call_in_exact_mode() {
    let cuda = cuda_workload("llama-server");
    let cudart = real_libcudart();
    let image = image(
        "llm-launch",
        &[
            (&cuda, "/cuda/llama-server"),
            (&cudart, "/cuda/lib/libcudart.so.12"),
        ],
    );
    let agent = Agent::start(&["--cuda-overhead-budget", "100", "--rescan-interval", "1h"]);
    let name = format!("llmscope-test-launch-{}", std::process::id());
    let mut cmd = std::process::Command::new("docker");
    cmd.args(["run", "-i", "--rm", "--network", "none", "--name", &name]);
    for env in [
        "CUDA_LIB=/cuda/lib/libcudart.so.12",
        "ALLOCS=7",
        "LAUNCHES=7",
        "SYNCS=7",
    ] {
        cmd.args(["-e", env]);
    }
    cmd.args([&image, "/cuda/llama-server", "-m", "/models/launch.gguf"]);
    let mut workload = CudaWorkload::spawn(cmd);
    let pid: u32 = {
        let out = std::process::Command::new("docker")
            .args(["inspect", "-f", "{{.State.Pid}}", &name])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    };
    std::thread::sleep(Duration::from_secs(2));
    let done = workload.run();
    assert!(done.contains("launches=7"), "{done}");
    let pid_s = pid.to_string();
    let counted = wait_for(Duration::from_secs(10), || {
        let m = agent.metrics();
        let launches = m.value(
            "llm_process_cuda_kernel_launches_total",
            &[("pid", pid_s.as_str())],
        )?;
        let syncs = m.value(
            "llm_process_cuda_calls_total",
            &[
                ("pid", pid_s.as_str()),
                ("function", "cudaDeviceSynchronize"),
            ],
        )?;
        (syncs == 7.0).then_some(launches)
    });
    assert_eq!(
        counted,
        Some(7.0),
        "launches of the container's first calls:\n{}\n{}",
        agent.metrics().0,
        agent.log()
    );
    drop(workload);
    let _ = std::process::Command::new("docker")
        .args(["rm", "-f", &name])
        .output();
}

/// A containerized process's series carry their final label set from the first scrape
/// (the process is held back until Docker names its container): never `container_id` alone,
/// then the names — a label set that changes mid-life breaks `rate()` and doubles series.
#[test]
fn a_containers_series_have_their_names_from_the_first_scrape() {
    let sleeper = workload("llama-server");
    let image = image("llm-first", &[(&sleeper, "/bin/llama-server")]);
    // A busy Docker daemon: every answer 400 ms late.
    let dir = std::env::temp_dir().join(format!("llmscope-slow-docker-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("docker.sock");
    slow_docker_proxy(&socket, Duration::from_millis(400));
    let agent = Agent::start(&[
        "--rescan-interval",
        "1h",
        "--container.docker-socket",
        socket.to_str().unwrap(),
    ]);
    let model = format!("first-scrape-{}", std::process::id());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Scrapes as fast as it can from before the container starts.
    let scraper = {
        let (stop, addr, model) = (stop.clone(), agent.addr, model.clone());
        std::thread::spawn(move || {
            let mut seen: Vec<Labels> = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok((200, _, body)) = http_get(addr, "/metrics", None) {
                    let m = Exposition(body);
                    for family in ["llm_process_memory_bytes", "llm_process_cpu_seconds_total"] {
                        seen.extend(
                            m.find(family, &[("model_name", model.as_str())])
                                .into_iter()
                                .map(|(l, _)| l),
                        );
                    }
                }
            }
            seen
        })
    };
    let server = Container::run(
        "first-scrape",
        &image,
        &[],
        &["/bin/llama-server", "-m", &format!("/models/{model}.gguf")],
    );
    let labels = series_of(&agent, "llm_process_memory_bytes", server.pid(), &[]);
    assert_eq!(labels["container"], server.name, "{labels:?}");
    // A few more scrapes after the first.
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = scraper.join().unwrap();
    assert!(!seen.is_empty(), "the scraper saw the process");
    for labels in &seen {
        assert_eq!(
            labels.get("container"),
            Some(&server.name),
            "a series without its container's name: {labels:?}"
        );
    }
    eprintln!("{} scraped series, every one named", seen.len());
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Listens on `socket` and forwards each connection to Docker's socket, `delay` after the
/// request arrived.
fn slow_docker_proxy(socket: &std::path::Path, delay: Duration) {
    use std::os::unix::net::{UnixListener, UnixStream};
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket).unwrap();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let Ok(docker) = UnixStream::connect("/var/run/docker.sock") else {
                    return;
                };
                let (mut c_in, mut d_out) =
                    (client.try_clone().unwrap(), docker.try_clone().unwrap());
                std::thread::spawn(move || {
                    let mut first = [0u8; 1];
                    use std::io::{Read, Write};
                    if c_in.read_exact(&mut first).is_ok() {
                        std::thread::sleep(delay);
                        let _ = d_out.write_all(&first);
                        let _ = std::io::copy(&mut c_in, &mut d_out);
                    }
                });
                let (mut d_in, mut c_out) = (docker, client);
                let _ = std::io::copy(&mut d_in, &mut c_out);
                // Docker closed: so does the client's end (the other thread holds a clone).
                let _ = c_out.shutdown(std::net::Shutdown::Both);
            });
        }
    });
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

/// A capability set of a process, from its status.
fn capabilities(set: &str, pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{set}:")))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap()
}

/// Capabilities containerd grants by default, all dropped (with `--cap-drop ALL`, ctr would
/// also drop those added).
const DEFAULT_CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// `llmscope:dev` (built from source by `cargo xtask image`, which `cargo xtask test` runs
/// first), run by containerd — what the kubelet runs pods with — with the DaemonSet's
/// security context: not privileged, only the DaemonSet's capabilities, read-only root, host PID
/// namespace, host /proc at /host/proc, tracefs, BTF and Docker's socket read-only, no
/// seccomp filter. (Docker 20.10 cannot: it does not know CAP_BPF and CAP_PERFMON.) It
/// detects a containerized LLM process, with its container's labels, and a host process.
#[test]
fn the_image_detects_processes_with_the_daemonsets_security_context() {
    assert!(
        have_image("llmscope:dev"),
        "no llmscope:dev image: run cargo xtask image (cargo xtask test does)"
    );
    let daemonset =
        std::fs::read_to_string(demo::root().join("deploy/kubernetes/base/daemonset.yaml"))
            .unwrap();
    for needle in [
        "privileged: false",
        "readOnlyRootFilesystem: true",
        "drop: [\"ALL\"]",
        "add: [\"BPF\", \"PERFMON\", \"SYS_PTRACE\", \"DAC_READ_SEARCH\", \"SYS_RESOURCE\"]",
        "hostPID: true",
        "type: Unconfined",
        "path: /var/run/docker.sock",
    ] {
        assert!(
            daemonset.contains(needle),
            "the DaemonSet no longer has {needle}: update this test"
        );
    }
    let sleeper = workload("llama-server");
    let image = image("llm", &[(&sleeper, "/bin/llama-server")]);
    let server = Container::run(
        "imaged-server",
        &image,
        &[],
        &["/bin/llama-server", "-m", "/models/in-a-container.gguf"],
    );
    let host = spawn(&sleeper, &["-m", "/models/on-the-host.gguf"]);

    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let log = std::env::temp_dir().join(format!("llmscope-image-agent-{}.log", addr.port()));
    let mut options: Vec<String> = vec![
        "--net-host".into(),
        // The host's PID namespace (this test's: pid 1's is not readable on every machine).
        "--with-ns".into(),
        format!("pid:/proc/{}/ns/pid", std::process::id()),
        "--read-only".into(),
        "--log-uri".into(),
        format!("file://{}", log.display()),
    ];
    for cap in DEFAULT_CAPABILITIES {
        options.extend(["--cap-drop".into(), (*cap).into()]);
    }
    // What this test may grant: a capability outside its own bounding set cannot be (on
    // the development machines CAP_SYS_RESOURCE is not in it; the agent needs it only for
    // the memlock limit of kernels before 5.11).
    let bounding = capabilities("CapBnd", std::process::id());
    let granted: Vec<(&str, u32)> = [
        ("BPF", 39),
        ("PERFMON", 38),
        ("SYS_PTRACE", 19),
        ("DAC_READ_SEARCH", 2),
        ("SYS_RESOURCE", 24),
    ]
    .into_iter()
    .filter(|(_, bit)| bounding & (1 << bit) != 0)
    .collect();
    for (cap, _) in &granted {
        options.extend(["--cap-add".into(), format!("CAP_{cap}")]);
    }
    for (src, dst) in [
        ("/proc", "/host/proc"),
        ("/sys/kernel/tracing", "/sys/kernel/tracing"),
        ("/sys/kernel/btf", "/sys/kernel/btf"),
        ("/var/run/docker.sock", "/var/run/docker.sock"),
    ] {
        options.extend([
            "--mount".into(),
            format!("type=bind,src={src},dst={dst},options=rbind:ro"),
        ]);
    }
    let listen = format!("--web.listen-address={addr}");
    let agent = PodContainer::start(
        "llmscope:dev",
        1,
        &options,
        &[
            "/usr/local/bin/llmscope",
            &listen,
            "--path.procfs=/host/proc",
            "--no-nvml",
        ],
    );
    // Exactly those capabilities, nothing else.
    let effective = capabilities("CapEff", agent.pid());
    let want = granted.iter().fold(0, |m, (_, bit)| m | (1u64 << bit));
    assert_eq!(effective, want, "effective capabilities {effective:#x}");
    let both = wait_for(Duration::from_secs(30), || {
        let (code, _, body) = http_get(addr, "/metrics", None).ok()?;
        let m = Exposition(body);
        let contained = m
            .find(
                "llm_process_memory_bytes",
                &[("pid", &server.pid().to_string())],
            )
            .into_iter()
            .next()?;
        let on_host = m
            .find(
                "llm_process_memory_bytes",
                &[("pid", &host.pid().to_string())],
            )
            .into_iter()
            .next()?;
        (code == 200).then_some((contained.0, on_host.0))
    });
    let Some((contained, on_host)) = both else {
        panic!(
            "the containerized agent did not see both:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    };
    assert_eq!(contained["container_id"], server.id[..12], "{contained:?}");
    assert_eq!(contained["container"], server.name, "{contained:?}");
    assert!(!on_host.contains_key("container_id"), "{on_host:?}");
    drop(agent);
    let _ = std::fs::remove_file(&log);
}

/// A pod's container as containerd's CRI plugin runs it (its bundle annotated with the pod,
/// namespace and container name the kubelet gave): labelled with all three.
#[test]
fn a_pods_container_under_containerd_carries_pod_and_namespace() {
    let sleeper = workload("llama-server");
    let image = image("llm", &[(&sleeper, "/bin/llama-server")]);
    let agent = Agent::start(&[
        "--rescan-interval",
        "1h",
        "--container.containerd-state",
        CONTAINERD_STATE,
        "--container.docker-socket",
        "",
    ]);
    let pod = PodContainer::run(
        &image,
        "qwen-7b-0",
        "inference",
        "server",
        &[
            "/bin/llama-server",
            "-m",
            "/models/qwen2.5-7b-instruct.gguf",
        ],
    );
    let want = [
        ("pod", "qwen-7b-0"),
        ("namespace", "inference"),
        ("container", "server"),
    ];
    let labels = series_of(&agent, "llm_process_memory_bytes", pod.pid(), &want);
    assert_eq!(labels["container_id"], pod.id[..12], "{labels:?}");
    drop(pod);
}
