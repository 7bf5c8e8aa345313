//! The request probes of one server process: `http_entry` and `http_return` on each of
//! libc's socket functions (`agent_common::http::IO_FUNCTIONS`) in the libc the server maps,
//! attached for that process alone (a perf-event uprobe with its pid: the kernel installs
//! the breakpoints in that process's memory only). Connections the server had already
//! accepted are added to the kernel's connection table, so a kept-alive client is seen from
//! its next request on.
//!
//! A server that does not reach its sockets through libc (Go programs such as Ollama make
//! the system calls themselves) cannot be probed this way: that needs the kernel-side hooks
//! on the TCP send and receive path, on kernels that have them.

use std::num::NonZeroU32;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use agent_common::http::{ConnKey, IO_FUNCTIONS};
use aya::maps::{HashMap as BpfHashMap, MapData};
use aya::programs::uprobe::{
    UProbeAttachLocation, UProbeAttachPoint, UProbeLink, UProbeLinkId, UProbeScope,
};
use aya::programs::UProbe;
use aya::Ebpf;

/// Why a server could not be probed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProbeFailure {
    /// A Go program: its network I/O bypasses libc (even when it maps one, for cgo).
    Go,
    /// It maps no libc (a static binary).
    NoLibc,
    /// Its libc could not be read or holds none of the functions.
    Unreadable,
    /// The kernel refused an attachment (or the process is gone).
    Attach,
}

impl ProbeFailure {
    pub const ALL: [ProbeFailure; 4] = [
        ProbeFailure::Go,
        ProbeFailure::NoLibc,
        ProbeFailure::Unreadable,
        ProbeFailure::Attach,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ProbeFailure::Go => "go",
            ProbeFailure::NoLibc => "no_libc",
            ProbeFailure::Unreadable => "unreadable",
            ProbeFailure::Attach => "attach",
        }
    }
}

const ENTRY: &str = "http_entry";
const RETURN: &str = "http_return";

/// The attachments of one server process.
pub struct ServerProbes {
    links: Vec<(&'static str, UProbeLinkId)>,
    /// The libc file, held open: the attachments name it as `/proc/self/fd/N`.
    _libc: std::fs::File,
}

impl ServerProbes {
    pub fn count(&self) -> usize {
        self.links.len()
    }
}

fn program<'e>(ebpf: &'e mut Ebpf, name: &str) -> &'e mut UProbe {
    ebpf.program_mut(name)
        .and_then(|p| p.try_into().ok())
        .expect("the request programs are loaded with the object")
}

/// Attaches the probes to process `pid` (under the proc root `proc`).
pub fn attach(ebpf: &mut Ebpf, proc: &Path, pid: u32) -> Result<ServerProbes, ProbeFailure> {
    if is_go(&proc.join(pid.to_string()).join("exe")) {
        return Err(ProbeFailure::Go);
    }
    let target = libc_of(proc, pid).ok_or(ProbeFailure::NoLibc)?;
    let file = std::fs::File::open(&target).map_err(|_| ProbeFailure::Unreadable)?;
    let names: Vec<&str> = IO_FUNCTIONS.iter().map(|(n, _)| *n).collect();
    let mut offsets =
        crate::cuda::symbols::resolve_names(&file, &names).map_err(|_| ProbeFailure::Unreadable)?;
    // Two names of one function (an alias) would report each call twice.
    offsets.sort_unstable_by_key(|&(index, offset)| (offset, index));
    offsets.dedup_by_key(|&mut (_, offset)| offset);
    if offsets.is_empty() {
        return Err(ProbeFailure::Unreadable);
    }
    let pinned = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    let scope = UProbeScope::OneProcess(NonZeroU32::new(pid).ok_or(ProbeFailure::Attach)?);
    let mut probes = ServerProbes {
        links: Vec::with_capacity(2 * offsets.len()),
        _libc: file,
    };
    for (index, offset) in offsets {
        let kind = IO_FUNCTIONS[index as usize].1;
        for name in [ENTRY, RETURN] {
            let point = UProbeAttachPoint {
                location: UProbeAttachLocation::AbsoluteOffset(offset),
                cookie: Some(kind),
            };
            match program(ebpf, name).attach(point, &pinned, scope) {
                Ok(link) => probes.links.push((name, link)),
                Err(e) => {
                    tracing::debug!(pid, error = %e, "request probe attach failed");
                    drop(detach(ebpf, probes));
                    return Err(ProbeFailure::Attach);
                }
            }
        }
    }
    Ok(probes)
}

/// Takes the links out of the programs; dropping them detaches them (each waits for a grace
/// period: drop them with no lock held).
#[must_use = "dropping the links detaches them"]
pub fn detach(ebpf: &mut Ebpf, probes: ServerProbes) -> Vec<UProbeLink> {
    probes
        .links
        .into_iter()
        .filter_map(|(name, link)| program(ebpf, name).take_link(link).ok())
        .collect()
}

/// Adds the connections `pid` accepted on `ports` before it was probed to the kernel's
/// table; returns how many (a full table refuses the rest).
pub fn follow_open_connections(
    conns: &mut BpfHashMap<MapData, ConnKey, u32>,
    proc: &Path,
    pid: u32,
    ports: &[u16],
) -> usize {
    crate::servers::accepted_fds(proc, pid, ports)
        .into_iter()
        .filter(|&fd| conns.insert(ConnKey { tgid: pid, fd }, 0, 0).is_ok())
        .count()
}

/// Removes a process's connections from the kernel's table (it is no longer probed, or
/// gone: its fds mean nothing now).
pub fn forget_connections(conns: &mut BpfHashMap<MapData, ConnKey, u32>, pid: u32) {
    let mine: Vec<ConnKey> = conns
        .keys()
        .filter_map(Result::ok)
        .filter(|k| k.tgid == pid)
        .collect();
    for key in mine {
        let _ = conns.remove(&key);
    }
}

/// Whether the executable is a Go program: every Go binary since 1.13 has a `.go.buildinfo`
/// section. Read through positioned reads (a file truncated meanwhile is no fault).
fn is_go(exe: &Path) -> bool {
    use object::Object;
    let Ok(file) = std::fs::File::open(exe) else {
        return false;
    };
    let cache = object::read::ReadCache::new(file);
    object::File::parse(&cache).is_ok_and(|obj| obj.section_by_name(".go.buildinfo").is_some())
}

/// The libc process `pid` maps, as a path the agent can open: through `/proc/<pid>/root`
/// (its own mount namespace), or `map_files` when the file was replaced since.
fn libc_of(proc: &Path, pid: u32) -> Option<PathBuf> {
    let dir = proc.join(pid.to_string());
    let maps = std::fs::read(dir.join("maps")).ok()?;
    let (range, path, deleted) = find_libc(&String::from_utf8_lossy(&maps))?;
    Some(if deleted {
        dir.join("map_files").join(range)
    } else {
        dir.join("root").join(path.trim_start_matches('/'))
    })
}

/// The executable mapping of a libc in a maps file: (address range, path, deleted).
fn find_libc(maps: &str) -> Option<(String, String, bool)> {
    maps.lines().find_map(|line| {
        let mut fields = line.splitn(6, ' ');
        let range = fields.next()?;
        let perms = fields.next()?;
        let path = fields.nth(3)?.trim_start();
        let (path, deleted) = match path.strip_suffix(" (deleted)") {
            Some(p) => (p, true),
            None => (path, false),
        };
        let name = path.rsplit('/').next()?;
        let libc = name == "libc.so.6"
            || (name.starts_with("libc-") && name.ends_with(".so"))
            || name.starts_with("ld-musl-");
        (perms.contains('x') && path.starts_with('/') && libc)
            .then(|| (range.to_owned(), path.to_owned(), deleted))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_executable_libc_mapping() {
        let maps = "\
7f00-7f10 r--p 00000000 fd:01 77 /usr/lib/x86_64-linux-gnu/libc.so.6
7f10-7f20 r-xp 00028000 fd:01 77 /usr/lib/x86_64-linux-gnu/libc.so.6
7f30-7f40 r-xp 00000000 fd:01 78 /opt/app/libcustom.so
";
        assert_eq!(
            find_libc(maps),
            Some((
                "7f10-7f20".into(),
                "/usr/lib/x86_64-linux-gnu/libc.so.6".into(),
                false
            ))
        );
        let musl = "7f10-7f20 r-xp 00014000 fd:01 9 /lib/ld-musl-x86_64.so.1 (deleted)\n";
        assert_eq!(
            find_libc(musl),
            Some(("7f10-7f20".into(), "/lib/ld-musl-x86_64.so.1".into(), true))
        );
        assert_eq!(
            find_libc("7f10-7f20 r-xp 0 fd:01 9 /usr/bin/ollama\n"),
            None
        );
    }

    #[test]
    fn this_test_binary_is_no_go_program() {
        assert!(!is_go(&std::env::current_exe().unwrap()));
        assert!(!is_go(Path::new("/nonexistent")));
    }

    #[test]
    fn this_process_libc_has_the_socket_functions() {
        let proc = Path::new("/proc");
        let libc = libc_of(proc, std::process::id()).expect("test binaries map libc");
        let names: Vec<&str> = IO_FUNCTIONS.iter().map(|(n, _)| *n).collect();
        let found = crate::cuda::symbols::resolve_names(std::fs::File::open(libc).unwrap(), &names)
            .unwrap();
        assert_eq!(found.len(), IO_FUNCTIONS.len(), "{found:?}");
    }
}
