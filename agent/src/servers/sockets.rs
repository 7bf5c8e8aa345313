//! The TCP ports a process listens on: the inodes of its sockets (`/proc/<pid>/fd/*` →
//! `socket:[N]`) joined with the listening rows of `/proc/<pid>/net/tcp` and `tcp6` (the
//! tables of the process's own network namespace).

use std::collections::BTreeSet;
use std::io::Read;
use std::net::SocketAddr;
use std::path::Path;

use procfs::net::{TcpNetEntries, TcpState};
use procfs::process::{FDTarget, Process};
use procfs::FromBufReadSI;

/// Most rows read from one table (a busy proxy has tens of thousands of connections), and
/// the bytes that many rows take.
const MAX_ROWS: usize = 65_536;
const MAX_TABLE_BYTES: u64 = MAX_ROWS as u64 * 180;
/// Most socket inodes kept of one process.
const MAX_SOCKETS: usize = 65_536;

/// The inodes of process `pid`'s sockets (under the proc root `proc`), in order: when they
/// have not changed, neither has what it listens on. None when its fds cannot be read.
pub fn socket_inodes(proc: &Path, pid: u32) -> Option<BTreeSet<u64>> {
    let process = Process::new_with_root(proc.join(pid.to_string())).ok()?;
    Some(
        process
            .fd()
            .ok()?
            .flatten()
            .filter_map(|fd| match fd.target {
                FDTarget::Socket(inode) => Some(inode),
                _ => None,
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
        .filter_map(|t| read_table(&base.join(t)))
        .flat_map(|table| parse_tcp_table(&table))
        .filter(|(_, inode)| inodes.contains(inode))
        .map(|(addr, _)| addr)
        .collect();
    found.sort_by_key(|a| (a.port(), a.is_ipv6()));
    found.dedup();
    found
}

/// The fds of process `pid`'s established TCP connections whose local port is one of
/// `ports` (the connections its listeners accepted), read from its namespace's tables.
pub fn accepted_fds(proc: &Path, pid: u32, ports: &[u16]) -> Vec<u32> {
    let base = proc.join(pid.to_string());
    let inodes: BTreeSet<u64> = ["net/tcp", "net/tcp6"]
        .iter()
        .filter_map(|t| read_table(&base.join(t)))
        .flat_map(|table| rows_in_state(&table, TcpState::Established))
        .filter(|(addr, _)| ports.contains(&addr.port()))
        .map(|(_, inode)| inode)
        .collect();
    if inodes.is_empty() {
        return Vec::new();
    }
    let Ok(process) = Process::new_with_root(base) else {
        return Vec::new();
    };
    let Ok(fds) = process.fd() else {
        return Vec::new();
    };
    fds.flatten()
        .take(MAX_SOCKETS)
        .filter(|fd| matches!(fd.target, FDTarget::Socket(inode) if inodes.contains(&inode)))
        .filter_map(|fd| u32::try_from(fd.fd).ok())
        .collect()
}

fn read_table(path: &Path) -> Option<Vec<u8>> {
    let mut table = Vec::new();
    let file = std::fs::File::open(path).ok()?;
    file.take(MAX_TABLE_BYTES).read_to_end(&mut table).ok()?;
    Some(table)
}

/// The listening rows of a `/proc/net/tcp` or `tcp6` table, as procfs reads it (the
/// addresses in this host's byte order): (local address, socket inode). A table cut at the
/// read limit is read up to its last whole line; one procfs refuses gives no rows.
pub fn parse_tcp_table(table: &[u8]) -> Vec<(SocketAddr, u64)> {
    rows_in_state(table, TcpState::Listen)
}

/// The rows of a tcp table in `state`: (local address, socket inode).
fn rows_in_state(table: &[u8], state: TcpState) -> Vec<(SocketAddr, u64)> {
    let whole = table.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let Ok(TcpNetEntries(rows)) =
        TcpNetEntries::from_buf_read(&table[..whole], procfs::current_system_info())
    else {
        return Vec::new();
    };
    rows.into_iter()
        .take(MAX_ROWS)
        .filter(|row| row.state == state)
        .map(|row| (row.local_address, row.inode))
        .collect()
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
            parse_tcp_table(tcp.as_bytes()),
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
            parse_tcp_table(tcp6.as_bytes()),
            vec![
                ("[::]:8081".parse().unwrap(), 5151),
                ("[::1]:8082".parse().unwrap(), 5252),
            ]
        );
        assert!(parse_tcp_table(b"garbage\n  0: zz:zz 0 0A\n").is_empty());
    }
}
