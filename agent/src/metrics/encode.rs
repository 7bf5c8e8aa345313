//! Encoding a [`Snapshot`] with prometheus-client: one `Collector` over the whole snapshot,
//! using const metrics (values were read by the collectors, not kept in live metric objects).

use std::collections::BTreeMap;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;

use super::cuda::{Api, CudaSnapshot, LaunchMode};
use super::gpu::GpuSnapshot;
use super::{BuildInfo, KindCount, ProcessLabels, ProcessSample, Snapshot};

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, EncodeLabelSet)]
struct CountLabels {
    llm_type: String,
    model_name: String,
    framework: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CollectorLabel {
    collector: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

/// The snapshot of one scrape plus the build's static info.
#[derive(Debug)]
pub struct SnapshotCollector {
    pub snapshot: Snapshot,
    pub build: BuildInfo,
}

fn family<'a, L: EncodeLabelSet + 'a>(
    encoder: &mut DescriptorEncoder,
    kind: MetricType,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    samples: impl IntoIterator<Item = (&'a L, f64)>,
) -> Result<(), std::fmt::Error> {
    let mut samples = samples.into_iter().peekable();
    if samples.peek().is_none() {
        return Ok(());
    }
    let mut metric = encoder.encode_descriptor(name, help, unit, kind)?;
    for (labels, value) in samples {
        let sample = metric.encode_family(labels)?;
        match kind {
            MetricType::Counter => ConstCounter::new(value).encode(sample)?,
            _ => ConstGauge::new(value).encode(sample)?,
        }
    }
    Ok(())
}

/// A family with one unlabelled sample.
fn scalar(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    value: f64,
) -> Result<(), std::fmt::Error> {
    let metric = encoder.encode_descriptor(name, help, None, kind)?;
    match kind {
        MetricType::Counter => ConstCounter::new(value).encode(metric),
        _ => ConstGauge::new(value).encode(metric),
    }
}

fn per_process<'a>(
    processes: &'a [ProcessSample],
    value: impl Fn(&ProcessSample) -> Option<f64> + 'a,
) -> impl Iterator<Item = (&'a ProcessLabels, f64)> + 'a {
    processes
        .iter()
        .filter_map(move |p| value(p).map(|v| (&p.labels, v)))
}

fn kinds(counts: &[KindCount]) -> Vec<(KindLabel, f64)> {
    counts
        .iter()
        .map(|c| {
            (
                KindLabel {
                    kind: c.kind.to_owned(),
                },
                c.value as f64,
            )
        })
        .collect()
}

fn by_ref<L>(samples: &[(L, f64)]) -> impl Iterator<Item = (&L, f64)> {
    samples.iter().map(|(l, v)| (l, *v))
}

fn collectors(
    s: &Snapshot,
    value: impl Fn(&super::CollectorStatus) -> f64,
) -> Vec<(CollectorLabel, f64)> {
    s.collectors
        .iter()
        .map(|c| {
            (
                CollectorLabel {
                    collector: c.collector.to_owned(),
                },
                value(c),
            )
        })
        .collect()
}

impl Collector for SnapshotCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.snapshot;
        let p = &s.processes;

        let mut counts: BTreeMap<CountLabels, f64> = BTreeMap::new();
        for proc in p.iter().filter(|p| p.alive) {
            let key = CountLabels {
                llm_type: proc.labels.llm_type.clone(),
                model_name: proc.labels.model_name.clone(),
                framework: proc.labels.framework.clone(),
            };
            *counts.entry(key).or_default() += 1.0;
        }
        family(
            &mut e,
            MetricType::Gauge,
            "llm_process_count",
            "Running LLM processes by model family, model and framework.",
            None,
            counts.iter().map(|(l, v)| (l, *v)),
        )?;
        family(
            &mut e,
            MetricType::Gauge,
            "llm_process_cpu_percent",
            "CPU use of the process over its last window of at least 1 s, as the agent samples it every second (not since the previous scrape), in percent of one core.",
            None,
            per_process(p, |s| s.cpu_percent),
        )?;
        family(
            &mut e,
            MetricType::Counter,
            "llm_process_cpu_seconds",
            "CPU time (user + system) the process has used.",
            None,
            per_process(p, |s| Some(s.cpu_seconds)),
        )?;
        family(
            &mut e,
            MetricType::Gauge,
            "llm_process_memory_bytes",
            "Resident set size of the process.",
            None,
            per_process(p, |s| Some(s.memory_bytes as f64)),
        )?;
        family(
            &mut e,
            MetricType::Gauge,
            "llm_process_threads",
            "Threads in the process.",
            None,
            per_process(p, |s| s.threads.map(|t| t as f64)),
        )?;
        family(
            &mut e,
            MetricType::Gauge,
            "llm_process_start_time_seconds",
            "Start time of the process, seconds since the Unix epoch.",
            None,
            per_process(p, |s| Some(s.start_time_seconds)),
        )?;

        family(
            &mut e,
            MetricType::Gauge,
            "llmscope_build_info",
            "llmscope version and mode; always 1.",
            None,
            [(&self.build, 1.0)],
        )?;
        family(
            &mut e,
            MetricType::Gauge,
            "llmscope_collector_success",
            "Whether the collector worked on this scrape (1) or failed (0).",
            None,
            by_ref(&collectors(s, |c| if c.success { 1.0 } else { 0.0 })),
        )?;
        family(
            &mut e,
            MetricType::Gauge,
            "llmscope_collector_duration",
            "How long the collector took on this scrape.",
            Some(&Unit::Seconds),
            by_ref(&collectors(s, |c| c.duration_seconds)),
        )?;
        scalar(
            &mut e,
            "llmscope_tracked_processes",
            "LLM processes in the agent's table, including those in their grace period after exit.",
            MetricType::Gauge,
            s.agent.tracked_processes as f64,
        )?;
        scalar(
            &mut e,
            "llmscope_tracked_processes_dropped",
            "LLM processes not tracked because the table was full (--max-processes).",
            MetricType::Counter,
            s.agent.tracked_dropped as f64,
        )?;
        scalar(
            &mut e,
            "llmscope_model_names_capped",
            "LLM processes exported with model_name=\"other\" because the distinct model names reached --max-model-names.",
            MetricType::Counter,
            s.agent.model_names_capped as f64,
        )?;
        family(
            &mut e,
            MetricType::Counter,
            "llmscope_events",
            "Kernel events received, by kind.",
            None,
            by_ref(&kinds(&s.agent.events)),
        )?;
        family(&mut e,MetricType::Counter, "llmscope_events_lost", "Kernel events lost because the ring buffer was full, by kind; reconciliation repairs what they missed.", None, by_ref(&kinds(&s.agent.events_lost)))?;
        family(
            &mut e,
            MetricType::Counter,
            "llmscope_reconcile_repairs",
            "Processes whose exec or exit the /proc reconciliation found missing, by kind.",
            None,
            by_ref(&kinds(&s.agent.repairs)),
        )?;
        family(
            &mut e,
            MetricType::Counter,
            "llmscope_container_lookups",
            "Container name lookups in the container runtime, by result (ok, not_found, error; dropped: the lookup queue was full).",
            None,
            by_ref(&kinds(&s.agent.container_lookups)),
        )?;
        family(
            &mut e,
            MetricType::Counter,
            "llmscope_server_probes",
            "Probes of inference servers' API paths, by outcome (metrics, disabled, ollama; refused, timeout, too_large, wrong_content_type, other: not a target).",
            None,
            by_ref(&kinds(&s.agent.server_probes)),
        )?;
        let endpoints: Vec<((ProcessLabels, EndpointLabels), f64)> = s
            .server_endpoints
            .iter()
            .map(|(labels, target, state)| {
                let extra = EndpointLabels {
                    endpoint: target.clone(),
                    state: (*state).to_owned(),
                };
                ((labels.clone(), extra), 1.0)
            })
            .collect();
        family(
            &mut e,
            MetricType::Gauge,
            "llm_server_metrics_endpoint",
            "An inference server's own endpoint (1), by address; state=\"metrics\": published for Prometheus at /api/sd; \"disabled\": the server answers there without metrics (llama.cpp without --metrics); \"ollama_api\": Ollama's /api/ps (no Prometheus metrics; see llm_ollama_*).",
            None,
            by_ref(&endpoints),
        )?;
        let ollama =
            |value: fn(&crate::servers::LoadedModel) -> Option<f64>| -> Vec<(ProcessLabels, f64)> {
                s.ollama_models
                    .iter()
                    .filter_map(|(labels, m)| Some((labels.clone(), value(m)?)))
                    .collect()
            };
        family(&mut e, MetricType::Gauge, "llm_ollama_model_size_bytes", "Size of a model an Ollama server has loaded (GET /api/ps), bytes; model_name is the loaded model.", None, by_ref(&ollama(|m| Some(m.size_bytes as f64))))?;
        family(
            &mut e,
            MetricType::Gauge,
            "llm_ollama_model_vram_bytes",
            "Part of a loaded Ollama model held in GPU memory (GET /api/ps), bytes.",
            None,
            by_ref(&ollama(|m| Some(m.vram_bytes as f64))),
        )?;
        family(
            &mut e,
            MetricType::Gauge,
            "llm_ollama_model_expiry_timestamp_seconds",
            "When Ollama unloads a model unless it is used again (GET /api/ps), Unix seconds.",
            None,
            by_ref(&ollama(|m| m.expires_at)),
        )?;
        encode_cuda(&mut e, &s.cuda)?;
        encode_gpu(&mut e, &s.gpu)?;
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ModeLabel {
    mode: String,
}

fn encode_cuda(e: &mut DescriptorEncoder, c: &CudaSnapshot) -> Result<(), std::fmt::Error> {
    use MetricType::{Counter, Gauge};
    family(e, Counter, "llm_process_cuda_calls", "CUDA API calls by API layer and function. Runtime calls may also reach probed driver functions: never add the two layers.", None, by_ref(&c.calls))?;
    family(e, Counter, "llm_process_cuda_errors", "CUDA API calls that returned an error, by function and error code (functions with return probes: not kernel launches).", None, by_ref(&c.errors))?;
    family(e, Counter, "llm_process_cuda_oom", "CUDA allocations that failed with out-of-memory (cudaErrorMemoryAllocation / CUDA_ERROR_OUT_OF_MEMORY).", None, by_ref(&c.oom))?;
    family(
        e,
        Counter,
        "llm_process_cuda_alloc_bytes",
        "Bytes of device memory allocated successfully.",
        None,
        by_ref(&c.alloc_bytes),
    )?;
    family(
        e,
        Counter,
        "llm_process_cuda_free",
        "Device memory frees.",
        None,
        by_ref(&c.frees),
    )?;
    family(
        e,
        Gauge,
        "llm_process_cuda_device_memory_bytes",
        "Live device memory from allocation/free pairs seen by the probes.",
        None,
        by_ref(&c.device_memory),
    )?;
    let launch_help = match c.launch_mode {
        LaunchMode::Sampled => "Kernel launches. EXTRAPOLATED: launch probes are attached for a window of each period (--cuda-overhead-budget); see llmscope_cuda_launch_probe_duty_ratio.",
        _ => "Kernel launches (cudaLaunchKernel*, cuLaunchKernel*), counted exactly.",
    };
    family(
        e,
        Counter,
        "llm_process_cuda_kernel_launches",
        launch_help,
        None,
        by_ref(&c.launches),
    )?;
    family(
        e,
        Counter,
        "llm_process_cuda_graph_launches",
        "CUDA graph launches.",
        None,
        by_ref(&c.graph_launches),
    )?;
    family(
        e,
        Counter,
        "llm_process_cuda_memcpy_bytes",
        "Bytes copied by cudaMemcpy* / cuMemcpy*, by direction (h2d, d2h, d2d, h2h, default).",
        None,
        by_ref(&c.memcpy_bytes),
    )?;
    family(
        e,
        Counter,
        "llm_process_cuda_sync_seconds",
        "Time the CPU waited in stream / device / event / context synchronize calls.",
        None,
        by_ref(&c.sync_seconds),
    )?;
    scalar(
        e,
        "llmscope_uprobe_attachments",
        "Uprobe links attached to CUDA libraries now.",
        Gauge,
        c.attachments as f64,
    )?;
    family(
        e,
        Gauge,
        "llmscope_cuda_libraries",
        "CUDA library files probed, by API.",
        None,
        by_ref(&api_counts(&c.libraries)),
    )?;
    family(
        e,
        Counter,
        "llmscope_uprobe_attach_failures",
        "CUDA libraries that could not be probed, by reason.",
        None,
        by_ref(&reasons(&c.attach_failures)),
    )?;
    scalar(
        e,
        "llmscope_cuda_library_detaches",
        "CUDA library files whose probes were removed because no process mapped them any more (--cuda-library-idle-timeout).",
        Counter,
        c.library_detaches as f64,
    )?;
    scalar(
        e,
        "llmscope_uprobe_detach_backlog",
        "Uprobe links of removed libraries not detached yet: each detach waits for a kernel grace period, done while no attach waits.",
        Gauge,
        c.detach_backlog as f64,
    )?;
    scalar(
        e,
        "llmscope_cuda_attach_requests_dropped",
        "Requests to probe a newly mapped CUDA library dropped because the attach queue was full; the next /proc scan probes the library.",
        Counter,
        c.attach_requests_dropped as f64,
    )?;
    let hook = [(
        HookLabel {
            hook: c.library_hook.to_owned(),
        },
        1.0,
    )];
    family(
        e,
        Gauge,
        "llmscope_library_hook",
        "How the kernel reports libraries being mapped: fentry or kprobe on security_mmap_file, or none (found by /proc scans only); always 1.",
        None,
        by_ref(&hook),
    )?;
    let mode = [(
        ModeLabel {
            mode: c.launch_mode.as_str().to_owned(),
        },
        1.0,
    )];
    family(
        e,
        Gauge,
        "llmscope_cuda_launch_counting",
        "How kernel launches are counted now (exact, sampled or off); always 1.",
        None,
        by_ref(&mode),
    )?;
    scalar(
        e,
        "llmscope_cuda_launch_probe_duty_ratio",
        "Fraction of the next period the kernel-launch probes will be attached.",
        Gauge,
        c.launch_duty,
    )?;
    scalar(
        e,
        "llmscope_cuda_launch_probe_attached_seconds",
        "Time the kernel-launch probes were attached; its rate is the time-weighted duty.",
        Counter,
        c.launch_attached_seconds,
    )?;
    scalar(
        e,
        "llmscope_cuda_launch_probe_period_seconds",
        "Period of the launch-probe duty cycle in use (lengthened when a cycle is costly).",
        Gauge,
        c.launch_period_seconds,
    )?;
    scalar(
        e,
        "llmscope_cuda_launch_probe_cycle_cpu_seconds",
        "CPU time one attach and detach of the launch probes cost, as last measured; charged to --cuda-overhead-budget.",
        Gauge,
        c.launch_cycle_cpu_seconds,
    )?;
    scalar(
        e,
        "llmscope_cuda_launch_probe_cycle_wall_seconds",
        "Wall time one attach and detach of the launch probes took, as last measured (detaches wait for RCU grace periods).",
        Gauge,
        c.launch_cycle_wall_seconds,
    )
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct HookLabel {
    hook: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct EndpointLabels {
    endpoint: String,
    state: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

fn api_counts(counts: &[KindCount]) -> Vec<(Api, f64)> {
    counts
        .iter()
        .map(|c| {
            (
                Api {
                    api: c.kind.to_owned(),
                },
                c.value as f64,
            )
        })
        .collect()
}

fn reasons(counts: &[KindCount]) -> Vec<(ReasonLabel, f64)> {
    counts
        .iter()
        .map(|c| {
            (
                ReasonLabel {
                    reason: c.kind.to_owned(),
                },
                c.value as f64,
            )
        })
        .collect()
}

fn encode_gpu(e: &mut DescriptorEncoder, g: &GpuSnapshot) -> Result<(), std::fmt::Error> {
    use MetricType::{Counter, Gauge};
    for (name, help, samples) in &g.devices {
        family(e, Gauge, name, help, None, by_ref(samples))?;
    }
    family(
        e,
        Counter,
        "nvidia_gpu_energy_joules",
        "Energy the GPU consumed since the driver loaded.",
        None,
        by_ref(&g.energy_joules),
    )?;
    family(
        e,
        Counter,
        "nvidia_gpu_ecc_errors",
        "Volatile ECC errors since the driver loaded, by type (corrected, uncorrected) in `kind`.",
        None,
        by_ref(&g.ecc_errors),
    )?;
    family(
        e,
        Gauge,
        "nvidia_gpu_throttle_reason",
        "1 when the clock throttle reason in `kind` is active.",
        None,
        by_ref(&g.throttle_reasons),
    )?;
    family(
        e,
        Gauge,
        "nvidia_gpu_info",
        "GPU identity with driver and CUDA versions; always 1.",
        None,
        by_ref(&g.info),
    )?;
    family(e, Gauge, "llm_process_gpu_memory_bytes", "GPU memory the process holds on `gpu`, from NVML's running compute and graphics processes.", None, by_ref(&g.process_memory))?;
    family(
        e,
        Gauge,
        "llm_process_gpu_utilization",
        "SM utilisation of the process on `gpu`, percent, from NVML's process utilisation samples.",
        None,
        by_ref(&g.process_utilization),
    )?;
    family(
        e,
        Gauge,
        "llm_process_gpu_memory_utilization",
        "Memory-controller utilisation of the process on `gpu`, percent.",
        None,
        by_ref(&g.process_memory_utilization),
    )?;
    family(e, Gauge, "llm_process_gpu_memory_allocated_bytes", "GPU memory the process reports its framework has allocated (gpu-info file; PyTorch: memory_allocated).", None, by_ref(&g.process_allocated))?;
    family(e, Gauge, "llm_process_gpu_memory_reserved_bytes", "GPU memory the process reports its framework has reserved from the driver (gpu-info file; PyTorch: memory_reserved). Reserved minus allocated is fragmentation and cache.", None, by_ref(&g.process_reserved))?;
    if let Some(n) = g.info_reports {
        scalar(
            e,
            "llmscope_gpu_info_reports",
            "gpu-info reports accepted on the last scan of --gpu-info-dir (once a second).",
            Gauge,
            n,
        )?;
        family(
            e,
            Counter,
            "llmscope_gpu_info_rejected",
            "gpu-info reports refused, by reason; each version of a file is counted once.",
            None,
            by_ref(&reasons(&g.info_rejected)),
        )?;
        scalar(
            e,
            "llmscope_gpu_info_scans_truncated",
            "Scans of --gpu-info-dir that stopped after 4096 directory entries (the rest of the directory was not looked at that second).",
            Counter,
            g.info_scans_truncated as f64,
        )?;
    }
    if let Some(t) = g.last_success_seconds {
        scalar(e, "llmscope_nvml_last_success_timestamp_seconds", "Unix time of the last successful NVML sample. GPU values come from that sample: NVML is read off the scrape path, so a hung NVML call leaves them stale rather than hanging the scrape.", Gauge, t)?;
    }
    Ok(())
}
