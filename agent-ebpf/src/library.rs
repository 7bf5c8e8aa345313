//! Libraries being loaded, by any process: a hook on `security_mmap_file`, the LSM check every
//! `mmap` of a file passes through. It runs only for file mappings — never on the syscall path
//! of anything else — and sends a record only for executable mappings of files whose name
//! starts with a prefix of [`LIBRARY_PREFIXES`] (CUDA libraries, framework libraries), so a
//! process loading libcudart is seen the moment it maps it, whether or not it is known yet.
//!
//! Attached as an fentry (a BPF trampoline: a direct call, no trap) and, where the kernel has
//! no BPF trampolines, as a kprobe on the same function. The record is sent before the
//! mapping exists and wakes the reader (adaptively: one wake-up per burst); the attach thread
//! looks for the mapping in `/proc/<pid>/maps`, again a little later when it is not there yet.

use agent_common::{
    LibraryMapEvent, Lost, EVENT_LIBRARY_MAP, LIB_NAME_LEN, LIB_PREFIX_LEN, PROT_EXEC,
};
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_kernel, bpf_probe_read_kernel_str_bytes},
    macros::{fentry, kprobe, map},
    maps::{lpm_trie::Key, LpmTrie},
    programs::{FEntryContext, ProbeContext},
};

use crate::maps::{count_lost, EVENTS};

/// File-name prefix → `LIB_*` class, written by userspace before it attaches the hook.
/// Longest-prefix match on the first [`LIB_PREFIX_LEN`] bytes of the file name.
#[map]
static LIBRARY_PREFIXES: LpmTrie<[u8; LIB_PREFIX_LEN], u32> = LpmTrie::with_max_entries(64, 0);

/// Offsets in the running kernel's structures (from its BTF, written by userspace before
/// load; aya has no CO-RE relocations for Rust programs). Zero means unknown: the hook is
/// then not attached at all.
#[unsafe(no_mangle)]
static FILE_DENTRY_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static FILE_INODE_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static DENTRY_NAME_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static DENTRY_PARENT_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static INODE_INO_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static INODE_SB_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static SB_DEV_OFFSET: u32 = 0;

/// `int security_mmap_file(struct file *file, unsigned long prot, unsigned long flags)`.
#[fentry(function = "security_mmap_file")]
pub fn mmap_file(ctx: FEntryContext) -> u32 {
    let file: *const u8 = ctx.arg(0);
    let prot: u64 = ctx.arg(1);
    library_mapped(file, prot);
    0
}

/// The same hook where BPF trampolines are not available.
#[kprobe]
pub fn mmap_file_kprobe(ctx: ProbeContext) -> u32 {
    if let (Some(file), Some(prot)) = (ctx.arg::<*const u8>(0), ctx.arg::<u64>(1)) {
        library_mapped(file, prot);
    }
    0
}

fn offset(global: &u32) -> usize {
    // SAFETY: a plain read of a global userspace set before load.
    unsafe { core::ptr::read_volatile(global) as usize }
}

/// Reads the pointer at `base + off` in kernel memory.
fn kernel_ptr(base: *const u8, off: usize) -> Option<*const u8> {
    // SAFETY: bpf_probe_read_kernel checks the address; a bad one is an error.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(off) as *const *const u8) }.ok()
}

fn library_mapped(file: *const u8, prot: u64) {
    if prot & PROT_EXEC == 0 || file.is_null() {
        return;
    }
    let Some(dentry) = kernel_ptr(file, offset(&FILE_DENTRY_OFFSET)) else {
        return;
    };
    let Some(name) = kernel_ptr(dentry, offset(&DENTRY_NAME_OFFSET)) else {
        return;
    };
    let mut key = Key::new(0, [0u8; LIB_PREFIX_LEN]);
    // SAFETY: the helper checks the source and writes at most LIB_PREFIX_LEN bytes.
    let len = match unsafe { bpf_probe_read_kernel_str_bytes(name, &mut key.data) } {
        Ok(s) => s.len(),
        Err(_) => return,
    };
    key.prefix_len = (len * 8) as u32;
    let Some(class) = LIBRARY_PREFIXES.get(&key).copied() else {
        return;
    };
    let Some(mut entry) = EVENTS.reserve::<LibraryMapEvent>(0) else {
        count_lost(Lost::LibraryMap);
        return;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` is a reserved record owned by this program until submit; every kernel
    // read goes through a checking helper.
    unsafe {
        (*ev).kind = EVENT_LIBRARY_MAP;
        (*ev).tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        (*ev).class = class;
        (*ev).reserved = 0;
        let dst = &mut *(&raw mut (*ev).name as *mut [u8; LIB_NAME_LEN]);
        dst[0] = 0;
        let _ = bpf_probe_read_kernel_str_bytes(name, dst);
        let dst = &mut *(&raw mut (*ev).parent as *mut [u8; LIB_NAME_LEN]);
        dst[0] = 0;
        if let Some(parent) = kernel_ptr(dentry, offset(&DENTRY_PARENT_OFFSET)) {
            if let Some(parent_name) = kernel_ptr(parent, offset(&DENTRY_NAME_OFFSET)) {
                let _ = bpf_probe_read_kernel_str_bytes(parent_name, dst);
            }
        }
        (*ev).ino = 0;
        (*ev).dev = 0;
        if let Some(inode) = kernel_ptr(file, offset(&FILE_INODE_OFFSET)) {
            (*ev).ino =
                bpf_probe_read_kernel(inode.wrapping_add(offset(&INODE_INO_OFFSET)) as *const u64)
                    .unwrap_or(0);
            if let Some(sb) = kernel_ptr(inode, offset(&INODE_SB_OFFSET)) {
                (*ev).dev =
                    bpf_probe_read_kernel(sb.wrapping_add(offset(&SB_DEV_OFFSET)) as *const u32)
                        .unwrap_or(0) as u64;
            }
        }
    }
    entry.submit(0);
}
