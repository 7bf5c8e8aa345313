//! Alerts that reach a person: Debian's Prometheus evaluates llmscope's alert rules and sends
//! to Debian's Alertmanager running the shipped configuration (deploy/alertmanager), which
//! delivers to a webhook receiver started here. A forced CUDA OOM in a vLLM-shaped process
//! fires CudaOutOfMemory; the payload names the model, framework, pid and node; a resolved
//! notification follows. Run as root (`cargo xtask test`).

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::demo::root;
use support::prometheus::{Killed, Prometheus};
use support::*;

const MODEL: &str = "Qwen/Qwen2.5-7B-Instruct";

/// The notifications a webhook received: (path, JSON body).
type Received = Arc<Mutex<Vec<(String, serde_json::Value)>>>;

/// Collects the JSON bodies POSTed to it, with their paths.
fn webhook_receiver() -> (u16, Received) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let received = Arc::new(Mutex::new(Vec::new()));
    let sink = received.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(stream);
            let mut request = String::new();
            if reader.read_line(&mut request).is_err() {
                continue;
            }
            let path = request.split_whitespace().nth(1).unwrap_or("").to_owned();
            let mut length = 0;
            loop {
                let mut header = String::new();
                if reader.read_line(&mut header).unwrap_or(0) == 0 || header.trim().is_empty() {
                    break;
                }
                if let Some((name, value)) = header.split_once(':') {
                    if name.eq_ignore_ascii_case("content-length") {
                        length = value.trim().parse().unwrap_or(0);
                    }
                }
            }
            let mut body = vec![0; length];
            if reader.read_exact(&mut body).is_ok() {
                if let Ok(json) = serde_json::from_slice(&body) {
                    sink.lock().unwrap().push((path, json));
                }
            }
            let _ = reader
                .get_mut()
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    (port, received)
}

#[test]
fn a_cuda_oom_reaches_a_webhook_through_alertmanager_and_then_resolves() {
    let (hook, received) = webhook_receiver();
    let work = std::env::temp_dir().join(format!("llmscope-alerts-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();

    // The shipped Alertmanager configuration: receivers pointed here, waits shortened.
    let shipped =
        std::fs::read_to_string(root().join("deploy/alertmanager/alertmanager.yml")).unwrap();
    let config = shipped
        .replace(
            "http://alert-receiver:5001",
            &format!("http://127.0.0.1:{hook}"),
        )
        .replace("group_wait: 30s", "group_wait: 1s")
        .replace("group_wait: 10s", "group_wait: 1s")
        .replace("group_interval: 5m", "group_interval: 1s");
    std::fs::write(work.join("alertmanager.yml"), &config).unwrap();
    let am_port = free_port();
    let _alertmanager = Killed(
        Command::new("prometheus-alertmanager")
            .arg(format!(
                "--config.file={}",
                work.join("alertmanager.yml").display()
            ))
            .arg(format!("--storage.path={}", work.join("am").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{am_port}"))
            .arg("--cluster.listen-address=")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(work.join("alertmanager.log")).unwrap())
            .spawn()
            .expect(
                "starting prometheus-alertmanager (cargo xtask test installs Debian's package)",
            ),
    );

    // The shipped alert rules, CudaOutOfMemory's 5-minute windows shortened to 15 s so that
    // the alert resolves within the test.
    let rules = std::fs::read_to_string(root().join("deploy/prometheus/rules/llmscope-alerts.yml"))
        .unwrap()
        .replace(
            "llm_process_cuda_oom_total[5m]",
            "llm_process_cuda_oom_total[15s]",
        )
        .replace(
            "llm_process_cuda_oom_total offset 5m",
            "llm_process_cuda_oom_total offset 15s",
        );
    std::fs::write(work.join("alerts.yml"), rules).unwrap();
    let agent = Agent::start(&["--rescan-interval", "1h"]);
    let prometheus = Prometheus::start(&format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\n  - {}\nalerting:\n  alertmanagers:\n    - static_configs:\n        - targets: [\"127.0.0.1:{am_port}\"]\nscrape_configs:\n  - job_name: llmscope\n    static_configs:\n      - targets: [\"{}\"]\n",
        work.join("alerts.yml").display(),
        root().join("deploy/prometheus/rules/llmscope-recording.yml").display(),
        agent.addr
    ));

    // A vLLM-shaped server whose first cudaMalloc fails with out-of-memory.
    let server = vllm_hitting_oom(&agent, MODEL);
    let pid = server.pid().to_string();

    let notification = |status: &'static str| {
        let received = received.clone();
        let pid = pid.clone();
        move || {
            received
                .lock()
                .unwrap()
                .iter()
                .find(|(_, n)| {
                    n["status"] == status
                        && n["alerts"].as_array().is_some_and(|a| {
                            a.iter().any(|a| {
                                a["labels"]["alertname"] == "CudaOutOfMemory"
                                    && a["labels"]["pid"] == pid.as_str()
                                    && a["status"] == status
                            })
                        })
                })
                .cloned()
        }
    };
    let diagnose = || {
        format!(
            "alerts: {}\nreceived: {:?}\nalertmanager: {}",
            prometheus.api("/api/v1/alerts"),
            received.lock().unwrap(),
            std::fs::read_to_string(work.join("alertmanager.log")).unwrap_or_default()
        )
    };
    let (path, firing) = wait_for(Duration::from_secs(60), notification("firing"))
        .unwrap_or_else(|| panic!("no firing notification:\n{}", diagnose()));
    // Critical: the on-call receiver, grouped by alert, node and model.
    assert_eq!(path, "/on-call", "{firing}");
    assert_eq!(firing["receiver"], "on-call", "{firing}");
    let alert = &firing["alerts"][0];
    let labels = &alert["labels"];
    assert_eq!(labels["model_name"], MODEL, "{firing}");
    assert_eq!(labels["framework"], "vllm", "{firing}");
    assert_eq!(labels["pid"], pid.as_str(), "{firing}");
    assert_eq!(
        labels["instance"],
        agent.addr.to_string().as_str(),
        "{firing}"
    );
    assert_eq!(labels["severity"], "critical", "{firing}");
    assert_eq!(
        firing["groupLabels"]["model_name"], MODEL,
        "grouped by model: {firing}"
    );
    assert!(
        alert["annotations"]["summary"]
            .as_str()
            .is_some_and(|s| s.contains(MODEL) && s.contains(&pid)),
        "{firing}"
    );

    // No further OOM: the alert resolves, and the receiver is told.
    let resolved = wait_for(Duration::from_secs(90), notification("resolved"));
    assert!(
        resolved.is_some(),
        "no resolved notification:\n{}",
        diagnose()
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&work);
}
