use std::collections::HashMap;
use std::path::PathBuf;

use super::*;

struct Fake(HashMap<u32, (u32, f64)>);

impl Processes for Fake {
    fn owner_and_start(&self, pid: u32) -> Option<(Option<u32>, f64)> {
        self.0.get(&pid).map(|&(uid, start)| (Some(uid), start))
    }

    /// Every process is in our namespace; start ticks are the start seconds.
    fn find(&self, pid: u32, start_time_ticks: u64) -> Vec<u32> {
        self.0
            .get(&pid)
            .filter(|&&(_, start)| start as u64 == start_time_ticks)
            .map(|_| vec![pid])
            .unwrap_or_default()
    }
}

fn uid() -> u32 {
    // SAFETY: no preconditions.
    unsafe { libc::geteuid() }
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn report(pid: u32, timestamp: f64) -> String {
    format!(
        r#"{{"version": 1, "pid": {pid}, "gpu_memory_allocated_bytes": 1073741824, "gpu_memory_reserved_bytes": 2147483648, "gpu_utilization": 42.5, "gpu_index": 1, "timestamp": {timestamp}}}"#
    )
}

struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let dir =
            std::env::temp_dir().join(format!("llmscope-gpuinfo-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Dir(dir)
    }

    fn file(&self, pid: u32) -> PathBuf {
        self.0.join(format!("gpu-info-{pid}.json"))
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn every_hostile_file_is_refused_for_its_reason() {
    let dir = Dir::new("hostile");
    let t = now();
    let me = uid();
    let started = t - 100.0;
    let mut procs: HashMap<u32, (u32, f64)> = (1..=20).map(|pid| (pid, (me, started))).collect();

    std::fs::write(dir.file(1), report(1, t)).unwrap();
    std::os::unix::fs::symlink("/etc/shadow", dir.file(2)).unwrap();
    let fifo = std::ffi::CString::new(dir.file(3).to_str().unwrap()).unwrap();
    // SAFETY: a valid C string path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    std::fs::File::create(dir.file(4))
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    std::fs::write(dir.file(5), "[".repeat(60_000)).unwrap();
    std::fs::write(dir.file(6), report(6, t).replace("42.5", "NaN")).unwrap();
    std::fs::write(
        dir.file(7),
        report(7, t).replace("\"pid\": 7", "\"pid\": \"seven\""),
    )
    .unwrap();
    std::fs::write(dir.file(8), report(9, t)).unwrap();
    std::fs::write(dir.file(10), report(10, t - 3600.0)).unwrap();
    std::fs::write(dir.file(11), report(11, t)).unwrap();
    procs.remove(&11);
    std::fs::write(dir.file(12), report(12, t)).unwrap();
    procs.insert(12, (me, t + 1000.0));
    std::fs::write(dir.file(13), report(13, t)).unwrap();
    procs.insert(13, (me + 1, started));
    std::fs::write(dir.file(14), report(14, t).replace("1073741824", "-5")).unwrap();
    std::fs::write(
        dir.file(15),
        report(15, t).replace("\"version\": 1", "\"version\": 2"),
    )
    .unwrap();
    std::fs::create_dir(dir.file(16)).unwrap();
    std::fs::write(dir.0.join("gpu-info-abc.json"), "ignored").unwrap();
    std::fs::write(dir.0.join("notes.txt"), "ignored").unwrap();

    let scan = scan(
        &dir.0,
        &Limits::default(),
        &Fake(procs.clone()),
        SystemTime::now(),
    )
    .unwrap();
    assert_eq!(scan.accepted.len(), 1, "{scan:?}");
    let ok = &scan.accepted[0];
    assert_eq!(
        (
            ok.pid,
            ok.gpu_index,
            ok.gpu_memory_allocated_bytes,
            ok.gpu_utilization
        ),
        (1, 1, 1073741824.0, Some(42.5))
    );
    let expected: BTreeMap<&str, u64> = [
        ("symlink", 1),
        ("not_a_regular_file", 2),
        ("too_large", 1),
        ("malformed", 3),
        ("pid_mismatch", 1),
        ("stale", 1),
        ("process_gone", 1),
        ("older_than_process", 1),
        ("wrong_owner", 1),
        ("invalid_value", 1),
        ("unsupported_version", 1),
    ]
    .into_iter()
    .collect();
    assert_eq!(scan.rejected_by_reason(), expected);

    // A refused file left in place is counted once, however many scans see it; changed, it
    // is counted again.
    let mut counted = Rejections::default();
    assert!(counted.totals().all(|(_, n)| n == 0), "every reason from 0");
    assert_eq!(counted.totals().count(), Reason::ALL.len());
    counted.count(&scan);
    let again = super::scan(
        &dir.0,
        &Limits::default(),
        &Fake(procs.clone()),
        SystemTime::now(),
    )
    .unwrap();
    counted.count(&again);
    let totals: BTreeMap<&str, u64> = counted.totals().filter(|(_, n)| *n > 0).collect();
    assert_eq!(totals, expected);
    std::fs::write(dir.0.join("gpu-info-7.json"), "{still not json").unwrap();
    let changed = super::scan(
        &dir.0,
        &Limits::default(),
        &Fake(procs.clone()),
        SystemTime::now(),
    )
    .unwrap();
    counted.count(&changed);
    assert_eq!(
        counted.totals().find(|(r, _)| *r == "malformed"),
        Some(("malformed", 4))
    );
}

#[test]
fn files_per_scan_are_bounded() {
    let dir = Dir::new("bounded");
    let t = now();
    for pid in 1..=5 {
        std::fs::write(dir.file(pid), report(pid, t)).unwrap();
    }
    let procs = Fake((1..=5).map(|pid| (pid, (uid(), t - 10.0))).collect());
    let limits = Limits {
        max_files: 3,
        ..Limits::default()
    };
    let scan = scan(&dir.0, &limits, &procs, SystemTime::now()).unwrap();
    assert_eq!(scan.accepted.len(), 3);
    assert_eq!(scan.rejected_by_reason().get("too_many_files"), Some(&2));
}

/// Anyone may fill the (world-writable) directory: 100,000 files cost a scan of at most
/// `max_entries` directory entries, and each truncated scan is counted.
#[test]
fn a_directory_of_a_hundred_thousand_files_costs_a_bounded_scan() {
    let dir = Dir::new("flood");
    for pid in 1..=100_000u32 {
        std::fs::File::create(dir.file(pid)).unwrap();
    }
    let procs = Fake(HashMap::new());
    let limits = Limits::default();
    let mut rejections = Rejections::default();
    for _ in 0..2 {
        let started = std::time::Instant::now();
        let scan = scan(&dir.0, &limits, &procs, SystemTime::now()).unwrap();
        eprintln!("scan of 100,000 files: {:?}", started.elapsed());
        assert!(scan.truncated);
        assert!(scan.accepted.is_empty());
        assert!(scan.rejected.len() <= 2 * limits.max_files + limits.max_files);
        rejections.count(&scan);
    }
    assert_eq!(rejections.scans_truncated(), 2);
}

#[test]
fn the_original_monitors_files_without_version_are_read() {
    let info = schema::parse(br#"{"pid": 3, "gpu_memory_allocated_bytes": 1, "gpu_memory_reserved_bytes": 2, "gpu_utilization": 0, "gpu_index": 0, "timestamp": 1.5}"#).unwrap();
    assert_eq!((info.version, info.pid), (SCHEMA_VERSION, 3));
    assert_eq!(pid_from_name("gpu-info-123.json"), Some(123));
    for bad in [
        "gpu-info-.json",
        "gpu-info-12a.json",
        "gpu-info-99999999999.json",
        "gpu-info-1.json.tmp",
    ] {
        assert_eq!(pid_from_name(bad), None, "{bad}");
    }
}

/// Processes in other PID namespaces: (pid inside, start) → host pids.
struct Namespaced(HashMap<(u32, u64), Vec<u32>>, HashMap<u32, (u32, f64)>);

impl Processes for Namespaced {
    fn owner_and_start(&self, pid: u32) -> Option<(Option<u32>, f64)> {
        self.1.get(&pid).map(|&(uid, start)| (Some(uid), start))
    }

    fn find(&self, pid: u32, start_time_ticks: u64) -> Vec<u32> {
        self.0
            .get(&(pid, start_time_ticks))
            .cloned()
            .unwrap_or_default()
    }
}

#[test]
fn reports_from_other_pid_namespaces_join_their_one_writer() {
    let dir = Dir::new("namespaces");
    let t = now();
    let with_start = |pid: u32, ticks: u64| {
        report(pid, t).replace(
            "\"pid\": ",
            &format!("\"start_time_ticks\": {ticks}, \"pid\": "),
        )
    };
    // pid 1 in two containers, told apart by start time; pid 7 with a start no one has;
    // pid 9 matching two processes.
    std::fs::write(dir.file(1), with_start(1, 500)).unwrap();
    std::fs::write(dir.file(7), with_start(7, 999)).unwrap();
    std::fs::write(dir.file(9), with_start(9, 600)).unwrap();
    let procs = Namespaced(
        [
            ((1, 500), vec![4242]),
            ((1, 501), vec![5353]),
            ((9, 600), vec![6000, 6001]),
        ]
        .into(),
        [
            (4242, (uid(), t - 10.0)),
            (5353, (uid(), t - 10.0)),
            (6000, (uid(), t - 10.0)),
            (6001, (uid(), t - 10.0)),
        ]
        .into(),
    );
    let scan = scan(&dir.0, &Limits::default(), &procs, SystemTime::now()).unwrap();
    let accepted: Vec<u32> = scan.accepted.iter().map(|i| i.pid).collect();
    assert_eq!(accepted, [4242], "joined to the host pid of its writer");
    let refused: BTreeMap<&str, u64> = scan.rejected_by_reason();
    assert_eq!(
        refused,
        [("ambiguous_process", 1), ("no_matching_process", 1)].into()
    );
}
