//! Decoding ring buffer records into events. A record that is too short or of an unknown
//! kind is counted and skipped, never trusted.

use agent_common::{
    CudaOomEvent, ExecEvent, ForkEvent, LibraryOpenEvent, PidEvent, EVENT_CUDA_FIRST_USE,
    EVENT_CUDA_OOM, EVENT_EXEC, EVENT_EXIT, EVENT_FORK, EVENT_LIBRARY_OPEN,
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
    Exit {
        pid: u32,
        ktime_ns: u64,
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
    /// A tracked process opened a file whose name contains `libcud`.
    LibraryOpen {
        pid: u32,
        path: String,
    },
    Malformed,
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
        EVENT_EXIT if bytes.len() >= size_of::<PidEvent>() => {
            // SAFETY: as above.
            let ev: PidEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
            KernelEvent::Exit {
                pid: ev.tgid,
                ktime_ns: ev.ktime_ns,
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
        EVENT_LIBRARY_OPEN if bytes.len() >= size_of::<LibraryOpenEvent>() => {
            // SAFETY: as above.
            let ev: LibraryOpenEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
            KernelEvent::LibraryOpen {
                pid: ev.tgid,
                path: c_string(&ev.path),
            }
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
        let exit = PidEvent {
            kind: EVENT_EXIT,
            tgid: 5,
            ktime_ns: 1,
        };
        assert_eq!(
            decode(as_bytes(&exit)),
            KernelEvent::Exit {
                pid: 5,
                ktime_ns: 1
            }
        );
    }
}
