//! `gpu-info-<pid>.json` files: the cooperative protocol of the original monitor, where a
//! process reports its own GPU use (what PyTorch has allocated and reserved). The files come
//! from untrusted processes, so every read is defended:
//!
//! - opened without following symlinks (`O_NOFOLLOW`) and without blocking (`O_NONBLOCK`: a
//!   FIFO cannot stall the agent), and only a regular file is read;
//! - at most [`Limits::max_bytes`] bytes (a 1 GiB sparse file is refused by its size);
//! - joined to its writer: with `start_time_ticks`, the one live process that has the
//!   report's pid in its own PID namespace and that start time (a report from inside a
//!   container names the pid the container sees); none or several: refused;
//! - owned by the uid of that process, modified after it started (a file left by an earlier
//!   process with the same pid is not believed);
//! - parsed into a fixed schema (types, finite and in-range values, the pid inside matching the
//!   pid in the name), and not older than the TTL;
//! - at most [`Limits::max_files`] files per scan.
//!
//! Every refused version of a file is counted once, by reason ([`Rejections`]); nothing is
//! trusted halfway.

pub(crate) mod schema;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use schema::{GpuInfo, SCHEMA_VERSION};

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_bytes: u64,
    pub max_files: usize,
    /// Directory entries looked at per scan, whatever they are: anyone may fill the
    /// directory with a million files; past this the rest of it is not walked.
    pub max_entries: usize,
    /// A report older than this (by its `timestamp`) is stale.
    pub ttl: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 64 * 1024,
            max_files: 256,
            max_entries: 4096,
            ttl: Duration::from_secs(60),
        }
    }
}

/// What the reader needs to know about the process a file names.
pub trait Processes {
    /// (uid, start time as Unix seconds) of a live process; None when it is gone. The uid is
    /// None where owners are not uids (Windows: there the directory's ACL must keep other
    /// users from writing reports).
    fn owner_and_start(&self, pid: u32) -> Option<(Option<u32>, f64)>;

    /// The pids (as the agent sees them) of the live processes whose pid in their own PID
    /// namespace is `pid` and whose start time is `start_time_ticks` (see
    /// [`GpuInfo::start_time_ticks`]).
    fn find(&self, pid: u32, start_time_ticks: u64) -> Vec<u32>;
}

agent_common::label_enum! {
    /// Why a report is refused (`reason` of `llmscope_gpu_info_rejected_total`).
    pub enum Reason {
        AmbiguousProcess = "ambiguous_process",
        InvalidValue = "invalid_value",
        Malformed = "malformed",
        NoMatchingProcess = "no_matching_process",
        NotARegularFile = "not_a_regular_file",
        OlderThanProcess = "older_than_process",
        PidMismatch = "pid_mismatch",
        ProcessGone = "process_gone",
        Stale = "stale",
        Symlink = "symlink",
        TooLarge = "too_large",
        TooManyFiles = "too_many_files",
        Unreadable = "unreadable",
        UnsupportedVersion = "unsupported_version",
        WrongOwner = "wrong_owner",
    }
}

/// A file as it was when refused: (modification time, size). The same refused version is
/// counted once, however many scans see it.
pub type FileVersion = Option<(SystemTime, u64)>;

#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    pub file: String,
    pub version: FileVersion,
    pub reason: Reason,
}

#[derive(Debug, Default, PartialEq)]
pub struct Scan {
    pub accepted: Vec<GpuInfo>,
    pub rejected: Vec<Rejection>,
    /// The walk stopped at [`Limits::max_entries`]: the rest of the directory was not looked at.
    pub truncated: bool,
}

impl Scan {
    /// This scan's refusals by reason.
    pub fn rejected_by_reason(&self) -> BTreeMap<&'static str, u64> {
        let mut out = BTreeMap::new();
        for r in &self.rejected {
            *out.entry(r.reason.as_str()).or_default() += 1;
        }
        out
    }
}

/// Refusals since start, each refused file version counted once (a bad file left in place
/// is not counted again on every scan), every reason present from 0. Remembers only the
/// files of the last scan (bounded like the scan).
#[derive(Debug)]
pub struct Rejections {
    last: HashMap<String, (FileVersion, Reason)>,
    totals: BTreeMap<Reason, u64>,
    truncated: u64,
}

impl Default for Rejections {
    fn default() -> Self {
        Rejections {
            last: HashMap::new(),
            totals: Reason::ALL.iter().map(|&r| (r, 0)).collect(),
            truncated: 0,
        }
    }
}

impl Rejections {
    /// Counts the refusals of `scan` not counted before; returns them.
    pub fn count<'s>(&mut self, scan: &'s Scan) -> Vec<&'s Rejection> {
        self.truncated += u64::from(scan.truncated);
        let mut seen = HashMap::with_capacity(scan.rejected.len());
        let mut new = Vec::new();
        for r in &scan.rejected {
            let now = (r.version, r.reason);
            if self.last.get(&r.file) != Some(&now) {
                *self.totals.entry(r.reason).or_default() += 1;
                new.push(r);
            }
            seen.insert(r.file.clone(), now);
        }
        self.last = seen;
        new
    }

    /// Scans that stopped at [`Limits::max_entries`], since start.
    pub fn scans_truncated(&self) -> u64 {
        self.truncated
    }

    pub fn totals(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        self.totals.iter().map(|(k, &v)| (k.as_str(), v))
    }
}

/// Reads every `gpu-info-<pid>.json` in `dir`.
pub fn scan(
    dir: &Path,
    limits: &Limits,
    processes: &dyn Processes,
    now: SystemTime,
) -> Result<Scan, std::io::Error> {
    let mut out = Scan::default();
    let mut considered = 0;
    for (walked, entry) in std::fs::read_dir(dir)?.enumerate() {
        if walked == limits.max_entries {
            out.truncated = true;
            break;
        }
        let Ok(entry) = entry else { continue };
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(pid_from_name) else {
            continue;
        };
        let reason = if considered == limits.max_files {
            // Past the limit nothing is read; as many refusals are remembered as files read.
            if out.rejected.len() >= 2 * limits.max_files {
                continue;
            }
            Reason::TooManyFiles
        } else {
            considered += 1;
            match read_one(&entry.path(), pid, limits, processes, now) {
                Ok(info) => {
                    out.accepted.push(info);
                    continue;
                }
                Err(reason) => reason,
            }
        };
        // Not following a symlink: the version of the entry itself.
        let version = entry
            .metadata()
            .ok()
            .and_then(|m| Some((m.modified().ok()?, m.len())));
        out.rejected.push(Rejection {
            file: name.to_string_lossy().into_owned(),
            version,
            reason,
        });
    }
    out.accepted.sort_by_key(|i| (i.pid, i.gpu_index));
    Ok(out)
}

/// `gpu-info-<pid>.json` → pid.
pub fn pid_from_name(name: &str) -> Option<u32> {
    let pid = name.strip_prefix("gpu-info-")?.strip_suffix(".json")?;
    (!pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit())).then(|| pid.parse().ok())?
}

fn read_one(
    path: &Path,
    pid: u32,
    limits: &Limits,
    processes: &dyn Processes,
    now: SystemTime,
) -> Result<GpuInfo, Reason> {
    let file = open_untrusted(path)?;
    let meta = file.metadata().map_err(|_| Reason::Unreadable)?;
    if !meta.is_file() {
        return Err(Reason::NotARegularFile);
    }
    if meta.len() > limits.max_bytes {
        return Err(Reason::TooLarge);
    }
    let mut text = Vec::with_capacity(meta.len() as usize);
    file.take(limits.max_bytes + 1)
        .read_to_end(&mut text)
        .map_err(|_| Reason::Unreadable)?;
    if text.len() as u64 > limits.max_bytes {
        return Err(Reason::TooLarge);
    }
    let mut info = schema::parse(&text)?;
    if info.pid != pid {
        return Err(Reason::PidMismatch);
    }
    // The writer, as the agent sees it.
    let writer = match info.start_time_ticks {
        None => pid,
        Some(ticks) => match processes.find(pid, ticks)[..] {
            [one] => one,
            [] => return Err(Reason::NoMatchingProcess),
            _ => return Err(Reason::AmbiguousProcess),
        },
    };
    let (uid, started) = processes
        .owner_and_start(writer)
        .ok_or(Reason::ProcessGone)?;
    if let Some(uid) = uid {
        check_owner(&meta, uid)?;
    }
    let modified = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0.0, |d| d.as_secs_f64());
    if modified + 1.0 < started {
        return Err(Reason::OlderThanProcess);
    }
    info.pid = writer;
    let now = now
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    if info.timestamp + limits.ttl.as_secs_f64() < now
        || info.timestamp > now + limits.ttl.as_secs_f64()
    {
        return Err(Reason::Stale);
    }
    Ok(info)
}

#[cfg(unix)]
fn open_untrusted(path: &Path) -> Result<std::fs::File, Reason> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => Reason::Symlink,
            Some(libc::ENOENT) => Reason::ProcessGone,
            _ => Reason::Unreadable,
        })
}

#[cfg(unix)]
fn check_owner(meta: &std::fs::Metadata, uid: u32) -> Result<(), Reason> {
    use std::os::unix::fs::MetadataExt;
    if meta.uid() == uid {
        Ok(())
    } else {
        Err(Reason::WrongOwner)
    }
}

/// Windows: refuse symlinks and junctions (reparse points) instead of following them.
#[cfg(windows)]
fn open_untrusted(path: &Path) -> Result<std::fs::File, Reason> {
    use std::os::windows::fs::OpenOptionsExt;
    const FILE_FLAG_OPEN_REPARSE_POINT: u32 = 0x0020_0000;
    let meta = std::fs::symlink_metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Reason::ProcessGone,
        _ => Reason::Unreadable,
    })?;
    if meta.file_type().is_symlink() {
        return Err(Reason::Symlink);
    }
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(FILE_FLAG_OPEN_REPARSE_POINT)
        .open(path)
        .map_err(|_| Reason::Unreadable)
}

/// Windows owners are SIDs, not uids: the caller passes none (see [`Processes`]).
#[cfg(windows)]
fn check_owner(_meta: &std::fs::Metadata, _uid: u32) -> Result<(), Reason> {
    Ok(())
}
