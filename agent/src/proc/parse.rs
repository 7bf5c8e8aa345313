//! Pure parsers over /proc file contents.

/// Most arguments kept from one command line.
pub const MAX_ARGS: usize = 4096;

/// NUL-separated arguments, lossily decoded (non-UTF-8 bytes become U+FFFD).
pub fn parse_cmdline(raw: &[u8]) -> Vec<String> {
    let raw = raw.strip_suffix(&[0]).unwrap_or(raw);
    if raw.is_empty() {
        return Vec::new();
    }
    raw.split(|b| *b == 0)
        .take(MAX_ARGS)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// The `NAME=value` pairs of a NUL-separated environment whose name is in `wanted`.
pub fn parse_environ_selected(raw: &[u8], wanted: &[&str]) -> Vec<(String, String)> {
    raw.split(|b| *b == 0)
        .filter_map(|kv| {
            let eq = kv.iter().position(|b| *b == b'=')?;
            let name = std::str::from_utf8(&kv[..eq]).ok()?;
            wanted.contains(&name).then(|| {
                (
                    name.to_owned(),
                    String::from_utf8_lossy(&kv[eq + 1..]).into_owned(),
                )
            })
        })
        .collect()
}

/// Distinct paths of mapped shared objects (`*.so`, `*.so.N`) in a maps file.
pub fn shared_objects(maps: &[u8]) -> Vec<String> {
    const MAX_LIBRARIES: usize = 1024;
    let mut out: Vec<String> = Vec::new();
    for line in maps.split(|b| *b == b'\n') {
        // address perms offset dev inode path — the path starts at the 6th field.
        let Some(path) = line
            .splitn(6, |b| *b == b' ')
            .nth(5)
            .map(|p| String::from_utf8_lossy(p).trim().to_owned())
        else {
            continue;
        };
        let is_so = path.starts_with('/')
            && (path.ends_with(".so") || path.contains(".so.") || path.contains(".so ("));
        if is_so && out.last() != Some(&path) && !out.contains(&path) {
            out.push(path);
            if out.len() == MAX_LIBRARIES {
                break;
            }
        }
    }
    out
}

/// `/proc/<pid>/stat`, parsed by procfs once it has the kernel's shape: `<pid> (<comm>) <state>
/// …`. procfs trims the line and slices it two bytes past the last `)`, and panics when that
/// is not a character boundary or past the end — a multi-byte character or trailing
/// whitespace there (both found by the `proc_status_stat` fuzz target). The kernel always
/// writes a space and a state letter there, so anything else is not a stat line.
pub fn stat(raw: &[u8]) -> Option<procfs::process::Stat> {
    let digits = raw.iter().take_while(|b| b.is_ascii_digit()).count();
    let close = raw.iter().rposition(|&b| b == b')')?;
    let shaped = digits > 0
        && raw.get(digits..digits + 2) == Some(b" (")
        && close > digits + 1
        && raw.get(close + 1) == Some(&b' ')
        && raw.get(close + 2).is_some_and(u8::is_ascii_graphic);
    if !shaped {
        return None;
    }
    <procfs::process::Stat as procfs::FromRead>::from_read(raw).ok()
}

/// `btime` from /proc/stat. Not procfs's `KernelStats`: it parses every CPU line and
/// requires fields a proc root under test does not have, for one number.
pub fn boot_time(stat: &str) -> Option<u64> {
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// The innermost pid of a status file's `NSpid:` line. Not procfs's `Status`: it requires
/// every field of the file and parses them all (the `Name:` any process chooses included,
/// where procfs's parsers have panicked before, see `stat`), for one line.
pub fn parse_ns_pid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))?
        .split_whitespace()
        .last()?
        .parse()
        .ok()
}
