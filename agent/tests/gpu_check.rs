//! `cargo xtask gpu-check`'s runner (xtask/gpu-check/gpu_check.py), run here against the test
//! doubles of libcudart, libcuda and NVML: the same scenario as on a GPU machine, so the
//! harness cannot rot between GPU runs. Run as root (`cargo xtask test`).

mod support;

use std::process::Command;

use support::demo::root;
use support::*;

#[test]
fn the_gpu_check_passes_against_the_test_doubles() {
    require_root();
    let out = std::env::temp_dir().join(format!("llmscope-gpu-check-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let path = |p: std::path::PathBuf| p.to_str().unwrap().to_owned();
    let run = Command::new("python3")
        .arg(root().join("xtask/gpu-check/gpu_check.py"))
        .args(["--agent", env!("CARGO_BIN_EXE_llmscope")])
        .args(["--out", &path(out.clone()), "--doubles"])
        .args(["--cudart", &path(fake_cuda_library("runtime"))])
        .args(["--cuda-driver", &path(fake_cuda_library("driver"))])
        .args(["--nvml-lib", &path(fake_nvml_library())])
        .args(["--rounds", "2", "--bench-seconds", "2"])
        .output()
        .expect("running python3");
    let report = std::fs::read_to_string(out.join("report.md")).unwrap_or_default();
    assert!(
        run.status.success(),
        "gpu-check failed:\n{}\n{}\n{report}\n{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr),
        std::fs::read_to_string(out.join("agent.log")).unwrap_or_default()
    );
    // Every check the issue names is in the report, with its outcome.
    for row in [
        "| kernel: BTF (/sys/kernel/btf/vmlinux) | present | True | PASS |",
        "| NVML: GPU 0 memory total | 81920 MiB (the NVML double's values) | 81920 MiB | PASS |",
        "| CUDA: live device memory of the holding workload (uprobes) | 8388608 | 8388608 | PASS |",
        "| CUDA (runtime): llm_process_cuda_kernel_launches_total | 1000 | 1000 | PASS |",
        "| CUDA (runtime): llm_process_cuda_alloc_bytes_total | 8388608 | 8388608 | PASS |",
        "| CUDA (runtime): llm_process_cuda_memcpy_bytes_total{direction=\"h2d\"} | 196608 | 196608 | PASS |",
        "| CUDA (runtime): llm_process_cuda_calls_total{function=\"cudaDeviceSynchronize\"} | 10 | 10 | PASS |",
        "| CUDA: live device memory after every free | 0 | 0 | PASS |",
        "| OOM: llm_process_cuda_oom_total | 1 | 1 | PASS |",
        "| PyTorch: allocations, launches, copies | — | — | SKIP |",
    ] {
        assert!(report.contains(row), "no row {row} in:\n{report}");
    }
    // The runtime double calls into the driver double, as libcudart does: the driver probes
    // see those calls, and no runtime total counts them twice.
    assert!(
        report.contains("cuMemAlloc_v2×8") && report.contains("runtime totals exact | PASS"),
        "{report}"
    );
    for measured in [
        "launch-bound loop (C workload, double: 100 µs a synchronisation)",
        "exec → visible in /api/processes | 20 processes seen | 20 seen",
        "agent: CPU and peak RSS",
    ] {
        assert!(
            report.contains(measured),
            "{measured} not measured:\n{report}"
        );
    }
    assert!(!report.contains("| FAIL |"), "{report}");
    let _ = std::fs::remove_dir_all(&out);
}
