//! Logs a log system can read: `--log.format json` is one JSON object per line, `logfmt` one
//! `key=value` line per event, neither with terminal colours when written to a file, and what
//! an operator searches for carries a stable `event` field with the process's labels — never
//! its command line. Run as root (`cargo xtask test`).

mod support;

use std::time::Duration;

use support::*;

const MODEL: &str = "Qwen/Qwen2.5-7B-Instruct";

#[test]
fn json_logs_are_one_object_per_line_with_events() {
    let agent = Agent::start(&["--log.format", "json", "--rescan-interval", "1h"]);
    let server = vllm_hitting_oom(&agent, MODEL);
    let pid = u64::from(server.pid());
    let events = wait_for(Duration::from_secs(10), || {
        let log = agent.log();
        let objects: Vec<serde_json::Value> = log
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
            .collect();
        let find = |event: &str| {
            objects
                .iter()
                .find(|o| o["event"] == event && o["pid"] == pid)
                .cloned()
        };
        Some((find("process_detected")?, find("cuda_oom")?))
    });
    let log = agent.log();
    let (detected, oom) = events
        .unwrap_or_else(|| panic!("no process_detected and cuda_oom events for {pid}:\n{log}"));
    for event in [&detected, &oom] {
        assert!(event.is_object(), "{event}");
        assert_eq!(event["framework"], "vllm", "{event}");
        assert_eq!(event["model_name"], MODEL, "{event}");
        assert!(
            event["timestamp"].is_string() && event["level"].is_string(),
            "{event}"
        );
    }
    assert_eq!(detected["message"], "LLM process detected", "{detected}");
    assert_eq!(oom["level"], "WARN", "{oom}");
    assert_eq!(oom["function"], "cudaMalloc", "{oom}");
    assert!(
        !log.contains('\u{1b}'),
        "escape codes in a log file:\n{log}"
    );
    assert!(
        !log.contains("sk-secret"),
        "a command line reached the log:\n{log}"
    );
    drop(server);
    let exited = wait_for(Duration::from_secs(10), || {
        agent
            .log()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|o| o["event"] == "process_exited" && o["pid"] == pid)
    });
    let exited = exited.unwrap_or_else(|| panic!("no process_exited:\n{}", agent.log()));
    assert_eq!(exited["model_name"], MODEL, "{exited}");
}

#[test]
fn logfmt_logs_are_key_value_lines_without_colour() {
    let agent = Agent::start(&["--log.format", "logfmt", "--rescan-interval", "1h"]);
    let (server, _engine) = start_vllm(MODEL, "spawn");
    let pid = server.pid();
    let want = format!("event=process_detected pid={pid} framework=vllm model_name={MODEL}");
    let found = wait_for(Duration::from_secs(10), || {
        agent
            .log()
            .lines()
            .find(|l| l.contains(&want))
            .map(str::to_owned)
    });
    let log = agent.log();
    let line = found.unwrap_or_else(|| panic!("no {want:?} in:\n{log}"));
    assert!(
        line.contains(" level=info msg=\"LLM process detected\" "),
        "{line}"
    );
    for line in log.lines() {
        assert!(
            line.starts_with("ts=") && line.contains(" level="),
            "not logfmt: {line:?}"
        );
    }
    assert!(
        !log.contains('\u{1b}'),
        "escape codes in a log file:\n{log}"
    );
    assert!(
        !log.contains("sk-secret") && !log.contains("hf_TopSecret"),
        "{log}"
    );
}
