//! The Prometheus side of the deployment, checked with Debian's promtool: the configuration,
//! every alert's unit tests, and the agent's real exposition.

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use support::*;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus")
}

fn promtool(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .current_dir(deploy())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running promtool (cargo xtask test installs Debian's prometheus package)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.unwrap_or("").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn prometheus_config_rules_and_alert_tests_pass_promtool() {
    let (ok, out) = promtool(&["check", "config", "prometheus.yml"], None);
    assert!(ok, "promtool check config:\n{out}");
    let (ok, out) = promtool(
        &[
            "check",
            "rules",
            "rules/llmscope-recording.yml",
            "rules/llmscope-alerts.yml",
        ],
        None,
    );
    assert!(ok, "promtool check rules:\n{out}");
    let (ok, out) = promtool(&["test", "rules", "tests/llmscope-alerts_test.yml"], None);
    assert!(ok && out.contains("SUCCESS"), "promtool test rules:\n{out}");
    // Every alert has a unit test.
    let rules = std::fs::read_to_string(deploy().join("rules/llmscope-alerts.yml")).unwrap();
    let tests = std::fs::read_to_string(deploy().join("tests/llmscope-alerts_test.yml")).unwrap();
    for alert in rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
    {
        assert!(
            tests.contains(&format!("alertname: {alert}")),
            "alert {alert} has no promtool test"
        );
    }
}

/// The agent's exposition — with GPU, CUDA and process series — passes `promtool check
/// metrics`, but for the one deliberate finding: `llm_process_count` keeps the original
/// monitor's name (docs/design.md) although promtool wants no `_count` suffix on a gauge.
#[test]
fn the_agents_exposition_passes_promtool_check_metrics() {
    let values =
        std::env::temp_dir().join(format!("llmscope-promtool-nvml-{}", std::process::id()));
    std::fs::write(&values, "gpu name=NVIDIA_H100 uuid=GPU-0 total=85899345920 used=1073741824 util=40 mem_util=20 temp=61 power_mw=300000\n").unwrap();
    let lib = fake_nvml_library();
    let agent = Agent::start_with_env(
        &[
            "--nvml-lib",
            lib.to_str().unwrap(),
            "--nvml-interval",
            "200ms",
            "--cuda-overhead-budget",
            "100",
            "--rescan-interval",
            "1h",
        ],
        &[("LLMSCOPE_FAKE_NVML", values.to_str().unwrap())],
    );
    let cudart = fake_cuda_library("runtime");
    let mut w = CudaWorkload::start(
        &cuda_workload("llama-server"),
        &["-m", "/models/promtool.gguf"],
        &[
            ("CUDA_LIB", cudart.to_str().unwrap()),
            ("ALLOCS", "2"),
            ("LAUNCHES", "5"),
            ("COPY_BYTES", "64"),
            ("SYNCS", "1"),
            ("NO_FREE", "1"),
        ],
    );
    agent.wait_cuda_libraries(1.0);
    w.run();
    let m = wait_for(Duration::from_secs(15), || {
        let m = agent.metrics();
        (m.value("llm_process_cuda_kernel_launches_total", &[])
            .is_some()
            && m.value("nvidia_gpu_utilization", &[]).is_some())
        .then_some(m)
    })
    .expect("CUDA and GPU series");
    let (_, out) = promtool(&["check", "metrics"], Some(&m.0));
    let findings: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
    let deliberate =
        "llm_process_count non-histogram and non-summary metrics should not have \"_count\" suffix";
    assert!(
        findings.iter().all(|l| *l == deliberate),
        "promtool check metrics found:\n{out}\nin:\n{}",
        m.0
    );
    assert_eq!(
        findings.len(),
        1,
        "the exposition should have llm_process_count:\n{out}"
    );
    let _ = std::fs::remove_file(&values);
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(program: &str, args: &[&str], dir: &Path, env: &[(&str, &str)]) -> (bool, String) {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e} (cargo xtask test installs it)"));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// What `kubectl kustomize` would render for an overlay, for the manifests here: each patch
/// merged into the resource it names (maps merged key by key, lists of named items merged by
/// name, other lists replaced: the strategic-merge rules these patches rely on). Writes the
/// rendered DaemonSet to `out`. No kustomize binary exists offline; this keeps the overlays
/// checkable by the schema validator.
const RENDER: &str = r#"
import sys, yaml
def merge(base, patch):
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = merge(base[k], v) if k in base else v
        return out
    if isinstance(base, list) and isinstance(patch, list) and all(isinstance(i, dict) and 'name' in i for i in base + patch):
        out = [dict(i) for i in base]
        for item in patch:
            same = [n for n, i in enumerate(out) if i['name'] == item['name']]
            if same:
                out[same[0]] = merge(out[same[0]], item)
            else:
                out.append(item)
        return out
    return patch
ds = yaml.safe_load(open('base/daemonset.yaml'))
for p in sys.argv[2:]:
    ds = merge(ds, yaml.safe_load(open(p)))
yaml.safe_dump(ds, open(sys.argv[1], 'w'))
"#;

/// The Kubernetes manifests validate against the Kubernetes schemas (the PyPI package
/// kubernetes-validate, strict) — the base, and the DaemonSet as each overlay and the
/// web-config component render it; the PrometheusRule carries exactly deploy/prometheus's
/// rules.
#[test]
fn kubernetes_manifests_validate() {
    let dir = root().join("deploy/kubernetes");
    let rendered = std::env::temp_dir().join(format!("llmscope-k8s-{}", std::process::id()));
    std::fs::create_dir_all(&rendered).unwrap();
    let variants: [(&str, &[&str]); 4] = [
        ("gpu", &["overlays/gpu/daemonset-patch.yaml"]),
        ("cpu", &["overlays/cpu/daemonset-patch.yaml"]),
        (
            "gpu-web-config",
            &[
                "overlays/gpu/daemonset-patch.yaml",
                "components/web-config/daemonset-patch.yaml",
            ],
        ),
        (
            "gpu-server-scrape",
            &[
                "overlays/gpu/daemonset-patch.yaml",
                "components/server-scrape/daemonset-patch.yaml",
            ],
        ),
    ];
    let mut files: Vec<String> = ["namespace.yaml", "daemonset.yaml", "service.yaml"]
        .iter()
        .map(|f| format!("base/{f}"))
        .chain(["components/server-scrape/configmap.yaml".to_owned()])
        .collect();
    for (name, patches) in variants {
        let out = rendered.join(format!("daemonset-{name}.yaml"));
        let mut args = vec!["-c", RENDER, out.to_str().unwrap()];
        args.extend(patches);
        let (ok, text) = run("python3", &args, &dir, &[]);
        assert!(ok, "rendering {name}:\n{text}");
        files.push(out.to_str().unwrap().to_owned());
    }
    let mut args = vec!["--strict"];
    args.extend(files.iter().map(String::as_str));
    let (ok, out) = run("kubernetes-validate", &args, &dir, &[]);
    assert!(ok, "kubernetes-validate:\n{out}");
    for file in &files {
        let name = file.rsplit('/').next().unwrap();
        assert!(
            out.contains(&format!("{name} passed")),
            "{file} not validated:\n{out}"
        );
    }
    // What each variant promises.
    let check = |name: &str, needles: &[&str]| {
        let ds = std::fs::read_to_string(rendered.join(format!("daemonset-{name}.yaml"))).unwrap();
        for needle in needles {
            assert!(ds.contains(needle), "{name} lacks {needle}:\n{ds}");
        }
    };
    let least_privilege = [
        "privileged: false",
        "readOnlyRootFilesystem: true",
        "- ALL",
        "mountPath: /host/proc",
        "--path.procfs=/host/proc",
        "limits:",
        "mountPath: /var/run/docker.sock",
    ];
    check("gpu", &least_privilege);
    check("cpu", &least_privilege);
    check(
        "gpu",
        &[
            "runtimeClassName: nvidia",
            "nvidia.com/gpu.present: 'true'",
            "NVIDIA_VISIBLE_DEVICES",
            "value: utility",
        ],
    );
    check("cpu", &["LLMSCOPE_NO_NVML", "operator: DoesNotExist"]);
    check(
        "gpu-web-config",
        &[
            "LLMSCOPE_WEB_CONFIG_FILE",
            "NVIDIA_VISIBLE_DEVICES",
            "scheme: HTTPS",
            "secretName: llmscope-web",
            "--path.procfs=/host/proc",
        ],
    );
    check(
        "gpu-server-scrape",
        &[
            "- --agent",
            "fieldPath: spec.nodeName",
            "name: llmscope-server-scrape",
            "--path.procfs=/host/proc",
            "NVIDIA_VISIBLE_DEVICES",
        ],
    );
    // The agent-mode Prometheus's configuration is one promtool accepts, and it reads the
    // /api/sd of the llmscope container beside it.
    let config = rendered.join("server-scrape.yml");
    let (ok, out) = run(
        "python3",
        &[
            "-c",
            "import sys, yaml; open(sys.argv[2], 'w').write(yaml.safe_load(open(sys.argv[1]))['data']['prometheus.yml'])",
            "components/server-scrape/configmap.yaml",
            config.to_str().unwrap(),
        ],
        &dir,
        &[],
    );
    assert!(ok, "{out}");
    let (ok, out) = promtool(
        &["check", "config", "--agent", config.to_str().unwrap()],
        None,
    );
    assert!(ok, "promtool check config --agent:\n{out}");
    assert!(std::fs::read_to_string(&config)
        .unwrap()
        .contains("url: http://127.0.0.1:9101/api/sd"));
    let _ = std::fs::remove_dir_all(&rendered);
    // Every manifest of the base is in its kustomization.
    let kustomization = std::fs::read_to_string(dir.join("base/kustomization.yaml")).unwrap();
    for file in std::fs::read_dir(dir.join("base"))
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().into_string().unwrap())
    {
        if file.ends_with(".yaml") && file != "kustomization.yaml" {
            assert!(
                kustomization.contains(&format!("- {file}")),
                "{file} is not in base/kustomization.yaml"
            );
        }
    }
    let same = "import sys, yaml; \
        groups = [g for f in sys.argv[2:] for g in yaml.safe_load(open(f))['groups']]; \
        sys.exit(0 if yaml.safe_load(open(sys.argv[1]))['spec']['groups'] == groups else 1)";
    let rules = root().join("deploy/prometheus/rules");
    let (ok, out) = run(
        "python3",
        &[
            "-c",
            same,
            "base/prometheusrule.yaml",
            rules.join("llmscope-recording.yml").to_str().unwrap(),
            rules.join("llmscope-alerts.yml").to_str().unwrap(),
        ],
        &dir,
        &[],
    );
    assert!(
        ok,
        "prometheusrule.yaml differs from deploy/prometheus/rules:\n{out}"
    );
}

/// The compose file passes `docker-compose config`, and refuses to start Grafana without the
/// admin password the user sets (there is no default admin/admin).
#[test]
fn compose_file_is_valid_and_has_no_default_password() {
    let dir = root().join("deploy/compose");
    let (ok, out) = run(
        "docker-compose",
        &["-f", "docker-compose.yml", "config", "-q"],
        &dir,
        &[("GRAFANA_ADMIN_PASSWORD", "a-password")],
    );
    assert!(ok, "docker-compose config:\n{out}");
    let (ok, out) = run(
        "docker-compose",
        &["-f", "docker-compose.yml", "config", "-q"],
        &dir,
        &[],
    );
    assert!(
        !ok && out.contains("GRAFANA_ADMIN_PASSWORD"),
        "compose must refuse to run without a Grafana password:\n{out}"
    );
    // The --web.config.file override merges into the stack and keeps every other flag.
    let (ok, out) = run(
        "docker-compose",
        &[
            "-f",
            "docker-compose.yml",
            "-f",
            "docker-compose.web-config.yml",
            "config",
        ],
        &dir,
        &[("GRAFANA_ADMIN_PASSWORD", "a-password")],
    );
    assert!(
        ok,
        "docker-compose config with the web-config override:\n{out}"
    );
    for needle in [
        "--web.config.file=/etc/llmscope/web/web.yml",
        "--path.procfs=/host/proc",
        "--gpu-info-dir=/var/run/llmscope/gpu-info",
        "--log.format=json",
    ] {
        assert!(
            out.contains(needle),
            "merged compose lacks {needle}:\n{out}"
        );
    }
    // The fleet-store and logs overrides merge too, and bring what they promise.
    for (file, needles) in [
        (
            "docker-compose.victoria-metrics.yml",
            &["victoria-metrics:", "prometheus.victoria-metrics.yml"][..],
        ),
        (
            "docker-compose.logs.yml",
            &["loki:", "promtail-compose.yml", "grafana/promtail"][..],
        ),
    ] {
        let (ok, out) = run(
            "docker-compose",
            &["-f", "docker-compose.yml", "-f", file, "config"],
            &dir,
            &[("GRAFANA_ADMIN_PASSWORD", "a-password")],
        );
        assert!(ok, "docker-compose config with {file}:\n{out}");
        for needle in needles {
            assert!(
                out.contains(needle),
                "{file}: merged compose lacks {needle}:\n{out}"
            );
        }
    }
}

/// Every Prometheus configuration shipped for the stacks passes promtool, and the
/// Alertmanager configuration passes amtool; the Promtail snippets read llmscope's JSON log
/// and label it by event (no Promtail binary here: checked as YAML).
#[test]
fn alerting_fleet_and_log_configurations_are_valid() {
    let compose = root().join("deploy/compose");
    let web = std::fs::read_to_string(compose.join("web-config/prometheus.yml")).unwrap();
    assert!(
        web.contains("alertmanager:9093"),
        "web-config/prometheus.yml sends no alerts"
    );
    for config in ["prometheus.yml", "prometheus.victoria-metrics.yml"] {
        let text = std::fs::read_to_string(compose.join(config)).unwrap();
        assert!(
            text.contains("alertmanager:9093"),
            "{config} sends no alerts"
        );
        // The rule files are mounted beside it in the stack: check it with them there.
        let dir = std::env::temp_dir().join(format!("llmscope-compose-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("rules")).unwrap();
        for rules in ["llmscope-recording.yml", "llmscope-alerts.yml"] {
            std::fs::copy(
                deploy().join("rules").join(rules),
                dir.join("rules").join(rules),
            )
            .unwrap();
        }
        std::fs::write(dir.join("prometheus.yml"), &text).unwrap();
        let (ok, out) = promtool(
            &[
                "check",
                "config",
                dir.join("prometheus.yml").to_str().unwrap(),
            ],
            None,
        );
        let _ = std::fs::remove_dir_all(&dir);
        assert!(ok, "promtool check config {config}:\n{out}");
    }
    let (ok, out) = run(
        "amtool",
        &["check-config", "alertmanager.yml"],
        &root().join("deploy/alertmanager"),
        &[],
    );
    assert!(ok, "amtool check-config:\n{out}");
    for needle in [
        "send_resolved: true",
        "group_by: [alertname, instance, model_name]",
        "LlmscopeAgentDown",
    ] {
        let text =
            std::fs::read_to_string(root().join("deploy/alertmanager/alertmanager.yml")).unwrap();
        assert!(text.contains(needle), "alertmanager.yml lacks {needle}");
    }
    for file in ["promtail-compose.yml", "promtail-kubernetes.yml"] {
        let text = std::fs::read_to_string(root().join("deploy/logs").join(file)).unwrap();
        let config: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
        let stages = &config["scrape_configs"][0]["pipeline_stages"];
        let json = stages
            .as_sequence()
            .and_then(|s| s.iter().find(|st| st.get("json").is_some()))
            .unwrap_or_else(|| panic!("{file}: no json stage"));
        assert_eq!(
            json["json"]["expressions"]["event"].as_str(),
            Some("event"),
            "{file}"
        );
    }
}

/// The systemd unit passes `systemd-analyze verify` with the agent binary in place.
#[test]
fn systemd_unit_verifies() {
    let unit = std::fs::read_to_string(root().join("deploy/systemd/llmscope.service")).unwrap();
    assert!(
        unit.contains("NoNewPrivileges=yes")
            && unit.contains("ProtectSystem=strict")
            && unit.contains("MemoryMax=")
    );
    let dir = std::env::temp_dir().join(format!("llmscope-systemd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("llmscope.service"),
        unit.replace("/usr/local/bin/llmscope", env!("CARGO_BIN_EXE_llmscope")),
    )
    .unwrap();
    let (ok, out) = run(
        "systemd-analyze",
        &["verify", "llmscope.service"],
        &dir,
        &[],
    );
    assert!(
        ok && out.trim().is_empty(),
        "systemd-analyze verify:\n{out}"
    );
    // Least privilege: no CAP_SYS_ADMIN (tracefs is mounted by a privileged ExecStartPre),
    // and systemd's own exposure score stays in its "OK" band (it was 6.2 "MEDIUM").
    assert!(
        !unit
            .lines()
            .filter(|l| l.starts_with("CapabilityBoundingSet=")
                || l.starts_with("AmbientCapabilities="))
            .any(|l| l.contains("CAP_SYS_ADMIN")),
        "the unit grants CAP_SYS_ADMIN"
    );
    let (_, out) = run(
        "systemd-analyze",
        &["security", "--offline=true", "llmscope.service"],
        &dir,
        &[],
    );
    let exposure: f64 = out
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for llmscope.service:")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{out}"));
    assert!(exposure <= 5.0, "exposure {exposure}:\n{out}");
    let _ = std::fs::remove_dir_all(&dir);
}
