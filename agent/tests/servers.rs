//! Inference servers' own metrics endpoints, discovered from their listening sockets and
//! published as Prometheus HTTP service discovery at /api/sd. Run as root (`cargo xtask test`).

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use support::demo::{panel_queries, root};
use support::prometheus::Prometheus;
use support::*;

/// The /api/sd document.
fn sd(agent: &Agent) -> serde_json::Value {
    let (code, body) = agent.get("/api/sd").expect("GET /api/sd");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).expect("/api/sd is JSON")
}

/// The vLLM-shaped stand-in, serving /metrics on `port`, with extra environment.
fn vllm_server(port: u16, model: &str, env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new("python3");
    cmd.args(["-m", "vllm.entrypoints.openai.api_server"])
        .args(["--model", model, "--port", &port.to_string()])
        .env("PYTHONPATH", fixtures())
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    cmd
}

#[test]
fn a_servers_metrics_endpoint_is_discovered_and_published() {
    let agent = Agent::start(&["--rescan-interval", "1h"]);
    assert_eq!(sd(&agent), serde_json::json!([]), "nothing to discover yet");
    let port = free_port();
    let mut server = Proc(
        Command::new("python3")
            .args(["-m", "vllm.entrypoints.openai.api_server"])
            .args([
                "--model",
                "Qwen/Qwen2.5-7B-Instruct",
                "--api-key",
                "sk-secret",
            ])
            .args(["--port", &port.to_string()])
            .env("PYTHONPATH", fixtures())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("starting python3"),
    );
    let pid = server.pid().to_string();
    let target = wait_for(Duration::from_secs(20), || {
        let doc = sd(&agent);
        let entry = doc.as_array()?.first()?.clone();
        Some(entry)
    })
    .unwrap_or_else(|| panic!("no target in /api/sd:\n{}", agent.log()));
    // The server listens on all addresses: Prometheus on this machine reaches it on loopback.
    assert_eq!(
        target["targets"],
        serde_json::json!([format!("127.0.0.1:{port}")]),
        "{target}"
    );
    let labels = &target["labels"];
    assert_eq!(labels["__metrics_path__"], "/metrics", "{target}");
    assert_eq!(labels["framework"], "vllm", "{target}");
    assert_eq!(labels["pid"], pid.as_str(), "{target}");
    assert_eq!(labels["model_name"], "Qwen/Qwen2.5-7B-Instruct", "{target}");
    assert!(!target.to_string().contains("sk-secret"), "{target}");
    // What it points at is the server's own metrics.
    let (code, _, body) = http_get(
        format!("127.0.0.1:{port}").parse().unwrap(),
        "/metrics",
        None,
    )
    .unwrap();
    assert_eq!(code, 200);
    assert!(body.contains("vllm:num_requests_running"), "{body}");
    let m = agent.metrics();
    assert_eq!(
        m.value(
            "llm_server_metrics_endpoint",
            &[("pid", &pid), ("state", "metrics")]
        ),
        Some(1.0),
        "{}",
        m.0
    );

    // Gone with the server.
    server.kill();
    let gone = wait_for(Duration::from_secs(10), || {
        (sd(&agent) == serde_json::json!([])).then_some(())
    });
    assert!(gone.is_some(), "{}", sd(&agent));
}

/// The real llama.cpp server and its tiny model (`cargo xtask test` builds them once).
fn llama_fixture() -> (std::path::PathBuf, std::path::PathBuf) {
    let var = |name: &str| {
        let path = std::path::PathBuf::from(std::env::var_os(name).unwrap_or_else(|| {
            panic!("{name} is not set: run the tests with `cargo xtask test`, which builds llama-server")
        }));
        assert!(
            path.is_file(),
            "{} is missing: run `cargo xtask test`",
            path.display()
        );
        path
    };
    (var("LLMSCOPE_LLAMA_SERVER"), var("LLMSCOPE_LLAMA_MODEL"))
}

/// POST a completion request: the server's counters then move.
fn complete(port: u16) -> String {
    use std::io::{Read, Write};
    let body = r#"{"prompt": "Hello", "n_predict": 4}"#;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "POST /completion HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn a_real_llama_server_is_discovered_and_one_without_metrics_is_shown_as_such() {
    let (binary, model) = llama_fixture();
    let agent = Agent::start(&["--rescan-interval", "1h"]);
    let start = |port: u16, metrics: bool| {
        let mut cmd = Command::new(&binary);
        cmd.arg("-m")
            .arg(&model)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["-c", "256", "-t", "1", "--no-webui"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if metrics {
            cmd.arg("--metrics");
        }
        Proc(cmd.spawn().expect("starting llama-server"))
    };
    let port = free_port();
    let server = start(port, true);
    // Listening and serving its metrics: from then on, it is in /api/sd within a second —
    // what the issue asks; a discovery pass runs every 500 ms, so the bound has twice that
    // in hand.
    let serving = wait_for(Duration::from_secs(60), || {
        let addr = format!("127.0.0.1:{port}").parse().unwrap();
        http_get(addr, "/metrics", None)
            .ok()
            .filter(|(code, _, _)| *code == 200)
    });
    assert!(serving.is_some(), "llama-server does not serve /metrics");
    let listening = std::time::Instant::now();
    let target = wait_for(Duration::from_secs(10), || {
        sd(&agent)
            .as_array()?
            .iter()
            .find(|t| t["labels"]["framework"] == "llama.cpp")
            .cloned()
    })
    .unwrap_or_else(|| panic!("llama-server not in /api/sd:\n{}", agent.log()));
    let latency = listening.elapsed();
    eprintln!("llama-server serving → in /api/sd: {latency:?}");
    assert!(
        latency < Duration::from_secs(1),
        "llama-server appeared in /api/sd {latency:?} after serving"
    );
    assert_eq!(
        target["targets"],
        serde_json::json!([format!("127.0.0.1:{port}")]),
        "{target}"
    );
    assert_eq!(target["labels"]["model_name"], "tiny-llama", "{target}");
    assert_eq!(target["labels"]["pid"], server.pid().to_string().as_str());
    // A real completion; the server's own counters count it.
    let answer = complete(port);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let (code, _, metrics) = http_get(
        format!("127.0.0.1:{port}").parse().unwrap(),
        "/metrics",
        None,
    )
    .unwrap();
    assert_eq!(code, 200);
    assert!(
        metrics.contains("llamacpp:tokens_predicted_total"),
        "{metrics}"
    );

    // Prometheus finds it through /api/sd, labelled with what llmscope knows (llama.cpp's
    // own metrics carry no labels at all), and every llama.cpp panel has data.
    let prometheus = Prometheus::start(&format!(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: inference-servers\n    http_sd_configs:\n      - url: http://{}/api/sd\n        refresh_interval: 1s\n",
        agent.addr
    ));
    let scraped = wait_for(Duration::from_secs(60), || {
        complete(port);
        let v = prometheus.vector(
            "count_over_time(llamacpp:tokens_predicted_total{framework=\"llama.cpp\",model_name=\"tiny-llama\"}[1m]) >= 8",
        )?;
        Some(v[0]["metric"].clone())
    })
    .unwrap_or_else(|| panic!("Prometheus did not scrape llama-server through /api/sd: {}", prometheus.api("/api/v1/targets")));
    assert_eq!(
        scraped["pid"],
        server.pid().to_string().as_str(),
        "{scraped}"
    );
    let llama: Vec<_> = panel_queries("inference-servers.json")
        .into_iter()
        .filter(|(title, _)| title.starts_with("llama.cpp"))
        .collect();
    assert!(llama.len() >= 4, "{llama:?}");
    for (title, expr) in &llama {
        assert!(
            prometheus.vector(expr).is_some(),
            "llama.cpp panel {title}: no data for {expr}: {:?}",
            prometheus.query(expr)
        );
    }

    // Started without --metrics: shown as such, and not a target.
    let bare_port = free_port();
    let bare = start(bare_port, false);
    let pid = bare.pid().to_string();
    let disabled = wait_for(Duration::from_secs(60), || {
        agent.metrics().value(
            "llm_server_metrics_endpoint",
            &[("pid", &pid), ("state", "disabled")],
        )
    });
    assert_eq!(disabled, Some(1.0), "{}", agent.metrics().0);
    let targets = sd(&agent);
    assert_eq!(targets.as_array().map(Vec::len), Some(1), "{targets}");
    drop(bare);
    drop(server);
}

#[test]
fn ollamas_loaded_models_are_exported() {
    let agent = Agent::start(&["--rescan-interval", "1h"]);
    let port = free_port();
    let server = Proc(
        Command::new(root().join("agent/tests/fixtures/ollama/ollama"))
            .arg("serve")
            .env("OLLAMA_HOST", format!("127.0.0.1:{port}"))
            .env(
                "OLLAMA_TEST_MODELS",
                "llama3.2:1b:2019393189:2019393189,qwen2.5:7b:5000000000:3000000000",
            )
            .stdout(Stdio::null())
            .spawn()
            .expect("starting the Ollama stand-in"),
    );
    let pid = server.pid().to_string();
    let vram = wait_for(Duration::from_secs(20), || {
        agent.metrics().value(
            "llm_ollama_model_vram_bytes",
            &[("pid", &pid), ("model_name", "qwen2.5:7b")],
        )
    });
    assert_eq!(vram, Some(3e9), "{}", agent.log());
    let m = agent.metrics();
    let size = m.find("llm_ollama_model_size_bytes", &[("pid", &pid)]);
    assert_eq!(size.len(), 2, "{}", m.0);
    assert!(size
        .iter()
        .all(|(l, _)| l["framework"] == "ollama" && !l.contains_key("container")));
    let expiry = m
        .value(
            "llm_ollama_model_expiry_timestamp_seconds",
            &[("pid", &pid), ("model_name", "llama3.2:1b")],
        )
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (expiry - now - 300.0).abs() < 30.0,
        "expiry {expiry}, now {now}"
    );
    assert_eq!(
        m.value(
            "llm_server_metrics_endpoint",
            &[("pid", &pid), ("state", "ollama_api")]
        ),
        Some(1.0),
        "{}",
        m.0
    );
    // Ollama has no Prometheus metrics: it is no scrape target.
    assert_eq!(sd(&agent), serde_json::json!([]));
    drop(server);
    let gone = wait_for(Duration::from_secs(10), || {
        agent
            .metrics()
            .find("llm_ollama_model_size_bytes", &[("pid", &pid)])
            .is_empty()
            .then_some(())
    });
    assert!(gone.is_some(), "{}", agent.metrics().0);
}

#[test]
fn hostile_endpoints_cost_a_bounded_time_and_memory_and_are_counted() {
    let agent = Agent::start(&["--rescan-interval", "1h"]);
    let before = rss_bytes(agent.pid());
    let hostile: Vec<Proc> = ["slow", "endless", "html"]
        .iter()
        .map(|mode| {
            Proc(
                vllm_server(
                    free_port(),
                    "hostile/model",
                    &[("LLMSCOPE_TEST_METRICS", mode)],
                )
                .spawn()
                .unwrap(),
            )
        })
        .collect();
    let counted = |kind: &str| {
        agent
            .metrics()
            .value("llmscope_server_probes_total", &[("kind", kind)])
            .unwrap_or(0.0)
    };
    let all_counted = wait_for(Duration::from_secs(30), || {
        ["timeout", "too_large", "wrong_content_type"]
            .iter()
            .all(|k| counted(k) >= 1.0)
            .then_some(())
    });
    assert!(all_counted.is_some(), "{}", agent.metrics().0);
    // Beside them, a good server is still found within a pass or two.
    let port = free_port();
    let good = Proc(vllm_server(port, "good/model", &[]).spawn().unwrap());
    let found = wait_for(Duration::from_secs(15), || {
        let doc = sd(&agent);
        let targets = doc.as_array()?;
        (targets.len() == 1 && targets[0]["labels"]["model_name"] == "good/model").then_some(())
    });
    assert!(found.is_some(), "{}", sd(&agent));
    let grown = rss_bytes(agent.pid()).saturating_sub(before);
    assert!(grown < 16 << 20, "the agent grew by {grown} bytes");
    drop(good);
    drop(hostile);
}

/// A network namespace joined to this one by a veth pair: 10.201.7.1 here, 10.201.7.2 there.
struct Netns(String);

impl Netns {
    fn new() -> Netns {
        let name = format!("llmscope-{}", std::process::id());
        let ip = |args: &str| {
            let ok = Command::new("ip")
                .args(args.split_whitespace())
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "ip {args}");
        };
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        ip(&format!("netns add {name}"));
        let ns = Netns(name.clone());
        ip("link add lsm-host type veth peer name lsm-pod");
        ip(&format!("link set lsm-pod netns {name}"));
        ip("addr add 10.201.7.1/30 dev lsm-host");
        ip("link set lsm-host up");
        ip(&format!(
            "netns exec {name} ip addr add 10.201.7.2/30 dev lsm-pod"
        ));
        ip(&format!("netns exec {name} ip link set lsm-pod up"));
        ip(&format!("netns exec {name} ip link set lo up"));
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the pair, and with it this one.
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        let _ = Command::new("ip")
            .args(["link", "del", "lsm-host"])
            .stderr(Stdio::null())
            .status();
    }
}

#[test]
fn a_server_in_another_network_namespace_is_found_at_its_address() {
    let netns = Netns::new();
    let agent = Agent::start(&["--rescan-interval", "1h"]);
    let port = free_port();
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &netns.0, "python3"])
        .args(["-m", "vllm.entrypoints.openai.api_server"])
        .args(["--model", "pod/model", "--port", &port.to_string()])
        .env("PYTHONPATH", fixtures())
        // Its socket exists for a few discovery passes before it listens: once seen without
        // a listening address, it is still found soon after it listens (it was only probed
        // again after 30 s).
        .env("LLMSCOPE_TEST_LISTEN_AFTER", "2")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let server = Proc(cmd.spawn().unwrap());
    let target = wait_for(Duration::from_secs(20), || {
        sd(&agent).as_array()?.first().cloned()
    })
    .unwrap_or_else(|| panic!("no target in /api/sd:\n{}", agent.log()));
    assert_eq!(
        target["targets"],
        serde_json::json!([format!("10.201.7.2:{port}")]),
        "{target}"
    );
    assert_eq!(target["labels"]["model_name"], "pod/model");
    assert_eq!(target["labels"]["pid"], server.pid().to_string().as_str());
    drop(server);
}
