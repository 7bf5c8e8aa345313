//! `cargo xtask build-ebpf | run | test | bench | demo | image | gpu-check`: every set-up step a
//! fresh machine needs, said out loud.

mod ebpf;
mod fuzz;
mod gpu_check;
mod image;
mod llama;
mod setup;
mod vm;

use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "llmscope's build, run and test tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build the eBPF object (installs bpf-linker and rust-src first when missing).
    BuildEbpf,
    /// Build everything and run the agent as root: `cargo xtask run -- --grace-period 5s`.
    Run {
        /// Arguments passed to the agent.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Benchmarks (needs root): `exec` (syscall tax, exec-storm overhead, exec → visible),
    /// `libraries` (library mapped → probed / classified), `uprobe` (CUDA probe cost per
    /// call, launch-bound throughput), `requests` (request telemetry's cost to a real
    /// llama-server and to other processes); all when none is named.
    Bench {
        #[arg(value_parser = ["exec", "libraries", "uprobe", "requests"])]
        name: Option<String>,
    },
    /// A whole llmscope environment without a GPU (agent, CUDA and NVML test doubles,
    /// workloads, a stand-in inference server, Prometheus on :9090) to look at every metric.
    Demo,
    /// Validate the CUDA and NVML paths on a real NVIDIA GPU (report in
    /// target/gpu-check/bundle/out/report.md); without a GPU, the same checks against the
    /// test doubles. `--bundle`: only build the bundle to copy to a GPU machine.
    GpuCheck {
        #[arg(long)]
        bundle: bool,
    },
    /// Build the agent's image from source (deploy/docker/Dockerfile) as llmscope:dev, with
    /// Debian's docker.io; base images are made locally when no registry can be reached.
    Image,
    /// Fuzz every parser of untrusted input (cargo-fuzz, libFuzzer) for `--seconds` each,
    /// or only TARGET; a crash fails it and leaves the input in target/fuzz/artifacts.
    Fuzz {
        target: Option<String>,
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// The privileged eBPF tests inside other kernels (Debian's 6.1 and 6.12 cloud kernels,
    /// under QEMU): all of them, or only those named (needs root).
    Vmtest { kernels: Vec<String> },
    /// Run every test: unit tests and the privileged integration tests (needs root).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::BuildEbpf => ebpf::build(),
        Task::Run { args } => run(args),
        Task::Test { args } => test(args),
        Task::Vmtest { kernels } => vmtest(&kernels),
        Task::Bench { name } => bench(name),
        Task::Demo => demo(),
        Task::Image => image::build(),
        Task::GpuCheck { bundle } => gpu_check::run(bundle),
        Task::Fuzz { target, seconds } => fuzz::run_targets(target.as_deref(), seconds),
    }
}

/// Builds the eBPF object and the release agent (the object is inside it); its path.
fn release_agent() -> Result<std::path::PathBuf> {
    ebpf::build()?;
    setup::cargo(&[
        "build",
        "--release",
        "--package",
        "llmscope-agent",
        "--bin",
        "llmscope",
    ])?;
    Ok(setup::workspace_root().join("target/release/llmscope"))
}

fn run(args: Vec<String>) -> Result<()> {
    let binary = release_agent()?;
    let mut cmd = if setup::is_root() {
        Command::new(&binary)
    } else {
        println!("xtask: the agent needs root (eBPF, tracefs): running it with sudo");
        let mut c = Command::new("sudo");
        c.arg(&binary);
        c
    };
    let status = cmd
        .args(&args)
        .status()
        .with_context(|| format!("running {}", binary.display()))?;
    if !status.success() {
        bail!("llmscope exited with {status}");
    }
    Ok(())
}

/// The agent's test-only fault injection (never in a release build).
const TEST_FEATURES: &str = "llmscope-agent/test-faults";

/// How long `cargo xtask test` runs each fuzz target.
const FUZZ_SECONDS_IN_TEST: u64 = 10;

fn test(args: Vec<String>) -> Result<()> {
    if !setup::is_root() {
        bail!("cargo xtask test runs privileged tests that load eBPF programs: run it as root (e.g. sudo -E cargo xtask test)");
    }
    setup::ensure_debian_packages(&[
        ("x86_64-w64-mingw32-gcc", "gcc-mingw-w64-x86-64"),
        ("wine", "wine"),
        ("wine64", "wine64"),
        ("cc", "gcc"),
        ("python3", "python3"),
        ("pip3", "python3-pip"),
        ("unshare", "util-linux"),
        ("promtool", "prometheus"),
        ("docker-compose", "docker-compose"),
        ("systemd-analyze", "systemd"),
        ("bpftool", "bpftool"),
        ("dockerd", "docker.io"),
        ("openssl", "openssl"),
        ("curl", "curl"),
        ("ip", "iproute2"),
        ("prometheus-alertmanager", "prometheus-alertmanager"),
        ("victoria-metrics", "victoria-metrics"),
        ("tmux", "tmux"),
    ])?;
    setup::ensure_pip_packages(&[("kubernetes-validate", "kubernetes-validate")])?;
    let cudart = setup::real_libcudart()?;
    ebpf::build()?;
    setup::cargo(&["fmt", "--all", "--check"])?;
    setup::cargo(&[
        "clippy",
        "--workspace",
        "--exclude",
        "agent-ebpf",
        "--all-targets",
        "--features",
        TEST_FEATURES,
        "--",
        "-D",
        "warnings",
    ])?;
    let fallback_exe = windows_fallback()?;
    // The container tests run the image built from source; the server tests a real
    // llama.cpp server.
    image::build()?;
    let (llama_server, llama_model) = llama::fixture()?;
    let torch_python = setup::torch_python()?;
    // Integration tests start agents and process storms: one at a time, so they do not
    // compete for this machine's two cores.
    let mut cargo_args = vec![
        "test",
        "--workspace",
        "--exclude",
        "agent-ebpf",
        "--features",
        TEST_FEATURES,
    ];
    cargo_args.extend(args.iter().map(String::as_str));
    if !args.iter().any(|a| a == "--") {
        cargo_args.push("--");
    }
    cargo_args.push("--test-threads=1");
    setup::cargo_with_env(
        &cargo_args,
        &[
            ("LLMSCOPE_REAL_CUDART", cudart.as_os_str()),
            ("LLMSCOPE_FALLBACK_EXE", fallback_exe.as_os_str()),
            ("LLMSCOPE_LLAMA_SERVER", llama_server.as_os_str()),
            ("LLMSCOPE_LLAMA_MODEL", llama_model.as_os_str()),
            ("LLMSCOPE_TORCH_PYTHON", torch_python.as_os_str()),
        ],
    )?;
    // The kernel side again, in the other kernels of the matrix, and every parser of
    // untrusted input briefly, on the corpus in the repository (a longer run:
    // `cargo xtask fuzz --seconds N`). Both skipped when a test name filter was given.
    if args.is_empty() {
        matrix(&[], &[("LLMSCOPE_REAL_CUDART", cudart.as_os_str())])?;
        fuzz::run_targets(None, FUZZ_SECONDS_IN_TEST)?;
    }
    Ok(())
}

/// `cargo xtask vmtest [KERNEL…]`.
fn vmtest(kernels: &[String]) -> Result<()> {
    if !setup::is_root() {
        bail!("cargo xtask vmtest loads eBPF programs in the guests and runs virtiofsd: run it as root");
    }
    let cudart = setup::real_libcudart()?;
    ebpf::build()?;
    matrix(kernels, &[("LLMSCOPE_REAL_CUDART", cudart.as_os_str())])
}

/// Runs the kernel matrix and prints its table; fails when a check failed on any kernel.
fn matrix(kernels: &[String], env: &[(&str, &std::ffi::OsStr)]) -> Result<()> {
    let started = std::time::Instant::now();
    let reports = vm::run_matrix(kernels, env)?;
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease")?;
    println!(
        "xtask: kernel matrix ({} s):\n{}",
        started.elapsed().as_secs(),
        vm::table(host.trim(), &reports)
    );
    let table = vm::table(host.trim(), &reports);
    std::fs::create_dir_all(setup::workspace_root().join("target/vmtest"))?;
    std::fs::write(
        setup::workspace_root().join("target/vmtest/matrix.md"),
        &table,
    )?;
    if std::env::var_os("LLMSCOPE_BLESS").is_some() && reports.len() == vm::KERNELS.len() {
        vm::bless_readme(&table)?;
    }
    let failed: Vec<&str> = reports
        .iter()
        .filter(|r| !r.passed())
        .map(|r| r.kernel.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("the kernel matrix failed on {}", failed.join(", "));
    }
    Ok(())
}

/// Builds llmscope-fallback.exe for Windows (mingw), installing the Rust target when missing.
fn windows_fallback() -> Result<std::path::PathBuf> {
    const TARGET: &str = "x86_64-pc-windows-gnu";
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()?;
    if !String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.trim() == TARGET)
    {
        println!("xtask: installing the Rust standard library for {TARGET} (windows-fallback's Windows build)");
        setup::run(Command::new("rustup").args(["target", "add", TARGET]))?;
    }
    setup::cargo(&[
        "build",
        "--release",
        "--package",
        "windows-fallback",
        "--target",
        TARGET,
    ])?;
    Ok(setup::workspace_root()
        .join("target")
        .join(TARGET)
        .join("release/llmscope-fallback.exe"))
}

fn bench(name: Option<String>) -> Result<()> {
    if !setup::is_root() {
        bail!("cargo xtask bench loads eBPF programs: run it as root");
    }
    setup::ensure_debian_packages(&[("cc", "gcc"), ("bpftrace", "bpftrace")])?;
    ebpf::build()?;
    let names = name.map_or(
        vec![
            "exec".to_owned(),
            "libraries".to_owned(),
            "uprobe".to_owned(),
            "requests".to_owned(),
        ],
        |n| vec![n],
    );
    // The requests bench runs the real llama.cpp server the tests build.
    let (llama_server, llama_model) = llama::fixture()?;
    for name in &names {
        setup::cargo_with_env(
            &["bench", "--package", "llmscope-agent", "--bench", name],
            &[
                ("LLMSCOPE_LLAMA_SERVER", llama_server.as_os_str()),
                ("LLMSCOPE_LLAMA_MODEL", llama_model.as_os_str()),
            ],
        )?;
    }
    Ok(())
}

fn demo() -> Result<()> {
    if !setup::is_root() {
        bail!("cargo xtask demo loads eBPF programs: run it as root");
    }
    setup::ensure_debian_packages(&[
        ("cc", "gcc"),
        ("python3", "python3"),
        ("promtool", "prometheus"),
    ])?;
    ebpf::build()?;
    setup::cargo(&["bench", "--package", "llmscope-agent", "--bench", "demo"])
}
