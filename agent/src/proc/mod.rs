//! Everything the agent reads from /proc, through a configurable root (`--path.procfs`), so a
//! DaemonSet reads the host's /proc at /host/proc and tests read fixture trees.
//!
//! Every read is bounded (a 1 MiB command line costs at most [`CMDLINE_LIMIT`] bytes) and a
//! process that exits mid-read is an ordinary `Gone` error, never a panic.

pub(crate) mod parse;

pub use parse::{parse_cmdline, parse_environ_selected, parse_ns_pid, shared_objects};

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use crate::identity::{ProcessFacts, MODEL_ENV_VARS};

/// Bytes of /proc/<pid>/cmdline read at most.
pub const CMDLINE_LIMIT: usize = 64 * 1024;
/// Bytes of /proc/<pid>/environ read at most.
pub const ENVIRON_LIMIT: usize = 64 * 1024;
/// Bytes of /proc/<pid>/maps read at most (a large Python process has ~3,000 lines).
pub const MAPS_LIMIT: usize = 1024 * 1024;
/// Most bytes of `/proc/<pid>/cgroup` read (a line per hierarchy).
pub const CGROUP_LIMIT: usize = 16 * 1024;
/// `/proc/<pid>/stat` is one line of 52 numbers and a 15-byte comm: well under this.
pub const STAT_LIMIT: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error("process {0} is gone")]
    Gone(u32),
    #[error("reading {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("parsing {path}: {reason}")]
    Parse { path: PathBuf, reason: String },
}

/// One reading of a process's resource use.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcSample {
    pub ppid: u32,
    /// Start time in clock ticks since boot: with the pid, identifies a process across pid reuse.
    pub start_ticks: u64,
    /// user + system CPU time, in clock ticks.
    pub cpu_ticks: u64,
    pub rss_bytes: u64,
    pub threads: u64,
}

#[derive(Debug, Clone)]
pub struct ProcRoot {
    root: PathBuf,
    pub ticks_per_second: u64,
    page_size: u64,
    /// Boot time, seconds since the epoch (`btime` in <root>/stat).
    pub boot_time_seconds: u64,
}

impl ProcRoot {
    pub fn new(root: impl Into<PathBuf>) -> Result<Self, ProcError> {
        let root = root.into();
        let stat_path = root.join("stat");
        let stat = std::fs::read_to_string(&stat_path).map_err(|source| ProcError::Io {
            path: stat_path.clone(),
            source,
        })?;
        let boot_time_seconds = parse::boot_time(&stat).ok_or_else(|| ProcError::Parse {
            path: stat_path,
            reason: "no btime line".into(),
        })?;
        Ok(ProcRoot {
            root,
            ticks_per_second: procfs::ticks_per_second(),
            page_size: procfs::page_size(),
            boot_time_seconds,
        })
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    fn pid_path(&self, pid: u32, file: &str) -> PathBuf {
        self.root.join(pid.to_string()).join(file)
    }

    /// Every numeric entry of the proc root.
    pub fn pids(&self) -> Result<Vec<u32>, ProcError> {
        let entries = std::fs::read_dir(&self.root).map_err(|source| ProcError::Io {
            path: self.root.clone(),
            source,
        })?;
        Ok(entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect())
    }

    pub fn sample(&self, pid: u32) -> Result<ProcSample, ProcError> {
        let (raw, longer) = self.read_bounded(pid, "stat", STAT_LIMIT)?;
        let stat = (!longer)
            .then(|| parse::stat(&raw))
            .flatten()
            .ok_or_else(|| ProcError::Parse {
                path: self.pid_path(pid, "stat"),
                reason: "not a stat line".into(),
            })?;
        Ok(ProcSample {
            ppid: stat.ppid.max(0) as u32,
            start_ticks: stat.starttime,
            cpu_ticks: stat.utime + stat.stime,
            rss_bytes: stat.rss * self.page_size,
            threads: stat.num_threads.max(0) as u64,
        })
    }

    /// The facts classification needs, read from /proc: comm, exe, bounded argv, parent —
    /// with the resource sample read on the way. The environment and the mapped libraries are
    /// read separately ([`ProcRoot::model_env`], [`ProcRoot::libraries`]) and only when needed.
    pub fn facts(&self, pid: u32) -> Result<(ProcessFacts, ProcSample), ProcError> {
        let (cmdline, _) = self.read_bounded(pid, "cmdline", CMDLINE_LIMIT)?;
        let sample = self.sample(pid)?;
        let comm = self
            .read_bounded(pid, "comm", 64)
            .map(|(b, _)| String::from_utf8_lossy(&b).trim_end().to_owned())
            .unwrap_or_default();
        let exe = std::fs::read_link(self.pid_path(pid, "exe"))
            .map(|p| {
                p.to_string_lossy()
                    .trim_end_matches(" (deleted)")
                    .to_owned()
            })
            .unwrap_or_default();
        let facts = ProcessFacts {
            pid,
            ppid: sample.ppid,
            comm,
            exe,
            argv: parse_cmdline(&cmdline),
            env: Vec::new(),
            libraries: Vec::new(),
        };
        Ok((facts, sample))
    }

    /// The full command line, up to [`CMDLINE_LIMIT`] bytes.
    pub fn cmdline(&self, pid: u32) -> Result<Vec<String>, ProcError> {
        Ok(parse_cmdline(
            &self.read_bounded(pid, "cmdline", CMDLINE_LIMIT)?.0,
        ))
    }

    /// Only the variables of [`MODEL_ENV_VARS`] and `extra` (those user rules match on);
    /// nothing else leaves this function.
    pub fn model_env(
        &self,
        pid: u32,
        extra: &[String],
    ) -> Result<Vec<(String, String)>, ProcError> {
        let (environ, _) = self.read_bounded(pid, "environ", ENVIRON_LIMIT)?;
        let wanted: Vec<&str> = MODEL_ENV_VARS
            .iter()
            .copied()
            .chain(extra.iter().map(String::as_str))
            .collect();
        Ok(parse_environ_selected(&environ, &wanted))
    }

    /// The raw maps file, up to [`MAPS_LIMIT`] bytes.
    pub fn maps(&self, pid: u32) -> Result<Vec<u8>, ProcError> {
        Ok(self.read_bounded(pid, "maps", MAPS_LIMIT)?.0)
    }

    /// Paths of the shared objects the process maps.
    pub fn libraries(&self, pid: u32) -> Result<Vec<String>, ProcError> {
        let (maps, _) = self.read_bounded(pid, "maps", MAPS_LIMIT)?;
        Ok(shared_objects(&maps))
    }

    /// The container the process runs in, from its cgroup paths (None: not in one).
    pub fn container(&self, pid: u32) -> Result<Option<crate::identity::ContainerRef>, ProcError> {
        let (cgroup, _) = self.read_bounded(pid, "cgroup", CGROUP_LIMIT)?;
        Ok(crate::identity::container_from_cgroup(
            &String::from_utf8_lossy(&cgroup),
        ))
    }

    /// The process's pid in its own (innermost) PID namespace: the last `NSpid` entry of
    /// its status (the pid itself when it is in ours).
    pub fn ns_pid(&self, pid: u32) -> Result<u32, ProcError> {
        let (status, _) = self.read_bounded(pid, "status", 16 * 1024)?;
        parse_ns_pid(&String::from_utf8_lossy(&status)).ok_or_else(|| ProcError::Parse {
            path: self.pid_path(pid, "status"),
            reason: "no NSpid line".into(),
        })
    }

    pub fn start_ticks(&self, pid: u32) -> Result<u64, ProcError> {
        Ok(self.sample(pid)?.start_ticks)
    }

    /// Reads at most `limit` bytes; the flag says whether the file was longer.
    fn read_bounded(
        &self,
        pid: u32,
        file: &str,
        limit: usize,
    ) -> Result<(Vec<u8>, bool), ProcError> {
        let path = self.pid_path(pid, file);
        let gone_or_io = |source: io::Error| match source.kind() {
            // ESRCH: the process exited between open and read.
            io::ErrorKind::NotFound => ProcError::Gone(pid),
            _ if source.raw_os_error() == Some(libc::ESRCH) => ProcError::Gone(pid),
            _ => ProcError::Io {
                path: path.clone(),
                source,
            },
        };
        let file = File::open(&path).map_err(gone_or_io)?;
        let mut buf = Vec::with_capacity(limit.min(4096));
        file.take(limit as u64 + 1)
            .read_to_end(&mut buf)
            .map_err(gone_or_io)?;
        let truncated = buf.len() > limit;
        buf.truncate(limit);
        Ok((buf, truncated))
    }
}

#[cfg(test)]
mod tests;
