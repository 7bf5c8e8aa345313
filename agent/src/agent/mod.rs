//! The Linux agent: kernel events and /proc scans feed the process table; collectors read it
//! at scrape time.
//!
//! ```text
//!  sched_process_exec/exit, task_newtask ─┐
//!  security_mmap_file (libraries) ────────┴─ring buffer─▶ events thread (drains every 10 ms) ─┐
//!                                           attach queue ◀─ CUDA library mapped ──────────────┤
//!                                           └▶ attach thread (uprobes on, idle ones off)      │
//!  /proc scan (start-up + every --rescan-interval) ──▶ reconcile thread ──────────────────────┤
//!                                                                                             ▼
//!                                                                        Tracker (Mutex, bounded)
//!                                                                                             │
//!  GET /metrics ──▶ collectors (process: /proc samples; kernel: loss counters; CUDA maps) ◀───┘
//! ```

mod cuda;
mod events;
mod health;
mod libraries;
mod nvml;
mod reconcile;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::collectors::{
    cuda::CudaCollector, gpuinfo::GpuInfoCollector, kernel::KernelCollector, nvml::NvmlCollector,
    process::ProcessCollector,
};
use crate::config::Config;
use crate::cuda::attach::{Attacher, AttacherStats};
use crate::cuda::launches::LaunchEstimates;
use crate::ebpf::{CudaMaps, MmapHook, Sensor, TrackedPids};
use crate::http::MetricsSource;
use crate::metrics::cuda::LaunchMode;
use crate::metrics::{gather, BuildInfo, Collector, Snapshot};
use crate::proc::ProcRoot;
use crate::tracker::{Observed, Tracker};

/// How often the events thread drains the ring buffer: detection within ~10 ms without a
/// wake-up per event.
pub const DRAIN_INTERVAL: Duration = Duration::from_millis(10);

/// How long each shutdown step (HTTP, threads) may take before it is cut short.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Event and repair counts, written by the events and reconcile threads.
#[derive(Debug, Default)]
pub struct Counters {
    pub exec: AtomicU64,
    pub exit: AtomicU64,
    pub fork: AtomicU64,
    pub library_map: AtomicU64,
    /// Perf mmap records lost (buffer full), when that is the library hook.
    pub library_map_lost: AtomicU64,
    pub malformed: AtomicU64,
    pub missed_exec: AtomicU64,
    pub missed_exit: AtomicU64,
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// State shared by the threads and the scrape path.
pub struct Shared {
    tracker: Mutex<Tracker>,
    /// The kernel's copy of the tracked pids (for fork events). Lock order: tracker first.
    kernel_tracked: Mutex<TrackedPids>,
    pub counters: Counters,
    pub proc: ProcRoot,
    pub grace: Duration,
    pub stop: AtomicBool,
    pub health: Arc<health::Health>,
    pub cuda: CudaState,
    nvml: Mutex<nvml::NvmlState>,
}

/// The CUDA probes' attachments, maps, retired generations and launch estimates. Lock order:
/// retired before maps; otherwise never two at once.
pub struct CudaState {
    /// Owns the loaded eBPF object: every program and attachment lives as long as it does.
    attacher: Mutex<Attacher>,
    /// What the attacher looked like when last unlocked (what scrapes read).
    attacher_stats: Mutex<AttacherStats>,
    maps: Mutex<CudaMaps>,
    launches: Mutex<LaunchEstimates>,
    retired: Mutex<cuda::Retired>,
    queue: libraries::AttachQueue,
    /// Links of detached libraries not dropped yet (each drop waits for a grace period).
    pub detach_backlog: AtomicU64,
    /// How the kernel reports library mappings.
    pub mmap_hook: MmapHook,
}

/// The locked attacher; unlocking it publishes its stats.
pub struct AttacherGuard<'a> {
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
        *self.stats.lock().unwrap_or_else(|e| e.into_inner()) = self.attacher.stats();
    }
}

impl CudaState {
    /// The attacher's state as of its last unlock; never waits for an attach.
    pub fn attacher_stats(&self) -> AttacherStats {
        self.attacher_stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn retired(&self) -> MutexGuard<'_, cuda::Retired> {
        self.retired.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Attach requests dropped because the attach queue was full.
    pub fn attach_requests_dropped(&self) -> u64 {
        self.queue.dropped()
    }

    pub fn attacher(&self) -> AttacherGuard<'_> {
        AttacherGuard {
            attacher: self.attacher.lock().unwrap_or_else(|e| e.into_inner()),
            stats: &self.attacher_stats,
        }
    }

    pub fn maps(&self) -> MutexGuard<'_, CudaMaps> {
        self.maps.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn launches(&self) -> MutexGuard<'_, LaunchEstimates> {
        self.launches.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Shared {
    pub fn new(
        proc: ProcRoot,
        grace: Duration,
        tracker: Tracker,
        kernel_tracked: TrackedPids,
        cuda: CudaState,
    ) -> Self {
        Shared {
            tracker: Mutex::new(tracker),
            kernel_tracked: Mutex::new(kernel_tracked),
            counters: Counters::default(),
            proc,
            grace,
            stop: AtomicBool::new(false),
            health: health::Health::new(),
            cuda,
            nvml: Mutex::new(nvml::NvmlState::default()),
        }
    }

    /// A copy of the NVML sampler's state (the collector never holds the lock while encoding).
    pub fn nvml_state(&self) -> nvml::NvmlState {
        self.nvml.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn nvml_state_mut(&self) -> MutexGuard<'_, nvml::NvmlState> {
        self.nvml.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The table; a panic in another thread while holding it does not make it unusable.
    pub fn tracker(&self) -> MutexGuard<'_, Tracker> {
        self.tracker.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps the kernel's tracked set in step with what `observe` did.
    pub fn note(&self, pid: u32, observed: &Observed) {
        let mut kernel = self
            .kernel_tracked
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match observed {
            Observed::Added(_) => {
                if let Err(e) = kernel.insert(pid) {
                    tracing::debug!(pid, error = %e, "cannot add to the kernel's tracked set");
                }
            }
            Observed::Removed => kernel.remove(pid),
            Observed::Unchanged | Observed::Ignored | Observed::Dropped => {}
        }
    }

    /// The process exited (or was found gone): starts its grace period. True when it was
    /// tracked and alive.
    pub fn exited(&self, pid: u32) -> bool {
        let was_alive = self.tracker().exited(pid, std::time::Instant::now());
        if was_alive {
            self.kernel_tracked
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(pid);
        }
        was_alive
    }

    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

struct AgentSource {
    collectors: Mutex<Vec<Box<dyn Collector>>>,
    shared: Arc<Shared>,
}

impl MetricsSource for AgentSource {
    fn gather(&self) -> Snapshot {
        let mut collectors = self.collectors.lock().unwrap_or_else(|e| e.into_inner());
        gather(&mut collectors)
    }

    fn build_info(&self) -> BuildInfo {
        BuildInfo::new("ebpf")
    }

    fn health(&self) -> Result<(), String> {
        self.shared.health.check()
    }
}

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(config: Config) -> anyhow::Result<()> {
    use anyhow::Context;

    let proc = ProcRoot::new(&config.procfs)
        .with_context(|| format!("--path.procfs {}", config.procfs.display()))?;
    let sensor = Sensor::load(config.ring_buffer_bytes, config.max_processes)?;
    tracing::info!(
        kernel_ppid = sensor.kernel_ppid,
        library_hook = sensor.mmap_hook.as_str(),
        "eBPF exec, exit and fork tracepoints attached"
    );
    // `programs` holds the attachments: dropped at the end of this function, after the
    // threads that read the ring buffer have stopped.
    let Sensor {
        programs,
        events,
        lost,
        tracked,
        cuda: cuda_maps,
        mmap_hook,
        mmap_records,
        ..
    } = sensor;
    let launch_mode = crate::cuda::launches::mode(config.cuda_overhead_budget);
    let (queue, attach_jobs) = libraries::AttachQueue::new();
    let cuda = CudaState {
        attacher: Mutex::new(Attacher::new(programs, launch_mode == LaunchMode::Exact)),
        attacher_stats: Mutex::new(AttacherStats::default()),
        maps: Mutex::new(cuda_maps),
        launches: Mutex::new(LaunchEstimates::new(launch_mode)),
        retired: Mutex::new(cuda::Retired::default()),
        queue,
        detach_backlog: AtomicU64::new(0),
        mmap_hook,
    };
    let shared = Arc::new(Shared::new(
        proc.clone(),
        config.grace_period,
        Tracker::new(config.max_processes as usize)
            .with_max_model_names(config.max_model_names as usize),
        tracked,
        cuda,
    ));
    let listener = tokio::net::TcpListener::bind(config.listen_address)
        .await
        .with_context(|| format!("--web.listen-address {}", config.listen_address))?;
    tracing::info!(address = %config.listen_address, "serving /metrics");

    let events_thread = events::spawn(shared.clone(), events, mmap_records)?;
    let reconcile_thread = reconcile::spawn(shared.clone(), config.rescan_interval)?;
    let attach_thread = libraries::spawn(
        shared.clone(),
        attach_jobs,
        config.cuda_library_idle_timeout,
    )?;
    let mut threads = vec![
        ("events", events_thread),
        ("reconcile", reconcile_thread),
        ("attach", attach_thread),
    ];
    if !config.no_nvml {
        threads.push((
            "nvml",
            nvml::spawn(
                shared.clone(),
                config.nvml_lib.clone(),
                config.nvml_interval,
            )?,
        ));
    }
    if launch_mode == LaunchMode::Sampled {
        threads.push((
            "launches",
            cuda::spawn_launch_sampler(
                shared.clone(),
                config.cuda_overhead_budget,
                config.cuda_launch_period,
            )?,
        ));
    }

    let mut collectors: Vec<Box<dyn Collector>> = vec![
        Box::new(ProcessCollector::new(shared.clone())),
        Box::new(KernelCollector::new(shared.clone(), lost)),
        Box::new(CudaCollector::new(shared.clone())),
    ];
    if !config.no_nvml {
        collectors.push(Box::new(NvmlCollector::new(
            shared.clone(),
            config.nvml_interval,
        )));
    }
    if let Some(dir) = &config.gpu_info_dir {
        let limits = crate::gpuinfo::Limits {
            ttl: config.gpu_info_ttl,
            ..Default::default()
        };
        collectors.push(Box::new(GpuInfoCollector::new(
            shared.clone(),
            dir.clone(),
            limits,
        )));
    }
    let source = Arc::new(AgentSource {
        collectors: Mutex::new(collectors),
        shared: shared.clone(),
    });
    let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(crate::http::serve(listener, source, async {
        let _ = http_stopped.await;
    }));
    // A producer thread that dies is fatal: the agent stops and exits non-zero, so that a
    // supervisor restarts it. (A stalled one only turns /healthz to 503.)
    let died = tokio::select! {
        () = shutdown_signal() => None,
        name = dead_thread(&shared.health) => Some(name),
    };
    match died {
        Some(name) => tracing::error!(thread = name, "a producer thread died: shutting down"),
        None => tracing::info!("shutting down"),
    }
    shared.health.stopping();
    let _ = stop_http.send(());
    // Scrapers keep connections alive; give in-flight scrapes a bounded time to finish.
    match tokio::time::timeout(SHUTDOWN_GRACE, server).await {
        Ok(Ok(result)) => result.context("serving HTTP")?,
        Ok(Err(e)) => tracing::warn!(error = %e, "the HTTP server task failed"),
        Err(_) => tracing::warn!("HTTP connections still open after {SHUTDOWN_GRACE:?}: cut short"),
    }
    shared.stop.store(true, Ordering::Relaxed);
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
    drop(shared);
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
    let deadline = std::time::Instant::now() + limit;
    while !handle.is_finished() {
        if std::time::Instant::now() >= deadline {
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
