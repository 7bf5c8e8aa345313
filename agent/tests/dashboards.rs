//! Every dashboard panel works the first time: a real Prometheus (Debian's) scrapes the agent
//! — fed by the CUDA and NVML test doubles, a vLLM-shaped process with a gpu-info report, and
//! CUDA workloads — and a stand-in inference server with vLLM's, SGLang's, TGI's and
//! llama.cpp's metric names; then every panel query must return data, and every alert and
//! recording rule must load and evaluate without error.

mod support;

use std::process::Command;
use std::time::Duration;

use support::demo::{expand, panel_queries, root, Demo};
use support::*;

/// Every dashboard.
const DASHBOARDS: [&str; 5] = [
    "overview.json",
    "processes.json",
    "cuda.json",
    "gpu-devices.json",
    "inference-servers.json",
];

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

/// Runtime calls may reach probed driver functions (libcudart calls libcuda): a query that
/// sums a family with an `api` label must keep `api`, or it adds one call twice.
#[test]
fn no_query_adds_the_runtime_and_driver_layers() {
    let with_api = [
        "llm_process_cuda_calls_total",
        "llm_process_cuda_errors_total",
        "llm_process_cuda_alloc_bytes_total",
        "llm_process_cuda_free_total",
        "llm_process_cuda_kernel_launches_total",
        "llm_process_cuda_graph_launches_total",
        "llm_process_cuda_memcpy_bytes_total",
        "llm_process_cuda_sync_seconds_total",
    ];
    let mut exprs: Vec<(String, String)> = DASHBOARDS
        .iter()
        .flat_map(|file| {
            panel_queries(file)
                .into_iter()
                .map(|(_, e)| (file.to_string(), e))
        })
        .collect();
    for file in [
        "deploy/prometheus/rules/llmscope-recording.yml",
        "deploy/prometheus/rules/llmscope-alerts.yml",
        "deploy/kubernetes/base/prometheusrule.yaml",
    ] {
        let text = std::fs::read_to_string(root().join(file)).unwrap();
        exprs.extend(
            text.lines()
                .filter_map(|l| l.trim().strip_prefix("expr:"))
                .map(|e| (file.into(), e.into())),
        );
    }
    let mut checked = 0;
    for (file, expr) in &exprs {
        if !with_api.iter().any(|f| expr.contains(f)) {
            continue;
        }
        checked += 1;
        for (i, _) in expr.match_indices("sum") {
            let rest = &expr[i + 3..].trim_start();
            let keeps_api = rest
                .strip_prefix("by")
                .and_then(|r| r.trim_start().strip_prefix('('))
                .and_then(|r| r.split(')').next())
                .is_some_and(|labels| labels.split(',').any(|l| l.trim() == "api"));
            assert!(
                keeps_api,
                "{file}: {expr} sums runtime and driver calls together"
            );
        }
    }
    assert!(checked >= 6, "only {checked} CUDA queries found");
}

#[test]
fn every_panel_query_returns_data_and_every_rule_evaluates() {
    let demo = Demo::start(free_port(), 20);
    let prometheus = demo.prometheus.addr;

    let mut failures = Vec::new();
    let mut checked = 0;
    for file in DASHBOARDS {
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
                let r = demo.query(&expr).expect("Prometheus answers");
                checked += 1;
                let empty = r["data"]["result"].as_array().is_none_or(Vec::is_empty);
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
    assert_eq!(all.len(), 24, "8 recording rules and 16 alerts:\n{body}");
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

    check_metric_reference(&demo.agent.metrics().0);
}

const BEGIN: &str = "<!-- metrics:begin (generated by agent/tests/dashboards.rs from the agent's exposition; LLMSCOPE_BLESS=1 cargo xtask test rewrites it) -->";
const END: &str = "<!-- metrics:end -->";

type Families =
    std::collections::BTreeMap<String, (String, String, std::collections::BTreeSet<String>)>;

/// The README's metric reference is generated from the agent's real exposition (every source
/// active): a family added, renamed or re-described in the code without the README, or the
/// other way round, fails here. LLMSCOPE_BLESS=1 rewrites the README section.
fn check_metric_reference(exposition: &str) {
    let mut families = Families::new();
    for line in exposition.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            families.entry(name.to_owned()).or_default().0 = help.to_owned();
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            families.entry(name.to_owned()).or_default().1 = kind.to_owned();
        } else if !line.starts_with('#') && !line.is_empty() {
            let name = line.split(['{', ' ']).next().unwrap();
            let labels: Vec<String> = line
                .split_once('{')
                .and_then(|(_, rest)| rest.rsplit_once('}'))
                .map(|(inside, _)| {
                    inside
                        .split("\",")
                        .filter_map(|kv| {
                            kv.split_once('=')
                                .map(|(k, _)| k.trim_start_matches(',').to_owned())
                        })
                        .collect()
                })
                .unwrap_or_default();
            // A histogram's samples are its name's _bucket, _sum and _count; `le` is theirs.
            let family = std::iter::once(name)
                .chain(
                    ["_bucket", "_sum", "_count"]
                        .iter()
                        .filter_map(|suffix| name.strip_suffix(suffix)),
                )
                .find(|n| families.contains_key(*n));
            if let Some(f) = family.and_then(|n| families.get_mut(n)) {
                f.2.extend(labels.into_iter().filter(|l| l != "le"));
            }
        }
    }
    let mut table =
        String::from("| metric | type | labels | meaning |\n| --- | --- | --- | --- |\n");
    for (name, (help, kind, labels)) in &families {
        let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
        table.push_str(&format!(
            "| `{name}` | {kind} | {} | {} |\n",
            labels.join(", "),
            help.replace('|', "\\|")
        ));
    }
    let readme_path = root().join("README.md");
    let readme = std::fs::read_to_string(&readme_path).unwrap();
    let (head, rest) = readme
        .split_once(BEGIN)
        .expect("README.md has the metrics:begin marker");
    let (current, tail) = rest
        .split_once(END)
        .expect("README.md has the metrics:end marker");
    let generated = format!("\n{table}");
    if current == generated {
        return;
    }
    if std::env::var_os("LLMSCOPE_BLESS").is_some() {
        std::fs::write(&readme_path, format!("{head}{BEGIN}{generated}{END}{tail}")).unwrap();
        return;
    }
    panic!("README.md's metric reference differs from the exposition; run LLMSCOPE_BLESS=1 cargo xtask test and review the diff. Generated:\n{table}");
}

/// Debian's VictoriaMetrics, for one test: its own storage, on a free port.
struct VictoriaMetrics {
    addr: std::net::SocketAddr,
    _process: prometheus::Killed,
    dir: std::path::PathBuf,
}

impl VictoriaMetrics {
    fn start() -> VictoriaMetrics {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("llmscope-vm-{port}"));
        let _ = std::fs::remove_dir_all(&dir);
        let process = prometheus::Killed(
            Command::new("victoria-metrics")
                .arg(format!("-httpListenAddr=127.0.0.1:{port}"))
                .arg(format!("-storageDataPath={}", dir.display()))
                .arg("-retentionPeriod=1d")
                // Answer with what was written a second ago, not 30 s ago (the default).
                .arg("-search.latencyOffset=1s")
                .arg("-search.disableCache")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("starting victoria-metrics (cargo xtask test installs Debian's package)"),
        );
        let vm = VictoriaMetrics {
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            _process: process,
            dir,
        };
        let up = wait_for(Duration::from_secs(30), || {
            http_get(vm.addr, "/health", None)
                .ok()
                .filter(|(code, _, _)| *code == 200)
        });
        assert!(up.is_some(), "victoria-metrics did not start");
        vm
    }

    /// The result of `expr` through VictoriaMetrics' Prometheus-compatible query API.
    fn query(&self, expr: &str) -> serde_json::Value {
        let path = format!("/api/v1/query?query={}", prometheus::percent_encode(expr));
        let (_, _, body) = http_get(self.addr, &path, None).unwrap();
        serde_json::from_str(&body).unwrap_or(serde_json::Value::Null)
    }
}

impl Drop for VictoriaMetrics {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Fleet scale on an existing engine: Prometheus scrapes the agent and remote-writes to
/// VictoriaMetrics, and every dashboard query and every recording rule's expression returns
/// data from VictoriaMetrics.
#[test]
fn every_query_and_recording_rule_works_on_victoria_metrics_through_remote_write() {
    let vm = VictoriaMetrics::start();
    let _demo = Demo::start_with(
        free_port(),
        20,
        &format!(
            "remote_write:\n  - url: http://{}/api/v1/write\n    queue_config:\n      batch_send_deadline: 1s\n",
            vm.addr
        ),
    );
    let mut exprs: Vec<(String, String)> = Vec::new();
    for file in DASHBOARDS {
        exprs.extend(
            panel_queries(file)
                .into_iter()
                .map(|(title, expr)| (format!("{file} / {title}"), expr)),
        );
    }
    let rules: serde_yaml_ng::Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(root().join("deploy/prometheus/rules/llmscope-recording.yml"))
            .unwrap(),
    )
    .unwrap();
    let mut recording = 0;
    for rule in rules["groups"][0]["rules"].as_sequence().unwrap() {
        recording += 1;
        exprs.push((
            format!("recording rule {}", rule["record"].as_str().unwrap()),
            rule["expr"].as_str().unwrap().to_owned(),
        ));
    }
    assert_eq!(recording, 8);
    // What Prometheus has scraped reaches VictoriaMetrics within a few seconds.
    let arrived = wait_for(Duration::from_secs(60), || {
        let r = vm.query("count_over_time(llmscope_build_info[1m]) >= 10");
        (!r["data"]["result"].as_array()?.is_empty()).then_some(())
    });
    assert!(
        arrived.is_some(),
        "no remote-written data in VictoriaMetrics"
    );
    let failures: Vec<String> = exprs
        .iter()
        .filter_map(|(what, expr)| {
            let r = vm.query(expr);
            let empty = r["data"]["result"].as_array().is_none_or(Vec::is_empty);
            (r["status"] != "success" || empty).then(|| format!("{what}: {expr}\n  → {r}"))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} queries returned no data from VictoriaMetrics:\n{}",
        failures.len(),
        exprs.len(),
        failures.join("\n")
    );
}
