//! The kernel hooks of request telemetry (agent-ebpf/src/http.rs, `tcp_*`): `tcp_sendmsg`,
//! `tcp_recvmsg` (entry and return) and `tcp_close`, as BPF trampolines where the kernel has
//! them, else kprobes. Unlike the libc probes they see every server, Go programs such as
//! Ollama included, and cost the server no breakpoint; but every TCP send and receive on the
//! node passes them while they are attached (a read and a lookup for a connection nobody
//! follows), so they are attached only while a server is followed. Which connections are
//! followed is the port table: (server pid, listening port) pairs.

use std::collections::BTreeSet;

use agent_common::http::PortKey;
use aya::maps::{HashMap as BpfHashMap, MapData};
use aya::programs::fentry::FEntryLink;
use aya::programs::fexit::FExitLink;
use aya::programs::kprobe::KProbeLink;
use aya::programs::{FEntry, FExit, KProbe, ProgramError};
use aya::Ebpf;

/// How the kernel hooks attach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelHook {
    Fentry,
    Kprobe,
}

/// (program, kernel function) of each hook.
const FENTRY: &[(&str, &str)] = &[
    ("tcp_send_fentry", "tcp_sendmsg"),
    ("tcp_recv_fentry", "tcp_recvmsg"),
    ("tcp_close_fentry", "tcp_close"),
];
const FEXIT: &[(&str, &str)] = &[
    ("tcp_send_fexit", "tcp_sendmsg"),
    ("tcp_recv_fexit", "tcp_recvmsg"),
];
const KPROBE: &[(&str, &str)] = &[
    ("tcp_send_kprobe", "tcp_sendmsg"),
    ("tcp_recv_kprobe", "tcp_recvmsg"),
    ("tcp_close_kprobe", "tcp_close"),
    ("tcp_io_kretprobe", "tcp_sendmsg"),
    ("tcp_io_kretprobe", "tcp_recvmsg"),
];

fn program<'e, T>(ebpf: &'e mut Ebpf, name: &str) -> Result<&'e mut T, String>
where
    &'e mut T: TryFrom<&'e mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| format!("{name} missing from the object"))?
        .try_into()
        .map_err(|e: ProgramError| format!("{name}: {e}"))
}

impl KernelHook {
    pub fn as_str(self) -> &'static str {
        match self {
            KernelHook::Fentry => "fentry",
            KernelHook::Kprobe => "kprobe",
        }
    }

    /// Loads the hook's programs, then attaches and detaches them once: a kernel that
    /// cannot run them says so now, not when a server is found.
    pub fn load(self, ebpf: &mut Ebpf) -> Result<(), String> {
        let e = |name: &'static str| move |e: ProgramError| format!("{name}: {e}");
        match self {
            KernelHook::Fentry => {
                let btf = aya::Btf::from_sys_fs().map_err(|e| e.to_string())?;
                for (name, function) in FENTRY {
                    program::<FEntry>(ebpf, name)?
                        .load(function, &btf)
                        .map_err(e(name))?;
                }
                for (name, function) in FEXIT {
                    program::<FExit>(ebpf, name)?
                        .load(function, &btf)
                        .map_err(e(name))?;
                }
            }
            KernelHook::Kprobe => {
                let names: BTreeSet<&str> = KPROBE.iter().map(|(n, _)| *n).collect();
                for name in names {
                    program::<KProbe>(ebpf, name)?.load().map_err(e(name))?;
                }
            }
        }
        drop(self.attach(ebpf)?);
        Ok(())
    }

    /// Attaches the loaded programs; dropping what it returns detaches them (each link waits
    /// for a grace period: drop it with no lock held).
    pub fn attach(self, ebpf: &mut Ebpf) -> Result<Attached, String> {
        let (mut entries, mut exits, mut probes) = (Vec::new(), Vec::new(), Vec::new());
        let e = |name: &'static str| move |e: ProgramError| format!("{name}: {e}");
        match self {
            KernelHook::Fentry => {
                for (name, _) in FENTRY {
                    let p = program::<FEntry>(ebpf, name)?;
                    let id = p.attach().map_err(e(name))?;
                    entries.push(p.take_link(id).map_err(e(name))?);
                }
                for (name, _) in FEXIT {
                    let p = program::<FExit>(ebpf, name)?;
                    let id = p.attach().map_err(e(name))?;
                    exits.push(p.take_link(id).map_err(e(name))?);
                }
            }
            KernelHook::Kprobe => {
                for (name, function) in KPROBE {
                    let p = program::<KProbe>(ebpf, name)?;
                    let id = p.attach(function, 0).map_err(e(name))?;
                    probes.push(p.take_link(id).map_err(e(name))?);
                }
            }
        }
        Ok(Attached {
            _entries: entries,
            _exits: exits,
            _probes: probes,
        })
    }
}

/// Attached hooks; dropped, detached.
#[derive(Default)]
pub struct Attached {
    _entries: Vec<FEntryLink>,
    _exits: Vec<FExitLink>,
    _probes: Vec<KProbeLink>,
}

/// Follows `pid`'s connections on `ports`; false when the table is full (nothing of it
/// is left in the table then).
pub fn follow_ports(
    ports_table: &mut BpfHashMap<MapData, PortKey, u32>,
    pid: u32,
    ports: &[u16],
) -> bool {
    for (i, &port) in ports.iter().enumerate() {
        let key = PortKey {
            tgid: pid,
            port: u32::from(port),
        };
        if ports_table.insert(key, 0, 0).is_err() {
            forget_ports(ports_table, pid, &ports[..i]);
            return false;
        }
    }
    true
}

pub fn forget_ports(ports_table: &mut BpfHashMap<MapData, PortKey, u32>, pid: u32, ports: &[u16]) {
    for &port in ports {
        let _ = ports_table.remove(&PortKey {
            tgid: pid,
            port: u32::from(port),
        });
    }
}
