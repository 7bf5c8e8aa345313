//! The server discovery thread: every [`INTERVAL`], for each live tracked inference server
//! whose framework has Prometheus metrics, the TCP ports it listens on, and — when they
//! changed, or every [`REPROBE`] — a probe of the framework's metrics path on each. What
//! answers is published for `GET /api/sd` and `llm_server_metrics_endpoint`. Only servers in
//! the agent's network namespace are probed (a server in a pod's namespace is reached at the
//! pod's address, which the agent does not know).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Shared;
use crate::servers::{listening, metrics_path, probe, Probe};
use crate::state::Endpoint;

const INTERVAL: Duration = Duration::from_secs(2);
/// A server's endpoints are probed again after this even when its sockets did not change.
const REPROBE: Duration = Duration::from_secs(30);
/// Servers examined per pass at most (the table is bounded; this bounds a pass's probes).
const MAX_SERVERS: usize = 256;

/// A server's listening addresses, when they were probed, and what answered.
type Probed = (Vec<SocketAddr>, Instant, Vec<Endpoint>);

pub(super) fn spawn(
    shared: Arc<Shared>,
    advertise: Option<String>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    // A pass probes at most MAX_SERVERS × ports, each bounded by its timeouts.
    let heartbeat = shared
        .health
        .register("servers", Some(Duration::from_secs(600)));
    std::thread::Builder::new()
        .name("llmscope-servers".into())
        .spawn(move || {
            let own_netns = std::fs::read_link("/proc/self/ns/net").ok();
            let mut known: HashMap<(u32, Option<u64>), Probed> = HashMap::new();
            while !shared.stopping() {
                heartbeat.beat();
                let servers: Vec<_> = shared
                    .tracker()
                    .all()
                    .into_iter()
                    .filter(|t| t.is_alive())
                    .filter_map(|t| Some((metrics_path(t.identity.framework)?, t)))
                    .take(MAX_SERVERS)
                    .collect();
                let view = shared.processes.get();
                let mut next = HashMap::with_capacity(servers.len());
                let mut published = Vec::new();
                for (metrics, t) in servers {
                    let path = shared.proc.path();
                    let same_netns =
                        std::fs::read_link(path.join(format!("{}/ns/net", t.pid))).ok();
                    if same_netns.is_none() || same_netns != own_netns {
                        continue;
                    }
                    let Some(member) = view.members.iter().find(|m| m.pid == t.pid) else {
                        continue;
                    };
                    let addrs = listening(path, t.pid);
                    let key = (t.pid, t.start_ticks);
                    let endpoints = match known.remove(&key) {
                        Some((was, at, endpoints)) if was == addrs && at.elapsed() < REPROBE => {
                            (was, at, endpoints)
                        }
                        _ => {
                            let endpoints = addrs
                                .iter()
                                .filter_map(|a| {
                                    let state = probe(reachable(*a), metrics);
                                    (state != Probe::NotMetrics).then(|| Endpoint {
                                        labels: member.labels.clone(),
                                        target: advertised(*a, advertise.as_deref()),
                                        path: metrics.path,
                                        metrics: state == Probe::Metrics,
                                    })
                                })
                                .collect();
                            (addrs, Instant::now(), endpoints)
                        }
                    };
                    published.extend(endpoints.2.iter().cloned());
                    next.insert(key, endpoints);
                }
                known = next;
                shared.endpoints.set(published);
                shared.sleep(INTERVAL);
            }
        })
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
