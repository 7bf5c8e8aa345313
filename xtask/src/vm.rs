//! `cargo xtask vmtest [KERNEL…]`: the privileged eBPF integration tests inside other
//! kernels than this machine's — Debian's packaged cloud kernels, resolved through their
//! metapackages so the versions never go stale — booted under QEMU. The guest runs this
//! machine's own root file system, read-only over virtiofs with a tmpfs overlay (it can write
//! nothing back), so the test binaries, their fixtures and the agent run unchanged; each test
//! prints its result on the serial console, read back here.
//!
//! TCG only (KVM does not work on the development machine; it is used where /dev/kvm works):
//! user code runs several times slower, so the guests run the tests that exercise the kernel
//! side, not the whole suite (see [`CHECKS`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::setup::{ensure_debian_packages, run, workspace_root};

/// A kernel of the matrix: its short name and the Debian metapackage that names its newest
/// build.
pub struct Kernel {
    pub name: &'static str,
    metapackage: &'static str,
    /// The library hook `--library-hook auto` must pick there.
    hook: &'static str,
}

pub const KERNELS: &[Kernel] = &[
    Kernel {
        name: "6.1",
        metapackage: "linux-image-cloud-amd64",
        hook: "fentry",
    },
    Kernel {
        name: "6.12",
        metapackage: "linux-image-6.12-cloud-amd64",
        hook: "fentry",
    },
];

/// One check: a test of a test binary, with the library hook forced through
/// `LLMSCOPE_LIBRARY_HOOK` (or `auto`), or the request hook through `LLMSCOPE_REQUESTS_HOOK`.
struct Check {
    binary: &'static str,
    test: &'static str,
    variable: &'static str,
    hook: &'static str,
}

const fn library(binary: &'static str, test: &'static str, hook: &'static str) -> Check {
    Check {
        binary,
        test,
        variable: "LLMSCOPE_LIBRARY_HOOK",
        hook,
    }
}

const fn requests(test: &'static str, hook: &'static str) -> Check {
    Check {
        binary: "requests",
        test,
        variable: "LLMSCOPE_REQUESTS_HOOK",
        hook,
    }
}

/// The checks each guest runs. The kernel-side paths: exec and exit detection with
/// lineage, a leader thread that exits first, pid reuse, the forced-hook check, and the CUDA
/// uprobes' exact counts on NVIDIA's real libcudart and a reused pid's counters; the
/// library-mapping checks (a script classified when it maps a framework library, an
/// unclassified CUDA user probed when it maps its own library copy) through each hook in
/// turn; request telemetry's kernel hooks (fentry, kprobe) on a server that makes its own
/// system calls, as Go's runtime does, with exact token counts. Left to the host run: lost
/// events (under TCG an exec storm is too slow to fill even a one-page ring: 3,006 execs,
/// 0 lost, 230 s on 6.12), containers, servers, the libc request probes and their timing
/// checks against llama-server, NVML, the soak, dashboards, the web configuration.
const CHECKS: &[Check] = &[
    library(
        "exec_detection",
        "exec_detection_lineage_secrets_and_grace_period",
        "auto",
    ),
    library(
        "exec_detection",
        "a_process_outlives_its_leader_thread",
        "auto",
    ),
    library(
        "exec_detection",
        "a_reused_pid_never_inherits_old_series",
        "auto",
    ),
    library(
        "exec_detection",
        "a_forced_library_hook_is_used_or_refused_by_name",
        "auto",
    ),
    library("cuda", "exact_counts_for_runtime_and_driver", "auto"),
    library("cuda", "a_reused_pid_inherits_no_cuda_counters", "auto"),
    library(
        "exec_detection",
        "a_script_is_classified_when_it_maps_a_framework_library",
        "fentry",
    ),
    library(
        "exec_detection",
        "a_script_is_classified_when_it_maps_a_framework_library",
        "kprobe",
    ),
    library(
        "exec_detection",
        "a_script_is_classified_when_it_maps_a_framework_library",
        "perf",
    ),
    library(
        "cuda",
        "unclassified_process_with_its_own_library_copy_is_probed_when_it_maps_it",
        "fentry",
    ),
    library(
        "cuda",
        "unclassified_process_with_its_own_library_copy_is_probed_when_it_maps_it",
        "kprobe",
    ),
    library(
        "cuda",
        "unclassified_process_with_its_own_library_copy_is_probed_when_it_maps_it",
        "perf",
    ),
    requests(
        "a_go_server_is_followed_by_the_kernel_hooks_and_refused_by_the_libc_probes",
        "fentry",
    ),
    requests(
        "a_go_server_is_followed_by_the_kernel_hooks_and_refused_by_the_libc_probes",
        "kprobe",
    ),
];

/// A check's name in the report: the test, and the hook when one is forced.
fn check_name(test: &str, hook: &str) -> String {
    if hook == "auto" {
        test.to_owned()
    } else {
        format!("{test}@{hook}")
    }
}

/// One guest's whole run may take this long (boot, every check, power-off).
const GUEST_TIMEOUT: Duration = Duration::from_secs(900);
/// One check may take this long inside a guest.
const CHECK_TIMEOUT_SECONDS: u64 = 240;

/// What a guest reported.
pub struct Report {
    pub kernel: String,
    /// The running kernel's release, as the guest said.
    pub release: String,
    /// `llmscope_library_hook` of an agent started there, and the one expected.
    pub hook: String,
    expected_hook: &'static str,
    /// Each check: passed, and how long it took.
    pub checks: BTreeMap<String, (bool, u64)>,
    pub took: Duration,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.hook == self.expected_hook
            && self.checks.len() == CHECKS.len()
            && self.checks.values().all(|(ok, _)| *ok)
    }
}

/// Runs the checks in every kernel named (all when none is), with `env` set for the tests.
pub fn run_matrix(names: &[String], env: &[(&str, &std::ffi::OsStr)]) -> Result<Vec<Report>> {
    let kernels: Vec<&Kernel> = if names.is_empty() {
        KERNELS.iter().collect()
    } else {
        names
            .iter()
            .map(|n| {
                KERNELS.iter().find(|k| k.name == n).with_context(|| {
                    let known: Vec<&str> = KERNELS.iter().map(|k| k.name).collect();
                    format!("no kernel {n:?} in the matrix; it has {}", known.join(", "))
                })
            })
            .collect::<Result<_>>()?
    };
    ensure_debian_packages(&[
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("xz", "xz-utils"),
        ("dpkg-deb", "dpkg"),
        ("curl", "curl"),
    ])?;
    ensure_static_busybox()?;
    let binaries = test_binaries()?;
    let mut reports = Vec::new();
    for kernel in kernels {
        let files = fetch(kernel)?;
        println!(
            "xtask: vmtest: booting {} ({}) under QEMU",
            kernel.name, files.package
        );
        let report = boot(kernel, &files, &binaries, env)?;
        print_report(&report);
        reports.push(report);
    }
    Ok(reports)
}

fn print_report(r: &Report) {
    println!(
        "xtask: vmtest: {} ({}): library hook {} (auto must pick {}), {} s",
        r.kernel,
        r.release,
        r.hook,
        r.expected_hook,
        r.took.as_secs()
    );
    for Check { test, hook, .. } in CHECKS {
        let name = check_name(test, hook);
        let line = match r.checks.get(&name) {
            Some((true, s)) => format!("ok ({s} s)"),
            Some((false, _)) => "FAILED".to_owned(),
            None => "not run".to_owned(),
        };
        println!("  {name:<72} {line}");
    }
}

/// The matrix as a Markdown table: kernel × check.
pub fn table(host: &str, reports: &[Report]) -> String {
    let mut out = format!("| check | {host} (host) |");
    for r in reports {
        out.push_str(&format!(" {} |", r.release));
    }
    out.push_str("\n| --- | --- |");
    out.push_str(&" --- |".repeat(reports.len()));
    out.push_str("\n| library hook (`auto`) | perf_mmap |");
    for r in reports {
        out.push_str(&format!(" {} |", r.hook));
    }
    for Check { test, hook, .. } in CHECKS {
        let name = check_name(test, hook);
        // The host's auto library hook is perf records, its request hook libc; it has no
        // trampolines nor kprobes (the forced-hook check shows both refused by name).
        let host = match *hook {
            "auto" | "perf" => "passed",
            _ => "refused: not in this kernel",
        };
        out.push_str(&format!("\n| `{name}` | {host} |"));
        for r in reports {
            let cell = match r.checks.get(&name) {
                Some((true, _)) => "passed",
                Some((false, _)) => "**failed**",
                None => "not run",
            };
            out.push_str(&format!(" {cell} |"));
        }
    }
    out.push('\n');
    out
}

const BEGIN: &str =
    "<!-- kernels:begin (written by `LLMSCOPE_BLESS=1 cargo xtask vmtest` from its run) -->";
const END: &str = "<!-- kernels:end -->";

/// Writes the matrix of a run of every kernel into the README's requirements.
pub fn bless_readme(table: &str) -> Result<()> {
    let path = workspace_root().join("README.md");
    let readme = std::fs::read_to_string(&path)?;
    let (head, rest) = readme
        .split_once(BEGIN)
        .context("README.md has no kernels:begin marker")?;
    let (_, tail) = rest
        .split_once(END)
        .context("README.md has no kernels:end marker")?;
    std::fs::write(&path, format!("{head}{BEGIN}\n{table}{END}{tail}"))?;
    println!("xtask: vmtest: README.md's kernel matrix rewritten");
    Ok(())
}

/// busybox for the initramfs must be the static one (it runs before any library exists).
fn ensure_static_busybox() -> Result<()> {
    let installed = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", "busybox-static"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"));
    if !installed {
        println!("xtask: installing busybox-static (the VM tests' initramfs)");
        run(Command::new("apt-get")
            .args([
                "install",
                "-y",
                "-q",
                "--no-install-recommends",
                "busybox-static",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    Ok(())
}

/// The test binaries the checks run, by name, as `cargo xtask test` built them.
fn test_binaries() -> Result<BTreeMap<String, PathBuf>> {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root()).args([
        "test",
        "--no-run",
        "--message-format=json",
        "--package",
        "llmscope-agent",
        "--features",
        "test-faults",
    ]);
    let mut names: Vec<&str> = CHECKS.iter().map(|c| c.binary).collect();
    names.sort_unstable();
    names.dedup();
    for name in &names {
        cmd.args(["--test", name]);
    }
    let out = cmd.stderr(Stdio::inherit()).output()?;
    if !out.status.success() {
        bail!("building the test binaries failed");
    }
    let mut found = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let (Some(name), Some(executable)) = (
            json_field(line, "\"target\":{", "\"name\":\""),
            json_field(line, "", "\"executable\":\""),
        ) else {
            continue;
        };
        if names.contains(&name.as_str()) {
            found.insert(name, PathBuf::from(executable));
        }
    }
    for name in names {
        if !found.contains_key(name) {
            bail!("cargo built no test binary {name}");
        }
    }
    Ok(found)
}

/// The string value of `key` (given with its opening quote) after `after` in a line of
/// cargo's JSON messages; None where there is none (or it is escaped: not a path cargo gives).
fn json_field(line: &str, after: &str, key: &str) -> Option<String> {
    let rest = &line[line.find(after)? + after.len()..];
    let value = &rest[rest.find(key)? + key.len()..];
    let end = value.find('"')?;
    let value = &value[..end];
    (!value.contains('\\')).then(|| value.to_owned())
}

/// A kernel's files, extracted from its package.
struct KernelFiles {
    package: String,
    vmlinuz: PathBuf,
    modules: PathBuf,
}

/// The newest build the metapackage names, downloaded and extracted once into
/// ~/.cache/llmscope/kernels (keyed by the package file's name, which carries its version).
fn fetch(kernel: &Kernel) -> Result<KernelFiles> {
    let package = dependency(kernel.metapackage).or_else(|_| {
        run(Command::new("apt-get").args(["update", "-q"]))?;
        dependency(kernel.metapackage)
    })?;
    let uri = Command::new("apt-get")
        .args(["download", "--print-uris", &package])
        .output()?;
    let uri = String::from_utf8_lossy(&uri.stdout);
    let file = uri
        .split_whitespace()
        .nth(1)
        .with_context(|| format!("apt-get download --print-uris {package}: no file name"))?
        .to_owned();
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    let dir = Path::new(&home).join(".cache/llmscope/kernels").join(&file);
    let marker = dir.join(".extracted");
    if !marker.exists() {
        println!(
            "xtask: vmtest: downloading {file} (Debian's {})",
            kernel.metapackage
        );
        std::fs::create_dir_all(&dir)?;
        run(Command::new("apt-get")
            .current_dir(&dir)
            .args(["download", &package]))?;
        let deb = dir.join(&file);
        run(Command::new("dpkg-deb")
            .arg("-x")
            .arg(&deb)
            .arg(dir.join("root")))?;
        std::fs::remove_file(&deb)?;
        std::fs::write(&marker, "")?;
    }
    let root = dir.join("root");
    let vmlinuz = std::fs::read_dir(root.join("boot"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .with_context(|| format!("{file}: no vmlinuz"))?;
    let modules = std::fs::read_dir(root.join("lib/modules"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .next()
        .with_context(|| format!("{file}: no modules"))?;
    Ok(KernelFiles {
        package,
        vmlinuz,
        modules,
    })
}

/// The package a metapackage depends on (its current kernel build).
fn dependency(metapackage: &str) -> Result<String> {
    let out = Command::new("apt-cache")
        .args(["depends", metapackage])
        .output()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends: "))
        .filter(|p| p.starts_with("linux-image-"))
        .map(str::to_owned)
        .with_context(|| format!("apt-cache knows no {metapackage}"))
}

/// The modules the guest needs before it can mount the host: virtio PCI, virtiofs and overlay
/// (built in on some kernels, modules on others).
const MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "fuse",
    "virtiofs",
    "overlay",
];

/// The guest's /init: mounts the host read-only with a tmpfs overlay, the kernel's file
/// systems, and runs /run.sh in it.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules/order); do insmod /modules/$m || echo "VMTEST-ERROR insmod $m"; done
mount -t virtiofs -o ro host /host || echo "VMTEST-ERROR mounting the host over virtiofs"
mount -t tmpfs tmpfs /scratch
mkdir -p /scratch/upper /scratch/work
mount -t overlay overlay -o lowerdir=/host,upperdir=/scratch/upper,workdir=/scratch/work /newroot
mount -t proc proc /newroot/proc
mount -t sysfs sys /newroot/sys
mount -t devtmpfs dev /newroot/dev
mount -t tracefs tracefs /newroot/sys/kernel/tracing
mount -t bpf bpf /newroot/sys/fs/bpf
mount -t tmpfs tmpfs /newroot/run
mkdir -p /newroot/dev/shm
mount -t tmpfs tmpfs /newroot/dev/shm
ip link set lo up
cp /run.sh /newroot/run/vmtest.sh
echo "VMTEST-RELEASE $(uname -r)"
chroot /newroot /bin/sh /run/vmtest.sh
echo "VMTEST-END $?"
poweroff -f
"#;

/// The script the guest runs: the agent's library hook, then every check.
fn guest_script(binaries: &BTreeMap<String, PathBuf>, env: &[(&str, &std::ffi::OsStr)]) -> String {
    let root = workspace_root();
    let mut s = format!(
        "cd {}\nexport HOME={} PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n",
        root.display(),
        std::env::var("HOME").unwrap_or_else(|_| "/root".into()),
    );
    for (key, value) in env {
        s.push_str(&format!("export {key}='{}'\n", value.to_string_lossy()));
    }
    let agent = root.join("target/debug/llmscope");
    s.push_str(&format!(
        r#"{agent} --web.listen-address 127.0.0.1:9199 --no-nvml > /run/agent.log 2>&1 &
agent=$!
hook=none
for i in $(seq 120); do
  found=$(curl -s http://127.0.0.1:9199/metrics | sed -n 's/^llmscope_library_hook{{hook="\([a-z_]*\)"}} 1.0$/\1/p')
  if [ -n "$found" ]; then hook=$found; break; fi
  sleep 0.5
done
kill $agent; wait $agent
echo "VMTEST-HOOK $hook"
"#,
        agent = agent.display()
    ));
    for Check {
        binary,
        test,
        variable,
        hook,
    } in CHECKS
    {
        let path = &binaries[*binary];
        let name = check_name(test, hook);
        s.push_str(&format!(
            r#"start=$(date +%s)
if {variable}={hook} timeout {CHECK_TIMEOUT_SECONDS} {path} --exact {test} --test-threads=1 > /run/check.log 2>&1; then
  echo "VMTEST-CHECK {name} ok $(( $(date +%s) - start ))"
else
  tail -n 150 /run/check.log
  echo "VMTEST-CHECK {name} failed $(( $(date +%s) - start ))"
fi
"#,
            path = path.display()
        ));
    }
    s
}

fn boot(
    kernel: &Kernel,
    files: &KernelFiles,
    binaries: &BTreeMap<String, PathBuf>,
    env: &[(&str, &std::ffi::OsStr)],
) -> Result<Report> {
    let work = workspace_root().join("target/vmtest").join(kernel.name);
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let initrd = work.join("initrd.cpio");
    write_initramfs(&initrd, &files.modules, &guest_script(binaries, env))?;
    let socket = work.join("virtiofsd.sock");
    let export = work.join("export");
    std::fs::create_dir_all(&export)?;
    let mut virtiofsd = virtiofsd(&export, &socket)?;
    let started = Instant::now();
    let console = work.join("console.log");
    let accel = if kvm_works() {
        "kvm"
    } else {
        "tcg,thread=multi"
    };
    let qemu = Command::new("qemu-system-x86_64")
        .args(["-accel", accel, "-cpu", "max", "-smp", "2", "-m", "2G"])
        .arg("-kernel")
        .arg(&files.vmlinuz)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .args(["-display", "none", "-monitor", "none", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-chardev")
        .arg(format!("socket,id=host,path={}", socket.display()))
        .args([
            "-device",
            "vhost-user-fs-pci,queue-size=1024,chardev=host,tag=host",
        ])
        .args(["-object", "memory-backend-memfd,id=mem,size=2G,share=on"])
        .args(["-numa", "node,memdev=mem"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let finished = wait_or_kill(qemu, GUEST_TIMEOUT);
    let _ = virtiofsd.kill();
    let _ = virtiofsd.wait();
    let console_text = std::fs::read_to_string(&console).unwrap_or_default();
    if !finished {
        eprintln!("{console_text}");
        bail!(
            "the {} guest did not finish within {GUEST_TIMEOUT:?} (console: {})",
            kernel.name,
            console.display()
        );
    }
    let report = parse_console(kernel, &console_text, started.elapsed());
    if !report.passed() {
        eprintln!("{console_text}");
    }
    Ok(report)
}

/// Whether KVM can run a guest here (on the development machine /dev/kvm exists but the CPU
/// has no virtualisation extensions).
fn kvm_works() -> bool {
    std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| c.contains(" vmx") || c.contains(" svm"))
        && Path::new("/dev/kvm").exists()
}

/// virtiofsd serving this machine's root read-only: from a private mount namespace, a
/// non-recursive read-only bind of `/` at `export`, so that the guest can write nothing back.
fn virtiofsd(export: &Path, socket: &Path) -> Result<std::process::Child> {
    let daemon = "/usr/lib/qemu/virtiofsd";
    if !Path::new(daemon).exists() {
        bail!("{daemon} is missing (QEMU 7.2's virtiofsd, package qemu-system-x86)");
    }
    let script = format!(
        "mount --bind / {e} && mount -o remount,bind,ro {e} && exec {daemon} --socket-path={s} -o source={e} -o cache=always -o sandbox=chroot",
        e = export.display(),
        s = socket.display()
    );
    let child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting virtiofsd")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if Instant::now() > deadline {
            bail!("virtiofsd made no socket at {}", socket.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(child)
}

/// Whether the process finished within `limit` (it is killed if not).
fn wait_or_kill(mut child: std::process::Child, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn parse_console(kernel: &Kernel, console: &str, took: Duration) -> Report {
    let mut report = Report {
        kernel: kernel.name.to_owned(),
        expected_hook: kernel.hook,
        release: String::new(),
        hook: "unknown".to_owned(),
        checks: BTreeMap::new(),
        took,
    };
    for line in console.lines() {
        // The console may put terminal escapes before a line.
        let Some(at) = line.find("VMTEST-") else {
            continue;
        };
        let mut words = line[at..].split_whitespace();
        match words.next() {
            Some("VMTEST-RELEASE") => report.release = words.next().unwrap_or("").to_owned(),
            Some("VMTEST-HOOK") => report.hook = words.next().unwrap_or("").to_owned(),
            Some("VMTEST-CHECK") => {
                if let (Some(name), Some(result), Some(seconds)) =
                    (words.next(), words.next(), words.next())
                {
                    report.checks.insert(
                        name.to_owned(),
                        (result == "ok", seconds.parse().unwrap_or(0)),
                    );
                }
            }
            _ => {}
        }
    }
    report
}

/// The initramfs, an uncompressed newc cpio archive: static busybox, /init, the script, and
/// the modules the kernel has as modules (decompressed: busybox's insmod reads no .xz), in
/// dependency order.
fn write_initramfs(path: &Path, modules: &Path, script: &str) -> Result<()> {
    let mut cpio = Cpio::default();
    for dir in [
        "bin", "modules", "proc", "sys", "dev", "host", "scratch", "newroot",
    ] {
        cpio.dir(dir);
    }
    cpio.file("bin/busybox", 0o755, &std::fs::read("/bin/busybox")?);
    cpio.file("init", 0o755, INIT.as_bytes());
    cpio.file("run.sh", 0o644, script.as_bytes());
    let mut order = String::new();
    for name in MODULES {
        let Some(file) = find_module(modules, name) else {
            continue;
        };
        let bytes = if file.extension().is_some_and(|e| e == "xz") {
            let out = Command::new("xz").arg("-dc").arg(&file).output()?;
            if !out.status.success() {
                bail!("decompressing {}", file.display());
            }
            out.stdout
        } else {
            std::fs::read(&file)?
        };
        cpio.file(&format!("modules/{name}.ko"), 0o644, &bytes);
        order.push_str(&format!("{name}.ko\n"));
    }
    cpio.file("modules/order", 0o644, order.as_bytes());
    std::fs::write(path, cpio.finish())?;
    Ok(())
}

/// `<name>.ko` or `<name>.ko.xz` anywhere under the kernel's module tree.
fn find_module(dir: &Path, name: &str) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.filter_map(Result::ok) {
        let path = entry.path();
        if path.is_dir() {
            if let Some(found) = find_module(&path, name) {
                return Some(found);
            }
        } else if path.file_name().is_some_and(|f| {
            f == format!("{name}.ko").as_str() || f == format!("{name}.ko.xz").as_str()
        }) {
            return Some(path);
        }
    }
    None
}

/// A newc ("070701") cpio archive, as the kernel unpacks an initramfs.
#[derive(Default)]
struct Cpio {
    out: Vec<u8>,
    inode: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.inode += 1;
        let fields = [
            self.inode,
            mode,
            0,
            0,
            1,
            0,
            u32::try_from(data.len()).expect("an initramfs file under 4 GiB"),
            0,
            0,
            0,
            0,
            u32::try_from(name.len() + 1).expect("a short name"),
            0,
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, &[]);
    }

    fn file(&mut self, name: &str, permissions: u32, data: &[u8]) {
        self.entry(name, 0o100_000 | permissions, data);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.out
    }
}
