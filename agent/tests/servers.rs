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
