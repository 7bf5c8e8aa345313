//! The addresses a process's network namespace answers on, other than loopback: where a
//! server in a pod or another container is reached from outside it. Read through the
//! process's own `/proc/<pid>/net` (its namespace's view), so no `setns` is needed:
//! IPv4 local routes from `fib_trie`, global IPv6 addresses from `if_inet6` (procfs reads
//! neither file).

use std::collections::BTreeSet;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

/// Addresses kept at most (a namespace with more is unusual; the first ones are its own).
const MAX_ADDRESSES: usize = 16;
/// Bytes read of a table at most (a host's routing trie with thousands of routes is larger;
/// its local addresses come first in the Main table's walk only by chance, but are there).
const MAX_TABLE_BYTES: u64 = 4 << 20;

/// IPv4 first (a wildcard IPv6 listener is dual-stack by default), loopback left out.
pub fn local_addresses(proc: &Path, pid: u32) -> Vec<IpAddr> {
    let net = proc.join(pid.to_string()).join("net");
    let read = |name: &str| -> String {
        let mut text = String::new();
        if let Ok(f) = std::fs::File::open(net.join(name)) {
            let _ = f.take(MAX_TABLE_BYTES).read_to_string(&mut text);
        }
        text
    };
    let mut found: Vec<IpAddr> = parse_fib_trie(&read("fib_trie"))
        .into_iter()
        .map(IpAddr::V4)
        .collect();
    found.extend(
        parse_if_inet6(&read("if_inet6"))
            .into_iter()
            .map(IpAddr::V6),
    );
    found.truncate(MAX_ADDRESSES);
    found
}

/// The `/32 host LOCAL` entries (each follows the `|-- a.b.c.d` line naming it), those inside
/// a directly connected (`link UNICAST`) prefix first: an interface's own address before
/// addresses that only exist to be answered locally (IPVS puts every Service's cluster IP on
/// a dummy device as a local address).
pub(crate) fn parse_fib_trie(text: &str) -> Vec<Ipv4Addr> {
    let mut local = BTreeSet::new();
    let mut links: Vec<(u32, u32)> = Vec::new();
    let mut last: Option<Ipv4Addr> = None;
    for line in text.lines() {
        let line = line.trim();
        if let Some(ip) = line.strip_prefix("|-- ") {
            last = ip.parse().ok();
        } else if let Some(ip) = last {
            if line.starts_with("/32 host LOCAL") {
                if !ip.is_loopback() && local.len() < 4096 {
                    local.insert(ip);
                }
            } else if let Some((len, "link UNICAST")) = line
                .strip_prefix('/')
                .and_then(|l| l.split_once(' '))
                .and_then(|(len, rest)| Some((len.parse::<u32>().ok()?, rest)))
            {
                if (1..32).contains(&len) && links.len() < 4096 {
                    links.push((u32::from(ip), u32::MAX << (32 - len)));
                }
            }
        }
    }
    let linked = |ip: &Ipv4Addr| {
        links
            .iter()
            .any(|&(net, mask)| u32::from(*ip) & mask == net & mask)
    };
    let (mut found, others): (Vec<Ipv4Addr>, Vec<Ipv4Addr>) = local.into_iter().partition(linked);
    found.extend(others);
    found
}

/// Global-scope addresses (scope `00`): not loopback, not link-local.
pub(crate) fn parse_if_inet6(text: &str) -> Vec<Ipv6Addr> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.get(3) != Some(&"00") {
                return None;
            }
            let hex = fields.first().filter(|h| h.len() == 32)?;
            let bits = u128::from_str_radix(hex, 16).ok()?;
            Some(Ipv6Addr::from(bits)).filter(|ip| !ip.is_loopback())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pods_addresses() {
        let fib = "Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 10.244.1.0/24 2 0 2
        |-- 10.244.1.0
           /24 link UNICAST
        |-- 10.244.1.17
           /32 host LOCAL
     +-- 127.0.0.0/8 2 0 2
        |-- 127.0.0.1
           /32 host LOCAL
Local:
  +-- 0.0.0.0/0 3 0 5
     |-- 10.244.1.17
        /32 host LOCAL
     |-- 10.244.1.255
        /32 link BROADCAST
";
        assert_eq!(parse_fib_trie(fib), vec![Ipv4Addr::new(10, 244, 1, 17)]);
        // IPVS: cluster IPs are local addresses too, but in no connected prefix.
        let ipvs = "Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 10.96.0.1
        /32 host LOCAL
     |-- 10.96.0.10
        /32 host LOCAL
     +-- 192.168.1.0/24 2 0 2
        |-- 192.168.1.0
           /24 link UNICAST
        |-- 192.168.1.20
           /32 host LOCAL
";
        assert_eq!(
            parse_fib_trie(ipvs),
            vec![
                Ipv4Addr::new(192, 168, 1, 20),
                Ipv4Addr::new(10, 96, 0, 1),
                Ipv4Addr::new(10, 96, 0, 10)
            ]
        );
        let inet6 = "00000000000000000000000000000001 01 80 10 80       lo
fe80000000000000a8c1abfffe3d3a01 02 40 20 80     eth0
fd000000000000000000000000000011 02 40 00 00     eth0
";
        assert_eq!(
            parse_if_inet6(inet6),
            vec!["fd00::11".parse::<Ipv6Addr>().unwrap()]
        );
        assert!(parse_fib_trie("garbage").is_empty());
        assert!(parse_if_inet6("zz 01 80 00 80 lo").is_empty());
    }
}
