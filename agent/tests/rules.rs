//! User classification rules (`--classify.rules`) with the real agent and real processes:
//! an in-house server named by a rule (its model from an argv capture), another from an
//! environment variable, another by a library it maps, an ignored process the built-in rules
//! would pick, a reload that applies to processes already tracked, a broken version kept out,
//! and a broken file at start-up. Run as root (`cargo xtask test`).

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::*;

const WAIT: Duration = Duration::from_secs(15);

const RULES: &str = r#"
rules:
  - name: acme-infer
    match:
      name: '^acme-infer$'
      argv: '--weights[ =](?P<model>\S+)'
    framework: acme-infer
    role: server
  - name: ranker
    match:
      name: '^ranker-svc$'
      env: { RANKER_MODEL: '(?P<model>.+)' }
    framework: ranker
    role: worker
  - name: sandboxed
    match: { argv: ' --sandbox( |$)' }
    ignore: true
  - name: house-llm
    match: { argv: 'stand_in_server\.py \d+ (?P<model>\S+)' }
    framework: house-llm
  - name: kernels-of-the-house
    match: { library: '/libacme_kernels\.so$' }
    framework: acme-kernels
    model_name: acme-kernels-v1
"#;

/// The same rules, the acme server renamed, the ignore and library rules gone.
const RULES_V2: &str = r#"
rules:
  - name: acme-infer
    match:
      name: '^acme-infer$'
      argv: '--weights[ =](?P<model>\S+)'
    framework: acme-infer-v2
  - name: ranker
    match:
      name: '^ranker-svc$'
      env: { RANKER_MODEL: '(?P<model>.+)' }
    framework: ranker
    role: worker
"#;

/// Replaces the file by renaming a new one over it (what editors and ConfigMaps do).
fn write_rules(path: &Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn start(program: &Path, args: &[&str], env: &[(&str, &str)]) -> Proc {
    Proc(
        Command::new(program)
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

fn wait_labels(agent: &Agent, pid: u32, want: &[(&str, &str)]) -> Labels {
    let found = wait_for(WAIT, || {
        agent.process_labels(pid).filter(|l| {
            want.iter()
                .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
    });
    found.unwrap_or_else(|| {
        panic!(
            "pid {pid} never had {want:?}; it has {:?}\nagent log:\n{}",
            agent.process_labels(pid),
            agent.log()
        )
    })
}

fn rule_matches(agent: &Agent, rule: &str) -> Option<f64> {
    agent
        .metrics()
        .value("llmscope_classify_rule_matches_total", &[("rule", rule)])
}

#[test]
fn user_rules_name_in_house_servers_exclude_processes_and_reload() {
    let dir = TempDir::new("llmscope-rules-test");
    let path = dir.0.join("rules.yaml");
    std::fs::write(&path, RULES).unwrap();
    // Scans every second: the test sees that a scan does not count a process again.
    let agent = Agent::start(&[
        "--classify.rules",
        path.to_str().unwrap(),
        "--rescan-interval",
        "1s",
    ]);
    assert!(
        agent.log().contains("classification rules loaded"),
        "{}",
        agent.log()
    );

    let mut acme = start(
        &workload("acme-infer"),
        &[
            "--port",
            "9000",
            "--weights",
            "/models/ranker-v3.safetensors",
        ],
        &[],
    );
    let labels = wait_labels(&agent, acme.pid(), &[("framework", "acme-infer")]);
    assert_eq!(labels["model_name"], "ranker-v3", "{labels:?}");
    assert_eq!(labels["role"], "server");
    assert_eq!(labels["name"], "acme-infer");

    // Its model from an environment variable the rule names (read only for it).
    let mut ranker = start(
        &workload("ranker-svc"),
        &[],
        &[
            ("RANKER_MODEL", "acme/ranker-7b"),
            ("RANKER_TOKEN", "sk-never-read"),
        ],
    );
    let labels = wait_labels(&agent, ranker.pid(), &[("framework", "ranker")]);
    assert_eq!(labels["model_name"], "acme/ranker-7b", "{labels:?}");
    assert_eq!(labels["role"], "worker");

    // A plain program that maps the house's kernel library: named at a scan (the library
    // is no framework's, so no mapping hook reports it).
    let kernels = empty_shared_library(&dir.0.join("lib/libacme_kernels.so"));
    let mut house = start(
        &workload("house-batch"),
        &[],
        &[("LD_PRELOAD", kernels.to_str().unwrap())],
    );
    let labels = wait_labels(&agent, house.pid(), &[("framework", "acme-kernels")]);
    assert_eq!(labels["model_name"], "acme-kernels-v1", "{labels:?}");

    // A llama-server the built-in rules name, excluded; one without the flag is tracked.
    let llama = workload("llama-server");
    let mut sandboxed = start(&llama, &["-m", "/models/a.gguf", "--sandbox"], &[]);
    let mut control = start(&llama, &["-m", "/models/b.gguf"], &[]);
    wait_labels(&agent, control.pid(), &[("framework", "llama.cpp")]);
    assert_eq!(
        agent.process_labels(sandboxed.pid()),
        None,
        "ignored by the rule"
    );
    let counted = wait_for(WAIT, || {
        let m = (
            rule_matches(&agent, "acme-infer"),
            rule_matches(&agent, "ranker"),
            rule_matches(&agent, "sandboxed"),
            rule_matches(&agent, "kernels-of-the-house"),
        );
        (m == (Some(1.0), Some(1.0), Some(1.0), Some(1.0))).then_some(())
    });
    assert!(
        counted.is_some(),
        "rule matches: {:?}",
        agent
            .metrics()
            .find("llmscope_classify_rule_matches_total", &[])
    );
    // Two scans later, nothing is counted twice.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(rule_matches(&agent, "sandboxed"), Some(1.0));
    assert_eq!(rule_matches(&agent, "kernels-of-the-house"), Some(1.0));

    // A new version applies to processes already running: the server is renamed, the
    // sandboxed llama-server is no longer excluded.
    write_rules(&path, RULES_V2);
    wait_labels(&agent, acme.pid(), &[("framework", "acme-infer-v2")]);
    wait_labels(&agent, sandboxed.pid(), &[("framework", "llama.cpp")]);
    assert_eq!(rule_matches(&agent, "sandboxed"), None, "the rule is gone");
    // Nothing but the removed rule made the library's user an LLM process.
    let untracked = wait_for(WAIT, || {
        agent.process_labels(house.pid()).is_none().then_some(())
    });
    assert!(
        untracked.is_some(),
        "{:?}",
        agent.process_labels(house.pid())
    );
    assert!(agent.log().contains("classification rules reloaded"));

    // A broken version is refused, counted and logged; the rules in use stay.
    write_rules(
        &path,
        "rules:\n  - name: broken\n    match: { argv: '(unclosed' }\n",
    );
    let failed = wait_for(WAIT, || {
        (agent
            .metrics()
            .value("llmscope_classify_rules_reload_failures_total", &[])
            == Some(1.0))
        .then_some(())
    });
    assert!(failed.is_some(), "{}", agent.log());
    let log = agent.log();
    assert!(
        log.contains("the rules in use are kept") && log.contains("match.argv: regex parse error"),
        "{log}"
    );
    let mut later = start(
        &workload("acme-infer"),
        &["--weights=/m/ranker-v4.gguf"],
        &[],
    );
    let labels = wait_labels(&agent, later.pid(), &[("framework", "acme-infer-v2")]);
    assert_eq!(labels["model_name"], "ranker-v4");

    // Nothing but the named variable was read from the environment, and no secret leaked.
    let (_, api) = agent.get("/api/processes").unwrap();
    for text in [&agent.metrics().0, &api, &agent.log()] {
        assert!(!text.contains("sk-never-read"));
    }
    for p in [
        &mut acme,
        &mut ranker,
        &mut sandboxed,
        &mut control,
        &mut house,
        &mut later,
    ] {
        p.kill();
    }
}

/// A server a rule names is examined like the built-in ones: its own Prometheus endpoint is
/// found and published for Prometheus's HTTP service discovery.
#[test]
fn a_server_named_by_a_rule_has_its_metrics_endpoint_discovered() {
    let dir = TempDir::new("llmscope-rules-test");
    let path = dir.0.join("rules.yaml");
    std::fs::write(&path, RULES).unwrap();
    let agent = Agent::start(&["--classify.rules", path.to_str().unwrap()]);
    let port = free_port();
    let mut server = start(
        Path::new("python3"),
        &[
            fixtures()
                .join("inference/stand_in_server.py")
                .to_str()
                .unwrap(),
            &port.to_string(),
            "acme/house-13b",
        ],
        &[],
    );
    let labels = wait_labels(&agent, server.pid(), &[("framework", "house-llm")]);
    assert_eq!(labels["model_name"], "acme/house-13b");
    let target = format!("127.0.0.1:{port}");
    let found = wait_for(Duration::from_secs(20), || {
        let (_, sd) = agent.get("/api/sd").ok()?;
        let sd: serde_json::Value = serde_json::from_str(&sd).ok()?;
        sd.as_array()?
            .iter()
            .find(|t| t["targets"][0] == target.as_str())
            .cloned()
    });
    let found = found.unwrap_or_else(|| panic!("{target} not in /api/sd:\n{}", agent.log()));
    assert_eq!(found["labels"]["framework"], "house-llm", "{found}");
    assert_eq!(found["labels"]["__metrics_path__"], "/metrics", "{found}");
    server.kill();
}

#[test]
fn a_broken_rules_file_stops_start_up_naming_the_file_the_rule_and_the_reason() {
    let dir = TempDir::new("llmscope-rules-test");
    let path = dir.0.join("broken.yaml");
    std::fs::write(
        &path,
        "rules:\n  - name: fine\n    match: { name: x }\n    framework: x\n  - name: bad\n    match: { argv: '[' }\n    framework: x\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_llmscope"))
        .args(["--no-nvml", "--classify.rules"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "a usage error");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "error: --classify.rules {}: rule 2 (\"bad\"): match.argv: regex parse error",
            path.display()
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("rule 1"), "{stderr}");
}
