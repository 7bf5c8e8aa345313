//! What one launch-probe hit costs a probed thread on this host, measured once at start-up.
//!
//! The launch duty cycle needs it twice: to turn a launch rate into overhead (the budget),
//! and to correct the launch rate a window sees for the probes' own slowing of the process
//! ([`super::launches`]). It differs 2–3× between hosts (~0.9 µs on the development VM,
//! ~0.4 µs on bare metal), so a constant errs one way or the other. The agent attaches the
//! launch counter itself (`cuda_entry` with a launch function's cookie) to a function of its
//! own, for its calling thread alone, and calls that function and an identical bare one in
//! alternate blocks: the difference is the trap and the program, as a launch pays them. Its
//! counters are set up before (a generation for the agent's own tgid, so the program reports
//! no first CUDA use) and removed after, by the caller.

use std::hint::black_box;
use std::path::PathBuf;
use std::time::Duration;

use aya::programs::uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeScope};
use aya::programs::UProbe;
use aya::Ebpf;

/// Calls per block, blocks of each target, and the work after each call (dependent
/// multiply-adds: ~2–5 µs): 7 × 2,000 calls, ~50 ms of CPU a target.
const CALLS: u32 = 2_000;
const BLOCKS: usize = 7;
const WORK: u32 = 2_048;
/// Outside these bounds a measurement is taken as disturbed (and the default is used).
const PLAUSIBLE: std::ops::RangeInclusive<Duration> =
    Duration::from_nanos(50)..=Duration::from_micros(20);

#[derive(Debug, thiserror::Error)]
pub enum CalibrationError {
    #[error("the launch program is not in the eBPF object")]
    NoProgram,
    #[error("finding the calibration function in /proc/self/maps: {0}")]
    NotMapped(String),
    #[error("attaching the calibration uprobe: {0}")]
    Attach(aya::programs::ProgramError),
    #[error("implausible: {0:?} per hit (the machine was busy)")]
    Implausible(Duration),
}

// Two identical functions: the probe goes on the first, the second is the bare reference,
// called in alternate blocks so that whatever else the machine does meanwhile weighs on both.
// They start as libcudart's functions do (`push %r15`): the kernel emulates a push at the
// breakpoint, one trap per hit. A first instruction it must single-step out of line costs a
// second trap, ~10 µs on the development VM instead of ~0.9 µs; a compiled function's
// prologue would pick one or the other by accident.
std::arch::global_asm!(
    ".pushsection .text.llmscope_calibration,\"ax\",@progbits",
    ".globl llmscope_calibration_probed",
    ".type llmscope_calibration_probed,@function",
    ".p2align 4",
    "llmscope_calibration_probed:",
    "push r15",
    "lea rax, [rdi + 1]",
    "pop r15",
    "ret",
    ".size llmscope_calibration_probed, .-llmscope_calibration_probed",
    ".globl llmscope_calibration_bare",
    ".type llmscope_calibration_bare,@function",
    ".p2align 4",
    "llmscope_calibration_bare:",
    "push r15",
    "lea rax, [rdi + 1]",
    "pop r15",
    "ret",
    ".size llmscope_calibration_bare, .-llmscope_calibration_bare",
    ".popsection",
);

unsafe extern "C" {
    fn llmscope_calibration_probed(x: u64) -> u64;
    fn llmscope_calibration_bare(x: u64) -> u64;
}

type Target = unsafe extern "C" fn(u64) -> u64;

/// The probed target's address.
fn target_address() -> usize {
    llmscope_calibration_probed as *const () as usize
}

/// One block: the CPU time `CALLS` calls of `target` take, each followed by the same fixed
/// work in user space (no system call: a launch sits between a framework's own work, and the
/// kernel's trap path is as cold for the probe as it is there). Timed in the thread's CPU
/// time, so being preempted changes nothing.
fn block(target: Target) -> Duration {
    // Through a pointer the compiler cannot see through.
    let target = black_box(target);
    let started = thread_cpu_time();
    let mut x = 0u64;
    for _ in 0..CALLS {
        // SAFETY: the targets read one register and write rax; they touch no memory but
        // the stack slot they push and pop.
        x = unsafe { target(x) };
        for _ in 0..WORK {
            x = black_box(x)
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1);
        }
    }
    black_box(x);
    thread_cpu_time() - started
}

/// CPU time of the calling thread.
pub fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Lends the loaded eBPF object to a closure.
pub type Lender<'a> = dyn Fn(&mut dyn FnMut(&mut Ebpf)) + 'a;

/// The cost of one hit of `program` attached with `cookie`: (probed − bare) / calls. Runs on
/// the calling thread (the probe is attached for it alone); `programs` lends the loaded object
/// for the attach and the detach only (the agent's attacher, locked that long).
pub fn hit_cost(
    programs: &Lender<'_>,
    program: &str,
    cookie: u64,
) -> Result<Duration, CalibrationError> {
    let (file, offset) =
        file_offset(target_address()).map_err(|e| CalibrationError::NotMapped(e.to_string()))?;
    let mut attached = Err(CalibrationError::NoProgram);
    programs(&mut |ebpf| {
        let Some(program) = ebpf
            .program_mut(program)
            .and_then(|p| <&mut UProbe>::try_from(p).ok())
        else {
            return;
        };
        let point = UProbeAttachPoint {
            location: UProbeAttachLocation::AbsoluteOffset(offset),
            cookie: Some(cookie),
        };
        attached = program
            .attach(point, &file, UProbeScope::CallingProcess)
            .map_err(CalibrationError::Attach);
    });
    let mut link = Some(attached?);
    // Bare and probed blocks in turn; the median of their differences.
    let mut differences: Vec<Duration> = (0..BLOCKS)
        .map(|_| {
            let bare = block(llmscope_calibration_bare);
            block(llmscope_calibration_probed).saturating_sub(bare)
        })
        .collect();
    differences.sort_unstable();
    let mut detached = None;
    programs(&mut |ebpf| {
        let program = ebpf
            .program_mut(program)
            .and_then(|p| <&mut UProbe>::try_from(p).ok());
        if let (Some(program), Some(link)) = (program, link.take()) {
            detached = program.take_link(link).ok();
        }
    });
    // Detaching waits for a grace period: not under the lender's lock.
    drop(detached);
    let per_hit = differences[BLOCKS / 2] / CALLS;
    if PLAUSIBLE.contains(&per_hit) {
        Ok(per_hit)
    } else {
        Err(CalibrationError::Implausible(per_hit))
    }
}

/// The file mapped at `address` in this process and the offset of `address` in it.
fn file_offset(address: usize) -> std::io::Result<(PathBuf, u64)> {
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    find_mapping(&maps, address as u64).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("no file mapping holds {address:#x}"),
        )
    })
}

/// Parses `/proc/<pid>/maps` lines: `start-end perms offset dev inode path`.
fn find_mapping(maps: &str, address: u64) -> Option<(PathBuf, u64)> {
    maps.lines().find_map(|line| {
        let mut fields = line.splitn(6, ' ');
        let (start, end) = fields.next()?.split_once('-')?;
        let (start, end) = (
            u64::from_str_radix(start, 16).ok()?,
            u64::from_str_radix(end, 16).ok()?,
        );
        let _perms = fields.next()?;
        let offset = u64::from_str_radix(fields.next()?, 16).ok()?;
        let path = fields.nth(2)?.trim_start();
        ((start..end).contains(&address) && path.starts_with('/'))
            .then(|| (PathBuf::from(path), address - start + offset))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_file_offset_of_an_address() {
        let maps = "\
5566a000-5566b000 r--p 00000000 fd:01 1234 /usr/bin/llmscope
5566b000-5566f000 r-xp 00001000 fd:01 1234 /usr/bin/llmscope
7ffd0000-7ffd1000 rw-p 00000000 00:00 0 [stack]
";
        assert_eq!(
            find_mapping(maps, 0x5566b010),
            Some((PathBuf::from("/usr/bin/llmscope"), 0x1010))
        );
        assert_eq!(find_mapping(maps, 0x7ffd0010), None, "not a file");
        assert_eq!(find_mapping(maps, 0x1000), None);
    }

    #[test]
    fn this_process_maps_its_own_code() {
        let (file, offset) = file_offset(target_address()).unwrap();
        assert_eq!(file, std::env::current_exe().unwrap());
        assert!(offset > 0);
    }
}
