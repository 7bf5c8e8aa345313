//! Library mappings from the kernel's perf side-band records, where no BPF hook on
//! `security_mmap_file` can attach (no BPF trampolines and no kprobes — the development VM's
//! kernel is one).
//!
//! One software "dummy" perf event per CPU, counting nothing, with `mmap = 1`: the kernel then
//! writes a `PERF_RECORD_MMAP2` record (pid, device, inode, path) for every *executable* file
//! mapping on that CPU (`perf_event_mmap()`, on the mmap path — nothing on any other syscall).
//! The records are filtered here by the same file-name prefix table as the BPF hook, and
//! become the same [`LibraryMap`] events. Records lost to a full buffer are counted.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::events::LibraryMap;

/// Data pages per CPU buffer (a power of two): 64 KiB holds ~400 records, 10 ms of a busy
/// node's executable mappings many times over.
const DATA_PAGES: usize = 16;

const PERF_TYPE_SOFTWARE: u32 = 1;
const PERF_COUNT_SW_DUMMY: u64 = 9;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;
/// `perf_event_attr` flag bits: `mmap` (executable mappings) and `mmap2` (with device/inode).
const ATTR_MMAP: u64 = 1 << 8;
const ATTR_MMAP2: u64 = 1 << 23;
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
    _fd: OwnedFd,
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

/// The per-CPU perf buffers of executable-mapping records.
pub struct MmapRecords {
    cpus: Vec<CpuBuffer>,
    /// Records the kernel could not write because a buffer was full.
    lost: u64,
    scratch: Vec<u8>,
}

impl MmapRecords {
    /// Opens one buffer per online CPU. Fails when perf events are not available.
    pub fn open() -> std::io::Result<MmapRecords> {
        let online = std::fs::read_to_string("/sys/devices/system/cpu/online")?;
        let cpus = parse_cpu_list(&online).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("cannot parse the online CPU list {online:?}"),
            )
        })?;
        let mut buffers = Vec::with_capacity(cpus.len());
        for cpu in cpus {
            buffers.push(CpuBuffer::open(cpu)?);
        }
        Ok(MmapRecords {
            cpus: buffers,
            lost: 0,
            scratch: Vec::new(),
        })
    }

    /// Records lost since open.
    pub fn lost(&self) -> u64 {
        self.lost
    }

    /// Hands every library mapping recorded since the last call to `f`.
    pub fn drain(&mut self, classify: impl Fn(&str) -> Option<u32>, mut f: impl FnMut(LibraryMap)) {
        for cpu in &mut self.cpus {
            cpu.drain(&mut self.scratch, &mut self.lost, &classify, &mut f);
        }
    }
}

impl CpuBuffer {
    fn open(cpu: u32) -> std::io::Result<CpuBuffer> {
        let attr = PerfEventAttr {
            kind: PERF_TYPE_SOFTWARE,
            size: size_of::<PerfEventAttr>() as u32,
            config: PERF_COUNT_SW_DUMMY,
            flags: ATTR_MMAP | ATTR_MMAP2,
            ..Default::default()
        };
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
        let data_size = DATA_PAGES * page;
        // SAFETY: mapping the event's ring: one header page plus a power of two of data pages.
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
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(CpuBuffer {
            _fd: fd,
            base: base.cast(),
            page,
            data_size,
        })
    }

    fn drain(
        &mut self,
        scratch: &mut Vec<u8>,
        lost: &mut u64,
        classify: &impl Fn(&str) -> Option<u32>,
        f: &mut impl FnMut(LibraryMap),
    ) {
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
    fn the_attr_is_version_5_sized() {
        assert_eq!(size_of::<PerfEventAttr>(), 112);
    }
}
