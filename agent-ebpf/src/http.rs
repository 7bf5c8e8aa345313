//! Request telemetry, two ways to the same records. The kernel hooks (below, `tcp_*`) where
//! the kernel has BPF trampolines or kprobes: every server, Go ones included. Else
//! `http_entry` and `http_return`, attached by userspace to libc's socket
//! functions (agent_common::http::IO_FUNCTIONS) in each inference server it chose — one
//! process per attachment, so no other process takes a breakpoint. They follow the server's
//! accepted connections only: `accept`/`accept4` returns put the new fd in [`HTTP_CONNS`]
//! (userspace adds the connections that were open before), `close` takes it out, and a read
//! or write on any other fd costs one lookup and sends nothing. For a followed fd, the bytes
//! the call moved are copied, up to [`HTTP_RECORDS`] × [`HTTP_CHUNK`], into [`HTTP_EVENTS`].

use agent_common::{
    http::{
        ConnKey, HttpRecord, IoCall, PortKey, HTTP_ACCEPT, HTTP_CHUNK, HTTP_CLOSE, HTTP_IN,
        HTTP_IOVECS, HTTP_OUT, HTTP_RECORDS, IO_ACCEPT, IO_CLOSE, IO_READ, IO_READV, IO_RECV,
        IO_RECVMSG, IO_SENDMSG, IO_WRITE, IO_WRITEV, MSG_PEEK,
    },
    Lost,
};
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    cty::c_void,
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_user,
        generated::{bpf_get_attach_cookie, bpf_probe_read_user as raw_probe_read_user},
    },
    macros::{fentry, fexit, kprobe, kretprobe, map, uprobe, uretprobe},
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{FEntryContext, FExitContext, ProbeContext, RetProbeContext},
    EbpfContext as _,
};

use crate::maps::count_lost;

/// Records for the request-telemetry thread. Userspace may resize it before load.
#[map]
pub static HTTP_EVENTS: RingBuf = RingBuf::with_byte_size(1024 * 1024, 0);

/// The followed connections of probed servers (value unused).
#[map]
pub static HTTP_CONNS: HashMap<ConnKey, u32> = HashMap::with_max_entries(65536, 0);

/// The kernel hooks' filter: (server process, listening port) pairs whose connections are
/// followed (value unused). Userspace fills it for the servers it chose.
#[map]
pub static HTTP_PORTS: HashMap<PortKey, u32> = HashMap::with_max_entries(4096, 0);

/// Calls in flight per thread. LRU: a thread killed mid-call leaves an entry that ages out.
#[map]
static HTTP_CALLS: LruHashMap<u64, IoCall> = LruHashMap::with_max_entries(16384, 0);

/// A record is built here (too big for the stack), then copied into the ring at its size.
/// Twice the chunk: a length masked to 2 × HTTP_CHUNK − 1 is one every verifier bounds (6.1's
/// loses a compare's bound across a register spill), and it always fits.
#[repr(C)]
pub struct Scratch {
    head: HttpRecord,
    data: [u8; 2 * HTTP_CHUNK],
}

#[map]
static HTTP_SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

#[uprobe]
pub fn http_entry(ctx: ProbeContext) -> u32 {
    on_entry(&ctx);
    0
}

#[uretprobe]
pub fn http_return(ctx: RetProbeContext) -> u32 {
    on_return(&ctx);
    0
}

// The kernel hooks, where the kernel has BPF trampolines (fentry/fexit) or kprobes: every
// process's TCP sends, receives and closes pass here while a server is followed; those of a
// socket whose (process, local port) is not in HTTP_PORTS cost a read and a lookup. A
// socket's address names its connection, and its first bytes start it (no accept is seen).

/// Offsets in the running kernel's structures and `enum iter_type`'s values, from its BTF
/// (set by userspace before load; without them the kernel hooks are not attached).
#[unsafe(no_mangle)]
static SOCK_NUM_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static MSGHDR_ITER_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static ITER_TYPE_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static ITER_IOV_OFFSET_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static ITER_UBUF_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static ITER_IOV_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static ITER_NR_SEGS_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static ITER_UBUF: u32 = 0;
#[unsafe(no_mangle)]
static ITER_IOVEC: u32 = 0;

fn global(value: &u32) -> u64 {
    // SAFETY: a plain read of a global userspace set before load.
    unsafe { core::ptr::read_volatile(value) as u64 }
}

fn kernel_read<T>(base: u64, offset: &u32) -> Option<T> {
    // SAFETY: the helper checks the kernel address; a bad one is an error.
    unsafe { bpf_probe_read_kernel((base + global(offset)) as *const T) }.ok()
}

/// The process whose (tgid, local port of `sk`) is followed, if it is.
fn follows(sk: u64) -> Option<u32> {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let port: u16 = kernel_read(sk, &SOCK_NUM_OFFSET)?;
    let key = PortKey {
        tgid,
        port: port as u32,
    };
    // SAFETY: presence check only.
    unsafe { HTTP_PORTS.get(&key) }.map(|_| tgid)
}

/// `tcp_sendmsg`/`tcp_recvmsg` entered with `msg`: where its bytes are, for the return.
fn tcp_entry(sk: u64, msg: u64, read: bool, flags: u64) {
    if read && flags & MSG_PEEK != 0 || follows(sk).is_none() {
        return;
    }
    let iter = msg + global(&MSGHDR_ITER_OFFSET);
    let (Some(kind), Some(skip)) = (
        kernel_read::<u8>(iter, &ITER_TYPE_OFFSET),
        kernel_read::<u64>(iter, &ITER_IOV_OFFSET_OFFSET),
    ) else {
        return;
    };
    let call = if kind as u64 == global(&ITER_UBUF) {
        IoCall {
            kind: if read { IO_READ } else { IO_WRITE },
            conn: sk,
            ptr: kernel_read::<u64>(iter, &ITER_UBUF_OFFSET).unwrap_or(0) + skip,
            count: 0,
        }
    } else if kind as u64 == global(&ITER_IOVEC) && skip == 0 {
        IoCall {
            kind: if read { IO_READV } else { IO_WRITEV },
            conn: sk,
            ptr: kernel_read::<u64>(iter, &ITER_IOV_OFFSET).unwrap_or(0),
            count: kernel_read::<u64>(iter, &ITER_NR_SEGS_OFFSET).unwrap_or(0),
        }
    } else {
        // Kernel memory (sendfile, splice) or a partly consumed vector: its length is
        // sent as a gap.
        IoCall {
            kind: if read { IO_READ } else { IO_WRITE },
            conn: sk,
            ptr: 0,
            count: 0,
        }
    };
    let _ = HTTP_CALLS.insert(&bpf_get_current_pid_tgid(), &call, 0);
}

fn tcp_closed(sk: u64) {
    if let Some(tgid) = follows(sk) {
        send_mark(HTTP_CLOSE, tgid, sk);
    }
}

/// `int tcp_sendmsg(struct sock *sk, struct msghdr *msg, size_t size)`.
#[fentry(function = "tcp_sendmsg")]
pub fn tcp_send_fentry(ctx: FEntryContext) -> u32 {
    tcp_entry(ctx.arg(0), ctx.arg(1), false, 0);
    0
}

#[fexit(function = "tcp_sendmsg")]
pub fn tcp_send_fexit(ctx: FExitContext) -> u32 {
    finish(ctx.arg::<i32>(3) as i64);
    0
}

/// `int tcp_recvmsg(struct sock *sk, struct msghdr *msg, size_t len, int flags,
/// int *addr_len)`.
#[fentry(function = "tcp_recvmsg")]
pub fn tcp_recv_fentry(ctx: FEntryContext) -> u32 {
    tcp_entry(ctx.arg(0), ctx.arg(1), true, ctx.arg::<i32>(3) as u64);
    0
}

#[fexit(function = "tcp_recvmsg")]
pub fn tcp_recv_fexit(ctx: FExitContext) -> u32 {
    finish(ctx.arg::<i32>(5) as i64);
    0
}

/// `void tcp_close(struct sock *sk, long timeout)`.
#[fentry(function = "tcp_close")]
pub fn tcp_close_fentry(ctx: FEntryContext) -> u32 {
    tcp_closed(ctx.arg(0));
    0
}

/// The same hooks where the kernel has no BPF trampolines.
#[kprobe]
pub fn tcp_send_kprobe(ctx: ProbeContext) -> u32 {
    if let (Some(sk), Some(msg)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(1)) {
        tcp_entry(sk, msg, false, 0);
    }
    0
}

#[kprobe]
pub fn tcp_recv_kprobe(ctx: ProbeContext) -> u32 {
    if let (Some(sk), Some(msg), Some(flags)) =
        (ctx.arg::<u64>(0), ctx.arg::<u64>(1), ctx.arg::<u64>(3))
    {
        tcp_entry(sk, msg, true, flags);
    }
    0
}

/// Both functions' return.
#[kretprobe]
pub fn tcp_io_kretprobe(ctx: RetProbeContext) -> u32 {
    finish(ctx.ret::<i32>() as i64);
    0
}

#[kprobe]
pub fn tcp_close_kprobe(ctx: ProbeContext) -> u32 {
    if let Some(sk) = ctx.arg::<u64>(0) {
        tcp_closed(sk);
    }
    0
}

fn followed(tgid: u32, fd: u64) -> bool {
    let key = ConnKey {
        tgid,
        fd: fd as u32,
    };
    // SAFETY: presence check only.
    fd <= u32::MAX as u64 && unsafe { HTTP_CONNS.get(&key) }.is_some()
}

fn on_entry(ctx: &ProbeContext) {
    // SAFETY: the context is the program's own.
    let kind = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    // SAFETY: `regs` is the program's context (pt_regs), valid for the whole run.
    let r = unsafe { &*ctx.regs };
    let fd = r.rdi;
    match kind {
        IO_ACCEPT => {}
        IO_CLOSE => {
            if followed(tgid, fd) {
                let _ = HTTP_CONNS.remove(&ConnKey {
                    tgid,
                    fd: fd as u32,
                });
                send_mark(HTTP_CLOSE, tgid, fd);
            }
            return;
        }
        // A peek's bytes come again with the next read.
        IO_RECV if r.rcx & MSG_PEEK != 0 => return,
        IO_RECVMSG if r.rdx & MSG_PEEK != 0 => return,
        _ if followed(tgid, fd) => {}
        _ => return,
    }
    let call = IoCall {
        // recv is read with flags (checked above).
        kind: if kind == IO_RECV { IO_READ } else { kind },
        conn: fd,
        ptr: r.rsi,
        count: r.rdx,
    };
    let _ = HTTP_CALLS.insert(&pid_tgid, &call, 0);
}

fn on_return(ctx: &RetProbeContext) {
    finish(ctx.ret::<i64>());
}

/// The return of the call this thread entered: what it moved is sent.
fn finish(ret: i64) {
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: the value is copied out before the entry is removed.
    let Some(call) = (unsafe { HTTP_CALLS.get(&pid_tgid) }).copied() else {
        return;
    };
    let _ = HTTP_CALLS.remove(&pid_tgid);
    let tgid = (pid_tgid >> 32) as u32;
    if ret < 0 {
        return;
    }
    match call.kind {
        IO_ACCEPT => {
            let key = ConnKey {
                tgid,
                fd: ret as u32,
            };
            if HTTP_CONNS.insert(&key, &0, BPF_NOEXIST as u64).is_err()
                && unsafe { HTTP_CONNS.get(&key) }.is_none()
            {
                count_lost(Lost::HttpConnection);
                return;
            }
            send_mark(HTTP_ACCEPT, tgid, ret as u64);
        }
        IO_READ | IO_WRITE if ret > 0 => {
            let kind = if call.kind == IO_READ {
                HTTP_IN
            } else {
                HTTP_OUT
            };
            send_buffer(kind, tgid, call.conn, call.ptr, ret as u64);
        }
        IO_READV | IO_WRITEV if ret > 0 => {
            let kind = if call.kind == IO_READV {
                HTTP_IN
            } else {
                HTTP_OUT
            };
            send_iovecs(kind, tgid, call.conn, call.ptr, call.count, ret as u64);
        }
        IO_RECVMSG | IO_SENDMSG if ret > 0 => {
            let kind = if call.kind == IO_RECVMSG {
                HTTP_IN
            } else {
                HTTP_OUT
            };
            // struct msghdr: msg_iov at 16, msg_iovlen at 24 (x86-64).
            let msg = call.ptr as *const u8;
            // SAFETY: the helper checks the user address.
            let (Ok(iov), Ok(count)) = (unsafe {
                (
                    bpf_probe_read_user(msg.add(16) as *const u64),
                    bpf_probe_read_user(msg.add(24) as *const u64),
                )
            }) else {
                return;
            };
            send_iovecs(kind, tgid, call.conn, iov, count, ret as u64);
        }
        _ => {}
    }
}

/// An accept or close: a record with no data.
fn send_mark(kind: u32, tgid: u32, conn: u64) {
    let head = HttpRecord {
        kind,
        tgid,
        conn,
        len: 0,
        ktime_ns: unsafe { bpf_ktime_get_ns() },
        copied: 0,
        reserved: 0,
    };
    if HTTP_EVENTS.output::<HttpRecord>(&head, 0).is_err() {
        count_lost(Lost::Http);
    }
}

/// `len` bytes at `buf`: up to HTTP_RECORDS records of HTTP_CHUNK; the last one stands for
/// whatever is left.
#[inline(always)]
fn send_buffer(kind: u32, tgid: u32, conn: u64, buf: u64, len: u64) {
    let mut offset = 0u64;
    for i in 0..HTTP_RECORDS {
        if offset >= len {
            return;
        }
        let left = len - offset;
        let span = if i + 1 == HTTP_RECORDS {
            left
        } else {
            left.min(HTTP_CHUNK as u64)
        };
        if !send_piece(kind, tgid, conn, buf + offset, span) {
            return;
        }
        offset += span;
    }
}

/// The first HTTP_IOVECS iovecs of a vectored call that moved `len` bytes, one record each;
/// the last one stands for whatever is left. Inlined: a BPF call takes five arguments.
#[inline(always)]
fn send_iovecs(kind: u32, tgid: u32, conn: u64, iov: u64, count: u64, len: u64) {
    let mut offset = 0u64;
    for i in 0..HTTP_IOVECS {
        if offset >= len || i as u64 >= count {
            return;
        }
        let entry = (iov + 16 * i as u64) as *const u64;
        // SAFETY: the helper checks the user address; struct iovec is (base, len).
        let (Ok(base), Ok(iov_len)) = (unsafe {
            (
                bpf_probe_read_user(entry),
                bpf_probe_read_user(entry.add(1)),
            )
        }) else {
            return;
        };
        let left = len - offset;
        let last = i + 1 == HTTP_IOVECS || i as u64 + 1 == count;
        let span = if last { left } else { left.min(iov_len) };
        if !send_piece(kind, tgid, conn, base, span) {
            return;
        }
        offset += span;
    }
}

/// One record: the first HTTP_CHUNK bytes of `span` bytes at `src`. False when the ring is
/// full (counted; the rest of the call is not sent either).
fn send_piece(kind: u32, tgid: u32, conn: u64, src: u64, span: u64) -> bool {
    let Some(scratch) = HTTP_SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    let mut copied = span;
    if copied > HTTP_CHUNK as u64 {
        copied = HTTP_CHUNK as u64;
    }
    // No more than HTTP_CHUNK in fact; the mask is the bound the verifier follows. A register
    // move the compiler cannot see through keeps it from dropping the mask as redundant.
    let mut n = copied as usize;
    // SAFETY: a move of a register to itself.
    unsafe { core::arch::asm!("{0} = {0}", inout(reg) n, options(nostack, nomem, pure)) };
    n &= 2 * HTTP_CHUNK - 1;
    // SAFETY: `scratch` is this CPU's slot; `n` < 2 × HTTP_CHUNK, the data array's size; the
    // helper checks the user address.
    unsafe {
        let data = &raw mut (*scratch).data as *mut c_void;
        if raw_probe_read_user(data, n as u32, src as *const c_void) != 0 {
            n = 0;
        }
        (*scratch).head = HttpRecord {
            kind,
            tgid,
            conn,
            len: span,
            ktime_ns: bpf_ktime_get_ns(),
            copied: n as u32,
            reserved: 0,
        };
        let size = size_of::<HttpRecord>() + (n & (2 * HTTP_CHUNK - 1));
        let bytes = core::slice::from_raw_parts(scratch as *const u8, size);
        if HTTP_EVENTS.output::<[u8]>(bytes, 0).is_err() {
            count_lost(Lost::Http);
            return false;
        }
    }
    true
}
