//! Which files are CUDA libraries, and where a process maps them.

use agent_common::cuda::{API_DRIVER, API_RUNTIME};
use agent_common::{LIB_CUDA_DRIVER, LIB_CUDA_RUNTIME, LIB_FRAMEWORK};

use crate::identity::FRAMEWORK_LIBRARY_PREFIXES;
use crate::proc::shared_objects;

/// The library prefix table: file-name prefix → what a file so named is. The kernel (or the
/// perf-record fallback, [`classify_name`]) matches the start of the name; userspace checks
/// the whole name ([`library_api`]).
pub static WATCHED_PREFIXES: std::sync::LazyLock<Vec<(&'static str, u32)>> =
    std::sync::LazyLock::new(|| {
        let mut table = vec![
            ("libcudart.so", LIB_CUDA_RUNTIME),
            ("libcuda.so", LIB_CUDA_DRIVER),
        ];
        table.extend(
            FRAMEWORK_LIBRARY_PREFIXES
                .iter()
                .map(|p| (*p, LIB_FRAMEWORK)),
        );
        table
    });

/// The class of the longest prefix of the table that `name` starts with, as the kernel's
/// longest-prefix-match table answers.
pub fn classify_name(name: &str) -> Option<u32> {
    WATCHED_PREFIXES
        .iter()
        .filter(|(p, _)| name.starts_with(p))
        .max_by_key(|(p, _)| p.len())
        .map(|(_, class)| *class)
}

/// `runtime` for libcudart.so*, `driver` for libcuda.so*; None for everything else
/// (libcudnn, libcudart_static, libcudadevrt, …).
pub fn library_api(path: &str) -> Option<u8> {
    let base = path.rsplit('/').next().unwrap_or(path);
    let base = base.strip_suffix(" (deleted)").unwrap_or(base);
    let versioned = |stem: &str| {
        base.strip_prefix(stem).is_some_and(|rest| {
            rest.is_empty()
                || (rest.starts_with('.')
                    && rest[1..]
                        .split('.')
                        .all(|p| p.chars().all(|c| c.is_ascii_digit()) && !p.is_empty()))
        })
    };
    if versioned("libcudart.so") {
        Some(API_RUNTIME)
    } else if versioned("libcuda.so") {
        Some(API_DRIVER)
    } else {
        None
    }
}

pub fn api_name(api: u8) -> &'static str {
    if api == API_DRIVER {
        "driver"
    } else {
        "runtime"
    }
}

/// A CUDA library as one process maps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappedLibrary {
    pub api: u8,
    /// Path inside the process's mount namespace.
    pub path: String,
    /// The file was deleted or replaced after it was mapped: reach it through map_files.
    pub deleted: bool,
    /// `start-end` of its first mapping (the name of its /proc/<pid>/map_files entry).
    pub range: String,
}

/// The CUDA libraries in a maps file.
pub fn cuda_libraries(maps: &[u8]) -> Vec<MappedLibrary> {
    let mut found: Vec<MappedLibrary> = Vec::new();
    for path in shared_objects(maps) {
        let Some(api) = library_api(&path) else {
            continue;
        };
        let deleted = path.ends_with(" (deleted)");
        let clean = path.trim_end_matches(" (deleted)").to_owned();
        let range = maps
            .split(|b| *b == b'\n')
            .map(|l| String::from_utf8_lossy(l))
            .find(|l| l.trim_end().ends_with(&path))
            .and_then(|l| l.split_whitespace().next().map(str::to_owned))
            .unwrap_or_default();
        found.push(MappedLibrary {
            api,
            path: clean,
            deleted,
            range,
        });
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_cuda_libraries_only() {
        for (path, api) in [
            (
                "/usr/local/lib/python3.11/site-packages/nvidia/cuda_runtime/lib/libcudart.so.12",
                Some(API_RUNTIME),
            ),
            (
                "/usr/local/cuda/lib64/libcudart.so.12.9.79",
                Some(API_RUNTIME),
            ),
            ("libcudart.so", Some(API_RUNTIME)),
            ("/usr/lib/x86_64-linux-gnu/libcuda.so.1", Some(API_DRIVER)),
            (
                "/usr/lib/x86_64-linux-gnu/libcuda.so.575.57.08",
                Some(API_DRIVER),
            ),
            ("/tmp/x/libcuda.so.1 (deleted)", Some(API_DRIVER)),
            ("/usr/lib/libcudnn.so.9", None),
            ("/usr/local/cuda/lib64/libcudart_static.a", None),
            ("/usr/local/cuda/lib64/libcudadevrt.a", None),
            ("/usr/lib/libcudart.so.bak", None),
            ("/usr/lib/libcuda.so.1.", None),
        ] {
            assert_eq!(library_api(path), api, "{path}");
        }
    }

    #[test]
    fn every_watched_prefix_fits_the_kernel_table() {
        for (prefix, _) in WATCHED_PREFIXES.iter() {
            assert!(
                !prefix.is_empty() && prefix.len() < agent_common::LIB_PREFIX_LEN,
                "{prefix}"
            );
        }
        // Every CUDA library name the agent probes starts with a CUDA prefix of the table.
        for name in [
            "libcudart.so.12",
            "libcudart.so.13.0.48",
            "libcuda.so.1",
            "libcuda.so",
        ] {
            let class = classify_name(name);
            let want = if library_api(name) == Some(API_RUNTIME) {
                LIB_CUDA_RUNTIME
            } else {
                LIB_CUDA_DRIVER
            };
            assert_eq!(class, Some(want), "{name}");
        }
        assert_eq!(classify_name("libcudnn.so.9"), None);
        assert_eq!(classify_name("libtorch_cpu.so"), Some(LIB_FRAMEWORK));
    }

    #[test]
    fn finds_mapped_libraries_with_their_ranges() {
        let maps =
            b"7f00-7f01 r--p 00000000 08:01 2 /venv/nvidia/cuda_runtime/lib/libcudart.so.12\n\
7f01-7f02 r-xp 00001000 08:01 2 /venv/nvidia/cuda_runtime/lib/libcudart.so.12\n\
7f05-7f06 r--p 00000000 00:05 9 /tmp/libcuda.so.1 (deleted)\n\
7f07-7f08 r--p 00000000 08:01 3 /usr/lib/libcudnn.so.9\n";
        assert_eq!(
            cuda_libraries(maps),
            vec![
                MappedLibrary {
                    api: API_RUNTIME,
                    path: "/venv/nvidia/cuda_runtime/lib/libcudart.so.12".into(),
                    deleted: false,
                    range: "7f00-7f01".into()
                },
                MappedLibrary {
                    api: API_DRIVER,
                    path: "/tmp/libcuda.so.1".into(),
                    deleted: true,
                    range: "7f05-7f06".into()
                },
            ]
        );
    }
}
