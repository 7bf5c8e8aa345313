//! `cargo xtask gpu-check`: the validation on real NVIDIA hardware (xtask/gpu-check/).
//!
//! - `--bundle`: a self-contained directory, target/gpu-check/bundle — the stripped release
//!   agent (its eBPF object is inside it), the runner, the workload sources, `run.sh` — for a
//!   GPU machine with its driver, nvcc and (optionally) PyTorch, where nothing can be
//!   downloaded: copy it there and run `sudo ./run.sh`.
//! - no flag, on a machine whose `nvidia-smi` answers: builds the bundle and runs it here.
//! - no flag, without a GPU: the same scenario against the test doubles (the test
//!   `agent/tests/gpu_check.rs`, which `cargo xtask test` runs too).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{ebpf, setup};

/// What goes into the bundle from xtask/gpu-check.
const SOURCES: [&str; 3] = ["gpu_check.py", "workload.cu", "torch_workload.py"];
/// The bundle must travel to a lent machine with the working tree (64 MiB in all).
const MAX_BUNDLE_BYTES: u64 = 64 << 20;

const RUN_SH: &str = r#"#!/bin/sh
# llmscope gpu-check: run as root on a machine with an NVIDIA GPU, its driver, nvcc and
# (optionally) PyTorch (--python PATH; /opt/torch/.venv/bin/python when there). Writes
# out/report.md beside this script; exits 1 if a check failed.
set -e
cd "$(dirname "$0")"
exec python3 gpu_check.py --agent ./llmscope --out ./out "$@"
"#;

pub fn run(bundle_only: bool) -> Result<()> {
    let gpu = Command::new("nvidia-smi")
        .arg("-L")
        .output()
        .is_ok_and(|o| o.status.success());
    if bundle_only || gpu {
        let bundle = bundle()?;
        if bundle_only {
            println!(
                "xtask: the bundle is {}: copy it to a GPU machine and run `sudo ./run.sh` there",
                bundle.display()
            );
            return Ok(());
        }
        if !setup::is_root() {
            bail!("cargo xtask gpu-check loads eBPF programs: run it as root");
        }
        println!("xtask: a GPU answers here: running the bundle against it");
        let status = Command::new(bundle.join("run.sh"))
            .status()
            .context("running run.sh")?;
        println!(
            "xtask: the report is {}",
            bundle.join("out/report.md").display()
        );
        if !status.success() {
            bail!("a gpu-check failed (see the report)");
        }
        return Ok(());
    }
    if !setup::is_root() {
        bail!("cargo xtask gpu-check loads eBPF programs: run it as root");
    }
    println!("xtask: no GPU here (nvidia-smi does not answer): running the same checks against the CUDA and NVML test doubles");
    setup::ensure_debian_packages(&[("cc", "gcc"), ("python3", "python3")])?;
    ebpf::build()?;
    setup::cargo(&[
        "test",
        "--package",
        "llmscope-agent",
        "--test",
        "gpu_check",
        "--",
        "--nocapture",
    ])
}

fn bundle() -> Result<PathBuf> {
    let release = crate::release_agent()?;
    let root = setup::workspace_root();
    let bundle = root.join("target/gpu-check/bundle");
    if bundle.exists() {
        std::fs::remove_dir_all(&bundle)?;
    }
    std::fs::create_dir_all(&bundle)?;
    let agent = bundle.join("llmscope");
    std::fs::copy(release, &agent)?;
    setup::run(Command::new("strip").arg(&agent))?;
    for source in SOURCES {
        std::fs::copy(
            root.join("xtask/gpu-check").join(source),
            bundle.join(source),
        )?;
    }
    let run_sh = bundle.join("run.sh");
    std::fs::write(&run_sh, RUN_SH)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&run_sh, std::fs::Permissions::from_mode(0o755))?;
    let size = dir_size(&bundle)?;
    println!(
        "xtask: gpu-check bundle {} ({:.1} MiB)",
        bundle.display(),
        size as f64 / 1048576.0
    );
    if size > MAX_BUNDLE_BYTES {
        bail!("the bundle is larger than 64 MiB ({size} bytes)");
    }
    Ok(bundle)
}

fn dir_size(dir: &Path) -> Result<u64> {
    let mut size = 0;
    for entry in std::fs::read_dir(dir)? {
        size += entry?.metadata()?.len();
    }
    Ok(size)
}
