//! The CUDA functions llmscope probes, and the records its probes aggregate into.
//!
//! One table, [`FUNCTIONS`], read by both sides: userspace attaches `cuda_entry` (and, where
//! `returns` says so, `cuda_return`) to each function with an attach *cookie* that encodes
//! everything the eBPF program needs — function id, kind, and which argument holds the
//! size, the device pointer and the copy direction. The programs have no table of their own.
//!
//! Argument positions are those of the x86-64 SysV ABI (docs/design.md): integer arguments 0–5
//! in rdi, rsi, rdx, rcx, r8, r9.

/// What a probed function does, which decides what its probes record.
pub const KIND_OTHER: u8 = 0;
/// `(void **out, size_t size, …)`: the return probe reads `*out` and records the allocation.
pub const KIND_ALLOC: u8 = 1;
/// `(void *ptr, …)`: the entry probe forgets the allocation.
pub const KIND_FREE: u8 = 2;
/// `(dst, src, size, …)`: bytes by direction.
pub const KIND_MEMCPY: u8 = 3;
/// Entry and return: the time the CPU waited on the GPU.
pub const KIND_SYNC: u8 = 4;
/// Kernel launches: entry only, duty-cycled (the hot path).
pub const KIND_LAUNCH: u8 = 5;
/// Graph launches: entry only.
pub const KIND_GRAPH: u8 = 6;

/// Copy directions (`CudaKey::direction`): `cudaMemcpyKind` + 1, so 0 means "not a copy".
pub const DIR_NONE: u8 = 0;
pub const DIR_H2H: u8 = 1;
pub const DIR_H2D: u8 = 2;
pub const DIR_D2H: u8 = 3;
pub const DIR_D2D: u8 = 4;
pub const DIR_DEFAULT: u8 = 5;
/// In a cookie: read the `cudaMemcpyKind` from the argument `dir_arg` names.
pub const DIR_FROM_ARG: u8 = 0xf;

pub const API_RUNTIME: u8 = 0;
pub const API_DRIVER: u8 = 1;

/// cudaErrorMemoryAllocation and CUDA_ERROR_OUT_OF_MEMORY are both 2.
pub const CUDA_OOM: i32 = 2;

/// No argument (a placeholder position in the table).
pub const NO_ARG: u8 = 0xff;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CudaFn {
    pub name: &'static str,
    pub api: u8,
    pub kind: u8,
    /// Fixed direction, `DIR_FROM_ARG`, or `DIR_NONE`.
    pub direction: u8,
    /// Argument holding the byte count (alloc, memcpy).
    pub size_arg: u8,
    /// Argument holding the `void **` out-pointer (alloc) or the device pointer (free).
    pub ptr_arg: u8,
    /// Argument holding the `cudaMemcpyKind` when `direction == DIR_FROM_ARG`.
    pub dir_arg: u8,
    /// Whether a return probe is attached (return code, sync time, allocated pointer).
    pub returns: bool,
}

const fn f(name: &'static str, api: u8, kind: u8) -> CudaFn {
    CudaFn {
        name,
        api,
        kind,
        direction: DIR_NONE,
        size_arg: NO_ARG,
        ptr_arg: NO_ARG,
        dir_arg: NO_ARG,
        returns: matches!(kind, KIND_ALLOC | KIND_MEMCPY | KIND_SYNC | KIND_OTHER),
    }
}

const fn alloc(name: &'static str, api: u8) -> CudaFn {
    CudaFn {
        size_arg: 1,
        ptr_arg: 0,
        ..f(name, api, KIND_ALLOC)
    }
}

const fn free(name: &'static str, api: u8) -> CudaFn {
    CudaFn {
        ptr_arg: 0,
        ..f(name, api, KIND_FREE)
    }
}

const fn copy(name: &'static str, api: u8, direction: u8) -> CudaFn {
    CudaFn {
        size_arg: 2,
        direction,
        dir_arg: if direction == DIR_FROM_ARG { 3 } else { NO_ARG },
        ..f(name, api, KIND_MEMCPY)
    }
}

/// Every probed function; its index is its id (`CudaKey::function`, the cookie's low byte).
pub const FUNCTIONS: &[CudaFn] = &[
    // Runtime API (libcudart).
    alloc("cudaMalloc", API_RUNTIME),
    alloc("cudaMallocAsync", API_RUNTIME),
    alloc("cudaMallocManaged", API_RUNTIME),
    free("cudaFree", API_RUNTIME),
    free("cudaFreeAsync", API_RUNTIME),
    copy("cudaMemcpy", API_RUNTIME, DIR_FROM_ARG),
    copy("cudaMemcpyAsync", API_RUNTIME, DIR_FROM_ARG),
    f("cudaLaunchKernel", API_RUNTIME, KIND_LAUNCH),
    f("cudaLaunchKernel_ptsz", API_RUNTIME, KIND_LAUNCH),
    f("cudaLaunchKernelExC", API_RUNTIME, KIND_LAUNCH),
    f("cudaLaunchKernelExC_ptsz", API_RUNTIME, KIND_LAUNCH),
    f("cudaGraphLaunch", API_RUNTIME, KIND_GRAPH),
    f("cudaDeviceSynchronize", API_RUNTIME, KIND_SYNC),
    f("cudaStreamSynchronize", API_RUNTIME, KIND_SYNC),
    f("cudaEventSynchronize", API_RUNTIME, KIND_SYNC),
    // Driver API (libcuda).
    alloc("cuMemAlloc_v2", API_DRIVER),
    alloc("cuMemAllocAsync", API_DRIVER),
    alloc("cuMemAllocManaged", API_DRIVER),
    free("cuMemFree_v2", API_DRIVER),
    free("cuMemFreeAsync", API_DRIVER),
    copy("cuMemcpyHtoD_v2", API_DRIVER, DIR_H2D),
    copy("cuMemcpyDtoH_v2", API_DRIVER, DIR_D2H),
    copy("cuMemcpyDtoD_v2", API_DRIVER, DIR_D2D),
    copy("cuMemcpy", API_DRIVER, DIR_DEFAULT),
    copy("cuMemcpyHtoDAsync_v2", API_DRIVER, DIR_H2D),
    copy("cuMemcpyDtoHAsync_v2", API_DRIVER, DIR_D2H),
    copy("cuMemcpyDtoDAsync_v2", API_DRIVER, DIR_D2D),
    copy("cuMemcpyAsync", API_DRIVER, DIR_DEFAULT),
    f("cuLaunchKernel", API_DRIVER, KIND_LAUNCH),
    f("cuLaunchKernel_ptsz", API_DRIVER, KIND_LAUNCH),
    f("cuLaunchKernelEx", API_DRIVER, KIND_LAUNCH),
    f("cuGraphLaunch", API_DRIVER, KIND_GRAPH),
    f("cuCtxSynchronize", API_DRIVER, KIND_SYNC),
    f("cuStreamSynchronize", API_DRIVER, KIND_SYNC),
    f("cuEventSynchronize", API_DRIVER, KIND_SYNC),
];

/// The attach cookie of function `id`: what the eBPF programs decode.
pub const fn cookie(id: u8) -> u64 {
    let f = &FUNCTIONS[id as usize];
    id as u64
        | (f.kind as u64) << 8
        | (f.direction as u64) << 16
        | (f.size_arg as u64) << 24
        | (f.ptr_arg as u64) << 32
        | (f.dir_arg as u64) << 40
        | (f.api as u64) << 48
}

/// Ids of the runtime API's allocation functions: a driver allocation made while one of
/// these is in flight on the same thread is the runtime's own (see the `nested` test).
pub const RUNTIME_ALLOCS: [u8; 3] = [0, 1, 2];

/// The fields of a cookie, as the eBPF programs read them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cookie {
    pub function: u8,
    pub kind: u8,
    pub direction: u8,
    pub size_arg: u8,
    pub ptr_arg: u8,
    pub dir_arg: u8,
    pub api: u8,
}

impl Cookie {
    pub const fn decode(c: u64) -> Cookie {
        Cookie {
            function: c as u8,
            kind: (c >> 8) as u8,
            direction: (c >> 16) as u8,
            size_arg: (c >> 24) as u8,
            ptr_arg: (c >> 32) as u8,
            dir_arg: (c >> 40) as u8,
            api: (c >> 48) as u8,
        }
    }
}

/// Key of the `CUDA_STATS` map. `code == 0`: the function's calls, bytes and nanoseconds
/// (per copy direction for memcpy); `code != 0`: calls that returned that error.
///
/// `generation` is drawn at a process image's first CUDA call (`CUDA_SEEN`): a pid reused by
/// a new process, or a process that execs, starts new counters instead of inheriting these.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CudaKey {
    pub tgid: u32,
    pub generation: u32,
    pub function: u8,
    pub direction: u8,
    pub code: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CudaStat {
    pub calls: u64,
    /// Bytes allocated (alloc, on success) or copied (memcpy).
    pub bytes: u64,
    /// Time between entry and return (sync).
    pub nanos: u64,
}

/// Key of the `CUDA_ALLOCS` map (live allocations → size). Device pointers are per process
/// image, hence the generation (as in [`CudaKey`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AllocKey {
    pub tgid: u32,
    pub generation: u32,
    pub ptr: u64,
}

/// Key of the `CUDA_PENDING` map: a call in flight on one thread. The function is part of the
/// key because a runtime call may call a probed driver function on the same thread.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PendingKey {
    pub pid_tgid: u64,
    pub function: u32,
    pub reserved: u32,
}

/// What the entry probe keeps for the return probe.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pending {
    /// The `void **` out-pointer of an allocation.
    pub out_ptr: u64,
    pub size: u64,
    pub start_ns: u64,
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    #[test]
    fn cookies_round_trip_for_every_function() {
        assert!(FUNCTIONS.len() < 256);
        for (id, f) in FUNCTIONS.iter().enumerate() {
            let c = Cookie::decode(cookie(id as u8));
            assert_eq!(
                (
                    c.function as usize,
                    c.kind,
                    c.direction,
                    c.size_arg,
                    c.ptr_arg,
                    c.dir_arg,
                    c.api
                ),
                (
                    id,
                    f.kind,
                    f.direction,
                    f.size_arg,
                    f.ptr_arg,
                    f.dir_arg,
                    f.api
                ),
                "{}",
                f.name
            );
        }
    }

    #[test]
    fn runtime_allocations_are_listed() {
        let listed: [u8; 3] = core::array::from_fn(|i| RUNTIME_ALLOCS[i]);
        let found: std::vec::Vec<u8> = FUNCTIONS
            .iter()
            .enumerate()
            .filter(|(_, f)| f.api == API_RUNTIME && f.kind == KIND_ALLOC)
            .map(|(id, _)| id as u8)
            .collect();
        assert_eq!(found, listed);
    }

    #[test]
    fn launch_functions_have_no_return_probe() {
        for f in FUNCTIONS
            .iter()
            .filter(|f| matches!(f.kind, KIND_LAUNCH | KIND_GRAPH))
        {
            assert!(!f.returns, "{}: launches are the hot path", f.name);
        }
        let malloc = FUNCTIONS.iter().find(|f| f.name == "cudaMalloc").unwrap();
        assert!(malloc.returns && malloc.ptr_arg == 0 && malloc.size_arg == 1);
    }
}
