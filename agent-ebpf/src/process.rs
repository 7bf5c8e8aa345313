//! Process lifecycle: one ring buffer record per exec and per thread-group exit.
//!
//! Exec and fork records wake the reader the kernel's adaptive way (flag 0: only when the
//! reader has read everything before them, so a burst costs one wake-up, and the reader's
//! minimum drain spacing bounds them to a thousand a second). Exit records never wake it:
//! nothing is waiting for them, and they are read with the next exec or within 100 ms.

use crate::cuda::retire;
use crate::maps::{count_lost, EVENTS, TRACKED};
use agent_common::{
    ExecEvent, ExitEvent, ForkEvent, Lost, ARGV_LEN, CLONE_THREAD, CLONE_VFORK, EVENT_CUDA_RETIRED,
    EVENT_EXEC, EVENT_EXIT, EVENT_FORK, FILENAME_LEN,
};
use aya_ebpf::{
    bindings::BPF_RB_NO_WAKEUP,
    cty::c_void,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task,
        bpf_get_current_uid_gid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        bpf_probe_read_kernel_str_bytes, generated::bpf_probe_read_user as raw_probe_read_user,
    },
    macros::tracepoint,
    programs::TracePointContext,
    EbpfContext as _,
};

/// Offsets into `struct task_struct`, found by userspace in the running kernel's BTF and
/// written here before load (aya has no CO-RE relocations for Rust programs). Zero means
/// unknown: the event then carries ppid 0 and userspace reads it from /proc.
#[unsafe(no_mangle)]
static TASK_REAL_PARENT_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static TASK_TGID_OFFSET: u32 = 0;
/// `task_struct.mm`, `mm_struct.arg_start` and `arg_end`: where the new image's argv lies.
/// Zero: unknown, and userspace reads argv from /proc.
#[unsafe(no_mangle)]
static TASK_MM_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static MM_ARG_START_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static MM_ARG_END_OFFSET: u32 = 0;

/// `task_newtask` record: `pid_t pid` at 8, `u64 clone_flags` at 32 (userspace checks it).
const NEWTASK_PID_OFFSET: usize = 8;
const NEWTASK_CLONE_FLAGS_OFFSET: usize = 32;

/// `sched_process_exec` record: `__data_loc char[] filename` at offset 8 (see
/// /sys/kernel/tracing/events/sched/sched_process_exec/format; userspace checks it).
const EXEC_FILENAME_LOC_OFFSET: usize = 8;

#[tracepoint]
pub fn sched_process_exec(ctx: TracePointContext) -> u32 {
    match try_exec(&ctx) {
        Ok(()) | Err(()) => 0,
    }
}

/// `sched_process_exit` record: `bool group_dead` at offset 32 (Linux ≥ 6.16): true for the
/// last thread of the process to exit. Userspace sets EXIT_GROUP_DEAD_FIELD when the running
/// kernel's record has it (it checks the layout).
const EXIT_GROUP_DEAD_OFFSET: usize = 32;
#[unsafe(no_mangle)]
static EXIT_GROUP_DEAD_FIELD: u32 = 0;
/// Older kernels: `task_struct.signal` and `signal_struct.live`, the count of live threads,
/// already decremented for the exiting thread when the tracepoint fires (`do_exit`).
#[unsafe(no_mangle)]
static TASK_SIGNAL_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static SIGNAL_LIVE_OFFSET: u32 = 0;

/// Whether the exiting thread is the last of its process: the record's `group_dead`, else the
/// live-thread count, else (neither known) whether it is the leader.
fn last_thread(ctx: &TracePointContext, pid_tgid: u64) -> bool {
    if unsafe { core::ptr::read_volatile(&EXIT_GROUP_DEAD_FIELD) } != 0 {
        return unsafe { ctx.read_at::<u8>(EXIT_GROUP_DEAD_OFFSET) }.is_ok_and(|d| d != 0);
    }
    let signal_off = unsafe { core::ptr::read_volatile(&TASK_SIGNAL_OFFSET) } as usize;
    let live_off = unsafe { core::ptr::read_volatile(&SIGNAL_LIVE_OFFSET) } as usize;
    if signal_off != 0 {
        let task = unsafe { bpf_get_current_task() } as *const u8;
        // SAFETY: bpf_probe_read_kernel checks every address.
        let live = unsafe {
            bpf_probe_read_kernel(task.add(signal_off) as *const *const u8)
                .and_then(|signal| bpf_probe_read_kernel(signal.add(live_off) as *const i32))
        };
        if let Ok(live) = live {
            return live == 0;
        }
    }
    pid_tgid as u32 == (pid_tgid >> 32) as u32
}

#[tracepoint]
pub fn sched_process_exit(ctx: TracePointContext) -> u32 {
    // The process ends with its last thread, which need not be the leader: a leader that
    // exits while other threads run leaves the process alive.
    let pid_tgid = bpf_get_current_pid_tgid();
    if !last_thread(&ctx, pid_tgid) {
        return 0;
    }
    let tgid = (pid_tgid >> 32) as u32;
    send_end(EVENT_EXIT, tgid, retire(tgid), Lost::Exit);
    0
}

fn send_end(kind: u32, tgid: u32, cuda_generation: u32, lost: Lost) {
    match EVENTS.reserve::<ExitEvent>(0) {
        Some(mut entry) => {
            entry.write(ExitEvent {
                kind,
                tgid,
                cuda_generation,
                reserved: 0,
                ktime_ns: unsafe { bpf_ktime_get_ns() },
            });
            entry.submit(BPF_RB_NO_WAKEUP as u64);
        }
        None => count_lost(lost),
    }
}

/// Runs in the parent, for every new task: threads and vfork children (which exec or exit at
/// once) are skipped, and so is every parent userspace does not track — a build storm's
/// forks cost one hash lookup each and send nothing.
#[tracepoint]
pub fn task_newtask(ctx: TracePointContext) -> u32 {
    let Ok(flags) = (unsafe { ctx.read_at::<u64>(NEWTASK_CLONE_FLAGS_OFFSET) }) else {
        return 0;
    };
    if flags & (CLONE_THREAD | CLONE_VFORK) != 0 {
        return 0;
    }
    let parent = (bpf_get_current_pid_tgid() >> 32) as u32;
    if unsafe { TRACKED.get(&parent) }.is_none() {
        return 0;
    }
    let Ok(child) = (unsafe { ctx.read_at::<u32>(NEWTASK_PID_OFFSET) }) else {
        return 0;
    };
    match EVENTS.reserve::<ForkEvent>(0) {
        Some(mut entry) => {
            entry.write(ForkEvent {
                kind: EVENT_FORK,
                tgid: child,
                ppid: parent,
                reserved: 0,
                ktime_ns: unsafe { bpf_ktime_get_ns() },
            });
            entry.submit(0);
        }
        None => count_lost(Lost::Fork),
    }
    0
}

fn try_exec(ctx: &TracePointContext) -> Result<(), ()> {
    let pid_tgid = bpf_get_current_pid_tgid();
    // A new image starts its own CUDA counters (almost every exec never called CUDA: one
    // failed lookup).
    let generation = retire((pid_tgid >> 32) as u32);
    if generation != 0 {
        send_end(
            EVENT_CUDA_RETIRED,
            (pid_tgid >> 32) as u32,
            generation,
            Lost::CudaEvent,
        );
    }
    let Some(mut entry) = EVENTS.reserve::<ExecEvent>(0) else {
        count_lost(Lost::Exec);
        return Ok(());
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` points at a reserved, exclusively owned ring buffer record of the right size.
    unsafe {
        (*ev).kind = EVENT_EXEC;
        (*ev).tgid = (pid_tgid >> 32) as u32;
        (*ev).uid = bpf_get_current_uid_gid() as u32;
        (*ev).ktime_ns = bpf_ktime_get_ns();
        (*ev).ppid = parent_tgid();
        (*ev).comm = bpf_get_current_comm().unwrap_or([0; 16]);
        (*ev).filename[0] = 0;
        if let Ok(loc) = ctx.read_at::<u32>(EXEC_FILENAME_LOC_OFFSET) {
            let src = (ctx.as_ptr() as *const u8).add((loc & 0xffff) as usize);
            let dst = &mut *(&raw mut (*ev).filename as *mut [u8; FILENAME_LEN]);
            let _ = bpf_probe_read_kernel_str_bytes(src, dst);
        }
        let (len, total) = copy_argv(&raw mut (*ev).argv as *mut u8);
        (*ev).argv_len = len;
        (*ev).argv_total = total;
    }
    entry.submit(0);
    Ok(())
}

/// `current->real_parent->tgid`, or 0 when userspace did not provide the offsets.
fn parent_tgid() -> u32 {
    let parent_off = unsafe { core::ptr::read_volatile(&TASK_REAL_PARENT_OFFSET) } as usize;
    let tgid_off = unsafe { core::ptr::read_volatile(&TASK_TGID_OFFSET) } as usize;
    if parent_off == 0 || tgid_off == 0 {
        return 0;
    }
    let task = unsafe { bpf_get_current_task() } as *const u8;
    // SAFETY: bpf_probe_read_kernel checks every address; a bad one yields an error.
    unsafe {
        let Ok(parent) = bpf_probe_read_kernel(task.add(parent_off) as *const *const u8) else {
            return 0;
        };
        bpf_probe_read_kernel(parent.add(tgid_off) as *const u32).unwrap_or(0)
    }
}

/// Copies the start of the new image's argv into `dst` (ARGV_LEN bytes) and returns
/// (bytes copied, length of the whole argv area). The area is `mm->arg_start..arg_end`,
/// exact whatever follows it (an empty environment included). Offsets unknown: (0, 1), a
/// cut copy, and userspace reads /proc/<pid>/cmdline.
unsafe fn copy_argv(dst: *mut u8) -> (u32, u32) {
    let mm_off = unsafe { core::ptr::read_volatile(&TASK_MM_OFFSET) } as usize;
    let start_off = unsafe { core::ptr::read_volatile(&MM_ARG_START_OFFSET) } as usize;
    let end_off = unsafe { core::ptr::read_volatile(&MM_ARG_END_OFFSET) } as usize;
    if mm_off == 0 || start_off == 0 || end_off == 0 {
        return (0, 1);
    }
    let task = unsafe { bpf_get_current_task() } as *const u8;
    // SAFETY: bpf_probe_read_kernel checks every address.
    let (Ok(arg_start), Ok(arg_end)) = (unsafe {
        let Ok(mm) = bpf_probe_read_kernel(task.add(mm_off) as *const *const u8) else {
            return (0, 1);
        };
        (
            bpf_probe_read_kernel(mm.add(start_off) as *const u64),
            bpf_probe_read_kernel(mm.add(end_off) as *const u64),
        )
    }) else {
        return (0, 1);
    };
    let total = arg_end.saturating_sub(arg_start);
    let mut len = total;
    if len > ARGV_LEN as u64 {
        len = ARGV_LEN as u64;
    }
    let total = total.min(u32::MAX as u64) as u32;
    // SAFETY: `dst` holds ARGV_LEN bytes and `len` ≤ ARGV_LEN; the source is checked by the helper.
    let rc =
        unsafe { raw_probe_read_user(dst as *mut c_void, len as u32, arg_start as *const c_void) };
    if rc != 0 {
        return (0, total.max(1));
    }
    (len as u32, total)
}
