//! The request telemetry runtime: which servers are followed — chosen on each server
//! discovery pass from what it found (`--requests`), through the kernel hooks (their ports in
//! the kernel's port table; the hooks attached while any server is followed) or each server's
//! libc probes — and the thread that reads the records into the connections' parsers and the
//! metrics.

use std::collections::{HashMap, HashSet};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use agent_common::http::{ConnKey, PortKey};
use aya::maps::{HashMap as BpfHashMap, MapData, RingBuf};

use super::health::Health;
use super::table::Life;
use super::wakeup::{Spacing, Wakeup};
use super::CudaState;
use crate::collectors::requests::{RequestReading, RequestSource};
use crate::config::RequestsMode;
use crate::requests::kernel::{self, KernelHook};
use crate::requests::probes::{self, ProbeFailure, ServerProbes};
use crate::requests::{decode, Connections, RequestMetrics};

/// The longest the reader sleeps with nothing to read (its heartbeat).
const IDLE: Duration = Duration::from_millis(100);
/// Rest between drains: 1 ms after a quiet one, growing to 10 ms while drains find bursts.
const SHORTEST_REST: Duration = Duration::from_millis(1);
const LONGEST_REST: Duration = Duration::from_millis(10);
const BURST: usize = 64;

/// A server discovery found: its process, and what it listens on.
pub(super) struct Server {
    pub pid: u32,
    pub start_ticks: u64,
    pub ports: Vec<u16>,
    /// It exports its own Prometheus metrics.
    pub own_metrics: bool,
    /// Its socket inodes, in order (they change when it accepts or closes a connection).
    pub sockets: Vec<u64>,
}

/// The kernel's tables of request telemetry, and its hooks when it runs them.
pub(super) struct Tables {
    /// The libc probes' followed connections.
    pub conns: BpfHashMap<MapData, ConnKey, u32>,
    /// The kernel hooks' followed (server, listening port) pairs.
    pub ports: BpfHashMap<MapData, PortKey, u32>,
    /// None: the libc probes are used.
    pub kernel: Option<KernelHook>,
}

pub(super) struct Requests {
    mode: RequestsMode,
    /// None: the kernel refused the programs.
    tables: Mutex<Option<Tables>>,
    kernel: Option<KernelHook>,
    /// The kernel hooks, attached while a server is followed.
    hooked: Mutex<Option<kernel::Attached>>,
    /// Followed processes by pid.
    probed: Mutex<HashMap<u32, Probed>>,
    failed: Mutex<Failures>,
    connections: Mutex<Connections>,
    metrics: Mutex<RequestMetrics>,
}

/// A followed server process.
struct Probed {
    start_ticks: u64,
    /// Its libc probes (None with the kernel hooks).
    probes: Option<ServerProbes>,
    /// Its listening ports in the kernel hooks' port table.
    ports: Vec<u16>,
    /// Its sockets when its open connections were last added to the libc probes' table.
    sockets: Vec<u64>,
}

/// Servers that could not be probed.
#[derive(Default)]
struct Failures {
    /// (pid, start ticks): not tried again.
    tried: HashSet<(u32, u64)>,
    by_reason: HashMap<&'static str, u64>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Requests {
    /// Off whatever `mode` says when the kernel refused the programs (`tables` is None).
    pub(super) fn new(mode: RequestsMode, tables: Option<Tables>) -> Self {
        Requests {
            mode: if tables.is_some() {
                mode
            } else {
                RequestsMode::Off
            },
            kernel: tables.as_ref().and_then(|t| t.kernel),
            tables: Mutex::new(tables),
            hooked: Mutex::default(),
            probed: Mutex::default(),
            failed: Mutex::default(),
            connections: Mutex::default(),
            metrics: Mutex::default(),
        }
    }

    pub(super) fn mode(&self) -> RequestsMode {
        self.mode
    }

    /// How connections are read: `fentry`, `kprobe`, `libc`, or `off`.
    pub(super) fn hook(&self) -> &'static str {
        match (self.mode, self.kernel) {
            (RequestsMode::Off, _) => "off",
            (_, Some(hook)) => hook.as_str(),
            (_, None) => "libc",
        }
    }

    /// Probes the servers `--requests` asks for among `servers` (every live server found),
    /// stops probing the others, and drops the series of processes not `known` any more.
    pub(super) fn sync(
        &self,
        cuda: &CudaState,
        proc: &Path,
        servers: &[Server],
        known: impl Fn(u32) -> bool,
    ) {
        let wanted: HashMap<u32, &Server> = servers
            .iter()
            .filter(|s| !s.ports.is_empty())
            .filter(|s| match self.mode {
                RequestsMode::All => true,
                RequestsMode::Auto => !s.own_metrics,
                RequestsMode::Off => false,
            })
            .map(|s| (s.pid, s))
            .collect();
        // Links to detach: dropped on a thread of their own (each waits for grace periods,
        // ~0.1 s a link here, ~26 libc links a server), so discovery goes on meanwhile.
        let mut detach: Vec<Box<dyn Send>> = Vec::new();
        let mut probed = lock(&self.probed);
        let stale: Vec<u32> = probed
            .iter()
            .filter(|(pid, p)| {
                wanted
                    .get(pid)
                    .is_none_or(|s| s.start_ticks != p.start_ticks)
            })
            .map(|(pid, _)| *pid)
            .collect();
        for pid in stale {
            let Some(p) = probed.remove(&pid) else {
                continue;
            };
            if let Some(probes) = p.probes {
                let links = probes::detach(cuda.attacher().programs(), probes);
                detach.extend(links.into_iter().map(|l| Box::new(l) as Box<dyn Send>));
            }
            if let Some(t) = lock(&self.tables).as_mut() {
                probes::forget_connections(&mut t.conns, pid);
                kernel::forget_ports(&mut t.ports, pid, &p.ports);
            }
            lock(&self.connections).forget(pid);
        }
        let mut failed = lock(&self.failed);
        failed
            .tried
            .retain(|(pid, start)| wanted.get(pid).is_some_and(|s| s.start_ticks == *start));
        for s in wanted.values() {
            if let Some(p) = probed.get_mut(&s.pid) {
                self.refresh(p, proc, s);
                continue;
            }
            if failed.tried.contains(&(s.pid, s.start_ticks)) {
                continue;
            }
            match self.follow(cuda, proc, s) {
                Ok(p) => {
                    probed.insert(s.pid, p);
                }
                Err(reason) => {
                    tracing::info!(
                        pid = s.pid,
                        reason = reason.as_str(),
                        "request telemetry cannot follow this server"
                    );
                    failed.tried.insert((s.pid, s.start_ticks));
                    *failed.by_reason.entry(reason.as_str()).or_default() += 1;
                }
            }
        }
        drop(failed);
        if let Some(hook) = self.kernel {
            let mut hooked = lock(&self.hooked);
            if probed.is_empty() {
                if let Some(links) = hooked.take() {
                    tracing::info!(
                        hook = hook.as_str(),
                        "no server followed: the kernel hooks of request telemetry detached"
                    );
                    detach.push(Box::new(links));
                }
            } else if hooked.is_none() {
                match hook.attach(cuda.attacher().programs()) {
                    Ok(links) => {
                        tracing::info!(
                            hook = hook.as_str(),
                            "the kernel hooks of request telemetry attached"
                        );
                        *hooked = Some(links);
                    }
                    Err(e) => {
                        tracing::warn!(hook = hook.as_str(), error = %e, "cannot attach the kernel hooks of request telemetry");
                    }
                }
            }
        }
        drop(probed);
        lock(&self.metrics).retain(known);
        if !detach.is_empty() {
            let detaching = std::thread::Builder::new()
                .name("llmscope-detach".into())
                .spawn(move || drop(detach));
            if let Err(e) = detaching {
                tracing::warn!(error = %e, "cannot start a thread to detach request probes");
            }
        }
    }

    /// Starts following server `s`: its ports in the kernel hooks' table, or its libc probes.
    fn follow(&self, cuda: &CudaState, proc: &Path, s: &Server) -> Result<Probed, ProbeFailure> {
        let mut tables = lock(&self.tables);
        let tables = tables.as_mut().ok_or(ProbeFailure::Attach)?;
        let (probes, open) = if self.kernel.is_some() {
            if !kernel::follow_ports(&mut tables.ports, s.pid, &s.ports) {
                return Err(ProbeFailure::Attach);
            }
            (None, None)
        } else {
            let p = probes::attach(cuda.attacher().programs(), proc, s.pid)?;
            let open = probes::follow_open_connections(&mut tables.conns, proc, s.pid, &s.ports);
            (Some(p), Some(open))
        };
        tracing::info!(
            pid = s.pid,
            hook = self.hook(),
            ports = ?s.ports,
            libc_probes = probes.as_ref().map(ServerProbes::count),
            open_connections = open,
            "request telemetry on"
        );
        Ok(Probed {
            start_ticks: s.start_ticks,
            probes,
            ports: s.ports.clone(),
            sockets: s.sockets.clone(),
        })
    }

    /// Keeps a followed server's entries in the kernel's tables up to date.
    fn refresh(&self, p: &mut Probed, proc: &Path, s: &Server) {
        let mut tables = lock(&self.tables);
        let Some(tables) = tables.as_mut() else {
            return;
        };
        if p.probes.is_none() {
            if p.ports != s.ports {
                kernel::forget_ports(&mut tables.ports, s.pid, &p.ports);
                let followed = kernel::follow_ports(&mut tables.ports, s.pid, &s.ports);
                p.ports = if followed {
                    s.ports.clone()
                } else {
                    Vec::new()
                };
            }
        } else if p.sockets != s.sockets {
            // A call the server was already in when the probes attached (the accept it was
            // blocked in) has no return probe: the connections it opened are found here, at
            // the next pass that sees its sockets change.
            p.sockets.clone_from(&s.sockets);
            probes::follow_open_connections(&mut tables.conns, proc, s.pid, &s.ports);
        }
    }
}

impl RequestSource for Requests {
    fn read(&self, f: &mut dyn FnMut(RequestReading<'_>)) {
        let (stats, mut in_flight) = {
            let c = lock(&self.connections);
            (c.stats.clone(), c.in_flight())
        };
        // Every probed server shows its requests in flight, 0 included.
        for pid in lock(&self.probed).keys() {
            in_flight.entry(*pid).or_default();
        }
        f(RequestReading {
            metrics: &lock(&self.metrics),
            stats: &stats,
            in_flight: &in_flight,
        });
    }

    fn probes(&self) -> (usize, Vec<(&'static str, u64)>) {
        let probed = lock(&self.probed).len();
        let mut failures: Vec<_> = lock(&self.failed)
            .by_reason
            .iter()
            .map(|(r, n)| (*r, *n))
            .collect();
        failures.sort_unstable();
        (probed, failures)
    }

    fn hook(&self) -> &'static str {
        Requests::hook(self)
    }
}

/// Reads the probes' records as soon as the kernel says it wrote some.
pub(super) fn spawn_reader(
    requests: Arc<Requests>,
    mut ring: RingBuf<MapData>,
    life: Arc<Life>,
    health: &Arc<Health>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let heartbeat = health.register("requests", Some(Duration::from_secs(10)));
    let wakeup = Wakeup::new()?;
    wakeup.add(ring.as_raw_fd())?;
    std::thread::Builder::new()
        .name("llmscope-requests".into())
        .spawn(move || {
            let mut spacing = Spacing::new(SHORTEST_REST, LONGEST_REST, BURST);
            while !life.stopping() {
                heartbeat.beat();
                let mut records = 0;
                {
                    let mut connections = lock(&requests.connections);
                    let mut metrics = lock(&requests.metrics);
                    while let Some(item) = ring.next() {
                        records += 1;
                        match decode(&item) {
                            Some(r) => connections.record(r, &mut |pid, c| {
                                tracing::debug!(
                                    pid,
                                    route = c.route,
                                    status = c.status,
                                    duration_ns = c.duration_ns,
                                    first_byte_ns = ?c.first_byte_ns,
                                    output_tokens = ?c.output_tokens,
                                    "request measured"
                                );
                                metrics.add(pid, &c);
                            }),
                            None => connections.stats.malformed_records += 1,
                        }
                    }
                }
                std::thread::sleep(spacing.after(records));
                wakeup.wait(IDLE);
            }
        })
}
