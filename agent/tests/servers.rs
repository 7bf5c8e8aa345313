//! Inference servers' own metrics endpoints, discovered from their listening sockets and
//! published as Prometheus HTTP service discovery at /api/sd. Run as root (`cargo xtask test`).

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use support::*;

/// The /api/sd document.
fn sd(agent: &Agent) -> serde_json::Value {
    let (code, body) = agent.get("/api/sd").expect("GET /api/sd");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).expect("/api/sd is JSON")
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
    let target = wait_for(Duration::from_secs(60), || {
        sd(&agent)
            .as_array()?
            .iter()
            .find(|t| t["labels"]["framework"] == "llama.cpp")
            .cloned()
    })
    .unwrap_or_else(|| panic!("llama-server not in /api/sd:\n{}", agent.log()));
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
