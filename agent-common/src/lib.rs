//! Types that cross the kernel/user boundary.
//!
//! Every type here is `#[repr(C)]`, `Copy` and free of implicit padding: the eBPF programs
//! write them byte for byte into a ring buffer and userspace reads the same bytes back, so a
//! hidden padding hole would be uninitialised kernel memory and a layout change on one side
//! only would be silent corruption. Flags are `u32`, never `bool`. The `layout` test pins
//! every size and offset.
#![no_std]

/// `TASK_COMM_LEN` in the kernel.
pub const COMM_LEN: usize = 16;
/// Bytes of the executed file name kept (longer names are cut, never overrun).
pub const FILENAME_LEN: usize = 256;
/// Bytes of argv copied from the new process image at exec. A power of two so the eBPF side
/// can bound the copy length in a way the verifier accepts. Userspace reads the rest from
/// `/proc/<pid>/cmdline` when `argv_total` says the copy was cut.
pub const ARGV_LEN: usize = 1024;

/// `ExecEvent::kind` and `PidEvent::kind`: the first `u32` of every ring buffer record.
pub const EVENT_EXEC: u32 = 1;
pub const EVENT_EXIT: u32 = 2;
pub const EVENT_FORK: u32 = 3;
pub const EVENT_CUDA_FIRST_USE: u32 = 4;
pub const EVENT_CUDA_OOM: u32 = 5;
pub const EVENT_LIBRARY_MAP: u32 = 6;
/// A process exec'd a new image after calling CUDA: its counters of the old image are retired.
pub const EVENT_CUDA_RETIRED: u32 = 7;

/// Bytes kept of a mapped file's name and of its directory's name (longer names are cut).
pub const LIB_NAME_LEN: usize = 64;
/// Bytes of a file name the kernel matches against the library prefix table (an LPM trie
/// keyed by the start of the name). Prefixes longer than this cannot be stored.
pub const LIB_PREFIX_LEN: usize = 32;
/// Values of the library prefix table: what the matched file is.
pub const LIB_CUDA_RUNTIME: u32 = 1;
pub const LIB_CUDA_DRIVER: u32 = 2;
/// A library that says which framework an interpreter runs (libtorch_cpu, libllama, …).
pub const LIB_FRAMEWORK: u32 = 3;
/// `PROT_EXEC`: only executable mappings of a file are libraries being loaded.
pub const PROT_EXEC: u64 = 0x4;

/// An enum whose variants are label values: `#[repr(u32)]` (the kernel indexes arrays with
/// it), `ALL` in declaration order and `as_str()`, generated from one list so the two can
/// never disagree.
#[macro_export]
macro_rules! label_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $($(#[$vmeta:meta])* $variant:ident = $text:literal,)+
        }
    ) => {
        $(#[$meta])*
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        $vis enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            /// Every variant, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// The label value.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }
    };
}

label_enum! {
    /// The slots of the per-CPU `LOST` counter array: what a failed ring buffer reservation or
    /// a full map lost. Userspace exports them as `llmscope_events_lost_total{kind}`.
    pub enum Lost {
        Exec = "exec",
        Exit = "exit",
        Fork = "fork",
        /// Ring buffer full for a CUDA first-use, OOM or retirement record.
        CudaEvent = "cuda_event",
        /// The CUDA counter map was full: a (process, function) pair went uncounted.
        CudaCounter = "cuda_counter",
        /// The live-allocation map was full: an allocation is not tracked for live memory.
        CudaAllocation = "cuda_allocation",
        /// Ring buffer full for a library-map record.
        LibraryMap = "library_map",
        /// The request-telemetry ring was full: bytes of a server's connection not seen.
        Http = "http",
        /// The connection map was full: a server's accepted connection is not followed.
        HttpConnection = "http_connection",
    }
}

/// Entries of the `LOST` array.
pub const LOST_SLOTS: u32 = Lost::ALL.len() as u32;

/// `clone_flags` bits the fork program filters on (include/uapi/linux/sched.h).
pub const CLONE_VFORK: u64 = 0x0000_4000;
pub const CLONE_THREAD: u64 = 0x0001_0000;

/// A process image was replaced (`sched/sched_process_exec`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ExecEvent {
    pub kind: u32,
    /// Thread-group id (the userspace "pid").
    pub tgid: u32,
    /// Thread-group id of the real parent; 0 when the kernel offsets were unknown.
    pub ppid: u32,
    pub uid: u32,
    /// Bytes of `argv` that hold data (NUL-separated arguments).
    pub argv_len: u32,
    /// Length of the whole argv area in the process; larger than `argv_len` when cut.
    pub argv_total: u32,
    /// `bpf_ktime_get_ns()` at exec: CLOCK_MONOTONIC, for exec → export latency.
    pub ktime_ns: u64,
    pub comm: [u8; COMM_LEN],
    /// NUL-terminated path given to execve.
    pub filename: [u8; FILENAME_LEN],
    pub argv: [u8; ARGV_LEN],
}

/// A process called CUDA for the first time (`EVENT_CUDA_FIRST_USE`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PidEvent {
    pub kind: u32,
    pub tgid: u32,
    pub ktime_ns: u64,
}

/// A process ended: its last thread exited (`EVENT_EXIT`), or its image was replaced after
/// it called CUDA (`EVENT_CUDA_RETIRED`). The kernel has already removed its live CUDA memory
/// and first-use entry; `cuda_generation` names its counters in the CUDA maps so userspace
/// can retire exactly those (0: it never called CUDA).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ExitEvent {
    pub kind: u32,
    pub tgid: u32,
    pub cuda_generation: u32,
    /// Explicit padding so `ktime_ns` is aligned without a hidden hole.
    pub reserved: u32,
    pub ktime_ns: u64,
}

/// A tracked process created a child process without exec (`task/task_newtask`, neither a
/// thread nor a vfork). Sent only for parents in the `TRACKED` map, which userspace keeps.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ForkEvent {
    pub kind: u32,
    /// The child's tgid (a new process: its pid).
    pub tgid: u32,
    pub ppid: u32,
    /// Explicit padding so `ktime_ns` is aligned without a hidden hole.
    pub reserved: u32,
    pub ktime_ns: u64,
}

/// A CUDA allocation failed with out-of-memory (runtime error 2, driver error 2).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct CudaOomEvent {
    pub kind: u32,
    pub tgid: u32,
    /// `CudaFn` id of the allocation function.
    pub function: u32,
    pub code: u32,
    /// The size that could not be allocated.
    pub size: u64,
    pub ktime_ns: u64,
}

/// A process mapped an executable file whose name starts with a prefix of the library table
/// (`security_mmap_file`, any process). Sent before the mapping exists; by the time userspace
/// reads it, `/proc/<pid>/maps` shows the file (unless the process is gone).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct LibraryMapEvent {
    pub kind: u32,
    pub tgid: u32,
    /// The table's value for the matched prefix (`LIB_*`).
    pub class: u32,
    pub reserved: u32,
    /// The file's device as the kernel encodes it (`MAJOR << 20 | MINOR`) and inode number.
    pub dev: u64,
    pub ino: u64,
    /// NUL-terminated file name and the name of the directory holding it.
    pub name: [u8; LIB_NAME_LEN],
    pub parent: [u8; LIB_NAME_LEN],
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: both types are repr(C), Copy, contain only integers and byte arrays, and have
    // no padding (checked by the `layout` test), so every bit pattern is a valid value.
    unsafe impl aya::Pod for super::ExecEvent {}
    unsafe impl aya::Pod for super::PidEvent {}
    unsafe impl aya::Pod for super::ForkEvent {}
    unsafe impl aya::Pod for super::CudaOomEvent {}
    unsafe impl aya::Pod for super::LibraryMapEvent {}
    unsafe impl aya::Pod for super::ExitEvent {}
    unsafe impl aya::Pod for super::cuda::CudaKey {}
    unsafe impl aya::Pod for super::cuda::CudaStat {}
    unsafe impl aya::Pod for super::cuda::AllocKey {}
    unsafe impl aya::Pod for super::http::ConnKey {}
    unsafe impl aya::Pod for super::http::HttpRecord {}
    unsafe impl aya::Pod for super::http::PortKey {}
}

pub mod cuda;
pub mod http;

#[cfg(test)]
mod labels {
    use super::*;

    #[test]
    fn a_lost_kind_is_its_slot_and_its_place_in_all() {
        for (i, kind) in Lost::ALL.iter().enumerate() {
            assert_eq!(*kind as usize, i);
        }
        assert_eq!(LOST_SLOTS, 9);
        assert_eq!(Lost::LibraryMap.as_str(), "library_map");
    }
}

#[cfg(test)]
mod layout {
    extern crate std;
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn exec_event_has_no_padding() {
        assert_eq!(offset_of!(ExecEvent, ktime_ns), 24);
        assert_eq!(offset_of!(ExecEvent, comm), 32);
        assert_eq!(offset_of!(ExecEvent, filename), 48);
        assert_eq!(offset_of!(ExecEvent, argv), 48 + FILENAME_LEN);
        assert_eq!(size_of::<ExecEvent>(), 48 + FILENAME_LEN + ARGV_LEN);
        assert_eq!(size_of::<ExecEvent>() % 8, 0);
    }

    #[test]
    fn exit_event_has_no_padding() {
        assert_eq!(offset_of!(PidEvent, ktime_ns), 8);
        assert_eq!(size_of::<PidEvent>(), 16);
    }

    #[test]
    fn fork_event_has_no_padding() {
        assert_eq!(offset_of!(ForkEvent, reserved), 12);
        assert_eq!(offset_of!(ForkEvent, ktime_ns), 16);
        assert_eq!(size_of::<ForkEvent>(), 24);
    }

    #[test]
    fn cuda_records_have_no_padding() {
        assert_eq!(size_of::<CudaOomEvent>(), 32);
        assert_eq!(offset_of!(CudaOomEvent, size), 16);
        assert_eq!(offset_of!(LibraryMapEvent, dev), 16);
        assert_eq!(offset_of!(LibraryMapEvent, name), 32);
        assert_eq!(size_of::<LibraryMapEvent>(), 32 + 2 * LIB_NAME_LEN);
        assert_eq!(offset_of!(ExitEvent, ktime_ns), 16);
        assert_eq!(size_of::<ExitEvent>(), 24);
        assert_eq!(size_of::<cuda::CudaKey>(), 12);
        assert_eq!(size_of::<cuda::CudaStat>(), 24);
        assert_eq!(size_of::<cuda::AllocKey>(), 16);
        assert_eq!(offset_of!(cuda::AllocKey, ptr), 8);
        assert_eq!(size_of::<cuda::Pending>(), 24);
        assert_eq!(size_of::<cuda::PendingKey>(), 16);
    }

    #[test]
    fn http_records_have_no_padding() {
        assert_eq!(offset_of!(http::HttpRecord, conn), 8);
        assert_eq!(offset_of!(http::HttpRecord, len), 16);
        assert_eq!(offset_of!(http::HttpRecord, ktime_ns), 24);
        assert_eq!(offset_of!(http::HttpRecord, copied), 32);
        assert_eq!(size_of::<http::HttpRecord>(), 40);
        assert_eq!(size_of::<http::ConnKey>(), 8);
        assert_eq!(size_of::<http::PortKey>(), 8);
        assert_eq!(size_of::<http::IoCall>(), 32);
        assert!(http::HTTP_CHUNK.is_power_of_two());
    }

    #[test]
    fn argv_len_is_a_power_of_two() {
        assert!(ARGV_LEN.is_power_of_two());
    }
}
