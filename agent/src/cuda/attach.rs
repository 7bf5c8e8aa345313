//! Attaching the CUDA probes to library files, once per file, and removing them once no
//! process maps the file any more.
//!
//! A uprobe belongs to a file (inode), not a process: one attachment covers every process
//! that maps that file, now and later. Files are reached through `/proc/<pid>/root/<path>`
//! (the process's own mount namespace: containers and pip-bundled copies work) or, for a
//! deleted or replaced file, `/proc/<pid>/map_files/<range>`. De-duplication is per
//! (mount namespace, path) — not by the inode in maps, which overlayfs copy-up changes — and
//! also per resolved (device, inode), so one file reached two ways is probed once.
//!
//! Each library remembers the processes seen mapping it. When none is alive, it is idle;
//! after `idle_after` idle, and once no tracked process maps it (a fork child inherits
//! mappings without mapping anything), its probes are removed. Pod churn — a new libcudart
//! copy per container image — thus never fills the table; and a full table makes room by
//! removing a library no live process maps, idle or not for long, before it refuses one.

use std::collections::{BTreeMap, HashSet};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agent_common::cuda::{cookie, FUNCTIONS, KIND_LAUNCH};
use aya::programs::uprobe::{
    UProbeAttachLocation, UProbeAttachPoint, UProbeLink, UProbeLinkId, UProbeScope,
};
use aya::programs::{ProgramError, UProbe, UProbeError};
use aya::Ebpf;

use super::library::{api_name, MappedLibrary};
use super::symbols::{Offsets, SymbolCache};

agent_common::label_enum! {
    /// Why a library could not be probed (`reason` of `llmscope_uprobe_attach_failures_total`;
    /// every reason is exported at 0 from start-up, so that `increase()` sees the first).
    pub enum AttachFailure {
        ProcessGone = "process_gone",
        DeletedFile = "deleted_file",
        FileGone = "file_gone",
        Unreadable = "unreadable",
        TooManyLibraries = "too_many_libraries",
        NoCudaSymbols = "no_cuda_symbols",
        AttachError = "attach_error",
        LaunchAttachError = "launch_attach_error",
    }
}

/// Most (mount namespace, path) keys remembered per library file; the first (its name in
/// logs) stays.
const MAX_KEYS: usize = 64;
/// Most processes remembered per library; past it, liveness is confirmed from /proc maps
/// before the library is detached (see [`Attacher::detach_idle`]).
const MAX_USERS: usize = 4096;

/// The two programs a library's links belong to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Program {
    Entry,
    Return,
}

impl Program {
    fn name(self) -> &'static str {
        match self {
            Program::Entry => "cuda_entry",
            Program::Return => "cuda_return",
        }
    }
}

struct Library {
    /// `/proc/self/fd/<n>` of `_file`: the file stays reachable for later attaches (the launch
    /// duty cycle) after the process it was found through has exited or the file was deleted.
    target: PathBuf,
    _file: std::fs::File,
    api: u8,
    /// (device, inode) of the probed file.
    file: (u64, u64),
    /// The (mount namespace, path) keys that resolved to this file.
    keys: Vec<(String, String)>,
    offsets: Offsets,
    /// Launch probes (duty-cycled) while attached.
    launch_links: Vec<UProbeLinkId>,
    /// Entry and return links, attached for the file's lifetime.
    fixed_links: Vec<(Program, UProbeLinkId)>,
    users: HashSet<u32>,
    idle_since: Option<Instant>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Attached { probes: usize },
    AlreadyProbed,
    Failed(AttachFailure),
}

pub struct Attacher {
    ebpf: Ebpf,
    libraries: Vec<Library>,
    max_libraries: usize,
    /// The live tracked processes as of the last idle check: where a fork child that
    /// inherited a mapping is looked for before its library is removed to make room.
    tracked: Vec<u32>,
    /// Links of libraries removed to make room, to drop once the attacher is unlocked.
    evicted: Vec<UProbeLink>,
    symbols: SymbolCache,
    failures: BTreeMap<AttachFailure, u64>,
    detached: u64,
    launches_attached: bool,
    /// Since when the launch probes are attached, and for how long they were before.
    launches_since: Option<Instant>,
    launches_total: Duration,
}

impl Attacher {
    /// Takes the loaded object; `cuda_entry` and `cuda_return` must be loaded already.
    /// The loaded programs, for the other probes that share the object (request telemetry).
    pub fn programs(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    pub fn new(ebpf: Ebpf, launches_attached: bool, max_libraries: usize) -> Self {
        Attacher {
            ebpf,
            libraries: Vec::new(),
            max_libraries: max_libraries.max(1),
            tracked: Vec::new(),
            evicted: Vec::new(),
            symbols: SymbolCache::default(),
            failures: AttachFailure::ALL.iter().map(|&r| (r, 0)).collect(),
            detached: 0,
            launches_attached,
            launches_since: launches_attached.then(Instant::now),
            launches_total: Duration::ZERO,
        }
    }

    /// Probes `lib`, as process `pid` maps it, unless that file is probed already; either
    /// way `pid` counts as a user of the file.
    pub fn attach(&mut self, procfs: &Path, pid: u32, lib: &MappedLibrary) -> Outcome {
        let outcome = self.try_attach(procfs, pid, lib);
        match outcome {
            Outcome::Failed(reason) => {
                *self.failures.entry(reason).or_default() += 1;
                tracing::warn!(event = "uprobe_attach_failed", pid, library = %lib.path.escape_debug(), reason = reason.as_str(), "cannot probe a CUDA library");
            }
            Outcome::Attached { probes } => {
                tracing::info!(pid, library = %lib.path, api = api_name(lib.api), probes, "CUDA library probed");
            }
            Outcome::AlreadyProbed => {}
        }
        outcome
    }

    /// When the file (device, inode) is probed already: notes `pid` as a user and returns
    /// true, so the caller need not read the process's maps.
    pub fn note_user(&mut self, file: (u64, u64), pid: u32) -> bool {
        match self.libraries.iter_mut().find(|l| l.file == file) {
            Some(library) => {
                add_user(library, pid);
                true
            }
            None => false,
        }
    }

    fn try_attach(&mut self, procfs: &Path, pid: u32, lib: &MappedLibrary) -> Outcome {
        let pid_dir = procfs.join(pid.to_string());
        let Ok(mount_ns) = std::fs::read_link(pid_dir.join("ns/mnt")) else {
            return Outcome::Failed(AttachFailure::ProcessGone);
        };
        let key = (mount_ns.to_string_lossy().into_owned(), lib.path.clone());
        if let Some(library) = self.libraries.iter_mut().find(|l| l.keys.contains(&key)) {
            add_user(library, pid);
            return Outcome::AlreadyProbed;
        }
        let target = if lib.deleted {
            if lib.range.is_empty() {
                return Outcome::Failed(AttachFailure::DeletedFile);
            }
            pid_dir.join("map_files").join(&lib.range)
        } else {
            pid_dir.join("root").join(lib.path.trim_start_matches('/'))
        };
        let (file, meta) = match std::fs::File::open(&target).and_then(|f| {
            let meta = f.metadata()?;
            Ok((f, meta))
        }) {
            Ok(opened) => opened,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Outcome::Failed(AttachFailure::FileGone)
            }
            Err(_) => return Outcome::Failed(AttachFailure::Unreadable),
        };
        let opened = file;
        let file = (meta.dev(), meta.ino());
        if let Some(library) = self.libraries.iter_mut().find(|l| l.file == file) {
            // One key per mount namespace mapping a shared file (every pod of a node's
            // libcuda): the oldest go past MAX_KEYS, and are found again by (device, inode).
            if library.keys.len() >= MAX_KEYS {
                library.keys.remove(1);
            }
            library.keys.push(key);
            add_user(library, pid);
            return Outcome::AlreadyProbed;
        }
        if self.libraries.len() >= self.max_libraries && !self.make_room(procfs) {
            return Outcome::Failed(AttachFailure::TooManyLibraries);
        }
        let offsets = match self.symbols.offsets(&target, lib.api) {
            Ok(o) => o,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Outcome::Failed(AttachFailure::FileGone)
            }
            Err(e) => {
                tracing::debug!(error = %e, target = %target.display(), "cannot read the library's symbols");
                return Outcome::Failed(AttachFailure::Unreadable);
            }
        };
        let mut library = Library {
            target: PathBuf::from(format!("/proc/self/fd/{}", opened.as_raw_fd())),
            _file: opened,
            api: lib.api,
            file,
            keys: vec![key],
            offsets,
            launch_links: Vec::new(),
            fixed_links: Vec::new(),
            users: HashSet::from([pid]),
            idle_since: None,
        };
        if let Err(reason) = attach_fixed(&mut self.ebpf, &mut library) {
            // A partial attachment would count some functions and not others: roll back.
            drop(Detached(take_all(&mut self.ebpf, &mut library)));
            return Outcome::Failed(reason);
        }
        if library.fixed_links.is_empty() {
            return Outcome::Failed(AttachFailure::NoCudaSymbols);
        }
        if self.launches_attached {
            let failed = attach_launches(&mut self.ebpf, &mut library);
            self.failures_add(AttachFailure::LaunchAttachError, failed);
        }
        let probes = library.fixed_links.len() + library.launch_links.len();
        self.libraries.push(library);
        Outcome::Attached { probes }
    }

    /// Removes the library idle the longest that no live process maps (its remembered users
    /// gone, and in no tracked process's maps); false when every library is in use.
    fn make_room(&mut self, procfs: &Path) -> bool {
        let mut idle: Vec<usize> = Vec::new();
        for (i, library) in self.libraries.iter_mut().enumerate() {
            library
                .users
                .retain(|pid| procfs.join(pid.to_string()).exists());
            if library.users.is_empty() {
                idle.push(i);
            }
        }
        if idle.is_empty() {
            return false;
        }
        let mapped = mapped_files(procfs, &self.tracked);
        let Some(i) = idle
            .into_iter()
            .filter(|&i| !mapped.contains(&self.libraries[i].file))
            .min_by_key(|&i| self.libraries[i].idle_since.unwrap_or_else(Instant::now))
        else {
            return false;
        };
        let mut library = self.libraries.swap_remove(i);
        self.evicted.extend(take_all(&mut self.ebpf, &mut library));
        tracing::info!(library = %library.keys[0].1.escape_debug(), "CUDA library table full: probes removed from a library no live process maps");
        self.detached += 1;
        true
    }

    /// Links of libraries removed to make room, to drop once the attacher is unlocked.
    pub fn take_evicted(&mut self) -> Detached {
        Detached(std::mem::take(&mut self.evicted))
    }

    /// Forgets users that are gone and detaches every library that has been idle for
    /// `idle_after` and that no process in `candidates` (the tracked ones) maps. The links
    /// come back to be dropped once the attacher is unlocked (see [`Detached`]).
    pub fn detach_idle(
        &mut self,
        procfs: &Path,
        candidates: &[u32],
        now: Instant,
        idle_after: Duration,
    ) -> Detached {
        let mut detached = self.take_evicted();
        self.tracked = candidates.to_vec();
        let mut i = 0;
        while i < self.libraries.len() {
            let library = &mut self.libraries[i];
            library
                .users
                .retain(|pid| procfs.join(pid.to_string()).exists());
            if !library.users.is_empty() {
                library.idle_since = None;
                i += 1;
                continue;
            }
            let since = *library.idle_since.get_or_insert(now);
            if now.duration_since(since) < idle_after {
                i += 1;
                continue;
            }
            // The remembered users are gone; a child that inherited the mapping by fork, or
            // a process past MAX_USERS, is found in the maps of the tracked processes.
            let users = mapping_processes(procfs, candidates, library.file);
            if !users.is_empty() {
                library.users.extend(users.into_iter().take(MAX_USERS));
                library.idle_since = None;
                i += 1;
                continue;
            }
            let mut library = self.libraries.swap_remove(i);
            detached.0.extend(take_all(&mut self.ebpf, &mut library));
            tracing::info!(library = %library.keys[0].1, "CUDA library no longer mapped: probes removed");
            self.detached += 1;
        }
        detached
    }

    /// Attaches (true) or detaches (false) the kernel-launch probes of every library. The
    /// links to detach come back to be dropped once the attacher is unlocked.
    pub fn set_launches(&mut self, attached: bool) -> Detached {
        let mut detached = Detached(Vec::new());
        if attached == self.launches_attached {
            return detached;
        }
        self.launches_attached = attached;
        if attached {
            self.launches_since = Some(Instant::now());
            let mut failed = 0;
            for library in &mut self.libraries {
                failed += attach_launches(&mut self.ebpf, library);
            }
            self.failures_add(AttachFailure::LaunchAttachError, failed);
        } else {
            let program = uprobe(&mut self.ebpf, Program::Entry);
            detached.0 = self
                .libraries
                .iter_mut()
                .flat_map(|l| l.launch_links.drain(..))
                .filter_map(|link| program.take_link(link).ok())
                .collect();
            if let Some(since) = self.launches_since.take() {
                self.launches_total += since.elapsed();
            }
        }
        detached
    }

    /// What a scrape shows of the attacher.
    pub fn stats(&self) -> AttacherStats {
        AttacherStats {
            probes: self
                .libraries
                .iter()
                .map(|l| l.fixed_links.len() + l.launch_links.len())
                .sum(),
            libraries: ["runtime", "driver"]
                .into_iter()
                .map(|api| {
                    let n = self
                        .libraries
                        .iter()
                        .filter(|l| api_name(l.api) == api)
                        .count();
                    (api, n)
                })
                .collect(),
            failures: self.failures.clone(),
            detached: self.detached,
            launches_total: self.launches_total,
            launches_since: self.launches_since,
        }
    }
}

/// The attacher's state as a scrape shows it: published after every change, so a scrape
/// never waits for an attach in progress (which can wait for the kernel's detaches).
#[derive(Debug, Clone, Default)]
pub struct AttacherStats {
    /// Uprobe links attached.
    pub probes: usize,
    /// Library files probed, by API.
    pub libraries: Vec<(&'static str, usize)>,
    /// Libraries that could not be probed, by reason.
    pub failures: BTreeMap<AttachFailure, u64>,
    /// Libraries detached because no process mapped them any more, since start.
    pub detached: u64,
    launches_total: Duration,
    launches_since: Option<Instant>,
}

impl AttacherStats {
    /// Time the launch probes have been attached since start: the time-weighted duty over
    /// any span is the increase of this over the span's length.
    pub fn launches_attached_seconds(&self) -> f64 {
        (self.launches_total + self.launches_since.map_or(Duration::ZERO, |s| s.elapsed()))
            .as_secs_f64()
    }
}

impl Attacher {
    fn failures_add(&mut self, reason: AttachFailure, n: u64) {
        if n > 0 {
            *self.failures.entry(reason).or_default() += n;
        }
    }
}

fn add_user(library: &mut Library, pid: u32) {
    library.idle_since = None;
    if library.users.len() < MAX_USERS {
        library.users.insert(pid);
    }
}

/// Most bytes of one process's maps read when looking for a file (a large PyTorch process
/// has ~1 MiB of them); past it the rest is not looked at.
const MAPS_LIMIT: u64 = 16 << 20;

/// The (device, inode) of every file one of `pids` maps.
fn mapped_files(procfs: &Path, pids: &[u32]) -> HashSet<(u64, u64)> {
    let mut files = HashSet::new();
    for pid in pids {
        each_mapped_file(procfs, *pid, |file| {
            files.insert(file);
            false
        });
    }
    files
}

/// The processes among `pids` whose maps show the file (device, inode).
fn mapping_processes(procfs: &Path, pids: &[u32], file: (u64, u64)) -> Vec<u32> {
    pids.iter()
        .copied()
        .filter(|&pid| each_mapped_file(procfs, pid, |f| f == file))
        .collect()
}

/// Calls `found` with the (device, inode) of each file mapping of `pid`, reading its maps a
/// line at a time (bounded by [`MAPS_LIMIT`]), until `found` returns true; true then.
fn each_mapped_file(procfs: &Path, pid: u32, mut found: impl FnMut((u64, u64)) -> bool) -> bool {
    use std::io::BufRead;
    let Ok(maps) = std::fs::File::open(procfs.join(pid.to_string()).join("maps")) else {
        return false;
    };
    let mut reader = std::io::BufReader::new(std::io::Read::take(maps, MAPS_LIMIT));
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return false,
            Ok(_) => {}
        }
        let mut fields = line
            .split(u8::is_ascii_whitespace)
            .filter(|f| !f.is_empty())
            .skip(3);
        let (Some(device), Some(inode)) = (fields.next(), fields.next()) else {
            continue;
        };
        let Some(file) = parse_device_inode(device, inode) else {
            continue;
        };
        if file.1 != 0 && found(file) {
            return true;
        }
    }
}

/// maps' `major:minor` (hex) and inode (decimal) fields as (device, inode).
fn parse_device_inode(device: &[u8], inode: &[u8]) -> Option<(u64, u64)> {
    let device = std::str::from_utf8(device).ok()?;
    let (major, minor) = device.split_once(':')?;
    let major = u32::from_str_radix(major, 16).ok()?;
    let minor = u32::from_str_radix(minor, 16).ok()?;
    let inode = std::str::from_utf8(inode).ok()?.parse().ok()?;
    Some((libc::makedev(major, minor), inode))
}

fn uprobe(ebpf: &mut Ebpf, program: Program) -> &mut UProbe {
    ebpf.program_mut(program.name())
        .and_then(|p| p.try_into().ok())
        .expect("the CUDA programs are loaded with the object")
}

/// Entry (and, where the table says so, return) probes on every non-launch function the file
/// defines. An error leaves what was attached in `library` for the caller to roll back.
fn attach_fixed(ebpf: &mut Ebpf, library: &mut Library) -> Result<(), AttachFailure> {
    let offsets = library.offsets.clone();
    for &(id, offset) in offsets.iter() {
        let f = &FUNCTIONS[id as usize];
        if f.kind == KIND_LAUNCH {
            continue;
        }
        let link = attach_one(ebpf, Program::Entry, &library.target, id, offset)?;
        library.fixed_links.push((Program::Entry, link));
        if f.returns {
            let link = attach_one(ebpf, Program::Return, &library.target, id, offset)?;
            library.fixed_links.push((Program::Return, link));
        }
    }
    Ok(())
}

/// Every link of `library`, taken out of the programs: dropping them detaches them.
fn take_all(ebpf: &mut Ebpf, library: &mut Library) -> Vec<UProbeLink> {
    let mut links = Vec::new();
    for (program, link) in library.fixed_links.drain(..) {
        links.extend(uprobe(ebpf, program).take_link(link).ok());
    }
    let program = uprobe(ebpf, Program::Entry);
    links.extend(
        library
            .launch_links
            .drain(..)
            .filter_map(|link| program.take_link(link).ok()),
    );
    links
}

/// Uprobe links taken out of the attacher; dropping this detaches them. Drop it after
/// unlocking the attacher: each perf-event uprobe detach waits for an RCU tasks-trace grace
/// period (~25 ms here; 34 ms reported in DataDog/datadog-agent #55730) while holding the
/// kernel's trace-event mutex — so detaches go one at a time whatever the threads, and every
/// uprobe attach on the machine waits for the one in flight.
#[must_use = "dropping it detaches the probes; drop it once the attacher is unlocked"]
pub struct Detached(Vec<UProbeLink>);

impl Detached {
    /// The links, to drop one at a time between other work.
    pub fn into_links(self) -> Vec<UProbeLink> {
        self.0
    }
}

/// Attaches the launch probes of `library`; returns how many failed (counted by the caller).
fn attach_launches(ebpf: &mut Ebpf, library: &mut Library) -> u64 {
    let offsets = library.offsets.clone();
    let mut failed = 0;
    for &(id, offset) in offsets.iter() {
        if FUNCTIONS[id as usize].kind != KIND_LAUNCH {
            continue;
        }
        match attach_one(ebpf, Program::Entry, &library.target, id, offset) {
            Ok(link) => library.launch_links.push(link),
            Err(_) => failed += 1,
        }
    }
    failed
}

/// Attaches `program` at function `id`, at `offset` in `target` (resolved by [`SymbolCache`]).
fn attach_one(
    ebpf: &mut Ebpf,
    program: Program,
    target: &Path,
    id: u8,
    offset: u64,
) -> Result<UProbeLinkId, AttachFailure> {
    let point = UProbeAttachPoint {
        location: UProbeAttachLocation::AbsoluteOffset(offset),
        cookie: Some(cookie(id)),
    };
    match uprobe(ebpf, program).attach(point, target, UProbeScope::AllProcesses) {
        Ok(link) => Ok(link),
        Err(ProgramError::UProbeError(UProbeError::FileError { .. })) => {
            Err(AttachFailure::FileGone)
        }
        Err(e) => {
            tracing::debug!(error = %e, target = %target.display(), "uprobe attach failed");
            Err(AttachFailure::AttachError)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_files_a_process_maps_by_device_and_inode() {
        let exe = std::fs::metadata(std::env::current_exe().unwrap()).unwrap();
        let me = std::process::id();
        let procfs = Path::new("/proc");
        let file = (exe.dev(), exe.ino());
        assert_eq!(mapping_processes(procfs, &[me, u32::MAX], file), vec![me]);
        assert!(mapped_files(procfs, &[me]).contains(&file));
        assert!(mapping_processes(procfs, &[me], (file.0, u64::MAX)).is_empty());
        assert_eq!(
            parse_device_inode(b"fd:01", b"42"),
            Some((libc::makedev(0xfd, 1), 42))
        );
        assert_eq!(parse_device_inode(b"fd01", b"42"), None);
        assert_eq!(parse_device_inode(b"fd:01", b"x"), None);
    }
}
