//! CUDA attribution: `cuda_entry` and `cuda_return`, attached by userspace to every function
//! of `agent_common::cuda::FUNCTIONS` in every libcudart / libcuda file processes map, with a
//! cookie that says what the function is. Counts are aggregated here, in bounded maps; only
//! rare events (first CUDA use of a process, OOM) cross to userspace one by one.

use agent_common::{
    cuda::{
        AllocKey, Cookie, CudaKey, CudaStat, Pending, PendingKey, API_DRIVER, CUDA_OOM,
        DIR_DEFAULT, DIR_FROM_ARG, KIND_ALLOC, KIND_FREE, KIND_MEMCPY, KIND_SYNC, RUNTIME_ALLOCS,
    },
    CudaOomEvent, Lost, PidEvent, EVENT_CUDA_FIRST_USE, EVENT_CUDA_OOM,
};
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_probe_read_user,
        generated::bpf_get_attach_cookie,
    },
    macros::{map, uprobe, uretprobe},
    maps::{HashMap, LruHashMap},
    programs::{ProbeContext, RetProbeContext},
    EbpfContext as _,
};

use crate::maps::{count_lost, EVENTS};

/// Calls, bytes and nanoseconds per (process, function, direction, error code).
#[map]
static CUDA_STATS: HashMap<CudaKey, CudaStat> = HashMap::with_max_entries(32768, 0);

/// Live device allocations: (process, pointer) → size.
#[map]
static CUDA_ALLOCS: HashMap<AllocKey, u64> = HashMap::with_max_entries(65536, 0);

/// Live device bytes per process, kept from CUDA_ALLOCS inserts and removals.
#[map]
static CUDA_LIVE: HashMap<u32, u64> = HashMap::with_max_entries(8192, 0);

/// Calls in flight (entry seen, return not yet). LRU: a thread killed mid-call leaves an
/// entry that ages out.
#[map]
static CUDA_PENDING: LruHashMap<PendingKey, Pending> = LruHashMap::with_max_entries(16384, 0);

/// Processes that called CUDA → the generation of their counters. Not an LRU: evicting a live
/// process would split its counters. The exit and exec programs remove entries ([`retire`]),
/// so only live CUDA users are here; userspace sizes it to `--max-processes`.
#[map]
pub(crate) static CUDA_SEEN: HashMap<u32, u32> = HashMap::with_max_entries(16384, 0);

#[uprobe]
pub fn cuda_entry(ctx: ProbeContext) -> u32 {
    on_entry(&ctx);
    0
}

#[uretprobe]
pub fn cuda_return(ctx: RetProbeContext) -> u32 {
    on_return(&ctx);
    0
}

/// The six integer argument registers, each loaded at a constant context offset: the
/// verifier refuses a context load at an offset computed from the cookie.
fn args(ctx: &ProbeContext) -> [u64; 6] {
    // SAFETY: `regs` is the program's context (pt_regs), valid for the whole run.
    let r = unsafe { &*ctx.regs };
    [r.rdi, r.rsi, r.rdx, r.rcx, r.r8, r.r9]
}

fn arg(args: &[u64; 6], n: u8) -> u64 {
    match n {
        0 => args[0],
        1 => args[1],
        2 => args[2],
        3 => args[3],
        4 => args[4],
        5 => args[5],
        _ => 0,
    }
}

fn on_entry(ctx: &ProbeContext) {
    // SAFETY: the context is the program's own.
    let c = Cookie::decode(unsafe { bpf_get_attach_cookie(ctx.as_ptr()) });
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let Some(generation) = generation(tgid) else {
        return;
    };
    let mut key = CudaKey {
        tgid,
        generation,
        function: c.function,
        direction: 0,
        code: 0,
    };
    let mut bytes = 0;
    let a = args(ctx);
    match c.kind {
        KIND_MEMCPY => {
            bytes = arg(&a, c.size_arg);
            key.direction = if c.direction == DIR_FROM_ARG {
                match arg(&a, c.dir_arg) {
                    kind @ 0..=4 => kind as u8 + 1,
                    _ => DIR_DEFAULT,
                }
            } else {
                c.direction
            };
            remember(pid_tgid, c.function, 0, 0);
        }
        KIND_ALLOC => remember(
            pid_tgid,
            c.function,
            arg(&a, c.ptr_arg),
            arg(&a, c.size_arg),
        ),
        KIND_SYNC => remember(pid_tgid, c.function, 0, 0),
        KIND_FREE => forget_allocation(tgid, generation, arg(&a, c.ptr_arg)),
        _ => {}
    }
    add(&key, 1, bytes, 0);
}

fn on_return(ctx: &RetProbeContext) {
    // SAFETY: the context is the program's own.
    let c = Cookie::decode(unsafe { bpf_get_attach_cookie(ctx.as_ptr()) });
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let Some(generation) = generation(tgid) else {
        return;
    };
    let pkey = PendingKey {
        pid_tgid,
        function: c.function as u32,
        reserved: 0,
    };
    // SAFETY: the value is copied out before the entry is removed.
    let pending = unsafe { CUDA_PENDING.get(&pkey) }.copied();
    let _ = CUDA_PENDING.remove(&pkey);
    // cudaError_t / CUresult are 32-bit: the upper half of rax is not part of the value.
    let code = ctx.ret::<u64>() as u32;
    if code != 0 {
        add(
            &CudaKey {
                tgid,
                generation,
                function: c.function,
                direction: 0,
                code: code as u16,
            },
            1,
            0,
            0,
        );
        if c.kind == KIND_ALLOC && code as i32 == CUDA_OOM {
            report_oom(tgid, c.function, code, pending.map_or(0, |p| p.size));
        }
    }
    let Some(p) = pending else { return };
    let key = CudaKey {
        tgid,
        generation,
        function: c.function,
        direction: 0,
        code: 0,
    };
    match c.kind {
        KIND_SYNC => add(
            &key,
            0,
            0,
            unsafe { bpf_ktime_get_ns() }.saturating_sub(p.start_ns),
        ),
        KIND_ALLOC if code == 0 => {
            // SAFETY: reading the caller's out-pointer, checked by the helper.
            if let Ok(ptr) = unsafe { bpf_probe_read_user(p.out_ptr as *const u64) } {
                if !inside_runtime_allocation(pid_tgid, c.api) {
                    record_allocation(tgid, generation, ptr, p.size);
                }
            }
            add(&key, 0, p.size, 0);
        }
        _ => {}
    }
}

fn remember(pid_tgid: u64, function: u8, out_ptr: u64, size: u64) {
    let key = PendingKey {
        pid_tgid,
        function: function as u32,
        reserved: 0,
    };
    let start_ns = unsafe { bpf_ktime_get_ns() };
    let _ = CUDA_PENDING.insert(
        &key,
        &Pending {
            out_ptr,
            size,
            start_ns,
        },
        0,
    );
}

/// A driver allocation made by a runtime allocation on the same thread (libcudart reaches
/// libcuda through `cuGetProcAddress` pointers): the runtime's return records the memory, so
/// the driver's must not, or live memory would count it twice. Runs on driver allocation
/// returns only (a few lookups, off the launch path).
fn inside_runtime_allocation(pid_tgid: u64, api: u8) -> bool {
    if api != API_DRIVER {
        return false;
    }
    RUNTIME_ALLOCS.iter().any(|&id| {
        let key = PendingKey {
            pid_tgid,
            function: id as u32,
            reserved: 0,
        };
        // SAFETY: presence check only.
        unsafe { CUDA_PENDING.get(&key) }.is_some()
    })
}

/// The generation of `tgid`'s counters, drawn at its first call (which is reported to
/// userspace); None when the table is full (counted, the call goes uncounted).
fn generation(tgid: u32) -> Option<u32> {
    // SAFETY: the value is copied out.
    if let Some(g) = unsafe { CUDA_SEEN.get(&tgid) } {
        return Some(*g);
    }
    // Never 0: userspace reads 0 as "no CUDA counters".
    let fresh = unsafe { bpf_get_prandom_u32() } | 1;
    if CUDA_SEEN.insert(&tgid, &fresh, BPF_NOEXIST as u64).is_ok() {
        report_first_use(tgid);
        return Some(fresh);
    }
    // Another thread of the process inserted it first, or the map is full.
    match unsafe { CUDA_SEEN.get(&tgid) } {
        Some(g) => Some(*g),
        None => {
            count_lost(Lost::CudaCounter);
            None
        }
    }
}

/// The process image is gone (exit of its last thread, or exec): forgets its generation and
/// live memory in the kernel and returns the generation (0 when it never called CUDA), so
/// userspace can retire its counters and allocations — a reused pid inherits nothing.
pub(crate) fn retire(tgid: u32) -> u32 {
    // SAFETY: the value is copied out before the entry is removed.
    let Some(generation) = (unsafe { CUDA_SEEN.get(&tgid) }).copied() else {
        return 0;
    };
    let _ = CUDA_SEEN.remove(&tgid);
    let _ = CUDA_LIVE.remove(&tgid);
    generation
}

/// Adds to a counter, creating it when absent. Atomic adds: the same process's threads run
/// on several CPUs at once.
fn add(key: &CudaKey, calls: u64, bytes: u64, nanos: u64) {
    let ptr = match CUDA_STATS.get_ptr_mut(key) {
        Some(p) => p,
        None => {
            let zero = CudaStat::default();
            // Another CPU may insert the same key first: then the lookup below finds it.
            let _ = CUDA_STATS.insert(key, &zero, BPF_NOEXIST as u64);
            match CUDA_STATS.get_ptr_mut(key) {
                Some(p) => p,
                None => {
                    count_lost(Lost::CudaCounter);
                    return;
                }
            }
        }
    };
    // SAFETY: `ptr` points into a live map value; the fields are u64 and 8-byte aligned.
    unsafe {
        if calls != 0 {
            atomic_add(&raw mut (*ptr).calls, calls);
        }
        if bytes != 0 {
            atomic_add(&raw mut (*ptr).bytes, bytes);
        }
        if nanos != 0 {
            atomic_add(&raw mut (*ptr).nanos, nanos);
        }
    }
}

fn record_allocation(tgid: u32, generation: u32, ptr: u64, size: u64) {
    let key = AllocKey {
        tgid,
        generation,
        ptr,
    };
    if CUDA_ALLOCS.insert(&key, &size, 0).is_err() {
        count_lost(Lost::CudaAllocation);
        return;
    }
    live_add(tgid, size);
}

fn forget_allocation(tgid: u32, generation: u32, ptr: u64) {
    let key = AllocKey {
        tgid,
        generation,
        ptr,
    };
    // SAFETY: the size is copied out before the entry is removed.
    let Some(size) = (unsafe { CUDA_ALLOCS.get(&key) }).copied() else {
        return;
    };
    if CUDA_ALLOCS.remove(&key).is_ok() {
        // Two's complement: adding -size subtracts.
        live_add(tgid, size.wrapping_neg());
    }
}

fn live_add(tgid: u32, delta: u64) {
    let ptr = match CUDA_LIVE.get_ptr_mut(&tgid) {
        Some(p) => p,
        None => {
            let _ = CUDA_LIVE.insert(&tgid, &0, BPF_NOEXIST as u64);
            match CUDA_LIVE.get_ptr_mut(&tgid) {
                Some(p) => p,
                None => {
                    count_lost(Lost::CudaAllocation);
                    return;
                }
            }
        }
    };
    // SAFETY: as in `add`.
    unsafe { atomic_add(ptr, delta) };
}

/// BPF's atomic add (`lock xadd`), what C's `__sync_fetch_and_add` compiles to when the
/// result is unused. Rust's BPF target offers no atomic read-modify-write, so it is spelled
/// out. SAFETY: `ptr` must point to a live, 8-byte aligned u64 in a map value.
#[inline(always)]
unsafe fn atomic_add(ptr: *mut u64, value: u64) {
    unsafe {
        core::arch::asm!("lock *(u64 *)({p} + 0) += {v}", p = in(reg) ptr, v = in(reg) value, options(nostack));
    }
}

/// The first probe hit of a process tells userspace it uses CUDA (it may be unclassified).
fn report_first_use(tgid: u32) {
    match EVENTS.reserve::<PidEvent>(0) {
        Some(mut entry) => {
            entry.write(PidEvent {
                kind: EVENT_CUDA_FIRST_USE,
                tgid,
                ktime_ns: unsafe { bpf_ktime_get_ns() },
            });
            entry.submit(0);
        }
        None => count_lost(Lost::CudaEvent),
    }
}

fn report_oom(tgid: u32, function: u8, code: u32, size: u64) {
    match EVENTS.reserve::<CudaOomEvent>(0) {
        Some(mut entry) => {
            entry.write(CudaOomEvent {
                kind: EVENT_CUDA_OOM,
                tgid,
                function: function as u32,
                code,
                size,
                ktime_ns: unsafe { bpf_ktime_get_ns() },
            });
            entry.submit(0);
        }
        None => count_lost(Lost::CudaEvent),
    }
}
