//! Finding and installing what the build and the tests need.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc_geteuid() == 0 }
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

pub fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program} >/dev/null 2>&1")])
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs a command, echoing it; fails with its exit status.
pub fn run(cmd: &mut Command) -> Result<()> {
    println!("xtask: running {cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// `cargo <args>` in the workspace, with the toolchain cargo xtask itself runs on.
pub fn cargo(args: &[&str]) -> Result<()> {
    cargo_with_env(args, &[])
}

pub fn cargo_with_env(args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(args).current_dir(workspace_root());
    for (k, v) in env {
        cmd.env(k, v);
    }
    run(&mut cmd)
}

/// The wheel that carries NVIDIA's real libcudart; the tests probe it (without a GPU every
/// call returns 35, cudaErrorInsufficientDriver). Downloaded once into target/fixtures.
const CUDART_WHEEL: &str = "nvidia-cuda-runtime-cu12==12.9.79";

/// Path of the real libcudart.so.12, downloading and unpacking the wheel when missing.
pub fn real_libcudart() -> Result<PathBuf> {
    let dir = workspace_root().join("target/fixtures/cuda-runtime");
    let lib = dir.join("libcudart.so.12");
    if lib.is_file() {
        return Ok(lib);
    }
    println!("xtask: downloading NVIDIA's libcudart from PyPI ({CUDART_WHEEL}) for the CUDA tests");
    let wheels = workspace_root().join("target/fixtures/wheels");
    run(Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
            CUDART_WHEEL,
            "-d",
        ])
        .arg(&wheels))?;
    std::fs::create_dir_all(&dir)?;
    let unpack = "import glob, sys, zipfile; \
        wheel = glob.glob(sys.argv[1] + '/nvidia_cuda_runtime_cu12-*.whl')[0]; \
        open(sys.argv[2], 'wb').write(zipfile.ZipFile(wheel).read('nvidia/cuda_runtime/lib/libcudart.so.12'))";
    let partial = dir.join("libcudart.so.12.partial");
    run(Command::new("python3")
        .arg("-c")
        .arg(unpack)
        .arg(&wheels)
        .arg(&partial))?;
    std::fs::rename(&partial, &lib)?;
    Ok(lib)
}

/// The packages of (command, package) pairs whose command is not on PATH.
fn missing<'a>(needed: &[(&str, &'a str)]) -> Vec<&'a str> {
    needed
        .iter()
        .filter(|(cmd, _)| !have(cmd))
        .map(|(_, pkg)| *pkg)
        .collect()
}

/// Installs the PyPI packages whose command is missing: (command, package).
pub fn ensure_pip_packages(needed: &[(&str, &str)]) -> Result<()> {
    let missing = missing(needed);
    if missing.is_empty() {
        return Ok(());
    }
    println!(
        "xtask: installing PyPI packages the tests need: {}",
        missing.join(" ")
    );
    run(Command::new("python3")
        .args(["-m", "pip", "install", "--quiet"])
        .args(&missing))
}

/// Installs a PyPI package when python3 cannot import `module`.
pub fn ensure_python_module(module: &str, package: &str) -> Result<()> {
    let present = Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if present {
        return Ok(());
    }
    println!("xtask: installing the PyPI package {package} for the tests");
    run(Command::new("python3").args(["-m", "pip", "install", "--quiet", package]))
}

/// Installs the Debian packages whose command is missing: (command, package).
pub fn ensure_debian_packages(needed: &[(&str, &str)]) -> Result<()> {
    let missing = missing(needed);
    if missing.is_empty() {
        return Ok(());
    }
    println!(
        "xtask: installing Debian packages the tests need: {}",
        missing.join(" ")
    );
    run(Command::new("apt-get").arg("update").arg("-q"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// The PyTorch release the tests import for real: its CUDA wheels map libcudart before any
/// torch library (what the stand-in library cannot show).
const TORCH: &str = "torch==2.15.0";

/// A virtual environment with PyTorch and its CUDA wheels from PyPI (~5.3 GB, about two
/// minutes to install here), cached under ~/.cache/llmscope keyed by the release; its python.
pub fn torch_python() -> Result<PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    let version = TORCH.trim_start_matches("torch==");
    let venv = std::path::Path::new(&home).join(format!(".cache/llmscope/torch-{version}"));
    let python = venv.join("bin/python");
    let complete = venv.join(".installed");
    if complete.is_file() {
        return Ok(python);
    }
    println!("xtask: installing {TORCH} with its CUDA wheels from PyPI into {} (once; ~5.3 GB, a few minutes)", venv.display());
    if venv.exists() {
        std::fs::remove_dir_all(&venv)?;
    }
    // Debian's python3 makes virtual environments only with python3-venv (ensurepip).
    let can_make_venv = Command::new("python3")
        .args(["-c", "import ensurepip, venv"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !can_make_venv {
        println!("xtask: installing the Debian package python3-venv (python3 -m venv needs it)");
        run(Command::new("apt-get").arg("update").arg("-q"))?;
        run(Command::new("apt-get")
            .args([
                "install",
                "-y",
                "-q",
                "--no-install-recommends",
                "python3-venv",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    run(Command::new(&python).args(["-m", "pip", "install", "--quiet", "--no-cache-dir", TORCH]))?;
    std::fs::write(&complete, TORCH)?;
    Ok(python)
}
