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
pub const EVENT_LIBRARY_OPEN: u32 = 6;

/// Indexes of the per-CPU `LOST` counter array: ring buffer reservations that failed.
pub const LOST_EXEC: u32 = 0;
pub const LOST_EXIT: u32 = 1;
pub const LOST_FORK: u32 = 2;
/// Ring buffer full for a CUDA first-use, OOM or library-open record.
pub const LOST_CUDA_EVENT: u32 = 3;
/// The CUDA counter map was full: a (process, function) pair went uncounted.
pub const LOST_CUDA_STATS: u32 = 4;
/// The live-allocation map was full: an allocation is not tracked for live memory.
pub const LOST_CUDA_ALLOC: u32 = 5;
pub const LOST_SLOTS: u32 = 6;

/// `clone_flags` bits the fork program filters on (include/uapi/linux/sched.h).
pub const CLONE_VFORK: u64 = 0x0000_4000;
pub const CLONE_THREAD: u64 = 0x0001_0000;

/// Byte offset of `sp` in x86-64 `struct pt_regs` (fixed by the ABI of `ptrace`): the 20th
/// 8-byte slot after r15 … orig_ax, ip, cs, flags.
pub const PT_REGS_SP_OFFSET: usize = 19 * 8;

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

/// An event about a process and nothing more: a thread-group leader exited
/// (`EVENT_EXIT`), or a process called CUDA for the first time (`EVENT_CUDA_FIRST_USE`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PidEvent {
    pub kind: u32,
    pub tgid: u32,
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

/// A tracked process opened a file whose name contains `libcud` (a CUDA library candidate).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct LibraryOpenEvent {
    pub kind: u32,
    pub tgid: u32,
    /// NUL-terminated path as the process gave it to openat (in its own mount namespace).
    pub path: [u8; FILENAME_LEN],
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: both types are repr(C), Copy, contain only integers and byte arrays, and have
    // no padding (checked by the `layout` test), so every bit pattern is a valid value.
    unsafe impl aya::Pod for super::ExecEvent {}
    unsafe impl aya::Pod for super::PidEvent {}
    unsafe impl aya::Pod for super::ForkEvent {}
    unsafe impl aya::Pod for super::CudaOomEvent {}
    unsafe impl aya::Pod for super::LibraryOpenEvent {}
    unsafe impl aya::Pod for super::cuda::CudaKey {}
    unsafe impl aya::Pod for super::cuda::CudaStat {}
    unsafe impl aya::Pod for super::cuda::AllocKey {}
}

pub mod cuda;

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
        assert_eq!(size_of::<LibraryOpenEvent>(), 8 + FILENAME_LEN);
        assert_eq!(size_of::<cuda::CudaKey>(), 8);
        assert_eq!(size_of::<cuda::CudaStat>(), 24);
        assert_eq!(size_of::<cuda::AllocKey>(), 16);
        assert_eq!(offset_of!(cuda::AllocKey, ptr), 8);
        assert_eq!(size_of::<cuda::Pending>(), 24);
        assert_eq!(size_of::<cuda::PendingKey>(), 16);
    }

    #[test]
    fn argv_len_is_a_power_of_two() {
        assert!(ARGV_LEN.is_power_of_two());
    }
}
