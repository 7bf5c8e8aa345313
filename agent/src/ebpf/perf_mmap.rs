//! Library mappings from the kernel's perf side-band records, where no BPF hook on
//! `security_mmap_file` can attach (no BPF trampolines and no kprobes — the development VM's
//! kernel is one).
//!
//! One software "dummy" perf event per CPU, counting nothing, with `mmap = 1`: the kernel then
//! writes a `PERF_RECORD_MMAP2` record (pid, device, inode, path) for every *executable* file
//! mapping on that CPU (`perf_event_mmap()`, on the mmap path — nothing on any other syscall).
//! The records are filtered here by the same file-name prefix table as the BPF hook, and
//! become the same [`LibraryMap`] events. Records lost to a full buffer are counted.
//!
//! Waking the reader per record is what lets a library mapped by a running process (`import
//! torch`) be seen within milliseconds, but it is dear: an interrupt per executable mapping
//! of every process on the node (measured here: an `mmap` of an executable file took 13.5 µs
//! with it, 5.5 µs without, 4.6 µs with no agent). So the buffers wake their reader per record
//! only while mappings are rare ([`Mode::Waking`]); while they are frequent (a build, an exec
//! storm) they are reopened to wake it only when half full ([`Mode::Batching`]) and the
//! reader drains them on its own short timer.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use super::events::LibraryMap;

/// Data pages per CPU buffer (a power of two) while mappings are rare: 64 KiB holds ~600
/// records (~110 bytes each), and the reader is woken by the first.
const WAKING_PAGES: usize = 16;
/// ... and while they batch. They are read every 2 ms, but not by a reader kept off the
/// CPU: under the soak (500 processes a second) with three CPU hogs on two cores (and a disk
/// writer), reads came up to 516 ms apart, a buffer held up to 39 KB when read, and about one run in ten lost
/// records of 64 KiB buffers. 256 KiB holds ~2,400 records, over a second of that storm.
/// The buffers have this size only while a storm lasts, and old and new buffers together
/// (320 KiB of data a CPU at the switch) stay within the default `perf_event_mlock_kb`
/// (516 KiB a CPU) that a reader without `CAP_IPC_LOCK` may lock; where the limit is
/// lower, they are mapped at the waking size.
const BATCHING_PAGES: usize = 64;

const PERF_TYPE_SOFTWARE: u32 = 1;
const PERF_COUNT_SW_DUMMY: u64 = 9;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;
/// `perf_event_attr` flag bits: `mmap` (executable mappings) and `mmap2` (with device/inode).
const ATTR_MMAP: u64 = 1 << 8;
const ATTR_MMAP2: u64 = 1 << 23;
/// `watermark`: `wakeup_events` counts bytes, not samples. With one byte, every record
/// makes the fd readable (side-band records wake a reader only through the watermark);
/// without it, a buffer wakes its reader when half full.
const ATTR_WATERMARK: u64 = 1 << 14;
const PERF_RECORD_LOST: u32 = 2;
const PERF_RECORD_MMAP2: u32 = 10;
/// `misc` bit: the record carries a build id instead of device/inode (not requested).
const PERF_RECORD_MISC_MMAP_BUILD_ID: u16 = 1 << 14;

/// `struct perf_event_attr` up to `PERF_ATTR_SIZE_VER5` (112 bytes), the part used here.
#[repr(C)]
#[derive(Default)]
struct PerfEventAttr {
    kind: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
    config2: u64,
    branch_sample_type: u64,
    sample_regs_user: u64,
    sample_stack_user: u32,
    clockid: i32,
    sample_regs_intr: u64,
    aux_watermark: u32,
    sample_max_stack: u16,
    reserved: u16,
}

/// Offsets in `struct perf_event_mmap_page` (include/uapi/linux/perf_event.h).
const DATA_HEAD_OFFSET: usize = 1024;
const DATA_TAIL_OFFSET: usize = 1032;

struct CpuBuffer {
    fd: OwnedFd,
    base: *mut u8,
    page: usize,
    data_size: usize,
}

// SAFETY: the mapping is owned by this value and only touched through &mut self.
unsafe impl Send for CpuBuffer {}

impl Drop for CpuBuffer {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `open` mapped.
        unsafe { libc::munmap(self.base.cast(), self.page + self.data_size) };
    }
}

/// When the buffers wake their reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// At every record.
    Waking,
    /// When a buffer is half full.
    Batching,
}

/// Executable mappings per second above which waking buffers batch, judged every
/// [`QUICK_LOOK`]: at ~8 µs of interrupt per waking record, 500 a second cost the node at
/// most 0.4 % of a core. A process start is no storm (a Python interpreter maps ~20 files at
/// once: 200 a second over a look); a storm pays for one look at most.
const BATCH_ABOVE: f64 = 500.0;
const QUICK_LOOK: Duration = Duration::from_millis(100);
/// ... and below which batching buffers wake per record again, judged every [`CALM_LOOK`]
/// (a storm with pauses must not flip the buffers back and forth).
const WAKE_BELOW: f64 = 100.0;
const CALM_LOOK: Duration = Duration::from_secs(1);

/// Picks the [`Mode`] from the rate of executable mappings the reader sees.
#[derive(Debug, Default)]
pub struct ModePolicy {
    since: Option<(u64, Instant)>,
}

impl ModePolicy {
    /// The mode for buffers in `mode` that have read `mappings` since open, at `now`.
    pub fn next(&mut self, mode: Mode, mappings: u64, now: Instant) -> Mode {
        let Some((count, at)) = self.since else {
            self.since = Some((mappings, now));
            return mode;
        };
        let elapsed = now.saturating_duration_since(at);
        let look = match mode {
            Mode::Waking => QUICK_LOOK,
            Mode::Batching => CALM_LOOK,
        };
        if elapsed < look {
            return mode;
        }
        self.since = Some((mappings, now));
        let rate = mappings.saturating_sub(count) as f64 / elapsed.as_secs_f64();
        match mode {
            Mode::Waking if rate > BATCH_ABOVE => Mode::Batching,
            Mode::Batching if rate < WAKE_BELOW => Mode::Waking,
            _ => mode,
        }
    }
}

/// The per-CPU perf buffers of executable-mapping records.
pub struct MmapRecords {
    cpu_ids: Vec<u32>,
    cpus: Vec<CpuBuffer>,
    mode: Mode,
    /// Records the kernel could not write because a buffer was full.
    lost: u64,
    /// Executable mappings read since open (of any file).
    mappings: u64,
    scratch: Vec<u8>,
}

impl MmapRecords {
    /// Opens one buffer per online CPU, waking per record. Fails when perf events are not
    /// available.
    pub fn open() -> std::io::Result<MmapRecords> {
        let online = std::fs::read_to_string("/sys/devices/system/cpu/online")?;
        let cpu_ids = parse_cpu_list(&online).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("cannot parse the online CPU list {online:?}"),
            )
        })?;
        let cpus = open_all(&cpu_ids, Mode::Waking)?;
        Ok(MmapRecords {
            cpu_ids,
            cpus,
            mode: Mode::Waking,
            lost: 0,
            mappings: 0,
            scratch: Vec::new(),
        })
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Reopens the buffers in `mode`, handing what the old ones hold to `f`. The new buffers
    /// are open before the old ones are drained and closed, so no record is missed; one
    /// written meanwhile may be handed twice (the same mapping reported again is harmless).
    pub fn set_mode(
        &mut self,
        mode: Mode,
        classify: impl Fn(&str) -> Option<u32>,
        f: impl FnMut(LibraryMap),
    ) -> std::io::Result<()> {
        if mode == self.mode {
            return Ok(());
        }
        let fresh = open_all(&self.cpu_ids, mode)?;
        self.drain(classify, f);
        self.cpus = fresh;
        self.mode = mode;
        Ok(())
    }

    /// Executable mappings read since open, of any file (the rate that decides the mode).
    pub fn mappings(&self) -> u64 {
        self.mappings
    }

    /// The buffers' fds: each is readable once its buffer holds a record.
    pub fn fds(&self) -> impl Iterator<Item = std::os::fd::RawFd> + '_ {
        self.cpus.iter().map(|cpu| cpu.fd.as_raw_fd())
    }

    /// Records lost since open.
    pub fn lost(&self) -> u64 {
        self.lost
    }

    /// Hands every library mapping recorded since the last call to `f`.
    pub fn drain(&mut self, classify: impl Fn(&str) -> Option<u32>, mut f: impl FnMut(LibraryMap)) {
        for cpu in &mut self.cpus {
            self.mappings += cpu.drain(&mut self.scratch, &mut self.lost, &classify, &mut f);
        }
    }
}

fn open_all(cpu_ids: &[u32], mode: Mode) -> std::io::Result<Vec<CpuBuffer>> {
    cpu_ids
        .iter()
        .map(|&cpu| CpuBuffer::open(cpu, mode))
        .collect()
}

impl CpuBuffer {
    fn open(cpu: u32, mode: Mode) -> std::io::Result<CpuBuffer> {
        let mut attr = PerfEventAttr {
            kind: PERF_TYPE_SOFTWARE,
            size: size_of::<PerfEventAttr>() as u32,
            config: PERF_COUNT_SW_DUMMY,
            flags: ATTR_MMAP | ATTR_MMAP2,
            ..Default::default()
        };
        if mode == Mode::Waking {
            attr.flags |= ATTR_WATERMARK;
            attr.wakeup_events = 1;
        }
        // SAFETY: perf_event_open(2) with a valid attr; the fd is owned below.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_perf_event_open,
                &attr as *const PerfEventAttr,
                -1 as libc::pid_t,
                cpu as libc::c_int,
                -1 as libc::c_int,
                PERF_FLAG_FD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh fd from the kernel, owned from here on.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let sizes: &[usize] = match mode {
            Mode::Waking => &[WAKING_PAGES],
            // A batching buffer the locked-memory limit refuses is mapped at the waking size.
            Mode::Batching => &[BATCHING_PAGES, WAKING_PAGES],
        };
        let mut mapped = Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        for data_size in sizes.iter().map(|n| n * page) {
            // SAFETY: mapping the event's ring: one header page plus a power of two of data
            // pages.
            let base = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    page + data_size,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd.as_raw_fd(),
                    0,
                )
            };
            if base != libc::MAP_FAILED {
                mapped = Ok((base, data_size));
                break;
            }
            mapped = Err(std::io::Error::last_os_error());
        }
        let (base, data_size) = mapped?;
        Ok(CpuBuffer {
            fd,
            base: base.cast(),
            page,
            data_size,
        })
    }

    /// Hands the library mappings recorded since the last call to `f`; how many executable
    /// mappings there were.
    fn drain(
        &mut self,
        scratch: &mut Vec<u8>,
        lost: &mut u64,
        classify: &impl Fn(&str) -> Option<u32>,
        f: &mut impl FnMut(LibraryMap),
    ) -> u64 {
        let mut mappings = 0;
        use std::sync::atomic::{fence, Ordering};
        // SAFETY: the header page is mapped; the kernel writes data_head, we write data_tail.
        let head_ptr = unsafe { self.base.add(DATA_HEAD_OFFSET) } as *const u64;
        let tail_ptr = unsafe { self.base.add(DATA_TAIL_OFFSET) } as *mut u64;
        let head = unsafe { std::ptr::read_volatile(head_ptr) };
        // Records up to `head` are complete once it is read (the kernel's smp_wmb pairs here).
        fence(Ordering::Acquire);
        let mut tail = unsafe { std::ptr::read_volatile(tail_ptr) };
        let data = unsafe { self.base.add(self.page) };
        while tail + 8 <= head {
            let mut header = [0u8; 8];
            self.copy(data, tail, &mut header);
            let kind = u32::from_ne_bytes(header[0..4].try_into().unwrap());
            let misc = u16::from_ne_bytes(header[4..6].try_into().unwrap());
            let size = u16::from_ne_bytes(header[6..8].try_into().unwrap()) as u64;
            if size < 8 || tail + size > head {
                // A corrupt header would loop forever: skip to what the kernel wrote.
                tail = head;
                break;
            }
            scratch.clear();
            scratch.resize(size as usize, 0);
            self.copy(data, tail, scratch);
            match kind {
                PERF_RECORD_MMAP2 if misc & PERF_RECORD_MISC_MMAP_BUILD_ID == 0 => {
                    mappings += 1;
                    if let Some(map) = parse_mmap2(scratch, classify) {
                        f(map);
                    }
                }
                PERF_RECORD_LOST if scratch.len() >= 24 => {
                    *lost += u64::from_ne_bytes(scratch[16..24].try_into().unwrap());
                }
                _ => {}
            }
            tail += size;
        }
        fence(Ordering::Release);
        // SAFETY: as above; the kernel may reuse everything before the new tail.
        unsafe { std::ptr::write_volatile(tail_ptr, tail) };
        mappings
    }

    /// Copies `out.len()` bytes at ring position `pos`, across the wrap.
    fn copy(&self, data: *const u8, pos: u64, out: &mut [u8]) {
        let start = (pos as usize) & (self.data_size - 1);
        let first = out.len().min(self.data_size - start);
        // SAFETY: both ranges are inside the data area of the mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(data.add(start), out.as_mut_ptr(), first);
            std::ptr::copy_nonoverlapping(data, out.as_mut_ptr().add(first), out.len() - first);
        }
    }
}

/// A `PERF_RECORD_MMAP2` record (header included) as a [`LibraryMap`], when its file name
/// is one `classify` knows.
fn parse_mmap2(record: &[u8], classify: impl Fn(&str) -> Option<u32>) -> Option<LibraryMap> {
    // header 8, pid 4, tid 4, addr 8, len 8, pgoff 8, maj 4, min 4, ino 8, ino_gen 8,
    // prot 4, flags 4, then the NUL-terminated file name.
    const NAME_OFFSET: usize = 8 + 4 + 4 + 8 + 8 + 8 + 4 + 4 + 8 + 8 + 4 + 4;
    let u32_at = |off: usize| u32::from_ne_bytes(record[off..off + 4].try_into().unwrap());
    let name_bytes = record.get(NAME_OFFSET..)?;
    let end = name_bytes.iter().position(|b| *b == 0)?;
    let path = std::str::from_utf8(&name_bytes[..end]).ok()?;
    let mut parts = path.rsplit('/');
    let name = parts.next()?;
    let class = classify(name)?;
    Some(LibraryMap {
        pid: u32_at(8),
        class,
        dev: libc::makedev(u32_at(40), u32_at(44)),
        ino: u64::from_ne_bytes(record[48..56].try_into().unwrap()),
        name: name.to_owned(),
        parent: parts.next().unwrap_or_default().to_owned(),
    })
}

/// `0-3,8,10-11` → the CPU numbers; None for anything else.
fn parse_cpu_list(list: &str) -> Option<Vec<u32>> {
    let mut cpus = Vec::new();
    for part in list.trim().split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
                if b < a || b - a > 65_536 {
                    return None;
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(part.parse().ok()?),
        }
    }
    Some(cpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0-1\n"), Some(vec![0, 1]));
        assert_eq!(parse_cpu_list("0,2-3,7"), Some(vec![0, 2, 3, 7]));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("x"), None);
    }

    fn record(path: &[u8]) -> Vec<u8> {
        let mut r = vec![0u8; 72];
        r[0..4].copy_from_slice(&PERF_RECORD_MMAP2.to_ne_bytes());
        r[8..12].copy_from_slice(&4242u32.to_ne_bytes());
        r[40..44].copy_from_slice(&8u32.to_ne_bytes());
        r[44..48].copy_from_slice(&1u32.to_ne_bytes());
        r[48..56].copy_from_slice(&77u64.to_ne_bytes());
        r.extend_from_slice(path);
        r.push(0);
        r
    }

    #[test]
    fn mmap2_records_become_library_maps() {
        let classify = |name: &str| name.starts_with("libcudart.so").then_some(1);
        let map = parse_mmap2(&record(b"/venv/nvidia/lib/libcudart.so.12"), classify).unwrap();
        assert_eq!(
            (
                map.pid,
                map.class,
                map.ino,
                map.name.as_str(),
                map.parent.as_str()
            ),
            (4242, 1, 77, "libcudart.so.12", "lib")
        );
        assert_eq!(map.dev, libc::makedev(8, 1));
        assert_eq!(parse_mmap2(&record(b"/usr/lib/libc.so.6"), classify), None);
        let mut unterminated = record(b"/x/libcudart.so.12");
        unterminated.pop();
        assert_eq!(parse_mmap2(&unterminated, classify), None);
        assert_eq!(parse_mmap2(&[0u8; 20], classify), None, "a short record");
    }

    #[test]
    fn buffers_batch_within_a_tenth_of_a_second_of_a_storm_and_wake_after_a_calm_second() {
        let ms = Duration::from_millis;
        let t0 = Instant::now();
        let mut policy = ModePolicy::default();
        let mut mode = policy.next(Mode::Waking, 0, t0);
        assert_eq!(mode, Mode::Waking);
        // A process start: 25 mappings at once (250 a second over the look).
        mode = policy.next(mode, 25, t0 + ms(50));
        assert_eq!(mode, Mode::Waking, "too soon to judge");
        mode = policy.next(mode, 25, t0 + ms(100));
        assert_eq!(mode, Mode::Waking);
        // A storm: 60 in the next 100 ms.
        mode = policy.next(mode, 85, t0 + ms(200));
        assert_eq!(mode, Mode::Batching);
        // Batching is judged over a second: 300 in it (in between) keeps it.
        mode = policy.next(mode, 300, t0 + ms(700));
        assert_eq!(mode, Mode::Batching, "too soon to judge");
        mode = policy.next(mode, 385, t0 + ms(1200));
        assert_eq!(mode, Mode::Batching);
        // A calm second.
        mode = policy.next(mode, 450, t0 + ms(2200));
        assert_eq!(mode, Mode::Waking);
    }

    #[test]
    fn the_attr_is_version_5_sized() {
        assert_eq!(size_of::<PerfEventAttr>(), 112);
    }
}
