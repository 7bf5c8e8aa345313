//! The Linux agent: producer threads own the state (process table, kernel maps, caches) and
//! publish views; collectors read the views at scrape time and change nothing.
//!
//! ```text
//!  sched_process_exec/exit, task_newtask ─┐
//!  security_mmap_file (libraries) ────────┴─ring buffer─▶ events thread (drains every 10 ms) ─┐
//!                                           attach queue ◀─ CUDA library mapped ──────────────┤
//!                                           └▶ attach thread (uprobes on, idle ones off)      │
//!  /proc scan (start-up + every --rescan-interval) ──▶ reconcile thread ──────────────────────┤
//!  NVML (every --nvml-interval) ──▶ nvml thread ──▶ NvmlState ───────────────────────────┐    │
//!                                                                                        │    ▼
//!                                                                   Tracker (Mutex, bounded) │
//!                                                                                        │    │
//!  /proc reads, --gpu-info-dir (every second + on change) ◀── sampler thread ◀───────────│────┘
//!                                                               └▶ ProcessView, GpuInfoView
//!  CRI bundles, Docker's API (container names) ◀── containers thread ──▶ name cache ──▶ sampler
//!  servers' sockets and metrics paths ◀── servers thread ──▶ endpoints (GET /api/sd)
//!                                                                                        ▼
//!  GET /metrics ──▶ collectors (read-only: views, counters, the CUDA maps) ◀──────────────┘
//! ```
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
mod sampler;
mod servers;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::collectors::{
    cuda::CudaCollector, gpuinfo::GpuInfoCollector, kernel::KernelCollector, nvml::NvmlCollector,
    process::ProcessCollector, servers::ServersCollector,
};
use crate::config::Config;
use crate::cuda::attach::{Attacher, AttacherStats};
use crate::cuda::launches::LaunchEstimates;
use crate::cuda::launches::LaunchMode;
use crate::ebpf::{CudaMaps, MmapHook, Sensor, TrackedPids};
use crate::http::MetricsSource;
use crate::metrics::{gather, BuildInfo, Collector, Families};
use crate::proc::ProcRoot;
use crate::state::NvmlState;
use crate::state::{Counters, GpuInfoView, ProcessView, Published, ServersView};
use crate::tracker::{Observed, Tracker};

/// How often the events thread drains the ring buffer: detection within ~10 ms without a
/// wake-up per event.
pub const DRAIN_INTERVAL: Duration = Duration::from_millis(10);

/// How long each shutdown step (HTTP, threads) may take before it is cut short.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The producer threads' state. Only this module's threads hold it; collectors get the
/// published views, the counters, and the CUDA state behind its read-only trait.
struct Shared {
    tracker: Mutex<Tracker>,
    /// The kernel's copy of the tracked pids (for fork events). Lock order: tracker first.
    kernel_tracked: Mutex<TrackedPids>,
    counters: Arc<Counters>,
    proc: ProcRoot,
    grace: Duration,
    stop: AtomicBool,
    health: Arc<health::Health>,
    cuda: Arc<CudaState>,
    nvml: Arc<Published<NvmlState>>,
    processes: Arc<Published<ProcessView>>,
    gpu_info: Arc<Published<GpuInfoView>>,
    servers: Arc<Published<ServersView>>,
    containers: containers::Containers,
    /// Set when the table changed; wakes the sampler.
    changed: (Mutex<bool>, Condvar),
    /// When the events thread's last complete drain began: every exit that happened before
    /// it has been handled.
    drained: Mutex<Instant>,
}

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

impl Shared {
    fn new(
        proc: ProcRoot,
        grace: Duration,
        tracker: Tracker,
        kernel_tracked: TrackedPids,
        cuda: CudaState,
        containers: containers::Containers,
    ) -> Self {
        Shared {
            tracker: Mutex::new(tracker),
            kernel_tracked: Mutex::new(kernel_tracked),
            counters: Arc::default(),
            proc,
            grace,
            stop: AtomicBool::new(false),
            health: health::Health::new(),
            cuda: Arc::new(cuda),
            nvml: Arc::default(),
            processes: Arc::default(),
            gpu_info: Arc::default(),
            servers: Arc::default(),
            containers,
            changed: (Mutex::new(false), Condvar::new()),
            drained: Mutex::new(Instant::now()),
        }
    }

    /// The events thread finished a drain that began at `started`.
    fn set_drained(&self, started: Instant) {
        *self
            .drained
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = started;
    }

    /// Whether a drain that began after `t` has been handled: a process found gone at `t`
    /// and still alive in the table then missed its exit event (a busy events thread only
    /// delays it).
    fn drained_after(&self, t: Instant) -> bool {
        *self
            .drained
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            > t
    }

    /// Waits up to `limit` for [`Shared::drained_after`]`(t)`; whether it came.
    fn wait_drained_after(&self, t: Instant, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while !self.drained_after(t) {
            if Instant::now() >= deadline || self.stopping() {
                return false;
            }
            std::thread::sleep(DRAIN_INTERVAL);
        }
        true
    }

    /// The table; a panic in another thread while holding it does not make it unusable.
    fn tracker(&self) -> MutexGuard<'_, Tracker> {
        self.tracker
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The table changed: the sampler publishes a new view soon.
    fn table_changed(&self) {
        let (flag, wake) = &self.changed;
        *flag
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = true;
        wake.notify_one();
    }

    /// Waits up to `timeout` for a change to the table; true when there was one.
    fn wait_for_change(&self, timeout: Duration) -> bool {
        let (flag, wake) = &self.changed;
        let guard = flag
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (mut guard, _) = wake
            .wait_timeout_while(guard, timeout, |changed| {
                !*changed && !self.stop.load(Ordering::Relaxed)
            })
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        std::mem::take(&mut *guard)
    }

    /// Changes the table with `change` and the kernel's tracked set with it, under the
    /// table's lock: another writer (an exit on the events thread) cannot slip in between and
    /// leave the kernel tracking a process the table has ended. A new process's container is
    /// read from its cgroup after the lock is released (the sampler holds the process back
    /// until then, see `Tracked::container_read`).
    fn observe(&self, pid: u32, change: impl FnOnce(&mut Tracker) -> Observed) -> Observed {
        let mut tracker = self.tracker();
        let observed = change(&mut tracker);
        let mut kernel = self
            .kernel_tracked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match &observed {
            Observed::Added(_) => {
                if let Err(e) = kernel.insert(pid) {
                    tracing::debug!(pid, error = %e, "cannot add to the kernel's tracked set");
                }
            }
            Observed::Removed => kernel.remove(pid),
            Observed::Unchanged | Observed::Ignored | Observed::Dropped => return observed,
        }
        let start_ticks = tracker.get(pid).and_then(|t| t.start_ticks);
        drop(kernel);
        drop(tracker);
        if matches!(observed, Observed::Added(_)) {
            let container = self.proc.container(pid).ok().flatten();
            if let Some(c) = &container {
                self.containers.request(&c.id);
            }
            self.tracker().set_container(pid, start_ticks, container);
        }
        self.table_changed();
        observed
    }

    /// The process exited: starts its grace period. True when it was tracked and alive.
    fn exited(&self, pid: u32) -> bool {
        let mut tracker = self.tracker();
        let was_alive = tracker.exited(pid, Instant::now());
        let gone = tracker.get(pid).filter(|_| was_alive).cloned();
        self.forget_in_kernel(pid, was_alive);
        drop(tracker);
        if let Some(t) = gone {
            observe::log_exited(self, &t, "exit event");
        }
        was_alive
    }

    /// A reading taken after `as_of` found the process gone (see
    /// [`Tracker::exited_as_of`]). True when it was marked exited.
    fn exited_as_of(&self, pid: u32, start_ticks: Option<u64>, as_of: Instant) -> bool {
        let mut tracker = self.tracker();
        let marked = tracker.exited_as_of(pid, start_ticks, as_of, Instant::now());
        let gone = tracker.get(pid).filter(|_| marked).cloned();
        self.forget_in_kernel(pid, marked);
        drop(tracker);
        if let Some(t) = gone {
            observe::log_exited(self, &t, "found gone");
        }
        marked
    }

    /// The container labels of tracked process `pid` (empty when it is in none).
    fn container_labels(&self, pid: u32) -> crate::metrics::ContainerLabels {
        let container = self.tracker().get(pid).and_then(|t| t.container.clone());
        container
            .map(|c| self.containers.labels(&c))
            .unwrap_or_default()
    }

    /// Called with the table locked (lock order: table, then the kernel's set).
    fn forget_in_kernel(&self, pid: u32, exited: bool) {
        if exited {
            self.kernel_tracked
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(pid);
            self.table_changed();
        }
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Sleeps `total`, or less when the agent stops meanwhile.
    fn sleep(&self, total: Duration) {
        let deadline = Instant::now() + total;
        while !self.stopping() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            std::thread::sleep(left.min(Duration::from_millis(50)));
        }
    }
}

struct AgentSource {
    collectors: Vec<Box<dyn Collector>>,
    health: Arc<health::Health>,
    servers: Arc<Published<ServersView>>,
    processes: Arc<Published<ProcessView>>,
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

    fn health(&self) -> Result<(), String> {
        self.health.check()
    }

    fn service_discovery(&self) -> Vec<crate::http::SdTarget> {
        crate::collectors::servers::sd_targets(&self.servers.get().endpoints)
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
    let lost = Arc::new(lost);
    // Where container names come from: each source is used when its path exists.
    let present = |p: &Option<std::path::PathBuf>, what: &str| {
        let p = p.clone().filter(|p| !p.as_os_str().is_empty())?;
        if p.exists() {
            Some(p)
        } else {
            tracing::info!(path = %p.display(), "no {what} here: not used for container names");
            None
        }
    };
    let sources = containers::Sources {
        bundles: crate::identity::oci::Bundles {
            containerd: present(&config.containerd_state, "containerd state"),
            crio: present(&config.crio_storage, "CRI-O storage"),
        },
        docker_socket: present(&config.docker_socket, "Docker socket"),
    };
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
    let shared = Arc::new(Shared::new(
        proc.clone(),
        config.grace_period,
        Tracker::new(config.max_processes as usize)
            .with_max_model_names(config.max_model_names as usize),
        tracked,
        cuda,
        containers,
    ));
    let web = match &config.web_config_file {
        Some(path) => Some(Arc::new(crate::web_config::WebConfig::load(path)?)),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(config.listen_address)
        .await
        .with_context(|| format!("--web.listen-address {}", config.listen_address))?;
    tracing::info!(
        address = %config.listen_address,
        tls = web.as_ref().is_some_and(|w| w.current().tls.is_some()),
        basic_auth = web.as_ref().is_some_and(|w| w.current().auth.is_some()),
        "serving /metrics"
    );

    let gpu_info = config.gpu_info_dir.clone().map(|dir| {
        let limits = crate::gpuinfo::Limits {
            ttl: config.gpu_info_ttl,
            ..Default::default()
        };
        (dir, limits)
    });
    let events_thread = events::spawn(shared.clone(), events, mmap_records)?;
    let reconcile_thread = reconcile::spawn(shared.clone(), config.rescan_interval, lost.clone())?;
    let attach_thread = libraries::spawn(
        shared.clone(),
        attach_jobs,
        config.cuda_library_idle_timeout,
    )?;
    let sampler_thread = sampler::spawn(shared.clone(), gpu_info.clone(), lost.clone())?;
    let servers_thread = servers::spawn(shared.clone(), config.sd_advertise_host.clone())?;
    let mut threads = vec![
        ("events", events_thread),
        ("reconcile", reconcile_thread),
        ("attach", attach_thread),
        ("sampler", sampler_thread),
        ("servers", servers_thread),
    ];
    if let Some(jobs) = container_jobs {
        threads.push((
            "containers",
            containers::spawn(shared.clone(), jobs, sources)?,
        ));
    }
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
        Box::new(ProcessCollector::new(shared.processes.clone())),
        Box::new(KernelCollector::new(shared.counters.clone(), lost.clone())),
        Box::new(CudaCollector::new(
            shared.cuda.clone(),
            shared.processes.clone(),
        )),
        Box::new(ServersCollector::new(shared.servers.clone())),
    ];
    if !config.no_nvml {
        collectors.push(Box::new(NvmlCollector::new(
            shared.nvml.clone(),
            shared.processes.clone(),
            config.nvml_interval,
        )));
    }
    if gpu_info.is_some() {
        let nvml = (!config.no_nvml).then(|| shared.nvml.clone());
        collectors.push(Box::new(GpuInfoCollector::new(
            shared.gpu_info.clone(),
            nvml,
        )));
    }
    #[cfg(feature = "test-faults")]
    collectors.extend(faults::collector());
    let source = Arc::new(AgentSource {
        collectors,
        health: shared.health.clone(),
        servers: shared.servers.clone(),
        processes: shared.processes.clone(),
    });
    let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(crate::http::serve(listener, source, web, async {
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
    shared.table_changed();
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
