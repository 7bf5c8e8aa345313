//! The request telemetry runtime: which servers are probed — chosen on each server discovery
//! pass from what it found (`--requests`) — and the thread that reads the probes' records
//! into the connections' parsers and the metrics.

use std::collections::{HashMap, HashSet};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use agent_common::http::ConnKey;
use aya::maps::{HashMap as BpfHashMap, MapData, RingBuf};

use super::health::Health;
use super::table::Life;
use super::wakeup::{Spacing, Wakeup};
use super::CudaState;
use crate::collectors::requests::{RequestReading, RequestSource};
use crate::config::RequestsMode;
use crate::requests::probes::{self, ServerProbes};
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

pub(super) struct Requests {
    mode: RequestsMode,
    /// The kernel's table of followed connections (None: the kernel refused the programs).
    conns: Mutex<Option<BpfHashMap<MapData, ConnKey, u32>>>,
    /// Probed processes by pid.
    probed: Mutex<HashMap<u32, Probed>>,
    failed: Mutex<Failures>,
    connections: Mutex<Connections>,
    metrics: Mutex<RequestMetrics>,
}

/// A probed server process.
struct Probed {
    start_ticks: u64,
    probes: ServerProbes,
    /// Its sockets when its open connections were last added to the kernel's table.
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
    /// Off whatever `mode` says when the kernel refused the programs (`conns` is None).
    pub(super) fn new(
        mode: RequestsMode,
        conns: Option<BpfHashMap<MapData, ConnKey, u32>>,
    ) -> Self {
        Requests {
            mode: if conns.is_some() {
                mode
            } else {
                RequestsMode::Off
            },
            conns: Mutex::new(conns),
            probed: Mutex::default(),
            failed: Mutex::default(),
            connections: Mutex::default(),
            metrics: Mutex::default(),
        }
    }

    pub(super) fn mode(&self) -> RequestsMode {
        self.mode
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
        let mut links = Vec::new();
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
            if let Some(p) = probed.remove(&pid) {
                links.extend(probes::detach(cuda.attacher().programs(), p.probes));
            }
            if let Some(conns) = lock(&self.conns).as_mut() {
                probes::forget_connections(conns, pid);
            }
            lock(&self.connections).forget(pid);
        }
        let mut failed = lock(&self.failed);
        failed
            .tried
            .retain(|(pid, start)| wanted.get(pid).is_some_and(|s| s.start_ticks == *start));
        for s in wanted.values() {
            if let Some(Probed { sockets, .. }) = probed.get_mut(&s.pid) {
                // A call the server was already in when the probes attached (the accept it
                // was blocked in) has no return probe: the connections it opened are found
                // here, at the next pass that sees its sockets change.
                if *sockets != s.sockets {
                    sockets.clone_from(&s.sockets);
                    if let Some(conns) = lock(&self.conns).as_mut() {
                        probes::follow_open_connections(conns, proc, s.pid, &s.ports);
                    }
                }
                continue;
            }
            if failed.tried.contains(&(s.pid, s.start_ticks)) {
                continue;
            }
            let attached = probes::attach(cuda.attacher().programs(), proc, s.pid);
            match attached {
                Ok(p) => {
                    let open = lock(&self.conns).as_mut().map_or(0, |conns| {
                        probes::follow_open_connections(conns, proc, s.pid, &s.ports)
                    });
                    tracing::info!(
                        pid = s.pid,
                        probes = p.count(),
                        open_connections = open,
                        "request telemetry on"
                    );
                    let probed_now = Probed {
                        start_ticks: s.start_ticks,
                        probes: p,
                        sockets: s.sockets.clone(),
                    };
                    probed.insert(s.pid, probed_now);
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
        drop(probed);
        lock(&self.metrics).retain(known);
        // Each detach waits for grace periods (~0.1 s a link here, ~26 links a server): on a
        // thread of their own, so discovery goes on meanwhile.
        if !links.is_empty() {
            let detaching = std::thread::Builder::new()
                .name("llmscope-detach".into())
                .spawn(move || drop(links));
            if let Err(e) = detaching {
                tracing::warn!(error = %e, "cannot start a thread to detach request probes");
            }
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
