//! The exposition of fixed views through every collector that needs no kernel, compared
//! family by family with `testdata/exposition.txt`: a change of any name, help, type, label
//! or value fails here. `LLMSCOPE_BLESS=1` rewrites the file (review the diff).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use agent_common::cuda::{CudaKey, CudaStat, FUNCTIONS};

use super::cuda::{CudaCollector, CudaReading, CudaSource};
use super::gpuinfo::GpuInfoCollector;
use super::nvml::NvmlCollector;
use super::process::ProcessCollector;
use super::servers::ServersCollector;
use crate::cuda::attach::AttachFailure;
use crate::gpuinfo::GpuInfo;
use crate::identity::{Framework, Identity, Role};
use crate::metrics::{ContainerLabels, KindCount, ProcessLabels, ProcessSample};
use crate::servers::{Answer, LoadedModel};
use crate::state::{DeviceSample, GpuSample, NvmlState, ProcessGpu};
use crate::state::{Endpoint, GpuInfoView, Member, ProcessView, Published, ServersView};

fn labels(pid: u32, framework: Framework, model: &str) -> ProcessLabels {
    let identity = Identity::new(framework, Role::Server, Some(model.to_owned()));
    ProcessLabels::new(pid, "python3", &identity)
}

fn processes() -> ProcessView {
    let vllm = labels(10, Framework::Vllm, "meta-llama/Llama-3.1-8B-Instruct").in_container(
        ContainerLabels {
            container_id: "0123456789ab".into(),
            container: "vllm".into(),
            pod: "vllm-0".into(),
            namespace: "serving".into(),
        },
    );
    let llama = labels(11, Framework::LlamaCpp, "tiny-llama");
    let gone = labels(12, Framework::Ollama, "ollama");
    let sample = |labels: &ProcessLabels, alive, cpu_percent, threads| ProcessSample {
        labels: labels.clone(),
        ppid: 1,
        alive,
        cpu_seconds: 12.5,
        cpu_percent,
        memory_bytes: 1 << 30,
        threads,
        start_time_seconds: 1_700_000_000.0,
    };
    ProcessView {
        members: [(&vllm, true), (&llama, true), (&gone, false)]
            .into_iter()
            .map(|(l, alive)| Member {
                pid: l.pid.parse().unwrap(),
                labels: l.clone(),
                alive,
            })
            .collect(),
        samples: vec![
            sample(&vllm, true, Some(50.0), Some(8)),
            sample(&llama, true, None, Some(2)),
            sample(&gone, false, Some(1.5), None),
        ],
        dropped: 2,
        model_names_capped: 1,
        rules: Some(crate::tracker::RuleCounts {
            matches: vec![("acme-infer".into(), 3), ("notebooks".into(), 0)],
            reload_failures: 1,
        }),
        error: None,
        container_lookups: KindCount::list(&[("ok", 3), ("not_found", 1), ("error", 0)]),
    }
}

fn servers(view: &ProcessView) -> ServersView {
    let model = |name: &str, expires_at| LoadedModel {
        name: name.into(),
        size_bytes: 4 << 30,
        vram_bytes: 3 << 30,
        expires_at,
    };
    let endpoint = |i: usize, target: &str, path, answer| Endpoint {
        labels: view.members[i].labels.clone(),
        target: target.into(),
        path,
        answer,
    };
    ServersView {
        endpoints: vec![
            endpoint(0, "10.0.0.5:8000", "/metrics", Answer::Metrics),
            endpoint(1, "127.0.0.1:8080", "/metrics", Answer::Disabled),
            endpoint(
                2,
                "127.0.0.1:11434",
                "/api/ps",
                Answer::Ollama(vec![
                    model("llama3:8b", Some(1.8e9)),
                    model("qwen:0.5b", None),
                ]),
            ),
            // A second socket of the same server: its models are not counted twice.
            endpoint(
                2,
                "[::1]:11434",
                "/api/ps",
                Answer::Ollama(vec![model("llama3:8b", Some(1.8e9))]),
            ),
        ],
        probes: KindCount::list(&[("metrics", 4), ("refused", 2), ("timeout", 0)]),
    }
}

fn nvml() -> NvmlState {
    let device = |index: u32| DeviceSample {
        index,
        uuid: format!("GPU-{index}"),
        name: "NVIDIA H100".into(),
        utilization_percent: Some(40.0 + index as f64),
        memory_utilization_percent: Some(20.0),
        memory_total_bytes: Some(80e9),
        memory_used_bytes: Some(30e9),
        memory_free_bytes: Some(50e9),
        temperature_celsius: Some(61.0),
        power_watts: Some(300.5),
        power_limit_watts: Some(700.0),
        sm_clock_hertz: Some(1.98e9),
        memory_clock_hertz: Some(2.6e9),
        // Not supported by this device: left out, never 0.
        fan_speed_percent: (index == 0).then_some(30.0),
        energy_joules: Some(123456.0),
        pcie_tx_bytes_per_second: Some(1e6),
        pcie_rx_bytes_per_second: Some(2e6),
        ecc_corrected_errors: Some(1.0),
        ecc_uncorrected_errors: (index == 0).then_some(0.0),
        throttle_reasons: vec![("sw_power_cap".into(), true), ("hw_slowdown".into(), false)],
    };
    NvmlState {
        sample: Some(GpuSample {
            driver_version: Some("580.65.06".into()),
            cuda_version: Some("13.0".into()),
            devices: vec![device(0), device(1)],
            processes: vec![
                ProcessGpu {
                    pid: 10,
                    gpu: 0,
                    memory_bytes: Some(20e9),
                    sm_utilization_percent: Some(35.0),
                    memory_utilization_percent: Some(12.0),
                },
                ProcessGpu {
                    pid: 11,
                    gpu: 1,
                    memory_bytes: Some(1e9),
                    sm_utilization_percent: None,
                    memory_utilization_percent: None,
                },
                // Not tracked: no series.
                ProcessGpu {
                    pid: 99,
                    gpu: 0,
                    memory_bytes: Some(5e9),
                    ..Default::default()
                },
            ],
            needs_reinit: false,
        }),
        last_success: Some(SystemTime::now()),
        error: None,
    }
}

fn gpu_info(view: &ProcessView) -> GpuInfoView {
    let report = |pid: u32, gpu_utilization| GpuInfo {
        version: 2,
        pid,
        start_time_ticks: Some(1000),
        gpu_memory_allocated_bytes: 18e9,
        gpu_memory_reserved_bytes: 19e9,
        gpu_utilization,
        gpu_index: pid - 10,
        timestamp: 1_700_000_100.0,
    };
    GpuInfoView {
        // pid 10 has NVML utilisation on gpu 0 (the report's is not used), pid 11 none.
        reports: vec![
            (view.members[0].labels.clone(), report(10, Some(90.0))),
            (view.members[1].labels.clone(), report(11, Some(70.0))),
        ],
        rejected: KindCount::list(&[("malformed", 2), ("stale", 0)]),
        scans_truncated: 1,
        error: None,
    }
}

struct FixedRequests;

impl super::requests::RequestSource for FixedRequests {
    fn read(&self, f: &mut dyn FnMut(super::requests::RequestReading<'_>)) {
        use crate::requests::exchange::{Completed, TokenSource};
        let mut metrics = crate::requests::RequestMetrics::default();
        let exchange = |model: Option<&str>, status, streamed, tokens| Completed {
            route: "/v1/chat/completions",
            model: model.map(str::to_owned),
            status,
            streamed,
            duration_ns: 1_200_000_000,
            first_byte_ns: Some(200_000_000),
            input_tokens: Some(12),
            output_tokens: tokens,
        };
        metrics.add(
            11,
            &exchange(
                Some("tiny-llama"),
                200,
                true,
                Some((11, TokenSource::Server)),
            ),
        );
        metrics.add(
            11,
            &exchange(None, 200, true, Some((5, TokenSource::Chunks))),
        );
        metrics.add(11, &exchange(Some("other-model"), 503, false, None));
        // A process the view does not hold: not exported.
        metrics.add(99, &exchange(Some("gone"), 200, false, None));
        let mut stats = crate::requests::Stats {
            other_exchanges: 4,
            overflow: 1,
            ..Default::default()
        };
        stats.given_up.insert("tls", 2);
        f(super::requests::RequestReading {
            metrics: &metrics,
            stats: &stats,
            in_flight: &HashMap::from([(11, 1)]),
        });
    }

    fn probes(&self) -> (usize, Vec<(&'static str, u64)>) {
        (1, vec![("go", 1)])
    }

    fn hook(&self) -> &'static str {
        "fentry"
    }
}

struct FixedCuda;

impl CudaSource for FixedCuda {
    fn read(&self, _: &[Member]) -> CudaReading {
        let id = |name: &str| FUNCTIONS.iter().position(|f| f.name == name).unwrap() as u8;
        let key = |tgid, name, direction, code| CudaKey {
            tgid,
            generation: 1,
            function: id(name),
            direction,
            code,
        };
        let stat = |calls, bytes, nanos| CudaStat {
            calls,
            bytes,
            nanos,
        };
        let mut launch_totals = HashMap::new();
        launch_totals.insert((10, id("cudaLaunchKernel")), 4000.0);
        CudaReading {
            stats: vec![
                (key(10, "cudaMalloc", 0, 0), stat(3, 3 << 20, 0)),
                (key(10, "cudaMalloc", 0, 2), stat(1, 0, 0)),
                (key(10, "cudaFree", 0, 0), stat(2, 0, 0)),
                (key(10, "cudaMemcpy", 1, 0), stat(5, 5000, 0)),
                (key(10, "cudaLaunchKernel", 0, 0), stat(40, 0, 0)),
                (
                    key(10, "cudaStreamSynchronize", 0, 0),
                    stat(7, 0, 2_500_000_000),
                ),
                (key(11, "cuMemAlloc_v2", 0, 0), stat(1, 1 << 30, 0)),
                (key(11, "cuMemcpyHtoD_v2", 1, 0), stat(2, 4096, 0)),
                (key(11, "cuGraphLaunch", 0, 0), stat(9, 0, 0)),
                (key(11, "cuLaunchKernel", 0, 700), stat(1, 0, 0)),
            ],
            live: vec![(10, 3 << 20), (11, u64::MAX - 7)],
            launch_totals,
            launch_mode: crate::cuda::launches::LaunchMode::Sampled,
            duty: 0.05,
            period: Duration::from_secs(2),
            cycle: crate::cuda::launches::CycleCost {
                cpu: Duration::from_millis(15),
                wall: Duration::from_millis(40),
                stall: Duration::from_millis(12),
            },
            hit_cost: Some(Duration::from_nanos(700)),
            attacher: {
                let mut a = crate::cuda::attach::AttacherStats::default();
                a.probes = 31;
                a.libraries = vec![("runtime", 1), ("driver", 1)];
                a.failures = [
                    (AttachFailure::Unreadable, 2),
                    (AttachFailure::NoCudaSymbols, 0),
                ]
                .into_iter()
                .collect();
                a.detached = 3;
                a
            },
            detach_backlog: 4,
            attach_requests_dropped: 5,
            library_hook: "fentry",
        }
    }
}

/// Every family of the text exposition: name → its HELP, TYPE and UNIT lines, and its
/// samples sorted (the order of families and samples is not part of the contract). The
/// values of the collector durations and of the NVML timestamp are the clock's.
fn families(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut families: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut current = String::new();
    for line in text.lines() {
        if let Some(rest) = line
            .strip_prefix("# HELP ")
            .or_else(|| line.strip_prefix("# TYPE "))
            .or_else(|| line.strip_prefix("# UNIT "))
        {
            current = rest.split(' ').next().unwrap().to_owned();
            families
                .entry(current.clone())
                .or_default()
                .push(line.to_owned());
            continue;
        }
        let clocked = ["llmscope_collector_duration", "llmscope_nvml_last_success"];
        let line = match line.rsplit_once(' ') {
            Some((series, _)) if clocked.iter().any(|c| series.starts_with(c)) => {
                format!("{series} <clock>")
            }
            _ => line.to_owned(),
        };
        families.entry(current.clone()).or_default().push(line);
    }
    for lines in families.values_mut() {
        let samples = lines.split_off(lines.iter().take_while(|l| l.starts_with('#')).count());
        let mut samples = samples;
        samples.sort();
        lines.extend(samples);
    }
    families
}

fn render_fixed() -> String {
    let view = processes();
    let servers = servers(&view);
    let gpu_info = gpu_info(&view);
    let view = Arc::new(Published::new(view));
    let nvml = Arc::new(Published::new(nvml()));
    let collectors: Vec<Box<dyn crate::metrics::Collector>> = vec![
        Box::new(ProcessCollector::new(view.clone())),
        Box::new(ServersCollector::new(Arc::new(Published::new(servers)))),
        Box::new(CudaCollector::new(Arc::new(FixedCuda), view.clone())),
        Box::new(super::requests::RequestCollector::new(
            Arc::new(FixedRequests),
            view.clone(),
        )),
        Box::new(NvmlCollector::new(
            nvml.clone(),
            view.clone(),
            Duration::from_secs(1),
        )),
        Box::new(GpuInfoCollector::new(
            Arc::new(Published::new(gpu_info)),
            Some(nvml),
        )),
    ];
    let build = crate::metrics::BuildInfo {
        version: "0.1.0".into(),
        mode: "ebpf".into(),
    };
    crate::metrics::exposition::render(
        crate::metrics::gather(&collectors, &build),
        crate::metrics::exposition::Format::Text,
    )
}

#[test]
fn the_exposition_of_fixed_views_is_the_golden_one() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src/collectors/testdata/exposition.txt");
    let text = render_fixed();
    if std::env::var_os("LLMSCOPE_BLESS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &text).unwrap();
    }
    let golden = std::fs::read_to_string(&path).unwrap();
    let (got, want) = (families(&text), families(&golden));
    for name in want.keys().chain(got.keys()) {
        assert_eq!(
            got.get(name),
            want.get(name),
            "family {name} differs; LLMSCOPE_BLESS=1 rewrites {} (review the diff)",
            path.display()
        );
    }
}
