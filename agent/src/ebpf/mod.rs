//! The kernel side of the agent, seen from userspace: load the eBPF object, attach the exec
//! and exit tracepoints, and hand out the ring buffer and the loss counters.

mod btf;
pub mod events;

use std::path::Path;

use agent_common::{LOST_EXEC, LOST_EXIT, LOST_FORK};
use aya::maps::{HashMap, MapData, PerCpuArray, RingBuf};
use aya::programs::TracePoint;
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
    /// Whether ppid comes from the kernel (BTF offsets found) or must be read from /proc.
    pub kernel_ppid: bool,
}

/// The per-CPU counters of ring buffer reservations that failed.
pub struct LostCounters(PerCpuArray<MapData, u64>);

impl LostCounters {
    /// (exec, exit, fork) records lost since load, summed over CPUs.
    pub fn read(&self) -> Result<[u64; 3], String> {
        let sum = |slot: u32| -> Result<u64, String> {
            Ok(self
                .0
                .get(&slot, 0)
                .map_err(|e| e.to_string())?
                .iter()
                .sum())
        };
        Ok([sum(LOST_EXEC)?, sum(LOST_EXIT)?, sum(LOST_FORK)?])
    }
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
            let program: &mut TracePoint = ebpf
                .program_mut(name)
                .ok_or(SensorError::Map(
                    name,
                    "program missing from the object".into(),
                ))?
                .try_into()
                .map_err(|e| SensorError::Program(name, e))?;
            program.load().map_err(|e| SensorError::Program(name, e))?;
            program
                .attach(category, name)
                .map_err(|e| SensorError::Program(name, e))?;
        }
        let events = RingBuf::try_from(
            ebpf.take_map("EVENTS")
                .ok_or(SensorError::Map("EVENTS", "missing".into()))?,
        )
        .map_err(|e| SensorError::Map("EVENTS", e.to_string()))?;
        let lost = PerCpuArray::try_from(
            ebpf.take_map("LOST")
                .ok_or(SensorError::Map("LOST", "missing".into()))?,
        )
        .map_err(|e| SensorError::Map("LOST", e.to_string()))?;
        let tracked = HashMap::try_from(
            ebpf.take_map("TRACKED")
                .ok_or(SensorError::Map("TRACKED", "missing".into()))?,
        )
        .map_err(|e| SensorError::Map("TRACKED", e.to_string()))?;
        Ok(Sensor {
            programs: ebpf,
            events,
            lost: LostCounters(lost),
            tracked: TrackedPids(tracked),
            kernel_ppid: parent_off != 0,
        })
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
