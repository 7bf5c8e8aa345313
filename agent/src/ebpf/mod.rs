//! The kernel side of the agent, seen from userspace: load the eBPF object, attach the exec
//! and exit tracepoints, and hand out the ring buffer and the loss counters.

mod btf;
pub mod events;

use std::path::Path;

use agent_common::cuda::{AllocKey, CudaKey, CudaStat};
use agent_common::{
    LOST_CUDA_ALLOC, LOST_CUDA_EVENT, LOST_CUDA_STATS, LOST_EXEC, LOST_EXIT, LOST_FORK,
};
use aya::maps::{HashMap, MapData, PerCpuArray, RingBuf};
use aya::programs::{ProgramError, TracePoint, UProbe};
use aya::{Ebpf, EbpfLoader};

pub use events::{decode, ExecRecord, KernelEvent};

/// The compiled eBPF object, built by `cargo xtask build-ebpf` and embedded at compile time.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("LLMSCOPE_EBPF_OBJECT"));

#[derive(Debug, thiserror::Error)]
pub enum SensorError {
    #[error("tracefs is not mounted and mounting it at /sys/kernel/tracing failed: {0} (the agent needs root or CAP_SYS_ADMIN for that; or mount it: mount -t tracefs nodev /sys/kernel/tracing)")]
    Tracefs(std::io::Error),
    #[error("loading the eBPF object: {0} (needs root, or CAP_BPF + CAP_PERFMON, and a kernel ≥ 5.15 with BTF)")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {0}: {1}")]
    Program(&'static str, aya::programs::ProgramError),
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
    /// Whether tracked processes opening CUDA libraries are reported (syscall tracepoints).
    pub library_trigger: bool,
    /// Whether ppid comes from the kernel (BTF offsets found) or must be read from /proc.
    pub kernel_ppid: bool,
}

/// The per-CPU counters of ring buffer reservations that failed.
pub struct LostCounters(PerCpuArray<MapData, u64>);

impl LostCounters {
    /// Records lost since load, summed over CPUs: exec, exit, fork, CUDA events, CUDA
    /// counters (map full), CUDA allocations (map full).
    pub fn read(&self) -> Result<[u64; 6], String> {
        let sum = |slot: u32| -> Result<u64, String> {
            Ok(self
                .0
                .get(&slot, 0)
                .map_err(|e| e.to_string())?
                .iter()
                .sum())
        };
        Ok([
            sum(LOST_EXEC)?,
            sum(LOST_EXIT)?,
            sum(LOST_FORK)?,
            sum(LOST_CUDA_EVENT)?,
            sum(LOST_CUDA_STATS)?,
            sum(LOST_CUDA_ALLOC)?,
        ])
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
    pub fn load(ring_buffer_bytes: u32, max_processes: u32) -> Result<Sensor, SensorError> {
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
        let (parent_off, tgid_off) = match task_offsets() {
            Ok(offsets) => offsets,
            Err(e) => {
                tracing::warn!(error = %e, "no task_struct offsets from BTF: ppid will be read from /proc");
                (0, 0)
            }
        };
        let mut ebpf = EbpfLoader::new()
            .override_global("TASK_REAL_PARENT_OFFSET", &parent_off, true)
            .override_global("TASK_TGID_OFFSET", &tgid_off, true)
            .map_max_entries("EVENTS", ring_buffer_bytes)
            .map_max_entries("TRACKED", max_processes)
            .load(EBPF_OBJECT)?;
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
        let library_trigger = attach_library_trigger(&mut ebpf, &tracefs);
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
        Ok(Sensor {
            programs: ebpf,
            events,
            lost: LostCounters(lost),
            tracked: TrackedPids(tracked),
            cuda,
            kernel_ppid: parent_off != 0,
            library_trigger,
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

/// The event-driven trigger for CUDA libraries: tracked processes opening `libcud*` files.
/// Optional: without syscall tracepoints the /proc scans still find the libraries.
fn attach_library_trigger(ebpf: &mut Ebpf, tracefs: &Path) -> bool {
    let result = check_layout(
        tracefs,
        "syscalls/sys_enter_openat",
        &[("const char * filename;", 24)],
    )
    .map_err(|e| e.to_string())
    .and_then(|()| {
        let program: &mut TracePoint = ebpf
            .program_mut("sys_enter_openat")
            .ok_or("program missing from the object")?
            .try_into()
            .map_err(|e: ProgramError| e.to_string())?;
        program.load().map_err(|e| e.to_string())?;
        program
            .attach("syscalls", "sys_enter_openat")
            .map_err(|e| e.to_string())?;
        Ok(())
    });
    match result {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, "no openat trigger for CUDA libraries: they are found by the /proc scans only (--rescan-interval)");
            false
        }
    }
}

fn task_offsets() -> Result<(u32, u32), btf::BtfError> {
    let btf = btf::Btf::from_sys_fs()?;
    Ok((
        btf.member_offset("task_struct", "real_parent")?,
        btf.member_offset("task_struct", "tgid")?,
    ))
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
