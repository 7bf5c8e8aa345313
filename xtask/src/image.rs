//! `cargo xtask image`: builds deploy/docker/Dockerfile from source into `llmscope:dev` with
//! Debian's docker.io (starting dockerd when none runs). When the registry's base images
//! cannot be pulled (no registry here), both bases are made locally, once, and cached by
//! their inputs: the runtime base is Debian bookworm (minbase, from the Debian mirror by
//! debootstrap); the builder adds gcc and this machine's nightly toolchain and bpf-linker.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::setup;

pub const TAG: &str = "llmscope:dev";
/// The Dockerfile's build stage of the last build: its cache, kept once.
const BUILD_STAGE_TAG: &str = "llmscope:dev-build";
/// The label the Dockerfile puts on both stages' images.
const STAGE_LABEL: &str = "io.llmscope.stage";
const DEFAULT_BUILDER: &str = "docker.io/library/rust:1-bookworm";
const DEFAULT_RUNTIME: &str = "gcr.io/distroless/cc-debian12";
const MIRROR: &str = "http://deb.debian.org/debian";
const SUITE: &str = "bookworm";
/// What the builder needs from Debian to link the agent (ring and the C fixtures use cc).
const BUILDER_PACKAGES: &str = "gcc,libc6-dev,ca-certificates,pkg-config";

pub fn build() -> Result<()> {
    setup::ensure_debian_packages(&[("dockerd", "docker.io"), ("debootstrap", "debootstrap")])?;
    ensure_daemon()?;
    let (builder, runtime) = if pulled(DEFAULT_BUILDER) && pulled(DEFAULT_RUNTIME) {
        (DEFAULT_BUILDER.to_owned(), DEFAULT_RUNTIME.to_owned())
    } else {
        println!("xtask: the registry's base images cannot be pulled: making them locally");
        (local_builder()?, local_runtime()?)
    };
    let root = setup::workspace_root();
    println!("xtask: building {TAG} (builder {builder}, runtime {runtime})");
    // The build stage is tagged too, so the next build of an unchanged tree reuses it, and
    // so the one it replaces becomes untagged: removed below with the previous image. Each
    // build stage holds a release target directory (over a gigabyte); left behind, they
    // filled the disk of the machine that runs the tests.
    for (target, tag) in [(Some("build"), BUILD_STAGE_TAG), (None, TAG)] {
        let mut build = Command::new("docker");
        build
            .current_dir(&root)
            // crates.io through the host's network; the build has no other.
            .args([
                "build",
                "--network",
                "host",
                "-f",
                "deploy/docker/Dockerfile",
            ])
            .args(["--build-arg", &format!("BUILDER_IMAGE={builder}")])
            .args(["--build-arg", &format!("RUNTIME_IMAGE={runtime}")])
            .args(["-t", tag]);
        if let Some(target) = target {
            build.args(["--target", target]);
        }
        setup::run(build.arg("."))?;
    }
    setup::run(Command::new("docker").args([
        "image",
        "prune",
        "--force",
        "--filter",
        &format!("label={STAGE_LABEL}"),
    ]))
}

fn docker_ok(args: &[&str]) -> bool {
    Command::new("docker")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Starts dockerd (no bridge, no iptables) when no daemon answers.
pub fn ensure_daemon() -> Result<()> {
    if docker_ok(&["info"]) {
        return Ok(());
    }
    println!("xtask: no Docker daemon answers: starting dockerd");
    let log = std::env::temp_dir().join("llmscope-dockerd.log");
    Command::new("dockerd")
        .args(["--iptables=false", "--bridge=none"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("starting dockerd")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !docker_ok(&["info"]) {
        if Instant::now() > deadline {
            bail!(
                "dockerd did not start:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// Present, or pulled within a short time.
fn pulled(image: &str) -> bool {
    if docker_ok(&["image", "inspect", image]) {
        return true;
    }
    Command::new("timeout")
        .args(["30", "docker", "pull", "-q", image])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn cache_dir() -> Result<PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    let dir = Path::new(&home).join(".cache/llmscope/image");
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn key(parts: &[&str]) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parts.hash(&mut h);
    format!("{:016x}", h.finish())
}

/// A Debian root file system from the mirror, kept as a directory in the cache.
fn debootstrap(name: &str, include: &str) -> Result<PathBuf> {
    let dir = cache_dir()?.join(format!("{name}-{}", key(&[SUITE, include])));
    if dir.join("etc/debian_version").exists() {
        return Ok(dir);
    }
    println!("xtask: making a Debian {SUITE} root file system ({name}) with debootstrap");
    let _ = std::fs::remove_dir_all(&dir);
    let mut cmd = Command::new("debootstrap");
    cmd.args(["--variant=minbase"]);
    if !include.is_empty() {
        cmd.arg(format!("--include={include}"));
    }
    setup::run(cmd.arg(SUITE).arg(&dir).arg(MIRROR))?;
    Ok(dir)
}

/// `docker import` of `root` (plus `extra` host paths at the same paths) as `tag`.
fn import(root: &Path, extra: &[(&Path, &[&str])], tag: &str, env: &[&str]) -> Result<()> {
    println!("xtask: importing {tag}");
    let mut tar = Command::new("tar");
    tar.arg("-c")
        .arg("--numeric-owner")
        .arg("-C")
        .arg(root)
        .arg(".");
    for (path, excludes) in extra {
        for e in *excludes {
            tar.arg(format!("--exclude={e}"));
        }
        tar.arg("-C")
            .arg("/")
            .arg(path.strip_prefix("/").unwrap_or(path));
    }
    let mut tar = tar.stdout(Stdio::piped()).spawn().context("running tar")?;
    let mut import = Command::new("docker");
    import.arg("import");
    for e in env {
        import.args(["--change", &format!("ENV {e}")]);
    }
    let status = import
        .args(["-", tag])
        .stdin(tar.stdout.take().context("tar's output")?)
        .stdout(Stdio::null())
        .status()
        .context("running docker import")?;
    let tar_status = tar.wait()?;
    if !status.success() || !tar_status.success() {
        bail!("making {tag} failed (tar: {tar_status}, docker import: {status})");
    }
    Ok(())
}

fn local_runtime() -> Result<String> {
    let root = debootstrap("runtime", "")?;
    let tag = format!("llmscope-base/runtime:{SUITE}");
    if !docker_ok(&["image", "inspect", &tag]) {
        import(&root, &[], &tag, &[])?;
    }
    Ok(tag)
}

/// Debian with gcc, and this machine's nightly toolchain (documentation left out),
/// bpf-linker and CA trust store at the same paths, nightly as the default.
fn local_builder() -> Result<String> {
    let root = debootstrap("builder", BUILDER_PACKAGES)?;
    let home = PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?);
    let rustup = home.join(".rustup");
    let cargo_home = home.join(".cargo");
    let nightly = std::fs::read_dir(rustup.join("toolchains"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("nightly"))
        })
        .context(
            "no nightly toolchain here (rustup toolchain install nightly --component rust-src)",
        )?;
    crate::ebpf::build()?;
    let version = String::from_utf8_lossy(
        &Command::new(nightly.join("bin/rustc"))
            .arg("--version")
            .output()?
            .stdout,
    )
    .into_owned();
    // This machine's trust store: crates.io may be reached through a proxy it trusts.
    let ca_bundle = Path::new("/etc/ssl/certs/ca-certificates.crt");
    let ca = std::fs::read_to_string(ca_bundle).unwrap_or_default();
    let tag = format!(
        "llmscope-base/builder:{}",
        key(&[&version, BUILDER_PACKAGES, SUITE, &ca])
    );
    if docker_ok(&["image", "inspect", &tag]) {
        return Ok(tag);
    }
    std::fs::write(root.join("etc/ssl/certs/ca-certificates.crt"), &ca)?;
    // rustup reads its settings from the image: nightly is the default there.
    let settings = root.join(rustup.strip_prefix("/").unwrap_or(&rustup));
    std::fs::create_dir_all(&settings)?;
    std::fs::write(
        settings.join("settings.toml"),
        format!(
            "version = \"12\"\ndefault_toolchain = \"{}\"\nprofile = \"minimal\"\n",
            nightly.file_name().unwrap().to_string_lossy()
        ),
    )?;
    let path = format!(
        "PATH={}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        cargo_home.join("bin").display()
    );
    let home_env = format!("HOME={}", home.display());
    import(
        &root,
        &[
            (&nightly, &["share/doc", "share/man"]),
            (&cargo_home.join("bin"), &[]),
            (&cargo_home.join("llmscope-llvm"), &[]),
        ],
        &tag,
        &[&path, &home_env],
    )?;
    Ok(tag)
}
