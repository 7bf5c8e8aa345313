//! File offsets of the probed functions in a library file, resolved once per file.
//!
//! aya resolves a symbol by mapping and parsing the whole ELF file for every attach; a CUDA
//! library takes ~50 attaches (entry and return probes), and the launch duty cycle re-attaches
//! its launch probes every period. Here each file is parsed once, every wanted name is looked
//! up in one pass over its symbol tables, and the result is cached by file identity.
//!
//! The file is read, never mapped: any local user can make a process map a file named
//! `libcudart.so*` and truncate it while the agent parses it. A mapping would then fault
//! the agent (SIGBUS); a read just comes up short, and the library is refused as unreadable.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use agent_common::cuda::FUNCTIONS;
use object::read::ReadCache;
use object::{Object, ObjectSection, ObjectSymbol};

/// Most files remembered; past it the cache starts over (files are few: one per CUDA copy).
const CAPACITY: usize = 512;

/// Function id → file offset, for the functions of one API the file defines.
pub type Offsets = Arc<Vec<(u8, u64)>>;

/// (device, inode, size, mtime): a file replaced in place is parsed again.
type FileId = (u64, u64, u64, i64);

#[derive(Default)]
pub struct SymbolCache {
    files: HashMap<FileId, Offsets>,
}

impl SymbolCache {
    /// The offsets of `api`'s functions in `path`; parses the file the first time only.
    pub fn offsets(&mut self, path: &Path, api: u8) -> std::io::Result<Offsets> {
        let file = std::fs::File::open(path)?;
        let meta = file.metadata()?;
        let id = (meta.dev(), meta.ino(), meta.size(), meta.mtime());
        if let Some(found) = self.files.get(&id) {
            return Ok(found.clone());
        }
        let offsets = Arc::new(resolve(&file, api)?);
        if self.files.len() >= CAPACITY {
            self.files.clear();
        }
        self.files.insert(id, offsets.clone());
        Ok(offsets)
    }
}

/// Reads only what it needs (headers, symbol and string tables: a few hundred KiB of a
/// libcuda of tens of MiB), through positioned reads that a truncation can only cut short.
pub(crate) fn resolve<R: std::io::Read + std::io::Seek>(
    file: R,
    api: u8,
) -> std::io::Result<Vec<(u8, u64)>> {
    let wanted: HashMap<&str, u8> = FUNCTIONS
        .iter()
        .enumerate()
        .filter(|(_, f)| f.api == api)
        .map(|(id, f)| (f.name, id as u8))
        .collect();
    find(file, &wanted)
}

/// The file offsets of the functions `names` (by their index there) that `file` defines.
pub(crate) fn resolve_names<R: std::io::Read + std::io::Seek>(
    file: R,
    names: &[&str],
) -> std::io::Result<Vec<(u8, u64)>> {
    let wanted: HashMap<&str, u8> = names
        .iter()
        .enumerate()
        .map(|(i, &n)| (n, i as u8))
        .collect();
    find(file, &wanted)
}

fn find<R: std::io::Read + std::io::Seek>(
    file: R,
    wanted: &HashMap<&str, u8>,
) -> std::io::Result<Vec<(u8, u64)>> {
    let cache = ReadCache::new(file);
    let obj = object::File::parse(&cache).map_err(invalid)?;
    let mut found: HashMap<u8, u64> = HashMap::new();
    // Dynamic symbols first (what a stripped library keeps), as aya does.
    for sym in obj.dynamic_symbols().chain(obj.symbols()) {
        let Some(&id) = sym.name().ok().and_then(|n| wanted.get(n)) else {
            continue;
        };
        if found.contains_key(&id) || sym.address() == 0 {
            continue;
        }
        if let Some(offset) = file_offset(&obj, &sym) {
            found.insert(id, offset);
        }
    }
    let mut offsets: Vec<(u8, u64)> = found.into_iter().collect();
    offsets.sort_unstable();
    Ok(offsets)
}

/// A symbol's virtual address as a file offset (what the kernel's uprobe API takes).
fn file_offset<'data, R: object::ReadRef<'data>>(
    obj: &object::File<'data, R>,
    sym: &object::Symbol<'data, '_, R>,
) -> Option<u64> {
    let section = obj.section_by_index(sym.section_index()?).ok()?;
    let (offset, _) = section.file_range()?;
    sym.address()
        .checked_sub(section.address())?
        .checked_add(offset)
}

fn invalid(e: object::Error) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_common::cuda::API_RUNTIME;

    #[test]
    fn garbage_and_empty_files_are_errors_not_panics() {
        let dir = std::env::temp_dir().join(format!("llmscope-symbols-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.so");
        std::fs::write(&empty, b"").unwrap();
        let garbage = dir.join("garbage.so");
        std::fs::write(&garbage, b"\x7fELF not really").unwrap();
        let mut cache = SymbolCache::default();
        assert!(cache.offsets(&empty, API_RUNTIME).is_err());
        assert!(cache.offsets(&garbage, API_RUNTIME).is_err());
        assert!(cache.offsets(&dir.join("missing.so"), API_RUNTIME).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_truncated_after_it_was_opened_is_an_error_not_a_fault() {
        // What an attacker does to a library the agent is about to parse: the size the agent
        // saw is gone by the time it reads. A mapping of the old size faults (SIGBUS) on the
        // first page past the new end; reads come up short.
        let exe = std::env::current_exe().unwrap();
        let dir = std::env::temp_dir().join(format!("llmscope-truncate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let copy = dir.join("libcudart.so.12");
        std::fs::copy(&exe, &copy).unwrap();
        for keep in [0, 4096, 64 * 1024] {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&copy)
                .unwrap();
            assert!(resolve(&file, API_RUNTIME).is_ok(), "whole, it parses");
            file.set_len(keep).unwrap();
            assert!(
                resolve(&file, API_RUNTIME).is_err(),
                "truncated to {keep} bytes while opened"
            );
            std::fs::copy(&exe, &copy).unwrap();
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn resolves_this_test_binary_s_libc_functions_like_aya() {
        // No CUDA library here: resolve a function every test binary maps, through the
        // same translation, and compare with what the ELF says by hand.
        let libc = std::fs::read_to_string("/proc/self/maps")
            .unwrap()
            .lines()
            .find_map(|l| {
                l.split_whitespace()
                    .nth(5)
                    .filter(|p| p.contains("/libc.so"))
                    .map(str::to_owned)
            })
            .expect("libc is mapped");
        let file = std::fs::File::open(&libc).unwrap();
        let size = file.metadata().unwrap().size();
        let cache = ReadCache::new(&file);
        let obj = object::File::parse(&cache).unwrap();
        let sym = obj
            .dynamic_symbols()
            .find(|s| s.name() == Ok("malloc"))
            .unwrap();
        let offset = file_offset(&obj, &sym).unwrap();
        assert!(offset > 0 && offset < size);
        // Text is mapped at its file offset modulo the page: the offset lies in an
        // executable segment of the file.
        assert!(obj.segments().any(|seg| {
            let (start, len) = object::ObjectSegment::file_range(&seg);
            (start..start + len).contains(&offset)
        }));
    }
}
