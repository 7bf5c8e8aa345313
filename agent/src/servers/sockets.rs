//! The TCP ports a process listens on: the inodes of its sockets (`/proc/<pid>/fd/*` →
//! `socket:[N]`) joined with the listening rows of `/proc/<pid>/net/tcp` and `tcp6` (the
//! tables of the process's own network namespace).

use std::collections::BTreeSet;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;

/// `st` of a listening socket in the kernel's tcp tables.
const LISTEN: &str = "0A";
/// Most rows read from one table (a busy proxy has tens of thousands of connections), and
/// the bytes that many rows take.
const MAX_ROWS: usize = 65_536;
const MAX_TABLE_BYTES: u64 = MAX_ROWS as u64 * 180;
/// Most socket inodes kept of one process.
const MAX_SOCKETS: usize = 65_536;

/// The inodes of process `pid`'s sockets (under the proc root `proc`), in order: when they
/// have not changed, neither has what it listens on. None when its fds cannot be read.
pub fn socket_inodes(proc: &Path, pid: u32) -> Option<BTreeSet<u64>> {
    let fds = std::fs::read_dir(proc.join(pid.to_string()).join("fd")).ok()?;
    Some(
        fds.flatten()
            .filter_map(|fd| std::fs::read_link(fd.path()).ok())
            .filter_map(|target| {
                target
                    .to_str()?
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .parse()
                    .ok()
            })
            .take(MAX_SOCKETS)
            .collect(),
    )
}

/// The addresses process `pid` listens on — the listening rows of its namespace's tables
/// whose inode is one of its `inodes` — in port order.
pub fn listening(proc: &Path, pid: u32, inodes: &BTreeSet<u64>) -> Vec<SocketAddr> {
    if inodes.is_empty() {
        return Vec::new();
    }
    let base = proc.join(pid.to_string());
    let mut found: Vec<SocketAddr> = ["net/tcp", "net/tcp6"]
        .iter()
        .filter_map(|t| {
            let mut table = String::new();
            let file = std::fs::File::open(base.join(t)).ok()?;
            file.take(MAX_TABLE_BYTES).read_to_string(&mut table).ok()?;
            Some(table)
        })
        .flat_map(|table| parse_tcp_table(&table))
        .filter(|(_, inode)| inodes.contains(inode))
        .map(|(addr, _)| addr)
        .collect();
    found.sort_by_key(|a| (a.port(), a.is_ipv6()));
    found.dedup();
    found
}

/// The listening rows of a `/proc/net/tcp` or `tcp6` table: (local address, socket inode).
pub fn parse_tcp_table(table: &str) -> Vec<(SocketAddr, u64)> {
    table
        .lines()
        .skip(1)
        .take(MAX_ROWS)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.get(3) != Some(&LISTEN) {
                return None;
            }
            let (ip, port) = fields.get(1)?.split_once(':')?;
            let port = u16::from_str_radix(port, 16).ok()?;
            let inode = fields.get(9)?.parse().ok()?;
            Some((SocketAddr::new(parse_ip(ip)?, port), inode))
        })
        .collect()
}

/// The kernel prints each 32-bit word of the address in host byte order (little-endian here).
fn parse_ip(hex: &str) -> Option<IpAddr> {
    let words: Vec<u32> = (0..hex.len() / 8)
        .map(|i| u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16).ok())
        .collect::<Option<_>>()?;
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    match bytes.len() {
        4 => Some(IpAddr::V4(Ipv4Addr::new(
            bytes[0], bytes[1], bytes[2], bytes[3],
        ))),
        16 => {
            let b: [u8; 16] = bytes.try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_rows_of_both_tables() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0
   1: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4343 1 0000000000000000 100 0 0 10 0
   2: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 4444 1 0000000000000000 20 4 30 10 -1
";
        assert_eq!(
            parse_tcp_table(tcp),
            vec![
                ("127.0.0.1:8080".parse().unwrap(), 4242),
                ("0.0.0.0:80".parse().unwrap(), 4343),
            ],
            "established connections are not listeners"
        );
        let tcp6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:1F91 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 5151 1 0000000000000000 100 0 0 10 0
   1: 00000000000000000000000001000000:1F92 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 5252 1 0000000000000000 100 0 0 10 0
";
        assert_eq!(
            parse_tcp_table(tcp6),
            vec![
                ("[::]:8081".parse().unwrap(), 5151),
                ("[::1]:8082".parse().unwrap(), 5252),
            ]
        );
        assert!(parse_tcp_table("garbage\n  0: zz:zz 0 0A").is_empty());
    }
}
