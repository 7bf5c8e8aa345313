//! Helpers for the privileged integration tests: a running agent, processes that are always
//! cleaned up, a tiny HTTP client and an exposition parser.
#![allow(dead_code)]

mod common;
pub mod demo;
pub mod docker;
pub mod prometheus;
pub use common::*;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

pub fn require_root() {
    // SAFETY: no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the privileged tests load eBPF programs: run them as root (cargo xtask test)"
    );
}

/// A running agent; killed (SIGTERM, then SIGKILL) when dropped, so a failing test leaves no
/// agent and no eBPF program behind.
pub struct Agent {
    child: Child,
    pub addr: SocketAddr,
    log: PathBuf,
}

impl Agent {
    pub fn start(args: &[&str]) -> Agent {
        Agent::start_with_env(args, &[])
    }

    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Agent {
        Agent::spawn(args, env).until_healthy(|agent| {
            agent
                .get("/healthz")
                .ok()
                .is_some_and(|(code, _)| code == 200)
        })
    }

    /// Waits until `healthy` says so (the agent must not exit meanwhile).
    pub fn until_healthy(mut self, healthy: impl Fn(&Agent) -> bool) -> Agent {
        let ok = wait_for(Duration::from_secs(30), || {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("llmscope exited with {status} at start-up:\n{}", self.log());
            }
            healthy(&self).then_some(())
        });
        assert!(
            ok.is_some(),
            "llmscope did not become healthy:\n{}",
            self.log()
        );
        self
    }

    /// Starts the agent without waiting for it.
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Agent {
        require_root();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = std::env::temp_dir().join(format!("llmscope-test-agent-{}.log", addr.port()));
        let child = Command::new(env!("CARGO_BIN_EXE_llmscope"))
            .arg("--web.listen-address")
            .arg(addr.to_string())
            .args(args)
            // Never the host's real NVML in tests (as root it can create /dev/nvidiactl):
            // only the test double, where a test names it.
            .args((!args.contains(&"--nvml-lib")).then_some("--no-nvml"))
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting llmscope");
        Agent { child, addr, log }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn get(&self, path: &str) -> Result<(u16, String), llmscope::http_client::HttpError> {
        http_get(self.addr, path, None).map(|(code, _, body)| (code, body))
    }

    pub fn metrics(&self) -> Exposition {
        let (code, _, body) = http_get(self.addr, "/metrics", None).expect("scraping /metrics");
        assert_eq!(code, 200, "{body}");
        Exposition(body)
    }

    /// The labels of `pid`'s series (None: the agent does not export it).
    pub fn process_labels(&self, pid: u32) -> Option<Labels> {
        self.metrics()
            .find("llm_process_memory_bytes", &[("pid", &pid.to_string())])
            .into_iter()
            .next()
            .map(|(l, _)| l)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How the agent sees libraries being mapped (`llmscope_library_hook`'s label).
    pub fn library_hook(&self) -> String {
        self.metrics()
            .samples("llmscope_library_hook")
            .into_iter()
            .map(|(l, _)| l["hook"].clone())
            .next()
            .unwrap_or_default()
    }

    /// The agent's exit status, once it has exited by itself within `limit`.
    pub fn exit_status(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        wait_for(limit, || self.child.try_wait().ok().flatten())
    }

    /// Waits until the agent has probed at least `libraries` CUDA library files.
    pub fn wait_cuda_libraries(&self, libraries: f64) {
        let probed = wait_for(Duration::from_secs(20), || {
            let n: f64 = self
                .metrics()
                .samples("llmscope_cuda_libraries")
                .iter()
                .map(|(_, v)| v)
                .sum();
            (n >= libraries).then_some(())
        });
        assert!(
            probed.is_some(),
            "no CUDA library probed:\n{}\n{}",
            self.metrics().0,
            self.log()
        );
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        terminate(&mut self.child);
    }
}

fn terminate(child: &mut Child) {
    // SAFETY: signalling a child we own.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    if wait_for(Duration::from_secs(10), || child.try_wait().ok().flatten()).is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A test process, killed when dropped.
pub struct Proc(pub Child);

impl Proc {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A private directory for this test binary's compiled fixtures.
fn fixture_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("llmscope-fixtures-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    })
}

/// Compiles `source` (relative to tests/fixtures) once, with extra `cc` arguments.
fn compiled(output: &str, source: &str, extra: &[&str]) -> PathBuf {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let path = fixture_dir().join(output);
    if !path.exists() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let status = Command::new("cc")
            .arg("-o")
            .arg(&path)
            .arg(fixtures().join(source))
            .args(extra)
            .status()
            .expect("running cc (cargo xtask test installs gcc)");
        assert!(status.success(), "compiling {source}");
    }
    path
}

/// `program` reachable under `name` (a hard link, so /proc/<pid>/exe names it too).
fn named(program: &Path, name: &str) -> PathBuf {
    let path = fixture_dir().join("bin").join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    match std::fs::hard_link(program, &path) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            panic!("linking {}: {e}", path.display())
        }
        _ => path,
    }
}

/// A listening server whose executable looks like a Go program's, named `ollama`.
pub fn go_shaped_server() -> PathBuf {
    named(
        &compiled(
            "go-shaped-server",
            "requests/go_shaped_server.c",
            &["-O2", "-pthread"],
        ),
        "ollama",
    )
}

/// The sleeping C workload under any program name.
pub fn workload(name: &str) -> PathBuf {
    named(
        &compiled("workload", "workload.c", &["-O2", "-pthread"]),
        name,
    )
}

/// Writes gpu-info reports with the pid and start time it sees (tests/fixtures/gpuinfo_writer.c).
pub fn gpuinfo_writer() -> PathBuf {
    compiled("gpuinfo-writer", "gpuinfo_writer.c", &["-O2"])
}

/// The CUDA workload (tests/fixtures/cuda/workload.c) under any program name.
pub fn cuda_workload(name: &str) -> PathBuf {
    named(
        &compiled("cuda-workload", "cuda/workload.c", &["-O2", "-ldl"]),
        &format!("cuda/{name}"),
    )
}

/// The stand-in libcudart.so.12 (`runtime`) or libcuda.so.1 (`driver`), with NVIDIA's
/// versioned symbol names. -O0: no two functions may share an address.
pub fn fake_cuda_library(api: &str) -> PathBuf {
    let (source, soname) = match api {
        "runtime" => ("fake_cudart", "libcudart.so.12"),
        _ => ("fake_cuda", "libcuda.so.1"),
    };
    let map = fixtures().join(format!("cuda/{source}.map"));
    compiled(
        soname,
        &format!("cuda/{source}.c"),
        &[
            "-O0",
            "-shared",
            "-fPIC",
            &format!("-Wl,--version-script={}", map.display()),
            &format!("-Wl,-soname,{soname}"),
        ],
    )
}

/// A libcudart.so.12 stand-in with cudaMalloc alone (tests/fixtures/cuda/tiny_cudart.c).
pub fn tiny_cuda_library() -> PathBuf {
    let map = fixtures().join("cuda/fake_cudart.map");
    compiled(
        "tiny/libcudart.so.12",
        "cuda/tiny_cudart.c",
        &[
            "-O0",
            "-shared",
            "-fPIC",
            &format!("-Wl,--version-script={}", map.display()),
            "-Wl,-soname,libcudart.so.12",
        ],
    )
}

/// An empty shared library where PyTorch keeps `libtorch_cpu.so`, under `dir`: what a
/// script maps when it imports torch, as far as the agent can tell.
pub fn torch_library(dir: &Path) -> PathBuf {
    empty_shared_library(&dir.join("site-packages/torch/lib/libtorch_cpu.so"))
}

/// An empty shared library at `path` (its directory made).
pub fn empty_shared_library(path: &Path) -> PathBuf {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let built = Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(path)
        .args(["-x", "c", "/dev/null"])
        .status()
        .expect("running cc");
    assert!(built.success(), "building {}", path.display());
    path.to_owned()
}

/// The NVML test double (tests/fixtures/nvml/fake_nvml.c); it reads its values from the file
/// named by LLMSCOPE_FAKE_NVML on every call.
/// A directory removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A fresh `<tmp>/<prefix>-<this test process's pid>`.
    pub fn new(prefix: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What the NVML double reads (LLMSCOPE_FAKE_NVML): one H100 with 20 of 80 GiB used, `pid`
/// using 16 GiB of it. Written into `dir`; its path.
pub fn fake_h100_values(dir: &Path, pid: u32) -> PathBuf {
    let values = dir.join("nvml-values");
    std::fs::write(
        &values,
        format!(
            "gpu name=NVIDIA_H100_80GB_HBM3 uuid=GPU-0 total=85899345920 used=21474836480 util=63 mem_util=31 temp=66 power_mw=412000 extended=1\n\
             proc gpu=0 pid={pid} used=17179869184 sm=58 mem=22\n"
        ),
    )
    .unwrap();
    values
}

/// A self-signed certificate for 127.0.0.1 (`openssl req -x509`: a CA certificate, as most
/// exporters' self-made ones are), as `<name>.crt` and `<name>.key` in `dir`.
pub fn self_signed_certificate(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let (cert, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=llmscope-test"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("running openssl");
    assert!(made.status.success(), "{made:?}");
    (cert, key)
}

pub fn fake_nvml_library() -> PathBuf {
    compiled(
        "libnvidia-ml.so.1",
        "nvml/fake_nvml.c",
        &["-O0", "-shared", "-fPIC"],
    )
}

/// NVIDIA's real libcudart.so.12 from the PyPI wheel, fetched by `cargo xtask test`.
pub fn real_libcudart() -> PathBuf {
    let path = std::env::var_os("LLMSCOPE_REAL_CUDART")
        .map(PathBuf::from)
        .expect("LLMSCOPE_REAL_CUDART is not set: run the tests with `cargo xtask test`, which downloads the nvidia-cuda-runtime-cu12 wheel");
    assert!(
        path.is_file(),
        "{} is missing: run `cargo xtask test`",
        path.display()
    );
    path
}

/// A running CUDA workload: says "ready" once its library is loaded, runs its plan when
/// told, and exits when dropped (stdin closed).
pub struct CudaWorkload {
    child: Child,
    stdout: std::io::BufReader<std::process::ChildStdout>,
    /// What it printed before "ready" (the vLLM stand-in prints its engine core's pid).
    pub preamble: Vec<String>,
}

impl CudaWorkload {
    /// Starts `program args…` with the plan in `env` and waits for "ready".
    pub fn start(program: &Path, args: &[&str], env: &[(&str, &str)]) -> CudaWorkload {
        let mut cmd = Command::new(program);
        cmd.args(args).envs(env.iter().copied());
        Self::spawn(cmd)
    }

    pub fn spawn(mut cmd: Command) -> CudaWorkload {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting the CUDA workload");
        let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut w = CudaWorkload {
            child,
            stdout,
            preamble: Vec::new(),
        };
        loop {
            let line = w.line();
            if line.ends_with("ready") {
                return w;
            }
            assert!(
                !line.is_empty() && w.preamble.len() < 10,
                "the CUDA workload did not start: {:?}",
                w.preamble
            );
            w.preamble.push(line);
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn line(&mut self) -> String {
        use std::io::BufRead;
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .expect("reading the workload's output");
        line.trim().to_owned()
    }

    /// Starts the plan and returns at once (the workload runs it meanwhile).
    pub fn go(&mut self) {
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(b"go\n").unwrap();
        stdin.flush().unwrap();
    }

    /// Runs the plan; returns the workload's "done …" / "cuda_done …" line.
    pub fn run(&mut self) -> String {
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(b"go\n").unwrap();
        stdin.flush().unwrap();
        let line = self.line();
        assert!(line.contains("done"), "the CUDA workload failed: {line:?}");
        line
    }
}

impl Drop for CudaWorkload {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        if wait_for(Duration::from_secs(5), || {
            self.child.try_wait().ok().flatten()
        })
        .is_none()
        {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn spawn(program: &Path, args: &[&str]) -> Proc {
    Proc(
        Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", program.display())),
    )
}

/// The vLLM-shaped Python process, its workers started with `method` (`spawn` or `fork`);
/// returns it and its engine-core child's pid.
pub fn start_vllm(model: &str, method: &str) -> (Proc, u32) {
    let mut child = Command::new("python3")
        .args([
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            model,
            "--api-key",
            "sk-secret",
        ])
        .env("PYTHONPATH", fixtures())
        .env("HF_TOKEN", "hf_TopSecretTokenValue1234567890")
        .env("VLLM_WORKER_MULTIPROC_METHOD", method)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting python3");
    let mut out = child.stdout.take().unwrap();
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while out.read(&mut byte).unwrap_or(0) == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    let line = String::from_utf8_lossy(&line).into_owned();
    let pid = line
        .strip_prefix("engine_core_pid=")
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("unexpected output from the vLLM stand-in: {line:?}"));
    (Proc(child), pid)
}

/// A vLLM-shaped server (`--api-key sk-secret`) whose first cudaMalloc fails with
/// out-of-memory (the libcudart double, FAKE_CUDA_MALLOC_RC=2); returns it once its CUDA calls
/// are done.
pub fn vllm_hitting_oom(agent: &Agent, model: &str) -> Proc {
    use std::io::BufRead;
    let mut child = Command::new("python3")
        .args(["-m", "vllm.entrypoints.openai.api_server"])
        .args(["--model", model, "--api-key", "sk-secret"])
        .env("PYTHONPATH", fixtures())
        .env("LLMSCOPE_TEST_CUDART", fake_cuda_library("runtime"))
        .env("FAKE_CUDA_MALLOC_RC", "2")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting python3");
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut wait_until = |prefix: &str| {
        let mut line = String::new();
        while !line.starts_with(prefix) {
            line.clear();
            assert!(out.read_line(&mut line).unwrap() > 0, "the stand-in ended");
        }
    };
    wait_until("cuda_ready");
    agent.wait_cuda_libraries(1.0);
    writeln!(child.stdin.as_mut().unwrap(), "go").unwrap();
    wait_until("cuda_done");
    Proc(child)
}

/// Benchmarks: the median of per-round ratios and their spread, as the README prints them.
pub fn ratio_summary(ratios: &[f64]) -> String {
    let mut v = ratios.to_vec();
    v.sort_by(f64::total_cmp);
    format!(
        "median {:.3} (spread {:.3}–{:.3}, {} rounds)",
        v[v.len() / 2],
        v[0],
        v[v.len() - 1],
        v.len()
    )
}

/// Benchmarks: the `p`-quantile (0–1) of sorted samples.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}
