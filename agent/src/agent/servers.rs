//! The server discovery thread: every [`INTERVAL`], for each live tracked inference server
//! whose framework llmscope queries, its socket inodes; when they changed, the TCP ports it
//! listens on; and when those changed, or every [`REPROBE`] ([`OLLAMA_REFRESH`] for Ollama,
//! whose loaded models change), a probe of the framework's API path on each. What answers is
//! published for `GET /api/sd`, `llm_server_metrics_endpoint` and the Ollama families. A
//! server in the agent's network namespace is reached through loopback; one in another
//! namespace (a pod, a container with its own network) at that namespace's own addresses,
//! read from `/proc/<pid>/net`.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::health::Health;
use super::requests::{Requests, Server};
use super::table::Table;
use super::CudaState;
use crate::identity::{Framework, Role};
use crate::metrics::KindCount;
use crate::servers::{
    api, listening, local_addresses, probe, socket_inodes, Answer, Api, Outcome, ProbeKind,
};
use crate::state::{Endpoint, Member, ProcessView, Published, ServersView};
use crate::tracker::Tracked;

/// A server is found within this of listening (a pass reads each server's fd table; the
/// tcp tables only when its sockets changed).
const INTERVAL: Duration = Duration::from_millis(500);
/// A server's endpoints are probed again after this even when its sockets did not change.
const REPROBE: Duration = Duration::from_secs(30);
/// Ollama's loaded models are read again after this.
const OLLAMA_REFRESH: Duration = Duration::from_secs(5);
/// A server that listens but does not answer yet (still loading its model) is probed again
/// every pass for this long after it was first seen, so that it is found as soon as it
/// answers; after that, every [`REPROBE`].
const WARM_UP: Duration = Duration::from_secs(600);
/// Servers examined per pass at most (the table is bounded; this bounds a pass's probes).
const MAX_SERVERS: usize = 256;
/// Listening ports probed per server at most, and addresses tried per port.
const MAX_PORTS: usize = 16;
const MAX_TRIES: usize = 4;
/// Once a pass has probed this long, the servers left keep what was found before (probed on
/// a later pass): a few silent ports cannot hold up discovery for everyone.
const PASS_BUDGET: Duration = Duration::from_secs(60);

/// What a server was last found with.
struct Probed {
    first_seen: Instant,
    /// Its socket inodes when its listening addresses were read.
    inodes: BTreeSet<u64>,
    addrs: Vec<SocketAddr>,
    /// When its addresses were probed.
    at: Instant,
    endpoints: Vec<Endpoint>,
}

impl Probed {
    /// Whether its addresses should be read and probed again.
    fn due(&self, refresh: Duration) -> bool {
        let waiting = self.endpoints.is_empty()
            && !self.addrs.is_empty()
            && self.first_seen.elapsed() < WARM_UP;
        // A socket read between socket(2) and listen(2) leaves the set of inodes unchanged
        // when it starts listening: a process with sockets but no listening address is read
        // again once as long has passed as its age at the last read (at least a pass), so a
        // server is found a pass or two after it listens, and a worker that never listens
        // costs a read at exponentially growing intervals.
        let unbound = self.addrs.is_empty()
            && !self.inodes.is_empty()
            && self.at.elapsed() >= self.at.duration_since(self.first_seen).max(INTERVAL);
        waiting || unbound || self.at.elapsed() >= refresh
    }
}

/// Finds the endpoints of the live servers in `table` (labelled as `processes` shows them)
/// and publishes them in `servers`.
pub(super) fn spawn(
    table: Arc<Table>,
    health: &Arc<Health>,
    processes: Arc<Published<ProcessView>>,
    servers: Arc<Published<ServersView>>,
    advertise: Option<String>,
    requests: Option<(Arc<Requests>, Arc<CudaState>)>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    // A pass stops probing after PASS_BUDGET, and one probe takes at most 2.5 s.
    let heartbeat = health.register("servers", Some(Duration::from_secs(300)));
    std::thread::Builder::new()
        .name("llmscope-servers".into())
        .spawn(move || {
            let mut discovery = Discovery::new(&table, processes, servers, advertise);
            while !table.stopping() {
                heartbeat.beat();
                discovery.pass(&table);
                if let Some((requests, cuda)) = &requests {
                    let known: HashSet<u32> = table.tracker().all().iter().map(|t| t.pid).collect();
                    requests.sync(cuda, table.proc.path(), &discovery.found(), |pid| {
                        known.contains(&pid)
                    });
                }
                table.sleep(INTERVAL);
            }
        })
}

pub(super) struct Discovery {
    processes: Arc<Published<ProcessView>>,
    servers: Arc<Published<ServersView>>,
    own_netns: Option<PathBuf>,
    host_netns: Option<PathBuf>,
    advertise: Option<String>,
    known: HashMap<(u32, Option<u64>), Probed>,
    /// Probes since start, by outcome.
    probes: HashMap<ProbeKind, u64>,
}

impl Discovery {
    pub(super) fn new(
        table: &Table,
        processes: Arc<Published<ProcessView>>,
        servers: Arc<Published<ServersView>>,
        advertise: Option<String>,
    ) -> Discovery {
        Discovery {
            processes,
            servers,
            own_netns: std::fs::read_link("/proc/self/ns/net").ok(),
            // The host's network namespace (its init's), where --sd.advertise-host names
            // the host even when the agent runs in a namespace of its own (compose).
            host_netns: std::fs::read_link(table.proc.path().join("1/ns/net")).ok(),
            advertise,
            known: HashMap::new(),
            probes: HashMap::new(),
        }
    }

    pub(super) fn pass(&mut self, table: &Table) {
        let servers: Vec<_> = table
            .tracker()
            .all()
            .into_iter()
            .filter(Tracked::is_alive)
            // What a user rule names is examined only when the rule calls it a server.
            .filter(|t| {
                !matches!(t.identity.framework, Framework::Custom(_))
                    || t.identity.role == Role::Server
            })
            .filter_map(|t| Some((api(t.identity.framework)?, t)))
            .take(MAX_SERVERS)
            .collect();
        let view = self.processes.get();
        let started = Instant::now();
        let mut known = HashMap::with_capacity(servers.len());
        for (api, t) in servers {
            let Some(member) = view.members.iter().find(|m| m.pid == t.pid) else {
                continue;
            };
            let key = (t.pid, t.start_ticks);
            let previous = self.known.remove(&key);
            let over_budget = started.elapsed() > PASS_BUDGET;
            if let Some(mut found) = self.examine(table, api, &t, member, previous, over_budget) {
                // The process's labels as of now (its container's names arrive later).
                for e in &mut found.endpoints {
                    e.labels.clone_from(&member.labels);
                }
                known.insert(key, found);
            }
        }
        self.known = known;
        self.servers.set(ServersView {
            endpoints: self
                .known
                .values()
                .flat_map(|p| p.endpoints.iter().cloned())
                .collect(),
            probes: ProbeKind::ALL
                .iter()
                .map(|k| KindCount {
                    kind: k.as_str(),
                    value: self.probes.get(k).copied().unwrap_or(0),
                })
                .collect(),
        });
    }

    /// The servers found listening on the last pass, for request telemetry.
    pub(super) fn found(&self) -> Vec<Server> {
        self.known
            .iter()
            .map(|(&(pid, start), p)| {
                let mut ports: Vec<u16> = p.addrs.iter().map(SocketAddr::port).collect();
                ports.sort_unstable();
                ports.dedup();
                Server {
                    pid,
                    start_ticks: start.unwrap_or(0),
                    ports,
                    own_metrics: p
                        .endpoints
                        .iter()
                        .any(|e| matches!(e.answer, Answer::Metrics)),
                    sockets: p.inodes.iter().copied().collect(),
                }
            })
            .collect()
    }

    /// What server `t` serves now: what was found before while nothing changed, else a
    /// probe of each address it listens on. None when it cannot be examined.
    fn examine(
        &mut self,
        table: &Table,
        api: Api,
        t: &Tracked,
        member: &Member,
        previous: Option<Probed>,
        over_budget: bool,
    ) -> Option<Probed> {
        let proc = table.proc.path();
        let inodes = socket_inodes(proc, t.pid)?;
        let refresh = match api {
            Api::OllamaPs => OLLAMA_REFRESH,
            Api::Metrics { .. } => REPROBE,
        };
        let previous = match previous {
            Some(p) if over_budget => return Some(p),
            None if over_budget => return None,
            Some(p) if p.inodes == inodes && !p.due(refresh) => return Some(p),
            previous => previous,
        };
        let mut addrs = listening(proc, t.pid, &inodes);
        addrs.truncate(MAX_PORTS);
        if let Some(p) = previous
            .as_ref()
            .filter(|p| p.addrs == addrs && !p.due(refresh))
        {
            return Some(Probed {
                inodes,
                endpoints: p.endpoints.clone(),
                addrs,
                ..*p
            });
        }
        let netns = std::fs::read_link(proc.join(format!("{}/ns/net", t.pid))).ok()?;
        let place = if self.own_netns.as_ref() == Some(&netns) {
            Place::Here(self.advertise.as_deref())
        } else {
            let host = self.host_netns.as_ref() == Some(&netns);
            Place::Elsewhere(
                local_addresses(proc, t.pid),
                self.advertise.as_deref().filter(|_| host),
            )
        };
        let mut endpoints = Vec::new();
        for addr in &addrs {
            for (at, target) in place.candidates(*addr).into_iter().take(MAX_TRIES) {
                let outcome = probe(at, api);
                *self.probes.entry(outcome.kind()).or_default() += 1;
                if let Outcome::Answered(answer) = outcome {
                    endpoints.push(Endpoint {
                        labels: member.labels.clone(),
                        target,
                        path: api.path(),
                        answer,
                    });
                    break;
                }
            }
        }
        Some(Probed {
            first_seen: previous.map_or_else(Instant::now, |p| p.first_seen),
            inodes,
            addrs,
            at: Instant::now(),
            endpoints,
        })
    }
}

/// Where a server runs, seen from the agent.
enum Place<'a> {
    /// In the agent's network namespace: `--sd.advertise-host`, if given.
    Here(Option<&'a str>),
    /// In another network namespace, with these addresses; `--sd.advertise-host` when that
    /// namespace is the host's.
    Elsewhere(Vec<IpAddr>, Option<&'a str>),
}

impl Place<'_> {
    /// Where to probe a listening address, and the target Prometheus is told, in the order
    /// to try them.
    fn candidates(&self, addr: SocketAddr) -> Vec<(SocketAddr, String)> {
        match self {
            Place::Here(host) => vec![(reachable(addr), advertised(addr, *host))],
            // Loopback inside another namespace cannot be reached from outside it.
            Place::Elsewhere(..) if addr.ip().to_canonical().is_loopback() => vec![],
            Place::Elsewhere(locals, host) if addr.ip().is_unspecified() => locals
                .iter()
                // A wildcard IPv6 listener is dual-stack by default.
                .filter(|ip| addr.is_ipv6() || ip.is_ipv4())
                .map(|ip| {
                    let at = SocketAddr::new(*ip, addr.port());
                    let target = host.map_or(at.to_string(), |h| format!("{h}:{}", addr.port()));
                    (at, target)
                })
                .collect(),
            Place::Elsewhere(..) => vec![(addr, addr.to_string())],
        }
    }
}

/// Where the agent connects: a wildcard listener through loopback.
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    }
}

/// What Prometheus is told: `--sd.advertise-host` for a wildcard listener (else loopback),
/// the listening address otherwise.
fn advertised(addr: SocketAddr, host: Option<&str>) -> String {
    match (addr.ip().is_unspecified(), host) {
        (true, Some(host)) => format!("{host}:{}", addr.port()),
        _ => reachable(addr).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_in_another_namespace_is_reached_at_its_own_addresses() {
        let pod = Place::Elsewhere(
            vec!["10.244.1.17".parse().unwrap(), "fd00::11".parse().unwrap()],
            None,
        );
        let at = |s: &str| -> Vec<String> {
            pod.candidates(s.parse().unwrap())
                .into_iter()
                .map(|(a, t)| {
                    assert_eq!(a.to_string(), t);
                    t
                })
                .collect()
        };
        assert_eq!(at("0.0.0.0:8000"), ["10.244.1.17:8000"]);
        assert_eq!(at("[::]:8000"), ["10.244.1.17:8000", "[fd00::11]:8000"]);
        assert_eq!(at("10.244.1.17:9000"), ["10.244.1.17:9000"]);
        assert!(at("127.0.0.1:8000").is_empty());
        assert!(at("[::ffff:127.0.0.1]:8000").is_empty());
        // The host's namespace seen from an agent in its own (compose): advertised by name.
        let host = Place::Elsewhere(
            vec!["192.168.1.20".parse().unwrap()],
            Some("host.docker.internal"),
        );
        assert_eq!(
            host.candidates("0.0.0.0:8000".parse().unwrap()),
            vec![(
                "192.168.1.20:8000".parse().unwrap(),
                "host.docker.internal:8000".to_owned()
            )]
        );
        let here = Place::Here(Some("node-1"));
        let any: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        assert_eq!(
            here.candidates(any),
            vec![("127.0.0.1:8080".parse().unwrap(), "node-1:8080".to_owned())]
        );
    }

    #[test]
    fn a_socket_that_did_not_listen_yet_is_read_again_at_growing_intervals() {
        let now = Instant::now();
        let ago = |s: u64| now.checked_sub(Duration::from_secs(s)).unwrap();
        let probed = |first: u64, at: u64, inodes: &[u64], addrs: &[&str]| Probed {
            first_seen: ago(first),
            inodes: inodes.iter().copied().collect(),
            addrs: addrs.iter().map(|a| a.parse().unwrap()).collect(),
            at: ago(at),
            endpoints: Vec::new(),
        };
        // Read at the age of 8 s, 8 s ago: due; 5 s ago: not yet.
        assert!(probed(16, 8, &[7], &[]).due(REPROBE));
        assert!(!probed(13, 5, &[7], &[]).due(REPROBE));
        // Just seen: due again after a pass.
        assert!(probed(1, 1, &[7], &[]).due(REPROBE));
        // No sockets at all: a new one changes the inodes, nothing to wait for.
        assert!(!probed(16, 8, &[], &[]).due(REPROBE));
        // Listening, not answering yet while warming up: every pass; once it answered, only
        // at the refresh.
        let mut answered = probed(100, 8, &[7], &["0.0.0.0:8000"]);
        assert!(answered.due(REPROBE));
        let identity = crate::identity::Identity::new(Framework::Vllm, Role::Server, None);
        answered.endpoints.push(Endpoint {
            labels: crate::metrics::ProcessLabels::new(1, "vllm", &identity),
            target: "127.0.0.1:8000".into(),
            path: "/metrics",
            answer: Answer::Metrics,
        });
        assert!(!answered.due(REPROBE));
        assert!(answered.due(Duration::from_secs(5)));
    }

    #[test]
    fn advertised_addresses() {
        let any: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        assert_eq!(advertised(any, None), "127.0.0.1:8080");
        assert_eq!(advertised(any, Some("10.0.0.7")), "10.0.0.7:8080");
        let v6: SocketAddr = "[::]:8081".parse().unwrap();
        assert_eq!(advertised(v6, None), "[::1]:8081");
        let one: SocketAddr = "192.168.1.5:9000".parse().unwrap();
        assert_eq!(advertised(one, Some("10.0.0.7")), "192.168.1.5:9000");
    }
}
