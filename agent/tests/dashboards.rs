//! Every dashboard panel works the first time: a real Prometheus (Debian's) scrapes the agent
//! — fed by the CUDA and NVML test doubles, a vLLM-shaped process with a gpu-info report, and
//! CUDA workloads — and a stand-in inference server with vLLM's, SGLang's, TGI's and
//! llama.cpp's metric names; then every panel query must return data, and every alert and
//! recording rule must load and evaluate without error.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::*;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Evaluates `expr` now; None while Prometheus does not answer.
fn query(prometheus: std::net::SocketAddr, expr: &str) -> Option<serde_json::Value> {
    let (_, _, body) = http_get(
        prometheus,
        &format!("/api/v1/query?query={}", percent_encode(expr)),
        None,
    )
    .ok()?;
    serde_json::from_str(&body).ok()
}

/// Grafana's variables and macros, as "everything" would expand them.
fn expand(expr: &str) -> String {
    expr.replace("$instance", ".*")
        .replace("$framework", ".*")
        .replace("$model_name", ".*")
        .replace("$pid", ".*")
        .replace("$__rate_interval", "1m")
        .replace("$__range", "5m")
}

#[test]
fn the_dashboards_are_what_the_generator_makes() {
    let out = Command::new("python3")
        .arg(root().join("dashboards/generate.py"))
        .arg("--check")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn every_panel_query_returns_data_and_every_rule_evaluates() {
    let work = std::env::temp_dir().join(format!("llmscope-dashboards-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let reports = work.join("gpu-info");
    std::fs::create_dir_all(&reports).unwrap();

    // The vLLM-shaped process, holding GPU memory (NVML) and reporting its own (gpu-info).
    let (vllm, _engine) = start_vllm("meta-llama/Llama-3.1-8B-Instruct", "spawn");
    let values = work.join("nvml-values");
    std::fs::write(
        &values,
        format!(
            "gpu name=NVIDIA_H100_80GB_HBM3 uuid=GPU-0 total=85899345920 used=21474836480 util=63 mem_util=31 temp=66 power_mw=412000 extended=1\n\
             proc gpu=0 pid={} used=17179869184 sm=58 mem=22\n",
            vllm.pid()
        ),
    )
    .unwrap();
    let lib = fake_nvml_library();
    let agent = Agent::start_with_env(
        &[
            "--nvml-lib",
            lib.to_str().unwrap(),
            "--nvml-interval",
            "500ms",
            "--cuda-overhead-budget",
            "100",
            "--gpu-info-dir",
            reports.to_str().unwrap(),
            "--rescan-interval",
            "1h",
        ],
        &[("LLMSCOPE_FAKE_NVML", values.to_str().unwrap())],
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    std::fs::write(
        reports.join(format!("gpu-info-{}.json", vllm.pid())),
        format!(r#"{{"pid": {}, "gpu_memory_allocated_bytes": 12884901888, "gpu_memory_reserved_bytes": 15032385536, "gpu_utilization": 58, "gpu_index": 0, "timestamp": {}}}"#, vllm.pid(), now),
    )
    .unwrap();

    // CUDA workloads: one that keeps launching, copying and holding memory, one that hits OOM.
    let cudart = fake_cuda_library("runtime");
    let cudart = cudart.to_str().unwrap();
    let mut busy = CudaWorkload::start(
        &cuda_workload("llama-server"),
        &["-m", "/models/dashboards.gguf"],
        &[
            ("CUDA_LIB", cudart),
            ("ALLOCS", "3"),
            ("ALLOC_SIZE", "1048576"),
            ("COPY_BYTES", "4096"),
            ("SYNCS", "50"),
            ("FAKE_CUDA_SYNC_US", "1000"),
            ("NO_FREE", "1"),
            ("LAUNCH_RATE", "2000"),
            ("SECONDS", "20"),
        ],
    );
    let mut oom = CudaWorkload::start(
        &cuda_workload("llama-server"),
        &["-m", "/models/oom.gguf"],
        &[
            ("CUDA_LIB", cudart),
            ("ALLOCS", "2"),
            ("FAKE_CUDA_MALLOC_RC", "2"),
        ],
    );
    agent.wait_cuda_libraries(1.0);
    oom.run();
    let launching = std::thread::spawn(move || {
        busy.run();
        busy
    });
    let allocating = CudaWorkload::start(
        &cuda_workload("llama-server"),
        &["-m", "/models/allocs.gguf"],
        &[
            ("CUDA_LIB", cudart),
            ("ALLOCS", "4"),
            ("ALLOC_SIZE", "4096"),
            ("COPY_BYTES", "1024"),
            ("SYNCS", "5"),
            ("NO_FREE", "1"),
        ],
    );
    let mut allocating = allocating;
    allocating.run();

    // The stand-in inference server and a real Prometheus scraping both every second.
    let server_port = free_port();
    let _server = Killed(
        Command::new("python3")
            .arg(root().join("agent/tests/fixtures/inference/stand_in_server.py"))
            .args([&server_port.to_string(), "meta-llama/Llama-3.1-8B-Instruct"])
            .spawn()
            .unwrap(),
    );
    let prom_port = free_port();
    let rules = root().join("deploy/prometheus/rules");
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\n  - {}\nscrape_configs:\n  - job_name: llmscope\n    static_configs:\n      - targets: [\"{}\"]\n  - job_name: inference\n    static_configs:\n      - targets: [\"127.0.0.1:{server_port}\"]\n",
        rules.join("llmscope-recording.yml").display(),
        rules.join("llmscope-alerts.yml").display(),
        agent.addr
    );
    std::fs::write(work.join("prometheus.yml"), config).unwrap();
    let _prometheus = Killed(
        Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                work.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                work.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting prometheus (cargo xtask test installs Debian's prometheus package)"),
    );
    let prometheus: std::net::SocketAddr = format!("127.0.0.1:{prom_port}").parse().unwrap();
    // A dozen scrapes of both targets: enough for every rate() window.
    let scraped = wait_for(Duration::from_secs(60), || {
        let r = query(prometheus, "min(count_over_time(up[1m]))")?;
        let n: f64 = r["data"]["result"][0]["value"][1].as_str()?.parse().ok()?;
        let both = query(prometheus, "count(up == 1)")?["data"]["result"][0]["value"][1] == "2";
        (n >= 12.0 && both).then_some(())
    });
    assert!(
        scraped.is_some(),
        "Prometheus did not scrape both targets:\n{}",
        agent.log()
    );

    let mut failures = Vec::new();
    let mut checked = 0;
    for file in [
        "overview.json",
        "processes.json",
        "cuda.json",
        "gpu-devices.json",
        "inference-servers.json",
    ] {
        let dashboard: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(root().join("dashboards").join(file)).unwrap(),
        )
        .unwrap();
        for panel in dashboard["panels"].as_array().unwrap() {
            assert!(
                panel["fieldConfig"]["defaults"]["unit"]
                    .as_str()
                    .is_some_and(|u| !u.is_empty()),
                "{file}: panel {} has no unit",
                panel["title"]
            );
            for target in panel["targets"].as_array().unwrap() {
                let expr = expand(target["expr"].as_str().unwrap());
                let r = query(prometheus, &expr).expect("Prometheus answers");
                checked += 1;
                let empty = r["data"]["result"].as_array().is_none_or(|a| a.is_empty());
                if r["status"] != "success" || empty {
                    failures.push(format!("{file} / {}: {expr}\n  → {r}", panel["title"]));
                }
            }
        }
    }
    assert!(checked >= 60, "only {checked} queries");
    assert!(
        failures.is_empty(),
        "{} of {checked} panel queries returned no data:\n{}",
        failures.len(),
        failures.join("\n")
    );

    // Every rule loaded and evaluated without error.
    let (_, _, body) = http_get(prometheus, "/api/v1/rules", None).unwrap();
    let rules: serde_json::Value = serde_json::from_str(&body).unwrap();
    let all: Vec<&serde_json::Value> = rules["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .collect();
    assert_eq!(all.len(), 23, "7 recording rules and 16 alerts:\n{body}");
    let bad: Vec<String> = all
        .iter()
        .filter(|r| r["health"] != "ok")
        .map(|r| format!("{} {}: {}", r["name"], r["health"], r["lastError"]))
        .collect();
    assert!(bad.is_empty(), "rules in error:\n{}", bad.join("\n"));
    let oom_alert = wait_for(Duration::from_secs(10), || {
        let (_, _, body) = http_get(prometheus, "/api/v1/alerts", None).ok()?;
        body.contains("CudaOutOfMemory").then_some(())
    });
    assert!(
        oom_alert.is_some(),
        "the forced OOM must fire CudaOutOfMemory"
    );

    drop(launching.join());
    drop(vllm);
    let _ = std::fs::remove_dir_all(&work);
}
