//! Attaching the CUDA probes to library files, once per file.
//!
//! A uprobe belongs to a file (inode), not a process: one attachment covers every process
//! that maps that file, now and later. Files are reached through `/proc/<pid>/root/<path>`
//! (the process's own mount namespace: containers and pip-bundled copies work) or, for a
//! deleted or replaced file, `/proc/<pid>/map_files/<range>`. De-duplication is per
//! (mount namespace, path) — not by the inode in maps, which overlayfs copy-up changes — and
//! also per resolved (device, inode), so one file reached two ways is probed once.

use std::collections::{BTreeMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use agent_common::cuda::{cookie, FUNCTIONS, KIND_LAUNCH};
use aya::programs::uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLinkId, UProbeScope};
use aya::programs::{ProgramError, UProbe, UProbeError};
use aya::Ebpf;

use super::library::{api_name, MappedLibrary};

/// Most library files probed at once; more are refused and counted (`too_many_libraries`).
pub const MAX_LIBRARIES: usize = 256;

struct Library {
    target: PathBuf,
    api: u8,
    /// Launch probes (duty-cycled): (function id, link) while attached.
    launch_links: Vec<(u8, UProbeLinkId)>,
    /// Count of the other links (entry and return), attached for the file's lifetime.
    fixed_links: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Attached { probes: usize },
    AlreadyProbed,
    Failed(&'static str),
}

pub struct Attacher {
    ebpf: Ebpf,
    libraries: Vec<Library>,
    keys: HashSet<(String, String)>,
    inodes: HashSet<(u64, u64)>,
    failures: BTreeMap<&'static str, u64>,
    launches_attached: bool,
}

impl Attacher {
    /// Takes the loaded object; `cuda_entry` and `cuda_return` must be loaded already.
    pub fn new(ebpf: Ebpf, launches_attached: bool) -> Self {
        Attacher {
            ebpf,
            libraries: Vec::new(),
            keys: HashSet::new(),
            inodes: HashSet::new(),
            failures: BTreeMap::new(),
            launches_attached,
        }
    }

    /// Probes `lib`, as process `pid` maps it, unless that file is probed already.
    pub fn attach(&mut self, procfs: &Path, pid: u32, lib: &MappedLibrary) -> Outcome {
        let outcome = self.try_attach(procfs, pid, lib);
        match outcome {
            Outcome::Failed(reason) => {
                *self.failures.entry(reason).or_default() += 1;
                tracing::warn!(pid, library = %lib.path, reason, "cannot probe a CUDA library");
            }
            Outcome::Attached { probes } => {
                tracing::info!(pid, library = %lib.path, api = api_name(lib.api), probes, "CUDA library probed")
            }
            Outcome::AlreadyProbed => {}
        }
        outcome
    }

    fn try_attach(&mut self, procfs: &Path, pid: u32, lib: &MappedLibrary) -> Outcome {
        let pid_dir = procfs.join(pid.to_string());
        let Ok(mount_ns) = std::fs::read_link(pid_dir.join("ns/mnt")) else {
            return Outcome::Failed("process_gone");
        };
        let key = (mount_ns.to_string_lossy().into_owned(), lib.path.clone());
        if self.keys.contains(&key) {
            return Outcome::AlreadyProbed;
        }
        let target = if lib.deleted {
            if lib.range.is_empty() {
                return Outcome::Failed("deleted_file");
            }
            pid_dir.join("map_files").join(&lib.range)
        } else {
            pid_dir.join("root").join(lib.path.trim_start_matches('/'))
        };
        let meta = match std::fs::metadata(&target) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Outcome::Failed("file_gone")
            }
            Err(_) => return Outcome::Failed("unreadable"),
        };
        if !self.inodes.insert((meta.dev(), meta.ino())) {
            self.keys.insert(key);
            return Outcome::AlreadyProbed;
        }
        if self.libraries.len() >= MAX_LIBRARIES {
            return Outcome::Failed("too_many_libraries");
        }
        let mut library = Library {
            target,
            api: lib.api,
            launch_links: Vec::new(),
            fixed_links: 0,
        };
        for (id, f) in FUNCTIONS
            .iter()
            .enumerate()
            .filter(|(_, f)| f.api == lib.api)
        {
            if f.kind == KIND_LAUNCH {
                continue;
            }
            match attach_one(&mut self.ebpf, "cuda_entry", &library.target, id as u8) {
                Ok(Some(_)) => library.fixed_links += 1,
                Ok(None) => continue,
                Err(reason) => return Outcome::Failed(reason),
            }
            if f.returns {
                match attach_one(&mut self.ebpf, "cuda_return", &library.target, id as u8) {
                    Ok(Some(_)) => library.fixed_links += 1,
                    Ok(None) => {}
                    Err(reason) => return Outcome::Failed(reason),
                }
            }
        }
        if library.fixed_links == 0 {
            return Outcome::Failed("no_cuda_symbols");
        }
        if self.launches_attached {
            attach_launches(&mut self.ebpf, &mut library);
        }
        let probes = library.fixed_links + library.launch_links.len();
        self.keys.insert(key);
        self.libraries.push(library);
        Outcome::Attached { probes }
    }

    /// Attaches (true) or detaches (false) the kernel-launch probes of every library.
    pub fn set_launches(&mut self, attached: bool) {
        if attached == self.launches_attached {
            return;
        }
        self.launches_attached = attached;
        for library in &mut self.libraries {
            if attached {
                attach_launches(&mut self.ebpf, library);
            } else {
                let program = uprobe(&mut self.ebpf, "cuda_entry");
                for (_, link) in library.launch_links.drain(..) {
                    let _ = program.detach(link);
                }
            }
        }
    }

    /// Uprobe links attached now.
    pub fn probes(&self) -> usize {
        self.libraries
            .iter()
            .map(|l| l.fixed_links + l.launch_links.len())
            .sum()
    }

    /// Library files probed, by API.
    pub fn libraries(&self) -> Vec<(&'static str, usize)> {
        ["runtime", "driver"]
            .into_iter()
            .map(|api| {
                (
                    api,
                    self.libraries
                        .iter()
                        .filter(|l| api_name(l.api) == api)
                        .count(),
                )
            })
            .collect()
    }

    pub fn failures(&self) -> &BTreeMap<&'static str, u64> {
        &self.failures
    }
}

fn uprobe<'e>(ebpf: &'e mut Ebpf, name: &str) -> &'e mut UProbe {
    ebpf.program_mut(name)
        .and_then(|p| p.try_into().ok())
        .expect("the CUDA programs are loaded with the object")
}

fn attach_launches(ebpf: &mut Ebpf, library: &mut Library) {
    for (id, _) in FUNCTIONS
        .iter()
        .enumerate()
        .filter(|(_, f)| f.api == library.api && f.kind == KIND_LAUNCH)
    {
        if let Ok(Some(link)) = attach_one(ebpf, "cuda_entry", &library.target, id as u8) {
            library.launch_links.push((id as u8, link));
        }
    }
}

/// Attaches `program` at function `id` of `target`. Ok(None): the library has no such symbol
/// (an older or newer CUDA version) — normal, not a failure.
fn attach_one(
    ebpf: &mut Ebpf,
    program: &str,
    target: &Path,
    id: u8,
) -> Result<Option<UProbeLinkId>, &'static str> {
    let point = UProbeAttachPoint {
        location: UProbeAttachLocation::Symbol(FUNCTIONS[id as usize].name),
        cookie: Some(cookie(id)),
    };
    match uprobe(ebpf, program).attach(point, target, UProbeScope::AllProcesses) {
        Ok(link) => Ok(Some(link)),
        Err(ProgramError::UProbeError(UProbeError::SymbolError { .. })) => Ok(None),
        Err(ProgramError::UProbeError(UProbeError::FileError { .. })) => Err("file_gone"),
        Err(e) => {
            tracing::debug!(error = %e, target = %target.display(), "uprobe attach failed");
            Err("attach_error")
        }
    }
}
