//! A whole llmscope environment without a GPU, for the dashboards test and `cargo xtask
//! demo`: the agent with the CUDA and NVML test doubles, a vLLM-shaped process (GPU memory in
//! NVML, a gpu-info report), CUDA workloads (launching, holding memory, hitting OOM), a
//! stand-in inference server with vLLM's, SGLang's, TGI's, llama.cpp's and TensorRT-LLM's
//! metric names, an Ollama stand-in, and Debian's Prometheus scraping the agent and the server
//! every second with llmscope's rules.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::prometheus::{Killed, Prometheus};
use super::*;

pub struct Demo {
    pub agent: Agent,
    pub prometheus: Prometheus,
    pub server: SocketAddr,
    // Dropped in declaration order after the fields above: processes, then the work dir.
    _children: Vec<Killed>,
    _workloads: Vec<CudaWorkload>,
    _vllm: Proc,
    launching: Option<std::thread::JoinHandle<CudaWorkload>>,
    launching_pid: u32,
    work: PathBuf,
}

/// Grafana's variables and macros, as "everything" would expand them.
pub fn expand(expr: &str) -> String {
    expr.replace("$instance", ".*")
        .replace("$framework", ".*")
        .replace("$model_name", ".*")
        .replace("$pid", ".*")
        .replace("$__rate_interval", "1m")
        .replace("$__range", "5m")
}

/// Every query of a dashboard (`dashboards/<file>`): (panel title, expanded expression).
pub fn panel_queries(file: &str) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(root().join("dashboards").join(file)).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().into_iter().flatten() {
            queries.push((
                panel["title"].as_str().unwrap_or("").to_owned(),
                expand(t["expr"].as_str().unwrap_or("")),
            ));
        }
    }
    queries
}

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

impl Demo {
    /// Starts everything; returns once Prometheus has scraped both targets a dozen times.
    /// The launching workload runs for `launch_seconds`.
    pub fn start(prometheus_port: u16, launch_seconds: u32) -> Demo {
        Demo::start_with(prometheus_port, launch_seconds, "")
    }

    /// The same, with `extra` appended to Prometheus's configuration (e.g. `remote_write`).
    pub fn start_with(prometheus_port: u16, launch_seconds: u32, extra: &str) -> Demo {
        let work = std::env::temp_dir().join(format!("llmscope-demo-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&work);
        let reports = work.join("gpu-info");
        std::fs::create_dir_all(&reports).unwrap();

        let (vllm, _engine) = start_vllm("meta-llama/Llama-3.1-8B-Instruct", "spawn");
        let values = fake_h100_values(&work, vllm.pid());
        let lib = fake_nvml_library();
        // Every source active: classification rules too (one that excludes notebooks).
        let rules = work.join("rules.yaml");
        std::fs::write(
            &rules,
            "rules:\n  - {name: notebooks, match: {argv: 'jupyter-(lab|notebook)'}, ignore: true}\n",
        )
        .unwrap();
        let agent = Agent::start_with_env(
            &[
                "--classify.rules",
                rules.to_str().unwrap(),
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
            format!(r#"{{"pid": {}, "gpu_memory_allocated_bytes": 12884901888, "gpu_memory_reserved_bytes": 15032385536, "gpu_utilization": 58, "gpu_index": 0, "timestamp": {now}}}"#, vllm.pid()),
        )
        .unwrap();

        let cudart = fake_cuda_library("runtime");
        let cudart = cudart.to_str().unwrap();
        let seconds = launch_seconds.to_string();
        let mut busy = CudaWorkload::start(
            &cuda_workload("llama-server"),
            &["-m", "/models/qwen2.5-7b-instruct-q4_k_m.gguf"],
            &[
                ("CUDA_LIB", cudart),
                ("LAUNCH_RATE", "2000"),
                ("SECONDS", &seconds),
            ],
        );
        let mut oom = CudaWorkload::start(
            &cuda_workload("llama-server"),
            &["-m", "/models/too-big.gguf"],
            &[
                ("CUDA_LIB", cudart),
                ("ALLOCS", "2"),
                ("FAKE_CUDA_MALLOC_RC", "2"),
            ],
        );
        agent.wait_cuda_libraries(1.0);
        let mut holding = CudaWorkload::start(
            &cuda_workload("llama-server"),
            &["-m", "/models/holding.gguf"],
            &[
                ("CUDA_LIB", cudart),
                ("ALLOCS", "4"),
                ("ALLOC_SIZE", "4096"),
                ("COPY_BYTES", "1024"),
                ("SYNCS", "5"),
                ("FAKE_CUDA_SYNC_US", "1000"),
                ("GRAPHS", "3"),
                ("NO_FREE", "1"),
            ],
        );
        oom.run();
        holding.run();
        let launching_pid = busy.pid();
        let launching = std::thread::spawn(move || {
            busy.run();
            busy
        });

        let server_port = free_port();
        let server = Killed(
            Command::new("python3")
                .arg(root().join("agent/tests/fixtures/inference/stand_in_server.py"))
                .args([&server_port.to_string(), "meta-llama/Llama-3.1-8B-Instruct"])
                .spawn()
                .unwrap(),
        );
        // An Ollama server: llmscope reads its /api/ps, and follows its requests (it exports
        // no metrics of its own).
        let ollama_port = free_port();
        let ollama = Killed(
            Command::new(root().join("agent/tests/fixtures/ollama/ollama"))
                .arg("serve")
                .env("OLLAMA_HOST", format!("127.0.0.1:{ollama_port}"))
                .env("OLLAMA_TEST_MODELS", "llama3.2:1b:2019393189:2019393189")
                .spawn()
                .unwrap(),
        );
        keep_asking(ollama_port);
        let rules = root().join("deploy/prometheus/rules");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\n  - {}\nscrape_configs:\n  - job_name: llmscope\n    static_configs:\n      - targets: [\"{}\"]\n  - job_name: inference\n    static_configs:\n      - targets: [\"127.0.0.1:{server_port}\"]\n{extra}",
            rules.join("llmscope-recording.yml").display(),
            rules.join("llmscope-alerts.yml").display(),
            agent.addr
        );
        let demo = Demo {
            agent,
            prometheus: Prometheus::start_on(prometheus_port, &config),
            server: format!("127.0.0.1:{server_port}").parse().unwrap(),
            _children: vec![server, ollama],
            _workloads: vec![oom, holding],
            _vllm: vllm,
            launching: Some(launching),
            launching_pid,
            work,
        };
        // A dozen scrapes of both targets: enough for every rate() window.
        let scraped = wait_for(Duration::from_secs(60), || {
            let r = demo.query("min(count_over_time(up[1m]))")?;
            let n: f64 = r["data"]["result"][0]["value"][1].as_str()?.parse().ok()?;
            let both = demo.query("count(up == 1)")?["data"]["result"][0]["value"][1] == "2";
            (n >= 12.0 && both).then_some(())
        });
        assert!(
            scraped.is_some(),
            "Prometheus did not scrape both targets:\n{}",
            demo.agent.log()
        );
        demo
    }

    /// Evaluates `expr` now; None while Prometheus does not answer.
    pub fn query(&self, expr: &str) -> Option<serde_json::Value> {
        self.prometheus.query(expr)
    }
}

/// Asks the Ollama stand-in for a short streamed generation every 200 ms, until it is gone.
fn keep_asking(port: u16) {
    let mut answered = std::time::Instant::now();
    std::thread::spawn(move || loop {
        // Not up yet, or gone: try again, and stop once it has not answered for 10 s.
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
            if answered.elapsed() > Duration::from_secs(10) {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
            continue;
        };
        answered = std::time::Instant::now();
        let body = r#"{"model": "llama3.2:1b", "prompt": "hi", "options": {"num_predict": 3}}"#;
        let sent = write!(
            s,
            "POST /api/generate HTTP/1.1\r\nHost: ollama\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let mut out = Vec::new();
        if sent.is_err() || s.read_to_end(&mut out).is_err() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    });
}

impl Drop for Demo {
    fn drop(&mut self) {
        if let Some(l) = self.launching.take() {
            if !l.is_finished() {
                // SAFETY: signalling a process this environment started.
                unsafe { libc::kill(self.launching_pid as i32, libc::SIGKILL) };
            }
            drop(l.join());
        }
        let _ = std::fs::remove_dir_all(&self.work);
    }
}
