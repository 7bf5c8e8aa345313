//! The Linux agent: producer threads own the state (process table, kernel maps, caches) and
//! publish views; collectors read the views at scrape time and change nothing. The data flow
//! is drawn in the README (Architecture). [`wire`] builds the parts, [`spawn_producers`]
//! hands each thread the parts it writes or reads, [`collectors`] gives each collector the
//! view it reads; [`run`] is those steps, the HTTP server, and the shutdown in order.
//!
//! Collectors import nothing from here: each takes the narrow handle it reads
//! (`crate::state`, or a trait it defines that this module implements).

mod containers;
mod cuda;
mod events;
#[cfg(feature = "test-faults")]
mod faults;
mod health;
mod libraries;
mod nvml;
mod observe;
mod reconcile;
mod requests;
mod sampler;
mod servers;
mod table;
mod wakeup;

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use aya::maps::{MapData, RingBuf};

use crate::collectors::{
    cuda::CudaCollector, gpuinfo::GpuInfoCollector, kernel::KernelCollector, nvml::NvmlCollector,
    process::ProcessCollector, requests::RequestCollector, servers::ServersCollector,
};
use crate::config::{Config, RequestsMode};
use crate::cuda::attach::{Attacher, AttacherStats};
use crate::cuda::launches::LaunchEstimates;
use crate::cuda::launches::LaunchMode;
use crate::ebpf::{CudaMaps, HookProgram, LostCounters, MmapHook, Sensor};
use crate::http::MetricsSource;
use crate::metrics::{gather, BuildInfo, Collector, Families};
use crate::proc::ProcRoot;
use crate::state::NvmlState;
use crate::state::{Counters, GpuInfoView, ProcessView, Published, ServersView};
use crate::tracker::Tracker;

use table::{Life, Table};

/// How long each shutdown step (HTTP, threads) may take before it is cut short.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The CUDA probes' attachments, maps, retired generations and launch estimates. Lock order:
/// retired before maps; otherwise never two at once.
struct CudaState {
    /// Owns the loaded eBPF object: every program and attachment lives as long as it does.
    attacher: Mutex<Attacher>,
    /// What the attacher looked like when last unlocked (what scrapes read).
    attacher_stats: Mutex<AttacherStats>,
    maps: Mutex<CudaMaps>,
    launches: Mutex<LaunchEstimates>,
    retired: Mutex<cuda::Retired>,
    queue: libraries::AttachQueue,
    /// Links of detached libraries not dropped yet (each drop waits for a grace period).
    detach_backlog: AtomicU64,
    /// How the kernel reports library mappings.
    mmap_hook: MmapHook,
}

/// The locked attacher; unlocking it publishes its stats.
struct AttacherGuard<'a> {
    attacher: MutexGuard<'a, Attacher>,
    stats: &'a Mutex<AttacherStats>,
}

impl std::ops::Deref for AttacherGuard<'_> {
    type Target = Attacher;
    fn deref(&self) -> &Attacher {
        &self.attacher
    }
}

impl std::ops::DerefMut for AttacherGuard<'_> {
    fn deref_mut(&mut self) -> &mut Attacher {
        &mut self.attacher
    }
}

impl Drop for AttacherGuard<'_> {
    fn drop(&mut self) {
        *self
            .stats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = self.attacher.stats();
    }
}

impl CudaState {
    /// The attacher's state as of its last unlock; never waits for an attach.
    fn attacher_stats(&self) -> AttacherStats {
        self.attacher_stats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn retired(&self) -> MutexGuard<'_, cuda::Retired> {
        self.retired
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Attach requests dropped because the attach queue was full.
    fn attach_requests_dropped(&self) -> u64 {
        self.queue.dropped()
    }

    fn attacher(&self) -> AttacherGuard<'_> {
        AttacherGuard {
            attacher: self
                .attacher
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            stats: &self.attacher_stats,
        }
    }

    fn maps(&self) -> MutexGuard<'_, CudaMaps> {
        self.maps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn launches(&self) -> MutexGuard<'_, LaunchEstimates> {
        self.launches
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// What `/metrics`, `/api/processes`, `/api/sd` and `/healthz` read.
struct AgentSource {
    collectors: Vec<Box<dyn Collector>>,
    health: Arc<health::Health>,
    servers: Arc<Published<ServersView>>,
    processes: Arc<Published<ProcessView>>,
    /// What `/api/v1/processes` adds to the processes.
    cuda: Arc<CudaState>,
    requests: Arc<requests::Requests>,
    nvml: Arc<Published<NvmlState>>,
}

impl MetricsSource for AgentSource {
    fn gather(&self) -> Families {
        gather(&self.collectors, &BuildInfo::new("ebpf"))
    }

    /// The sampler's published view: no collector runs, no lock a producer needs is taken.
    fn processes(&self) -> Vec<crate::metrics::ProcessSample> {
        self.processes.get().samples.clone()
    }

    fn build_info(&self) -> BuildInfo {
        BuildInfo::new("ebpf")
    }

    /// The same reads as a scrape's (the published views, one read of the CUDA maps).
    fn node(&self) -> crate::api::Node {
        let view = self.processes.get();
        let nvml = self.nvml.get();
        let cuda = crate::collectors::cuda::per_process(
            &crate::collectors::cuda::CudaSource::read(&*self.cuda, &view.members),
        );
        let requests = crate::collectors::requests::per_process(&*self.requests);
        crate::api::Node::new(crate::api::Parts {
            build: self.build_info(),
            samples: &view.samples,
            nvml: nvml.sample.as_ref(),
            cuda: &cuda,
            requests: &requests,
        })
    }

    fn health(&self) -> Result<(), String> {
        self.health.check()
    }

    fn service_discovery(&self) -> Vec<crate::http::SdTarget> {
        crate::collectors::servers::sd_targets(&self.servers.get().endpoints)
    }
}

/// The agent's parts: the process table, the CUDA state, what the producers publish and
/// count, and their health. Each thread gets only the parts it writes or reads.
struct Parts {
    life: Arc<Life>,
    health: Arc<health::Health>,
    table: Arc<Table>,
    cuda: Arc<CudaState>,
    counters: Arc<Counters>,
    lost: Arc<LostCounters>,
    hook_program: Arc<HookProgram>,
    processes: Arc<Published<ProcessView>>,
    gpu_info: Arc<Published<GpuInfoView>>,
    servers: Arc<Published<ServersView>>,
    nvml: Arc<Published<NvmlState>>,
    requests: Arc<requests::Requests>,
}

/// What the threads consume once: the kernel's queues and the job queues.
struct Inputs {
    ring: RingBuf<MapData>,
    http_ring: Option<RingBuf<MapData>>,
    mmap_records: Option<crate::ebpf::perf_mmap::MmapRecords>,
    attach_jobs: std::sync::mpsc::Receiver<libraries::AttachJob>,
    container_jobs: Option<(std::sync::mpsc::Receiver<String>, containers::Sources)>,
    /// The rules file, watched for changes by the reconcile thread.
    rules_file: Option<crate::identity::RulesFile>,
}

type Threads = Vec<(&'static str, std::thread::JoinHandle<()>)>;

/// Builds the parts around the loaded sensor.
fn wire(
    config: &Config,
    proc: ProcRoot,
    sensor: Sensor,
    rules: Option<(crate::identity::RulesFile, crate::identity::Rules)>,
) -> (Parts, Inputs) {
    // `programs` holds the attachments: owned by the attacher, dropped after the threads
    // that read the ring buffer have stopped.
    let Sensor {
        programs,
        events,
        lost,
        tracked,
        cuda: cuda_maps,
        mmap_hook,
        mmap_records,
        hook_program,
        http,
        ..
    } = sensor;
    let (http_ring, http_tables) = match http {
        Some(h) => (
            Some(h.events),
            Some(requests::Tables {
                conns: h.conns,
                ports: h.ports,
                kernel: h.kernel,
            }),
        ),
        None => (None, None),
    };
    let sources = container_sources(config);
    let (containers, container_jobs) = containers::Containers::new(sources.any());
    let launch_mode = crate::cuda::launches::mode(config.cuda_overhead_budget);
    let (queue, attach_jobs) = libraries::AttachQueue::new();
    let cuda = CudaState {
        attacher: Mutex::new(Attacher::new(
            programs,
            launch_mode == LaunchMode::Exact,
            config.cuda_max_libraries as usize,
        )),
        attacher_stats: Mutex::new(AttacherStats::default()),
        maps: Mutex::new(cuda_maps),
        launches: Mutex::new(LaunchEstimates::new(launch_mode)),
        retired: Mutex::new(cuda::Retired::default()),
        queue,
        detach_backlog: AtomicU64::new(0),
        mmap_hook,
    };
    let life = Arc::new(Life::default());
    let mut tracker = Tracker::new(config.common.max_processes as usize)
        .with_max_model_names(config.max_model_names as usize);
    let (rules_file, rules) = rules.unzip();
    if let Some(rules) = rules {
        tracker.set_rules(Some(Arc::new(rules)));
    }
    let table = Table::new(
        proc,
        config.common.grace_period,
        tracker,
        Box::new(tracked),
        Arc::new(containers),
        life.clone(),
    );
    let parts = Parts {
        life,
        health: health::Health::new(),
        table: Arc::new(table),
        cuda: Arc::new(cuda),
        counters: Arc::default(),
        lost: Arc::new(lost),
        hook_program: Arc::new(hook_program),
        processes: Arc::default(),
        gpu_info: Arc::default(),
        servers: Arc::default(),
        nvml: Arc::default(),
        requests: Arc::new(requests::Requests::new(config.requests, http_tables)),
    };
    let inputs = Inputs {
        ring: events,
        http_ring,
        mmap_records,
        attach_jobs,
        container_jobs: container_jobs.map(|jobs| (jobs, sources)),
        rules_file,
    };
    (parts, inputs)
}

/// Where container names come from: each source is used when its path exists.
fn container_sources(config: &Config) -> containers::Sources {
    let present = |p: &Option<std::path::PathBuf>, what: &str| {
        let p = p.clone().filter(|p| !p.as_os_str().is_empty())?;
        if p.exists() {
            Some(p)
        } else {
            tracing::info!(path = %p.display(), "no {what} here: not used for container names");
            None
        }
    };
    containers::Sources {
        bundles: crate::identity::oci::Bundles {
            containerd: present(&config.containerd_state, "containerd state"),
            crio: present(&config.crio_storage, "CRI-O storage"),
        },
        docker_socket: present(&config.docker_socket, "Docker socket"),
    }
}

fn gpu_info_dir(config: &Config) -> Option<(std::path::PathBuf, crate::gpuinfo::Limits)> {
    config.common.gpu_info_dir.clone().map(|dir| {
        let limits = crate::gpuinfo::Limits {
            ttl: config.common.gpu_info_ttl,
            ..Default::default()
        };
        (dir, limits)
    })
}

/// Starts every producer thread, each with its handles.
fn spawn_producers(config: &Config, p: &Parts, inputs: Inputs) -> std::io::Result<Threads> {
    let Parts {
        life,
        health,
        table,
        cuda,
        counters,
        lost,
        ..
    } = p;
    let mut threads: Threads = vec![
        (
            "events",
            events::spawn(
                table.clone(),
                cuda.clone(),
                counters.clone(),
                health,
                inputs.ring,
                inputs.mmap_records,
            )?,
        ),
        (
            "reconcile",
            reconcile::spawn(
                table.clone(),
                cuda.clone(),
                counters.clone(),
                health,
                config.rescan_interval,
                lost.clone(),
                inputs.rules_file,
            )?,
        ),
        (
            "attach",
            libraries::spawn(
                table.clone(),
                cuda.clone(),
                health,
                inputs.attach_jobs,
                config.cuda_library_idle_timeout,
            )?,
        ),
        (
            "sampler",
            sampler::spawn(
                table.clone(),
                cuda.clone(),
                counters.clone(),
                health,
                sampler::Views {
                    processes: p.processes.clone(),
                    gpu_info: p.gpu_info.clone(),
                },
                gpu_info_dir(config),
                lost.clone(),
            )?,
        ),
        (
            "servers",
            servers::spawn(
                table.clone(),
                health,
                p.processes.clone(),
                p.servers.clone(),
                config.sd_advertise_host.clone(),
                (p.requests.mode() != RequestsMode::Off)
                    .then(|| (p.requests.clone(), cuda.clone())),
            )?,
        ),
    ];
    if let (RequestsMode::Auto | RequestsMode::All, Some(ring)) =
        (p.requests.mode(), inputs.http_ring)
    {
        let thread = requests::spawn_reader(p.requests.clone(), ring, life.clone(), health)?;
        threads.push(("requests", thread));
    }
    if let Some((jobs, sources)) = inputs.container_jobs {
        let thread = containers::spawn(
            table.containers.clone(),
            table.changed.clone(),
            life.clone(),
            health,
            jobs,
            sources,
        )?;
        threads.push(("containers", thread));
    }
    if !config.no_nvml {
        let thread = nvml::spawn(
            table.clone(),
            health,
            p.nvml.clone(),
            config.nvml_lib.clone(),
            config.nvml_interval,
        )?;
        threads.push(("nvml", thread));
    }
    if crate::cuda::launches::mode(config.cuda_overhead_budget) == LaunchMode::Sampled {
        let thread = cuda::spawn_launch_sampler(
            cuda.clone(),
            life.clone(),
            health,
            config.cuda_overhead_budget,
            config.cuda_launch_period,
        )?;
        threads.push(("launches", thread));
    }
    Ok(threads)
}

/// The collectors of `/metrics`, each with the views it reads.
fn collectors(config: &Config, p: &Parts) -> Vec<Box<dyn Collector>> {
    let mut collectors: Vec<Box<dyn Collector>> = vec![
        Box::new(ProcessCollector::new(p.processes.clone())),
        Box::new(KernelCollector::new(
            p.counters.clone(),
            p.lost.clone(),
            p.hook_program.clone(),
        )),
        Box::new(CudaCollector::new(p.cuda.clone(), p.processes.clone())),
        Box::new(RequestCollector::new(
            p.requests.clone(),
            p.processes.clone(),
        )),
        Box::new(ServersCollector::new(p.servers.clone())),
    ];
    if !config.no_nvml {
        collectors.push(Box::new(NvmlCollector::new(
            p.nvml.clone(),
            p.processes.clone(),
            config.nvml_interval,
        )));
    }
    if config.common.gpu_info_dir.is_some() {
        let nvml = (!config.no_nvml).then(|| p.nvml.clone());
        collectors.push(Box::new(GpuInfoCollector::new(p.gpu_info.clone(), nvml)));
    }
    #[cfg(feature = "test-faults")]
    collectors.extend(faults::collector());
    collectors
}

/// Runs the agent until SIGINT or SIGTERM: loads the sensor, wires the parts, starts the
/// producers and the HTTP server, and stops them all in order.
pub async fn run(config: Config) -> anyhow::Result<()> {
    use anyhow::Context;

    let proc = ProcRoot::new(&config.procfs)
        .with_context(|| format!("--path.procfs {}", config.procfs.display()))?;
    let rules = config.common.load_rules().context("--classify.rules")?;
    if let Some((file, rules)) = &rules {
        tracing::info!(file = %file.path().display(), rules = rules.len(), "classification rules loaded");
    }
    let sensor = Sensor::load(
        config.ring_buffer_bytes,
        config.common.max_processes,
        config.library_hook,
        (config.requests != RequestsMode::Off).then_some(config.requests_hook),
    )?;
    tracing::info!(
        kernel_ppid = sensor.kernel_ppid,
        library_hook = sensor.mmap_hook.as_str(),
        "eBPF exec, exit and fork tracepoints attached"
    );
    let (parts, inputs) = wire(&config, proc, sensor, rules);
    let web = match &config.common.web_config_file {
        Some(path) => Some(Arc::new(crate::web_config::WebConfig::load(path)?)),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(config.common.listen_address)
        .await
        .with_context(|| format!("--web.listen-address {}", config.common.listen_address))?;
    tracing::info!(
        address = %config.common.listen_address,
        tls = web.as_ref().is_some_and(|w| w.current().tls.is_some()),
        basic_auth = web.as_ref().is_some_and(|w| w.current().auth.is_some()),
        "serving /metrics"
    );
    let threads = spawn_producers(&config, &parts, inputs)?;
    let source = Arc::new(AgentSource {
        collectors: collectors(&config, &parts),
        health: parts.health.clone(),
        servers: parts.servers.clone(),
        processes: parts.processes.clone(),
        cuda: parts.cuda.clone(),
        requests: parts.requests.clone(),
        nvml: parts.nvml.clone(),
    });
    let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(crate::http::serve(listener, source, web, async {
        let _ = http_stopped.await;
    }));
    // A producer thread that dies is fatal: the agent stops and exits non-zero, so that a
    // supervisor restarts it. (A stalled one only turns /healthz to 503.)
    let died = tokio::select! {
        () = shutdown_signal() => None,
        name = dead_thread(&parts.health) => Some(name),
    };
    match died {
        Some(name) => tracing::error!(thread = name, "a producer thread died: shutting down"),
        None => tracing::info!("shutting down"),
    }
    parts.health.stopping();
    let _ = stop_http.send(());
    // Scrapers keep connections alive; give in-flight scrapes a bounded time to finish.
    match tokio::time::timeout(SHUTDOWN_GRACE, server).await {
        Ok(Ok(result)) => result.context("serving HTTP")?,
        Ok(Err(e)) => tracing::warn!(error = %e, "the HTTP server task failed"),
        Err(_) => tracing::warn!("HTTP connections still open after {SHUTDOWN_GRACE:?}: cut short"),
    }
    parts.life.stop();
    parts.table.table_changed();
    for (name, handle) in threads {
        match join_within(handle, SHUTDOWN_GRACE) {
            Ok(Ok(())) => {}
            // Its death is logged already.
            Ok(Err(_panic)) => {}
            Err(_) => tracing::warn!(
                thread = name,
                "did not stop within {SHUTDOWN_GRACE:?}; exiting anyway"
            ),
        }
    }
    drop(parts);
    tracing::info!("stopped");
    match died {
        Some(name) => Err(anyhow::anyhow!("the {name} thread died")),
        None => Ok(()),
    }
}

/// Resolves with the name of the first producer thread that died.
async fn dead_thread(health: &health::Health) -> &'static str {
    loop {
        if let Some(name) = health.dead() {
            return name;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Err: still running after `limit`; Ok(Err): it panicked.
fn join_within(
    handle: std::thread::JoinHandle<()>,
    limit: Duration,
) -> Result<std::thread::Result<()>, ()> {
    let deadline = Instant::now() + limit;
    while !handle.is_finished() {
        if Instant::now() >= deadline {
            return Err(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(handle.join())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[cfg(test)]
mod tests;
