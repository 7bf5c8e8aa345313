//! Decoding ring buffer records into events. A record that is too short or of an unknown
//! kind is counted and skipped, never trusted.

use agent_common::{
    CudaOomEvent, ExecEvent, ExitEvent, ForkEvent, LibraryMapEvent, PidEvent, EVENT_CUDA_FIRST_USE,
    EVENT_CUDA_OOM, EVENT_CUDA_RETIRED, EVENT_EXEC, EVENT_EXIT, EVENT_FORK, EVENT_LIBRARY_MAP,
};

use crate::proc::parse_cmdline;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecRecord {
    pub pid: u32,
    pub ppid: u32,
    pub uid: u32,
    pub comm: String,
    pub filename: String,
    pub argv: Vec<String>,
    /// The kernel copied only the start of a longer argv.
    pub argv_truncated: bool,
    pub ktime_ns: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelEvent {
    Exec(ExecRecord),
    /// The process's last thread exited. `cuda_generation`: its CUDA counters' generation,
    /// already forgotten by the kernel (0: it never called CUDA).
    Exit {
        pid: u32,
        cuda_generation: u32,
        ktime_ns: u64,
    },
    /// The process exec'd after calling CUDA: the counters of its old image are retired.
    CudaRetired {
        pid: u32,
        cuda_generation: u32,
    },
    /// A tracked process created a child without exec.
    Fork {
        pid: u32,
        ppid: u32,
        ktime_ns: u64,
    },
    /// A process called a probed CUDA function for the first time.
    CudaFirstUse {
        pid: u32,
    },
    /// A CUDA allocation of `size` bytes failed with out-of-memory.
    CudaOom {
        pid: u32,
        function: u32,
        code: u32,
        size: u64,
    },
    /// A process is mapping an executable file whose name matched the library table.
    LibraryMap(LibraryMap),
    Malformed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibraryMap {
    pub pid: u32,
    /// The table's class (`LIB_*`).
    pub class: u32,
    /// The file's device (userspace encoding, as `stat` reports it; 0 when unknown) and inode.
    pub dev: u64,
    pub ino: u64,
    /// The file's name, and the name of the directory that holds it.
    pub name: String,
    pub parent: String,
}

impl LibraryMap {
    /// `/<directory>/<name>`: enough of the path for the classification rules, which match
    /// a package directory (`/vllm/`) or a library name.
    pub fn short_path(&self) -> String {
        format!("/{}/{}", self.parent, self.name)
    }
}

/// The kernel's `dev_t` (`MAJOR << 20 | MINOR`) as userspace's (`makedev`).
fn user_dev(kernel: u64) -> u64 {
    let (major, minor) = ((kernel >> 20) as u32, (kernel & 0xf_ffff) as u32);
    libc::makedev(major, minor)
}

pub fn decode(bytes: &[u8]) -> KernelEvent {
    let Some(kind) = bytes
        .get(..4)
        .map(|b| u32::from_ne_bytes(b.try_into().unwrap()))
    else {
        return KernelEvent::Malformed;
    };
    match kind {
        EVENT_EXEC if bytes.len() >= size_of::<ExecEvent>() => {
            // SAFETY: ExecEvent is Pod (repr(C), no padding) and the slice is long enough.
            let ev: ExecEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
            let argv_len = (ev.argv_len as usize).min(ev.argv.len());
            KernelEvent::Exec(ExecRecord {
                pid: ev.tgid,
                ppid: ev.ppid,
                uid: ev.uid,
                comm: c_string(&ev.comm),
                filename: c_string(&ev.filename),
                argv: parse_cmdline(&ev.argv[..argv_len]),
                argv_truncated: ev.argv_total as usize > argv_len,
                ktime_ns: ev.ktime_ns,
            })
        }
        EVENT_EXIT | EVENT_CUDA_RETIRED if bytes.len() >= size_of::<ExitEvent>() => {
            // SAFETY: as above.
            let ev: ExitEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
            if kind == EVENT_EXIT {
                KernelEvent::Exit {
                    pid: ev.tgid,
                    cuda_generation: ev.cuda_generation,
                    ktime_ns: ev.ktime_ns,
                }
            } else {
                KernelEvent::CudaRetired {
                    pid: ev.tgid,
                    cuda_generation: ev.cuda_generation,
                }
            }
        }
        EVENT_FORK if bytes.len() >= size_of::<ForkEvent>() => {
            // SAFETY: as above.
            let ev: ForkEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
            KernelEvent::Fork {
                pid: ev.tgid,
                ppid: ev.ppid,
                ktime_ns: ev.ktime_ns,
            }
        }
        EVENT_CUDA_FIRST_USE if bytes.len() >= size_of::<PidEvent>() => {
            // SAFETY: as above.
            let ev: PidEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
            KernelEvent::CudaFirstUse { pid: ev.tgid }
        }
        EVENT_CUDA_OOM if bytes.len() >= size_of::<CudaOomEvent>() => {
            // SAFETY: as above.
            let ev: CudaOomEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
            KernelEvent::CudaOom {
                pid: ev.tgid,
                function: ev.function,
                code: ev.code,
                size: ev.size,
            }
        }
        EVENT_LIBRARY_MAP if bytes.len() >= size_of::<LibraryMapEvent>() => {
            // SAFETY: as above.
            let ev: LibraryMapEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
            KernelEvent::LibraryMap(LibraryMap {
                pid: ev.tgid,
                class: ev.class,
                dev: if ev.dev == 0 { 0 } else { user_dev(ev.dev) },
                ino: ev.ino,
                name: c_string(&ev.name),
                parent: c_string(&ev.parent),
            })
        }
        _ => KernelEvent::Malformed,
    }
}

fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_common::{ARGV_LEN, COMM_LEN, FILENAME_LEN};

    fn as_bytes<T>(v: &T) -> &[u8] {
        // SAFETY: test-only view of a Pod value's bytes.
        unsafe { std::slice::from_raw_parts((v as *const T).cast(), size_of::<T>()) }
    }

    #[test]
    fn decodes_exec_with_a_cut_argv() {
        let mut ev = ExecEvent {
            kind: EVENT_EXEC,
            tgid: 42,
            ppid: 7,
            uid: 1000,
            argv_len: 0,
            argv_total: 5000,
            ktime_ns: 9,
            comm: [0; COMM_LEN],
            filename: [b'x'; FILENAME_LEN],
            argv: [0xff; ARGV_LEN],
        };
        ev.comm[..12].copy_from_slice(b"llama-server");
        let argv = b"llama-server\0-m\0/m/q.gguf\0";
        ev.argv[..argv.len()].copy_from_slice(argv);
        ev.argv_len = argv.len() as u32;
        let KernelEvent::Exec(rec) = decode(as_bytes(&ev)) else {
            panic!("not an exec")
        };
        assert_eq!(rec.comm, "llama-server");
        assert_eq!(rec.argv, ["llama-server", "-m", "/m/q.gguf"]);
        assert!(rec.argv_truncated);
        assert_eq!(
            rec.filename.len(),
            FILENAME_LEN,
            "an unterminated filename stops at the buffer end"
        );
        ev.argv_len = u32::MAX;
        assert!(
            matches!(decode(as_bytes(&ev)), KernelEvent::Exec(_)),
            "a bogus length is clamped"
        );
    }

    #[test]
    fn short_or_unknown_records_are_malformed() {
        assert_eq!(decode(&[]), KernelEvent::Malformed);
        assert_eq!(decode(&EVENT_EXEC.to_ne_bytes()), KernelEvent::Malformed);
        assert_eq!(decode(&[9, 0, 0, 0, 0, 0, 0, 0]), KernelEvent::Malformed);
        let exit = ExitEvent {
            kind: EVENT_EXIT,
            tgid: 5,
            cuda_generation: 9,
            reserved: 0,
            ktime_ns: 1,
        };
        assert_eq!(
            decode(as_bytes(&exit)),
            KernelEvent::Exit {
                pid: 5,
                cuda_generation: 9,
                ktime_ns: 1
            }
        );
        assert_eq!(
            decode(&as_bytes(&exit)[..16]),
            KernelEvent::Malformed,
            "a short exit record"
        );
    }

    #[test]
    fn decodes_a_library_map_with_unterminated_names() {
        let mut ev = LibraryMapEvent {
            kind: EVENT_LIBRARY_MAP,
            tgid: 7,
            class: agent_common::LIB_FRAMEWORK,
            reserved: 0,
            dev: (8 << 20) | 1,
            ino: 42,
            name: [b'a'; agent_common::LIB_NAME_LEN],
            parent: [0; agent_common::LIB_NAME_LEN],
        };
        ev.parent[..4].copy_from_slice(b"vllm");
        let KernelEvent::LibraryMap(map) = decode(as_bytes(&ev)) else {
            panic!("not a library map")
        };
        assert_eq!(map.name.len(), agent_common::LIB_NAME_LEN);
        assert_eq!(map.dev, libc::makedev(8, 1));
        assert!(map.short_path().starts_with("/vllm/aaa"));
    }
}
