//! Building the eBPF object: nightly (or stable with RUSTC_BOOTSTRAP) for bpfel-unknown-none
//! with build-std, linked by bpf-linker. Installs rust-src and bpf-linker when missing, with
//! the recipe in docs/toolchain.md: bpf-linker links against the LLVM that ships with the
//! toolchain, reached through a directory of symlinks that must stay where it is.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::setup::{run, workspace_root};

/// The eBPF object the agent embeds (agent/build.rs reads it from here).
pub const OBJECT: &str = "target/ebpf/bpfel-unknown-none/release/agent-ebpf";

pub fn build() -> Result<()> {
    let toolchain = Toolchain::pick()?;
    toolchain.ensure_rust_src()?;
    ensure_bpf_linker(&toolchain)?;
    let mut cmd = toolchain.cargo();
    cmd.current_dir(workspace_root())
        .args([
            "build",
            "--package",
            "agent-ebpf",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--target-dir",
            "target/ebpf",
        ])
        .env("RUSTFLAGS", "-C debuginfo=2 -C link-arg=--btf");
    run(&mut cmd)?;
    println!("xtask: eBPF object at {OBJECT}");
    Ok(())
}

/// `cargo` of the nightly toolchain (or the default one with RUSTC_BOOTSTRAP=1), with the
/// host toolchain's variables removed: for cargo-fuzz.
pub fn nightly_cargo() -> Result<Command> {
    Ok(Toolchain::pick()?.cargo())
}

struct Toolchain {
    /// `nightly`, or the default toolchain with RUSTC_BOOTSTRAP=1.
    name: String,
    bootstrap: bool,
}

impl Toolchain {
    fn pick() -> Result<Toolchain> {
        let list = output(Command::new("rustup").args(["toolchain", "list"]))?;
        if list.lines().any(|l| l.starts_with("nightly")) {
            return Ok(Toolchain {
                name: "nightly".into(),
                bootstrap: false,
            });
        }
        println!("xtask: no nightly toolchain: using the default one with RUSTC_BOOTSTRAP=1");
        let default = list
            .lines()
            .find(|l| l.contains("(default)") || l.contains("(active"))
            .and_then(|l| l.split_whitespace().next())
            .context("rustup lists no default toolchain")?;
        Ok(Toolchain {
            name: default.to_owned(),
            bootstrap: true,
        })
    }

    fn rustup_run(&self, program: &str) -> Command {
        let mut cmd = Command::new("rustup");
        cmd.args(["run", &self.name, program]);
        // The outer `cargo xtask` may have set these for the host toolchain.
        for var in [
            "RUSTC",
            "RUSTDOC",
            "RUSTC_WRAPPER",
            "RUSTUP_TOOLCHAIN",
            "CARGO",
            "CARGO_ENCODED_RUSTFLAGS",
            "CARGO_TARGET_DIR",
        ] {
            cmd.env_remove(var);
        }
        if self.bootstrap {
            cmd.env("RUSTC_BOOTSTRAP", "1");
        }
        cmd
    }

    fn cargo(&self) -> Command {
        self.rustup_run("cargo")
    }

    fn ensure_rust_src(&self) -> Result<()> {
        let installed = output(Command::new("rustup").args([
            "component",
            "list",
            "--installed",
            "--toolchain",
            &self.name,
        ]))?;
        if installed.lines().any(|l| l.starts_with("rust-src")) {
            return Ok(());
        }
        println!(
            "xtask: installing rust-src for the {} toolchain (build-std needs it)",
            self.name
        );
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            &self.name,
        ]))
    }

    fn sysroot(&self) -> Result<PathBuf> {
        Ok(PathBuf::from(
            output(self.rustup_run("rustc").args(["--print", "sysroot"]))?.trim(),
        ))
    }
}

fn ensure_bpf_linker(toolchain: &Toolchain) -> Result<()> {
    if Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Ok(());
    }
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .context("neither CARGO_HOME nor HOME is set")?;
    let llvm_dir = cargo_home.join("llmscope-llvm");
    let lib_dir = llvm_dir.join("lib");
    let sysroot_lib = toolchain.sysroot()?.join("lib");
    let libllvm = std::fs::read_dir(&sysroot_lib)
        .with_context(|| format!("reading {}", sysroot_lib.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .with_context(|| format!("no libLLVM.so.* in {}", sysroot_lib.display()))?;
    let file_name = libllvm.file_name().unwrap().to_str().unwrap().to_owned();
    let major = file_name
        .trim_start_matches("libLLVM.so.")
        .split('.')
        .next()
        .filter(|m| m.chars().all(|c| c.is_ascii_digit()))
        .with_context(|| format!("cannot read the LLVM version from {file_name}"))?
        .to_owned();
    println!(
        "xtask: bpf-linker is missing: installing it against the toolchain's LLVM {major} ({}), through symlinks in {}",
        libllvm.display(),
        lib_dir.display()
    );
    std::fs::create_dir_all(&lib_dir)?;
    for name in ["libLLVM.so", file_name.as_str()] {
        let link = lib_dir.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&libllvm, &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--no-default-features",
            "--features",
        ])
        .arg(format!("llvm-{major}"))
        .env("LLVM_PREFIX", &llvm_dir))
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
