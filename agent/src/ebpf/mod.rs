//! The kernel side of the agent, seen from userspace: load the eBPF object, attach the exec,
//! exit and fork tracepoints and the library-mapping hook, and hand out the ring buffer, the
//! loss counters and the CUDA maps.

mod btf;
pub mod events;
pub mod perf_mmap;

use std::path::Path;

use agent_common::cuda::{AllocKey, CudaKey, CudaStat};
use agent_common::http::{ConnKey, PortKey};
use agent_common::{Lost, LOST_SLOTS};

use crate::config::{LibraryHook, RequestsHook};
use crate::requests::kernel::KernelHook;
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{HashMap, MapData, PerCpuArray, RingBuf};
use aya::programs::{FEntry, KProbe, ProgramError, TracePoint, UProbe};
use aya::{Ebpf, EbpfLoader};

pub use events::{decode, ExecRecord, KernelEvent};

/// The compiled eBPF object, built by `cargo xtask build-ebpf` and embedded at compile time.
#[cfg(not(llmscope_no_ebpf_object))]
static EBPF_OBJECT: Option<&[u8]> = Some(aya::include_bytes_aligned!(env!("LLMSCOPE_EBPF_OBJECT")));
/// Built before the object existed (see build.rs): loading says so.
#[cfg(llmscope_no_ebpf_object)]
static EBPF_OBJECT: Option<&[u8]> = None;

#[derive(Debug, thiserror::Error)]
pub enum SensorError {
    #[error("--library-hook {0}: {1}")]
    Hook(&'static str, String),
    #[error("--requests-hook {0}: {1}")]
    RequestsHook(&'static str, String),
    #[error("this binary was built without its eBPF object: run `cargo xtask build-ebpf` and build it again (`cargo xtask run` does both)")]
    NoObject,
    #[error("tracefs is not mounted and mounting it at /sys/kernel/tracing failed: {0} (the agent needs root or CAP_SYS_ADMIN for that; or mount it: mount -t tracefs nodev /sys/kernel/tracing)")]
    Tracefs(std::io::Error),
    #[error("loading the eBPF object: {0} (needs root, or CAP_BPF + CAP_PERFMON, and a kernel ≥ 5.15 with BTF)")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {0}: {1}")]
    Program(&'static str, ProgramError),
    #[error("eBPF map {0}: {1}")]
    Map(&'static str, String),
    #[error("tracepoint {0} has an unexpected layout: {1}")]
    Layout(&'static str, String),
}

/// Attached programs and their maps. Dropping it detaches everything.
pub struct Sensor {
    /// Owns the loaded programs and their attachments: keep it until shutdown.
    pub programs: Ebpf,
    pub events: RingBuf<MapData>,
    pub lost: LostCounters,
    pub tracked: TrackedPids,
    pub cuda: CudaMaps,
    /// How libraries being mapped are seen (see [`MmapHook`]).
    pub mmap_hook: MmapHook,
    /// The perf records of executable mappings, when that is the hook.
    pub mmap_records: Option<perf_mmap::MmapRecords>,
    /// The library hook's program, when it is a BPF one (its skipped runs).
    pub hook_program: HookProgram,
    /// Whether ppid comes from the kernel (BTF offsets found) or must be read from /proc.
    pub kernel_ppid: bool,
    /// Request telemetry's records and its table of followed connections; None where the
    /// kernel refused its programs (request telemetry is then off, said at start-up).
    pub http: Option<HttpMaps>,
}

/// The request probes' ring, the libc probes' connection table and the kernel hooks' port
/// table (see agent-ebpf/src/http.rs).
pub struct HttpMaps {
    pub events: RingBuf<MapData>,
    pub conns: HashMap<MapData, ConnKey, u32>,
    pub ports: HashMap<MapData, PortKey, u32>,
    /// The kernel hooks, loaded; None: the libc probes are used.
    pub kernel: Option<KernelHook>,
}

/// How the kernel reports libraries being mapped (`security_mmap_file`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MmapHook {
    /// A BPF trampoline: a direct call from the function, the cheapest hook there is.
    Fentry,
    /// A kprobe on the same function, where the kernel has no BPF trampolines (a breakpoint
    /// trap per file mapping; nothing on other syscalls).
    Kprobe,
    /// Neither: the kernel's perf records of executable mappings (`PERF_RECORD_MMAP2`),
    /// filtered in userspace (see [`perf_mmap`]).
    PerfMmap,
    /// Nothing could attach: libraries are found by the /proc scans only.
    None,
}

impl MmapHook {
    pub fn as_str(self) -> &'static str {
        match self {
            MmapHook::Fentry => "fentry",
            MmapHook::Kprobe => "kprobe",
            MmapHook::PerfMmap => "perf_mmap",
            MmapHook::None => "none",
        }
    }
}

/// The per-CPU counters of ring buffer reservations that failed.
pub struct LostCounters(PerCpuArray<MapData, u64>);

/// Records lost since load, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LostCounts([u64; LOST_SLOTS as usize]);

impl LostCounts {
    pub fn get(&self, kind: Lost) -> u64 {
        self.0[kind as usize]
    }

    /// Every kind with its count, in slot order.
    pub fn iter(&self) -> impl Iterator<Item = (Lost, u64)> + '_ {
        Lost::ALL.iter().map(|&kind| (kind, self.get(kind)))
    }
}

impl LostCounters {
    /// Records lost since load, summed over CPUs. Perf mmap records lost in user space
    /// (`user_library_maps`, when that is the library hook) count with the kernel's
    /// library-map losses.
    pub fn read(&self, user_library_maps: u64) -> Result<LostCounts, String> {
        let mut counts = LostCounts::default();
        for &kind in Lost::ALL {
            let per_cpu = self.0.get(&(kind as u32), 0).map_err(|e| e.to_string())?;
            counts.0[kind as usize] = per_cpu.iter().sum();
        }
        counts.0[Lost::LibraryMap as usize] += user_library_maps;
        Ok(counts)
    }
}

/// The maps the CUDA probes aggregate into (see agent-ebpf/src/cuda.rs).
pub struct CudaMaps {
    pub stats: HashMap<MapData, CudaKey, CudaStat>,
    pub live: HashMap<MapData, u32, u64>,
    pub allocs: HashMap<MapData, AllocKey, u64>,
    pub seen: HashMap<MapData, u32, u32>,
}

/// The kernel's copy of the tracked tgids: the fork program reports children of these only.
pub struct TrackedPids(HashMap<MapData, u32, u32>);

impl TrackedPids {
    /// Fails only when the map is full (it is sized to --max-processes) or the kernel refuses.
    pub fn insert(&mut self, pid: u32) -> Result<(), String> {
        self.0.insert(pid, 0, 0).map_err(|e| e.to_string())
    }

    pub fn remove(&mut self, pid: u32) {
        // Absent already (never inserted, or removed twice): nothing to do.
        let _ = self.0.remove(&pid);
    }
}

impl Sensor {
    /// `ring_buffer_bytes`: a power of two, at least one page (checked by the config).
    /// `requests_hook`: None when request telemetry is off (its kernel hooks are then not
    /// even tried: a trial attach would touch every TCP call on the node).
    pub fn load(
        ring_buffer_bytes: u32,
        max_processes: u32,
        hook: LibraryHook,
        requests_hook: Option<RequestsHook>,
    ) -> Result<Sensor, SensorError> {
        let tracefs = ensure_tracefs()?;
        check_layout(
            &tracefs,
            "sched/sched_process_exec",
            &[("__data_loc char[] filename;", 8)],
        )?;
        check_layout(
            &tracefs,
            "task/task_newtask",
            &[("pid_t pid;", 8), (" clone_flags;", 32)],
        )?;
        // Linux ≥ 6.16 says in the exit record whether the thread was the last; older kernels
        // are asked through signal_struct.live (BTF offsets below).
        let group_dead_field = check_layout(
            &tracefs,
            "sched/sched_process_exit",
            &[("bool group_dead;", 32)],
        )
        .is_ok();
        let btf = btf::Btf::from_sys_fs();
        let offsets = |what: &str, names: &[(&str, &str)]| -> Vec<u32> {
            let found = btf.as_ref().map_err(ToString::to_string).and_then(|btf| {
                names
                    .iter()
                    .map(|(s, m)| btf.member_offset(s, m).map_err(|e| e.to_string()))
                    .collect::<Result<Vec<u32>, String>>()
            });
            found.unwrap_or_else(|e| {
                tracing::warn!(error = %e, "no kernel structure offsets from BTF: {what}");
                vec![0; names.len()]
            })
        };
        let task = offsets(
            "ppid will be read from /proc",
            &[("task_struct", "real_parent"), ("task_struct", "tgid")],
        );
        let argv = offsets(
            "argv will be read from /proc",
            &[
                ("task_struct", "mm"),
                ("mm_struct", "arg_start"),
                ("mm_struct", "arg_end"),
            ],
        );
        let signal = if group_dead_field {
            vec![0, 0]
        } else {
            offsets(
                "a process whose leader exits is taken as ended",
                &[("task_struct", "signal"), ("signal_struct", "live")],
            )
        };
        let file = offsets(
            "library mappings will be found by the /proc scans only",
            &[
                ("file", "f_path"),
                ("path", "dentry"),
                ("file", "f_inode"),
                ("dentry", "d_name"),
                ("qstr", "name"),
                ("dentry", "d_parent"),
                ("inode", "i_ino"),
                ("inode", "i_sb"),
                ("super_block", "s_dev"),
            ],
        );
        let file_known = file.iter().all(|&o| o != 0);
        let http = http_layout(btf.as_ref().ok());
        let http_known = http.is_ok();
        let http = http.unwrap_or_else(|e| {
            if requests_hook.is_some_and(|h| h != RequestsHook::Libc) {
                tracing::info!(error = %e, "no kernel hooks for request telemetry: its libc probes are used");
            }
            [0; 9]
        });
        let globals: [(&str, u32); 24] = [
            ("EXIT_GROUP_DEAD_FIELD", u32::from(group_dead_field)),
            ("TASK_SIGNAL_OFFSET", signal[0]),
            ("SIGNAL_LIVE_OFFSET", signal[1]),
            ("TASK_REAL_PARENT_OFFSET", task[0]),
            ("TASK_TGID_OFFSET", task[1]),
            ("TASK_MM_OFFSET", argv[0]),
            ("MM_ARG_START_OFFSET", argv[1]),
            ("MM_ARG_END_OFFSET", argv[2]),
            ("FILE_DENTRY_OFFSET", file[0] + file[1]),
            ("FILE_INODE_OFFSET", file[2]),
            ("DENTRY_NAME_OFFSET", file[3] + file[4]),
            ("DENTRY_PARENT_OFFSET", file[5]),
            ("INODE_INO_OFFSET", file[6]),
            ("INODE_SB_OFFSET", file[7]),
            ("SB_DEV_OFFSET", file[8]),
            ("SOCK_NUM_OFFSET", http[0]),
            ("MSGHDR_ITER_OFFSET", http[1]),
            ("ITER_TYPE_OFFSET", http[2]),
            ("ITER_IOV_OFFSET_OFFSET", http[3]),
            ("ITER_UBUF_OFFSET", http[4]),
            ("ITER_IOV_OFFSET", http[5]),
            ("ITER_NR_SEGS_OFFSET", http[6]),
            ("ITER_UBUF", http[7]),
            ("ITER_IOVEC", http[8]),
        ];
        let mut loader = EbpfLoader::new();
        for (name, value) in &globals {
            loader.override_global(name, value, true);
        }
        let mut ebpf = loader
            .map_max_entries("EVENTS", ring_buffer_bytes)
            .map_max_entries("TRACKED", max_processes)
            .map_max_entries("CUDA_SEEN", max_processes)
            .map_max_entries("CUDA_LIVE", max_processes)
            .load(EBPF_OBJECT.ok_or(SensorError::NoObject)?)?;
        let (parent_off, tgid_off) = (task[0], task[1]);
        for (category, name) in [
            ("sched", "sched_process_exec"),
            ("sched", "sched_process_exit"),
            ("task", "task_newtask"),
        ] {
            let program: &mut TracePoint = program(&mut ebpf, name)?;
            program.load().map_err(|e| SensorError::Program(name, e))?;
            program
                .attach(category, name)
                .map_err(|e| SensorError::Program(name, e))?;
        }
        for name in ["cuda_entry", "cuda_return"] {
            let program: &mut UProbe = program(&mut ebpf, name)?;
            program.load().map_err(|e| SensorError::Program(name, e))?;
        }
        let http_loaded = ["http_entry", "http_return"]
            .into_iter()
            .try_for_each(|name| {
                let program: &mut UProbe = program(&mut ebpf, name)?;
                program.load().map_err(|e| SensorError::Program(name, e))
            });
        let kernel_hook = match http_loaded {
            Ok(()) => match requests_hook {
                Some(wanted) => requests_kernel_hook(&mut ebpf, wanted, http_known)?,
                None => None,
            },
            Err(_) => None,
        };
        let (mmap_hook, mmap_records) = library_hook(&mut ebpf, hook, file_known)?;
        let hook_program = HookProgram::of(&mut ebpf, mmap_hook);
        let events = RingBuf::try_from(take(&mut ebpf, "EVENTS")?)
            .map_err(|e| SensorError::Map("EVENTS", e.to_string()))?;
        let lost = PerCpuArray::try_from(take(&mut ebpf, "LOST")?)
            .map_err(|e| SensorError::Map("LOST", e.to_string()))?;
        let tracked = HashMap::try_from(take(&mut ebpf, "TRACKED")?)
            .map_err(|e| SensorError::Map("TRACKED", e.to_string()))?;
        let cuda = CudaMaps {
            stats: HashMap::try_from(take(&mut ebpf, "CUDA_STATS")?)
                .map_err(|e| SensorError::Map("CUDA_STATS", e.to_string()))?,
            live: HashMap::try_from(take(&mut ebpf, "CUDA_LIVE")?)
                .map_err(|e| SensorError::Map("CUDA_LIVE", e.to_string()))?,
            allocs: HashMap::try_from(take(&mut ebpf, "CUDA_ALLOCS")?)
                .map_err(|e| SensorError::Map("CUDA_ALLOCS", e.to_string()))?,
            seen: HashMap::try_from(take(&mut ebpf, "CUDA_SEEN")?)
                .map_err(|e| SensorError::Map("CUDA_SEEN", e.to_string()))?,
        };
        let http = match http_loaded {
            Ok(()) => Some(HttpMaps {
                events: RingBuf::try_from(take(&mut ebpf, "HTTP_EVENTS")?)
                    .map_err(|e| SensorError::Map("HTTP_EVENTS", e.to_string()))?,
                conns: HashMap::try_from(take(&mut ebpf, "HTTP_CONNS")?)
                    .map_err(|e| SensorError::Map("HTTP_CONNS", e.to_string()))?,
                ports: HashMap::try_from(take(&mut ebpf, "HTTP_PORTS")?)
                    .map_err(|e| SensorError::Map("HTTP_PORTS", e.to_string()))?,
                kernel: kernel_hook,
            }),
            Err(e) => {
                tracing::warn!(error = %e, "the kernel refused the request probes: request telemetry is off");
                None
            }
        };
        Ok(Sensor {
            http,
            programs: ebpf,
            events,
            lost: LostCounters(lost),
            tracked: TrackedPids(tracked),
            cuda,
            kernel_ppid: parent_off != 0 && tgid_off != 0,
            mmap_hook,
            mmap_records,
            hook_program,
        })
    }
}

/// A program of the object, as its type.
fn program<'e, T>(ebpf: &'e mut Ebpf, name: &'static str) -> Result<&'e mut T, SensorError>
where
    &'e mut T: TryFrom<&'e mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(SensorError::Map(
            name,
            "program missing from the object".into(),
        ))?
        .try_into()
        .map_err(|e| SensorError::Program(name, e))
}

fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, SensorError> {
    ebpf.take_map(name)
        .ok_or(SensorError::Map(name, "missing from the object".into()))
}

/// Where the kernel hooks of request telemetry find a socket's local port and a message's
/// bytes, from the kernel's BTF (the globals of agent-ebpf/src/http.rs, in their order).
fn http_layout(btf: Option<&btf::Btf>) -> Result<[u32; 9], String> {
    let btf = btf.ok_or("the kernel has no BTF")?;
    let offset = |s: &str, m: &str| btf.member_offset(s, m).map_err(|e| e.to_string());
    // The iovec pointer is `__iov` since Linux 6.4, `iov` before.
    let iov = offset("iov_iter", "__iov").or_else(|_| offset("iov_iter", "iov"))?;
    let value = |v: &str| {
        btf.enum_value("iter_type", v)
            .map_err(|e| e.to_string())
            .and_then(|n| u32::try_from(n).map_err(|_| format!("{v} = {n}")))
    };
    Ok([
        offset("sock_common", "skc_num")?,
        offset("msghdr", "msg_iter")?,
        offset("iov_iter", "iter_type")?,
        offset("iov_iter", "iov_offset")?,
        offset("iov_iter", "ubuf")?,
        iov,
        offset("iov_iter", "nr_segs")?,
        value("ITER_UBUF")?,
        value("ITER_IOVEC")?,
    ])
}

/// Loads the kernel hooks of request telemetry `wanted` asks for: in `auto`, the best that
/// the kernel runs (None: the libc probes); a forced one it cannot run is an error.
fn requests_kernel_hook(
    ebpf: &mut Ebpf,
    wanted: RequestsHook,
    layout_known: bool,
) -> Result<Option<KernelHook>, SensorError> {
    let try_hook = |ebpf: &mut Ebpf, hook: KernelHook| {
        if !layout_known {
            return Err("the kernel's BTF does not give the socket and message layout".into());
        }
        hook.load(ebpf)
    };
    let forced = |ebpf: &mut Ebpf, hook: KernelHook, feature: &str| {
        try_hook(ebpf, hook).map(|()| Some(hook)).map_err(|e| {
            SensorError::RequestsHook(hook.as_str(), format!("{e} (this hook needs {feature})"))
        })
    };
    match wanted {
        RequestsHook::Libc => Ok(None),
        RequestsHook::Fentry => forced(
            ebpf,
            KernelHook::Fentry,
            "BPF trampolines (CONFIG_DYNAMIC_FTRACE_WITH_DIRECT_CALLS)",
        ),
        RequestsHook::Kprobe => forced(ebpf, KernelHook::Kprobe, "kprobes (CONFIG_KPROBES)"),
        RequestsHook::Auto => {
            let fentry = match try_hook(ebpf, KernelHook::Fentry) {
                Ok(()) => return Ok(Some(KernelHook::Fentry)),
                Err(e) => e,
            };
            match try_hook(ebpf, KernelHook::Kprobe) {
                Ok(()) => Ok(Some(KernelHook::Kprobe)),
                Err(kprobe) => {
                    tracing::info!(fentry_error = %fentry, kprobe_error = %kprobe, "request telemetry cannot hook the kernel's TCP functions: it uses per-process libc probes (not for Go servers)");
                    Ok(None)
                }
            }
        }
    }
}

/// Attaches the library hook `wanted` asks for: in `auto`, the best one that attaches (a
/// BPF hook needs the mapped file's identity from BTF: `file_known`); a forced one that
/// cannot attach is an error naming what the kernel lacks.
fn library_hook(
    ebpf: &mut Ebpf,
    wanted: LibraryHook,
    file_known: bool,
) -> Result<(MmapHook, Option<perf_mmap::MmapRecords>), SensorError> {
    let bpf_hook =
        |ebpf: &mut Ebpf, name: &'static str, attach: fn(&mut Ebpf) -> Result<(), String>| {
            if !file_known {
                return Err(SensorError::Hook(
                    name,
                    "the kernel's BTF does not give the mapped file's device and inode".into(),
                ));
            }
            fill_prefixes(ebpf).map_err(|e| SensorError::Hook(name, e))?;
            attach(ebpf).map_err(|e| SensorError::Hook(name, e))
        };
    let perf = || {
        perf_mmap::MmapRecords::open()
            .map(|records| (MmapHook::PerfMmap, Some(records)))
            .map_err(|e| SensorError::Hook("perf", format!("no perf mmap records: {e}")))
    };
    match wanted {
        LibraryHook::Fentry => bpf_hook(ebpf, "fentry", attach_fentry)
            .map(|()| (MmapHook::Fentry, None))
            .map_err(|e| {
                needs(
                    e,
                    "BPF trampolines (CONFIG_DYNAMIC_FTRACE_WITH_DIRECT_CALLS)",
                )
            }),
        LibraryHook::Kprobe => bpf_hook(ebpf, "kprobe", attach_kprobe)
            .map(|()| (MmapHook::Kprobe, None))
            .map_err(|e| needs(e, "kprobes (CONFIG_KPROBES)")),
        LibraryHook::Perf => perf(),
        LibraryHook::Scan => Ok((MmapHook::None, None)),
        LibraryHook::Auto => {
            let fentry = match bpf_hook(ebpf, "fentry", attach_fentry) {
                Ok(()) => return Ok((MmapHook::Fentry, None)),
                Err(e) => e,
            };
            match bpf_hook(ebpf, "kprobe", attach_kprobe) {
                Ok(()) => {
                    tracing::info!(fentry_error = %fentry, "library mappings hooked with a kprobe (no BPF trampoline)");
                    return Ok((MmapHook::Kprobe, None));
                }
                Err(kprobe) => {
                    tracing::info!(fentry_error = %fentry, kprobe_error = %kprobe, "no BPF hook on security_mmap_file: trying perf mmap records");
                }
            }
            perf().or_else(|e| {
                tracing::warn!(error = %e, "no perf mmap records either: CUDA and framework libraries are found by the /proc scans only (--rescan-interval)");
                Ok((MmapHook::None, None))
            })
        }
    }
}

/// The attached fentry or kprobe program on `security_mmap_file`: the kernel skips a run
/// when another BPF program is running on the same CPU (recursion), and counts it in the
/// program's `recursion_misses`. Those are library mappings missed, repaired like lost events
/// by the /proc scans.
pub struct HookProgram(Option<aya::programs::ProgramFd>);

impl HookProgram {
    fn of(ebpf: &mut Ebpf, hook: MmapHook) -> HookProgram {
        let fd = match hook {
            MmapHook::Fentry => program::<FEntry>(ebpf, "mmap_file")
                .ok()
                .and_then(|p| p.fd().ok()?.try_clone().ok()),
            MmapHook::Kprobe => program::<KProbe>(ebpf, "mmap_file_kprobe")
                .ok()
                .and_then(|p| p.fd().ok()?.try_clone().ok()),
            MmapHook::PerfMmap | MmapHook::None => None,
        };
        HookProgram(fd)
    }

    /// Runs of the hook the kernel skipped since it was loaded; 0 without a BPF hook.
    pub fn missed(&self) -> Result<u64, String> {
        use std::os::fd::{AsFd, AsRawFd};
        let Some(fd) = &self.0 else {
            return Ok(0);
        };
        // The part of `union bpf_attr` BPF_OBJ_GET_INFO_BY_FD reads.
        #[repr(C)]
        struct InfoAttr {
            bpf_fd: u32,
            info_len: u32,
            info: u64,
        }
        // SAFETY: bpf_prog_info is plain integers; all zeroes is a valid value.
        let mut info: aya_obj::generated::bpf_prog_info = unsafe { std::mem::zeroed() };
        let attr = InfoAttr {
            bpf_fd: fd.as_fd().as_raw_fd() as u32,
            info_len: size_of_val(&info) as u32,
            info: std::ptr::from_mut(&mut info) as u64,
        };
        // SAFETY: the kernel writes at most info_len bytes into `info`, which lives until the
        // call returns; the attribute's size is its own.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                aya_obj::generated::bpf_cmd::BPF_OBJ_GET_INFO_BY_FD as libc::c_long,
                std::ptr::from_ref(&attr),
                size_of::<InfoAttr>(),
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        Ok(info.recursion_misses)
    }
}

/// A forced hook's error, saying which kernel feature it needs.
fn needs(error: SensorError, feature: &str) -> SensorError {
    match error {
        SensorError::Hook(name, e) => {
            SensorError::Hook(name, format!("{e} (this hook needs {feature})"))
        }
        other => other,
    }
}

fn attach_fentry(ebpf: &mut Ebpf) -> Result<(), String> {
    let btf = aya::Btf::from_sys_fs().map_err(|e| e.to_string())?;
    let program: &mut FEntry = program(ebpf, "mmap_file").map_err(|e| e.to_string())?;
    program
        .load("security_mmap_file", &btf)
        .map_err(|e| e.to_string())?;
    program.attach().map_err(|e| e.to_string())?;
    Ok(())
}

fn attach_kprobe(ebpf: &mut Ebpf) -> Result<(), String> {
    let program = program::<KProbe>(ebpf, "mmap_file_kprobe").map_err(|e| e.to_string())?;
    program.load().map_err(|e| e.to_string())?;
    program
        .attach("security_mmap_file", 0)
        .map_err(|e| e.to_string())?;
    Ok(())
}

fn fill_prefixes(ebpf: &mut Ebpf) -> Result<(), String> {
    use agent_common::LIB_PREFIX_LEN;
    let mut table: LpmTrie<&mut MapData, [u8; LIB_PREFIX_LEN], u32> = LpmTrie::try_from(
        ebpf.map_mut("LIBRARY_PREFIXES")
            .ok_or("LIBRARY_PREFIXES missing from the object")?,
    )
    .map_err(|e| e.to_string())?;
    for (prefix, class) in crate::cuda::library::WATCHED_PREFIXES.iter().copied() {
        let bytes = prefix.as_bytes();
        if bytes.len() >= LIB_PREFIX_LEN {
            return Err(format!(
                "prefix {prefix} is longer than {LIB_PREFIX_LEN} bytes"
            ));
        }
        let mut data = [0u8; LIB_PREFIX_LEN];
        data[..bytes.len()].copy_from_slice(bytes);
        table
            .insert(&Key::new(bytes.len() as u32 * 8, data), class, 0)
            .map_err(|e| format!("{prefix}: {e}"))?;
    }
    Ok(())
}

/// Where tracefs is; mounts it at /sys/kernel/tracing when it is nowhere.
fn ensure_tracefs() -> Result<std::path::PathBuf, SensorError> {
    for candidate in ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"] {
        if Path::new(candidate).join("events").is_dir() {
            return Ok(candidate.into());
        }
    }
    let target = c"/sys/kernel/tracing";
    // SAFETY: plain mount(2) with static NUL-terminated strings.
    let rc = unsafe {
        libc::mount(
            c"nodev".as_ptr(),
            target.as_ptr(),
            c"tracefs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(SensorError::Tracefs(std::io::Error::last_os_error()));
    }
    tracing::info!("mounted tracefs at /sys/kernel/tracing");
    Ok("/sys/kernel/tracing".into())
}

/// The programs read tracepoint records at fixed offsets; refuse a kernel where a field is
/// elsewhere rather than read garbage. `fields`: (declaration fragment, expected offset).
fn check_layout(
    tracefs: &Path,
    event: &'static str,
    fields: &[(&str, usize)],
) -> Result<(), SensorError> {
    let path = tracefs.join("events").join(event).join("format");
    let format = std::fs::read_to_string(&path)
        .map_err(|e| SensorError::Layout(event, format!("{}: {e}", path.display())))?;
    for (decl, offset) in fields {
        let expected = format!("offset:{offset};");
        if !format
            .lines()
            .any(|l| l.contains(decl) && l.contains(&expected))
        {
            return Err(SensorError::Layout(
                event,
                format!("{} is not at offset {offset}", decl.trim()),
            ));
        }
    }
    Ok(())
}
