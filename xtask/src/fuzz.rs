//! `cargo xtask fuzz [TARGET] [--seconds N]`: the cargo-fuzz (libFuzzer) targets in fuzz/,
//! one per parser of input other users control, each run for a bounded time on the corpus
//! kept in fuzz/corpus (read, never written: what a run finds goes to target/fuzz/).
//! `cargo xtask test` runs every target briefly.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::setup::{have, run, workspace_root};

/// Every target (fuzz/fuzz_targets/<name>.rs), in the order they run.
pub const TARGETS: &[&str] = &[
    "gpu_info",
    "proc_cmdline_environ",
    "proc_maps",
    "proc_status_stat",
    "proc_cgroup",
    "proc_net",
    "elf_symbols",
    "oci_config",
    "docker_inspect",
    "probe_response",
    "http_exchanges",
    "ollama_ps",
    "classify",
    "classify_rules",
    "web_config",
];

/// Builds the targets and runs `only` (or all) for `seconds` each; fails on the first crash,
/// naming the input that caused it.
pub fn run_targets(only: Option<&str>, seconds: u64) -> Result<()> {
    let targets: Vec<&str> = match only {
        Some(t) if TARGETS.contains(&t) => vec![t],
        Some(t) => bail!("no fuzz target {t:?}; the targets: {}", TARGETS.join(", ")),
        None => TARGETS.to_vec(),
    };
    if !have("cargo-fuzz") {
        println!("xtask: installing cargo-fuzz (libFuzzer's cargo front end)");
        run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    crate::ebpf::build()?;
    let root = workspace_root();
    // No sanitizer: the parsers are safe Rust; libFuzzer's coverage and Rust's own checks
    // (debug assertions, overflow checks) find what there is, at several times the speed.
    run(crate::ebpf::nightly_cargo()?
        .current_dir(root.join("fuzz"))
        .args(["fuzz", "build", "--sanitizer", "none", "--debug-assertions"]))?;
    let mut report = Vec::new();
    for target in targets {
        let (runs, corpus) = fuzz_one(&root, target, seconds)?;
        report.push(format!(
            "{target:<22} {runs:>12} runs in {seconds} s, corpus {corpus}"
        ));
    }
    println!("xtask: fuzzing done, no crash:");
    for line in report {
        println!("  {line}");
    }
    Ok(())
}

/// (executions, corpus entries at the end) of one target's run.
fn fuzz_one(root: &Path, target: &str, seconds: u64) -> Result<(u64, u64)> {
    let binary = root
        .join("fuzz/target/x86_64-unknown-linux-gnu/release")
        .join(target);
    let work = root.join("target/fuzz/corpus").join(target);
    let artifacts = root.join("target/fuzz/artifacts").join(target);
    std::fs::create_dir_all(&work)?;
    std::fs::create_dir_all(&artifacts)?;
    println!("xtask: fuzzing {target} for {seconds} s");
    let out = Command::new(&binary)
        .arg(&work)
        .arg(root.join("fuzz/corpus").join(target))
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg("-print_final_stats=1")
        .arg("-timeout=10")
        .arg("-rss_limit_mb=2048")
        .output()
        .with_context(|| format!("running {}", binary.display()))?;
    let log = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "fuzz target {target} failed ({}); the input is in {}:\n{}",
            out.status,
            artifacts.display(),
            tail.join("\n")
        );
    }
    let stat = |name: &str| -> u64 {
        log.lines()
            .find_map(|l| {
                l.strip_prefix(name)?
                    .trim()
                    .strip_prefix(':')?
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or(0)
    };
    let corpus = std::fs::read_dir(&work).map_or(0, |d| d.count() as u64);
    Ok((stat("stat::number_of_executed_units"), corpus))
}
