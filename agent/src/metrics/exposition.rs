//! Rendering a snapshot as OpenMetrics or as the Prometheus text format (0.0.4), chosen by
//! the scraper's `Accept` header.
//!
//! prometheus-client writes OpenMetrics only. The classic text format differs in three ways
//! that matter here: a counter's HELP/TYPE lines name the sample (`x_total`), there are no
//! `# UNIT` lines, and there is no `# EOF`. [`openmetrics_to_text`] does that translation.

use prometheus_client::registry::Registry;

use super::encode::SnapshotCollector;
use super::{BuildInfo, Snapshot};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    OpenMetrics,
    Text,
}

impl Format {
    /// OpenMetrics when the scraper accepts it (Prometheus asks for it first), else text.
    pub fn negotiate(accept: Option<&str>) -> Format {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Text,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Text => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

pub fn render(snapshot: Snapshot, build: BuildInfo, format: Format) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(SnapshotCollector { snapshot, build }));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)
        .expect("encoding into a String cannot fail");
    match format {
        Format::OpenMetrics => out,
        Format::Text => openmetrics_to_text(&out),
    }
}

pub fn openmetrics_to_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut pending_help: Option<&str> = None;
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            pending_help = Some(rest);
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let name = if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_owned()
            };
            if let Some(help) = pending_help.take() {
                let text = help.split_once(' ').map_or("", |(_, t)| t);
                out.push_str(&format!("# HELP {name} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{Framework, Identity, Role};
    use crate::metrics::cuda::{Api, ApiFunction, CudaSnapshot, LaunchMode};
    use crate::metrics::{AgentStats, CollectorStatus, KindCount, ProcessLabels, ProcessSample};

    fn snapshot() -> Snapshot {
        let id = Identity::new(
            Framework::Vllm,
            Role::Server,
            Some("meta-llama/Llama-3.1-8B-Instruct".into()),
        );
        let sample = |pid: u32, alive: bool| ProcessSample {
            labels: ProcessLabels::new(pid, "python3", &id),
            alive,
            cpu_seconds: 12.5,
            cpu_percent: Some(50.0),
            memory_bytes: 1 << 30,
            threads: Some(8),
            start_time_seconds: 1_700_000_000.0,
        };
        let cuda_labels = ProcessLabels::new(10, "python3", &id);
        Snapshot {
            server_endpoints: vec![],
            ollama_models: vec![],
            cuda: CudaSnapshot {
                calls: vec![(
                    (
                        cuda_labels.clone(),
                        ApiFunction {
                            api: "runtime".into(),
                            function: "cudaMalloc".into(),
                        },
                    ),
                    3.0,
                )],
                device_memory: vec![(cuda_labels.clone(), 4096.0)],
                launches: vec![(
                    (
                        cuda_labels,
                        Api {
                            api: "runtime".into(),
                        },
                    ),
                    1200.0,
                )],
                attachments: 20,
                launch_mode: LaunchMode::Sampled,
                launch_duty: 0.25,
                ..Default::default()
            },
            gpu: Default::default(),
            processes: vec![sample(10, true), sample(11, true), sample(12, false)],
            collectors: vec![CollectorStatus {
                collector: "process",
                success: true,
                duration_seconds: 0.001,
            }],
            agent: AgentStats {
                tracked_processes: 3,
                tracked_dropped: 0,
                model_names_capped: 0,
                events: vec![KindCount {
                    kind: "exec",
                    value: 7,
                }],
                events_lost: vec![KindCount {
                    kind: "exec",
                    value: 0,
                }],
                repairs: vec![],
                container_lookups: vec![],
                server_probes: vec![],
            },
        }
    }

    /// The golden exposition: a rename of any metric or label fails here first.
    #[test]
    fn golden_text_exposition() {
        let text = render(
            snapshot(),
            BuildInfo {
                version: "0.1.0".into(),
                mode: "ebpf".into(),
            },
            Format::Text,
        );
        let labels = r#"pid="10",name="python3",llm_type="llama",model_name="meta-llama/Llama-3.1-8B-Instruct",framework="vllm",role="server""#;
        for expected in [
            "# TYPE llm_process_count gauge".to_owned(),
            r#"llm_process_count{llm_type="llama",model_name="meta-llama/Llama-3.1-8B-Instruct",framework="vllm"} 2.0"#.to_owned(),
            format!("llm_process_cpu_percent{{{labels}}} 50.0"),
            "# TYPE llm_process_cpu_seconds_total counter".to_owned(),
            format!("llm_process_cpu_seconds_total{{{labels}}} 12.5"),
            format!("llm_process_memory_bytes{{{labels}}} 1073741824.0"),
            format!("llm_process_threads{{{labels}}} 8.0"),
            format!("llm_process_start_time_seconds{{{labels}}} 1700000000.0"),
            r#"llmscope_build_info{version="0.1.0",mode="ebpf"} 1.0"#.to_owned(),
            r#"llmscope_collector_success{collector="process"} 1.0"#.to_owned(),
            r#"llmscope_collector_duration_seconds{collector="process"} 0.001"#.to_owned(),
            "llmscope_tracked_processes 3.0".to_owned(),
            "llmscope_tracked_processes_dropped_total 0.0".to_owned(),
            r#"llmscope_events_total{kind="exec"} 7.0"#.to_owned(),
            r#"llmscope_events_lost_total{kind="exec"} 0.0"#.to_owned(),
            format!(r#"llm_process_cuda_calls_total{{{labels},api="runtime",function="cudaMalloc"}} 3.0"#),
            format!("llm_process_cuda_device_memory_bytes{{{labels}}} 4096.0"),
            "llmscope_uprobe_attachments 20.0".to_owned(),
            r#"llmscope_cuda_launch_counting{mode="sampled"} 1.0"#.to_owned(),
            "llmscope_cuda_launch_probe_duty_ratio 0.25".to_owned(),
        ] {
            assert!(text.lines().any(|l| l == expected), "missing {expected:?} in\n{text}");
        }
        assert!(!text.contains("# EOF") && !text.contains("# UNIT"));
        assert!(
            !text.contains("llmscope_reconcile_repairs"),
            "an empty family is left out"
        );
        assert!(
            text.contains("EXTRAPOLATED"),
            "sampled launch counts say so in HELP"
        );
    }

    #[test]
    fn openmetrics_keeps_eof_and_units() {
        let om = render(snapshot(), BuildInfo::new("ebpf"), Format::OpenMetrics);
        assert!(om.ends_with("# EOF\n"));
        assert!(om.contains("# UNIT llmscope_collector_duration_seconds seconds"));
        assert!(om.contains("# TYPE llm_process_cpu_seconds counter"));
    }

    #[test]
    fn negotiation() {
        assert_eq!(Format::negotiate(None), Format::Text);
        assert_eq!(Format::negotiate(Some("text/plain")), Format::Text);
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::negotiate(Some(prometheus)), Format::OpenMetrics);
    }
}
