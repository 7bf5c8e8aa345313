//! Privileged end-to-end tests of the NVML collector: the real agent loads a C test double of
//! libnvidia-ml (`--nvml-lib`) whose values come from a file these tests rewrite.

mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use support::*;

const WAIT: Duration = Duration::from_secs(15);
const GPU0: &str = "gpu name=NVIDIA_H100_80GB_HBM3 uuid=GPU-0000 total=85899345920 used=10737418240 util=40 mem_util=20 temp=61 power_mw=300000";
const GPU1: &str = "gpu name=NVIDIA_H100_80GB_HBM3 uuid=GPU-1111 total=85899345920 used=1073741824 util=5 mem_util=1 temp=45 power_mw=90000";

/// A values file for the double, rewritten atomically (the double reads it on every call).
struct Values(PathBuf);

impl Values {
    fn new(name: &str) -> Values {
        Values(std::env::temp_dir().join(format!("llmscope-nvml-{}-{name}", std::process::id())))
    }

    fn write(&self, lines: &[String]) {
        let tmp = self.0.with_extension("tmp");
        std::fs::write(&tmp, lines.join("\n") + "\n").unwrap();
        std::fs::rename(&tmp, &self.0).unwrap();
    }

    fn agent(&self, extra: &[&str]) -> Agent {
        self.agent_with(fake_nvml_library().to_str().unwrap(), extra)
    }

    fn agent_with(&self, nvml_lib: &str, extra: &[&str]) -> Agent {
        let mut args = vec![
            "--nvml-lib",
            nvml_lib,
            "--nvml-interval",
            "200ms",
            "--rescan-interval",
            "1h",
        ];
        args.extend_from_slice(extra);
        Agent::start_with_env(&args, &[("LLMSCOPE_FAKE_NVML", self.0.to_str().unwrap())])
    }
}

impl Drop for Values {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn wait_value(agent: &Agent, family: &str, want: &[(&str, &str)], expected: f64) {
    let got = wait_for(WAIT, || {
        (agent.metrics().value(family, want) == Some(expected)).then_some(())
    });
    assert!(
        got.is_some(),
        "{family}{want:?}: got {:?}, want {expected}\n{}",
        agent.metrics().value(family, want),
        agent.log()
    );
}

#[test]
fn two_gpus_with_processes_and_live_values() {
    let values = Values::new("two");
    let (vllm, _engine) = start_vllm("meta-llama/Llama-3.1-8B-Instruct", "spawn");
    let plain = spawn(&workload("render-frames"), &[]);
    let procs = |used: u64, sm: u32| {
        vec![
            GPU0.to_owned(),
            GPU1.to_owned(),
            format!("proc gpu=0 pid={} used={used} sm={sm} mem=12", vllm.pid()),
            format!("proc gpu=1 pid={} used=536870912 sm=3 mem=1", plain.pid()),
        ]
    };
    values.write(&procs(2147483648, 35));
    let agent = values.agent(&[]);

    wait_value(
        &agent,
        "nvidia_gpu_utilization",
        &[
            ("gpu", "0"),
            ("uuid", "GPU-0000"),
            ("name", "NVIDIA H100 80GB HBM3"),
        ],
        40.0,
    );
    wait_value(
        &agent,
        "nvidia_gpu_utilization",
        &[("gpu", "1"), ("uuid", "GPU-1111")],
        5.0,
    );
    wait_value(
        &agent,
        "nvidia_gpu_memory_total_bytes",
        &[("gpu", "1")],
        85899345920.0,
    );
    wait_value(&agent, "nvidia_gpu_temperature", &[("gpu", "0")], 61.0);
    wait_value(&agent, "nvidia_gpu_power_usage", &[("gpu", "0")], 300.0);
    let vllm_pid = vllm.pid().to_string();
    let plain_pid = plain.pid().to_string();
    let vllm_labels = [
        ("pid", vllm_pid.as_str()),
        ("gpu", "0"),
        ("framework", "vllm"),
        ("model_name", "meta-llama/Llama-3.1-8B-Instruct"),
    ];
    wait_value(
        &agent,
        "llm_process_gpu_memory_bytes",
        &vllm_labels,
        2147483648.0,
    );
    wait_value(&agent, "llm_process_gpu_utilization", &vllm_labels, 35.0);
    wait_value(
        &agent,
        "llm_process_gpu_memory_bytes",
        &[
            ("pid", plain_pid.as_str()),
            ("gpu", "1"),
            ("framework", "unknown"),
        ],
        536870912.0,
    );
    let m = agent.metrics();
    assert_eq!(
        m.value("llmscope_collector_success", &[("collector", "nvml")]),
        Some(1.0)
    );
    assert!(
        m.value("nvidia_gpu_power_limit", &[]).is_none(),
        "what the device does not support is left out, not 0"
    );
    assert!(m
        .value("llmscope_nvml_last_success_timestamp_seconds", &[])
        .is_some());

    // Rewrite the values while the agent runs: the next samples show them.
    values.write(&procs(4294967296, 77));
    wait_value(
        &agent,
        "llm_process_gpu_memory_bytes",
        &vllm_labels,
        4294967296.0,
    );
    wait_value(&agent, "llm_process_gpu_utilization", &vllm_labels, 77.0);
}

#[test]
fn no_driver_or_no_library_leaves_the_agent_working() {
    let values = Values::new("nodriver");
    values.write(&["init_error=9".to_owned(), GPU0.to_owned()]);
    for agent in [
        values.agent(&[]),
        values.agent_with("/nonexistent/libnvidia-ml.so.1", &[]),
    ] {
        let llama = spawn(&workload("llama-server"), &["-m", "/models/nodriver.gguf"]);
        let detected = wait_for(WAIT, || {
            agent.metrics().value(
                "llm_process_memory_bytes",
                &[("pid", &llama.pid().to_string())],
            )
        });
        assert!(
            detected.is_some(),
            "detection must work without NVML:\n{}",
            agent.log()
        );
        wait_value(
            &agent,
            "llmscope_collector_success",
            &[("collector", "nvml")],
            0.0,
        );
        std::thread::sleep(Duration::from_millis(1500));
        let m = agent.metrics();
        assert!(m.samples("nvidia_gpu_utilization").is_empty());
        let lines = agent
            .log()
            .lines()
            .filter(|l| l.contains("NVML unavailable"))
            .count();
        assert_eq!(
            lines,
            1,
            "one clear log line, not one per attempt or scrape:\n{}",
            agent.log()
        );
        assert_eq!(agent.get("/healthz").unwrap().0, 200);
    }
}

#[test]
fn a_hung_nvml_call_does_not_hang_scrapes() {
    let values = Values::new("hang");
    values.write(&[GPU0.to_owned()]);
    let agent = values.agent(&[]);
    wait_value(&agent, "nvidia_gpu_utilization", &[("gpu", "0")], 40.0);
    values.write(&[
        "hang_seconds=8".to_owned(),
        GPU0.replace("util=40", "util=99"),
    ]);
    // The sampler is now stuck inside NVML; scrapes answer from the last good sample.
    let mut slowest = Duration::ZERO;
    let stale = wait_for(WAIT, || {
        let started = Instant::now();
        let m = agent.metrics();
        slowest = slowest.max(started.elapsed());
        assert_eq!(
            m.value("nvidia_gpu_utilization", &[("gpu", "0")]),
            Some(40.0),
            "the last good value stays"
        );
        (m.value("llmscope_collector_success", &[("collector", "nvml")]) == Some(0.0)).then_some(())
    });
    assert!(
        stale.is_some(),
        "a stuck sampler must show as a failing collector:\n{}",
        agent.metrics().0
    );
    assert!(
        slowest < Duration::from_secs(2),
        "a scrape took {slowest:?} while NVML hung"
    );
    values.write(&[GPU0.to_owned()]);
}

#[test]
fn a_gpu_that_vanishes_loses_its_series() {
    let values = Values::new("vanish");
    values.write(&[GPU0.to_owned(), GPU1.to_owned()]);
    let agent = values.agent(&[]);
    wait_value(&agent, "nvidia_gpu_utilization", &[("gpu", "1")], 5.0);
    values.write(&[GPU0.to_owned()]);
    let gone = wait_for(WAIT, || {
        agent
            .metrics()
            .value("nvidia_gpu_utilization", &[("gpu", "1")])
            .is_none()
            .then_some(())
    });
    assert!(gone.is_some(), "a GPU no longer listed keeps its series");
    // A GPU that falls off the bus (GPU_IS_LOST) goes too, and comes back once it answers.
    values.write(&[GPU0.replace("temp=61", "temp=61 lost=1")]);
    let lost = wait_for(WAIT, || {
        agent
            .metrics()
            .value("nvidia_gpu_utilization", &[("gpu", "0")])
            .is_none()
            .then_some(())
    });
    assert!(
        lost.is_some(),
        "a lost GPU keeps its series:\n{}",
        agent.log()
    );
    values.write(&[GPU0.to_owned()]);
    wait_value(&agent, "nvidia_gpu_utilization", &[("gpu", "0")], 40.0);
    assert!(agent.log().contains("GPU lost"), "{}", agent.log());
}

/// gpu-info reports through the real agent: a valid report joins the vLLM process's
/// identity; a symlink named like a report is refused and counted.
#[test]
fn gpu_info_reports_join_the_process_identity() {
    let dir = std::env::temp_dir().join(format!("llmscope-gpu-info-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (vllm, engine) = start_vllm("Qwen/Qwen2.5-7B-Instruct", "spawn");
    let agent = Agent::start(&[
        "--gpu-info-dir",
        dir.to_str().unwrap(),
        "--rescan-interval",
        "1h",
    ]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let report = format!(
        r#"{{"version": 1, "pid": {}, "gpu_memory_allocated_bytes": 3221225472, "gpu_memory_reserved_bytes": 4294967296, "gpu_utilization": 55, "gpu_index": 0, "timestamp": {now}}}"#,
        vllm.pid()
    );
    let path = dir.join(format!("gpu-info-{}.json", vllm.pid()));
    std::fs::write(path.with_extension("tmp"), report).unwrap();
    std::fs::rename(path.with_extension("tmp"), &path).unwrap();
    std::os::unix::fs::symlink("/etc/shadow", dir.join(format!("gpu-info-{engine}.json"))).unwrap();

    let pid = vllm.pid().to_string();
    let want = [
        ("pid", pid.as_str()),
        ("gpu", "0"),
        ("framework", "vllm"),
        ("model_name", "Qwen/Qwen2.5-7B-Instruct"),
    ];
    wait_value(
        &agent,
        "llm_process_gpu_memory_allocated_bytes",
        &want,
        3221225472.0,
    );
    wait_value(
        &agent,
        "llm_process_gpu_memory_reserved_bytes",
        &want,
        4294967296.0,
    );
    wait_value(&agent, "llm_process_gpu_utilization", &want, 55.0);
    let m = agent.metrics();
    assert!(
        m.value("llmscope_gpu_info_rejected_total", &[("reason", "symlink")])
            .unwrap()
            >= 1.0
    );
    assert_eq!(m.value("llmscope_gpu_info_reports", &[]), Some(1.0));
    assert_eq!(
        m.value("llmscope_collector_success", &[("collector", "gpu_info")]),
        Some(1.0)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
