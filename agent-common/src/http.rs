//! Request telemetry: the libc socket functions llmscope probes in inference servers, and the
//! records their probes send (a server's reads and writes on its accepted connections).
//!
//! One table, [`IO_FUNCTIONS`], read by both sides: userspace attaches `http_entry` and
//! `http_return` to each function, in one server process only, with the function's
//! `IO_*` kind as the attach cookie. Where the kernel has BPF trampolines or kprobes, hooks on
//! `tcp_sendmsg`/`tcp_recvmsg`/`tcp_close` send the same records instead, for the
//! (process, listening port) pairs in the kernel's port table ([`PortKey`]).

/// How a probed function moves bytes (the attach cookie), x86-64 SysV argument order.
pub const IO_READ: u64 = 1; // read(fd, buf, n)
pub const IO_WRITE: u64 = 2; // write(fd, buf, n), send(…), sendto(…)
pub const IO_READV: u64 = 3; // readv(fd, iov, iovcnt)
pub const IO_WRITEV: u64 = 4; // writev(fd, iov, iovcnt)
pub const IO_RECVMSG: u64 = 5; // recvmsg(fd, msg, flags)
pub const IO_SENDMSG: u64 = 6; // sendmsg(fd, msg, flags)
pub const IO_ACCEPT: u64 = 7; // accept(fd, …), accept4(fd, …): returns the new fd
pub const IO_CLOSE: u64 = 8; // close(fd)
pub const IO_RECV: u64 = 9; // recv(fd, buf, n, flags), recvfrom(fd, buf, n, flags, …)
/// `MSG_PEEK`: a peek reads bytes that the next read returns again; not followed.
pub const MSG_PEEK: u64 = 2;

/// The libc functions probed and what each does. Servers that use libc reach their sockets
/// through these (cpp-httplib: accept4/recv/send, and recv with MSG_PEEK to see whether a kept-alive
/// connection is still open; CPython's socket module: accept4/recv/send;
/// libuv/uvloop: accept4/read/write/writev).
pub const IO_FUNCTIONS: &[(&str, u64)] = &[
    ("read", IO_READ),
    ("recv", IO_RECV),
    ("recvfrom", IO_RECV),
    ("write", IO_WRITE),
    ("send", IO_WRITE),
    ("sendto", IO_WRITE),
    ("readv", IO_READV),
    ("writev", IO_WRITEV),
    ("recvmsg", IO_RECVMSG),
    ("sendmsg", IO_SENDMSG),
    ("accept", IO_ACCEPT),
    ("accept4", IO_ACCEPT),
    ("close", IO_CLOSE),
];

/// `HttpRecord::kind`, after the ring's common first `u32`.
pub const HTTP_IN: u32 = 1;
pub const HTTP_OUT: u32 = 2;
/// A connection was accepted (its fd is new): any state kept for the fd is stale.
pub const HTTP_ACCEPT: u32 = 3;
pub const HTTP_CLOSE: u32 = 4;

/// Bytes copied per record; a read or write of more is sent as several records (at most
/// [`HTTP_RECORDS`]; past them, the rest is a gap).
pub const HTTP_CHUNK: usize = 4096;
pub const HTTP_RECORDS: u32 = 4;
/// iovecs followed per readv/writev/recvmsg/sendmsg (one record each).
pub const HTTP_IOVECS: u32 = 4;

/// The head of one record; `copied` bytes of data follow it in the ring.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HttpRecord {
    pub kind: u32,
    pub tgid: u32,
    /// The connection: its fd (libc probes), or the kernel's `struct sock` address (kernel
    /// hooks).
    pub conn: u64,
    /// Bytes of the stream this record stands for: `copied`, then `len - copied` the probe
    /// did not copy.
    pub len: u64,
    /// `bpf_ktime_get_ns()` when the call returned.
    pub ktime_ns: u64,
    /// Bytes of data that follow.
    pub copied: u32,
    pub reserved: u32,
}

/// A listening port of a server the kernel hooks follow: its accepted connections have it
/// as their local port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortKey {
    pub tgid: u32,
    pub port: u32,
}

/// A connection of a probed server: (tgid, fd).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub tgid: u32,
    pub fd: u32,
}

/// A call in flight, from entry to return, per thread.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct IoCall {
    pub kind: u64,
    /// The connection, as [`HttpRecord::conn`].
    pub conn: u64,
    /// The buffer, iovec array or msghdr.
    pub ptr: u64,
    /// iovcnt for readv/writev.
    pub count: u64,
}
