//! The addresses a process's network namespace answers on, other than loopback: where a
//! server in a pod or another container is reached from outside it. Read through the
//! process's own `/proc/<pid>/net` (its namespace's view), so no `setns` is needed:
//! IPv4 local routes from `fib_trie`, global IPv6 addresses from `if_inet6`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

/// Addresses kept at most (a namespace with more is unusual; the first ones are its own).
const MAX_ADDRESSES: usize = 16;

/// IPv4 first (a wildcard IPv6 listener is dual-stack by default), loopback left out.
pub fn local_addresses(proc: &Path, pid: u32) -> Vec<IpAddr> {
    let net = proc.join(pid.to_string()).join("net");
    let mut found: Vec<IpAddr> = std::fs::read_to_string(net.join("fib_trie"))
        .map(|t| parse_fib_trie(&t))
        .unwrap_or_default()
        .into_iter()
        .map(IpAddr::V4)
        .collect();
    found.extend(
        std::fs::read_to_string(net.join("if_inet6"))
            .map(|t| parse_if_inet6(&t))
            .unwrap_or_default()
            .into_iter()
            .map(IpAddr::V6),
    );
    found.truncate(MAX_ADDRESSES);
    found
}

/// The `/32 host LOCAL` entries: each follows the `|-- a.b.c.d` line naming it.
fn parse_fib_trie(text: &str) -> Vec<Ipv4Addr> {
    let mut found = Vec::new();
    let mut last: Option<Ipv4Addr> = None;
    for line in text.lines().take(100_000) {
        let line = line.trim();
        if let Some(ip) = line.strip_prefix("|-- ") {
            last = ip.parse().ok();
        } else if line.starts_with("/32 host LOCAL") {
            if let Some(ip) = last.filter(|ip| !ip.is_loopback() && !found.contains(ip)) {
                found.push(ip);
            }
        }
    }
    found
}

/// Global-scope addresses (scope `00`): not loopback, not link-local.
fn parse_if_inet6(text: &str) -> Vec<Ipv6Addr> {
    text.lines()
        .take(10_000)
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
