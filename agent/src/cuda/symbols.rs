//! File offsets of the probed functions in a library file, resolved once per file.
//!
//! aya resolves a symbol by mapping and parsing the whole ELF file for every attach; a CUDA
//! library takes ~50 attaches (entry and return probes), and the launch duty cycle re-attaches
//! its launch probes every period. Here each file is parsed once, every wanted name is looked
//! up in one pass over its symbol tables, and the result is cached by file identity.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use agent_common::cuda::FUNCTIONS;
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
        let offsets = Arc::new(resolve(&file, meta.size(), api)?);
        if self.files.len() >= CAPACITY {
            self.files.clear();
        }
        self.files.insert(id, offsets.clone());
        Ok(offsets)
    }
}

fn resolve(file: &std::fs::File, size: u64, api: u8) -> std::io::Result<Vec<(u8, u64)>> {
    let map = ReadOnlyMap::new(file, size)?;
    let obj = object::File::parse(map.bytes()).map_err(invalid)?;
    let wanted: HashMap<&str, u8> = FUNCTIONS
        .iter()
        .enumerate()
        .filter(|(_, f)| f.api == api)
        .map(|(id, f)| (f.name, id as u8))
        .collect();
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
fn file_offset(obj: &object::File, sym: &object::Symbol) -> Option<u64> {
    let section = obj.section_by_index(sym.section_index()?).ok()?;
    let (offset, _) = section.file_range()?;
    sym.address()
        .checked_sub(section.address())?
        .checked_add(offset)
}

fn invalid(e: object::Error) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
}

/// A private read-only mapping of a whole file (libcuda is tens of MB: never read into memory).
struct ReadOnlyMap {
    ptr: *mut libc::c_void,
    len: usize,
}

impl ReadOnlyMap {
    fn new(file: &std::fs::File, size: u64) -> std::io::Result<ReadOnlyMap> {
        let len = usize::try_from(size).map_err(|_| std::io::ErrorKind::InvalidData)?;
        if len == 0 {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
        // SAFETY: a fresh private read-only mapping of an open file; unmapped in Drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(ReadOnlyMap { ptr, len })
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is `len` readable bytes for as long as `self` lives. A file
        // truncated meanwhile would fault (SIGBUS); library files are not truncated in place
        // (installers replace them), which is also what aya's own resolver assumes.
        unsafe { std::slice::from_raw_parts(self.ptr.cast(), self.len) }
    }
}

impl Drop for ReadOnlyMap {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
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
        let map = ReadOnlyMap::new(&file, size).unwrap();
        let obj = object::File::parse(map.bytes()).unwrap();
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
